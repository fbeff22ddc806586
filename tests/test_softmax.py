"""softmax, log_softmax and logsumexp against float64 references and closed forms."""

import contextlib
import functools
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.ad_checkpoint import print_saved_residuals
from jax.test_util import check_grads

import jsoftmax
from tests import reference as ref

FUNCTIONS = ["softmax", "log_softmax", "logsumexp"]
SHAPES_AND_AXES = [
    ((7,), -1),
    ((4, 9), -1),
    ((4, 9), 0),
    ((3, 5, 6), 1),
    ((3, 5, 6), (0, 2)),
    ((3, 5, 6), None),
    ((4, 9), ()),  # no class axis: every element is a row of one class, as in jax.nn
]
SCALES = [1e-3, 1.0, 30.0, 1e4]


def jsoftmax_function(name):
    return getattr(jsoftmax, name)


# --- values and gradients against float64 --------------------------------------


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("shape, axis", SHAPES_AND_AXES)
@pytest.mark.parametrize("scale", SCALES)
def test_value_and_gradient_match_float64_reference(name, shape, axis, scale, rng):
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    f = jsoftmax_function(name)
    out, vjp = jax.vjp(lambda x: f(x, axis=axis), jnp.asarray(x))
    g = rng.standard_normal(out.shape).astype(np.float32)
    (dx,) = vjp(jnp.asarray(g))
    assert out.dtype == jnp.float32 and dx.dtype == jnp.float32
    expected = ref.softmax_family(name, x, axis)
    assert ref.rel_err(out, expected) < 1e-5
    ref.assert_gradient_close(dx, ref.softmax_family_vjp(name, x, axis, g), g)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("mask_kind", ["per_logit", "per_row", "broadcast"])
def test_masked_value_and_gradient_match_reference(backend_forms, name, mask_kind, rng):
    x = rng.standard_normal((6, 8)).astype(np.float32) * 5
    if mask_kind == "per_logit":
        where = rng.random((6, 8)) < 0.6
        where[:, 0] = True
    elif mask_kind == "per_row":
        where = np.array([True, False, True, True, False, True])
    else:
        where = rng.random((1, 8)) < 0.6
        where[0, 0] = True
    full_mask = np.broadcast_to(where if where.ndim == 2 else where[:, None], x.shape)
    f = jsoftmax_function(name)
    out, vjp = jax.vjp(lambda x: f(x, where=where), jnp.asarray(x))
    g = rng.standard_normal(out.shape).astype(np.float32)
    (dx,) = vjp(jnp.asarray(g))
    expected = ref.softmax_family(name, x, -1, full_mask)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), finite)
    assert ref.rel_err(np.asarray(out)[finite], expected[finite]) < 1e-5
    expected_dx = ref.softmax_family_vjp(name, x, -1, g, full_mask)
    expected_dx = np.where(np.isnan(expected_dx), 0.0, expected_dx)  # fully masked rows
    ref.assert_gradient_close(dx, expected_dx, g)


def test_masked_softmax_equals_softmax_of_the_kept_entries(rng):
    x = rng.standard_normal(10).astype(np.float32)
    where = rng.random(10) < 0.5
    where[3] = True
    out = jsoftmax.softmax(x, where=where)
    np.testing.assert_allclose(out[where], ref.softmax(x[where]), rtol=1e-6)
    np.testing.assert_array_equal(out[~where], 0.0)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_check_grads_reverse_mode_to_second_order(name, rng):
    x = rng.standard_normal((3, 5))
    with jax.enable_x64(True):
        f = jsoftmax_function(name)
        check_grads(f, (jnp.asarray(x, jnp.float64),), order=2, modes=["rev"])
        mask = jnp.asarray(rng.random((3, 5)) < 0.7)
        check_grads(lambda x: f(x, where=mask), (jnp.asarray(x),), order=2, modes=["rev"])


def plain_implementation(name):
    """Textbook jnp formulas, differentiated by JAX's own autodiff."""

    def lse(x):
        m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
        return jnp.squeeze(m, -1) + jnp.log(jnp.sum(jnp.exp(x - m), axis=-1))

    return {
        "logsumexp": lse,
        "log_softmax": lambda x: x - lse(x)[..., None],
        "softmax": lambda x: jnp.exp(x - lse(x)[..., None]),
    }[name]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_gradient_matches_autodiff_of_a_plain_implementation(name, rng):
    x = rng.standard_normal((4, 7)) * 3
    with jax.enable_x64(True):
        x = jnp.asarray(x)
        weights = jnp.asarray(rng.standard_normal((4, 7) if name != "logsumexp" else (4,)))
        ours = jax.grad(lambda x: jnp.sum(weights * jsoftmax_function(name)(x)))(x)
        plain = jax.grad(lambda x: jnp.sum(weights * plain_implementation(name)(x)))(x)
        np.testing.assert_allclose(ours, plain, rtol=1e-12, atol=1e-14)


# --- transformations -------------------------------------------------------------


@pytest.mark.parametrize("name", FUNCTIONS)
def test_jit_and_vmap_agree_with_eager(name, rng):
    f = jsoftmax_function(name)
    x = jnp.asarray(rng.standard_normal((5, 3, 8)), jnp.float32)
    eager = f(x)
    np.testing.assert_allclose(jax.jit(f)(x), eager, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(f)(x), eager, rtol=1e-6)
    loss = lambda x: jnp.sum(jnp.sin(f(x)))  # noqa: E731
    per_example = jax.vmap(jax.grad(loss))(x)
    np.testing.assert_allclose(per_example, jax.grad(loss)(x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        jax.jit(jax.vmap(jax.grad(loss)))(x), per_example, rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("name", FUNCTIONS)
def test_grad_of_grad_and_hessian_match_jax_nn(name, rng):
    x = rng.standard_normal(6)
    with jax.enable_x64(True):
        x = jnp.asarray(x)
        c = jnp.asarray(rng.standard_normal(6 if name != "logsumexp" else ()))
        ours = lambda x: jnp.sum(c * jsoftmax_function(name)(x))  # noqa: E731
        theirs = lambda x: jnp.sum(c * getattr(jax.nn, name)(x))  # noqa: E731
        np.testing.assert_allclose(jax.hessian(ours)(x), jax.hessian(theirs)(x), atol=1e-12)
        second = jax.grad(lambda x: jnp.sum(jax.grad(ours)(x) ** 2))(x)
        expected = jax.grad(lambda x: jnp.sum(jax.grad(theirs)(x) ** 2))(x)
        np.testing.assert_allclose(second, expected, atol=1e-12)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_forward_mode_raises(name):
    f = jsoftmax_function(name)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (jnp.ones(3),), (jnp.ones(3),))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jacfwd(f)(jnp.ones(3))


# --- residuals ---------------------------------------------------------------------


def saved_residuals(f, *args) -> list[str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print_saved_residuals(f, *args)
    return [line for line in buffer.getvalue().splitlines() if line.strip()]


def test_softmax_saves_only_its_output():
    lines = saved_residuals(jsoftmax.softmax, jnp.ones((8, 16)))
    assert len(lines) == 1 and lines[0].startswith("f32[8,16]"), lines


def test_log_softmax_saves_only_its_output():
    lines = saved_residuals(jsoftmax.log_softmax, jnp.ones((8, 16)))
    assert len(lines) == 1 and lines[0].startswith("f32[8,16]"), lines


def test_logsumexp_saves_the_input_and_its_result():
    lines = saved_residuals(jsoftmax.logsumexp, jnp.ones((8, 16)))
    big = [line for line in lines if line.startswith("f32[8,16]")]
    assert big == ["f32[8,16] from the argument x"], lines
    assert all(line.startswith(("f32[8,16]", "f32[8,1]")) for line in lines), lines


# --- drop-in compatibility with jax.nn ----------------------------------------------


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("use_mask", [False, True])
def test_same_values_and_gradients_as_jax_nn(name, use_mask, rng):
    x = jnp.asarray(rng.standard_normal((6, 10)) * 4, jnp.float32)
    kwargs = {}
    if use_mask:
        where = rng.random((6, 10)) < 0.7
        where[:, 0] = True
        kwargs["where"] = jnp.asarray(where)
    ours, theirs = jsoftmax_function(name), getattr(jax.nn, name)
    if name == "logsumexp":
        kwargs["axis"] = -1
    np.testing.assert_allclose(ours(x, **kwargs), theirs(x, **kwargs), rtol=2e-6, atol=1e-7)
    c = jnp.asarray(rng.standard_normal(ours(x, **kwargs).shape), jnp.float32)

    def weighted(f):
        return lambda x: jnp.sum(jnp.where(jnp.isfinite(f(x, **kwargs)), c * f(x, **kwargs), 0.0))

    np.testing.assert_allclose(
        jax.grad(weighted(ours))(x), jax.grad(weighted(theirs))(x), rtol=1e-5, atol=1e-6
    )


# --- properties ---------------------------------------------------------------------

finite_rows = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
    elements=st.floats(-1e6, 1e6, width=32),
)


@settings(max_examples=60, deadline=None)
@given(x=finite_rows, data=st.data())
def test_softmax_rows_sum_to_one_over_unmasked_entries(x, data):
    where = data.draw(hnp.arrays(np.bool_, x.shape))
    out = np.asarray(jax.jit(jsoftmax.softmax)(x, where=where), np.float64)
    assert np.all(np.isfinite(out)) and np.all(out >= 0)
    np.testing.assert_array_equal(out[~where], 0.0)
    sums = out.sum(-1)
    has_entries = where.any(-1)
    np.testing.assert_allclose(sums[has_entries], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(sums[~has_entries], 0.0)


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
        elements=st.floats(-100, 100, width=32),
    ),
    shift=st.floats(-1e3, 1e3, width=32),
)
def test_softmax_is_invariant_to_a_constant_per_row(x, shift):
    shifted_x = (x + np.float32(shift)).astype(np.float32)
    out = jax.jit(jsoftmax.softmax)(shifted_x)
    # x + shift rounds; compare against the reference of the rounded input.
    np.testing.assert_allclose(out, ref.softmax(x.astype(np.float64)), atol=1e-4)
    np.testing.assert_allclose(out, ref.softmax(shifted_x), rtol=1e-5, atol=1e-7)


# --- edge cases (SPEC §3) -------------------------------------------------------------


def test_huge_logits_give_limiting_values():
    x = jnp.array([1e30, -1e30, 0.0])
    np.testing.assert_array_equal(jsoftmax.softmax(x), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(
        jsoftmax.log_softmax(x), np.array([0.0, -2e30, -1e30], np.float32)
    )
    assert jsoftmax.logsumexp(x) == np.float32(1e30)
    grad = jax.grad(jsoftmax.logsumexp)(x)
    np.testing.assert_array_equal(grad, [1.0, 0.0, 0.0])


def test_float32_max_does_not_overflow():
    big = np.finfo(np.float32).max
    x = jnp.array([big, big, -big])
    np.testing.assert_allclose(jsoftmax.softmax(x), [0.5, 0.5, 0.0])
    assert jsoftmax.logsumexp(x) == np.float32(big)  # log 2 is below half an ulp of max
    assert np.all(np.isfinite(jax.grad(jsoftmax.logsumexp)(x)))


def test_plus_inf_shares_probability_evenly(backend_forms):
    x = jnp.array([jnp.inf, 0.0, jnp.inf, -jnp.inf])
    np.testing.assert_array_equal(jsoftmax.softmax(x), [0.5, 0.0, 0.5, 0.0])
    np.testing.assert_allclose(jsoftmax.log_softmax(x)[np.array([0, 2])], -np.log(2.0), rtol=1e-6)
    assert jsoftmax.logsumexp(x) == np.inf
    np.testing.assert_array_equal(jax.grad(jsoftmax.logsumexp)(x), [0.5, 0.0, 0.5, 0.0])


@pytest.mark.parametrize("case", ["all_minus_inf", "fully_masked"])
def test_empty_row_gives_zero_minus_inf_and_zero_gradient(backend_forms, case):
    x = jnp.array([[-jnp.inf, -jnp.inf, -jnp.inf], [1.0, 2.0, 3.0]])
    where = None
    if case == "fully_masked":
        x = jnp.array([[5.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
        where = jnp.array([[False, False, False], [True, True, True]])
    np.testing.assert_array_equal(jsoftmax.softmax(x, where=where)[0], 0.0)
    np.testing.assert_array_equal(jsoftmax.log_softmax(x, where=where)[0], -np.inf)
    assert jsoftmax.logsumexp(x, where=where)[0] == -np.inf
    for name in FUNCTIONS:
        f = jsoftmax_function(name)
        grad = jax.grad(
            lambda x, f=f: jnp.sum(jnp.where(jnp.isinf(f(x, where=where)), 0, f(x, where=where)))
        )(x)
        np.testing.assert_array_equal(grad[0], 0.0)
        assert np.all(np.isfinite(grad))
        grad = jax.grad(lambda x, f=f: f(x, where=where)[0].sum())(x)
        np.testing.assert_array_equal(grad, 0.0)


def test_minus_inf_entry_takes_no_probability_and_keeps_gradients_finite():
    x = jnp.array([-jnp.inf, 0.0, 1.0])
    p = jsoftmax.softmax(x)
    assert p[0] == 0.0
    np.testing.assert_allclose(p[1:], ref.softmax([0.0, 1.0]), rtol=1e-6)
    grad = jax.grad(lambda x: jsoftmax.log_softmax(x)[2])(x)
    np.testing.assert_allclose(grad, [0.0, -p[1], 1 - p[2]], rtol=1e-6)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_nan_makes_its_row_nan_and_only_its_row(backend_forms, name):
    x = jnp.array([[1.0, jnp.nan, 2.0], [1.0, 2.0, 3.0]])
    out = jsoftmax_function(name)(x)
    assert np.all(np.isnan(out[0]))
    assert not np.any(np.isnan(out[1]))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_nan_makes_its_row_gradient_nan_and_only_its_row(backend_forms, name):
    x = jnp.array([[1.0, jnp.nan, 2.0], [jnp.nan] * 3, [1.0, 2.0, 3.0]])
    cotangent = jnp.array([[0.5, -1.0, 2.0]] * 3)
    grad = jax.grad(lambda x: jnp.sum(jsoftmax_function(name)(x) * cotangent))(x)
    assert np.all(np.isnan(grad[:2]))
    assert np.all(np.isfinite(grad[2]))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_nan_row_gradient_stays_nan_under_jit_with_one_class(backend_forms, name):
    """With one class the empty-row factor is elementwise, where XLA rewrites
    ``dx * float(a > b)`` into a select that would turn the NaN into 0."""
    x = jnp.array([[1.0], [jnp.nan], [-jnp.inf]])
    cotangent = jnp.array([0.5, -1.0, 2.0])
    if name != "logsumexp":
        cotangent = cotangent[:, None]
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jsoftmax_function(name)(x) * cotangent)))(x)
    assert np.isnan(grad[1, 0])
    # One class: softmax is 1, log_softmax 0 (constant), logsumexp x itself.
    np.testing.assert_array_equal(grad[0], [0.5 if name == "logsumexp" else 0.0])
    np.testing.assert_array_equal(grad[2], [0.0])


@pytest.mark.parametrize("shape", [(4, 3), (3,), (2, 2, 3)])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_nan_row_gradient_stays_nan_under_jit(backend_forms, name, shape):
    x = jnp.arange(math.prod(shape), dtype=jnp.float32).reshape(shape) / 3
    x = x.at[..., 1].set(jnp.nan)
    out_shape = shape[:-1] if name == "logsumexp" else shape
    cotangent = jnp.linspace(-1.0, 2.0, math.prod(out_shape)).reshape(out_shape)
    gradient_of = jax.jit(jax.grad(lambda x: jnp.sum(jsoftmax_function(name)(x) * cotangent)))
    grad = gradient_of(x)
    assert np.all(np.isnan(grad))
    # An empty row next to the NaN ones still gets an exact 0.
    if len(shape) > 1:
        grad = gradient_of(x.at[0].set(-jnp.inf))
        np.testing.assert_array_equal(grad[0], 0.0)
        assert np.all(np.isnan(grad[1:]))


def test_masked_nan_is_ignored():
    x = jnp.array([1.0, jnp.nan, 2.0])
    where = jnp.array([True, False, True])
    expected = np.concatenate([ref.softmax([1.0, 2.0])[:1], [0.0], ref.softmax([1.0, 2.0])[1:]])
    np.testing.assert_allclose(jsoftmax.softmax(x, where=where), expected, rtol=1e-6)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0)])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_empty_arrays(name, shape):
    x = jnp.zeros(shape)
    out = jsoftmax_function(name)(x)
    expected_shape = shape[:-1] if name == "logsumexp" else shape
    assert out.shape == expected_shape
    if name == "logsumexp":
        np.testing.assert_array_equal(out, -np.inf)
    grad = jax.grad(lambda x: jnp.sum(jnp.where(jnp.isinf(out), 0.0, jsoftmax_function(name)(x))))(
        x
    )
    assert grad.shape == shape


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_16_bit_inputs_are_computed_in_float32(name, dtype, rng):
    x16 = jnp.asarray(rng.standard_normal((4, 50)) * 20, dtype)
    out = jsoftmax_function(name)(x16)
    assert out.dtype == dtype
    exact = ref.softmax_family(name, np.asarray(x16.astype(jnp.float32)), -1)
    # One rounding to the 16-bit format at the end, nothing worse.
    eps = float(jnp.finfo(dtype).eps)
    assert ref.rel_err(np.asarray(out.astype(jnp.float32)), exact) < eps
    grad = jax.grad(lambda x: jnp.sum(jsoftmax_function(name)(x).astype(jnp.float32)))(x16)
    assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_huge_logits_do_not_overflow(dtype):
    big = float(jnp.finfo(dtype).max)
    x = jnp.array([big, 0.0, -big], dtype)
    np.testing.assert_array_equal(jsoftmax.softmax(x).astype(jnp.float32), [1.0, 0.0, 0.0])
    assert np.isfinite(float(jsoftmax.logsumexp(x)))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_float64_under_x64(name, rng):
    x = rng.standard_normal((3, 7)) * 100
    with jax.enable_x64(True):
        out = jsoftmax_function(name)(jnp.asarray(x))
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, ref.softmax_family(name, x, -1), rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e2, 1e4, 1e6])
def test_gradients_stay_accurate_at_large_magnitudes(scale, rng):
    """The row max and log-sum are saved apart, so the gradient never rounds lse."""
    x = (rng.standard_normal((4, 6)) * 3 + scale).astype(np.float32)
    dx = jax.grad(lambda x: jnp.sum(jsoftmax.logsumexp(x)))(jnp.asarray(x))
    assert ref.rel_err(dx, ref.softmax(x)) < 1e-6


def test_no_class_axis_makes_each_element_a_row_of_one_class():
    """``axis=()`` as in jax.nn, with the limits of one-class rows instead of its NaNs."""
    x = jnp.array([[1.5, -jnp.inf, jnp.inf], [-3e38, 3e38, jnp.nan]])
    where = jnp.array([[True, True, False], [True, False, True]])
    nan = np.nan
    expected = {
        "softmax": [[1, 0, 1], [1, 1, nan]],
        "log_softmax": [[0, -np.inf, 0], [0, 0, nan]],
        "logsumexp": [[1.5, -np.inf, np.inf], [-3e38, 3e38, nan]],
    }
    masked = {
        "softmax": [[1, 0, 0], [1, 0, nan]],
        "log_softmax": [[0, -np.inf, -np.inf], [0, -np.inf, nan]],
        "logsumexp": [[1.5, -np.inf, -np.inf], [-3e38, -np.inf, nan]],
    }
    for name in FUNCTIONS:
        f = jsoftmax_function(name)
        want = np.float32(expected[name])
        np.testing.assert_array_equal(f(x, axis=()), want)
        np.testing.assert_array_equal(jax.jit(f, static_argnums=1)(x, ()), want)
        np.testing.assert_array_equal(jax.vmap(lambda r, f=f: f(r, axis=()))(x), want)
        np.testing.assert_array_equal(f(x, axis=(), where=where), np.float32(masked[name]))
        # Each output depends on its own element only: the Jacobian is diagonal.
        grad = jax.grad(lambda x, f=f: jnp.sum(f(x, axis=())))(x)
        diagonal = np.where(np.isnan(x), nan, 1.0 if name == "logsumexp" else 0.0)
        diagonal[0, 1] = 0.0  # a row that is all -inf has no gradient
        np.testing.assert_array_equal(grad, diagonal)
    assert jsoftmax.logsumexp(x, axis=(), keepdims=True).shape == (2, 3)


# --- bad input (SPEC §4) -------------------------------------------------------------


@pytest.mark.parametrize("name", FUNCTIONS)
def test_integer_input_is_a_type_error(name):
    with pytest.raises(TypeError, match=r"x must be a floating-point array, got dtype int32"):
        jsoftmax_function(name)(jnp.arange(3))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_bad_axis_is_named(name):
    with pytest.raises(ValueError, match=r"axis=2 is out of range for an array of rank 2"):
        jsoftmax_function(name)(jnp.ones((2, 3)), axis=2)
    with pytest.raises(ValueError, match=r"axis=\(1, -1\) repeats an axis"):
        jsoftmax_function(name)(jnp.ones((2, 3)), axis=(1, -1))
    with pytest.raises(TypeError, match=r"axis must be an int or a tuple of ints"):
        jsoftmax_function(name)(jnp.ones((2, 3)), axis=1.0)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_mask_that_fits_nothing_is_named(name):
    with pytest.raises(ValueError, match=r"where has shape \(4,\), which fits neither"):
        jsoftmax_function(name)(jnp.ones((2, 3)), where=jnp.ones(4, bool))
    with pytest.raises(TypeError, match=r"where must be a boolean mask, got dtype float32"):
        jsoftmax_function(name)(jnp.ones((2, 3)), where=jnp.ones((2, 3)))


def test_logsumexp_keepdims_and_tuple_axes(rng):
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    out = jsoftmax.logsumexp(x, axis=(0, 2), keepdims=True)
    assert out.shape == (1, 3, 1)
    np.testing.assert_allclose(out[0, :, 0], ref.logsumexp(x, axis=(0, 2)), rtol=1e-6)


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_edge_rows_under_vmap_match_the_unbatched_call(backend_forms, name):
    """Empty, single-entry and +inf rows take the rare exact branch; vmap keeps it rare."""
    fn = getattr(jsoftmax, name)
    inf = np.inf
    rows = np.array(
        [[-inf, -inf, -inf], [inf, 0.0, inf], [1.0, 2.0, 3.0], [3e38, -inf, 1.0]], np.float32
    )
    whole = fn(rows)
    per_row = jax.vmap(fn)(rows)
    np.testing.assert_array_equal(per_row, whole)
    expected = {
        "softmax": [
            [0, 0, 0],
            [0.5, 0, 0.5],
            np.exp([-2, -1, 0]) / np.exp([-2, -1, 0]).sum(),
            [1, 0, 0],
        ],
        "log_softmax": None,
        "logsumexp": [-inf, inf, np.log(np.exp([1.0, 2.0, 3.0]).sum()), 3e38],
    }[name]
    if expected is not None:
        np.testing.assert_allclose(whole, np.array(expected, np.float64), rtol=1e-6)
    single = fn(np.array([[-inf], [2.0]], np.float32))
    assert not np.any(np.isnan(single))


# --- the 16-bit value behind a branch on XLA:CPU ---------------------------------

# 2**20 elements of rows of 512: large enough for the branching form on XLA:CPU.
BRANCHING_SHAPE = (2048, 512)


def _edge_rows(dtype, rng, plus_inf: bool):
    """Random 16-bit logits whose first rows are the edge cases (``+inf`` ones or not)."""
    x = rng.standard_normal(BRANCHING_SHAPE) * 3
    inf, nan, largest = np.inf, np.nan, float(jnp.finfo(dtype).max)
    x[0] = -inf  # empty
    x[1, [3, 100]] = inf  # two +inf share the probability
    x[2, 7] = nan
    x[3, [0, 1]] = [nan, inf]  # NaN beside +inf stays NaN
    x[4, [5, 6]] = [largest, inf]  # the largest finite value takes no share of +inf's
    x[5, :] = -largest
    x[6, 9] = largest  # a huge logit beside ordinary ones
    x[7, 10] = -inf
    if not plus_inf:  # every row takes the plain form
        x[x == inf] = 1.0
    return x.astype(dtype)


def _branches_on_cpu(fn, *args) -> bool:
    return "conditional(" in jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the branch is XLA:CPU's")
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("batched", [False, True], ids=["jit", "vmap"])
@pytest.mark.parametrize("plus_inf", [True, False], ids=["clamped", "plain"])
def test_16_bit_values_behind_the_branch_take_their_limits(name, dtype, batched, plus_inf, rng):
    """The branching form (16-bit, value only, large inputs of short rows) at the edge rows.

    With a ``+inf`` somewhere the clamped branch runs, otherwise the plain one.
    """
    x = _edge_rows(dtype, rng, plus_inf)
    fn = jsoftmax_function(name)
    if batched:  # two copies of the input, vmapped: still one branch, and the same values
        xs = np.stack([x, x[::-1]])
        assert _branches_on_cpu(jax.vmap(fn), xs)
        out = np.asarray(jax.jit(jax.vmap(fn))(xs), np.float64)
        np.testing.assert_array_equal(out[1], out[0][::-1])
        out = out[0]
    else:
        assert _branches_on_cpu(fn, x)
        out = np.asarray(jax.jit(fn)(x), np.float64)
    limits = ref.row_limits(x, np.ones(x.shape, bool))
    expected = limits.probabilities if name == "softmax" else limits.log_probabilities
    if name == "log_softmax":
        # as documented: a finite entry beside +inf gets x - (largest float32), not -inf
        beside_inf = ((limits.num_infinite > 0) & ~limits.has_nan)[:, None]
        with np.errstate(over="ignore"):  # float16's -inf
            shifted = (ref.to64(x) - float(np.finfo(np.float32).max)).astype(dtype)
        expected = np.where(beside_inf & np.isfinite(ref.to64(x)), shifted, expected)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(out), np.isinf(expected))
    ok = np.isfinite(expected)
    rtol = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-10  # an ulp of the output
    atol = float(jnp.finfo(dtype).smallest_subnormal)  # float16's tiny probabilities
    np.testing.assert_allclose(out[ok], expected[ok], rtol=rtol, atol=atol)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the branch is XLA:CPU's")
def test_only_large_16_bit_values_of_short_rows_branch():
    def shaped(shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype)

    for fn in (jsoftmax.softmax, jsoftmax.log_softmax):
        assert _branches_on_cpu(fn, shaped((2048, 512)))
        assert _branches_on_cpu(fn, shaped((512, 2048), jnp.float16))
        assert not _branches_on_cpu(fn, shaped((2048, 512), jnp.float32))  # clamp costs ~3%
        assert not _branches_on_cpu(fn, shaped((1024, 512)))  # per call, the branch costs more
        assert not _branches_on_cpu(fn, shaped((256, 4096)))  # rows too long for one loop
        masked = functools.partial(fn, where=jnp.ones((2048, 512), bool))
        assert not _branches_on_cpu(masked, shaped((2048, 512)))  # both passes would read it
        gradient = jax.grad(lambda x, fn=fn: jnp.sum(fn(x).astype(jnp.float32)))
        assert not _branches_on_cpu(gradient, shaped((2048, 512)))
