"""Long rows, whose statistics are taken block by block, against float64 references.

Rows longer than 128 KiB (32768 float32 entries) are reduced in blocks of at
most 32 KiB and the blocks' maxima and sums combined; these tests run every
public function on such rows, with the edge cases placed across blocks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jsoftmax
from jsoftmax import _stable
from tests import reference as ref

LONG = 65536  # 256 KiB of float32: eight blocks of 8192
BLOCK = 8192
FUNCTIONS = ["softmax", "log_softmax", "logsumexp"]


def long_rows(rng, rows=3, length=LONG, scale=5.0):
    """Rows with their maximum in different blocks, one far from 0, one with an empty block."""
    x = (rng.standard_normal((rows, length)) * scale).astype(np.float32)
    x[0, length - 3] = 40.0
    x[1] += 1e4
    x[1, 5] = 1e4 + 40.0
    x[2, BLOCK : 2 * BLOCK] = -np.inf
    return x


def assert_close(actual, expected, tolerance=1e-5):
    actual, expected = ref.to64(actual), ref.to64(expected)
    np.testing.assert_array_equal(np.isfinite(actual), np.isfinite(expected))
    finite = np.isfinite(expected)
    assert ref.rel_err(actual[finite], expected[finite]) < tolerance
    np.testing.assert_array_equal(actual[~finite], expected[~finite])


def test_block_length_divides_the_row_and_fits_32_kib():
    assert _stable._block_size((3, LONG), np.float32, (1,)) == BLOCK
    assert _stable._block_size((3, 16, 4096), np.float32, (1, 2)) == BLOCK
    assert _stable._block_size((3, 3 * 17 * 1021), np.float32, (1,)) == 3 * 1021
    assert _stable._block_size((3, 32768), np.float64, (1,)) == 4096
    assert _stable._block_size((3, 32768), np.float32, (1,)) is None  # short enough
    assert _stable._block_size((LONG, 3), np.float32, (0,)) is None  # not contiguous
    assert _stable._block_size((3, 65537), np.float32, (1,)) is None  # a prime length


@pytest.mark.parametrize("name", FUNCTIONS)
def test_values_and_gradients_match_float64(backend_forms, name, rng):
    x = long_rows(rng)
    f = getattr(jsoftmax, name)
    out, vjp = jax.vjp(f, jnp.asarray(x))
    g = rng.standard_normal(out.shape).astype(np.float32)
    (dx,) = vjp(jnp.asarray(g))
    assert_close(out, ref.softmax_family(name, x))
    ref.assert_gradient_close(dx, ref.softmax_family_vjp(name, x, -1, g), g)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_edge_rows_across_blocks(backend_forms, name):
    """Empty, +inf in two blocks, NaN in one block, huge: each row its limit, alone."""
    x = np.zeros((5, LONG), np.float32)
    x[0] = -np.inf
    x[1, [3, LONG - 1]] = np.inf
    x[2, BLOCK + 1] = np.nan
    x[3, 2 * BLOCK] = 3e38
    x[4] = np.linspace(-3, 3, LONG, dtype=np.float32)
    out = np.asarray(getattr(jsoftmax, name)(x))
    if name == "logsumexp":
        assert out[0] == -np.inf and out[1] == np.inf and np.isnan(out[2])
        assert out[3] == np.float32(3e38)
        assert ref.rel_err(out[4], ref.softmax_family(name, x[4:])[0]) < 1e-6
        return
    assert not np.isnan(np.delete(out, 2, axis=0)).any() and np.isnan(out[2]).all()
    probabilities = np.exp(out) if name == "log_softmax" else out
    assert (probabilities[0] == 0).all()
    np.testing.assert_array_equal(np.flatnonzero(probabilities[1]), [3, LONG - 1])
    np.testing.assert_allclose(probabilities[1, [3, LONG - 1]], 0.5)
    assert probabilities[3, 2 * BLOCK] == 1 and probabilities[3].sum() == 1
    assert_close(out[4], ref.softmax_family(name, x[4:])[0])


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("mask_kind", ["per_logit", "per_row"])
def test_masks(backend_forms, name, mask_kind, rng):
    x = long_rows(rng)
    if mask_kind == "per_logit":
        where = rng.random(x.shape) < 0.5
        where[0, :BLOCK] = False
        x[0, :BLOCK] = np.nan  # masked out: must not leak
        where[2, :] = False  # a fully masked row
        full_mask = where
    else:
        where = np.array([True, False, True])
        full_mask = np.broadcast_to(where[:, None], x.shape)
    f = getattr(jsoftmax, name)
    out, vjp = jax.vjp(lambda x: f(x, where=where), jnp.asarray(x))
    g = rng.standard_normal(out.shape).astype(np.float32)
    (dx,) = vjp(jnp.asarray(g))
    kept = np.where(full_mask, x, 0)
    expected = ref.softmax_family(name, kept, -1, full_mask)
    if name == "log_softmax":  # SciPy's NaN for a fully masked row; documented: -inf
        expected = np.where(np.isnan(expected), -np.inf, expected)
    assert_close(out, expected)
    expected_dx = ref.softmax_family_vjp(name, kept, -1, g, full_mask)
    expected_dx = np.where(np.isnan(expected_dx), 0.0, expected_dx)  # fully masked rows
    ref.assert_gradient_close(dx, expected_dx, g)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_long_rows_compute_in_float32(name, dtype, rng):
    x = jnp.asarray(rng.standard_normal((2, LONG)) * 4, dtype)
    out = getattr(jsoftmax, name)(x)
    assert out.dtype == dtype
    expected = ref.softmax_family(name, np.asarray(x.astype(jnp.float32)))
    assert ref.rel_err(out.astype(jnp.float32), expected) < 2 ** -(jnp.finfo(dtype).nmant)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_several_trailing_axes_and_vmap(name, rng):
    x = (rng.standard_normal((2, 3, 16, 4096)) * 3).astype(np.float32)
    f = getattr(jsoftmax, name)
    out = f(x, axis=(2, 3))
    flat = ref.softmax_family(name, x.reshape(6, -1)).reshape(out.shape)
    assert_close(out, flat)
    batched = jax.jit(jax.vmap(lambda x: f(x, axis=(1, 2))))(x)
    np.testing.assert_allclose(batched, out, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_float64_long_rows_and_second_order(name, rng):
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 32768)) * 3)
        f = getattr(jsoftmax, name)
        expected = ref.softmax_family(name, np.asarray(x))
        np.testing.assert_allclose(f(x), expected, rtol=1e-12, atol=1e-300)
        check_grads(jax.jit(lambda x: jnp.sum(jnp.sin(f(x)))), (x,), order=2, modes=["rev"])


def cross_entropy_reference(x, labels):
    """``sum(y) * logsumexp(x) - sum(y * x)`` over the labelled entries, in float64."""
    x, labels = ref.to64(x), ref.to64(labels)
    labelled = np.where(labels > 0, x, 0.0)
    return labels.sum(-1) * ref.logsumexp(x) - np.sum(labels * labelled, axis=-1)


@pytest.mark.parametrize("integer", [False, True])
def test_cross_entropy_on_long_rows(backend_forms, integer, rng):
    x = long_rows(rng)
    rows = np.arange(3)
    labels = np.array([LONG - 3, 7, 3 * BLOCK + 1])
    targets = np.zeros(x.shape, np.float32)
    if integer:
        targets[rows, labels] = 1.0
        loss_fn = lambda x: jsoftmax.softmax_cross_entropy_with_integer_labels(x, labels)  # noqa: E731
    else:
        targets[rows, labels] = [0.5, 1.0, 0.25]
        targets[rows, labels - 1] = [0.5, 0.0, 0.75]
        loss_fn = lambda x: jsoftmax.softmax_cross_entropy(x, targets)  # noqa: E731
    loss, vjp = jax.vjp(loss_fn, jnp.asarray(x))
    g = rng.standard_normal(3).astype(np.float32)
    (dx,) = vjp(jnp.asarray(g))
    assert ref.rel_err(loss, cross_entropy_reference(x, targets)) < 1e-6
    expected_dx = g[:, None] * ref.soft_grad(x, targets)
    assert ref.rel_err(dx, expected_dx) < 1e-5


@pytest.mark.parametrize("integer", [False, True])
def test_cross_entropy_edge_rows_on_long_rows(backend_forms, integer):
    """Empty row: loss 0, gradient 0; +inf in two blocks: the limit; NaN: only its row."""
    x = np.zeros((3, LONG), np.float32)
    x[0] = -np.inf
    x[1, [3, LONG - 1]] = np.inf
    x[2, BLOCK + 1] = np.nan
    labels = np.array([0, 3, 0])
    if integer:
        fn = lambda x: jsoftmax.softmax_cross_entropy_with_integer_labels(x, labels)  # noqa: E731
    else:
        onehot = np.zeros(x.shape, np.float32)
        onehot[np.arange(3), labels] = 1.0
        fn = lambda x: jsoftmax.softmax_cross_entropy(x, onehot)  # noqa: E731
    loss, vjp = jax.vjp(fn, jnp.asarray(x))
    (dx,) = vjp(jnp.ones(3, jnp.float32))
    loss, dx = np.asarray(loss), np.asarray(dx)
    assert loss[0] == 0 and (dx[0] == 0).all()
    np.testing.assert_allclose(loss[1], np.log(2), rtol=1e-6)
    np.testing.assert_allclose(dx[1, [3, LONG - 1]], [-0.5, 0.5], rtol=1e-6)
    assert (np.delete(dx[1], [3, LONG - 1]) == 0).all()
    assert np.isnan(loss[2])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_long_rows_use_no_logits_sized_temporary(dtype):
    """The blocks are a reshape of the input: nothing logits-sized is written (exact on CPU).

    16-bit logits are widened to float32 once (XLA:CPU's blocks take no
    16-bit convert), and the rare ``+inf`` count's branch makes no copy of its own.
    """
    x = jnp.zeros((8, LONG), dtype)
    labels = jnp.zeros(8, jnp.int32)
    row_bytes = LONG * 4
    widened_bytes = 0 if dtype == jnp.float32 else x.size * 4
    for fn in (
        jsoftmax.logsumexp,
        lambda x: jsoftmax.softmax_cross_entropy_with_integer_labels(x, labels),
    ):
        analysis = jax.jit(fn).lower(x).compile().memory_analysis()
        assert analysis.temp_size_in_bytes < widened_bytes + row_bytes


# XLA:CPU's fused kernels (used from about 64 x 1024 float32 up) skip NaN in max and
# min, so a NaN row must come out NaN through other paths: these layouts use them.
NAN_LAYOUTS = [((64, 1024), -1), ((24, 11, 16), 1), ((5000, 2), 0), ((4, LONG), -1)]
ALL_FUNCTIONS = [*FUNCTIONS, "softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels"]


def with_nan_rows(rng, shape, axis):
    """Random logits with a NaN first in one row and last in another, and those rows."""
    x = rng.standard_normal(shape).astype(np.float32)
    rows = np.moveaxis(x, axis, -1)  # a view: writes land in x
    rows[(*np.unravel_index(1, rows.shape[:-1]), 0)] = np.nan
    rows[..., -1].flat[-1] = np.nan
    return x, np.isnan(x).any(axis=axis)


def call(name, x, axis, rng):
    f = getattr(jsoftmax, name)
    if name == "softmax_cross_entropy":
        labels = jnp.asarray(ref.softmax(rng.standard_normal(x.shape), axis=axis), jnp.float32)
        return lambda x: f(x, labels, axis=axis)
    if name == "softmax_cross_entropy_with_integer_labels":
        labels = rng.integers(0, x.shape[axis], np.delete(x.shape, axis % x.ndim))
        return lambda x: f(x, jnp.asarray(labels), axis=axis)
    return lambda x: f(x, axis=axis)


@pytest.mark.parametrize("shape, axis", NAN_LAYOUTS)
@pytest.mark.parametrize("name", ALL_FUNCTIONS)
def test_nan_rows_stay_nan_in_xla_cpu_fused_kernels(backend_forms, name, shape, axis, rng):
    x, nan_rows = with_nan_rows(rng, shape, axis)
    f = jax.jit(call(name, x, axis, rng))
    out, vjp = jax.vjp(f, jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(rng.standard_normal(out.shape), out.dtype))
    row_nan_in_x = np.broadcast_to(np.expand_dims(nan_rows, axis), x.shape)
    expected_out_nan = nan_rows if out.shape == nan_rows.shape else row_nan_in_x
    np.testing.assert_array_equal(np.isnan(out), expected_out_nan)
    np.testing.assert_array_equal(np.isnan(dx), row_nan_in_x)


@pytest.mark.parametrize("shape, axis", [((2, 4096), -1), ((1024, 4), -1), ((4, LONG), -1)])
@pytest.mark.parametrize("name", ALL_FUNCTIONS)
def test_nan_beside_plus_inf_stays_nan(backend_forms, name, shape, axis, rng):
    """A row with a NaN and a ``+inf``: XLA:CPU's fused max can give ``+inf`` there."""
    x, nan_rows = with_nan_rows(rng, shape, axis)
    rows = np.moveaxis(x, axis, -1)
    rows[..., 1][nan_rows] = np.inf
    rows[..., 2].flat[-2] = np.inf  # a row with a +inf and no NaN keeps its limit
    f = jax.jit(call(name, x, axis, rng))
    out, vjp = jax.vjp(f, jnp.asarray(x))
    (dx,) = vjp(jnp.ones_like(out))
    row_nan_in_x = np.broadcast_to(np.expand_dims(nan_rows, axis), x.shape)
    expected_out_nan = nan_rows if out.shape == nan_rows.shape else row_nan_in_x
    np.testing.assert_array_equal(np.isnan(out), expected_out_nan)
    np.testing.assert_array_equal(np.isnan(dx), row_nan_in_x)


def test_widened_bfloat16_is_exact_for_every_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint16)
    x = jax.lax.bitcast_convert_type(jnp.asarray(bits), jnp.bfloat16)
    widened = np.asarray(jax.jit(_stable.widened, static_argnums=1)(x, jnp.float32))
    expected = np.asarray(x.astype(jnp.float32))
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened.view(np.uint32), expected.view(np.uint32))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the size rule is XLA:CPU's")
@pytest.mark.parametrize(
    "loss",
    [
        lambda x, y: jax.grad(lambda x: jnp.sum(jsoftmax.softmax_cross_entropy(x, y)))(x),
        lambda x, y: jsoftmax.softmax_cross_entropy_with_integer_labels(
            x, y[..., 0].astype(jnp.int32)
        ),
        lambda x, y: jsoftmax.logsumexp(x, axis=-1),
    ],
    ids=["soft labels, gradient", "integer labels", "logsumexp"],
)
def test_small_inputs_take_the_branch_free_inf_count_on_cpu(loss):
    """At most 4096 elements: no ``lax.cond`` (costlier per call there); above, the rare branch."""

    def has_branch(rows, classes):
        x = jax.ShapeDtypeStruct((rows, classes), jnp.float32)
        return "conditional(" in jax.jit(loss).lower(x, x).compile().as_text()

    assert not has_branch(128, 10)
    assert not has_branch(64, 64)
    assert has_branch(64, 65)
    assert has_branch(1024, 100)
