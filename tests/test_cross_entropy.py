"""Both cross-entropies against float64 PyTorch-semantics references, optax and closed forms."""

import contextlib
import functools
import io
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.ad_checkpoint import print_saved_residuals
from jax.experimental import checkify
from jax.test_util import check_grads
from scipy import special

import jsoftmax
from tests import reference as ref

soft_ce = jsoftmax.softmax_cross_entropy
int_ce = jsoftmax.softmax_cross_entropy_with_integer_labels

OPTIONS = list(
    itertools.product(
        [False, True],  # class weights
        [None, -100],  # ignore_index (integer labels only)
        [0.0, 0.25],  # label smoothing
        ["none", "sum", "mean"],
    )
)
SOFT_OPTIONS = [(w, s, r) for w, i, s, r in OPTIONS if i is None]


def random_problem(rng, n=11, c=7, scale=3.0):
    logits = (rng.standard_normal((n, c)) * scale).astype(np.float32)
    labels = rng.integers(0, c, n)
    weights = rng.uniform(0.2, 2.0, c).astype(np.float32)
    probs = rng.dirichlet(np.ones(c), n).astype(np.float32)
    return logits, labels, weights, probs


# --- PyTorch's F.cross_entropy definitions, in float64 ----------------------------


@pytest.mark.parametrize("use_weights, ignore_index, smoothing, reduction", OPTIONS)
def test_integer_labels_match_pytorch_definitions(
    use_weights, ignore_index, smoothing, reduction, rng
):
    logits, labels, weights, _ = random_problem(rng)
    if ignore_index is not None:
        labels[[1, 4]] = ignore_index
    weight = weights if use_weights else None
    kwargs = dict(
        class_weights=weight,
        ignore_index=ignore_index,
        label_smoothing=smoothing,
        reduction=reduction,
    )
    per_example, example_weight = ref.cross_entropy_int(
        logits, labels, weight, ignore_index, smoothing
    )
    expected = ref.reduce(per_example, reduction, example_weight.sum())
    value, grad = jax.value_and_grad(lambda x: jnp.sum(int_ce(x, labels, **kwargs)))(
        jnp.asarray(logits)
    )
    assert value.dtype == jnp.float32
    assert ref.rel_err(int_ce(logits, labels, **kwargs), expected) < 1e-6
    # The gradient of the reduced loss, by the closed form.
    target = np.zeros_like(ref.to64(logits))
    kept = labels != (ignore_index if ignore_index is not None else -(10**9))
    target[np.arange(len(labels))[kept], labels[kept]] = 1.0
    per_row = ref.soft_grad(logits, target, weight, smoothing) * kept[:, None]
    if reduction == "mean":
        per_row /= example_weight.sum()
    assert ref.rel_err(grad, per_row) < 1e-5


@pytest.mark.parametrize("use_weights, smoothing, reduction", SOFT_OPTIONS)
def test_soft_labels_match_pytorch_definitions(
    backend_forms, use_weights, smoothing, reduction, rng
):
    logits, _, weights, probs = random_problem(rng)
    weight = weights if use_weights else None
    kwargs = dict(class_weights=weight, label_smoothing=smoothing, reduction=reduction)
    expected = ref.reduce(ref.cross_entropy_soft(logits, probs, weight, smoothing), reduction)
    assert ref.rel_err(soft_ce(logits, probs, **kwargs), expected) < 1e-6
    grad_logits, grad_labels = jax.grad(
        lambda x, y: jnp.sum(soft_ce(x, y, **kwargs)), argnums=(0, 1)
    )(jnp.asarray(logits), jnp.asarray(probs))
    divisor = len(logits) if reduction == "mean" else 1
    expected_grad = ref.soft_grad(logits, probs, weight, smoothing) / divisor
    assert ref.rel_err(grad_logits, expected_grad) < 1e-5
    w = np.ones(logits.shape[-1]) if weight is None else ref.to64(weight)
    expected_label_grad = -(1 - smoothing) * w * ref.log_softmax(logits) / divisor
    assert ref.rel_err(grad_labels, expected_label_grad) < 1e-5


@pytest.mark.parametrize("use_weights, ignore_index, smoothing, reduction", OPTIONS)
def test_integer_labels_match_torch(use_weights, ignore_index, smoothing, reduction, rng):
    torch = pytest.importorskip("torch")
    logits, labels, weights, _ = random_problem(rng)
    if ignore_index is not None:
        labels[[1, 4]] = ignore_index
    weight = weights if use_weights else None
    torch_logits = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    torch_loss = torch.nn.functional.cross_entropy(
        torch_logits,
        torch.tensor(labels),
        weight=None if weight is None else torch.tensor(weight, dtype=torch.float64),
        ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=smoothing,
        reduction=reduction,
    )
    torch_loss.sum().backward()
    kwargs = dict(
        class_weights=weight,
        ignore_index=ignore_index,
        label_smoothing=smoothing,
        reduction=reduction,
    )
    ours = int_ce(logits, labels, **kwargs)
    grad = jax.grad(lambda x: jnp.sum(int_ce(x, labels, **kwargs)))(jnp.asarray(logits))
    assert ref.rel_err(ours, torch_loss.detach().numpy()) < 1e-6
    assert ref.rel_err(grad, torch_logits.grad.numpy()) < 1e-5


@pytest.mark.parametrize("use_weights, smoothing, reduction", SOFT_OPTIONS)
def test_soft_labels_match_torch(use_weights, smoothing, reduction, rng):
    torch = pytest.importorskip("torch")
    logits, _, weights, probs = random_problem(rng)
    weight = weights if use_weights else None
    torch_logits = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    torch_probs = torch.tensor(probs, dtype=torch.float64, requires_grad=True)
    torch_loss = torch.nn.functional.cross_entropy(
        torch_logits,
        torch_probs,
        weight=None if weight is None else torch.tensor(weight, dtype=torch.float64),
        label_smoothing=smoothing,
        reduction=reduction,
    )
    torch_loss.sum().backward()
    kwargs = dict(class_weights=weight, label_smoothing=smoothing, reduction=reduction)
    grads = jax.grad(lambda x, y: jnp.sum(soft_ce(x, y, **kwargs)), argnums=(0, 1))(
        jnp.asarray(logits), jnp.asarray(probs)
    )
    assert ref.rel_err(soft_ce(logits, probs, **kwargs), torch_loss.detach().numpy()) < 1e-6
    assert ref.rel_err(grads[0], torch_logits.grad.numpy()) < 1e-5
    assert ref.rel_err(grads[1], torch_probs.grad.numpy()) < 1e-5


def test_mean_with_nothing_counted_is_zero_not_nan():
    logits = jnp.ones((3, 4))
    labels = jnp.array([-100, -100, -100])
    loss, grad = jax.value_and_grad(
        lambda x: int_ce(x, labels, ignore_index=-100, reduction="mean")
    )(logits)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    masked = soft_ce(logits, jnp.ones((3, 4)) / 4, where=jnp.zeros(3, bool), reduction="mean")
    assert masked == 0.0


def test_mean_of_huge_losses_does_not_overflow():
    """Four losses of 2e38 each: their sum overflows float32, their mean does not."""
    logits = jnp.tile(jnp.array([[1e38, -1e38]], jnp.float32), (4, 1))
    labels = jnp.ones(4, jnp.int32)
    onehot = jnp.tile(jnp.array([[0.0, 1.0]], jnp.float32), (4, 1))
    for loss, grad in (
        jax.value_and_grad(lambda x: int_ce(x, labels, reduction="mean"))(logits),
        jax.value_and_grad(lambda x: soft_ce(x, onehot, reduction="mean"))(logits),
    ):
        np.testing.assert_allclose(loss, 2e38, rtol=1e-6)
        np.testing.assert_allclose(grad, np.tile([[0.25, -0.25]], (4, 1)), rtol=1e-6)
    assert int_ce(logits, labels, reduction="sum") == np.inf  # the sum itself does overflow


def test_mean_uses_the_class_weights_of_counted_examples(rng):
    logits, labels, weights, _ = random_problem(rng)
    where = np.arange(len(labels)) % 3 != 0
    ours = int_ce(logits, labels, where=where, class_weights=weights, reduction="mean")
    per_example, example_weight = ref.cross_entropy_int(logits, labels, weights)
    expected = np.sum(per_example[where]) / np.sum(example_weight[where])
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


@pytest.mark.parametrize("integer", [True, False], ids=["integer", "soft"])
@pytest.mark.parametrize(
    "options",
    [
        {"class_weights": [1.0, 3.0, 0.5]},
        {"class_weights": [1.0, 3.0, 0.5], "label_smoothing": 0.2},
        {"z_loss": 1.0},
        {"z_loss": 1.0, "class_weights": [1.0, 3.0, 0.5], "where": [True, True, False, True]},
    ],
    ids=["weights", "weights_smoothing", "z_loss", "z_loss_weights_mask"],
)
def test_weighted_or_z_loss_mean_is_finite_when_only_its_terms_overflow(
    backend_forms, options, integer
):
    """Terms beyond float32's range, ``3 * 2e38`` or ``(2e19)**2``, in a representable mean.

    The integer loss's mean divides by the counted labels' class weights, the
    soft-label loss's by the number of counted examples (PyTorch's definitions).
    """
    logits = np.array(
        [[0.0, -2e38, 0.0], [0.0, 1.0, 2.0], [2e19, 0.0, 0.0], [1.0, 0.0, -1.0]], np.float32
    )
    labels = np.array([1, 0, 0, 2])
    onehot = np.eye(3, dtype=np.float32)[labels]
    weights = options.get("class_weights")
    smoothing = options.get("label_smoothing", 0.0)
    z_loss = options.get("z_loss", 0.0)
    where = np.asarray(options.get("where", [True] * 4))
    per_example, example_weight = ref.cross_entropy_int(
        logits, labels, weights, label_smoothing=smoothing, z_loss=z_loss
    )
    denominator = np.sum(example_weight[where]) if integer else np.sum(where)
    expected = np.sum(per_example[where]) / denominator
    assert np.isinf(np.float32(np.max(per_example)))  # the terms themselves overflow
    assert np.isfinite(np.float32(expected))

    arrays = ("class_weights", "where")
    kwargs = {k: jnp.asarray(v) if k in arrays else v for k, v in options.items()}
    if integer:
        loss_fn = jax.jit(lambda x, y: int_ce(x, labels, reduction="mean", **kwargs))
    else:
        loss_fn = jax.jit(lambda x, y: soft_ce(x, y, reduction="mean", **kwargs))
    loss, (grad, label_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
        jnp.asarray(logits), jnp.asarray(onehot)
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-6)

    # d mean / d logits: each row's closed form times its weight share (the label term)
    # plus its z-loss and smoothing parts, all over the same denominator.
    target = onehot * (1 - smoothing) + smoothing / 3
    expected_grad = ref.soft_grad(logits, target, weights, z_loss=z_loss) * where[:, None]
    np.testing.assert_allclose(grad, expected_grad / denominator, rtol=1e-5, atol=1e-12)
    if not integer:
        # d mean / d y_c = -(1 - e) w_c log softmax_c / denominator, with 3 * 2e38 in it.
        class_weight = np.ones(3) if weights is None else np.asarray(weights, np.float64)
        log_probs = special.log_softmax(logits.astype(np.float64), axis=-1)
        expected_label_grad = -(1 - smoothing) * class_weight * log_probs * where[:, None]
        np.testing.assert_allclose(
            label_grad, expected_label_grad / denominator, rtol=1e-5, atol=1e-12
        )


@pytest.mark.parametrize("integer", [True, False], ids=["integer", "soft"])
def test_z_loss_is_finite_where_only_the_logsumexp_square_overflows(backend_forms, integer):
    """``1e-4 * (1e20)**2 = 1e36``: the coefficient multiplies before the square can overflow."""
    logits = np.array([[1e20, 0.0, 3.0], [1.0, 2.0, 3.0]], np.float32)
    labels = np.array([1, 2])
    onehot = np.eye(3, dtype=np.float32)[labels]
    expected = ref.cross_entropy_soft(logits, onehot, z_loss=1e-4)
    expected_grad = ref.soft_grad(logits, onehot, z_loss=1e-4)
    assert np.isinf(np.float32(1e20) ** 2) and np.all(np.isfinite(np.float32(expected)))

    if integer:
        loss_fn = jax.jit(lambda x: int_ce(x, labels, z_loss=1e-4))
    else:
        loss_fn = jax.jit(lambda x: soft_ce(x, onehot, z_loss=1e-4))
    np.testing.assert_allclose(loss_fn(logits), expected, rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(loss_fn(x)))(jnp.asarray(logits))
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("z_loss", [1e-38, 1e-40, 1e-44])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("integer", [True, False], ids=["integer", "soft"])
def test_a_tiny_z_loss_counts_where_the_logsumexp_is_huge(
    backend_forms, integer, reduction, z_loss
):
    """A ``z_loss`` (or its share of a mean of four) below float32's normal range, times 1e76.

    XLA:CPU flushes subnormal floats to 0: a coefficient formed on its own
    dropped the term (a mean of 1.0e38 with ``z_loss=1e-38`` where float64 gives 1.25e38).
    """
    logits = np.array([[1e38, -1e38], [-1e38, 1e38], [1.0, 0.0], [1e38, -1e38]], np.float32)
    labels = np.array([1, 1, 0, 0])
    onehot = np.eye(2, dtype=np.float32)[labels]
    expected = ref.cross_entropy_soft(logits, onehot, z_loss=z_loss)
    expected_grad = ref.soft_grad(logits, onehot, z_loss=z_loss)
    if reduction == "mean":
        expected, expected_grad = expected.mean(), expected_grad / 4
    assert np.all(np.abs(expected) < FLOAT32_MAX)

    def loss_fn(x):
        if integer:
            return int_ce(x, labels, z_loss=z_loss, reduction=reduction)
        return soft_ce(x, onehot, z_loss=z_loss, reduction=reduction)

    logits = jnp.asarray(logits)
    grad = jax.grad(lambda x: jnp.sum(loss_fn(x)))(logits)
    # Elementwise: the z-term of 1e32 in the second row is all of its loss. The
    # gradient's is 2e-6 there at 1e-44, below the rounding of softmax * scale - 1.
    np.testing.assert_allclose(loss_fn(logits), expected, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(loss_fn)(logits), expected, rtol=1e-5)
    assert ref.rel_err(grad, expected_grad) < 1e-5


@pytest.mark.parametrize("batched", [False, True], ids=["one-example", "one-row"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("integer", [True, False], ids=["integer", "soft"])
def test_a_tiny_z_loss_of_one_example(backend_forms, integer, reduction, batched):
    """``z_loss=1e-40`` on a single example, logsumexp 1.5e38: the loss is 2.25e36, not NaN.

    On one-element arrays XLA regrouped ``(r lse) * (r lse)``, ``r = sqrt(z_loss)``,
    as ``(lse * lse) * (r * r)``: an overflow times a flushed subnormal.
    """
    logits = np.array([1.5e38, 0.0, -1.0], np.float32)
    labels = np.array(0)
    onehot = np.eye(3, dtype=np.float32)[labels]
    if batched:
        logits, labels, onehot = logits[None], labels[None], onehot[None]
    expected = ref.cross_entropy_soft(logits, onehot, z_loss=1e-40)
    expected_grad = ref.soft_grad(logits, onehot, z_loss=1e-40)
    if reduction != "none":
        expected = expected.sum()
    assert np.all(np.isfinite(np.float32(expected)))

    def loss_fn(x):
        if integer:
            return int_ce(x, labels, z_loss=1e-40, reduction=reduction)
        return soft_ce(x, onehot, z_loss=1e-40, reduction=reduction)

    logits = jnp.asarray(logits)
    np.testing.assert_allclose(loss_fn(logits), expected, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(loss_fn)(logits), expected, rtol=1e-5)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(loss_fn(x))))(logits)
    assert ref.rel_err(grad, expected_grad) < 1e-5


@pytest.mark.parametrize("z_loss", [1e-4, 0.1])
@pytest.mark.parametrize("integer", [False, True])
def test_z_loss_adds_squared_logsumexp_and_its_gradient(z_loss, integer, rng):
    logits, labels, _, probs = random_problem(rng, scale=5.0)
    target = np.eye(logits.shape[1])[labels] if integer else probs
    expected = ref.cross_entropy_soft(logits, target, z_loss=z_loss)

    def loss(x):
        if integer:
            return int_ce(x, labels, z_loss=z_loss, label_smoothing=0.1)
        return soft_ce(x, probs, z_loss=z_loss, label_smoothing=0.1)

    expected = ref.cross_entropy_soft(logits, target, label_smoothing=0.1, z_loss=z_loss)
    assert ref.rel_err(loss(logits), expected) < 1e-6
    grad = jax.grad(lambda x: jnp.sum(loss(x)))(jnp.asarray(logits))
    expected_grad = ref.soft_grad(logits, target, label_smoothing=0.1, z_loss=z_loss)
    assert ref.rel_err(grad, expected_grad) < 1e-5


# --- shapes, axes, scales against float64 ------------------------------------------------


@pytest.mark.parametrize(
    "shape, axis",
    [((5,), -1), ((4, 6), -1), ((4, 6), 0), ((2, 3, 5), 1), ((2, 3, 4, 5), (1, 3)),
     ((2, 3, 4, 5), (3, 1)), ((2, 3, 4, 5), (-1, -2)), ((4, 6), ())],
)  # fmt: skip
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e2, 1e4])
def test_both_losses_over_shapes_axes_and_scales(backend_forms, shape, axis, scale, rng):
    logits = (rng.standard_normal(shape) * scale).astype(np.float32)
    axes = (axis,) if isinstance(axis, int) else axis
    flat = ref.move_classes_last(logits, axes)
    c = flat.shape[-1]
    labels = rng.integers(0, c, flat.shape[:-1])
    onehot_flat = np.eye(c, dtype=np.float32)[labels]
    batch_shape = flat.shape[:-1]
    # Lay the flat one-hot back out in the logits' layout.
    class_shape = tuple(shape[a % len(shape)] for a in axes)
    batch_axes = [i for i in range(len(shape)) if i not in {a % len(shape) for a in axes}]
    order = batch_axes + [a % len(shape) for a in axes]
    onehot = np.transpose(onehot_flat.reshape(batch_shape + class_shape), np.argsort(order)).astype(
        np.float32
    )
    expected = ref.cross_entropy_soft(flat.reshape(-1, c), onehot_flat.reshape(-1, c))
    expected = expected.reshape(batch_shape)
    expected_grad_flat = ref.soft_grad(flat.reshape(-1, c), onehot_flat.reshape(-1, c))
    expected_grad = np.transpose(
        expected_grad_flat.reshape(batch_shape + class_shape), np.argsort(order)
    )
    for loss in (
        lambda x: int_ce(x, labels, axis=axis),
        lambda x: soft_ce(x, onehot, axis=axis),
    ):
        value, vjp = jax.vjp(loss, jnp.asarray(logits))
        assert value.shape == batch_shape
        assert ref.rel_err(value, expected) < 1e-5
        (grad,) = vjp(jnp.ones_like(value))
        assert ref.rel_err(grad, expected_grad) < 1e-5


@pytest.mark.parametrize("integer", [False, True])
def test_check_grads_reverse_mode(integer, rng):
    logits, labels, weights, probs = random_problem(rng, n=4, c=5)
    with jax.enable_x64(True):
        x = jnp.asarray(logits, jnp.float64)
        if integer:
            f = lambda x: int_ce(  # noqa: E731
                x, labels, class_weights=weights, label_smoothing=0.2, z_loss=0.01
            )
            check_grads(f, (x,), order=2, modes=["rev"])
        else:
            f = lambda x, y: soft_ce(x, y, label_smoothing=0.2, z_loss=0.01)  # noqa: E731
            check_grads(f, (x, jnp.asarray(probs, jnp.float64)), order=2, modes=["rev"])


def float64_problem(rng, integer, n=11):
    """``random_problem``'s labels and weights, and its logits, targets and weights in float64.

    Call it with x64 enabled.
    """
    logits, labels, weights, probs = random_problem(rng, n=n)
    target = np.eye(logits.shape[1])[labels] if integer else probs
    as64 = functools.partial(jnp.asarray, dtype=jnp.float64)
    return labels, weights, as64(logits), as64(target), as64(weights)


def plain_losses(x, target, w, smoothing=0.0, z_loss=0.01):
    """Per-example losses written with jax.nn, for autodiff references in float64."""
    smoothed = target * (1 - smoothing) + smoothing / target.shape[-1]
    lse = jax.nn.logsumexp(x, axis=-1)
    return -(w * smoothed * jax.nn.log_softmax(x)).sum(-1) + z_loss * lse**2


@pytest.mark.parametrize("integer", [False, True])
def test_gradient_matches_autodiff_of_a_plain_implementation(integer, rng):
    with jax.enable_x64(True):
        labels, _, x, target, w = float64_problem(rng, integer)

        def plain(x):
            return jnp.sum(plain_losses(x, target, w, smoothing=0.2))

        def ours(x):
            kwargs = dict(class_weights=w, label_smoothing=0.2, z_loss=0.01)
            if integer:
                return jnp.sum(int_ce(x, labels, **kwargs))
            return jnp.sum(soft_ce(x, target, **kwargs))

        np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-12, atol=1e-14)
    with jax.enable_x64(True):
        labels, _, x, target, _ = float64_problem(rng, integer, n=2)
        np.testing.assert_allclose(
            jax.hessian(ours)(x), jax.hessian(plain)(x), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("integer", [False, True])
def test_float64_mean_with_float32_class_weights_and_z_loss(integer, rng):
    """The mean's scale goes into float32 weights of float64 logits (strict promotion)."""
    with jax.enable_x64(True):
        labels, weights, x, target, w = float64_problem(rng, integer)
        denominator = jnp.sum(w[labels]) if integer else len(labels)

        def plain(x):
            return jnp.sum(plain_losses(x, target, w)) / denominator

        def ours(x):
            kwargs = dict(class_weights=weights, z_loss=0.01, reduction="mean")
            return int_ce(x, labels, **kwargs) if integer else soft_ce(x, target, **kwargs)

        loss, grad = jax.value_and_grad(ours)(x)
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(loss, plain(x), rtol=1e-12)
        np.testing.assert_allclose(ours(x), plain(x), rtol=1e-12)  # the value alone
        np.testing.assert_allclose(grad, jax.grad(plain)(x), rtol=1e-12, atol=1e-15)


# --- transformations -----------------------------------------------------------------


@pytest.mark.parametrize("integer", [False, True])
def test_jit_vmap_and_per_example_gradients(integer, rng):
    logits, labels, _, probs = random_problem(rng)
    labels_or_probs = labels if integer else probs
    f = int_ce if integer else soft_ce
    eager = f(logits, labels_or_probs)
    np.testing.assert_allclose(jax.jit(f)(logits, labels_or_probs), eager, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(f)(logits, labels_or_probs), eager, rtol=1e-6)
    per_example = jax.vmap(jax.grad(f))(jnp.asarray(logits), jnp.asarray(labels_or_probs))
    expected = jax.grad(lambda x: jnp.sum(f(x, labels_or_probs)))(jnp.asarray(logits))
    np.testing.assert_allclose(per_example, expected, rtol=1e-6, atol=1e-8)
    # vmap over a batch of batches, nested with jit and grad.
    batched = jnp.stack([jnp.asarray(logits), jnp.asarray(logits) * 2])
    stacked_labels = jnp.stack([jnp.asarray(labels_or_probs)] * 2)
    mean_grad = jax.jit(jax.vmap(jax.grad(lambda x, y: f(x, y, reduction="mean"))))(
        batched, stacked_labels
    )
    expected = jax.grad(lambda x: f(x, labels_or_probs, reduction="mean"))(batched[1])
    np.testing.assert_allclose(mean_grad[1], expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("batched_weights", [False, True])
def test_vmap_of_soft_labels_with_class_weights(backend_forms, rng, batched_weights):
    """vmap over problems, the weights shared or one set per problem, the value alone.

    3 x 4000 rows of 8 classes: the exact redo goes a chunk of rows at a time.
    Problem 1's row 0 has a -inf logit whose class has weight 0 and a label.
    """
    b, n, c = 3, 4000, 8
    x = (rng.standard_normal((b, n, c)) * 3).astype(np.float32)
    y = rng.dirichlet(np.ones(c), (b, n)).astype(np.float32)
    weights = rng.uniform(0.2, 2.0, (b, c)).astype(np.float32)
    weights[1, 7], x[1, 0, 7] = 0.0, -np.inf
    if not batched_weights:
        weights[:] = weights[1]

    def loss(x, y, w):
        return soft_ce(x, y, class_weights=w, label_smoothing=0.1)

    in_axes = (0, 0, 0 if batched_weights else None)
    values = jax.jit(jax.vmap(loss, in_axes))(x, y, weights if batched_weights else weights[0])
    for i in range(b):
        expected, _ = ref.soft_cross_entropy_minus_inf_allowed(x[i], y[i], weights[i], 0.1)
        assert ref.rel_err(values[i], expected) < 1e-5


@pytest.mark.parametrize("integer", [False, True])
def test_forward_mode_raises(integer):
    f = (
        (lambda x: int_ce(x, jnp.array([0])))
        if integer
        else (lambda x: soft_ce(x, jnp.array([[1.0, 0.0]])))
    )
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (jnp.ones((1, 2)),), (jnp.ones((1, 2)),))


# --- residuals -------------------------------------------------------------------------


def saved_residuals(f, *args) -> list[str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print_saved_residuals(f, *args)
    return [line for line in buffer.getvalue().splitlines() if line.strip()]


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}])
def test_backward_saves_no_new_logits_sized_array(options):
    logits = jnp.ones((8, 16))
    labels = jnp.zeros(8, jnp.int32)
    probs = jnp.ones((8, 16)) / 16
    integer_lines = saved_residuals(
        lambda x: int_ce(x, labels, reduction="mean", **options), logits
    )
    soft_lines = saved_residuals(lambda x, y: soft_ce(x, y, **options), logits, probs)
    for lines in (integer_lines, soft_lines):
        big = [line for line in lines if line.startswith("f32[8,16]")]
        assert all("from the argument" in line for line in big), lines
    assert len([line for line in integer_lines if line.startswith("f32[8,16]")]) == 1


# --- drop-in compatibility with optax ---------------------------------------------------


@pytest.mark.parametrize("mask", [None, "per_example", "per_logit"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_same_values_and_gradients_as_optax(mask, axis, rng):
    logits = jnp.asarray(rng.standard_normal((6, 9)) * 4, jnp.float32)
    c = logits.shape[axis]
    labels = jnp.asarray(rng.integers(0, c, logits.shape[1 - (axis % 2)]))
    probs = jnp.asarray(np.moveaxis(rng.dirichlet(np.ones(c), labels.shape[0]), -1, axis))
    probs = probs.astype(jnp.float32)
    where = None
    if mask == "per_example":
        where = jnp.asarray(np.arange(labels.shape[0]) % 3 != 1)
    elif mask == "per_logit":
        keep = rng.random(logits.shape) < 0.7
        keep[0] = False  # a fully masked row
        where = jnp.asarray(keep)
    for ours, theirs, y in (
        (int_ce, optax.softmax_cross_entropy_with_integer_labels, labels),
        (soft_ce, optax.softmax_cross_entropy, probs),
    ):
        expected = theirs(logits, y, axis=axis, where=where)
        finite = np.isfinite(np.asarray(expected))
        got = ours(logits, y, axis=axis, where=where)
        np.testing.assert_allclose(
            np.asarray(got)[finite], np.asarray(expected)[finite], rtol=2e-6, atol=1e-6
        )

        def summed(f, y=y, finite=finite):
            return lambda x: jnp.sum(jnp.where(finite, f(x, y, axis=axis, where=where), 0.0))

        np.testing.assert_allclose(
            jax.grad(summed(ours))(logits), jax.grad(summed(theirs))(logits), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("use_weights", [False, True])
def test_integer_label_smoothing_spreads_over_the_unmasked_classes(backend_forms, use_weights, rng):
    """``e / K`` on each of the ``K`` unmasked classes, against float64, value and gradient."""
    n, c, smoothing = 6, 8, 0.2
    logits = rng.standard_normal((n, c)).astype(np.float32) * 3
    where = rng.random((n, c)) < 0.6
    labels = rng.integers(0, c, n)
    where[np.arange(n), labels] = True
    where[0] = False  # a fully masked row: loss and gradient 0
    weights = rng.uniform(0.5, 2.0, c).astype(np.float32) if use_weights else np.ones(c)
    x = np.where(where, logits.astype(np.float64), -np.inf)
    log_probs = np.zeros((n, c))  # row 0 is empty; masked classes have a 0 target
    log_probs[1:] = np.where(where[1:], special.log_softmax(x[1:], axis=-1), 0.0)
    taking_part = np.maximum(where.sum(-1, keepdims=True), 1)
    onehot = np.eye(c)[labels]
    target = ((1 - smoothing) * onehot + smoothing / taking_part * where) * weights
    target[0] = 0.0
    expected = -np.sum(target * log_probs, axis=-1)
    g = rng.standard_normal(n).astype(np.float32)
    probs = np.exp(log_probs) * where
    expected_grad = g[:, None] * (probs * target.sum(-1, keepdims=True) - target)

    def loss(x):
        kwargs = {"class_weights": jnp.asarray(weights)} if use_weights else {}
        return int_ce(x, labels, where=where, label_smoothing=smoothing, **kwargs)

    for f in (loss, jax.jit(loss)):
        value, vjp = jax.vjp(f, jnp.asarray(logits))
        assert ref.rel_err(value, expected) < 1e-6
        assert ref.rel_err(vjp(jnp.asarray(g))[0], expected_grad) < 1e-5


def test_masked_label_logit_is_read_as_given_also_when_not_finite(backend_forms):
    """As optax: the loss is ``logsumexp(unmasked) - z_y`` even when ``z_y`` is masked."""
    where = jnp.array([[False, True, True]])
    cases = {
        (5.0, 1.0, 0.0): np.log(np.e + 1) - 5.0,
        (np.inf, 1.0, 0.0): -np.inf,
        (np.nan, 1.0, 0.0): np.nan,
        (np.nan, np.inf, 0.0): np.nan,  # the +inf row's count must not hide it
    }
    for row, expected in cases.items():
        logits = jnp.array([row], jnp.float32)
        got = int_ce(logits, jnp.array([0]), where=where)
        np.testing.assert_allclose(got, [expected], rtol=1e-6)
        if np.isfinite(row[0]):
            optax_loss = optax.softmax_cross_entropy_with_integer_labels(
                logits, jnp.array([0]), where=where
            )
            np.testing.assert_allclose(got, optax_loss, rtol=1e-6)


# --- properties ---------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_loss_is_non_negative_for_probability_labels(data):
    n, c = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 10))
    logits = data.draw(hnp.arrays(np.float32, (n, c), elements=st.floats(-1e4, 1e4, width=32)))
    raw = data.draw(hnp.arrays(np.float32, (n, c), elements=st.floats(0, 1, width=32)))
    labels = raw / np.maximum(raw.sum(-1, keepdims=True), np.float32(1e-6))
    loss = np.asarray(jax.jit(soft_ce)(logits, labels))
    assert np.all(np.isfinite(loss))
    assert np.all(loss >= 0)


@functools.partial(jax.jit, static_argnums=2)
def _integer_label_gradient(logits, labels, smoothing):
    return jax.grad(lambda x: jnp.sum(int_ce(x, labels, label_smoothing=smoothing)))(logits)


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_integer_label_gradient_rows_sum_to_zero(data):
    n, c = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 10))
    logits = data.draw(hnp.arrays(np.float32, (n, c), elements=st.floats(-100, 100, width=32)))
    labels = data.draw(hnp.arrays(np.int32, (n,), elements=st.integers(0, c - 1)))
    smoothing = data.draw(st.sampled_from([0.0, 0.3]))
    grad = _integer_label_gradient(logits, labels, smoothing)
    np.testing.assert_allclose(np.asarray(grad, np.float64).sum(-1), 0.0, atol=1e-6)


# --- edge cases (SPEC §3) -------------------------------------------------------------------


def test_minus_inf_logit_with_zero_label_is_finite():
    logits = jnp.array([[-jnp.inf, 0.0, 1.0]])
    probs = jnp.array([[0.0, 0.5, 0.5]])
    loss, grad = jax.value_and_grad(lambda x: soft_ce(x, probs).sum())(logits)
    expected = ref.cross_entropy_soft([[0.0, 1.0]], [[0.5, 0.5]])[0]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert np.all(np.isfinite(grad)) and grad[0, 0] == 0.0
    int_loss, int_grad = jax.value_and_grad(lambda x: int_ce(x, jnp.array([2])).sum())(logits)
    assert np.isfinite(int_loss) and np.all(np.isfinite(int_grad))


def test_minus_inf_logit_with_positive_label_is_inf_with_finite_gradient():
    logits = jnp.array([[-jnp.inf, 0.0, 1.0]])
    for f in (
        lambda x: soft_ce(x, jnp.array([[0.2, 0.4, 0.4]])).sum(),
        lambda x: int_ce(x, jnp.array([0])).sum(),
        lambda x: int_ce(x, jnp.array([1]), label_smoothing=0.1).sum(),
    ):
        loss, grad = jax.value_and_grad(f)(logits)
        assert loss == np.inf
        assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("case", ["all_minus_inf", "fully_masked"])
def test_empty_rows_give_zero_loss_and_zero_gradient(backend_forms, case):
    logits = jnp.array([[-jnp.inf, -jnp.inf, -jnp.inf], [1.0, 2.0, 3.0]])
    where = None
    if case == "fully_masked":
        logits = jnp.array([[jnp.nan, 1e30, 2.0], [1.0, 2.0, 3.0]])
        where = jnp.array([[False, False, False], [True, True, True]])
    labels = jnp.array([0, 2])
    probs = jnp.array([[0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    for f in (
        lambda x: int_ce(x, labels, where=where, label_smoothing=0.1, z_loss=1e-3),
        lambda x: soft_ce(x, probs, where=where, label_smoothing=0.1, z_loss=1e-3),
    ):
        loss, vjp = jax.vjp(f, logits)
        assert loss[0] == 0.0 and np.isfinite(loss[1])
        (grad,) = vjp(jnp.ones(2))
        np.testing.assert_array_equal(grad[0], 0.0)
        assert np.all(np.isfinite(grad))


def test_masked_examples_give_zero_loss_and_gradient_even_with_nan_logits(backend_forms):
    logits = jnp.array([[jnp.nan, 1.0], [1.0, 2.0]])
    where = jnp.array([False, True])
    for f in (
        lambda x: int_ce(x, jnp.array([0, 1]), where=where),
        lambda x: soft_ce(x, jnp.array([[1.0, 0.0], [0.0, 1.0]]), where=where),
    ):
        loss, vjp = jax.vjp(f, logits)
        assert loss[0] == 0.0
        (grad,) = vjp(jnp.ones(2))
        np.testing.assert_array_equal(grad[0], 0.0)


def test_huge_logits_give_limiting_values():
    logits = jnp.array([[1e30, -1e30, 0.0]])
    loss, grad = jax.value_and_grad(lambda x: int_ce(x, jnp.array([0])).sum())(logits)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    loss, grad = jax.value_and_grad(lambda x: int_ce(x, jnp.array([2])).sum())(logits)
    assert loss == np.float32(1e30)
    np.testing.assert_array_equal(grad, [[1.0, 0.0, -1.0]])
    big = np.finfo(np.float32).max
    loss = soft_ce(jnp.array([[big, -big]]), jnp.array([[0.5, 0.5]]))
    assert np.isfinite(loss) or loss == np.inf  # -(0.5 * -2 * max) overflows to inf, no NaN
    assert not np.isnan(loss)


def test_plus_inf_logit_gives_limits_without_nan(backend_forms):
    logits = jnp.array([[jnp.inf, 0.0, 1.0]])
    loss, grad = jax.value_and_grad(lambda x: int_ce(x, jnp.array([0])).sum())(logits)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    loss, grad = jax.value_and_grad(lambda x: int_ce(x, jnp.array([1])).sum())(logits)
    assert loss == np.inf
    np.testing.assert_array_equal(grad, [[1.0, -1.0, 0.0]])


def test_nan_logit_makes_its_example_nan(backend_forms):
    logits = jnp.array([[1.0, jnp.nan, 0.0], [1.0, 2.0, 3.0]])
    for f in (
        lambda x: int_ce(x, jnp.array([0, 1])),
        lambda x: soft_ce(x, jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])),
    ):
        loss, vjp = jax.vjp(f, logits)
        assert np.isnan(loss[0]) and np.isfinite(loss[1])
        (grad,) = vjp(jnp.ones(2))
        assert np.all(np.isnan(grad[0])) and np.all(np.isfinite(grad[1]))


@pytest.mark.parametrize(
    "smoothing, z_loss, weighted",
    [
        (0.1, 0.0, False),
        (0.0, 1e-3, False),
        (0.1, 1e-3, False),
        (0.0, 0.0, True),
        (0.1, 1e-3, True),
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_soft_label_value_alone_with_options(
    backend_forms, rng, smoothing, z_loss, weighted, dtype
):
    """The value alone (on XLA:CPU one fused loop, its edge rows redone) and under a gradient.

    20000 rows of 8 classes, enough for the redo to go a chunk of rows at a time;
    row 0 has a -inf logit with label 0, row 1 only -inf, row 2 a NaN, row 3 a
    +inf logit holding the label, row 4 logits of +-1e30, row 5 a -inf logit
    with a positive label whose class weight is 0 (when weighted). bfloat16
    logits and labels are computed in float32, against the reference at
    their rounded values.
    """
    n, c = 20000, 8
    x = (rng.standard_normal((n, c)) * 3).astype(np.float32)
    y = rng.dirichlet(np.ones(c), n).astype(np.float32)
    weights = rng.uniform(0.2, 2.0, c).astype(np.float32) if weighted else None
    x[0, 0], y[0] = -np.inf, np.r_[0.0, np.full(c - 1, 1 / (c - 1))]
    x[1] = -np.inf
    x[2, 3] = np.nan
    x[3, 5], y[3] = np.inf, np.eye(c)[5]
    x[4], y[4] = np.r_[1e30, -1e30, np.zeros(c - 2)], np.eye(c)[0]
    if weighted:
        weights[7], x[5, 7] = 0.0, -np.inf
    x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)

    with np.errstate(invalid="ignore"):  # rows 2 and 3, set below
        expected, _ = ref.soft_cross_entropy_minus_inf_allowed(x, y, weights, smoothing, z_loss)
    expected[0] = np.inf if smoothing else expected[0]  # label e / K at the -inf logit
    expected[2] = np.nan
    # The other classes' e / K, or z-loss of lse = +inf; else all mass on the label.
    expected[3] = np.inf if smoothing or z_loss else 0.0
    with np.errstate(over="ignore"):  # row 4's z-loss (1e57) overflows float32
        expected = expected.astype(np.float32)

    def loss(x, y):
        return soft_ce(x, y, label_smoothing=smoothing, z_loss=z_loss, class_weights=weights)

    alone = jax.jit(loss)(x, y)
    under_gradient, _ = jax.jit(jax.vjp, static_argnums=0)(loss, x, y)
    for value in (alone, under_gradient):
        assert value.dtype == jnp.float32
        value = np.asarray(value)
        np.testing.assert_array_equal(np.isnan(value), np.isnan(expected))
        np.testing.assert_array_equal(np.isposinf(value), np.isposinf(expected))
        assert value[3] == expected[3]
        assert ref.rel_err(value[5:], expected[5:]) < 1e-5
        if np.isfinite(expected[4]):
            np.testing.assert_allclose(value[4], expected[4], rtol=1e-6)
        np.testing.assert_allclose(value[0], expected[0], rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_logits_compute_in_float32(dtype, rng):
    logits, labels, _, probs = random_problem(rng, scale=20.0)
    x16 = jnp.asarray(logits, dtype)
    exact_inputs = np.asarray(x16.astype(jnp.float32))
    probs16 = jnp.asarray(probs, dtype)
    for f, target in (
        (lambda x: int_ce(x, labels), np.eye(7)[labels]),
        (lambda x: soft_ce(x, probs16), np.asarray(probs16.astype(jnp.float32))),
    ):
        loss, vjp = jax.vjp(f, x16)
        assert loss.dtype == jnp.float32
        assert ref.rel_err(loss, ref.cross_entropy_soft(exact_inputs, target)) < 1e-5
        (grad,) = vjp(jnp.ones_like(loss))
        assert grad.dtype == dtype
        expected = ref.soft_grad(exact_inputs, target)
        assert ref.rel_err(np.asarray(grad.astype(jnp.float32)), expected) < float(
            jnp.finfo(dtype).eps
        )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_integer_label_gradient_with_edge_rows(backend_forms, dtype, rng):
    """softmax - onehot from the rounded inputs in float64, at 2048 x 1024 (the size where
    the backward's 16-bit forms apply), with a +inf logit at the label (gradient 0), a row
    of -inf only (gradient 0) and an ignored example (gradient 0)."""
    n, c = 2048, 1024
    x = jnp.asarray(rng.standard_normal((n, c)) * 4, dtype)
    labels = rng.integers(0, c, n)
    x = x.at[0, 7].set(jnp.inf).at[1].set(-jnp.inf)
    labels[0], labels[2] = 7, -100
    g = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)

    def loss(x):
        return jnp.sum(int_ce(x, jnp.asarray(labels), ignore_index=-100) * g)

    grad = jax.jit(jax.grad(loss))(x)
    assert grad.dtype == dtype
    grad = np.asarray(grad.astype(jnp.float32))
    np.testing.assert_array_equal(grad[:3], 0.0)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)[3:]
    expected = np.asarray(g[3:], np.float64)[:, None] * (ref.softmax(x64) - np.eye(c)[labels[3:]])
    assert ref.rel_err(grad[3:], expected) < float(jnp.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_huge_logits_do_not_overflow(dtype):
    big = float(jnp.finfo(dtype).max)
    logits = jnp.array([[big, 0.0, -big]], dtype)
    loss = int_ce(logits, jnp.array([1]))
    np.testing.assert_allclose(loss, [big], rtol=1e-3)
    assert int_ce(logits, jnp.array([0]))[0] == 0.0


def test_float64_under_x64(rng):
    logits, labels, weights, _ = random_problem(rng, scale=50.0)
    with jax.enable_x64(True):
        x = jnp.asarray(ref.to64(logits))
        loss = int_ce(x, labels, class_weights=jnp.asarray(ref.to64(weights)))
        assert loss.dtype == jnp.float64
        expected, _ = ref.cross_entropy_int(logits, labels, weights)
        np.testing.assert_allclose(loss, expected, rtol=1e-12)


def test_empty_batch_and_empty_class_axis():
    assert int_ce(jnp.zeros((0, 4)), jnp.zeros(0, jnp.int32)).shape == (0,)
    assert int_ce(jnp.zeros((0, 4)), jnp.zeros(0, jnp.int32), reduction="mean") == 0.0
    np.testing.assert_array_equal(soft_ce(jnp.zeros((3, 0)), jnp.zeros((3, 0))), 0.0)


def test_empty_class_axis_with_every_option():
    # No class: soft labels have nothing to lose (0); any integer label is out of range (NaN).
    x = jnp.zeros((2, 0))
    soft = soft_ce(x, jnp.zeros((2, 0)), label_smoothing=0.1, class_weights=jnp.zeros(0))
    np.testing.assert_array_equal(soft, 0.0)
    for dtype in (jnp.float32, jnp.float16):
        # Each row's logsumexp is -inf; the z-loss of an empty row is 0 like its loss.
        soft = soft_ce(x.astype(dtype), jnp.zeros((2, 0), dtype), z_loss=1e-4)
        np.testing.assert_array_equal(soft, 0.0)
        loss, grad = jax.value_and_grad(
            lambda x: soft_ce(x, jnp.zeros_like(x), z_loss=1e-4, reduction="sum")
        )(x.astype(dtype))
        assert loss == 0.0 and grad.shape == (2, 0)
    labels = jnp.array([0, 0])
    for options in ({"label_smoothing": 0.1}, {"class_weights": jnp.zeros(0)}, {"z_loss": 0.1}):
        assert np.all(np.isnan(int_ce(x, labels, **options)))
    grad = jax.grad(lambda x: int_ce(x, labels, label_smoothing=0.1).sum())(x)
    assert grad.shape == (2, 0)


def test_no_class_axis_makes_each_logit_a_row_of_one_class(rng):
    """``axis=()``: one class, so the cross-entropy is 0 and only the z-loss is left."""
    x = jnp.asarray(rng.standard_normal((3, 4)) * 3, jnp.float32)
    y = jnp.asarray(rng.random((3, 4)), jnp.float32)
    z_loss, weight = 0.01, jnp.array([2.0])
    for options in ({}, {"label_smoothing": 0.2, "class_weights": weight, "z_loss": z_loss}):
        z = options.get("z_loss", 0.0)
        for loss in (
            lambda x, o=options: soft_ce(x, y, axis=(), **o),
            lambda x, o=options: int_ce(x, jnp.zeros((3, 4), jnp.int32), axis=(), **o),
        ):
            value, grad = jax.value_and_grad(lambda x, f=loss: jnp.sum(f(x)))(x)
            assert value.shape == ()
            np.testing.assert_allclose(loss(x), z * np.square(x), rtol=1e-6)
            # The cross-entropy's part, softmax * sum(w y') - w y', cancels to rounding.
            assert ref.rel_err(grad, 2 * z * np.asarray(x, np.float64)) < 1e-5
            assert np.max(np.abs(np.asarray(grad) - 2 * z * np.asarray(x))) < 1e-6
    # The mean counts each logit as an example; with class weights it divides by their sum
    # (the z-loss itself is not weighted).
    mean = int_ce(x, jnp.zeros((3, 4), jnp.int32), axis=(), class_weights=weight, z_loss=z_loss,
                  reduction="mean")  # fmt: skip
    np.testing.assert_allclose(mean, z_loss * np.sum(np.square(x)) / (2 * 12), rtol=1e-6)
    mean = soft_ce(x, y, axis=(), z_loss=z_loss, reduction="mean")
    np.testing.assert_allclose(mean, z_loss * np.mean(np.square(x)), rtol=1e-6)
    # Labels other than 0 are out of range; -inf logits are empty rows (loss 0).
    assert np.all(np.isnan(int_ce(x, jnp.ones((3, 4), jnp.int32), axis=())))
    np.testing.assert_array_equal(soft_ce(jnp.full((2,), -jnp.inf), jnp.ones(2), axis=()), 0.0)


# --- bad labels (SPEC §4) ----------------------------------------------------------------


@pytest.mark.parametrize("bad_label", [-1, 7, 1000])
def test_out_of_range_label_gives_nan_never_another_class(bad_label, rng):
    logits, labels, _, _ = random_problem(rng)
    labels[3] = bad_label
    loss, grad = jax.value_and_grad(lambda x: jnp.sum(int_ce(x, labels)))(jnp.asarray(logits))
    per_example = int_ce(logits, labels)
    assert np.isnan(per_example[3])
    assert np.all(np.isfinite(np.delete(np.asarray(per_example), 3)))
    assert np.all(np.isnan(grad[3]))
    assert np.isnan(int_ce(logits, labels, reduction="mean"))
    # plain jit keeps working
    assert np.isnan(jax.jit(int_ce)(logits, labels)[3])


@pytest.mark.parametrize(
    "options", [{}, {"z_loss": 1e-3}, {"class_weights": np.ones(7, np.float32)}], ids=str
)
def test_a_bad_label_under_a_mask_that_counts_nothing_is_not_hidden(options, rng):
    """A masked example with a bad label still has a NaN loss (SPEC 4), as ``none``, ``sum``
    and the gradient show; the mean of a batch with nothing counted was 0 there."""
    logits, labels, _, _ = random_problem(rng)
    labels[3] = 7
    nothing = np.zeros(labels.shape, bool)
    for reduction in ("none", "sum", "mean"):
        loss = int_ce(logits, labels, where=nothing, reduction=reduction, **options)
        assert np.isnan(np.asarray(loss)).sum() == 1
    mean = jax.jit(lambda x: int_ce(x, labels, where=nothing, reduction="mean", **options))
    assert np.isnan(mean(logits))
    # Nothing counted and nothing wrong: the mean is 0. (A new array: JAX keeps the one
    # the jitted function closed over as a constant, and reads its old values again.)
    good = np.where(labels == 7, 1, labels)
    assert int_ce(logits, good, where=nothing, reduction="mean", **options) == 0.0


def test_checkify_reports_the_bad_label(rng):
    logits, labels, _, _ = random_problem(rng)
    labels[5] = 9
    checked = checkify.checkify(jax.jit(int_ce), errors=checkify.all_checks)
    error, _ = checked(logits, labels)
    message = r"labels must be class indices in \[0, 7\); found 9 at flat position 5"
    with pytest.raises(checkify.JaxRuntimeError, match=message):
        error.throw()
    labels[5] = 2
    error, _ = checked(logits, labels)
    error.throw()  # nothing to report


def test_ignore_index_is_not_reported_as_a_bad_label(rng):
    logits, labels, _, _ = random_problem(rng)
    labels[0] = -100
    f = lambda x, y: int_ce(x, y, ignore_index=-100)  # noqa: E731
    error, loss = checkify.checkify(f, errors=checkify.all_checks)(logits, labels)
    error.throw()
    assert loss[0] == 0.0


# --- bad input (SPEC §4) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: int_ce(jnp.ones((3, 4)), jnp.zeros(4, jnp.int32)), ValueError,
         r"labels shape \(4,\) does not match the logits shape \(3, 4\)"),
        (lambda: int_ce(jnp.ones((3, 4)), jnp.zeros(3)), TypeError,
         r"labels must be an integer array of class indices, got dtype float32"),
        (lambda: int_ce(jnp.ones((3, 4), jnp.int32), jnp.zeros(3, jnp.int32)), TypeError,
         r"logits must be a floating-point array, got dtype int32"),
        (lambda: soft_ce(jnp.ones((3, 4)), jnp.ones((3, 5))), ValueError,
         r"labels shape \(3, 5\) does not match the logits shape \(3, 4\)"),
        (lambda: soft_ce(jnp.ones((3, 4)), jnp.zeros(3, jnp.int32)), TypeError,
         r"labels must be a floating-point array of per-class targets"),
        (lambda: int_ce(jnp.ones((3, 4)), jnp.zeros(3, jnp.int32), where=jnp.ones(5, bool)),
         ValueError, r"where has shape \(5,\), which fits neither the logits \(3, 4\)"),
        (lambda: int_ce(jnp.ones((3, 4)), jnp.zeros(3, jnp.int32), class_weights=jnp.ones(3)),
         ValueError, r"class_weights must have shape \(4,\).*got shape \(3,\)"),
        (lambda: int_ce(jnp.ones((3, 4)), jnp.zeros(3, jnp.int32), reduction="avg"),
         ValueError, r"reduction must be one of \('none', 'sum', 'mean'\), got 'avg'"),
        (lambda: soft_ce(jnp.ones((3, 4)), jnp.ones((3, 4)), label_smoothing=1.5),
         ValueError, r"label_smoothing must be in \[0, 1\], got 1.5"),
        (lambda: soft_ce(jnp.ones((3, 4)), jnp.ones((3, 4)), z_loss=-1.0),
         ValueError, r"z_loss must be a finite number >= 0, got -1.0"),
        (lambda: int_ce(jnp.ones((3, 4)), jnp.zeros(3, jnp.int32), ignore_index=1.5),
         TypeError, r"ignore_index must be an int or None, got 1.5"),
        (lambda: int_ce(jnp.ones((3, 4)), jnp.zeros(3, jnp.int32), axis=2),
         ValueError, r"axis=2 is out of range for an array of rank 2"),
    ],
)  # fmt: skip
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _edge_rows(dtype=np.float32):
    """Rows that take the exact fallback: empty, a +inf, 0 * -inf; and plain rows.

    Logits and labels come in ``dtype``, the expected losses from those values.
    """
    inf = np.inf
    logits = np.array(
        [
            [-inf, -inf, -inf, -inf],
            [inf, 1.0, inf, -2.0],
            [-inf, 0.5, 2.0, -1.0],
            [0.3, -1.2, 2.5, 0.0],
            [1e30, -1e30, 0.0, 5.0],
        ],
        np.float32,
    )
    labels = np.array(
        [
            [0.25, 0.25, 0.25, 0.25],
            [0.5, 0.0, 0.5, 0.0],
            [0.0, 0.3, 0.7, 0.0],
            [0.1, 0.2, 0.3, 0.4],
            [1.0, 0.0, 0.0, 0.0],
        ],
        np.float32,
    )
    logits, labels = logits.astype(dtype), labels.astype(dtype)
    # float64 limits: 0 for the empty row, log 2 for the +inf pair, the rest as usual.
    finite = logits[2:].astype(np.float64)
    lse = np.log(np.sum(np.exp(finite - finite.max(1, keepdims=True)), 1)) + finite.max(1)
    log_probs = np.where(np.isneginf(finite), -inf, finite - lse[:, None])
    products = labels[2:].astype(np.float64) * np.where(labels[2:] == 0, 0.0, log_probs)
    rest = -np.sum(products, 1)
    expected = np.concatenate([[0.0, np.log(2.0)], rest])
    return logits, labels, expected


def test_soft_labels_edge_rows_are_exact_under_jit_and_vmap(backend_forms):
    logits, labels, expected = _edge_rows()
    eager = soft_ce(logits, labels)
    jitted = jax.jit(soft_ce)(logits, labels)
    per_row = jax.vmap(soft_ce)(logits, labels)
    nested = jax.vmap(jax.vmap(soft_ce))(logits[None], labels[None])[0]
    for result in (eager, jitted, per_row, nested):
        np.testing.assert_allclose(result, expected, rtol=1e-6)
        assert not np.any(np.isnan(result))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_labels_value_in_rows_with_plus_inf(backend_forms, smoothing):
    """The limits in rows with ``+inf`` logits, in both forms of the value.

    The ``+inf`` entries share the probability; the row's finite ones, even the
    largest float, have none, so label mass on them makes the loss ``+inf``;
    beside a NaN the loss is NaN.
    """
    inf, largest = np.inf, float(np.finfo(np.float32).max)
    logits = np.array(
        [
            [inf, largest, 0.0, -inf],
            [inf, 1.0, inf, 0.0],
            [inf, 1.0, inf, 0.0],
            [inf, np.nan, 0.0, 1.0],
        ],
        np.float32,
    )
    labels = np.array(
        [[1.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]],
        np.float32,
    )
    # -log of the share 1/k of each +inf entry (row 0: one, the largest float beside it
    # takes no share); label smoothing spreads mass to finite ones.
    expected = [inf, inf, inf, np.nan] if smoothing else [0.0, np.log(2.0), inf, np.nan]
    loss = jax.jit(lambda x, y: soft_ce(x, y, label_smoothing=smoothing))(logits, labels)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_soft_labels_edge_rows_among_many_rows(backend_forms, dtype):
    """Past 256 KiB the exact redo runs a chunk of rows at a time: same limits.

    (bfloat16 chunks go through the loop as their bits on XLA:CPU.)
    """
    logits, labels, expected = _edge_rows(dtype)
    copies = 16000 // logits.itemsize
    logits, labels = np.tile(logits, (copies, 1)), np.tile(labels, (copies, 1))
    assert logits.nbytes > 256 * 1024
    expected = np.tile(expected, copies)
    np.testing.assert_allclose(jax.jit(soft_ce)(logits, labels), expected, rtol=1e-6)
    batched = jax.vmap(soft_ce)(logits.reshape(2, -1, 4), labels.reshape(2, -1, 4))
    np.testing.assert_allclose(batched.reshape(-1), expected, rtol=1e-6)


def test_soft_labels_scaled_mean_of_edge_rows_among_many_rows(backend_forms):
    """A mean with class weights and a z-loss divides inside the loss; the value alone
    redoes the edge rows (empty, 0 * -inf) a chunk of rows at a time with that scale."""
    logits, labels, _ = _edge_rows()
    logits, labels = logits[[0, 2, 3]], labels[[0, 2, 3]]
    weights = np.array([1.0, 3.0, 0.5, 2.0], np.float32)
    per_row, _ = ref.soft_cross_entropy_minus_inf_allowed(logits, labels, weights, z_loss=1e-3)
    logits, labels = np.tile(logits, (8000, 1)), np.tile(labels, (8000, 1))
    assert logits.nbytes > 256 * 1024

    def mean_loss(x, y):
        return soft_ce(x, y, class_weights=weights, z_loss=1e-3, reduction="mean")

    np.testing.assert_allclose(jax.jit(mean_loss)(logits, labels), np.mean(per_row), rtol=1e-6)
    halves = jax.jit(jax.vmap(mean_loss))(logits.reshape(2, -1, 4), labels.reshape(2, -1, 4))
    np.testing.assert_allclose(halves, [np.mean(per_row)] * 2, rtol=1e-6)


def test_soft_labels_forward_holds_no_logits_sized_temporary():
    """The rare exact redo is compiled in; by chunks it reserves little (exact on CPU)."""
    logits = jax.ShapeDtypeStruct((8192, 1024), jnp.float32)  # optax: no temp here either
    analysis = jax.jit(soft_ce).lower(logits, logits).compile().memory_analysis()
    assert analysis.temp_size_in_bytes < 8192 * 1024 * 4 / 8


def test_soft_labels_loss_under_a_gradient_is_exact_on_edge_rows():
    """Under a gradient the loss comes from the saved statistics: the same limits."""
    logits, labels, expected = _edge_rows()
    losses = jax.jit(lambda x, y: jax.vjp(soft_ce, x, y)[0])(logits, labels)
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    weights = np.arange(1.0, 1.0 + len(expected), dtype=np.float32)
    total, _ = jax.value_and_grad(lambda x: jnp.sum(soft_ce(x, labels) * weights))(logits)
    np.testing.assert_allclose(total, np.sum(expected * weights), rtol=1e-6)


@pytest.mark.parametrize("argnums", [0, (0, 1), 1], ids=["logits", "both", "labels"])
@pytest.mark.parametrize("shape", [(8192, 1024), (64, 131072)])
def test_soft_labels_gradient_holds_no_logits_sized_temporary(shape, argnums):
    """value_and_grad keeps two numbers per row (exact on CPU); optax's holds 32-64 MiB here.

    Also for the labels' gradient: the loss's products of labels and logit gaps
    share the result's buffer.
    """
    logits = jax.ShapeDtypeStruct(shape, jnp.float32)
    loss = lambda x, y: jnp.sum(soft_ce(x, y))  # noqa: E731
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    analysis = value_and_grad.lower(logits, logits).compile().memory_analysis()
    assert analysis.temp_size_in_bytes < math.prod(shape) * 4 / 8


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("with_gradient", [False, True])
def test_smoothing_with_a_logit_mask_holds_at_most_two_logits_sized_temporaries(
    integer, with_gradient
):
    """XLA:CPU's reductions take no select, so a masked row is written out (exact on CPU).

    The value alone holds the masked logits and one product per logit (it held
    three arrays); under a gradient two for soft labels. optax holds two for the
    value, and under a gradient one (integer labels) or three (soft labels).
    """
    logits = jax.ShapeDtypeStruct((8192, 1024), jnp.float32)
    where = jax.ShapeDtypeStruct((8192, 1024), jnp.bool_)
    labels = jax.ShapeDtypeStruct((8192,), jnp.int32) if integer else logits

    def loss(x, y, where):
        ce = int_ce if integer else soft_ce
        return jnp.sum(ce(x, y, where=where, label_smoothing=0.1))

    f = jax.value_and_grad(loss) if with_gradient else loss
    analysis = jax.jit(f).lower(logits, labels, where).compile().memory_analysis()
    # Integer labels without class weights take the count of unmasked classes as
    # their weights' sum: under a gradient only the masked logits are held (was 2).
    arrays = 1.5 if integer and with_gradient else 2.5
    assert analysis.temp_size_in_bytes < arrays * 8192 * 1024 * 4


def test_bfloat16_integer_label_forward_makes_no_float32_copy():
    """The float32 cast stays inside the reductions (exact on CPU); optax's holds 32 MiB here.

    (XLA:CPU fuses the cast from bfloat16 into its reduction loop, not the one
    from float16: float16 logits are still copied out in float32.)
    """
    logits = jax.ShapeDtypeStruct((8192, 1024), jnp.bfloat16)
    labels = jax.ShapeDtypeStruct((8192,), jnp.int32)
    compiled = jax.jit(int_ce).lower(logits, labels).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 8192 * 1024 * 4 / 8


@pytest.mark.parametrize("with_gradient", [False, True])
def test_float16_label_smoothing_holds_one_float32_copy_less(with_gradient):
    """float16 logits with label smoothing (exact on CPU): one float32 copy, two under a gradient.

    XLA:CPU's reductions take no float16 convert, so the forward writes the
    logits out in float32 once; the rare ``+inf`` count took a second copy of
    its own (64 MiB for the value, 96 with the gradient). optax, which computes
    in float16, holds 32 MiB here.
    """
    logits = jax.ShapeDtypeStruct((8192, 1024), jnp.float16)
    labels = jax.ShapeDtypeStruct((8192,), jnp.int32)

    def loss(x, y):
        return jnp.sum(int_ce(x, y, label_smoothing=0.1))

    f = jax.value_and_grad(loss) if with_gradient else loss
    analysis = jax.jit(f).lower(logits, labels).compile().memory_analysis()
    float32_copies = 2 if with_gradient else 1
    assert analysis.temp_size_in_bytes < (float32_copies + 0.1) * 8192 * 1024 * 4


def test_bfloat16_soft_label_forward_holds_no_float32_copy():
    """The rare exact redo reads bfloat16 chunks (exact on CPU).

    XLA:CPU has no bfloat16 dynamic-slice and would widen both inputs to
    float32 ahead of the redo's loop (64 MiB here); passed as their bits the
    two are copied once (32 MiB). optax, which computes in bfloat16, holds none.
    """
    logits = jax.ShapeDtypeStruct((8192, 1024), jnp.bfloat16)
    compiled = jax.jit(soft_ce).lower(logits, logits).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 1.1 * 2 * 8192 * 1024 * 2


def test_soft_labels_second_order_through_the_fast_path(rng):
    logits = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    labels = jnp.asarray(rng.dirichlet(np.ones(5), 3), jnp.float32)

    def ours(x):
        return jnp.sum(soft_ce(x, labels))

    check_grads(ours, (logits,), order=2, modes=["rev"], atol=2e-2, rtol=2e-2)
    with jax.enable_x64(True):
        x64, y64 = logits.astype(jnp.float64), labels.astype(jnp.float64)
        hessian = jax.hessian(lambda x: jnp.sum(soft_ce(x, y64)))(x64)
        expected = jax.hessian(lambda x: -jnp.sum(y64 * jax.nn.log_softmax(x)))(x64)
        np.testing.assert_allclose(hessian, expected, rtol=1e-10, atol=1e-12)


def test_label_smoothing_sums_huge_logit_gaps_without_overflow():
    # 39 gaps of 2e37 sum past the largest float32 (PyTorch's float32 loss is inf);
    # the loss itself, 0.3 / 40 * 39 * 2e37, is not.
    logits = np.array([[1e37] + [-1e37] * 39], np.float32)
    expected, _ = ref.cross_entropy_int(logits, np.array([0]), label_smoothing=0.3)
    loss = int_ce(jnp.asarray(logits), jnp.array([0]), label_smoothing=0.3)
    assert ref.rel_err(loss, expected) < 1e-5
    labels = np.eye(40, dtype=np.float32)[:1]
    expected = ref.cross_entropy_soft(logits, labels, label_smoothing=0.3)
    assert ref.rel_err(soft_ce(jnp.asarray(logits), labels, label_smoothing=0.3), expected) < 1e-5


# Logits 6e38 apart, past float32's range; the label weight brings each loss back in.
FAR_APART = np.array([[3e38, -3e38, 0.0, 0.0], [1.0, 0.0, -1.0, 2.0]], np.float32)
FLOAT32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize(
    "options",
    [
        {"labels": [[0.9, 0.1, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]},
        {"labels": [1, 2], "class_weights": [1.0, 0.25, 1.0, 1.0]},
        {"labels": [0, 2], "label_smoothing": 0.2},
        {"labels": [0, 2], "label_smoothing": 0.2, "where": [[True] * 4, [True] * 3 + [False]]},
        {"labels": [[0.0, 1.0, 0.0, 0.0]] * 2, "class_weights": [1.0, 0.5, 1.0, 1.0]},
    ],
    ids=["soft", "int_weights", "int_smoothing", "int_smoothing_mask", "soft_weights"],
)
def test_logits_more_than_the_largest_float_apart(backend_forms, options):
    """``lse - z`` is 6e38 here, yet each loss and its gradients are finite."""
    labels = np.asarray(options["labels"])
    integer = labels.ndim == 1
    weights = options.get("class_weights")
    smoothing = options.get("label_smoothing", 0.0)
    mask = None if "where" not in options else np.asarray(options["where"])
    logits64 = FAR_APART.astype(np.float64)
    if mask is not None:
        logits64 = np.where(mask, logits64, -np.inf)  # smoothing spreads over 3 classes there
    target = np.eye(4)[labels] if integer else labels.astype(np.float64)
    kept = np.ones((2, 4), bool) if mask is None else mask
    target = np.where(kept, target * (1 - smoothing) + smoothing / kept.sum(-1, keepdims=True), 0)
    class_weight = np.ones(4) if weights is None else np.asarray(weights, np.float64)
    log_probs = special.log_softmax(logits64, axis=-1)
    weighted = class_weight * target
    with np.errstate(invalid="ignore"):  # 0 * -inf at the masked class: taken as 0
        expected = -np.sum(np.where(weighted == 0, 0.0, weighted * log_probs), axis=-1)
    expected_grad = special.softmax(logits64, axis=-1) * weighted.sum(-1, keepdims=True) - weighted
    assert -log_probs[0, 1] > FLOAT32_MAX and np.all(np.abs(expected) < FLOAT32_MAX)

    kwargs = {k: jnp.asarray(v) for k, v in options.items() if k in ("class_weights", "where")}
    if smoothing:
        kwargs["label_smoothing"] = smoothing
    loss_fn = int_ce if integer else soft_ce
    logits = jnp.asarray(FAR_APART)

    def total(x, y):
        return jnp.sum(loss_fn(x, y, **kwargs))

    label_arg = jnp.asarray(labels if integer else labels.astype(np.float32))
    value = jax.jit(lambda x, y: loss_fn(x, y, **kwargs))(logits, label_arg)
    assert ref.rel_err(value, expected) < 1e-6
    loss, grad = jax.value_and_grad(total)(logits, label_arg)
    assert ref.rel_err(loss, expected.sum()) < 1e-6
    assert ref.rel_err(grad, expected_grad) < 1e-6
    if not integer:
        # d loss / d y_c = -(1 - e) w_c log softmax_c: 0.1 * 6e38 for the far class.
        label_grad = jax.grad(total, argnums=1)(logits, label_arg)
        expected_label_grad = -(1 - smoothing) * class_weight * log_probs
        finite = np.abs(expected_label_grad) < FLOAT32_MAX
        assert ref.rel_err(np.asarray(label_grad)[finite], expected_label_grad[finite]) < 1e-6
        np.testing.assert_array_equal(np.asarray(label_grad)[~finite], np.inf)


@pytest.mark.parametrize(
    "options", [{"class_weights": jnp.ones(4)}, {"z_loss": 1e-45}], ids=["weights", "z_loss"]
)
def test_mean_of_a_loss_past_the_largest_float(options):
    """A loss of 4e38 in a mean of four: finite with class weights or a z-loss.

    Either puts the mean's division inside the loss. The z-loss's own part,
    1e-45 * (2e38)**2 / 4 = 1e31, is below the mean's rounding.
    """
    logits = np.zeros((4, 4), np.float32)
    logits[0, :2] = [2e38, -2e38]
    logits[1] = [1.0, 0.0, -1.0, 2.0]
    labels = jnp.array([1, 2, 0, 0])
    z_loss = options.get("z_loss", 0.0)
    expected, _ = ref.cross_entropy_int(logits, labels, z_loss=z_loss)
    assert expected[0] > FLOAT32_MAX and expected.mean() < FLOAT32_MAX
    logits = jnp.asarray(logits)
    onehot = jnp.eye(4)[labels]
    mean, grad = jax.value_and_grad(lambda x: int_ce(x, labels, reduction="mean", **options))(
        logits
    )
    assert ref.rel_err(mean, expected.mean()) < 1e-5
    assert ref.rel_err(grad, ref.soft_grad(logits, onehot, z_loss=z_loss) / 4) < 1e-5
    soft_mean, soft_grad = jax.value_and_grad(
        lambda x: soft_ce(x, onehot, reduction="mean", **options)
    )(logits)
    assert ref.rel_err(soft_mean, expected.mean()) < 1e-5
    assert ref.rel_err(soft_grad, ref.soft_grad(logits, onehot, z_loss=z_loss) / 4) < 1e-5
    value_alone = soft_ce(logits, onehot, reduction="mean", **options)  # another form on CPU
    assert ref.rel_err(value_alone, expected.mean()) < 1e-5
    # Without either the mean divides losses already computed: inf (documented).
    assert int_ce(logits, labels, reduction="mean") == np.inf


def test_plus_inf_logit_limits_for_labels_on_finite_classes(backend_forms):
    # A +inf logit takes all the probability: a finite class has log-probability -inf.
    logits = jnp.array([[jnp.inf, 0.0, 1.0]])
    labels = jnp.array([[0.0, 1.0, 0.0]])
    loss, (d_logits, d_labels) = jax.value_and_grad(
        lambda x, y: soft_ce(x, y).sum(), argnums=(0, 1)
    )(logits, labels)
    assert loss == np.inf
    np.testing.assert_array_equal(d_logits, [[1.0, -1.0, 0.0]])
    np.testing.assert_array_equal(d_labels, [[0.0, np.inf, np.inf]])  # -log_softmax
    smoothed = int_ce(logits, jnp.array([0]), label_smoothing=0.5)
    np.testing.assert_array_equal(smoothed, [np.inf])


@pytest.mark.parametrize("loss_fn", ["int", "soft"])
def test_z_loss_gradient_at_plus_inf_logit_is_its_limit(backend_forms, loss_fn):
    # 2 z lse softmax -> [inf, 0, 0]: inf * 0 must not become NaN.
    logits = jnp.array([[jnp.inf, 0.0, 1.0], [1.0, 2.0, 0.5]])
    if loss_fn == "int":
        f = lambda x: int_ce(x, jnp.array([0, 1]), z_loss=0.1)  # noqa: E731
    else:
        f = lambda x: soft_ce(x, jnp.eye(3)[jnp.array([0, 1])], z_loss=0.1)  # noqa: E731
    loss, vjp = jax.vjp(f, logits)
    assert loss[0] == np.inf
    (grad,) = vjp(jnp.ones(2))
    np.testing.assert_array_equal(grad[0], [np.inf, 0.0, 0.0])
    p = ref.softmax(logits[1])  # the finite row: softmax - onehot + 2 z lse softmax
    lse = ref.logsumexp(logits[1])
    np.testing.assert_allclose(grad[1], p - np.eye(3)[1] + 0.2 * lse * p, rtol=1e-5)
    (grad,) = vjp(jnp.array([-2.0, 1.0]))
    np.testing.assert_array_equal(grad[0], [-np.inf, 0.0, 0.0])
    (grad,) = vjp(jnp.array([0.0, 1.0]))  # a zero cotangent: zero gradient, not NaN
    np.testing.assert_array_equal(grad[0], 0.0)


@pytest.mark.parametrize("label_first", [False, True])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("weighted", [False, True])
def test_integer_label_chains_of_the_other_backends(
    monkeypatch, rng, label_first, z_loss, weighted
):
    """Both GPU/TPU forms of the integer-label value (three passes in one kernel, or the
    label read in the first pass), at the limits of each edge row, against float64.

    Row 0 has a -inf label logit, row 1 only -inf (no loss), row 2 a NaN, row 3 a
    +inf label logit, row 4 a +inf logit off the label, row 5 two +inf logits one
    of them the label's (log 2), row 6 logits of +-1e30 and row 7 an ignored label.
    """
    from jsoftmax import _cross_entropy, _stable

    monkeypatch.setattr(_stable, "by_backend", lambda *args, cpu, other: other(*args))
    monkeypatch.setattr(_cross_entropy, "_LABEL_FIRST_MIN_BYTES", 0 if label_first else 2**62)
    jax.clear_caches()
    n, c = 64, 9
    x = (rng.standard_normal((n, c)) * 3).astype(np.float32)
    assert _cross_entropy._label_pass_first(x, (1,)) == label_first
    labels = rng.integers(0, c, n)
    weights = rng.uniform(0.2, 2.0, c).astype(np.float32) if weighted else np.ones(c, np.float32)
    x[0, labels[0]] = -np.inf
    x[1] = -np.inf
    x[2, 4] = np.nan
    x[3, labels[3]] = np.inf
    x[4, (labels[4] + 1) % c] = np.inf
    x[5, labels[5]] = x[5, (labels[5] + 2) % c] = np.inf
    x[6] = np.r_[1e30, -1e30, np.zeros(c - 2)]
    labels[6], labels[7] = 0, -100
    target = np.eye(c)[np.clip(labels, 0, None)] * weights
    target[7] = 0.0
    with np.errstate(invalid="ignore"):
        expected, _ = ref.cross_entropy_limit(x, target, np.ones_like(x, bool), z_loss)
    expected[7] = 0.0  # an ignored example has no loss, z-loss included
    with np.errstate(over="ignore"):  # row 6's z-loss (1e57) overflows float32
        expected = expected.astype(np.float32)

    loss = jax.jit(
        lambda x: int_ce(
            x,
            labels,
            class_weights=weights if weighted else None,
            ignore_index=-100,
            z_loss=z_loss,
        )
    )(x)
    jax.clear_caches()
    loss = np.asarray(loss)
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(loss), np.isposinf(expected))
    assert loss[1] == 0.0 and loss[7] == 0.0
    finite = np.isfinite(expected)
    assert ref.rel_err(loss[finite], expected[finite]) < 1e-5
    np.testing.assert_allclose(loss[5], expected[5], rtol=1e-6)


@pytest.mark.parametrize(
    ("shape", "dtype", "expected"),
    [
        ((65536, 1024), jnp.float32, True),  # 256 MiB of short rows
        ((16384, 1024), jnp.float32, True),  # 64 MiB
        ((8192, 1024), jnp.float32, False),  # 32 MiB: in an H100's L2 cache
        ((32768, 1024), jnp.bfloat16, True),
        ((16384, 2048), jnp.float32, True),
        ((16384, 4096), jnp.float32, False),  # longer rows: the one kernel is faster
        ((4, 8192, 1024), jnp.float32, True),
    ],
)
def test_which_integer_label_chain_the_other_backends_take(shape, dtype, expected):
    from jsoftmax import _cross_entropy

    logits = jax.ShapeDtypeStruct(shape, dtype)
    assert _cross_entropy._label_pass_first(logits, (len(shape) - 1,)) == expected
