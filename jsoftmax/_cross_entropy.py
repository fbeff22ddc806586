"""Softmax cross-entropy with soft or integer labels and closed-form gradients.

Both losses share one formula. With class weights ``w``, label smoothing ``e``
over the ``K`` classes that take part (all of them unless a per-logit mask
removes some) and the smoothed labels ``y' = (1 - e) y + e / K``, the loss of
one example is

    sum_c w_c y'_c (lse - z_c)  +  z_loss * lse**2,

which is PyTorch's ``F.cross_entropy`` plus PaLM's z-loss, and its gradient
with respect to the logits is the closed form

    softmax(z) * (sum_c w_c y'_c + 2 z_loss lse)  -  w * y'.

``lse - z_c`` is computed as ``log_s - (z_c - m)`` from the row statistics of
``_stable``: both parts are exact, and every term is non-negative, so nothing
cancels at large magnitudes. It is taken in halves, ``log_s / 2 - (z_c / 2 -
m / 2)``, and the loss doubled once the weights are in: logits more than the
largest float apart then overflow only where the loss itself does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _stable
from jsoftmax._label_check import checked_labels
from jsoftmax._validation import (
    Axis,
    as_float_array,
    as_int_array,
    check_ignore_index,
    check_label_smoothing,
    check_reduction,
    check_z_loss,
    class_count,
    compute_dtype,
    explicit_sharding,
    known_sizes,
    laid_out_like,
    mean_of_nothing,
    normalize_axes,
    reduce_losses,
    reduced_shape,
    split_along,
    split_mask,
)

__all__ = ["softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels"]


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static part of a call: hashable, so it can be a ``nondiff_argnum``."""

    axes: tuple[int, ...]
    label_smoothing: float
    z_loss: float
    ignore_index: int | None = None


# --- pieces shared by both losses ----------------------------------------------


def _flat_class_index(shape: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
    """Each logit's flat class index (row-major over ``axes`` in the given order).

    The result has size 1 on the non-class axes, so it broadcasts against the logits.
    """
    index_shape = tuple(size if i in axes else 1 for i, size in enumerate(shape))
    index = jnp.zeros(index_shape, jnp.int32)
    stride = 1
    for a in reversed(axes):
        index = index + lax.broadcasted_iota(jnp.int32, index_shape, a) * stride
        stride *= shape[a]
    return index


def _prepare_weights(
    class_weights: ArrayLike | None, shape: tuple[int, ...], axes: tuple[int, ...]
) -> jax.Array | None:
    """The flat ``[C]`` class weights, checked; treated as constants (no gradient)."""
    if class_weights is None:
        return None
    weights = as_float_array("class_weights", class_weights)
    num_classes = class_count(shape, axes)
    if weights.shape != (num_classes,):
        raise ValueError(
            f"class_weights must have shape ({num_classes},), one weight per class of the "
            f"logits {shape} along axis {axes}, got shape {weights.shape}"
        )
    return lax.stop_gradient(weights)


def _per_class(weights: jax.Array | None, like: jax.Array, axes, dtype) -> jax.Array | None:
    """The class weights laid along the class axes of ``like`` (broadcastable to it)."""
    if weights is None:
        return None
    weights = weights.astype(dtype)
    if list(axes) == sorted(axes):
        # The classes in their own order: a reshape (a gather would be a kernel of its own).
        laid = weights.reshape(tuple(n if i in axes else 1 for i, n in enumerate(like.shape)))
    else:
        laid = weights[_flat_class_index(like.shape, axes)]
    return laid_out_like(like, laid)


def _is_label(like: jax.Array, label_index: jax.Array, axes) -> jax.Array:
    """True at each example's label, as a mask of ``like``'s shape (and layout)."""
    return laid_out_like(like, _flat_class_index(like.shape, axes)) == label_index


def _num_taking_part(logit_mask, shape, axes, dtype) -> jax.Array | float:
    """``K``, the classes smoothing spreads over: all, or the unmasked ones per row."""
    if logit_mask is None:
        num_classes = class_count(shape, axes)
        if not known_sizes(num_classes):
            return jnp.asarray(num_classes, dtype)  # symbolic (jax.export): at least 1
        return float(max(num_classes, 1))  # no classes: nothing to spread
    # max(., 1): a fully masked row has nothing to spread over (and no gradient).
    return jnp.maximum(jnp.sum(logit_mask, axis=axes, keepdims=True), 1).astype(dtype)


def _weighted_sum(coefficient, values, axes) -> jax.Array:
    """``sum(coefficient * values)`` where a 0 coefficient ignores an infinite value."""
    products = jnp.where(coefficient == 0, jnp.zeros_like(values), coefficient * values)
    return jnp.sum(products, axis=axes, keepdims=True)


def _weights_of(weights: jax.Array, labels: jax.Array) -> jax.Array:
    """``weights[labels]``, labels clipped into range; 0 when there are no classes."""
    if weights.shape[0] == 0:
        return jnp.zeros(labels.shape, weights.dtype)
    index = jnp.clip(labels, 0, weights.shape[0] - 1)
    return weights.at[index].get(out_sharding=explicit_sharding(index))


def _example_is_active(log_s, example_mask, ignored=None) -> jax.Array:
    """Examples that contribute: unmasked, with some probability, not ignored."""
    active = _stable.nonempty(log_s)
    if example_mask is not None:
        active = active & example_mask
    if ignored is not None:
        active = active & ~ignored
    return active


def _finish(loss, active, invalid, axes):
    """Zeroes inactive examples, NaNs invalid ones, drops the class axes."""
    loss = jnp.where(active, loss, jnp.zeros_like(loss))
    if invalid is not None:
        loss = jnp.where(invalid, jnp.full_like(loss, jnp.nan), loss)
    return jnp.squeeze(loss, axis=axes)


def _finite_logsumexp(m, log_s):
    """The logsumexp, with empty rows' ``-inf`` replaced by 0 (their gradient is 0 anyway)."""
    lse = _stable.logsumexp_from_stats(m, log_s)
    return jnp.where(_stable.nonempty(log_s), lse, jnp.zeros_like(lse))


def _label_half_shifted(label_logit, m):
    """``(z_y - m) / 2`` for the label's logit, which may exceed ``m`` if the label is masked.

    Halved before the subtraction, as ``_stable.half_shifted``.

    In a row with a ``+inf`` logit, a ``+inf`` label logit gives 0 (it shares the
    probability) and a finite one ``-inf``; a masked ``+inf`` label in a finite row
    gives ``+inf`` (the loss is then ``-inf``, as optax's), a NaN label logit NaN.
    """
    row_has_inf = m == jnp.inf
    difference = label_logit * 0.5 + _stable.shift_of(m) * -0.5
    shares_inf = row_has_inf & (difference == jnp.inf)
    difference = jnp.where(shares_inf, jnp.zeros_like(difference), difference)
    finite_under_inf = row_has_inf & (label_logit < jnp.inf)
    return jnp.where(finite_under_inf, jnp.full_like(difference, -jnp.inf), difference)


def _z_term(config, lse, loss_scale=None):
    """``z_loss * lse**2``, times ``loss_scale`` where the mean is taken inside the loss.

    The scale is applied before the square can overflow.
    """
    if not config.z_loss:
        return 0.0
    return _stable.z_loss_term(config.z_loss, lse, loss_scale)


def _scaled_softmax(x, logit_mask, m, log_s, g, scale, config):
    """``g * scale * softmax``, per-row ``g`` and ``scale``, for both backward passes.

    With a z-loss ``scale`` is inf in a row with a ``+inf`` logit; the result is
    then 0 where ``g`` is 0 or the probability is, not ``inf * 0 = NaN``.
    """
    if not config.z_loss:
        return _stable.scaled_probabilities(x, logit_mask, m, log_s, g * scale)
    row_scale = jnp.where(g == 0, jnp.zeros_like(g), g * scale)
    return _stable.scaled_probabilities(x, logit_mask, m, log_s, row_scale, infinite_scale=True)


def _mean_denominator(logit_mask, example_mask, shape, axes, ignored=None, weight=None):
    """How many examples ``"mean"`` divides by, or their class weights' sum.

    ``example_mask``, ``ignored`` and ``weight`` have the per-example shape.
    """
    counted = jnp.ones(reduced_shape(shape, axes), jnp.bool_)
    if logit_mask is not None:
        counted = counted & jnp.any(logit_mask, axis=axes)
    if example_mask is not None:
        counted = counted & jnp.squeeze(example_mask, axes)
    if ignored is not None:
        counted = counted & ~ignored
    if weight is None:
        return jnp.sum(counted)
    return jnp.sum(jnp.where(counted, weight, jnp.zeros_like(weight)))


def _mean_scale(denominator, dtype) -> jax.Array:
    """``1 / denominator`` (0 when it is 0), for losses that divide before they add up.

    A weighted loss ``w_y * (lse - z_y)``, or a z-loss ``lse**2``, can pass the
    largest float where its share of the mean does not; scaled inside the
    loss, each term stays within the mean.
    """
    denominator = denominator.astype(dtype)
    safe = jnp.where(denominator == 0, jnp.ones_like(denominator), denominator)
    return lax.stop_gradient(jnp.where(denominator == 0, jnp.zeros_like(safe), 1 / safe))


def _mean_of_scaled(losses, denominator) -> jax.Array:
    """The sum of losses already divided by ``denominator``; ``mean_of_nothing`` when that is 0."""
    mean = jnp.sum(losses)
    return jnp.where(denominator == 0, mean_of_nothing(losses), mean)


def _scale_inside(reduction, denominator, weights, config, dtype) -> jax.Array | None:
    """The ``_mean_scale`` for a mean with class weights or a z-loss, else None.

    Only their terms can overflow where the mean does not; without them the
    mean divides the sum, as ``reduce_losses`` does.
    """
    if reduction == "mean" and (weights is not None or config.z_loss):
        return _mean_scale(denominator, dtype)
    return None


def _reduce(losses, reduction, denominator, loss_scale) -> jax.Array:
    """``reduce_losses``, or the sum of losses a ``loss_scale`` has already divided."""
    if loss_scale is not None:
        return _mean_of_scaled(losses, denominator)
    return reduce_losses(losses, reduction, denominator)


def _custom_vjp_loss(forward, backward, forward_for_gradient=None):
    """A ``custom_vjp`` loss of six arrays and the static ``config``.

    The arrays are ``(logits, labels, logit_mask, example_mask, weights,
    loss_scale)``; ``loss_scale`` is None, or the ``_mean_scale`` of a mean
    that divides inside the loss. ``forward`` returns the per-example losses
    and the row statistics ``(m, log_s)``; the residuals are the inputs and
    those statistics only. ``forward_for_gradient``, if given, is the same
    function written for when the statistics are kept. The forward rule calls
    it, never the custom_vjp function itself, so that forward mode over the
    backward pass (``jax.hessian``) works.
    """
    forward_for_gradient = forward_for_gradient or forward

    def value(*args):
        return forward(*args)[0]

    def forward_rule(*args):
        loss, stats = forward_for_gradient(*args)
        return loss, (*args[:-1], *stats)

    loss_fn = jax.custom_vjp(value, nondiff_argnums=(6,))
    loss_fn.defvjp(forward_rule, backward)
    return loss_fn


# --- soft labels -----------------------------------------------------------------


def _soft_target(y, class_weight, smoothing: float, axes, logit_mask=None):
    """``w * y'`` on the classes taking part, 0 on masked ones.

    ``y' = (1 - e) y + e / K`` spreads label smoothing over the ``K`` classes
    taking part; ``class_weight`` is laid along the classes, or None.
    """
    target = y
    if smoothing:
        share = smoothing / _num_taking_part(logit_mask, y.shape, axes, y.dtype)
        target = (1 - smoothing) * y + share
    if class_weight is not None:
        target = class_weight * target
    if logit_mask is not None:
        target = jnp.where(logit_mask, target, jnp.zeros_like(target))
    return target


def _soft_coefficients(y, weights, logit_mask, config, dtype):
    """``_soft_target`` of labels ``y`` (in ``dtype``) with the flat ``[C]`` class weights."""
    class_weight = _per_class(weights, y, config.axes, dtype)
    return _soft_target(y, class_weight, config.label_smoothing, config.axes, logit_mask)


@dataclasses.dataclass(frozen=True)
class _SoftScales:
    """Where a mean's ``loss_scale`` goes in the soft-label loss; each None if unscaled.

    Into the class weights when there are any (a ``[C]`` product), else onto
    each row's cross-entropy (a per-row product: per logit, on the labels, it
    measured 7-12% slower on XLA:CPU), and always into the z-loss coefficient.
    """

    weights: jax.Array | None
    row: jax.Array | None
    z: jax.Array | None

    @classmethod
    def of(cls, weights, loss_scale):
        if loss_scale is None:
            return cls(weights, None, None)
        if weights is not None:
            return cls(weights.astype(loss_scale.dtype) * loss_scale, None, loss_scale)
        return cls(None, loss_scale, loss_scale)


def _half_summed_per_logit(coefficient, xm, m, safe_log_s, axes) -> jax.Array:
    """``sum(coefficient * (log_s - (z - m))) / 2``, one product per logit.

    For the value alone with a logit mask: XLA:CPU's reductions take no
    select, so ``sum(coefficient) * log_s - sum(coefficient * (z - m))``
    would write the masked coefficients out for their own sum (under a
    gradient, where that sum is needed anyway, it is the cheaper form).
    """
    half_minus_log_probs = safe_log_s * 0.5 - _stable.half_shifted(xm, m)
    # 0 * log_s: a NaN row whose coefficients are all 0 stays NaN.
    return _weighted_sum(coefficient, half_minus_log_probs, axes) + 0 * safe_log_s


def _soft_loss_exact(
    xm, coefficient, m, log_s, config, row_scale=None, z_scale=None, per_term=False
):
    """The loss from the row statistics; ``per_term``: by ``_half_summed_per_logit``.

    Summed in halves and doubled last, so that it overflows only past the largest float.
    """
    safe_log_s = _stable.safe_log_s(log_s)
    if per_term:
        half_loss = _half_summed_per_logit(coefficient, xm, m, safe_log_s, config.axes)
    else:
        total = jnp.sum(coefficient, axis=config.axes, keepdims=True)
        half_gaps = _weighted_sum(coefficient, _stable.half_shifted(xm, m), config.axes)
        # log_s halved after the product: taken before it, XLA:CPU's schedule for the
        # label gradient alone held the labels' products beside the result (+32 MiB).
        half_loss = (total * safe_log_s) * 0.5 - half_gaps
    if row_scale is not None:
        half_loss = half_loss * row_scale
    return 2 * half_loss + _z_term(config, _stable.logsumexp_from_stats(m, log_s), z_scale)


# The optional arrays after x and y in the value alone's per-row functions, by name.
_ROW_EXTRAS = ("class_weight", "row_scale", "z_scale")


def _row_extras(names: tuple[str, ...], arrays) -> tuple[jax.Array | None, ...]:
    """The ``_ROW_EXTRAS`` arrays, None for those not passed (``arrays`` come as ``names``)."""
    given = dict(zip(names, arrays, strict=True))
    return tuple(given.get(name) for name in _ROW_EXTRAS)


def _soft_loss_fast(smoothing: float, z_loss: float, dtype, extra_names, axes, x, y, *extras):
    """``-sum(w * y' * log_softmax(x)) + z lse^2`` as the single loop XLA fuses; NaN on edge rows.

    ``y'`` are the smoothed labels, ``w`` the class weights if given, and a
    mean's row and z scales (keepdims-shaped) multiply the cross-entropy and
    ``z`` if given. ``x`` and ``y`` come as given and are cast to ``dtype``
    in the loop.
    """
    class_weight, row_scale, z_scale = _row_extras(extra_names, extras)
    m = _stable.row_max(x, axes).astype(dtype)  # exact in x's own dtype
    x, y = x.astype(dtype), y.astype(dtype)
    shifted_logits = x - m
    log_s = jnp.log(jnp.sum(jnp.exp(shifted_logits), axis=axes, keepdims=True))
    target = _soft_target(y, class_weight, smoothing, axes)
    loss = -jnp.sum(target * (shifted_logits - log_s), axis=axes, keepdims=True)
    if row_scale is not None:
        loss = loss * row_scale
    if z_loss:
        # log_s used beyond the loss's sum makes XLA:CPU's fused loop 4x slower
        # (measured); a second pass for the logsumexp, kept apart, costs less.
        x_again, m_again = lax.optimization_barrier((x, m))
        log_s_again = jnp.log(jnp.sum(jnp.exp(x_again - m_again), axis=axes, keepdims=True))
        lse = m_again + log_s_again
        loss = loss + _z_term(_Config(axes, smoothing, z_loss), lse, z_scale)
    return loss


def _soft_loss_exact_rows(smoothing: float, z_loss: float, dtype, extra_names, axes, x, y, *extras):
    class_weight, row_scale, z_scale = _row_extras(extra_names, extras)
    x, y = x.astype(dtype), y.astype(dtype)
    m, log_s = _stable.row_stats(x, None, axes, x.dtype)
    target = _soft_target(y, class_weight, smoothing, axes)
    config = _Config(axes, smoothing, z_loss)
    loss = _soft_loss_exact(x, target, m, log_s, config, row_scale, z_scale)
    return jnp.where(_stable.nonempty(log_s), loss, jnp.zeros_like(loss))


def _loss_chain(x, target, axes, z_loss: float, row_scale=None, z_scale=None):
    """``sum(target * -log_softmax(x))`` (plus the z-loss) as one chain of row reductions.

    For GPUs and TPUs. XLA:GPU runs a chain of reductions, each taking the
    previous one's result only broadcast back into one elementwise expression
    of the row (``max``, then ``sum(exp(x - max))``, then the loss's weighted
    sum), as one kernel; a row result used anywhere else splits it into a
    kernel per reduction plus the per-row steps between them (four for the
    soft-label loss, where optax's is one). So the edge rows are handled
    inside the chain, in halves ``h = x / 2`` (a gap ``h - max(h)`` never
    overflows):

    - a ``+inf`` entry's gap is 1, not ``inf - inf``: each adds ``e**2`` to the
      sum, and ``log_s / 2 - 1`` is its share ``log(k) / 2`` of the ``k`` of them;
      the row's finite entries have gap ``-inf``, their limit;
    - an empty or all ``-inf`` row has ``s = 0`` (the caller zeroes its loss
      from ``log_s``, the last reduction before the loss's, which keeps the chain);
    - a NaN makes ``s``, and so the loss, NaN.

    A z-loss's ``lse`` comes from a second chain of its own (max, sum).
    Returns the per-row loss and ``log_s`` (keepdims).
    """
    _, half_gap, log_s = _halved_row_stats(x * 0.5, axes)
    loss = 2 * _weighted_sum(target, _stable.safe_log_s(log_s) * 0.5 - half_gap, axes)
    if row_scale is not None:
        loss = loss * row_scale
    return _with_z_loss(loss, x, axes, z_loss, z_scale), log_s


def _half_gap(half_x, half_max):
    """``half_x - half_max``, but 1 for a ``+inf`` entry (``_loss_chain``'s rule)."""
    return jnp.where(half_x == jnp.inf, jnp.ones_like(half_x), half_x - half_max)


def _halved_row_stats(half_x, axes):
    """A chain's first two reductions over ``half_x = x / 2``: ``(half_max, gaps, log_s)``."""
    half_max = _stable.row_max(half_x, axes)
    half_gap = _half_gap(half_x, half_max)
    log_s = jnp.log(jnp.sum(jnp.exp(half_gap * 2), axis=axes, keepdims=True))
    return half_max, half_gap, log_s


def _with_z_loss(loss, x, axes, z_loss: float, z_scale):
    """``loss`` plus the z-loss term for a chain, its ``lse`` by a chain of its own.

    XLA:GPU fuses it with the loss's chain; the loss's ``half_max`` or ``log_s``
    used here would split that. A ``+inf`` entry makes it ``+inf``.
    """
    if not z_loss:
        return loss
    shift = _stable.shift_of(_stable.row_max(x, axes))
    lse = shift + jnp.log(jnp.sum(jnp.exp(x - shift), axis=axes, keepdims=True))
    return loss + _stable.z_loss_term(z_loss, lse, z_scale)


def _label_loss_chain(x, is_label, label_coefficient, axes, z_loss: float, z_scale=None):
    """``_loss_chain`` for a target that is the label's coefficient at the label alone.

    The label's half logit is a sum over the row (of it and zeros, exact) that
    needs no earlier result, so XLA:GPU reads it in the same pass as the sum of
    exponentials: two passes over the logits and a per-row kernel, where
    ``_loss_chain`` is one kernel of three passes. Which is faster depends on
    the rows (``_label_pass_first``). The label's gap follows ``_loss_chain``'s
    rules (1 for a ``+inf`` label, ``-inf`` for a ``-inf`` one).
    """
    half_x = x * 0.5
    half_label = jnp.sum(
        jnp.where(is_label, half_x, jnp.zeros_like(half_x)), axis=axes, keepdims=True
    )
    half_max, _, log_s = _halved_row_stats(half_x, axes)
    half_term = _stable.safe_log_s(log_s) * 0.5 - _half_gap(half_label, half_max)
    loss = 2 * jnp.where(label_coefficient == 0, 0.0, label_coefficient * half_term)
    return _with_z_loss(loss, x, axes, z_loss, z_scale), log_s


# XLA:GPU (jaxlib 0.10.2, compiled for an H100) runs ``_loss_chain`` as one kernel for
# rows of up to this many classes; longer rows take a kernel per reduction step, and
# its third pass over the logits then makes more kernels than the integer-label
# loss's own two reductions (9 against 6 at 32k classes).
_CHAIN_MAX_CLASSES = 16384


# On an H100 (jax 0.11.2) the one kernel of _loss_chain re-reads short rows from memory
# for each of its three reductions once the logits outgrow the L2 cache (50 MB):
# integer labels at 1024 classes took 1.23-1.36x optax's time from 64 MiB of logits,
# _label_loss_chain 0.99-1.01. With 4096 classes or more, or in the cache, the one
# kernel was the faster (0.6-1.03x; _label_loss_chain 1.0-1.13x), except at 1024
# classes and 16 MiB (1.41 against 1.06). benchmarks/RESULTS.md has the sweep.
_LABEL_FIRST_MAX_CLASSES = 2048
_LABEL_FIRST_MIN_BYTES = 64 * 2**20


def _label_pass_first(logits, axes) -> bool:
    """Whether the integer-label chain takes ``_label_loss_chain`` (short rows, many of them)."""
    num_classes = class_count(logits.shape, axes)
    return (
        known_sizes(logits.size)
        and num_classes <= _LABEL_FIRST_MAX_CLASSES
        and logits.size * logits.dtype.itemsize >= _LABEL_FIRST_MIN_BYTES
    )


def _one_kernel(logits, axes) -> bool:
    """Whether ``_loss_chain`` over these rows is one kernel on XLA:GPU (sizes known)."""
    num_classes = class_count(logits.shape, axes)
    return known_sizes(num_classes) and num_classes <= _CHAIN_MAX_CLASSES


def _soft_loss_chain(smoothing: float, z_loss: float, dtype, extra_names, axes, x, y, *extras):
    """``_soft_loss_exact_rows``'s values by ``_loss_chain``: one kernel on XLA:GPU."""
    class_weight, row_scale, z_scale = _row_extras(extra_names, extras)
    x, y = x.astype(dtype), y.astype(dtype)
    target = _soft_target(y, class_weight, smoothing, axes)
    loss, log_s = _loss_chain(x, target, axes, z_loss, row_scale, z_scale)
    return jnp.where(_stable.nonempty(log_s), loss, jnp.zeros_like(loss))


def _soft_forward(
    logits, labels, logit_mask, example_mask, weights, loss_scale, config, value_only=True
):
    """The losses and the row statistics.

    ``value_only`` (no gradient to come): without a logit mask, the loss is the one loop XLA
    fuses (label smoothing and z-loss are constants in it, class weights and
    a mean's scales are arguments), its edge rows redone; for a gradient the
    statistics are computed anyway, and the loss from them is cheaper than a
    second loop.
    """
    dtype = compute_dtype(logits.dtype, labels.dtype)
    axes = config.axes
    scales = _SoftScales.of(weights, loss_scale)
    xm = _stable.masked_in(logits, logit_mask, dtype)
    m, log_s = _stable.row_stats(logits, logit_mask, axes, dtype)
    num_classes = class_count(logits.shape, axes)
    no_classes = known_sizes(num_classes) and num_classes == 0
    # Without classes the loop's z-loss would be inf, not a NaN that the exact rows redo.
    if value_only and logit_mask is None and not no_classes:
        # Only the loss is needed without a gradient; XLA then drops the
        # statistics above, which the backward pass keeps. The inputs go in
        # uncast: cast outside, 16-bit ones would be copied out in float32
        # for the rare branch (measured 2-5x slower).
        # keepdims-shaped scales: rows_with_fallback passes them whole to each chunk of rows
        keepdims = (1,) * xm.ndim
        extras = {
            "class_weight": _per_class(scales.weights, xm, axes, dtype),
            "row_scale": None if scales.row is None else jnp.reshape(scales.row, keepdims),
            "z_scale": None if scales.z is None else jnp.reshape(scales.z, keepdims),
        }
        extras = {name: array for name, array in extras.items() if array is not None}
        options = (config.label_smoothing, config.z_loss, dtype, tuple(extras))
        loss = _stable.rows_with_fallback(
            functools.partial(_soft_loss_fast, *options),
            functools.partial(_soft_loss_exact_rows, *options),
            axes,
            logits,
            labels,
            *extras.values(),
            # Past one kernel's rows a z-loss's own chain reads the logits twice more.
            other=(
                functools.partial(_soft_loss_chain, *options)
                if _one_kernel(logits, axes) or not config.z_loss
                else None
            ),
        )
        if example_mask is not None:
            loss = jnp.where(example_mask, loss, jnp.zeros_like(loss))
        return jnp.squeeze(loss, axis=axes), (m, log_s)
    y = labels.astype(dtype)
    coefficient = _soft_coefficients(y, scales.weights, logit_mask, config, dtype)

    def from_stats(m, log_s):
        loss = _soft_loss_exact(
            xm, coefficient, m, log_s, config, scales.row, scales.z, per_term=value_only
        )
        return _finish(loss, _example_is_active(log_s, example_mask), None, axes)

    def by_chain(m, log_s):
        loss, chain_log_s = _loss_chain(xm, coefficient, axes, config.z_loss, scales.row, scales.z)
        return _finish(loss, _example_is_active(chain_log_s, example_mask), None, axes)

    if value_only and _one_kernel(logits, axes):
        # With a logit mask: on the other backends the masked rows' chain.
        return _stable.by_backend(m, log_s, cpu=from_stats, other=by_chain), (m, log_s)
    return from_stats(m, log_s), (m, log_s)


def _soft_bwd(config, residuals, g):
    logits, labels, logit_mask, example_mask, weights, loss_scale, m, log_s = residuals
    axes = config.axes
    dtype = m.dtype
    g = jnp.expand_dims(g.astype(dtype), axes)
    active = _example_is_active(log_s, example_mask)
    g = jnp.where(active, g, jnp.zeros_like(g))
    scales = _SoftScales.of(weights, loss_scale)
    g_cross_entropy = g if scales.row is None else g * scales.row
    y = labels.astype(dtype)
    coefficient = _soft_coefficients(y, scales.weights, logit_mask, config, dtype)
    scale = jnp.sum(coefficient, axis=axes, keepdims=True)
    if scales.row is not None:
        scale = scale * scales.row
    if config.z_loss:
        scale = scale + _stable.z_loss_slope(config.z_loss, _finite_logsumexp(m, log_s), scales.z)
    x = logits.astype(dtype)
    d_logits = _scaled_softmax(x, logit_mask, m, log_s, g, scale, config)
    d_logits = d_logits - g_cross_entropy * coefficient

    # d loss / d y_c = (1 - e) w_c (lse - z_c) on the classes taking part.
    label_scale = g_cross_entropy * (1 - config.label_smoothing)
    class_weight = _per_class(scales.weights, logits, axes, dtype)
    if class_weight is not None:
        label_scale = label_scale * class_weight
    half_shifted = _stable.half_shifted(logits.astype(dtype), m)
    half_minus_log_probs = _stable.safe_log_s(log_s) * 0.5 - half_shifted
    # Doubled after the scale: lse - z_c itself can pass the largest float.
    d_labels = 2 * (label_scale * half_minus_log_probs)
    d_labels = jnp.where(label_scale == 0, jnp.zeros_like(d_labels), d_labels)
    if logit_mask is not None:
        d_labels = jnp.where(logit_mask, d_labels, jnp.zeros_like(d_labels))
    if example_mask is not None:
        d_logits, d_labels = _zero_rows(d_logits, active), _zero_rows(d_labels, active)
    return (d_logits.astype(logits.dtype), d_labels.astype(labels.dtype), None, None, None, None)


def _zero_rows(gradient, active):
    """Exact zeros for masked or ignored examples, even where their logits are NaN."""
    return jnp.where(active, gradient, jnp.zeros_like(gradient))


_soft_cross_entropy = _custom_vjp_loss(
    _soft_forward, _soft_bwd, functools.partial(_soft_forward, value_only=False)
)


def _soft_labels(labels: ArrayLike, logits: jax.Array) -> jax.Array:
    """Checks soft labels against the logits; broadcasts them to the logits' shape."""
    array = jnp.asarray(labels)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        if array.shape == logits.shape and (
            jnp.issubdtype(array.dtype, jnp.integer) or array.dtype == jnp.bool_
        ):
            return array.astype(logits.dtype)  # integer one-hot labels
        raise TypeError(
            f"labels must be a floating-point array of per-class targets shaped like the "
            f"logits {logits.shape}, got dtype {array.dtype} and shape {array.shape}; "
            "for class indices use softmax_cross_entropy_with_integer_labels"
        )
    if array.shape == logits.shape:
        return array
    try:
        if jnp.broadcast_shapes(array.shape, logits.shape) != logits.shape:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"labels shape {array.shape} does not match the logits shape {logits.shape}"
        ) from None
    return jnp.broadcast_to(array, logits.shape)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Axis | None = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    reduction: str = "none",
) -> jax.Array:
    r"""Softmax cross-entropy between logits and soft (or one-hot) labels.

    .. math::
        \ell = -\sum_c w_c\, y'_c \log \mathrm{softmax}(z)_c
               + \lambda_z\, \mathrm{logsumexp}(z)^2,
        \qquad y' = (1 - \varepsilon)\, y + \varepsilon / K

    with class weights :math:`w` (1 by default), label smoothing
    :math:`\varepsilon` over the :math:`K` classes that take part, and
    :math:`\lambda_z` the z-loss coefficient. The gradient is the closed form
    :math:`\mathrm{softmax}(z) \sum_c w_c y'_c - w \odot y'` (plus
    :math:`2 \lambda_z\, \mathrm{logsumexp}(z)\, \mathrm{softmax}(z)`), which is
    ``softmax - onehot`` for a one-hot label.

    Args:
      logits: Unnormalised log-probabilities, e.g. ``[batch, num_classes]``.
      labels: Targets of the logits' shape (or broadcastable to it), typically
        probabilities; they need not sum to 1.
      axis: The class axis, or a tuple of class axes; ``()`` makes each logit
        an example of one class, as in optax.
      where: Optional boolean mask, per logit (the logits' shape) or per
        example (the loss's shape). Masked logits take no probability and
        their labels are ignored; masked examples give 0 loss and 0 gradient.
      label_smoothing: ``e`` in ``[0, 1]``, as in PyTorch.
      class_weights: Optional ``[C]`` weights, one per class (constants).
      z_loss: Coefficient of the auxiliary ``logsumexp(logits)**2`` term.
      reduction: ``"none"`` (per-example losses), ``"sum"`` or ``"mean"``
        (over the unmasked examples; 0 when there are none). As in PyTorch,
        the mean of soft-label losses divides by the number of examples even
        with class weights.

    Returns:
      The per-example losses (the logits' shape without ``axis``), or their
      sum or mean; float32 for 16-bit or float32 inputs, float64 for float64.

    Example:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> jsoftmax.softmax_cross_entropy(logits, labels)
      Array([0.2761297, 2.951799 ], dtype=float32)

    Note:
      No overflow or NaN for finite logits of any magnitude. A ``-inf`` logit
      with label 0 gives a finite loss and gradient; with a positive label,
      loss ``+inf`` and a finite gradient. A row that is all ``-inf`` or fully
      masked gives loss 0 and gradient 0; a NaN logit makes its example NaN.
      The backward saves only the inputs and each example's logsumexp (as its
      max and log-sum) and is reverse mode only: ``jax.jvp`` raises.
    """
    logits = as_float_array("logits", logits)
    labels = laid_out_like(logits, _soft_labels(labels, logits))
    axes = normalize_axes(axis, logits.ndim)
    logit_mask, example_mask = split_mask(where, logits, axes)
    weights = _prepare_weights(class_weights, logits.shape, axes)
    config = _Config(axes, check_label_smoothing(label_smoothing), check_z_loss(z_loss))
    check_reduction(reduction)
    denominator = None
    if reduction == "mean":
        denominator = _mean_denominator(logit_mask, example_mask, logits.shape, axes)
    dtype = compute_dtype(logits.dtype, labels.dtype)
    loss_scale = _scale_inside(reduction, denominator, weights, config, dtype)
    losses = _soft_cross_entropy(
        logits, labels, logit_mask, example_mask, weights, loss_scale, config
    )
    return _reduce(losses, reduction, denominator, loss_scale)


# --- integer labels ---------------------------------------------------------------


class _IntegerParts(NamedTuple):
    """What both passes of the integer-label loss need; keepdims-shaped per-row arrays."""

    x: jax.Array  # the logits in the compute dtype
    xm: jax.Array  # x with the masked logits -inf
    label_index: jax.Array  # the label, 0 where it is out of range
    label_weight: jax.Array | float  # its class weight (times loss_scale)
    ignored: jax.Array | None  # label == ignore_index
    invalid: jax.Array  # out of range and not ignored


def _label_coefficient(config: _Config, label_weight):
    """The target's weight at the label: ``(1 - smoothing) * w_y``."""
    return (1 - config.label_smoothing) * label_weight


def _integer_parts(
    logits, labels, logit_mask, weights, loss_scale, config, backward=False
) -> _IntegerParts:
    """The pieces both passes need: masked logits, label index and weight, bad labels.

    ``loss_scale`` (None or a scalar) goes into the label's weight.
    """
    dtype = compute_dtype(logits.dtype)
    axes = config.axes
    shape = logits.shape
    x = _stable.widened(logits, dtype) if backward else logits.astype(dtype)
    xm = _stable.masked(x, logit_mask)
    labels = jnp.expand_dims(labels, axes)
    num_classes = class_count(shape, axes)
    ignored = None if config.ignore_index is None else labels == config.ignore_index
    in_range = (labels >= 0) & (labels < num_classes)
    invalid = ~in_range if ignored is None else ~in_range & ~ignored
    label_index = jnp.where(in_range, labels, 0).astype(jnp.int32)
    label_weight = 1.0 if weights is None else _weights_of(weights.astype(dtype), label_index)
    if loss_scale is not None:
        label_weight = label_weight * loss_scale
    return _IntegerParts(x, xm, label_index, label_weight, ignored, invalid)


def _label_logit(logits, label_index, axes, dtype):
    """Each example's label logit in ``dtype``, read as given (as optax does) even if masked.

    Read from the logits in their own dtype, as raw bits when that is not
    ``dtype``: XLA turns a gather from cast logits into a cast of all of
    them, which the forward's sum then cannot fuse, so 16-bit logits would be
    copied out in float32 (measured 3x slower).
    """
    if len(axes) != 1 or split_along(logits, axes):
        x = logits.astype(dtype)
        is_label = _is_label(x, label_index, axes)
        return jnp.sum(jnp.where(is_label, x, jnp.zeros_like(x)), axis=axes, keepdims=True)
    if logits.dtype == dtype:
        return jnp.take_along_axis(logits, label_index, axis=axes[0])
    bits_dtype = jnp.dtype(f"uint{8 * logits.dtype.itemsize}")
    bits = jnp.take_along_axis(lax.bitcast_convert_type(logits, bits_dtype), label_index, axes[0])
    return lax.bitcast_convert_type(bits, logits.dtype).astype(dtype)


def _smoothing_parts(xm, logit_mask, weights, loss_scale, config):
    """``e / K`` (times ``loss_scale``) and the class-weight sums of the uniform part, or None."""
    smoothing = config.label_smoothing
    if smoothing == 0:
        return None
    axes = config.axes
    shape, dtype = xm.shape, xm.dtype
    num_taking_part = _num_taking_part(logit_mask, shape, axes, dtype)
    share = smoothing / num_taking_part
    if loss_scale is not None:
        share = share * loss_scale
    class_weight = _per_class(weights, xm, axes, dtype)
    if class_weight is None:
        class_weight = jnp.ones(tuple(1 for _ in shape), dtype)
    if logit_mask is not None:
        class_weight = jnp.where(logit_mask, class_weight, jnp.zeros_like(class_weight))
    if weights is None and logit_mask is not None:
        # The count already taken, not a second sum of the masked weights (XLA:CPU
        # would write those out). A fully masked row counts 1, not 0: it has no
        # probability, its log_s_safe is 0 and its gradient is zeroed, so 1 is harmless.
        weight_total = num_taking_part
    else:
        weight_total = jnp.sum(jnp.broadcast_to(class_weight, shape), axis=axes, keepdims=True)
    return share, class_weight, weight_total


def _integer_forward(
    logits, labels, logit_mask, example_mask, weights, loss_scale, config, value_only=True
):
    """The losses and the row statistics.

    ``value_only`` (no gradient to come): with label smoothing and a logit mask,
    the uniform part is summed by ``_half_summed_per_logit``; without a logit
    mask, the other backends take the loss from ``_loss_chain`` where it is one
    kernel (the statistics returned are then not used).
    """
    axes = config.axes
    parts = _integer_parts(logits, labels, logit_mask, weights, loss_scale, config)
    m, log_s = _stable.row_stats(logits, logit_mask, axes, parts.x.dtype)

    def finish(loss, log_s):
        active = _example_is_active(log_s, example_mask, parts.ignored)
        return _finish(loss, active, parts.invalid, axes)

    def from_stats(m, log_s):
        loss = _integer_loss_from_stats(
            logits, logit_mask, weights, loss_scale, config, parts, m, log_s, value_only
        )
        return finish(loss, log_s)

    def by_chain(m, log_s):
        return finish(*_integer_loss_chain(weights, loss_scale, config, parts))

    if value_only and logit_mask is None and _one_kernel(logits, axes):
        return _stable.by_backend(m, log_s, cpu=from_stats, other=by_chain), (m, log_s)
    return from_stats(m, log_s), (m, log_s)


def _integer_loss_from_stats(
    logits, logit_mask, weights, loss_scale, config, parts, m, log_s, value_only
):
    """Per-row integer-label losses (keepdims) from the row statistics."""
    axes = config.axes
    xm = parts.xm
    log_s_safe = _stable.safe_log_s(log_s)
    label_coefficient = _label_coefficient(config, parts.label_weight)
    label_logit = _label_logit(logits, parts.label_index, axes, parts.x.dtype)
    # In halves, doubled last: lse - z_y itself can pass the largest float.
    half_label_term = log_s_safe * 0.5 - _label_half_shifted(label_logit, m)
    half_loss = jnp.where(label_coefficient == 0, 0.0, label_coefficient * half_label_term)
    smoothing = _smoothing_parts(xm, logit_mask, weights, loss_scale, config)
    if smoothing is not None:
        share, class_weight, weight_total = smoothing
        # share goes into the sum term by term: (K - 1) logit gaps near the largest
        # float would overflow summed before it (PyTorch overflows there in float32).
        if value_only and logit_mask is not None:
            half_spread = _half_summed_per_logit(share * class_weight, xm, m, log_s_safe, axes)
        else:
            half_spread = share * weight_total * (log_s_safe * 0.5) - _weighted_sum(
                share * class_weight, _stable.half_shifted(xm, m), axes
            )
        half_loss = half_loss + half_spread
    return 2 * half_loss + _z_term(config, _stable.logsumexp_from_stats(m, log_s), loss_scale)


def _integer_loss_chain(weights, loss_scale, config, parts):
    """Per-row integer-label losses and ``log_s`` (keepdims) by a chain, no logit mask.

    The target of each logit is the label's coefficient at the label and the
    smoothing's share (times the class weight) everywhere.
    """
    x = parts.x
    label_coefficient = _label_coefficient(config, parts.label_weight)
    is_label = _is_label(x, parts.label_index, config.axes)
    smoothing = _smoothing_parts(parts.xm, None, weights, loss_scale, config)
    if smoothing is None and _label_pass_first(x, config.axes):
        return _label_loss_chain(
            x, is_label, label_coefficient, config.axes, config.z_loss, loss_scale
        )
    target = jnp.where(is_label, label_coefficient, jnp.zeros((), x.dtype))
    if smoothing is not None:
        share, class_weight, _ = smoothing
        target = target + share * class_weight
    return _loss_chain(x, target, config.axes, config.z_loss, None, loss_scale)


def _integer_bwd(config, residuals, g):
    logits, labels, logit_mask, example_mask, weights, loss_scale, m, log_s = residuals
    axes = config.axes
    x, xm, label_index, label_weight, ignored, invalid = _integer_parts(
        logits, labels, logit_mask, weights, loss_scale, config, backward=True
    )
    g = jnp.expand_dims(g.astype(x.dtype), axes)
    active = _example_is_active(log_s, example_mask, ignored)
    g = jnp.where(active, g, jnp.zeros_like(g))
    g = jnp.where(invalid, jnp.full_like(g, jnp.nan), g)

    label_coefficient = _label_coefficient(config, label_weight)
    scale = label_coefficient
    smoothing = _smoothing_parts(xm, logit_mask, weights, loss_scale, config)
    if smoothing is not None:
        share, class_weight, weight_total = smoothing
        scale = scale + share * weight_total
    if config.z_loss:
        scale = scale + _stable.z_loss_slope(config.z_loss, _finite_logsumexp(m, log_s), loss_scale)
    d_logits = _scaled_softmax(x, logit_mask, m, log_s, g, scale, config)
    if smoothing is not None:
        d_logits = d_logits - g * share * class_weight
    d_logits = _subtract_at_labels(
        d_logits, g * label_coefficient, label_index, axes, logits.dtype == jnp.float16
    )
    if example_mask is not None or ignored is not None:
        d_logits = _zero_rows(d_logits, active | invalid)
    float0_labels = jnp.zeros(labels.shape, jax.dtypes.float0)
    return (d_logits.astype(logits.dtype), float0_labels, None, None, None, None)


def _index_along(shape: tuple[int, ...], axis: int) -> jax.Array:
    """The index along ``axis``, shaped to broadcast against ``shape``.

    ``jnp.indices(shape, sparse=True)[axis]``, built from ``broadcasted_iota``,
    which also takes jax.export's symbolic sizes.
    """
    index_shape = tuple(size if k == axis else 1 for k, size in enumerate(shape))
    return lax.broadcasted_iota(jnp.int32, index_shape, axis)


def _subtract_at_labels(d_logits, amount, label_index, axes, narrowed=False):
    """``d_logits - amount * onehot(labels)``: a scatter-add for one class axis, else a select.

    The scatter touches one entry per example, where a select would be another
    pass over the logits (measured: a third faster end to end on CPU). Under
    JAX's explicit sharding the select, elementwise, is what shards as the logits do.
    ``narrowed``: the result is rounded to float16 next; the select then joins
    that pass, while the scatter needs the float32 array written out first
    (measured on XLA:CPU: 0.80-0.90 of the scatter's time with float16, but
    1.15-1.45 with bfloat16, so not for bfloat16).
    """
    if d_logits.size == 0:
        return d_logits
    split = any(explicit_sharding(a) is not None for a in (d_logits, label_index))
    if len(axes) == 1 and not split and not narrowed:
        axis = axes[0]
        labels = jnp.squeeze(label_index, axis)
        amount = jnp.broadcast_to(jnp.squeeze(amount, axis), labels.shape)
        grids = [_index_along(labels.shape, k) for k in range(labels.ndim)]
        return d_logits.at[(*grids[:axis], labels, *grids[axis:])].add(-amount)
    is_label = _is_label(d_logits, label_index, axes)
    return d_logits - jnp.where(is_label, amount, jnp.zeros_like(amount))


_integer_cross_entropy = _custom_vjp_loss(
    _integer_forward, _integer_bwd, functools.partial(_integer_forward, value_only=False)
)


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    z_loss: float = 0.0,
    reduction: str = "none",
) -> jax.Array:
    r"""Softmax cross-entropy between logits and integer class labels.

    .. math::
        \ell = (1 - \varepsilon)\, w_y \left(\mathrm{lse}(z) - z_y\right)
               + \frac{\varepsilon}{K} \sum_c w_c \left(\mathrm{lse}(z) - z_c\right)
               + \lambda_z\, \mathrm{lse}(z)^2

    the loss of PyTorch's ``F.cross_entropy`` with ``weight``,
    ``ignore_index`` and ``label_smoothing``, plus PaLM's z-loss. The gradient
    is the closed form ``softmax - onehot`` (generalised to the options: the
    soft-label form with the smoothed, weighted one-hot label).

    Args:
      logits: Unnormalised log-probabilities, e.g. ``[batch, num_classes]``.
      labels: Integer class indices of the logits' shape without ``axis``.
        With a tuple of class axes a label is a flat, row-major index over
        those axes in the order given (as in optax).
      axis: The class axis, or a tuple of class axes; ``()`` makes each logit
        an example of one class, as in optax.
      where: Optional boolean mask, per logit (the logits' shape) or per
        example (the labels' shape). Masked logits take no probability;
        masked examples give 0 loss and 0 gradient.
      label_smoothing: ``e`` in ``[0, 1]``, as in PyTorch.
      class_weights: Optional ``[C]`` weights, one per class (constants).
      ignore_index: A label value whose examples give 0 loss and gradient
        and are left out of the mean.
      z_loss: Coefficient of the auxiliary ``logsumexp(logits)**2`` term.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``; the mean divides by the
        number of counted examples, or by the sum of their labels' class
        weights when ``class_weights`` is given (PyTorch's definition), and
        is 0 when nothing is counted (NaN if a masked example has a bad
        label, whose loss is NaN). It divides each term before adding,
        so it is finite whenever it is representable, even where a weighted
        loss or a z-loss term alone would overflow.

    Returns:
      The per-example losses (the labels' shape), or their sum or mean;
      float32 for 16-bit or float32 logits, float64 for float64.

    Example:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> jsoftmax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1]))
      Array([0.2761297, 2.951799 ], dtype=float32)

    Note:
      A label outside ``[0, C)`` that is not ``ignore_index`` gives that
      example a NaN loss (never another class) and fails a check that
      ``jax.experimental.checkify.checkify(f, errors=checkify.user_checks)``
      (or ``all_checks``) reports; under plain ``jit`` it compiles to nothing
      and, unlike ``checkify.debug_check``, adds no effect. A per-logit mask
      restricts the classes that take probability; the label's own logit is
      read as given, as in optax. Rows that are all ``-inf`` or fully masked
      give 0; a NaN logit gives NaN. Reverse mode only: ``jax.jvp`` raises.
    """
    logits = as_float_array("logits", logits)
    labels = as_int_array("labels", labels)
    axes = normalize_axes(axis, logits.ndim)
    example_shape = reduced_shape(logits.shape, axes)
    if labels.shape != example_shape:
        raise ValueError(
            f"labels shape {labels.shape} does not match the logits shape {logits.shape} "
            f"without the class axis {axes}: expected {example_shape}"
        )
    labels = laid_out_like(logits, labels, axes)
    logit_mask, example_mask = split_mask(where, logits, axes)
    weights = _prepare_weights(class_weights, logits.shape, axes)
    config = _Config(
        axes,
        check_label_smoothing(label_smoothing),
        check_z_loss(z_loss),
        check_ignore_index(ignore_index),
    )
    check_reduction(reduction)
    labels = checked_labels(labels, class_count(logits.shape, axes), config.ignore_index)
    dtype = compute_dtype(logits.dtype)
    denominator = None
    if reduction == "mean":
        ignored = None if config.ignore_index is None else labels == config.ignore_index
        label_weight = None if weights is None else _weights_of(weights.astype(dtype), labels)
        denominator = _mean_denominator(
            logit_mask, example_mask, logits.shape, axes, ignored, label_weight
        )
    loss_scale = _scale_inside(reduction, denominator, weights, config, dtype)
    losses = _integer_cross_entropy(
        logits, labels, logit_mask, example_mask, weights, loss_scale, config
    )
    return _reduce(losses, reduction, denominator, loss_scale)
