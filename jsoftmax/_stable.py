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
- a NaN anywhere unmasked: the sum is NaN and everything derived from it.
  Nothing relies on ``m`` being NaN: XLA:CPU's fused max skips NaN (and its
  min with a constant, which ``_min_keeping_nan`` works around).

On XLA:CPU, rows longer than 128 KiB stop fitting in cache in that loop (about 3x
slower), so they are reduced in blocks of at most 32 KiB, a reshape
of the input, and the blocks' maxima and sums combined. Masking and casting
happen after the reshape, inside the functions here: done by the caller
before it, XLA would write the masked logits out in full.

Those forms are XLA:CPU's. On a GPU a ``lax.cond`` costs a copy of its
predicate to the host and a sync, and reductions do not slow down on long
rows, so ``by_backend`` (chosen when lowering) gives the other backends
branch-free forms: the ``+inf`` count and the exact losses always computed,
rows reduced whole. Inputs of a few thousand elements take the branch-free
``+inf`` count on XLA:CPU too (``by_backend_and_size``): there a branch costs
more than the work.

softmax and log_softmax handle ``+inf`` by clamping each entry to the
largest finite value, branch-free; for large unmasked 16-bit inputs, where
that clamp is 15-25% of XLA:CPU's loop, it runs behind a branch there
(``_clamp_if_needed``).

Exported with ``jax.export`` at symbolic sizes, rows are reduced in blocks
only if their length is known, the rare branch's chunks of rows are single
rows, and the row maximum avoids ``lax.reduce`` (whose derivative JAX takes
only at known sizes); compiled at known sizes nothing changes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap

from jsoftmax._validation import class_count, known_sizes, split_along


def by_backend(*args, cpu, other):
    """``cpu(*args)`` when compiled for XLA:CPU, ``other(*args)`` for GPU and TPU.

    The choice is made when lowering (``lax.platform_dependent``), so the
    compiled program holds one of them and no branch. The CPU forms are tuned
    to XLA:CPU's fusion; on a GPU a ``lax.cond`` costs a device-to-host copy of
    its predicate and a sync, and a loop step a launch or more, so the other
    forms compute without them.
    """
    return lax.platform_dependent(*args, cpu=cpu, default=other)


# Inputs of at most this many elements take the branch-free +inf count on XLA:CPU
# too: there a lax.cond's predicate and branch thunks cost more per call than the
# extra pass they spare (integer-label loss and logsumexp forward, per call on this
# CPU: 0.65-0.99 of the time at 640 to 4096 elements, 0.9-1.7 from 8192 up).
_BRANCH_FREE_ELEMENTS = 4096


def by_backend_and_size(*args, cpu, other):
    """``by_backend``, with ``other`` also on XLA:CPU for a first argument of few elements.

    Decided from the shapes when tracing (symbolic sizes keep ``by_backend``).
    """
    first = args[0]
    if known_sizes(*first.shape) and first.size <= _BRANCH_FREE_ELEMENTS:
        return other(*args)
    return by_backend(*args, cpu=cpu, other=other)


def masked(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``x`` with the masked-out entries set to ``-inf``, so they take no probability."""
    if mask is None:
        return x
    return jnp.where(mask, x, -jnp.inf)


def _largest(dtype) -> float:
    return float(jnp.finfo(dtype).max)


@jax.jit
def _min_keeping_nan(bound: jax.Array, x: jax.Array) -> jax.Array:
    """``min(bound, x)``, NaN wherever ``x`` is NaN, also on XLA:CPU.

    XLA:CPU's fused kernels compute ``min(a, b)`` as x86's ``minps`` does,
    giving ``b`` when either is NaN (openxla/xla#21461 is the same for max),
    and XLA moves a constant operand to the right, which would turn a NaN
    logit into ``bound``. Passed in as an argument of this call, which XLA
    inlines after that, the bound stays on the left. ``tests/test_stable.py``
    checks NaN rows at sizes that use those kernels.
    """
    return lax.min(bound, x)


@jax.jit
def _max_keeping_nan(bound: jax.Array, x: jax.Array) -> jax.Array:
    """``max(bound, x)``, NaN wherever ``x`` is NaN (see ``_min_keeping_nan``)."""
    return lax.max(bound, x)


def at_least_one(s: jax.Array) -> jax.Array:
    """``max(s, 1)``, NaN where ``s`` is."""
    return _max_keeping_nan(jnp.ones((), s.dtype), s)


def clamped(x: jax.Array) -> jax.Array:
    """``min(x, largest finite)``: ``+inf`` clamped, NaN kept."""
    return _min_keeping_nan(jnp.asarray(_largest(x.dtype), x.dtype), x)


def row_max(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """The row maximum, at least the most negative finite value (keepdims).

    The floor is the reduction's start value, so it costs nothing in the hot
    loop; ``jnp.max(initial=...)`` would add a clamp between the reductions
    instead. XLA drops the start value of a reduction over one element, so
    there (and for no element) the floor is applied explicitly.
    """
    floor = -_largest(x.dtype)
    if not known_sizes(*x.shape):
        # JAX differentiates lax.reduce only at known sizes (not jax.export's symbolic ones)
        return jnp.maximum(jnp.max(x, axis=axes, keepdims=True), floor)
    m = jnp.expand_dims(lax.reduce(x, np.array(floor, x.dtype), lax.max, axes), axes)
    if class_count(x.shape, axes) <= 1:
        m = jnp.maximum(m, floor)
    return m


def _count_infinite_if_any(x, mask, dtype, m, s, axes):
    """``s``, with the rows where ``m = +inf`` set to their number of ``+inf`` entries.

    A NaN entry makes the count NaN: ``s`` of a ``+inf`` row is NaN anyway
    (``inf - inf``), so the count is what has to carry it, and XLA:CPU's fused
    max can give ``m = +inf`` for a row holding both.

    On XLA:CPU the count runs only when some row has a ``+inf``; the branch
    takes the raw ``x`` and ``mask``: a branch operand is a buffer, and the
    masked, cast logits would otherwise be written out. Unmasked float16 rows
    reduced whole are the exception: XLA:CPU writes their float32 copy out for
    the sum anyway (its fused reductions take no float16 convert), and the
    branch then takes that copy rather than making its own (label smoothing
    held both: 64 MiB against 32 at 8192 x 1024). The copy of rows reduced in
    blocks is not shared so: a float32 operand there doubled the memory and
    cost 1.5-1.6x the time (integer labels, 64 x 131072). Elsewhere, and for
    small inputs, it always runs, next to the sum.
    """

    def with_count(is_inf, m, s):
        """``s``, or where ``m = +inf`` the row sum of ``is_inf`` (1 for ``+inf``, NaN for NaN)."""
        count = jnp.sum(is_inf, axis=axes, keepdims=True)
        return jnp.where(m == jnp.inf, count, s)

    def count_infinite(x, mask, m, s):
        # Written with exp, which XLA:CPU fuses into the sum, where a
        # compare-and-sum would materialise a logits-sized array.
        xm = masked_in(x, mask, dtype)
        is_inf = 1 - jnp.exp(_min_keeping_nan(jnp.zeros((), dtype), _largest(dtype) - xm))
        return with_count(is_inf, m, s)

    def keep(x, mask, m, s):
        return s

    def when_needed(x, mask, m, s):
        if x.dtype == jnp.float16 and mask is None and _cpu_block(x, axes, dtype) is None:
            x = x.astype(dtype)
        return lax.cond(jnp.any(m == jnp.inf), count_infinite, keep, x, mask, m, s)

    def always(x, mask, m, s):
        xm = masked_in(x, mask, dtype)
        is_inf = jnp.where(jnp.isnan(xm), jnp.nan, (xm == jnp.inf).astype(dtype))
        return with_count(is_inf, m, s)

    return by_backend_and_size(x, mask, m, s, cpu=when_needed, other=always)


def widened(x: jax.Array, dtype) -> jax.Array:
    """``x.astype(dtype)``, for backward passes; bfloat16 to float32 through its bits.

    The conversion is exact either way. A plain one in a backward pass is the
    same instruction as the forward's, which XLA merges, and XLA:CPU then
    writes the merged float32 copy of the logits out instead of converting
    inside each loop; moving the bits (the upper half of a float32) is an
    instruction of its own.
    """
    if x.dtype == jnp.bfloat16 and jnp.dtype(dtype) == jnp.float32:
        bits = lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
        return lax.bitcast_convert_type(lax.shift_left(bits, jnp.uint32(16)), jnp.float32)
    return x.astype(dtype)


def masked_in(x: jax.Array, mask: jax.Array | None, dtype) -> jax.Array:
    """``x`` in the compute ``dtype``, masked-out entries ``-inf``."""
    return masked(x.astype(dtype), mask)


def _max_in_own_dtype(x, mask, axes: tuple[int, ...], dtype) -> jax.Array:
    """``row_max`` of the masked ``x`` taken in ``x``'s own dtype (exact), cast to ``dtype``.

    For 16-bit logits this keeps the cast out of the max: a cast there makes
    XLA:CPU write the whole float32 copy out (measured 6x slower), while the
    sum that follows takes it in its loop.
    """
    return row_max(masked(x, mask), axes).astype(dtype)


def _max_and_sum(dtype, axes: tuple[int, ...], x: jax.Array, *mask: jax.Array):
    """Max and sum-exp of ``masked_in(x, mask, dtype)``; ``mask`` is optional, ``x``'s shape."""
    mask = mask[0] if mask else None

    def whole(x, mask):
        m = _max_in_own_dtype(x, mask, axes, dtype)
        s = jnp.sum(jnp.exp(masked_in(x, mask, dtype) - m), axis=axes, keepdims=True)
        return m, s

    def by_blocks(x, mask, block):
        return _max_and_sum_by_blocks(x, mask, axes, block, dtype)

    m, s = _by_row_length(x, mask, axes, dtype, whole, by_blocks)
    return m, _count_infinite_if_any(x, mask, dtype, m, s, axes)


# Rows longer than this many bytes are reduced in blocks: XLA:CPU's fused
# max-then-sum loop slows down about 3x once its rows stop fitting in cache
# (measured on a 2 MiB-L2 Xeon from 128 KiB rows up).
_LONGEST_ROW_BYTES = 128 * 1024
_BLOCK_BYTES = 32 * 1024
_SMALLEST_BLOCK = 512


def _contiguous_row_length(shape: tuple[int, ...], axes: tuple[int, ...]) -> int | None:
    """The length of a row if the reduced axes are the trailing ones, else None.

    Only then does ``reshape(-1, row_length)`` lay the rows out, for free.
    """
    if axes != tuple(range(len(shape) - len(axes), len(shape))):
        return None
    return class_count(shape, axes)


def _block_size(shape: tuple[int, ...], dtype, axes: tuple[int, ...]) -> int | None:
    """The block length for reducing long rows piecewise, or None to reduce them whole.

    Blocks need the reduced axes to be the trailing ones (each row contiguous)
    and a block length that divides the row; rows with no divisor in range
    are reduced whole.
    """
    row_length = _contiguous_row_length(shape, axes)
    if row_length is None or not known_sizes(row_length):
        return None
    itemsize = np.dtype(dtype).itemsize
    if row_length * itemsize <= _LONGEST_ROW_BYTES:
        return None
    longest = _BLOCK_BYTES // itemsize
    for block in range(longest, _SMALLEST_BLOCK - 1, -1):
        if row_length % block == 0:
            return block
    return None


def _by_row_length(x, mask, axes: tuple[int, ...], dtype, whole, by_blocks):
    """``whole(x, mask)``, or on XLA:CPU ``by_blocks(x, mask, block)`` for rows too long for it.

    Off XLA:CPU rows are reduced whole: a GPU's reductions do not slow down on
    long rows, and the blocks' extra pass made them slower there.
    """
    block = _cpu_block(x, axes, dtype)
    if block is None:
        return whole(x, mask)
    return by_backend(x, mask, cpu=functools.partial(by_blocks, block=block), other=whole)


def _cpu_block(x: jax.Array, axes: tuple[int, ...], dtype) -> int | None:
    """The block length XLA:CPU reduces the rows of ``x`` in, or None where they are whole."""
    return None if split_along(x, axes) else _block_size(x.shape, dtype, axes)


def _max_and_sum_by_blocks(x, mask, axes: tuple[int, ...], block: int, dtype, clamp=False):
    """Max and sum-exp of each block of a row, combined as ``s = sum(s_b * exp(m_b - m))``.

    The blocks are a reshape of the raw ``x`` and ``mask``, cast and masked
    after it: prepared before it, the logits would be written out in full.
    Each block is the plain fused pattern on a short row. Blocks with no
    entry have ``m_b`` at the floor and ``s_b = 0``, so they add nothing; a
    ``+inf`` makes ``s`` NaN, for the caller's ``+inf`` count to replace,
    unless ``clamp`` takes the statistics of ``min(x, largest)`` instead.
    """
    row_shape = x.shape[: x.ndim - len(axes)]
    raw_blocks = x.reshape(-1, block)
    block_mask = None if mask is None else mask.reshape(-1, block)
    blocks = masked_in(raw_blocks, block_mask, dtype)
    block_max = _max_in_own_dtype(raw_blocks, block_mask, (1,), dtype)
    if clamp:
        # max(min(x, L)) is min(max(x), L): the max reads the blocks as they
        # are, so only the sum reads the clamped ones (a shared clamp would be
        # written out).
        block_max = jnp.minimum(block_max, _largest(dtype))
        blocks = clamped(blocks)
    block_sum = jnp.sum(jnp.exp(blocks - block_max), axis=1, keepdims=True)
    block_max = block_max.reshape(*row_shape, -1)
    block_sum = block_sum.reshape(*row_shape, -1)
    m = jnp.max(block_max, axis=-1, keepdims=True)
    s = jnp.sum(block_sum * jnp.exp(block_max - m), axis=-1, keepdims=True)
    keepdims_shape = (*row_shape, *(1 for _ in axes))
    return m.reshape(keepdims_shape), s.reshape(keepdims_shape)


def _one_call_under_vmap(fn, axes: tuple[int, ...], *arrays: jax.Array):
    """``fn(axes, *arrays)``, a row-wise function, kept one call under ``vmap``.

    A vmapped ``lax.cond`` with a batched predicate runs both branches; the
    rows are independent, so the batched call is the same function with the
    batch axis as one more row axis, and its rare branch stays rare. The
    first array has the full shape and the others broadcast to it; unbatched
    ones of the full shape are broadcast along the batch axis, smaller ones
    (class weights) only given a size-1 axis for it.
    """

    @custom_vmap
    def call(*arrays):
        return fn(axes, *arrays)

    @call.def_vmap
    def _rule(axis_size, in_batched, *arrays):
        if not any(in_batched):
            out = fn(axes, *arrays)
            return out, jax.tree.map(lambda _: False, out)
        full_shape = arrays[0].shape[1:] if in_batched[0] else arrays[0].shape

        def with_batch_axis(a, is_batched):
            if is_batched:
                return a
            if a.shape == full_shape:
                return jnp.broadcast_to(a, (axis_size, *a.shape))
            return jnp.expand_dims(a, 0)

        arrays = [with_batch_axis(a, b) for a, b in zip(arrays, in_batched, strict=True)]
        out = _one_call_under_vmap(fn, tuple(a + 1 for a in axes), *arrays)
        return out, jax.tree.map(lambda _: True, out)

    return call(*arrays)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _differentiable_max_and_sum(dtype, axes: tuple[int, ...], x: jax.Array, *mask: jax.Array):
    return _one_call_under_vmap(functools.partial(_max_and_sum, dtype), axes, x, *mask)


@_differentiable_max_and_sum.defjvp
def _max_and_sum_jvp(dtype, axes, primals, tangents):
    """The tangents of ``m`` (as ``jnp.max``'s) and of ``s``, for second derivatives.

    ``custom_vmap`` has no autodiff of its own; this rule gives the
    statistics one. Rows with a ``+inf`` have constant statistics; masked
    entries have no tangent.
    """
    x, *mask = primals
    m, s = _differentiable_max_and_sum(dtype, axes, *primals)
    mask = mask[0] if mask else None
    xm = masked_in(x, mask, dtype)
    dxm = masked_to_zero(tangents[0].astype(dtype), mask)
    dm = jax.jvp(lambda x: jnp.max(x, axis=axes, keepdims=True), (xm,), (dxm,))[1]
    has_inf = m == jnp.inf
    finite_m = jnp.where(has_inf, jnp.zeros_like(m), m)
    finite_x = jnp.where(has_inf, jnp.zeros_like(xm), xm)
    weights = jnp.where(has_inf, jnp.zeros_like(xm), jnp.exp(finite_x - finite_m))
    ds = jnp.sum(weights * (dxm - dm), axis=axes, keepdims=True)
    return (m, s), (jnp.where(has_inf, jnp.zeros_like(dm), dm), ds)


def _full_mask(x: jax.Array, mask: jax.Array | None) -> jax.Array | None:
    """``mask`` broadcast to ``x``'s shape (blocks reshape it as they reshape ``x``)."""
    return None if mask is None else jnp.broadcast_to(mask, x.shape)


def row_stats(
    x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...], dtype
) -> tuple[jax.Array, jax.Array]:
    """The row maximum ``m`` and ``log_s = log(sum(exp(xm - m)))``, both with ``keepdims``.

    ``xm = masked_in(x, mask, dtype)``, formed inside so that long rows can
    be split into blocks before it. ``m`` is at least the most negative
    finite value (so an empty row has a finite ``m`` and ``log_s = -inf``),
    ``+inf`` for a row with a ``+inf``.
    """
    mask_arguments = () if mask is None else (_full_mask(x, mask),)
    m, s = _differentiable_max_and_sum(dtype, axes, x, *mask_arguments)
    return m, jnp.log(s)


def _clamped_in(x: jax.Array, mask: jax.Array | None, dtype) -> jax.Array:
    return clamped(masked_in(x, mask, dtype))


def _clamped_stats_by_blocks(x, mask, axes, dtype, block):
    """For rows too long for the one-pass loop: the maximum and the divisor ``max(s, 1)``.

    They are computed block by block, apart from the elementwise pass that
    uses them (one read of the row for the statistics, one for the output).
    """
    m, s = _max_and_sum_by_blocks(x, _full_mask(x, mask), axes, block, dtype, clamp=True)
    return lax.optimization_barrier((m, at_least_one(s)))


# On XLA:CPU a row's max, sum and output fuse into one loop only for rows of at most
# this many entries; longer rows given their maximum by a branch's operand are
# written out between the sum and the output (measured slower).
_LONGEST_ONE_LOOP_ROW = 2048
# Below this many elements, a branch costs more per call than the clamp it spares.
_FEWEST_BRANCHING_ELEMENTS = 2**20


def _branch_pays(x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...], dtype) -> bool:
    """Whether XLA:CPU's softmax loop over ``x`` is faster behind a branch (``_clamp_if_needed``).

    Only for unmasked 16-bit ``x``, computed in float32. For float32 the
    branch gained at most 3% at 32 MiB and cost 15-25% at 4 MiB; with a
    logit mask, read by both passes, it cost 1.1-1.24x (bfloat16, 8192 x 1024).
    """
    if x.dtype == dtype or mask is not None or not known_sizes(*x.shape):
        return False
    if split_along(x, axes):
        return False
    row_length = class_count(x.shape, axes)
    return row_length <= _LONGEST_ONE_LOOP_ROW and x.size >= _FEWEST_BRANCHING_ELEMENTS


def _rows_shifted(
    finish, axes: tuple[int, ...], dtype, x: jax.Array, mask: jax.Array | None, may_branch: bool
):
    """``finish(xm - m, axes)`` for ``xm = masked_in(x, mask, dtype)`` and ``m`` its row maximum.

    ``+inf`` is clamped to the largest finite value first, so that the row's
    ``+inf`` entries get 0 and its finite ones about ``-largest``: they share
    the probability evenly, as the limit does. ``finish`` is the rest of an
    elementwise function of the row (its sums along ``axes``, the output
    dtype), which XLA fuses with the maximum into one loop.

    ``may_branch`` (not under a gradient): inputs where it pays
    (``_branch_pays``) take ``_clamp_if_needed``, the same values faster.
    """
    if may_branch and _branch_pays(x, mask, axes, dtype):
        return _clamp_if_needed(finish, axes, dtype, x)
    return _clamped_rows(finish, axes, dtype, x, mask)


def _clamped_rows(finish, axes: tuple[int, ...], dtype, x: jax.Array, mask: jax.Array | None):
    """``_rows_shifted`` branch-free: every entry clamped."""
    xm = _clamped_in(x, mask, dtype)
    return finish(xm - row_max(xm, axes), axes)


def _clamp_if_needed(finish, axes: tuple[int, ...], dtype, x: jax.Array):
    """``_clamped_rows`` of an unmasked ``x``, with the clamp behind a branch on XLA:CPU.

    The clamp is one more operation per entry, which makes XLA:CPU's loop
    15-25% slower than ``jax.nn``'s for bfloat16 (3-5% for float32). Here
    XLA:CPU takes the maximum first, apart, in ``x``'s own dtype, and runs the
    clamped form only when some row has a ``+inf`` (a ``lax.cond``, kept one
    call under ``vmap``), the plain one otherwise. Not under a gradient:
    there the forward's extra pass over the logits cost more than the clamp
    (4-10% of ``value_and_grad``), and the branch is never differentiated.
    Both forms give the same values. Other backends run the clamped form.
    """

    def branch_on_max(axes, x):
        m = _max_in_own_dtype(x, None, axes, dtype)

        def plain(x, m):
            return finish(x.astype(dtype) - m, axes)

        def clamped(x, m):
            shifted = x.astype(dtype) - shift_of(m)
            return finish(_min_keeping_nan(jnp.zeros((), dtype), shifted), axes)

        return lax.cond(jnp.any(m == jnp.inf), clamped, plain, x, m)

    def pick(axes, x):
        return by_backend(
            x,
            cpu=functools.partial(branch_on_max, axes),
            other=lambda x: _clamped_rows(finish, axes, dtype, x, None),
        )

    return _one_call_under_vmap(pick, axes, x)


def softmax_of(
    x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...], dtype, value_only: bool = False
) -> jax.Array:
    """softmax of ``masked_in(x, mask, dtype)``, in ``x``'s dtype; one loop over each row.

    The divisor ``max(s, 1)`` is ``s`` in every row with an entry (its maximum
    contributes 1) and 1 in an empty row, whose entries are all 0. Rows too
    long for the one loop take their statistics block by block first.
    ``value_only``: not under a gradient (see ``_clamp_if_needed``).
    """

    def probabilities(shifted, axes):
        exps = jnp.exp(shifted)
        return (exps / at_least_one(jnp.sum(exps, axis=axes, keepdims=True))).astype(x.dtype)

    def whole(x, mask):
        return _rows_shifted(probabilities, axes, dtype, x, mask, value_only)

    def by_blocks(x, mask, block):
        m, divisor = _clamped_stats_by_blocks(x, mask, axes, dtype, block)
        return (jnp.exp(_clamped_in(x, mask, dtype) - m) / divisor).astype(x.dtype)

    return _by_row_length(x, mask, axes, dtype, whole, by_blocks)


def log_softmax_of(
    x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...], dtype, value_only: bool = False
) -> jax.Array:
    """log_softmax of ``masked_in(x, mask, dtype)``, in ``x``'s dtype, as ``softmax_of``."""

    def log_probabilities(shifted, axes):
        s = jnp.sum(jnp.exp(shifted), axis=axes, keepdims=True)
        return (shifted - jnp.log(at_least_one(s))).astype(x.dtype)

    def whole(x, mask):
        return _rows_shifted(log_probabilities, axes, dtype, x, mask, value_only)

    def by_blocks(x, mask, block):
        m, divisor = _clamped_stats_by_blocks(x, mask, axes, dtype, block)
        return ((_clamped_in(x, mask, dtype) - m) - jnp.log(divisor)).astype(x.dtype)

    return _by_row_length(x, mask, axes, dtype, whole, by_blocks)


def shift_of(m: jax.Array) -> jax.Array:
    """The per-row shift: the maximum, with ``+inf`` clamped to the largest finite value."""
    return jnp.minimum(m, _largest(m.dtype))


def _stretch(m: jax.Array) -> jax.Array:
    """Per row, 1, or the largest finite value in rows with a ``+inf`` entry.

    Their finite entries are at least one ulp of the largest value below it,
    so times this they overflow to ``-inf``, their log-probability in the limit.
    """
    return jnp.where(m == jnp.inf, _largest(m.dtype), 1).astype(m.dtype)


def half_shifted(xm: jax.Array, m: jax.Array) -> jax.Array:
    """``(xm - m) / 2``: exact, at most 0, and ``-inf`` wherever ``xm`` is.

    Halved before the subtraction: logits more than the largest float apart
    (possible only beyond half of it) give a finite half, so a label weight
    below 1, multiplied in before the loss doubles it back, keeps a loss
    within range finite. In a row with ``+inf`` entries those give ``inf``,
    clamped to 0, and the finite entries ``-inf``, their limit.
    """
    # Plus -m/2, not minus m/2: XLA:CPU shares one 0.5 between the row's product and
    # the entries', passed to the fused sum as an argument, which runs 1.3-1.5x slower.
    return jnp.minimum(xm * 0.5 + shift_of(m) * -0.5, 0) * _stretch(m)


def nonempty(log_s: jax.Array) -> jax.Array:
    """True for rows with some probability to share (False for empty, all ``-inf`` or masked)."""
    return log_s != -jnp.inf


def safe_log_s(log_s: jax.Array) -> jax.Array:
    """``log_s`` with the empty rows' ``-inf`` replaced by 0 (``half_shifted`` stays -inf)."""
    return jnp.where(nonempty(log_s), log_s, jnp.zeros_like(log_s))


def logsumexp_from_stats(m: jax.Array, log_s: jax.Array) -> jax.Array:
    """``m + log_s``: ``-inf`` for an empty row, ``+inf`` for a row with a ``+inf`` entry.

    NaN where ``log_s`` is, also in a row with a ``+inf`` entry.
    """
    total = shift_of(m) + log_s
    row_is_inf = (m == jnp.inf) & ~jnp.isnan(log_s)
    return jnp.where(row_is_inf, jnp.full_like(total, jnp.inf), total)


def z_loss_term(z_loss: float, lse: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """``z_loss * lse**2``, times ``scale`` if given, never through a subnormal factor.

    XLA:CPU flushes subnormal floats to 0, so a tiny ``z_loss`` (or ``z_loss``
    times a mean's ``1 / N``) would drop the term where ``lse**2``, up to 1e77,
    makes it count. As ``(r lse) * (scale * r lse)`` with ``r = sqrt(z_loss)``
    each factor underflows only where the term is negligible.

    On one-element arrays (one example) XLA regroups ``(r lse) * (r lse)`` as
    ``(lse lse) * (r r)``, whose ``lse**2`` overflows and whose ``r r`` is flushed
    to 0, a NaN where the term is 1e36 (found by ``tests/fuzz.py``); there the
    two factors pass an optimization barrier. Not on longer rows, where XLA
    keeps them apart: on a GPU a barrier splits a fused loss into more kernels.
    """
    rooted = math.sqrt(z_loss) * lse
    scaled = rooted if scale is None else scale * rooted
    if not known_sizes(*lse.shape) or lse.size <= 1:
        rooted, scaled = lax.optimization_barrier((rooted, scaled))
    return rooted * scaled


def z_loss_slope(z_loss: float, lse: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """``2 z_loss lse``, times ``scale`` if given: ``z_loss_term``'s derivative."""
    scaled_lse = lse if scale is None else scale * lse
    if 2 * z_loss >= jnp.finfo(lse.dtype).tiny:
        return (2 * z_loss) * scaled_lse
    # XLA folds constant factors into one, here subnormal: the sum keeps them apart.
    root = math.sqrt(z_loss)
    rooted = root * scaled_lse
    return (rooted + rooted) * root


def scaled_probabilities(
    x: jax.Array,
    mask: jax.Array | None,
    m: jax.Array,
    log_s: jax.Array,
    row_scale: jax.Array,
    *,
    infinite_scale: bool = False,
) -> jax.Array:
    """``row_scale * softmax`` from the saved row statistics, for the backward passes.

    Exact to a few ulps; 0 in empty rows and masked entries. One elementwise
    pass over ``x`` with the per-row factors ``-m`` and ``row_scale / s``. They
    are meant to be computed apart (an optimization barrier), but XLA:CPU
    (jaxlib 0.10.2) drops the barrier and computes them inside the loop, for
    every entry, so the per-row work is kept short. ``x + (-m)`` rather than
    the forward's ``x - m`` keeps XLA from merging this pass into the forward
    and holding a logits-sized array between the two.

    ``infinite_scale``: ``row_scale`` may be infinite in a row with a ``+inf``
    logit (its z-loss); there the ``+inf`` entries get the infinite gradient
    and the others 0, not ``inf * 0 = NaN``. The factor is clipped to the
    largest finite value and, in such rows only, the exponent may reach 1, so
    ``e`` times the largest overflows exactly at the ``+inf`` entries. (The
    earlier form, a factor of 2 per entry in such rows, made the integer-label
    z-loss backward 12% slower on XLA:CPU.)
    """
    neg_shift = -shift_of(m)
    factor = row_scale / jnp.exp(safe_log_s(log_s))
    if not infinite_scale:
        neg_shift, factor = lax.optimization_barrier((neg_shift, factor))
        return masked_to_zero(jnp.exp(jnp.minimum(x + neg_shift, 0)) * factor, mask)
    largest = _largest(factor.dtype)
    factor = jnp.clip(factor, -largest, largest)
    exponent_cap = jnp.where(m == jnp.inf, jnp.ones_like(m), jnp.zeros_like(m))
    neg_shift, factor, exponent_cap = lax.optimization_barrier((neg_shift, factor, exponent_cap))
    return masked_to_zero(jnp.exp(jnp.minimum(x + neg_shift, exponent_cap)) * factor, mask)


def masked_to_zero(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return values
    return jnp.where(mask, values, jnp.zeros_like(values))


def rows_with_fallback(
    fast, exact, axes: tuple[int, ...], *arrays: jax.Array, other=None
) -> jax.Array:
    """``fast(axes, *arrays)``, a per-row result, its NaN and infinite rows redone by ``exact``.

    For formulas XLA fuses into one loop only without guards: ``fast`` may
    give NaN on the edge rows (empty, ``+inf``, ``0 * -inf``) and overflow
    where ``exact`` does not (logits more than the largest float apart), and ``exact``,
    which handles them, runs only when some row needs it, a chunk of rows at
    a time (its memory is reserved even when it does not run). Off XLA:CPU
    ``exact`` alone runs, with no branch. Like the statistics above it stays
    one call under ``vmap``, and its derivatives are those of ``exact``. The
    first array has the full shape; the others broadcast to it (class
    weights, laid along the classes).

    Unlike the ``+inf`` count, this branch stays on small inputs: per call,
    ``exact`` alone measured 0.65-0.73 of the time at 1280 and 4096 elements,
    but 1.23-1.38 at 2048-2560 (soft labels on this CPU).

    ``other``, if given, replaces ``exact`` off XLA:CPU: the same values in a
    form the other compilers run faster.
    """
    off_cpu = exact if other is None else other

    def pick(axes, *arrays):
        def fast_then_redo(*arrays):
            out = fast(axes, *arrays)

            def redo(arrays, out):
                return jnp.where(jnp.isfinite(out), out, _by_row_chunks(exact, axes, *arrays))

            needs_redo = ~jnp.all(jnp.isfinite(out))
            return lax.cond(needs_redo, redo, lambda arrays, out: out, arrays, out)

        return by_backend(*arrays, cpu=fast_then_redo, other=lambda *a: off_cpu(axes, *a))

    @jax.custom_jvp
    def differentiable(*arrays):
        return _one_call_under_vmap(pick, axes, *arrays)

    @differentiable.defjvp
    def _jvp(primals, tangents):
        exact_tangent = jax.jvp(lambda *a: exact(axes, *a), primals, tangents)[1]
        return differentiable(*primals), exact_tangent

    return differentiable(*arrays)


# Rows per chunk for a rarely taken exact branch: its guards make XLA write
# intermediates out, and a compiled branch reserves that memory even when it
# never runs, so it works on this much of the input at a time.
_CHUNK_BYTES = 256 * 1024


def _as_bits(array: jax.Array) -> jax.Array:
    """bfloat16 as its bits, ``uint16``, for a loop over chunks of rows.

    XLA:CPU has no bfloat16 dynamic-slice: it widens the whole array to
    float32 ahead of the loop (twice its size, held for a branch that rarely
    runs). The bits cost one copy of the array's own size instead.
    """
    if array.dtype == jnp.bfloat16:
        return lax.bitcast_convert_type(array, jnp.uint16)
    return array


def _from_bits(array: jax.Array, dtype) -> jax.Array:
    """Undoes ``_as_bits``."""
    return array if array.dtype == dtype else lax.bitcast_convert_type(array, dtype)


def _by_row_chunks(fn, axes: tuple[int, ...], *arrays: jax.Array) -> jax.Array:
    """``fn(axes, *arrays)``, a per-row result (keepdims), computed a chunk of rows at a time.

    Only when the reduced axes are the trailing ones (a free reshape);
    otherwise in one go. With symbolic sizes (``jax.export``) a row at a time.
    The first array has the full shape; the others broadcast to it, and those
    of size 1 on every row axis are passed whole to each chunk.
    """
    shape = arrays[0].shape
    row_length = _contiguous_row_length(shape, axes)
    if row_length is None or split_along(arrays[0], axes):
        return fn(axes, *arrays)
    row_shape = shape[: len(shape) - len(axes)]
    rows = math.prod(row_shape)
    if known_sizes(*shape):
        itemsize = max(a.dtype.itemsize for a in arrays)
        chunk = max(1, _CHUNK_BYTES // max(1, row_length * itemsize))
        if rows <= chunk:
            return fn(axes, *arrays)
    else:
        chunk = None  # lax.map's chunks need a known number of rows
    # Arrays the same along every row (class weights, a loss scale) stay whole, not one per row.
    is_per_row = [a.shape[: len(row_shape)] != (1,) * len(row_shape) for a in arrays]
    mapped = [
        _as_bits(jnp.broadcast_to(a, shape).reshape(rows, row_length))
        for a, per_row in zip(arrays, is_per_row, strict=True)
        if per_row
    ]
    mapped_dtypes = [a.dtype for a, per_row in zip(arrays, is_per_row, strict=True) if per_row]
    whole = [a.reshape(-1) for a, per_row in zip(arrays, is_per_row, strict=True) if not per_row]

    def on_rows(row):
        row = [_from_bits(r, dtype) for r, dtype in zip(row, mapped_dtypes, strict=True)]
        mapped_next, whole_next = iter(row), iter(whole)
        return fn((0,), *(next(mapped_next if per_row else whole_next) for per_row in is_per_row))

    out = lax.map(on_rows, mapped, batch_size=chunk)
    return out.reshape(*row_shape, *(1 for _ in axes))
