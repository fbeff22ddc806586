"""Float64 NumPy references, written from the definitions, independent of jsoftmax.

softmax, log_softmax and logsumexp come from SciPy; the cross-entropy follows
PyTorch's documented ``F.cross_entropy`` (weight, ignore_index,
label_smoothing, reduction) term by term.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import special


def to64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def move_classes_last(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Moves the class axes to the end, in the given order, and flattens them."""
    axes = tuple(a % x.ndim for a in axes)
    batch = tuple(i for i in range(x.ndim) if i not in axes)
    moved = np.transpose(x, batch + axes)
    return moved.reshape(moved.shape[: len(batch)] + (-1,))


def softmax(x, axis=-1, mask=None):
    x = to64(x)
    if mask is None:
        return special.softmax(x, axis=axis)
    out = special.softmax(np.where(mask, x, -np.inf), axis=axis)
    return np.where(mask, out, 0.0)


def log_softmax(x, axis=-1, mask=None):
    x = to64(x)
    if mask is None:
        return special.log_softmax(x, axis=axis)
    return special.log_softmax(np.where(mask, x, -np.inf), axis=axis)


def logsumexp(x, axis=-1, mask=None):
    x = to64(x)
    if mask is not None:
        x = np.where(mask, x, -np.inf)
    return special.logsumexp(x, axis=axis)


def cross_entropy_soft(logits, labels, weight=None, label_smoothing=0.0, z_loss=0.0):
    """Per-example loss for probability targets, logits ``[N, C]``."""
    logits, labels = to64(logits), to64(labels)
    num_classes = logits.shape[-1]
    w = np.ones(num_classes) if weight is None else to64(weight)
    target = labels * (1 - label_smoothing) + label_smoothing / num_classes
    log_p = special.log_softmax(logits, axis=-1)
    loss = -np.sum(w * target * log_p, axis=-1)
    return loss + z_loss * special.logsumexp(logits, axis=-1) ** 2


def cross_entropy_int(
    logits, labels, weight=None, ignore_index=None, label_smoothing=0.0, z_loss=0.0
):
    """Per-example loss and per-example weight (for PyTorch's mean), logits ``[N, C]``."""
    logits = to64(logits)
    labels = np.asarray(labels)
    num_classes = logits.shape[-1]
    w = np.ones(num_classes) if weight is None else to64(weight)
    log_p = special.log_softmax(logits, axis=-1)
    ignored = np.zeros(labels.shape, bool) if ignore_index is None else labels == ignore_index
    safe = np.where(ignored, 0, labels)
    nll = -w[safe] * np.take_along_axis(log_p, safe[:, None], axis=-1)[:, 0]
    smooth = -np.sum(w * log_p, axis=-1)
    loss = (1 - label_smoothing) * nll + label_smoothing / num_classes * smooth
    loss = loss + z_loss * special.logsumexp(logits, axis=-1) ** 2
    loss = np.where(ignored, 0.0, loss)
    example_weight = np.where(ignored, 0.0, w[safe])
    return loss, example_weight


def reduce(loss, reduction, denominator=None):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    denominator = loss.size if denominator is None else denominator
    return loss.sum() / denominator if denominator else 0.0


def soft_grad(logits, labels, weight=None, label_smoothing=0.0, z_loss=0.0):
    """Closed form d loss / d logits for probability targets (sum reduction)."""
    logits, labels = to64(logits), to64(labels)
    num_classes = logits.shape[-1]
    w = np.ones(num_classes) if weight is None else to64(weight)
    target = w * (labels * (1 - label_smoothing) + label_smoothing / num_classes)
    p = special.softmax(logits, axis=-1)
    lse = special.logsumexp(logits, axis=-1, keepdims=True)
    return p * target.sum(-1, keepdims=True) - target + 2 * z_loss * lse * p


def soft_cross_entropy_minus_inf_allowed(x, y, weight=None, label_smoothing=0.0, z_loss=0.0):
    """Loss and logit gradient (sum reduction) of probability targets, ``-inf`` logits allowed.

    A ``-inf`` logit takes no part: in float64 ``exp(-1e4)`` is 0, so replacing it by
    -1e4 is exact (with label 0 there; a positive label would make the loss +inf, which
    this does not give). A row of ``-inf`` only has loss 0 and gradient 0.
    """
    empty = np.all(np.isneginf(x), axis=-1)
    finite = np.where(np.isneginf(x), -1e4, to64(x))
    loss = cross_entropy_soft(finite, y, weight, label_smoothing, z_loss)
    grad = soft_grad(finite, y, weight, label_smoothing, z_loss)
    return np.where(empty, 0.0, loss), np.where(empty[:, None], 0.0, grad)


def rel_err(actual, expected) -> float:
    """max |a - e| / max |e|: a norm-wise relative error, robust to tiny entries."""
    actual, expected = to64(actual), to64(expected)
    scale = np.max(np.abs(expected)) if expected.size else 0.0
    return (
        float(np.max(np.abs(actual - expected)) / scale)
        if scale
        else float(np.max(np.abs(actual - expected), initial=0.0))
    )


def softmax_family(name, x, axis=-1, mask=None):
    """``softmax``, ``log_softmax`` or ``logsumexp`` over ``axis`` (None: all axes)."""
    axis = tuple(range(np.ndim(x))) if axis is None else axis
    functions = {"softmax": softmax, "log_softmax": log_softmax, "logsumexp": logsumexp}
    return functions[name](x, axis=axis, mask=mask)


def softmax_family_vjp(name, x, axis, g, mask=None):
    """The closed-form cotangents of ``softmax_family(name, ...)`` in float64."""
    axis = tuple(range(np.ndim(x))) if axis is None else axis
    g = to64(g)
    p = softmax(x, axis=axis, mask=mask)
    if name == "softmax":
        return p * (g - np.sum(g * p, axis=axis, keepdims=True))
    if name == "log_softmax":
        g = g if mask is None else np.where(mask, g, 0.0)
        return g - p * np.sum(g, axis=axis, keepdims=True)
    return np.expand_dims(g, axis) * p


def assert_gradient_close(dx, expected, g):
    """Relative error below 1e-5, up to the closed form's own rounding.

    ``a * (g - sum(g * a))`` computed from a float32 ``a`` has an absolute
    error of a few float32 ulps of ``max|g|`` (``1 - a`` rounds to 0 when a row
    is confident), whatever the implementation: jax.nn's has the same.
    """
    error = np.max(np.abs(to64(dx) - expected), initial=0.0)
    bound = 1e-5 * np.max(np.abs(expected), initial=0.0) + 4 * 2**-24 * np.max(
        np.abs(to64(g)), initial=0.0
    )
    assert error <= bound, (error, bound)


def linear_cross_entropy(
    x,
    w,
    labels,
    b=None,
    *,
    cotangent=None,
    where=None,
    ignore_index=None,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap=None,
    reduction="mean",
):
    """The loss of ``x @ w + b`` and its closed-form gradients ``(loss, dx, dw, db)``.

    The per-example loss comes from ``cross_entropy_int``
    (PyTorch's definition); ``cotangent`` is the output cotangent (per example
    for ``"none"``, a scalar otherwise, 1 by default).
    """
    x64, w64 = to64(x), to64(w)
    d = x64.shape[-1]
    batch = x64.shape[:-1]
    xf = x64.reshape(-1, d)
    labels = np.asarray(labels).reshape(-1)
    raw = xf @ w64 + (0.0 if b is None else to64(b))
    z = raw if logit_softcap is None else logit_softcap * np.tanh(raw / logit_softcap)
    num_classes = z.shape[-1]
    losses, _ = cross_entropy_int(
        z, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss
    )
    valid = np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    if where is not None:
        valid = valid & np.asarray(where).reshape(-1)
    losses = np.where(valid, losses, 0.0)
    count = valid.sum()
    if reduction == "none":
        value = losses.reshape(batch)
        row = np.ones(labels.shape) if cotangent is None else to64(cotangent).reshape(-1)
    else:
        value = reduce(losses, reduction, count)
        scale = 1.0 if cotangent is None else float(cotangent)
        if reduction == "mean":
            scale = scale / count if count else 0.0
        row = np.full(labels.shape, scale)
    row = np.where(valid, row, 0.0)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    onehot = np.eye(num_classes)[np.where(valid, labels, 0)]
    target = (1 - label_smoothing) * onehot + label_smoothing / num_classes
    g = row[:, None] * (p * (1 + 2 * z_loss * lse)[:, None] - target)
    if logit_softcap is not None:
        g = g * (1 - np.tanh(raw / logit_softcap) ** 2)
    dx = (g @ w64.T).reshape(x64.shape)
    return value, dx, xf.T @ g, g.sum(0)


# --- limits: rows with +inf, -inf, NaN and masks (for tests/fuzz.py) -----------------


@dataclasses.dataclass(frozen=True)
class RowLimits:
    """Per row of ``[N, C]`` logits, after the mask: the limiting values SPEC §3 asks for."""

    probabilities: np.ndarray  # [N, C]
    log_probabilities: np.ndarray  # [N, C]
    logsumexp: np.ndarray  # [N]
    has_nan: np.ndarray  # [N], an unmasked NaN: the row's outputs are NaN
    num_infinite: np.ndarray  # [N], the number of unmasked +inf logits
    empty: np.ndarray  # [N], every logit masked or -inf


def row_limits(x, mask) -> RowLimits:
    """softmax, log_softmax and logsumexp of each row in float64, at their limits.

    ``k`` ``+inf`` logits share the probability (``1 / k`` each, log-probability
    ``-log k``; the rest 0 and ``-inf``); an empty row has probability 0,
    log-probability and logsumexp ``-inf``; an unmasked NaN makes the row NaN.
    The statistics are taken apart (``x - m`` and ``log s``), so that huge
    logits keep their differences.
    """
    logits = np.where(mask, to64(x), -np.inf)
    has_nan = np.any(np.isnan(logits), -1)
    num_infinite = np.sum(logits == np.inf, -1)
    empty = np.all(logits == -np.inf, -1)
    finite = np.where(np.isfinite(logits), logits, -np.inf)
    m = np.max(finite, -1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    s = np.sum(np.exp(finite - m), -1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        probabilities = np.exp(finite - m) / s
        log_probabilities = (finite - m) - np.log(s)
        logsumexp = m[:, 0] + np.log(s[:, 0])
    is_infinite = logits == np.inf
    k = np.maximum(num_infinite, 1)[:, None]
    with_infinite = (num_infinite > 0)[:, None]
    probabilities = np.where(with_infinite, is_infinite / k, probabilities)
    log_probabilities = np.where(
        with_infinite, np.where(is_infinite, -np.log(k), -np.inf), log_probabilities
    )
    logsumexp = np.where(num_infinite > 0, np.inf, logsumexp)
    probabilities = np.where(empty[:, None], 0.0, probabilities)
    log_probabilities = np.where(empty[:, None], -np.inf, log_probabilities)
    logsumexp = np.where(empty, -np.inf, logsumexp)
    return RowLimits(
        np.where(has_nan[:, None], np.nan, probabilities),
        np.where(has_nan[:, None], np.nan, log_probabilities),
        np.where(has_nan, np.nan, logsumexp),
        has_nan,
        num_infinite,
        empty,
    )


def weighted(coefficient, values) -> np.ndarray:
    """``coefficient * values`` with a zero coefficient giving 0, even times ``inf``."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(coefficient == 0, 0.0, coefficient * values)


def cross_entropy_limit(x, target, mask, z_loss=0.0):
    """The loss ``sum(target * -log_softmax) + z lse**2`` and its logit gradient, at the limits.

    ``target`` is the per-logit coefficient (labels already smoothed and
    weighted, 0 on masked logits). An empty row gives 0 and gradient 0; the
    gradient ``p * sum(target) - target + 2 z lse p`` is given for rows without
    ``+inf`` (or without a z-loss, whose term is then absent) and without NaN,
    NaN elsewhere.
    """
    limits = row_limits(x, mask)
    loss = np.sum(weighted(target, -limits.log_probabilities), -1)
    p = limits.probabilities
    with np.errstate(invalid="ignore", over="ignore"):
        grad = p * np.sum(target, -1, keepdims=True) - target
        if z_loss:
            loss = loss + z_loss * limits.logsumexp**2
            grad = grad + 2 * z_loss * limits.logsumexp[:, None] * p
    loss = np.where(limits.empty, 0.0, np.where(limits.has_nan, np.nan, loss))
    grad = np.where(limits.empty[:, None] | ~np.asarray(mask), 0.0, grad)
    unknown = limits.has_nan | ((limits.num_infinite > 0) & bool(z_loss))
    return loss, np.where(unknown[:, None], np.nan, grad)
