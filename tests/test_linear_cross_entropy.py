"""The fused linear + cross-entropy against unfused references: optax, autodiff, float64 NumPy."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.experimental import checkify
from jax.test_util import check_grads

import jsoftmax._linear_cross_entropy as lce_module
from jsoftmax._linear_cross_entropy import default_chunk_size, linear_softmax_cross_entropy
from tests import reference as ref

fused = linear_softmax_cross_entropy
TOL = 1e-5


def problem(rng, batch=(37,), d=16, c=300, scale=0.3, bias=True):
    """Random ``x [*batch, d]``, ``w [d, c]``, ``b [c]`` and in-range labels, float32."""
    x = rng.standard_normal((*batch, d)).astype(np.float32)
    w = (rng.standard_normal((d, c)) * scale).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32) if bias else None
    labels = rng.integers(0, c, batch).astype(np.int32)
    return x, w, b, labels


def unfused(
    x,
    w,
    labels,
    b=None,
    *,
    where=None,
    ignore_index=None,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap=None,
    reduction="mean",
):
    """The same loss written the obvious way (optax on the full logits), for autodiff."""
    z = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)
    if b is not None:
        z = z + b
    if logit_softcap is not None:
        z = logit_softcap * jnp.tanh(z / logit_softcap)
    num_classes = z.shape[-1]
    valid = jnp.ones(labels.shape, bool)
    if ignore_index is not None:
        valid = valid & (labels != ignore_index)
    if where is not None:
        valid = valid & where
    safe = jnp.where(valid, labels, 0)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(safe, num_classes), label_smoothing)
        loss = optax.softmax_cross_entropy(z, targets)
    else:
        loss = optax.softmax_cross_entropy_with_integer_labels(z, safe)
    if z_loss:
        loss = loss + z_loss * jax.nn.logsumexp(z, axis=-1) ** 2
    loss = jnp.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return jnp.sum(loss)
    count = jnp.sum(valid.astype(jnp.float32))
    return jnp.where(count > 0, jnp.sum(loss) / jnp.maximum(count, 1.0), 0.0)


def grads_of(fn, x, w, b, labels, cotangent=None, **kwargs):
    """Value and the cotangent-weighted gradients w.r.t. ``x``, ``w`` (and ``b``)."""

    def f(x, w, b):
        return fn(x, w, labels, b, **kwargs)

    value, vjp = jax.vjp(f, x, w, b)
    ct = jnp.ones_like(value) if cotangent is None else jnp.asarray(cotangent, value.dtype)
    return value, vjp(ct)


# -- agreement with optax and the float64 reference ---------------------------------------


@pytest.mark.parametrize(
    "batch,d,c,chunk_size",
    [
        ((37,), 16, 300, None),  # one chunk
        ((37,), 16, 300, 8),  # N not a multiple of the chunk: the last one is shifted
        ((40,), 16, 300, 8),  # N a multiple of the chunk
        ((2, 3, 5), 8, 129, 4),  # extra leading batch dims
        ((5,), 4, 3, 64),  # chunk larger than N
        ((1,), 8, 1, None),  # a single class
    ],
)
def test_matches_optax_on_the_full_logits(backend_forms, rng, batch, d, c, chunk_size):
    x, w, b, labels = problem(rng, batch, d, c)

    def ours(x, w, b):
        return fused(x, w, labels, b, chunk_size=chunk_size)

    def theirs(x, w, b):
        logits = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST) + b
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    value, grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(x, w, b)
    expected, expected_grads = jax.jit(jax.value_and_grad(theirs, argnums=(0, 1, 2)))(x, w, b)
    assert value.dtype == jnp.float32
    assert ref.rel_err(value, expected) < TOL
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert ref.rel_err(got, want) < TOL
    # and the float64 closed form
    value64, *grads64 = ref.linear_cross_entropy(x, w, labels, b)
    assert ref.rel_err(value, value64) < TOL
    for got, want in zip(grads, grads64, strict=True):
        assert ref.rel_err(got, want) < TOL


_ALL_ON = {"label_smoothing": 0.2, "z_loss": 1e-3, "logit_softcap": 3.0, "skip": "where+ignore"}
OPTION_GRID = [
    {"reduction": reduction, "label_smoothing": 0.0, "z_loss": 0.0, "logit_softcap": None,
     "skip": "none", "bias": True, **change}
    # "none" (backward recomputes the tiles) and "mean" (gradients made in the forward) are
    # the two code paths; "sum" differs from "mean" only in the per-example weight
    for reduction in ("none", "mean", "sum")
    for change in (
        {},
        {"label_smoothing": 0.2},
        {"z_loss": 1e-3},
        {"logit_softcap": 3.0},
        {"skip": "ignore"},
        {"skip": "where+ignore"},
        {"bias": False},
        _ALL_ON,
        {**_ALL_ON, "bias": False, "label_smoothing": 1.0},
    )
    if reduction != "sum" or change in ({}, _ALL_ON)
]  # fmt: skip


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(map(str, o.values())))
def test_options_match_both_references(backend_forms, rng, options):
    options = dict(options)
    skip, bias = options.pop("skip"), options.pop("bias")
    x, w, b, labels = problem(rng, (29,), 12, 70, scale=0.5, bias=bias)
    if skip != "none":
        options["ignore_index"] = -100
        labels[[0, 3, 17]] = -100
    if skip == "where+ignore":
        options["where"] = rng.random(labels.shape) < 0.7
    cotangent = None
    if options["reduction"] == "none":
        cotangent = rng.standard_normal(labels.shape).astype(np.float32)
    else:
        cotangent = np.float32(1.7)

    value, grads = grads_of(fused, x, w, b, labels, cotangent, chunk_size=8, **options)
    expected, expected_grads = grads_of(unfused, x, w, b, labels, cotangent, **options)
    value64, *grads64 = ref.linear_cross_entropy(x, w, labels, b, cotangent=cotangent, **options)
    assert value.shape == expected.shape == np.shape(value64)
    assert ref.rel_err(value, value64) < TOL
    assert ref.rel_err(value, expected) < TOL
    for got, want, want64 in zip(grads, expected_grads, grads64, strict=False):
        if got is None:  # no bias
            assert want is None
            continue
        assert ref.rel_err(got, want) < TOL
        assert ref.rel_err(got, want64) < TOL


def test_class_blocks_with_a_remainder(backend_forms, rng, monkeypatch):
    # dw is updated a block of columns at a time (on XLA:CPU; the other backends' form
    # updates all columns at once); make blocks of 32 columns so that C=300 leaves a
    # partial last block (shifted back, like the last row chunk)
    monkeypatch.setattr(lce_module, "_BLOCK_BYTES", 4 * 16 * 32)
    assert lce_module._class_block(16, 300) == 32
    x, w, b, labels = problem(rng, (37,), 16, 300)
    for reduction in ("mean", "none"):
        cotangent = rng.standard_normal(labels.shape) if reduction == "none" else None
        value, grads = grads_of(
            fused, x, w, b, labels, cotangent, reduction=reduction, chunk_size=8, z_loss=1e-2
        )
        value64, *grads64 = ref.linear_cross_entropy(
            x, w, labels, b, cotangent=cotangent, reduction=reduction, z_loss=1e-2
        )
        assert ref.rel_err(value, value64) < TOL
        for got, want in zip(grads, grads64, strict=True):
            assert ref.rel_err(got, want) < TOL


def test_none_backward_is_exact_for_any_cotangent(rng):
    x, w, b, labels = problem(rng, (4, 9), 8, 50)
    f = jax.jit(lambda x, w, b: fused(x, w, labels, b, reduction="none", chunk_size=5))
    _, vjp = jax.vjp(f, x, w, b)
    for _ in range(3):
        cotangent = rng.standard_normal(labels.shape).astype(np.float32)
        grads = vjp(jnp.asarray(cotangent))
        _, *grads64 = ref.linear_cross_entropy(
            x, w, labels, b, cotangent=cotangent, reduction="none"
        )
        for got, want in zip(grads, grads64, strict=True):
            assert ref.rel_err(got, want) < TOL


def test_jit_vmap_and_partial_gradients(rng):
    x, w, b, labels = problem(rng, (3, 10), 8, 40)
    f = jax.jit(lambda x, w, y: fused(x, w, y, chunk_size=4))
    batched = jax.vmap(f, in_axes=(0, None, 0))(x, w, labels)
    one_by_one = jnp.stack([f(x[i], w, labels[i]) for i in range(3)])
    assert ref.rel_err(batched, one_by_one) < TOL
    # gradient with respect to one input only (the others are not differentiated)
    dw = jax.grad(lambda w: fused(x, w, labels, b))(w)
    db = jax.grad(lambda b: fused(x, w, labels, b, reduction="sum"))(b)
    _, _, dw64, _ = ref.linear_cross_entropy(x, w, labels, b)
    _, _, _, db64 = ref.linear_cross_entropy(x, w, labels, b, reduction="sum")
    assert ref.rel_err(dw, dw64) < TOL
    assert ref.rel_err(db, db64) < TOL
    dx = jax.grad(lambda x: fused(x, w, labels, reduction="none").sum())(x)
    _, dx64, _, _ = ref.linear_cross_entropy(x, w, labels, reduction="none")
    assert ref.rel_err(dx, dx64) < TOL


def test_check_grads_and_second_order_in_float64():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x = rng.standard_normal((7, 5))
        w = rng.standard_normal((5, 11)) * 0.5
        b = rng.standard_normal(11)
        labels = rng.integers(0, 11, 7)
        options = {"label_smoothing": 0.1, "z_loss": 1e-2, "logit_softcap": 2.0}

        def f(x, w, b):
            return fused(x, w, labels, b, chunk_size=3, reduction="none", **options)

        assert f(x, w, b).dtype == jnp.float64
        check_grads(jax.jit(f), (x, w, b), order=1, modes=["rev"])
        # reverse over reverse (the backward is differentiable jnp), against optax
        for reduction in ("mean", "none"):

            def ours(x, reduction=reduction):
                return jnp.sum(fused(x, w, labels, chunk_size=3, reduction=reduction))

            def theirs(x, reduction=reduction):
                losses = optax.softmax_cross_entropy_with_integer_labels(x @ w, labels)
                return jnp.mean(losses) if reduction == "mean" else jnp.sum(losses)

            hessian = jax.jit(jax.jacrev(jax.grad(ours)))(x)
            assert ref.rel_err(hessian, jax.hessian(theirs)(x)) < 1e-10


# -- masking, ignore_index, edge cases --------------------------------------------------------


def test_all_examples_skipped_gives_zero_not_nan(rng):
    x, w, b, labels = problem(rng, (6,), 4, 9)
    labels[:] = -100
    for kwargs in ({"ignore_index": -100}, {"where": np.zeros(6, bool)}):
        kwargs = {"ignore_index": -100, **kwargs}
        value, grads = jax.jit(
            jax.value_and_grad(
                lambda x, w, b, kwargs=kwargs: fused(x, w, labels, b, **kwargs), argnums=(0, 1, 2)
            )
        )(x, w, b)
        assert float(value) == 0.0
        for g in grads:
            assert np.all(np.asarray(g) == 0.0)
    rows = fused(x, w, labels, b, ignore_index=-100, reduction="none")
    assert rows.shape == (6,) and np.all(np.asarray(rows) == 0.0)


def test_masked_rows_get_exact_zero_even_if_not_finite(backend_forms, rng):
    x, w, b, labels = problem(rng, (6,), 4, 9)
    x[2] = np.inf
    where = np.ones(6, bool)
    where[2] = False
    value, (dx, dw) = jax.value_and_grad(
        lambda x, w: fused(x, w, labels, b, where=where), argnums=(0, 1)
    )(x, w)
    assert np.isfinite(value) and np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))
    assert np.all(np.asarray(dx)[2] == 0.0)


def test_empty_batch(rng):
    x, w, b, labels = problem(rng, (0,), 4, 9)
    assert float(fused(x, w, labels, b)) == 0.0
    assert fused(x, w, labels, b, reduction="none").shape == (0,)
    dx, dw = jax.grad(lambda x, w: fused(x, w, labels, b), argnums=(0, 1))(x, w)
    assert dx.shape == (0, 4) and np.all(np.asarray(dw) == 0.0)


def test_large_logits_are_stable(rng):
    x, w, b, labels = problem(rng, (9,), 4, 20, scale=300.0)
    value, grads = jax.value_and_grad(
        lambda x, w: fused(x, w, labels, z_loss=1e-4, chunk_size=4), argnums=(0, 1)
    )(x, w)
    value64, dx64, dw64, _ = ref.linear_cross_entropy(x, w, labels, z_loss=1e-4)
    assert np.isfinite(value) and ref.rel_err(value, value64) < TOL
    assert ref.rel_err(grads[0], dx64) < TOL and ref.rel_err(grads[1], dw64) < TOL


def test_mean_z_loss_is_finite_when_only_one_rows_square_overflows(backend_forms):
    """One row's ``lse**2`` is 4e38, past float32's range; the mean of four is 1e38."""
    x = jnp.array([[1e19, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    w = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = jnp.array([0, 2, 1, 0])
    value, (dx, dw) = jax.value_and_grad(
        lambda x, w: fused(x, w, labels, z_loss=1.0, chunk_size=2), argnums=(0, 1)
    )(x, w)
    value64, dx64, dw64, _ = ref.linear_cross_entropy(x, w, labels, z_loss=1.0)
    assert np.isfinite(np.float32(value64)) and value64 > 9e37
    assert ref.rel_err(value, value64) < TOL
    assert ref.rel_err(dx, dx64) < TOL and ref.rel_err(dw, dw64) < TOL


@pytest.mark.parametrize(
    "options",
    [{"reduction": "mean"}, {"reduction": "none", "label_smoothing": 0.2}],
    ids=["mean", "smoothing"],
)
def test_logits_more_than_the_largest_float_apart(backend_forms, options):
    """Logits 6e38 apart: a mean of four, or a smoothed loss, is still finite, as are the gradients.

    The first row's loss is 6e38 for its label (class 1): past float32's range,
    its mean over four examples is not. With label smoothing and class 0 as the
    label, it is 0.2 / 4 * (2 * 6e38 + 3e38) = 7.5e37, though the mean logit minus
    the largest, -3.75e38, overflows.
    """
    x = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    w = jnp.array([[3e38, -3e38, -3e38, 0.0], [1.0, 0.0, -1.0, 2.0]])
    labels = jnp.array([0 if "label_smoothing" in options else 1, 2, 0, 3])
    cotangent = None if options["reduction"] == "mean" else jnp.array([1.0, 0.5, -1.0, 2.0])

    def loss(x, w):
        value = fused(x, w, labels, chunk_size=2, **options)
        return value if cotangent is None else jnp.sum(value * cotangent)

    value64, dx64, dw64, _ = ref.linear_cross_entropy(x, w, labels, cotangent=cotangent, **options)
    assert np.all(np.abs(value64) < np.finfo(np.float32).max)
    value = fused(x, w, labels, chunk_size=2, **options)
    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
    assert ref.rel_err(value, value64) < TOL
    assert ref.rel_err(dx, dx64) < TOL and ref.rel_err(dw, dw64) < TOL


@pytest.mark.parametrize("z_loss", [1e-38, 1e-40, 1e-44])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_a_tiny_z_loss_counts_where_the_logsumexp_is_huge(backend_forms, reduction, z_loss):
    """A ``z_loss`` (or its share of a mean of four) below float32's normal range, times 1e74.

    XLA:CPU flushes subnormal floats to 0: formed on its own, the coefficient
    dropped the term, and ``2 z_loss lse`` its gradient. (Logits of 1e37, not
    1e38 as in the unfused test: ``dx`` sums several of them.)
    """
    x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    w = jnp.array([[1e37, -1e37], [1.0, 0.0]])
    labels = jnp.array([1, 0, 0, 1])
    cotangent = None if reduction == "mean" else jnp.ones(4)

    def loss(x, w):
        value = fused(x, w, labels, chunk_size=2, z_loss=z_loss, reduction=reduction)
        return value if cotangent is None else jnp.sum(value * cotangent)

    options = dict(z_loss=z_loss, reduction=reduction, cotangent=cotangent)
    value64, dx64, dw64, _ = ref.linear_cross_entropy(x, w, labels, **options)
    assert np.all(np.abs(value64) < np.finfo(np.float32).max)
    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
    # Elementwise: the z-term of 1e30 in the third row is all of its loss.
    np.testing.assert_allclose(
        fused(x, w, labels, z_loss=z_loss, reduction=reduction), value64, rtol=TOL
    )
    assert ref.rel_err(dw, dw64) < TOL and ref.rel_err(dx, dx64) < TOL


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_gradient_is_exact_at_a_large_common_logit_level(reduction):
    """Probabilities come from ``z - max`` and the log-sum, kept apart: ``z - lse`` would
    round them by an ulp of the logsumexp (2e-4 relative at a level of 1e4)."""
    x, w, labels = jnp.ones((1, 1)), jnp.array([[0.0, 1.0]]), jnp.array([0])
    p = 1 / (1 + np.exp(-1.0))  # the softmax of [0, 1], whatever the common level
    for level in (0.0, 1e4, 1e6):
        b = jnp.full((2,), level, jnp.float32)
        db = jax.grad(
            lambda b: jnp.sum(linear_softmax_cross_entropy(x, w, labels, b, reduction=reduction))
        )(b)
        assert ref.rel_err(db, [-p, p]) < 1e-6, (level, db)


@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-3}],
    ids=["plain", "smoothing", "z_loss"],
)
def test_plus_inf_logits_share_the_probability(backend_forms, options):
    """``+inf`` logits (here from the bias) take their limits, as in the unfused loss.

    Row 0's label is one of two ``+inf`` classes: loss log 2; row 1's is a finite
    class: loss ``inf``, as is every smoothed loss. Gradients: the softmax puts
    1/2 on each ``+inf`` class. (With a z-loss the slope ``2 z lse`` is ``inf``:
    only the value and the finite classes' gradient, ``-target``, are checked.)
    """
    x = jnp.eye(2)
    w = jnp.array([[1.0, 2.0, 3.0, -1.0], [0.5, -1.0, 0.0, 2.0]])
    b = jnp.array([jnp.inf, 0.0, jnp.inf, 0.0])
    labels = jnp.array([0, 1])
    z = np.asarray(x @ w + b, np.float64)
    target = (1 - options.get("label_smoothing", 0.0)) * np.eye(4)[[0, 1]]
    target = target + options.get("label_smoothing", 0.0) / 4
    loss64, grad64 = ref.cross_entropy_limit(
        z, target, np.ones(z.shape, bool), options.get("z_loss", 0)
    )

    def loss(x, w, b):
        return fused(x, w, labels, b, reduction="none", chunk_size=1, **options)

    np.testing.assert_allclose(loss(x, w, b), loss64, rtol=TOL)
    assert loss(x, w, b)[0] == (np.inf if options else pytest.approx(np.log(2)))
    dx, dw, db = jax.grad(lambda *a: jnp.sum(loss(*a)), argnums=(0, 1, 2))(x, w, b)
    if options.get("z_loss"):
        np.testing.assert_array_equal(np.asarray(db)[[1, 3]], [-1.0, 0.0])  # -target, 0
        return
    assert ref.rel_err(db, grad64.sum(0)) < TOL
    assert ref.rel_err(dw, x.T @ grad64) < TOL and ref.rel_err(dx, grad64 @ w.T) < TOL


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_rows_with_every_logit_minus_inf_give_zero(backend_forms, reduction):
    """Rows with no probability: loss 0 and gradient 0, as the unfused loss (SPEC 3)."""
    x, w = jnp.eye(3), jnp.ones((3, 2))
    b = jnp.full((2,), -jnp.inf)
    labels = jnp.array([0, 1, 1])
    value = fused(x, w, labels, b, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    np.testing.assert_array_equal(value, np.zeros(3) if reduction == "none" else 0.0)
    grads = jax.grad(
        lambda *a: jnp.sum(fused(*a[:2], labels, a[2], reduction=reduction)), argnums=(0, 1, 2)
    )(x, w, b)
    for grad in grads:
        np.testing.assert_array_equal(grad, np.zeros(grad.shape))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_label_smoothing_where_the_sum_of_the_logits_overflows(backend_forms, reduction):
    """The smoothing term's mean logit, ``(3e38 + 3e38 - 3e38 + 1) / 4``, is taken as a mean of
    quarters: summed first, the logits overflow to ``inf`` and the loss was NaN."""
    x = jnp.array([[1.0], [0.5]])
    w = jnp.array([[3e38, 3e38, -3e38, 1.0]])
    labels = jnp.array([0, 3])

    def loss(x, w):
        return fused(x, w, labels, reduction=reduction, label_smoothing=0.1)

    value64, _, dw64, _ = ref.linear_cross_entropy(
        x, w, labels, reduction=reduction, label_smoothing=0.1
    )
    np.testing.assert_allclose(loss(x, w), value64, rtol=TOL)
    dw = jax.grad(lambda w: jnp.sum(loss(x, w)))(w)
    assert ref.rel_err(dw, dw64) < TOL


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_label_smoothing_where_weight_and_bias_cancel(backend_forms, reduction):
    """A logit of 0 from a weight of -1e30 and a bias of 1e30. Its row's mean logit was
    taken as ``x . mean(w) + mean(b)``: -1.7e29 + 1.7e29, which keeps none of the
    other logits (a loss 1.5% low). Read off the tile, as the unfused loss does."""
    x = jnp.eye(2)
    w = jnp.array([[-1e30, 1.0, -1.5, 0.25], [-1e30, 0.5, 2.0, -1.0]])
    b = jnp.array([1e30, 0.0, 0.0, 0.0])
    labels = jnp.array([3, 1])

    def loss(x, w, b):
        return fused(x, w, labels, b, reduction=reduction, label_smoothing=0.1)

    value64, dx64, dw64, db64 = ref.linear_cross_entropy(
        x, w, labels, b, reduction=reduction, label_smoothing=0.1
    )
    assert np.all(value64 < 10)  # the logits are [0, 1, -1.5, 0.25] and [0, 0.5, 2, -1]
    np.testing.assert_allclose(loss(x, w, b), value64, rtol=TOL)
    _, dw, db = jax.grad(lambda *a: jnp.sum(loss(*a)), argnums=(0, 1, 2))(x, w, b)
    assert ref.rel_err(dw, dw64) < TOL and ref.rel_err(db, db64) < TOL


def test_confident_examples_never_get_a_negative_loss(rng):
    """``z_y`` is computed apart from the tile (rounded differently, by up to an ulp of
    the logits); where it is the row maximum that must not make the loss negative."""
    x = jnp.asarray(rng.standard_normal((64, 8)) * 100, jnp.float32)
    w0 = jnp.asarray(rng.standard_normal((8, 1)), jnp.float32)
    labels = jnp.zeros(64, jnp.int32)
    rounding = 1e-6 * np.max(np.abs(np.asarray(x @ w0)))
    twins = jnp.concatenate([w0, w0], axis=1)
    exact = np.log1p(np.exp(-30.0))
    for w, b, expected in ((w0, None, 0.0), (twins, jnp.array([0.0, -30.0]), exact)):
        loss = np.asarray(linear_softmax_cross_entropy(x, w, labels, b, reduction="none"))
        assert np.all(loss >= 0.0)
        assert np.all(np.abs(loss - expected) <= rounding)


def test_saturated_soft_cap_has_a_zero_derivative():
    """``1 - tanh**2`` is 0 where tanh rounds to 1 (z / cap would round below 1)."""
    x, labels = jnp.ones((1, 1)), jnp.array([2])
    w = jnp.array([[1000.0, -1000.0, 0.0, 50.0]])
    cap = 23.569200180322046
    db = jax.grad(
        lambda b: linear_softmax_cross_entropy(x, w, labels, b, logit_softcap=cap, reduction="sum")
    )(jnp.zeros(4))
    raw = np.array([1000.0, -1000.0, 0.0, 50.0])
    expected = (ref.softmax(cap * np.tanh(raw / cap)) - np.eye(4)[2]) * (
        1 - np.tanh(raw / cap) ** 2
    )
    assert ref.rel_err(db, expected) < 1e-5
    assert abs(float(db[0])) < 1e-30 and float(db[1]) == 0.0


def test_one_feature_with_large_logits_is_finite():
    """With D = 1 XLA:CPU would turn the matmul into FMA-contracted multiplies."""
    w = jnp.array([[1.1e10, 0.0]])
    for x in (jnp.array([[7.0]]), jnp.array([[-3.0]])):
        labels = jnp.array([int(x[0, 0] < 0)])  # the larger logit's class
        loss, dx = jax.value_and_grad(
            lambda x, labels=labels: linear_softmax_cross_entropy(x, w, labels, reduction="sum")
        )(x)
        assert loss == 0.0 and dx[0, 0] == 0.0


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_one_class_has_exactly_zero_cross_entropy(rng, reduction):
    """With one class the label's logit is the row maximum: loss 0, not an ulp of the logit."""
    x, w, _, _ = problem(rng, (300,), 64, 1, scale=100.0, bias=False)
    labels = np.zeros(300, np.int32)
    loss, (dx, dw) = jax.value_and_grad(
        lambda x, w: jnp.sum(fused(x, w, labels, reduction=reduction)), argnums=(0, 1)
    )(x, w)
    assert loss == 0.0 and not jnp.any(dx) and not jnp.any(dw)
    # the z-loss alone then: z_loss * z**2 per example (integer data: z is exact in float32)
    x, w = (rng.integers(-8, 9, shape).astype(np.float32) for shape in ((300, 64), (64, 1)))
    losses = fused(x, w, labels, z_loss=1e-4, reduction="none")
    z = ref.to64(x) @ ref.to64(w)[:, 0]
    assert ref.rel_err(losses, 1e-4 * z**2) < 1e-6


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs(rng, dtype):
    x, w, b, labels = problem(rng, (21,), 16, 64)
    xh, wh, bh = (jnp.asarray(a, dtype) for a in (x, w, b))
    value, (dx, dw, db) = jax.value_and_grad(
        lambda x, w, b: fused(x, w, labels, b, chunk_size=8, label_smoothing=0.1),
        argnums=(0, 1, 2),
    )(xh, wh, bh)
    assert value.dtype == jnp.float32
    assert (dx.dtype, dw.dtype, db.dtype) == (dtype, dtype, dtype)
    # against float64 on the same (rounded) inputs: float32 accumulation inside, the
    # logit-gradient tile is rounded to the input dtype for the two matmuls
    rounded = [np.asarray(a.astype(jnp.float32)) for a in (xh, wh, bh)]
    value64, dx64, dw64, db64 = ref.linear_cross_entropy(
        *rounded[:2], labels, rounded[2], label_smoothing=0.1
    )
    assert ref.rel_err(value, value64) < TOL
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    assert ref.rel_err(dx, dx64) < tol
    assert ref.rel_err(dw, dw64) < tol
    assert ref.rel_err(db, db64) < tol


# (dtype, n, reduction, cotangent): float16 near its subnormals (below 6e-5), bfloat16
# down to 2**-120, which has float32's range; "mixed" spans eleven or more binades.
SMALL_COTANGENTS = [
    (jnp.float16, 4096, "mean", None),
    (jnp.float16, 1024, "none", 2.0**-12),
    (jnp.float16, 1024, "none", "mixed"),
    (jnp.float16, 1024, "sum", 2.0**-12),
    (jnp.bfloat16, 1000, "mean", None),
    (jnp.bfloat16, 1024, "none", 2.0**-100),
    (jnp.bfloat16, 1024, "none", "mixed"),
    (jnp.bfloat16, 1024, "sum", 2.0**-100),
]


@pytest.mark.parametrize("dtype,n,reduction,cotangent", SMALL_COTANGENTS)
def test_16_bit_gradient_keeps_its_precision_under_a_small_cotangent(
    rng, dtype, n, reduction, cotangent
):
    """The 1/count of a mean (or a small cotangent) must not push the tile to subnormals.

    The error allowed is what a unit cotangent gets from the tile's own rounding
    (about 5e-4 in float16, 3e-3 in bfloat16). float16's tile is weighted
    relative to the chunk's largest cotangent: weighted before that rounding,
    its entries near 1e-6 kept a few bits (2.5e-3 for "none", 1.1e-3 for the
    mean). bfloat16's is weighted before the rounding, unscaled.
    """
    x, w, _, labels = problem(rng, (n,), 16, 1000, bias=False)
    xh, wh = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    if cotangent == "mixed":
        lowest = -14 if dtype == jnp.float16 else -120
        cotangent = 2.0 ** rng.integers(lowest, -2, n)
    elif reduction == "none":
        cotangent = np.full(n, cotangent)
    _, (dx, dw, _) = grads_of(
        fused, xh, wh, None, labels, cotangent=cotangent, reduction=reduction, chunk_size=128
    )
    rounded = [np.asarray(a.astype(jnp.float32)) for a in (xh, wh)]
    _, dx64, dw64, _ = ref.linear_cross_entropy(
        *rounded, labels, cotangent=cotangent, reduction=reduction
    )
    tol = 8e-4 if dtype == jnp.float16 else 5e-3
    assert ref.rel_err(dx, dx64) < tol
    assert ref.rel_err(dw, dw64) < tol


def test_mixed_input_dtypes(rng):
    x, w, b, labels = problem(rng, (9,), 8, 30)
    value, (dx, dw) = jax.value_and_grad(lambda x, w: fused(x, w, labels, b), argnums=(0, 1))(
        jnp.asarray(x, jnp.bfloat16), w
    )
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    value64, *_ = ref.linear_cross_entropy(
        np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), w, labels, b
    )
    assert ref.rel_err(value, value64) < TOL


def test_uint8_labels_and_unrepresentable_ignore_index(rng):
    x, w, b, labels = problem(rng, (9,), 4, 30)
    value = fused(x, w, labels.astype(np.uint8), b, ignore_index=-100)
    assert ref.rel_err(value, ref.linear_cross_entropy(x, w, labels, b)[0]) < TOL


# -- bad labels -------------------------------------------------------------------------------


def test_out_of_range_label_is_nan_and_never_wrapped(rng):
    x, w, b, labels = problem(rng, (6,), 4, 9)
    labels[1], labels[4] = 9, -1  # one past the end, and negative (would wrap in numpy)
    rows = jax.jit(lambda x: fused(x, w, labels, b, reduction="none", ignore_index=-100))(x)
    rows = np.asarray(rows)
    assert np.isnan(rows[1]) and np.isnan(rows[4])
    good = [0, 2, 3, 5]
    expected = ref.linear_cross_entropy(x[good], w, labels[good], b, reduction="none")[0]
    assert ref.rel_err(rows[good], expected) < TOL
    assert np.isnan(float(fused(x, w, labels, b)))
    dx = jax.grad(lambda x: fused(x, w, labels, b, reduction="none").sum())(x)
    assert np.all(np.isnan(np.asarray(dx)[[1, 4]]))
    assert np.all(np.isfinite(np.asarray(dx)[good]))


def test_checkify_names_the_bad_label(rng):
    x, w, b, labels = problem(rng, (6,), 4, 9)
    labels[3] = 12
    f = checkify.checkify(lambda x: fused(x, w, labels, b), errors=checkify.all_checks)
    err, _ = jax.jit(f)(x)
    with pytest.raises(
        checkify.JaxRuntimeError,
        match=r"labels must be class indices in \[0, 9\); found 12 at flat position 3",
    ):
        err.throw()
    # an ignored label is fine, and so is everything in range
    labels[3] = -100
    g = checkify.checkify(
        lambda x: fused(x, w, labels, b, ignore_index=-100), errors=checkify.all_checks
    )
    err, value = g(x)
    assert err.get() is None and np.isfinite(value)


# -- custom_vjp properties ------------------------------------------------------------------


def test_forward_mode_raises(rng):
    x, w, b, labels = problem(rng, (6,), 4, 9)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: fused(x, w, labels, b), (x,), (x,))


def saved_residual_shapes(fn, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(fn, *args)
    shapes = []
    for line in out.getvalue().splitlines():
        match = re.match(r"\s*\w+\[([\d,]*)\]", line)
        assert match, line
        shapes.append(tuple(int(s) for s in match.group(1).split(",") if s))
    return shapes


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_logit_sized_residual(rng, reduction):
    x, w, b, labels = problem(rng, (40,), 16, 300)

    def f(x, w, b):
        return jnp.sum(fused(x, w, labels, b, reduction=reduction, chunk_size=8))

    shapes = saved_residual_shapes(f, x, w, b)
    assert shapes, "expected some residuals"
    assert all(np.prod(s) < 40 * 300 for s in shapes), shapes


def test_xla_temp_memory_is_a_fraction_of_the_unfused_path():
    # N=2048, D=512, C=32768 float32: the logits alone are 256 MiB. Compile only.
    n, d, c = 2048, 512, 32768
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, c), jnp.float32)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)

    def temp(loss):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w, y).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ours = temp(lambda x, w, y: fused(x, w, y))
    theirs = temp(lambda x, w, y: optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean())
    assert theirs >= 256 * 2**20
    assert ours <= theirs / 8, (ours / 2**20, theirs / 2**20)
    with_options = temp(
        lambda x, w, y: fused(x, w, y, label_smoothing=0.1, z_loss=1e-4, ignore_index=-100)
    )
    assert with_options <= theirs / 8, (with_options / 2**20, theirs / 2**20)
    # and with a smaller chunk, a smaller footprint
    small = temp(lambda x, w, y: fused(x, w, y, chunk_size=64))
    assert small <= theirs / 32, (small / 2**20, theirs / 2**20)


def test_default_chunk_size():
    assert default_chunk_size(2048, 512, 32768) == 256  # a 32 MiB tile
    assert default_chunk_size(10**6, 64, 1024) == 8192  # a 32 MiB tile
    assert default_chunk_size(10**6, 64, 65536) == 256  # at least 256 rows
    assert default_chunk_size(10**6, 64, 131072) == 128  # but no tile above 64 MiB
    assert default_chunk_size(10**6, 64, 10**7) == 8
    assert default_chunk_size(100, 512, 32768) == 100
    assert default_chunk_size(3, 64, 10**7) == 3


# -- bad input ---------------------------------------------------------------------------------

X = np.zeros((4, 3), np.float32)
W = np.zeros((3, 5), np.float32)
Y = np.zeros(4, np.int32)


@pytest.mark.parametrize(
    "args,kwargs,error,message",
    [
        ((X, np.zeros((3, 5, 1), np.float32), Y), {}, ValueError, r"w must be 2-D.*\(3, 5, 1\)"),
        (
            (X, np.zeros((2, 5), np.float32), Y),
            {},
            ValueError,
            r"w has shape \(2, 5\) but x has shape \(4, 3\)",
        ),
        (
            (X, W, Y, np.zeros(4, np.float32)),
            {},
            ValueError,
            r"b must have shape \(5,\).*got \(4,\)",
        ),
        (
            (X, W, np.zeros(3, np.int32)),
            {},
            ValueError,
            r"labels has shape \(3,\) but x has shape \(4, 3\)",
        ),
        ((X, W, Y.astype(np.float32)), {}, TypeError, r"labels must be an integer array.*float32"),
        ((X.astype(np.int32), W, Y), {}, TypeError, r"x must be a floating-point array.*int32"),
        ((X, W.astype(np.int32), Y), {}, TypeError, r"w must be a floating-point array.*int32"),
        ((X, np.zeros((3, 0), np.float32), Y), {}, ValueError, r"at least one class"),
        ((np.float32(1.0), W, Y), {}, ValueError, r"x must have shape \[\.\.\., D\]"),
        ((X, W, Y), {"chunk_size": 0}, ValueError, r"chunk_size must be a positive int"),
        ((X, W, Y), {"chunk_size": -3}, ValueError, r"chunk_size must be a positive int"),
        ((X, W, Y), {"chunk_size": 2.5}, TypeError, r"chunk_size must be a positive int"),
        ((X, W, Y), {"chunk_size": True}, TypeError, r"chunk_size must be a positive int"),
        ((X, W, Y), {"reduction": "avg"}, ValueError, r"reduction must be one of.*'avg'"),
        ((X, W, Y), {"label_smoothing": 1.5}, ValueError, r"label_smoothing must be in \[0, 1\]"),
        ((X, W, Y), {"z_loss": -1.0}, ValueError, r"z_loss must be"),
        (
            (X, W, Y),
            {"logit_softcap": 0.0},
            ValueError,
            r"logit_softcap must be None or a finite number > 0",
        ),
        (
            (X, W, Y),
            {"logit_softcap": -2},
            ValueError,
            r"logit_softcap must be None or a finite number > 0",
        ),
        (
            (X, W, Y),
            {"logit_softcap": "3"},
            TypeError,
            r"logit_softcap must be None or a Python number",
        ),
        ((X, W, Y), {"ignore_index": 1.5}, TypeError, r"ignore_index must be an int"),
        (
            (X, W, Y),
            {"where": np.ones((4, 5), bool)},
            ValueError,
            r"where has shape \(4, 5\).*per-example shape \(4,\)",
        ),
        ((X, W, Y), {"where": np.ones(4, np.float32)}, TypeError, r"where must be a boolean mask"),
    ],
)
def test_bad_input_messages(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        fused(*args, **kwargs)
