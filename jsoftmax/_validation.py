"""Argument checks and small helpers shared by the public functions.

Every check runs at trace time, on shapes, dtypes and Python values, so a bad
argument fails before anything is computed and the message names it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

REDUCTIONS = ("none", "sum", "mean")

Axis = int | Sequence[int]


def as_float_array(name: str, value: ArrayLike) -> jax.Array:
    """Returns ``value`` as a JAX array, raising TypeError unless it is floating."""
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array, got dtype {array.dtype}; "
            f"cast it first, e.g. {name}.astype(jnp.float32)"
        )
    return array


def as_int_array(name: str, value: ArrayLike) -> jax.Array:
    """Returns ``value`` as a JAX array, raising TypeError unless it is integer."""
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be an integer array of class indices, got dtype {array.dtype}; "
            "for one-hot or probability labels use softmax_cross_entropy"
        )
    return array


def compute_dtype(*dtypes: jnp.dtype) -> jnp.dtype:
    """The dtype to compute in: float32 for 16-bit floats, else the widest input."""
    widest = jnp.dtype(jnp.float32)
    for dtype in dtypes:
        if jnp.dtype(dtype).itemsize > widest.itemsize:
            widest = jnp.dtype(dtype)
    return widest


def normalize_axes(axis: Axis | None, ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Canonical non-negative class axes, in the order given; None means all axes.

    ``()`` is allowed, as in ``jax.nn``: each element is then a row of one class.

    The order matters only where class axes are flattened (integer labels, class
    weights): a flat class index is row-major over the axes in this order, as in
    optax.
    """
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
        axes = (int(axis),)
    elif isinstance(axis, Sequence) and all(
        isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axis
    ):
        axes = tuple(int(a) for a in axis)
    else:
        raise TypeError(f"{name} must be an int or a tuple of ints, got {axis!r}")
    canonical = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}={axis!r} is out of range for an array of rank {ndim}")
        canonical.append(a % ndim)
    if len(set(canonical)) != len(canonical):
        raise ValueError(f"{name}={axis!r} repeats an axis")
    return tuple(canonical)


def reduced_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with the class axes removed: the shape of one value per example."""
    return tuple(size for i, size in enumerate(shape) if i not in axes)


def class_count(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
    """The number of classes: the product of the class axes' sizes (symbolic ones too)."""
    return math.prod(shape[a] for a in axes)


def kept_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with the class axes set to 1, as ``keepdims=True`` leaves it."""
    return tuple(1 if i in axes else size for i, size in enumerate(shape))


def as_bool_mask(where: ArrayLike) -> jax.Array:
    """``where`` as a boolean array (integers are read as nonzero); TypeError otherwise."""
    mask = jnp.asarray(where)
    if mask.dtype == jnp.bool_:
        return mask
    if not jnp.issubdtype(mask.dtype, jnp.integer):
        raise TypeError(f"where must be a boolean mask, got dtype {mask.dtype}")
    return mask != 0


def split_mask(
    where: ArrayLike | None, logits: jax.Array, axes: tuple[int, ...]
) -> tuple[jax.Array | None, jax.Array | None]:
    """Sorts a ``where`` mask into a per-logit or a per-example mask.

    A mask of the logits' shape is per logit; one of the shape of the result
    (the class axes removed) is per example; any other shape that broadcasts to
    the logits is per logit, broadcast. Returns ``(logit_mask, example_mask)``,
    at most one of them not None; the example mask has the class axes kept as 1.
    Under explicit sharding it is split over devices as the logits are.
    """
    if where is None:
        return None, None
    mask = as_bool_mask(where)
    shape = logits.shape
    example_shape = reduced_shape(shape, axes)
    if mask.shape == shape:
        return laid_out_like(logits, mask), None
    if mask.shape == example_shape:
        return None, laid_out_like(logits, mask.reshape(kept_shape(shape, axes)))
    try:
        return laid_out_like(logits, jnp.broadcast_to(mask, shape)), None
    except ValueError:
        raise ValueError(
            f"where has shape {mask.shape}, which fits neither the logits {shape} "
            f"(a per-logit mask) nor the per-example shape {example_shape}"
        ) from None


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_label_smoothing(label_smoothing: float) -> float:
    value = _python_float("label_smoothing", label_smoothing)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    return value


def check_z_loss(z_loss: float) -> float:
    value = _python_float("z_loss", z_loss)
    if not value >= 0.0 or math.isinf(value):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    return value


def check_ignore_index(ignore_index: int | None) -> int | None:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
    return int(ignore_index)


def _python_float(name: str, value: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        raise TypeError(f"{name} must be a Python number, got {value!r}") from None


def reduce_losses(
    losses: jax.Array, reduction: str, denominator: jax.Array | None = None
) -> jax.Array:
    """Applies ``reduction``; ``"mean"`` divides by ``denominator`` (``mean_of_nothing``
    when it is 0).

    Without a denominator, ``"mean"`` divides by the number of losses. The mean
    divides each loss before summing, so it is finite whenever it is
    representable (a sum first overflows from about ``3.4e38 / N`` per example).
    """
    if reduction == "none":
        return losses
    if reduction == "sum":
        return jnp.sum(losses)
    if denominator is None:
        denominator = jnp.asarray(losses.size, losses.dtype)
    denominator = denominator.astype(losses.dtype)
    safe = jnp.where(denominator == 0, jnp.ones_like(denominator), denominator)
    mean = jnp.sum(losses / safe)
    return jnp.where(denominator == 0, mean_of_nothing(losses), mean)


def mean_of_nothing(losses: jax.Array) -> jax.Array:
    """The ``"mean"`` where nothing is counted: 0, or NaN if a loss is NaN.

    An integer label outside ``[0, C)`` makes its example's loss NaN even where
    ``where`` masks it out (SPEC 4); a batch with nothing else counted must not
    hide it behind a 0 (``"none"``, ``"sum"`` and the gradient show the NaN).
    """
    has_nan = jnp.any(jnp.isnan(losses))
    return jnp.where(has_nan, jnp.full((), jnp.nan, losses.dtype), jnp.zeros((), losses.dtype))


def laid_out_like(logits: jax.Array, array: jax.Array | None, axes: tuple[int, ...] = ()):
    """``array`` split over devices as the logits are, under JAX's explicit sharding.

    For labels and masks: of the logits' shape, with size 1 on some axes
    (those are whole), or of the shape with the class ``axes`` removed. Mixing
    layouts in one elementwise op does not type-check (a select needs one), so
    they follow the logits, whose layout is the user's choice. Without explicit
    sharding the array is returned as it is.
    """
    if array is None:
        return None
    mesh = getattr(getattr(jax.typeof(logits), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty:
        return array
    logits_spec = full_spec(logits)
    if array.ndim == logits.ndim:
        target = tuple(
            part if size == full else None
            for part, size, full in zip(logits_spec, array.shape, logits.shape, strict=True)
        )
    else:
        target = tuple(part for i, part in enumerate(logits_spec) if i not in axes)
    if full_spec(array) == target:
        return array
    spec = jax.sharding.PartitionSpec(*target)
    if not (is_concrete(array) and is_concrete(logits)):
        return jax.sharding.reshard(array, jax.sharding.NamedSharding(mesh, spec))
    # Concrete arrays (called eagerly): put onto the logits' concrete mesh.
    return jax.device_put(array, jax.sharding.NamedSharding(logits.sharding.mesh, spec))


def split_along(array: jax.Array, axes: tuple[int, ...]) -> bool:
    """Whether explicit sharding splits ``array`` along any of ``axes`` (say, the classes)."""
    spec = full_spec(array)
    return any(spec[a] is not None for a in axes)


def known_sizes(*sizes) -> bool:
    """True when every size is a number, False if any is symbolic.

    ``jax.export`` traces with symbolic dimensions (a batch size ``"b"``) whose
    comparisons with numbers are mostly undecidable; choices between
    equivalent computations by size then take the one that fits every size.
    """
    return all(isinstance(size, (int, np.integer)) for size in sizes)


def is_concrete(array) -> bool:
    """True for an array with a value (run eagerly), False for a tracer."""
    return not isinstance(array, jax.core.Tracer)


def full_spec(array: jax.Array) -> tuple:
    """The array's partition spec, one entry per axis (None where whole)."""
    spec = getattr(getattr(jax.typeof(array), "sharding", None), "spec", None) or ()
    return (*spec, *(None,) * (array.ndim - len(spec)))


def explicit_sharding(array: jax.Array) -> jax.sharding.Sharding | None:
    """The sharding in ``array``'s type under JAX's explicit sharding mode, else None.

    None also when the type says replicated: only a split array needs the
    gathers and scatters written for it.
    """
    sharding = getattr(jax.typeof(array), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(part is None for part in spec):
        return None
    return sharding
