"""Float64 NumPy references, written from the definitions, independent of jsoftmax.

softmax, log_softmax and logsumexp come from SciPy; the cross-entropy follows
PyTorch's documented ``F.cross_entropy`` (weight, ignore_index,
label_smoothing, reduction) term by term.
"""

from __future__ import annotations

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
