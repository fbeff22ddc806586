"""The integer-label check: reported by checkify in every transform, no effect under plain jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jsoftmax
from jsoftmax._label_check import checked_labels

int_ce = jsoftmax.softmax_cross_entropy_with_integer_labels
C = 5
MESSAGE = r"labels must be class indices in \[0, 5\){}; found {} at flat position {}"


def loss(logits, labels, **kwargs):
    return jnp.sum(int_ce(logits, labels, **kwargs))


def fused_loss(x, labels, **kwargs):
    w = jnp.linspace(-1.0, 1.0, 3 * C, dtype=jnp.float32).reshape(3, C)
    return jsoftmax.linear_softmax_cross_entropy(x, w, labels, reduction="sum", **kwargs)


def problem(rng, n=6):
    logits = jnp.asarray(rng.standard_normal((n, C)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, C, n), jnp.int32)
    return logits, labels


def throws(error, value, position, allowed_too=""):
    message = MESSAGE.format(allowed_too, value, position)
    with pytest.raises(checkify.JaxRuntimeError, match=message):
        error.throw()


@pytest.mark.parametrize(
    "transform",
    [
        lambda f: f,
        jax.jit,
        lambda f: jax.grad(f),
        lambda f: jax.jit(jax.value_and_grad(f)),
        lambda f: jax.grad(lambda x, y: jax.grad(f)(x, y).sum()),  # reverse over reverse
        lambda f: jax.jit(jax.checkpoint(f)),
    ],
    ids=["eager", "jit", "grad", "jit(value_and_grad)", "grad(grad)", "checkpoint"],
)
def test_checkify_reports_the_bad_label_through_transforms(rng, transform):
    logits, labels = problem(rng)
    checked = checkify.checkify(transform(loss), errors=checkify.user_checks)
    throws(checked(logits, labels.at[4].set(C))[0], C, 4)
    throws(checked(logits, labels.at[2].set(-1).at[5].set(7))[0], -1, 2)  # the first one
    checked(logits, labels)[0].throw()  # nothing to report


def test_checkify_reports_the_bad_label_under_vmap(rng):
    logits, labels = problem(rng)
    batch_logits = jnp.stack([logits, logits, logits])
    batch_labels = jnp.stack([labels, labels.at[3].set(9), labels.at[1].set(-2)])
    checked = checkify.checkify(jax.vmap(loss), errors=checkify.all_checks)
    error, losses = checked(batch_logits, batch_labels)
    throws(error, 9, 3)  # the first mapped example with a bad label
    assert np.isfinite(losses[0]) and np.isnan(losses[1]) and np.isnan(losses[2])
    checkify.checkify(jax.vmap(loss))(batch_logits, jnp.stack([labels] * 3))[0].throw()


def test_checkify_reports_the_fused_loss_bad_label(rng):
    x = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, C, 6), jnp.int32).at[5].set(C + 3)
    error, _ = checkify.checkify(jax.jit(jax.grad(fused_loss)))(x, labels)
    message = "linear_softmax_cross_entropy: " + MESSAGE.format("", C + 3, 5)
    with pytest.raises(checkify.JaxRuntimeError, match=message):
        error.throw()


def test_other_error_sets_and_ignore_index(rng):
    logits, labels = problem(rng)
    bad = labels.at[0].set(C)
    error, _ = checkify.checkify(loss, errors=checkify.div_checks)(logits, bad)
    error.throw()  # user checks not asked for: nothing reported
    ignored = labels.at[0].set(-100)
    checked = checkify.checkify(lambda x, y: loss(x, y, ignore_index=-100))
    checked(logits, ignored)[0].throw()
    throws(checked(logits, ignored.at[1].set(-99))[0], -99, 1, " or ignore_index=-100")


@pytest.mark.parametrize("fn", [loss, fused_loss], ids=["int_ce", "fused"])
def test_no_effect_under_plain_jit(rng, fn):
    """An effect would turn off JAX's C++ fast dispatch (SPEC: a no-op without checkify)."""
    logits, labels = problem(rng)
    x = logits[:, :3]
    args = (logits, labels) if fn is loss else (x, labels)
    for f in (fn, jax.value_and_grad(fn)):
        assert jax.make_jaxpr(f)(*args).effects == set()
    hlo = jax.jit(fn).lower(*args).as_text()
    assert "jsoftmax_label_check" not in hlo and "custom_call" not in hlo


def test_labels_pass_through_unchanged(rng):
    labels = jnp.asarray(rng.integers(-3, 9, (4, 5)), jnp.int16)
    for f in (lambda y: checked_labels(y, C, None), jax.jit(lambda y: checked_labels(y, C, -1))):
        out = f(labels)
        assert out.dtype == labels.dtype and np.array_equal(out, labels)
    empty = checked_labels(jnp.zeros((0,), jnp.int32), C, None)
    assert empty.shape == (0,)
    error, _ = checkify.checkify(lambda y: checked_labels(y, C, None))(jnp.zeros((0, 2), jnp.int32))
    error.throw()
