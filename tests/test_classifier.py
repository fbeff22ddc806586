"""The functional linear classifier: shapes, jit, the train step, fit, scikit-learn's optimum.

conftest.py turns on strict dtype promotion, which the classifier's own code
passes. optax's adam does not (its bias correction raises a Python float to an
int32 step count), so the tests that run adam do it under standard promotion.
Most checks run jitted: one compilation is much faster than running the loss
eagerly, primitive by primitive.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jsoftmax
from jsoftmax import classifier


def blobs(n_per_class=10, num_classes=3, num_features=2, seed=0, spread=0.3):
    """Well-separated Gaussian blobs: a linearly separable problem."""
    rng = np.random.default_rng(seed)
    centers = 3.0 * np.eye(num_classes, num_features)
    noise = spread * rng.standard_normal((num_classes, n_per_class, num_features))
    x = (centers[:, None, :] + noise).reshape(-1, num_features)
    y = np.repeat(np.arange(num_classes), n_per_class)
    return x.astype(np.float32), y.astype(np.int32)


def reference_objective(w, b, x, y, l2):
    """Mean cross-entropy + 0.5 * l2 * ||w||^2 in float64 numpy."""
    w = np.asarray(w, np.float64)
    z = np.asarray(x, np.float64) @ w + np.asarray(b, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(y)), y].mean() + 0.5 * l2 * np.sum(w**2)


def test_public_names_are_documented():
    assert set(classifier.__all__) >= {
        "init_params",
        "logits",
        "loss",
        "make_train_step",
        "fit",
        "predict",
        "predict_proba",
        "accuracy",
    }
    for name in classifier.__all__:
        assert getattr(classifier, name).__doc__, name


def test_init_params_shapes_and_dtypes():
    params = classifier.init_params(jax.random.key(0), 5, 3)
    assert params["w"].shape == (5, 3) and params["w"].dtype == jnp.float32
    assert params["b"].shape == (3,) and params["b"].dtype == jnp.float32
    np.testing.assert_array_equal(params["b"], 0.0)
    assert 0 < float(jnp.std(params["w"])) < 0.1
    zeros = classifier.init_params(jax.random.key(0), 5, 3, scale=0.0, dtype=jnp.bfloat16)
    assert zeros["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(zeros["w"], np.float32), 0.0)


@pytest.mark.parametrize(("features", "classes"), [(0, 3), (4, 1)])
def test_init_params_rejects_bad_sizes(features, classes):
    with pytest.raises(ValueError):
        classifier.init_params(jax.random.key(0), features, classes)


def test_logits_proba_predict_accuracy_under_jit():
    params = {"w": jnp.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]), "b": jnp.array([0.0, 0.0, 0.5])}
    x = jnp.array([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    y = jnp.array([0, 1, 2, 0])

    @jax.jit
    def everything(params, x, y):
        return (
            classifier.logits(params, x),
            classifier.predict_proba(params, x),
            classifier.predict(params, x),
            classifier.accuracy(params, x, y),
            classifier.logits(params, x.astype(jnp.int32)),
        )

    z, p, labels, acc, z_int = everything(params, x, y)
    z_ref = np.asarray(x) @ np.asarray(params["w"]) + np.asarray(params["b"])
    assert z.shape == (4, 3)
    np.testing.assert_allclose(z, z_ref, rtol=1e-6)
    np.testing.assert_allclose(p, np.exp(z_ref) / np.exp(z_ref).sum(1, keepdims=True), rtol=1e-5)
    assert labels.dtype == jnp.int32
    np.testing.assert_array_equal(labels, [0, 1, 2, 1])
    assert acc.dtype == jnp.float32 and float(acc) == 0.75
    np.testing.assert_allclose(z_int, z_ref, rtol=1e-6)  # integer features are cast


def test_logits_and_loss_reject_mismatched_shapes():
    params = classifier.init_params(jax.random.key(0), 3, 2)
    with pytest.raises(ValueError, match=r"x must be \[N, 3\]"):
        classifier.logits(params, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="y must have shape"):
        classifier.loss(params, jnp.ones((4, 3)), jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="where must have shape"):
        classifier.loss(params, jnp.ones((4, 3)), jnp.zeros(4, jnp.int32), where=jnp.ones(3, bool))
    with pytest.raises(TypeError, match="params must be a dict"):
        classifier.logits({"weights": jnp.ones((3, 2))}, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="l2 must be"):
        classifier.loss(params, jnp.ones((4, 3)), jnp.zeros(4, jnp.int32), l2=-1.0)


def test_loss_is_mean_cross_entropy_plus_l2_on_weights_only():
    x, y = blobs(n_per_class=5)
    params = classifier.init_params(jax.random.key(1), 2, 3, scale=0.5)
    params["b"] = jnp.array([0.3, -0.2, 0.1])
    l2 = 0.25
    keep = np.arange(len(y)) % 3 != 0

    @jax.jit
    def parts(params):
        z = classifier.logits(params, x)
        return {
            "loss": classifier.loss(params, x, y, l2),
            "plain": classifier.loss(params, x, y),
            "ce": jsoftmax.softmax_cross_entropy_with_integer_labels(z, y, reduction="mean"),
            "masked": classifier.loss(params, x, y, l2, where=keep),
            "grad_reg": jax.grad(classifier.loss)(params, x, y, l2),
            "grad_plain": jax.grad(classifier.loss)(params, x, y),
        }

    out = parts(params)
    np.testing.assert_allclose(
        out["loss"], reference_objective(params["w"], params["b"], x, y, l2), rtol=1e-6
    )
    np.testing.assert_allclose(out["plain"], out["ce"], rtol=1e-6)
    # a per-example mask averages over the kept examples only
    np.testing.assert_allclose(
        out["masked"],
        reference_objective(params["w"], params["b"], x[keep], y[keep], l2),
        rtol=1e-6,
    )
    # the penalty's gradient is l2 * w on the weights and nothing on the bias
    g_reg, g_plain = out["grad_reg"], out["grad_plain"]
    np.testing.assert_allclose(g_reg["w"] - g_plain["w"], l2 * params["w"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_reg["b"], g_plain["b"], rtol=1e-6)


def test_train_step_is_jitted_and_decreases_the_loss():
    x, y = blobs()
    optimizer = optax.adam(0.1)
    step = classifier.make_train_step(optimizer, l2=1e-3)
    assert hasattr(step, "lower")  # a jax.jit function
    params = classifier.init_params(jax.random.key(0), 2, 3)
    opt_state = optimizer.init(params)
    values = []
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(20):
            params, opt_state, value = step(params, opt_state, x, y)
            values.append(float(value))
    assert value.shape == () and values[-1] < 0.5 * values[0]


def losses_over_steps(optimizer, steps, l2=0.0):
    """The loss at each of ``steps`` train steps on ``blobs()``, from a fixed start."""
    x, y = blobs()
    step = classifier.make_train_step(optimizer, l2=l2)
    params = classifier.init_params(jax.random.key(0), 2, 3)
    state = optimizer.init(params)
    values = []
    for _ in range(steps):
        params, state, value = step(params, state, x, y)
        values.append(float(value))
    return values


def test_train_step_with_a_plain_gradient_transformation():
    """A transformation without extra-args support is not sent value= and friends."""
    inner = optax.sgd(0.5)

    def update(updates, state, params=None):  # no **extra_args
        return inner.update(updates, state, params)

    plain = optax.GradientTransformation(inner.init, update)
    assert not isinstance(plain, optax.GradientTransformationExtraArgs)
    values = losses_over_steps(plain, 5)
    assert values[-1] < values[0]


def test_train_step_drives_lbfgs_with_its_line_search():
    values = losses_over_steps(optax.lbfgs(), 15, l2=1e-2)
    assert all(b <= a + 1e-6 for a, b in zip(values, values[1:], strict=False))
    assert values[-1] < 0.5 * values[0]


def test_make_train_step_rejects_a_non_optimizer():
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        classifier.make_train_step(lambda g: g)


@pytest.mark.parametrize(
    ("optimizer", "batch_size", "epochs"),
    [(optax.adam(0.1), 7, 30), (optax.lbfgs(), None, 20)],
    ids=["adam-minibatch", "lbfgs-full-batch"],
)
def test_fit_separable_problem_reaches_100_percent(optimizer, batch_size, epochs):
    x, y = blobs(n_per_class=10)
    params = classifier.init_params(jax.random.key(0), 2, 3)
    calls = []
    with jax.numpy_dtype_promotion("standard"):
        params, history = classifier.fit(
            params,
            optimizer,
            x,
            y,
            epochs=epochs,
            batch_size=batch_size,
            key=jax.random.key(1),
            l2=1e-3,
            validation_data=blobs(n_per_class=5, seed=1),
            callback=lambda epoch, h: calls.append((epoch, len(h.loss))),
        )
    assert history.accuracy[-1] == 1.0 and history.val_accuracy[-1] == 1.0
    assert calls == [(e, e) for e in range(1, epochs + 1)]
    assert len(history.loss) == len(history.val_loss) == len(history.seconds) == epochs
    assert history.loss[-1] < history.loss[0]
    assert history.compile_seconds > 0 and history.seconds == sorted(history.seconds)
    np.testing.assert_allclose(
        history.loss[-1], reference_objective(params["w"], params["b"], x, y, 1e-3), rtol=1e-5
    )
    np.testing.assert_array_equal(np.argmax(x @ params["w"] + params["b"], axis=1), y)
    assert set(history.as_dict()) >= {"loss", "accuracy", "val_loss", "val_accuracy", "seconds"}


def test_fit_equals_the_public_step_by_hand_with_a_short_last_batch():
    """fit's padded-and-masked last batch is exactly a short batch, not dropped or diluted."""
    x, y = blobs(n_per_class=5)  # 15 examples: batches of 4, 4, 4 and 3
    optimizer = optax.sgd(0.3, momentum=0.5)
    params0 = classifier.init_params(jax.random.key(0), 2, 3, scale=0.5)
    key = jax.random.key(7)
    fitted, _ = classifier.fit(params0, optimizer, x, y, epochs=2, batch_size=4, key=key, l2=0.01)
    again, _ = classifier.fit(params0, optimizer, x, y, epochs=2, batch_size=4, key=key, l2=0.01)
    np.testing.assert_array_equal(fitted["w"], again["w"])  # deterministic given the key

    step = classifier.make_train_step(optimizer, l2=0.01)
    params, state = params0, optimizer.init(params0)
    for _ in range(2):
        key, epoch_key = jax.random.split(key)
        order = np.asarray(jax.random.permutation(epoch_key, len(y)))
        for start in range(0, len(y), 4):
            batch = order[start : start + 4]
            params, state, _ = step(params, state, x[batch], y[batch])
    np.testing.assert_allclose(fitted["w"], params["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fitted["b"], params["b"], rtol=1e-5, atol=1e-6)


def test_fit_full_batch_resumes_from_an_opt_state():
    x, y = blobs()
    optimizer = optax.sgd(0.1, momentum=0.9)
    params = classifier.init_params(jax.random.key(0), 2, 3)
    step = classifier.make_train_step(optimizer)
    p, s = params, optimizer.init(params)
    for _ in range(3):
        p, s, _ = step(p, s, x, y)
    # a batch size of at least N is full batch; training continues from (p, s)
    resumed, _ = classifier.fit(p, optimizer, x, y, epochs=2, batch_size=10_000, opt_state=s)
    for _ in range(2):
        p, s, _ = step(p, s, x, y)
    np.testing.assert_allclose(resumed["w"], p["w"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epochs": 0}, ValueError, "epochs must be an int >= 1"),
        ({"epochs": 1, "batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"epochs": 1, "l2": float("nan")}, ValueError, "l2 must be"),
    ],
)
def test_fit_rejects_bad_arguments(kwargs, error, match):
    x, y = blobs(n_per_class=2)
    params = classifier.init_params(jax.random.key(0), 2, 3)
    with pytest.raises(error, match=match):
        classifier.fit(params, optax.sgd(0.1), x, y, **kwargs)


def test_fit_rejects_float_labels_and_mismatched_data():
    x, y = blobs(n_per_class=2)
    params = classifier.init_params(jax.random.key(0), 2, 3)
    with pytest.raises(TypeError, match="integer class labels"):
        classifier.fit(params, optax.sgd(0.1), x, y.astype(np.float32), epochs=1)
    with pytest.raises(ValueError, match="shape"):
        classifier.fit(params, optax.sgd(0.1), x, y[:-1], epochs=1)
    with pytest.raises(ValueError, match="features"):
        classifier.fit(params, optax.sgd(0.1), np.ones((6, 5), np.float32), y, epochs=1)


def test_lbfgs_matches_sklearn_logistic_regression_on_digits():
    """Full-batch L-BFGS with l2 = 1 / (C * n) reaches scikit-learn's optimum."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression

    from jsoftmax import _data

    split = _data.split(_data.load_builtin("digits"), 0.2, seed=42)
    x, y = split.x_train, split.y_train
    n, d = x.shape
    c = 1.0
    l2 = 1.0 / (c * n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x.astype(np.float64), y)
    w_sk, b_sk = sk.coef_.T, sk.intercept_
    sk_objective = reference_objective(w_sk, b_sk, x, y, l2)

    params = classifier.init_params(jax.random.key(0), d, 10, scale=0.0)
    params, history = classifier.fit(params, optax.lbfgs(), x, y, epochs=200, l2=l2)
    ours = reference_objective(params["w"], params["b"], x, y, l2)

    assert abs(ours - sk_objective) / sk_objective < 1e-3  # the goal
    assert abs(ours - sk_objective) / sk_objective < 1e-6  # what it actually reaches
    np.testing.assert_allclose(history.loss[-1], sk_objective, rtol=1e-5)
    # W is unique (the penalty pins it down); b only up to a common shift.
    np.testing.assert_allclose(params["w"], w_sk, rtol=0, atol=1e-4)
    assert np.linalg.norm(params["w"] - w_sk) / np.linalg.norm(w_sk) < 1e-4
    b = np.asarray(params["b"], np.float64)
    np.testing.assert_allclose(b - b.mean(), b_sk - b_sk.mean(), rtol=0, atol=1e-4)
