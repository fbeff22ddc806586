"""The max-shift trick, with the edge rows handled exactly.

Every public function reduces a row of logits to two numbers: its maximum ``m``
and ``log_s = log(sum(exp(x - m)))``. Together they are the row's logsumexp,
kept apart because ``x - m`` is exact in floating point while ``x - (m + log_s)``
is not when ``|m|`` is large: the split keeps probabilities and gradients
accurate at any magnitude.

Edge rows, handled without per-element branches in the hot loop (XLA fuses the
plain ``sum(exp(x - m))`` pattern best) and without a NaN in either branch of a
``where`` (so that autodiff of the backward passes stays clean):

- no unmasked entry, or all ``-inf``: ``m = -inf`` and ``log_s = -inf``;
  probabilities 0.
- a ``+inf`` entry: logits are clamped to the largest finite value, so the
  ``+inf`` entries share the probability evenly, as the limit does; the
  logsumexp itself is ``+inf``.
- a NaN anywhere unmasked: ``m = NaN`` and everything derived is NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``x`` with the masked-out entries set to ``-inf``, so they take no probability."""
    if mask is None:
        return x
    return jnp.where(mask, x, -jnp.inf)


def shift_of(m: jax.Array) -> jax.Array:
    """The per-row shift: the maximum, clamped to finite, 0 for an empty row (NaN stays)."""
    largest = jnp.finfo(m.dtype).max
    return jnp.where(m == -jnp.inf, jnp.zeros_like(m), jnp.minimum(m, largest))


def shifted(xm: jax.Array, m: jax.Array) -> jax.Array:
    """``xm - m``: exact, at most 0, and ``-inf`` wherever ``xm`` is.

    A ``+inf`` entry gives ``inf - largest = inf``, clamped to 0: the ``+inf``
    entries of a row share its probability evenly, as the limit does.
    """
    return jnp.minimum(xm - shift_of(m), 0)


def row_stats(xm: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The row maximum ``m`` and ``log_s = log(sum(exp(xm - m)))``, both with ``keepdims``."""
    m = jnp.max(xm, axis=axes, keepdims=True, initial=-jnp.inf)
    log_s = jnp.log(jnp.sum(jnp.exp(shifted(xm, m)), axis=axes, keepdims=True))
    return m, log_s


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
