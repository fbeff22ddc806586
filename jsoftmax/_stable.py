"""The max-shift trick, with the edge rows handled exactly.

Every public function reduces a row of logits to two numbers: its maximum ``m``
and ``log_s = log(sum(exp(x - m)))``. Together they are the row's logsumexp,
kept apart because ``x - m`` is exact in floating point while ``x - (m + log_s)``
is not when ``|m|`` is large: the split keeps probabilities and gradients
accurate at any magnitude.

Speed on XLA depends on the hot loop being the plain pattern
``max -> x - m -> exp -> sum`` with nothing between the reductions: any
per-row or per-element guard there makes XLA:CPU split the fusion or
materialise a logits-sized array (measured 10-20% slower, up to 4x). So the
edge rows are handled by the choice of constants and, for the rare ``+inf``,
by a branch that runs only when some row has one:

- no unmasked entry, or all ``-inf``: the maximum starts from the most
  negative finite float instead of ``-inf``, so ``x - m`` stays ``-inf``,
  ``s = 0`` and ``log_s = -inf``; probabilities 0.
- a ``+inf`` entry: ``m = +inf`` and ``s`` is the number of ``+inf`` entries,
  which share the probability evenly, as the limit does; the logsumexp is
  ``+inf``.
- a NaN anywhere unmasked: ``m = NaN`` and everything derived is NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap


def masked(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``x`` with the masked-out entries set to ``-inf``, so they take no probability."""
    if mask is None:
        return x
    return jnp.where(mask, x, -jnp.inf)


def _largest(dtype) -> float:
    return float(jnp.finfo(dtype).max)


def row_max(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """The row maximum, at least the most negative finite value (keepdims).

    The floor is the reduction's start value, so it costs nothing in the hot
    loop; ``jnp.max(initial=...)`` would add a clamp between the reductions
    instead. XLA drops the start value of a reduction over one element, so
    there (and for no element) the floor is applied explicitly.
    """
    floor = -_largest(x.dtype)
    m = jnp.expand_dims(lax.reduce(x, np.array(floor, x.dtype), lax.max, axes), axes)
    if math.prod(x.shape[a] for a in axes) <= 1:
        m = jnp.maximum(m, floor)
    return m


def _sum_exp(x: jax.Array, m: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``sum(exp(x - m))``; for rows with ``m = +inf``, the number of ``+inf`` entries."""
    s = jnp.sum(jnp.exp(x - m), axis=axes, keepdims=True)

    def count_infinite(x, m, s):
        # 1 for +inf, else 0; written with exp, which XLA:CPU fuses into the
        # sum, where a compare-and-sum would materialise a logits-sized array.
        is_inf = 1 - jnp.exp(jnp.minimum(_largest(x.dtype) - x, 0))
        count = jnp.sum(is_inf, axis=axes, keepdims=True)
        return jnp.where(m == jnp.inf, count, s)

    return lax.cond(jnp.any(m == jnp.inf), count_infinite, lambda x, m, s: s, x, m, s)


def _max_and_sum(axes: tuple[int, ...], x: jax.Array) -> tuple[jax.Array, jax.Array]:
    m = row_max(x, axes)
    return m, _sum_exp(x, m, axes)


def _one_call_under_vmap(fn, axes: tuple[int, ...], *arrays: jax.Array):
    """``fn(axes, *arrays)``, a row-wise function, kept one call under ``vmap``.

    A vmapped ``lax.cond`` with a batched predicate runs both branches; the
    rows are independent, so the batched call is the same function with the
    batch axis as one more row axis (unbatched arrays broadcast to it), and
    its rare branch stays rare. The arrays share one shape.
    """

    @custom_vmap
    def call(*arrays):
        return fn(axes, *arrays)

    @call.def_vmap
    def _rule(axis_size, in_batched, *arrays):
        if not any(in_batched):
            out = fn(axes, *arrays)
            return out, jax.tree.map(lambda _: False, out)
        arrays = [
            a if is_batched else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, is_batched in zip(arrays, in_batched, strict=True)
        ]
        out = _one_call_under_vmap(fn, tuple(a + 1 for a in axes), *arrays)
        return out, jax.tree.map(lambda _: True, out)

    return call(*arrays)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _differentiable_max_and_sum(x: jax.Array, axes: tuple[int, ...]):
    return _one_call_under_vmap(_max_and_sum, axes, x)


@_differentiable_max_and_sum.defjvp
def _max_and_sum_jvp(axes, primals, tangents):
    """The tangents of ``m`` (as ``jnp.max``'s) and of ``s``, for second derivatives.

    ``custom_vmap`` has no autodiff of its own; this rule gives the
    statistics one. Rows with a ``+inf`` have constant statistics.
    """
    (x,), (dx,) = primals, tangents
    m, s = _differentiable_max_and_sum(x, axes)
    dm = jax.jvp(lambda x: jnp.max(x, axis=axes, keepdims=True), (x,), (dx,))[1]
    has_inf = m == jnp.inf
    finite_m = jnp.where(has_inf, jnp.zeros_like(m), m)
    finite_x = jnp.where(has_inf, jnp.zeros_like(x), x)
    weights = jnp.where(has_inf, jnp.zeros_like(x), jnp.exp(finite_x - finite_m))
    ds = jnp.sum(weights * (dx - dm), axis=axes, keepdims=True)
    return (m, s), (jnp.where(has_inf, jnp.zeros_like(dm), dm), ds)


def row_stats(xm: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The row maximum ``m`` and ``log_s = log(sum(exp(xm - m)))``, both with ``keepdims``.

    ``m`` is at least the most negative finite value (so an empty row has a
    finite ``m`` and ``log_s = -inf``), ``+inf`` for a row with a ``+inf``.
    """
    m, s = _differentiable_max_and_sum(xm, axes)
    return m, jnp.log(s)


def softmax_of(xm: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """softmax of masked logits in one pass: max, sum and output fuse into one loop.

    Clamping ``+inf`` to the largest finite value before the maximum makes the
    ``+inf`` entries share the probability evenly with no branch; the divisor
    ``max(s, 1)`` is ``s`` in every row with an entry (its maximum contributes
    1) and 1 in an empty row, whose entries are all 0.
    """
    clamped = jnp.minimum(xm, _largest(xm.dtype))
    exps = jnp.exp(clamped - row_max(clamped, axes))
    return exps / jnp.maximum(jnp.sum(exps, axis=axes, keepdims=True), 1)


def log_softmax_of(xm: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """log_softmax of masked logits in one pass, the edge rows as in ``softmax_of``."""
    clamped = jnp.minimum(xm, _largest(xm.dtype))
    shifted_logits = clamped - row_max(clamped, axes)
    s = jnp.sum(jnp.exp(shifted_logits), axis=axes, keepdims=True)
    return shifted_logits - jnp.log(jnp.maximum(s, 1))


def shift_of(m: jax.Array) -> jax.Array:
    """The per-row shift: the maximum, with ``+inf`` clamped to the largest finite value."""
    return jnp.minimum(m, _largest(m.dtype))


def shifted(xm: jax.Array, m: jax.Array) -> jax.Array:
    """``xm - m``: exact, at most 0, and ``-inf`` wherever ``xm`` is.

    In a row with ``+inf`` entries they give ``inf - largest = inf``, clamped
    to 0, and the finite entries ``-inf`` in effect (``x - largest``).
    """
    return jnp.minimum(xm - shift_of(m), 0)


def nonempty(log_s: jax.Array) -> jax.Array:
    """True for rows with some probability to share (False for empty, all ``-inf`` or masked)."""
    return log_s != -jnp.inf


def safe_log_s(log_s: jax.Array) -> jax.Array:
    """``log_s`` with the empty rows' ``-inf`` replaced by 0 (``shifted - log_s`` stays -inf)."""
    return jnp.where(nonempty(log_s), log_s, jnp.zeros_like(log_s))


def logsumexp_from_stats(m: jax.Array, log_s: jax.Array) -> jax.Array:
    """``m + log_s``: ``-inf`` for an empty row, ``+inf`` for a row with a ``+inf`` entry."""
    total = shift_of(m) + log_s
    return jnp.where(m == jnp.inf, jnp.full_like(total, jnp.inf), total)


def probabilities(
    x: jax.Array, mask: jax.Array | None, m: jax.Array, log_s: jax.Array
) -> jax.Array:
    """softmax from the row statistics: exact to a few ulps, 0 in empty rows and masked entries.

    Backward passes call this on the saved input. It is written as ``x + (-m)``
    and masks last on purpose: were it the forward's ``x - m`` again, XLA would
    merge the two and keep a logits-sized array alive between the passes.
    """
    return masked_to_zero(jnp.exp(shifted_again(x, m) - safe_log_s(log_s)), mask)


def shifted_again(x: jax.Array, m: jax.Array) -> jax.Array:
    """``shifted(x, m)`` for backward passes, unmasked, written so XLA keeps it apart."""
    return jnp.minimum(x + (-shift_of(m)), 0)


def masked_to_zero(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return values
    return jnp.where(mask, values, jnp.zeros_like(values))


def rows_with_fallback(fast, exact, axes: tuple[int, ...], *arrays: jax.Array) -> jax.Array:
    """``fast(axes, *arrays)``, a per-row result, with its NaN rows redone by ``exact``.

    For formulas XLA fuses into one loop only without guards: ``fast`` may
    give NaN on the edge rows (empty, ``+inf``, ``0 * -inf``), and ``exact``,
    which handles them, runs only when some row needs it. Like the statistics
    above it stays one call under ``vmap``, and its derivatives are those of
    ``exact``.
    """

    def pick(axes, *arrays):
        out = fast(axes, *arrays)

        def redo(arrays, out):
            return jnp.where(jnp.isnan(out), exact(axes, *arrays), out)

        return lax.cond(jnp.any(jnp.isnan(out)), redo, lambda arrays, out: out, arrays, out)

    @jax.custom_jvp
    def differentiable(*arrays):
        return _one_call_under_vmap(pick, axes, *arrays)

    @differentiable.defjvp
    def _jvp(primals, tangents):
        exact_tangent = jax.jvp(lambda *a: exact(axes, *a), primals, tangents)[1]
        return differentiable(*primals), exact_tangent

    return differentiable(*arrays)
