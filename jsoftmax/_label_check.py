"""The check on integer labels: reported by ``checkify``, free under plain ``jit``.

SPEC §4 asks for a check that ``checkify.checkify(f, errors=checkify.all_checks)``
reports, and that costs nothing without ``checkify``. ``checkify.debug_check``
does the first but not the second: it puts an ``ErrorEffect`` in every jaxpr
that holds it, and a jitted function with an effect loses JAX's C++ fast
dispatch path and its results wait on an effect token. Measured on a loss of
128 x 10 logits on XLA:CPU, that is 60 us a call (the unchecked call takes
15 us), 0.1-0.3 ms on an H100, and it reaches every jitted training step that
holds the loss.

So the check is a primitive of its own, with no effect. It passes the labels
through unchanged (the loss depends on its output, so no dead-code
elimination removes it from a jaxpr that ``checkify`` will see), lowers to
nothing, and has a ``checkify`` rule that raises the same ``FailedCheckError``
as ``debug_check`` would, in ``checkify.user_checks``. The rule is registered
through ``jax._src.checkify``; if a JAX version lacks the names it needs, the
check falls back to ``checkify.debug_check``. Since jax 0.11 checkify passes its
rules a context first (``rule(ctx, error, enabled_errors, *operands)``, and
``assert_func(ctx, ...)``); the rule takes either form, read off
``assert_func``'s signature.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import checkify
from jax.interpreters import ad, batching, mlir

try:
    from jax._src import checkify as _checkify_internals
    from jax.extend.core import Primitive

    _FailedCheckError = _checkify_internals.FailedCheckError
    _assert_func = _checkify_internals.assert_func
    _get_traceback = _checkify_internals.get_traceback
    _error_checks = _checkify_internals.error_checks
    # jax >= 0.11: assert_func(ctx, error, pred, new_error), rules get ctx first.
    _TAKES_CONTEXT = len(inspect.signature(_assert_func).parameters) == 4
except (ImportError, AttributeError):  # pragma: no cover - depends on the JAX version
    _label_check_p = None
else:
    _label_check_p = Primitive("jsoftmax_label_check")


def checked_labels(
    labels: jax.Array, num_classes: int, ignore_index: int | None, caller: str = ""
) -> jax.Array:
    """``labels``, carrying a check that names the first one outside ``[0, C)``.

    Use the returned array: the check lives on it. ``ignore_index`` is allowed.
    ``checkify.checkify(f, errors=checkify.all_checks)`` (or ``user_checks``)
    reports the label and its flat position; without ``checkify`` the check
    compiles to nothing and adds no effect.
    """
    in_range = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
        in_range = in_range | (labels == ignore_index)
    flat = in_range.reshape(-1)
    if flat.size:
        first_bad = jnp.argmin(flat).astype(jnp.int32)
        # A masked sum, not labels[first_bad]: a dynamic index into a split axis
        # does not type-check under explicit sharding.
        at_first_bad = lax.iota(jnp.int32, flat.size) == first_bad
        value = jnp.sum(jnp.where(at_first_bad, labels.reshape(-1), jnp.zeros((), labels.dtype)))
    else:
        first_bad, value = jnp.zeros((), jnp.int32), jnp.zeros((), labels.dtype)
    allowed = f"[0, {num_classes})" + (
        "" if ignore_index is None else f" or ignore_index={ignore_index}"
    )
    message = f"{caller}labels must be class indices in {allowed}; found {{}} at flat position {{}}"
    all_in_range = jnp.all(flat)
    if _label_check_p is None:  # pragma: no cover - depends on the JAX version
        checkify.debug_check(all_in_range, message, value, first_bad)
        return labels
    return _label_check_p.bind(labels, all_in_range, value, first_bad, message=message)


def _passthrough(labels, ok, value, position, *, message):
    """The labels (or their abstract value): the check itself changes nothing."""
    del ok, value, position, message
    return labels


def _lowering(ctx, labels, ok, value, position, *, message):
    del ctx, ok, value, position, message
    return [labels]


def _jvp(primals, tangents, *, message):
    # The labels are integers: their tangent (a float0 zero) passes through as it is.
    return _label_check_p.bind(*primals, message=message), tangents[0]


def _batch(args, dims, *, message):
    """Under ``vmap`` the check keeps the first mapped example that has a bad label."""
    labels, *check = args
    size = next(arg.shape[dim] for arg, dim in zip(args, dims, strict=True) if dim is not None)
    ok, value, position = (
        batching.bdim_at_front(arg, dim, size) for arg, dim in zip(check, dims[1:], strict=True)
    )
    first = jnp.argmin(ok)
    out = _label_check_p.bind(labels, jnp.all(ok), value[first], position[first], message=message)
    return out, dims[0]


def _checkify_rule(*args, message):
    """``(error, labels)``; ``args`` are ``[ctx,] error, enabled_errors, *operands``."""
    context = args[:1] if _TAKES_CONTEXT else ()
    error, enabled_errors, labels, ok, value, position = args[len(context) :]
    if _FailedCheckError in enabled_errors:
        failure = _FailedCheckError(_get_traceback(), message, value, position)
        error = _assert_func(*context, error, jnp.logical_not(ok), failure)
    return error, labels


if _label_check_p is not None:
    _label_check_p.def_impl(_passthrough)
    _label_check_p.def_abstract_eval(_passthrough)
    mlir.register_lowering(_label_check_p, _lowering)
    ad.primitive_jvps[_label_check_p] = _jvp
    batching.primitive_batchers[_label_check_p] = _batch
    _error_checks[_label_check_p] = _checkify_rule
