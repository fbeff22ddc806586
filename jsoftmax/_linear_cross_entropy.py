"""Fused linear head + softmax cross-entropy that never builds the logits matrix.

``linear_softmax_cross_entropy(x, w, labels, b)`` is the cross-entropy of the
logits ``x @ w + b`` against integer labels, computed a chunk of rows at a time
so that neither the ``[N, C]`` logits nor their gradient ever exist whole.

How it works (all of it plain ``jnp``/``lax``, no custom kernels):

* The rows are processed in chunks of ``chunk_size`` rows by a ``fori_loop``.
  Each step computes one ``[chunk_size, C]`` tile of logits (a matmul with
  float32 accumulation), its row maximum, ``log sum exp`` and the per-example
  loss. Only per-row numbers leave the step.
* The label logit ``z[i, y_i]`` is computed directly as ``x_i . w[:, y_i]``
  (plus ``b[y_i]``), so the tile is not needed after its reductions and XLA can
  turn it into the gradient tile in place: one tile is live at a time.
* ``reduction="mean"`` or ``"sum"`` (a scalar loss): when differentiated, the
  forward computes the gradients in the same sweep, while the tile is in
  memory (the trick of Liger Kernel's fused linear cross-entropy). The
  gradients ``dx``, ``dw``, ``db`` are the residuals, and the backward only
  scales them by the incoming scalar cotangent: three matmuls in all, the same
  count as the unfused path, and no recompute.
* ``reduction="none"``: the backward needs the per-example cotangent, which the
  forward does not know, so the forward saves only the per-row ``logsumexp``,
  as its two parts, the maximum and the log-sum (the trick of Apple's Cut
  Cross-Entropy; kept apart, the probabilities stay exact at large logits)
  and the backward recomputes each logit tile, weighting row ``i`` of the
  gradient tile by the cotangent of example ``i``. This is exact for any
  cotangent, at the cost of one extra matmul.
* ``dw`` is accumulated in place in a ``[D, C]`` loop carry (on XLA:CPU one
  block of columns at a time, which stays in cache), so no second ``[D, C]``
  temporary is made; ``dx`` rows are written once per chunk.
* Under explicit sharding the examples, the classes, or both can stay split
  over devices (data and vocabulary parallelism): the same loop runs in a
  ``shard_map`` on each device's rows and columns; with split classes each
  chunk's row maximum is a ``pmax`` and its sum of exponentials, label logit
  and logit sum one ``psum`` over the devices, and ``dx`` is summed once.
* Exported with ``jax.export`` at a symbolic number of rows, the rows are
  padded with zero-weight examples to whole chunks (a copy of ``x``) and the
  loop is a ``scan`` over the chunks, so that every slice provably fits and
  second derivatives still go through it.

With 16-bit inputs the gradient tile is rounded to the input dtype for its two
matmuls (float32 accumulation). For float16 it is weighted relative to the
chunk's largest cotangent and the matmul results are scaled back in float32, so
a mean's ``1 / count`` does not turn its small entries into float16 subnormals;
bfloat16 has float32's range and needs no scale.

Only the gradients of the inputs that are differentiated are computed (the
custom VJP uses symbolic zeros), so a frozen ``w`` costs no ``dw`` matmul.

Memory (XLA temp of ``jit(value_and_grad(..., argnums=(0, 1)))``, measured on
XLA:CPU at N=2048, D=512, C=32768, float32, default chunk of 256 rows): 35.5 MiB
against 512 MiB for optax on ``x @ w``; 32 MiB of it is the one logit tile, so
``chunk_size=128`` gives 18.8 MiB and ``chunk_size=64`` 10.4 MiB, at some speed
(each chunk re-reads ``w`` and re-writes ``dw``). With a bias or a soft-cap, in
the scalar-loss sweep XLA:CPU keeps a second tile-sized buffer (64.5 MiB there).
16-bit inputs accumulate ``dw`` in float32 (and XLA:CPU upcasts ``w`` for its
matmuls), so they need about ``2 * D * C * 4`` bytes more.
On a GPU (measured on an H100, jax 0.11.2) it holds 72.5 MiB at the default
chunk (1/7.1 of optax's): the tile, the 32 MiB workspace XLA gives each cuBLAS
call on Hopper, and the split-K partials of the ``dx`` matmul; at 1.7x optax's
time (larger chunks trade memory for time: 512 rows, 1/4 and 1.42x). See
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jsoftmax import _stable
from jsoftmax._label_check import checked_labels
from jsoftmax._validation import (
    as_bool_mask,
    as_float_array,
    as_int_array,
    check_ignore_index,
    check_label_smoothing,
    check_reduction,
    check_z_loss,
    compute_dtype,
    explicit_sharding,
    full_spec,
    is_concrete,
    known_sizes,
)

__all__ = ["linear_softmax_cross_entropy"]

# The default chunk: tiles of about _TILE_BYTES, but at least _PREFERRED_ROWS rows (fewer
# rows re-read w and re-write dw once per chunk for less matmul work: slower), and never a
# tile above _MAX_TILE_BYTES.
_TILE_BYTES = 32 * 2**20
_MAX_TILE_BYTES = 64 * 2**20
_PREFERRED_ROWS = 256
_MIN_CHUNK = 8
_MAX_CHUNK = 8192
# Bytes of one float32 [D, block] slab of the dw update that the class block aims for.
_BLOCK_BYTES = 2 * 2**20


def default_chunk_size(n: int, d: int, c: int) -> int:
    """The default number of rows per chunk for ``n`` rows, ``d`` features, ``c`` classes.

    Rows enough for a float32 ``[chunk, c]`` tile of 32 MiB, but at least 256 rows (each
    chunk reads ``w`` and updates ``dw`` once, so short chunks are slow), as long as
    the tile stays within 64 MiB; a multiple of 8 in ``[8, 8192]``, and at most ``n``.
    At N=2048, D=512, C=32768 that is 256 rows: a 32 MiB tile against 256 MiB of logits;
    at C=131072, 128 rows. With a symbolic ``c`` (``jax.export``) the tile's size is
    unknown: 256 rows; a symbolic ``n`` sets no bound.
    """
    del d  # the tile, not the matmul operands, is what costs memory
    if known_sizes(c):
        row_bytes = 4 * max(c, 1)
        rows = max(_TILE_BYTES // row_bytes, _PREFERRED_ROWS)
        rows = min(rows, _MAX_TILE_BYTES // row_bytes, _MAX_CHUNK)
        rows = max(_MIN_CHUNK, rows - rows % _MIN_CHUNK)
    else:
        rows = _PREFERRED_ROWS
    return max(1, min(rows, n)) if known_sizes(n) else rows


def _class_block(d: int, c: int) -> int:
    """Columns of ``dw`` updated per inner step: a float32 ``[d, block]`` slab of ~2 MiB.

    All of them at once when a size is symbolic (``jax.export``).
    """
    if not known_sizes(d, c):
        return c
    cols = _BLOCK_BYTES // (4 * max(d, 1))
    cols = 1 << max(3, int(math.log2(max(cols, 1))))
    return min(cols, c)


class _Config(NamedTuple):
    """Static settings of one call, hashed into the custom_vjp's nondiff argument.

    ``class_axes`` names the mesh axes that split ``w``'s classes inside
    ``shard_map`` (vocabulary parallelism; empty when each device has them all):
    each device then holds ``num_classes / devices`` of them, and the per-row
    reductions over classes are completed across those devices.
    """

    label_smoothing: float
    z_loss: float
    softcap: float | None
    reduction: str
    chunk: int
    block: int
    num_classes: int
    class_axes: tuple[str, ...] = ()


def _dot(a, b, contract_a: int, contract_b: int, dtype):
    return lax.dot_general(
        a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=dtype
    )


def _acc_dtype(x: jax.Array) -> jnp.dtype:
    return compute_dtype(x.dtype)


def _first_class(cfg: _Config, local_classes: int):
    """The class index of this device's first column of ``w`` (0 unless classes are split)."""
    if not cfg.class_axes:
        return 0
    return lax.axis_index(cfg.class_axes) * local_classes


def _over_classes(cfg: _Config, reduce, *values):
    """Per-row partial reductions over this device's classes, completed over all of them.

    ``reduce`` is ``lax.psum`` or ``lax.pmax``; one collective for all ``values``
    (None entries pass through). Without split classes the values are complete.
    """
    if not cfg.class_axes:
        return values
    present = [v for v in values if v is not None]
    done = iter(reduce(present, cfg.class_axes))
    return tuple(None if v is None else next(done) for v in values)


def _capped(cfg: _Config, z):
    return z if cfg.softcap is None else cfg.softcap * jnp.tanh(z / cfg.softcap)


def _logit_tile(cfg: _Config, x_c, w, b, acc):
    """The (soft-capped) logits of one chunk of rows, ``[chunk, C]`` in ``acc``."""
    z = _dot(x_c, w, 1, 0, acc)
    if b is not None:
        z = z + b[None, :]
    return _capped(cfg, z)


def _label_logit(cfg: _Config, x_c, w, b, y_c, acc):
    """The raw (not soft-capped) ``z[i, y_i]`` of one chunk, from ``x_i`` and ``w[:, y_i]``.

    A second dot product, rounded apart from the tile's (by up to an ulp of the
    logits): read off the tile instead, XLA:CPU keeps a second tile in the
    gradient sweep (64.5 MiB instead of 35.5 at the benchmark's shape).
    With split classes it is this device's part: 0 unless it holds ``y_i``.
    """
    local_classes = w.shape[1]
    local_y = y_c - _first_class(cfg, local_classes)
    w_y = jnp.take(w, local_y, axis=1, mode="clip")  # [D, chunk]; y_c is already in range
    z_y = jnp.sum(x_c.astype(acc) * w_y.T.astype(acc), axis=1)
    if b is not None:
        z_y = z_y + jnp.take(b, local_y, mode="clip")
    if cfg.class_axes:
        held = (local_y >= 0) & (local_y < local_classes)
        z_y = jnp.where(held, z_y, jnp.zeros((), acc))
    return z_y


def _logit_mean(cfg: _Config, z):
    """Per-row mean of the (soft-capped) logits, for label smoothing; None without it.

    Read off the tile, as the unfused loss reads it off the logits: ``x . mean_c(w) +
    mean_c(b)`` would save that pass, but where ``x . w[:, c]`` and ``b[c]`` cancel
    (a logit of 0 from a weight of -1e30 and a bias of 1e30) the two means are
    huge and their sum keeps none of the row's own logits. Each logit is divided
    by ``C`` before the sum, which would overflow first for logits near the
    largest float. With split classes, this device's classes' part of it.
    """
    if cfg.label_smoothing == 0.0:
        return None
    return jnp.sum(z * (1.0 / cfg.num_classes), axis=1)


def _row_loss(cfg: _Config, z, z_y, logit_mean, coef, want_probs: bool = False):
    """Per-row weighted loss ``coef_i * loss_i`` and statistics (maximum, log-sum) of a logit tile.

    ``z_y`` is the raw label logit and ``logit_mean`` the mean of the row's logits
    (None without label smoothing); with split classes, this device's part.
    Rows with ``coef_i == 0`` give an exact 0, and so do rows with no
    probability (every logit ``-inf``). ``+inf`` logits share the probability, as
    in the unfused losses: the maximum is clamped to the largest float for the
    shift, and a finite label logit in their row has log-probability ``-inf``.

    With ``want_probs`` also returns the softmax of the tile. Without a soft-cap
    it is made from the same ``exp`` as the sum, in place of the tile (which is
    not needed afterwards), so each logit is exponentiated once; with one, the
    tile is still needed for the cap's derivative, and the softmax is
    recomputed from it in the same pass that makes the gradient.

    (Every tile-sized value here has a single consumer after the reductions, so
    XLA updates the one tile in place instead of keeping a second one.)
    """
    (m,) = _over_classes(cfg, lax.pmax, _stable.row_max(z, (1,))[:, 0])
    eps = cfg.label_smoothing
    e = jnp.exp(_shifted_tile(z, m))
    shifted_sum, z_y, logit_mean = _over_classes(cfg, lax.psum, jnp.sum(e, axis=1), z_y, logit_mean)
    z_y = _capped(cfg, z_y)
    if cfg.num_classes == 1:
        z_y = m  # the one class's logit, exactly: its cross-entropy is 0, not an ulp of it
    probs = None
    if want_probs and cfg.softcap is None:
        probs = e * (1.0 / _stable.at_least_one(shifted_sum))[:, None]
    log_sum = jnp.log(shifted_sum)
    lse = _stable.logsumexp_from_stats(m, log_sum)
    if want_probs and probs is None:
        probs = _probabilities(z, m, log_sum)
    # In halves, doubled once coef is in: logits more than the largest float
    # apart overflow only where the row's loss does. z_y <= m, but computed
    # apart it can exceed m by an ulp: never a negative loss.
    half_log_sum = _stable.safe_log_s(log_sum) * 0.5
    half_loss = (1.0 - eps) * (half_log_sum - _stable.half_shifted(z_y, m))
    if eps > 0.0:
        half_mean_gap = logit_mean * 0.5 + _stable.shift_of(m) * -0.5
        # Under a +inf logit every other class has log-probability -inf.
        others = jnp.where(shifted_sum < cfg.num_classes, -jnp.inf, 0.0).astype(lse.dtype)
        half_mean_gap = jnp.where(m == jnp.inf, others, half_mean_gap)
        half_loss = half_loss + eps * (half_log_sum - half_mean_gap)
    row = 2 * (coef * half_loss)
    if cfg.z_loss > 0.0:
        # coef first: lse**2 can pass the largest float where a mean's share of it does not.
        row = row + _stable.z_loss_term(cfg.z_loss, lse, coef)
    row = jnp.where((coef != 0) & _stable.nonempty(log_sum), row, jnp.zeros((), row.dtype))
    return row, (m, log_sum), probs


def _shifted_tile(z, m):
    """``z - m`` with ``+inf`` (in ``z`` and ``m``) clamped to the largest float: 0 for the
    row's ``+inf`` logits, which share the probability, and ``-inf`` for a row of ``-inf``
    (``m`` is at least the most negative float)."""
    return _stable.clamped(z) - _stable.shift_of(m)[:, None]


def _probabilities(z, m, log_sum):
    """The softmax of a tile from its row statistics; ``z - m`` is exact, ``z - lse`` is not."""
    return jnp.exp(_shifted_tile(z, m) - _stable.safe_log_s(log_sum)[:, None])


def _grad_tile(cfg: _Config, z, probs, stats, y_c, coef):
    """The gradient of ``sum_i coef_i * loss_i`` w.r.t. the raw logits of one chunk.

    ``z`` (the soft-capped logits) is used only for the soft-cap's derivative,
    ``stats`` (each row's max and log-sum) for the z-loss's and to find rows with
    no probability. Those and ``coef_i == 0`` rows get an exact 0 (even if their
    logits are not finite).
    """
    num_classes = cfg.num_classes
    p = probs
    m, log_sum = stats
    if cfg.z_loss > 0.0:
        lse = _stable.logsumexp_from_stats(m, log_sum)
        scaled = p * (1.0 + _stable.z_loss_slope(cfg.z_loss, lse))[:, None]
        # Under a +inf logit the slope is inf: the other classes' gradient stays 0.
        p = jnp.where(p == 0, p, scaled)
    eps = cfg.label_smoothing
    local_y = y_c - _first_class(cfg, p.shape[1])
    onehot = lax.broadcasted_iota(jnp.int32, p.shape, 1) == local_y[:, None]
    target = jnp.where(onehot, 1.0 - eps + eps / num_classes, eps / num_classes)
    g = (p - target.astype(p.dtype)) * coef[:, None]
    if cfg.softcap is not None:
        # 1 - (z / s)**2 as (s - |z|)(s + |z|) / s**2: exactly 0 where tanh saturates
        # (z / s would be rounded below 1), and no cancellation near it.
        cap = cfg.softcap
        g = g * ((cap - jnp.abs(z)) * (cap + jnp.abs(z)) * (1.0 / (cap * cap)))
    taking_part = (coef != 0) & _stable.nonempty(log_sum)
    return jnp.where(taking_part[:, None], g, jnp.zeros((), p.dtype))


def _tile_scale(coef_c):
    """The largest finite ``|coef_i|`` of a chunk (1 if none is nonzero).

    For float16 inputs the gradient tile is rounded to float16 for its matmuls.
    Weighted by ``coef`` (``1 / count`` for a mean) its small entries would
    become subnormals; weighted by ``coef / scale`` (exactly 1 for a mean) they
    keep float16's full precision, and the matmul results, accumulated in
    float32, are multiplied by the scale. Not for bfloat16, which has float32's
    range and needs none.
    """
    size = jnp.max(jnp.where(jnp.isfinite(coef_c), jnp.abs(coef_c), jnp.zeros((), coef_c.dtype)))
    return jnp.where(size > 0, size, jnp.ones((), coef_c.dtype))


def _scaled(value, scale):
    return value if scale is None else value * scale


def _chunk_start(i, n: int, chunk: int):
    """Start row of chunk ``i``: the last chunk is shifted back to end at row ``n``."""
    return jnp.minimum(i * chunk, n - chunk)


def _fresh_rows(i, start, n: int, chunk: int):
    """Rows of the chunk not already covered by the previous one (all, unless shifted)."""
    if n % chunk == 0:
        return None
    return start + lax.iota(jnp.int32, chunk) >= i * chunk


def _over_chunks(count, body, init):
    """``lax.fori_loop(0, count, body, init)``.

    With a symbolic ``count`` (``jax.export``) a ``fori_loop`` is a while loop,
    which reverse-mode autodiff cannot go through (the backward pass is
    differentiable for second derivatives); a ``scan`` over the chunk indices can.
    """
    if known_sizes(count):
        return lax.fori_loop(0, count, body, init)
    return lax.scan(lambda carry, i: (body(i, carry), None), init, jnp.arange(count))[0]


def _varying_axes(a) -> frozenset:
    """The manual mesh axes ``a`` varies over inside ``jax.shard_map`` (none elsewhere).

    Read from its type: ``manual_axis_type.varying`` in this JAX, ``vma`` in others.
    """
    aval = jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def _varying_like(inputs, *carries, reduced=()):
    """The loop's initial carries, typed as varying over the inputs' manual mesh axes.

    Inside ``jax.shard_map`` a loop carry must keep its type, and one computed
    from per-device inputs varies over their mesh axes, so its initial zeros
    must too, except over the axes ``reduced`` by a collective (per-row values
    completed over split classes). Elsewhere there are no such axes and the
    carries are unchanged.
    """
    axes = frozenset().union(*(_varying_axes(a) for a in inputs if a is not None))
    axes -= frozenset(reduced)

    def cast(carry):
        missing = axes - _varying_axes(carry)
        if not missing:
            return carry
        return lax.pcast(carry, tuple(sorted(missing)), to="varying")

    return tuple(None if c is None else cast(c) for c in carries)


def _typed_like(gradient, primal):
    """``gradient`` varying over exactly the manual mesh axes ``primal`` varies over.

    Inside ``jax.shard_map`` the cotangent of an input the same on every device
    (say ``w``, with ``x`` split by rows) is the sum of every device's, as JAX's
    own autodiff gives it; elsewhere nothing changes. Called before the cast
    to a 16-bit input's dtype, so the sum is in float32.
    """
    if gradient is None:
        return None
    axes = _varying_axes(primal)
    extra = _varying_axes(gradient) - axes
    if extra:
        gradient = lax.psum(gradient, tuple(sorted(extra)))
    return _varying_like((primal,), gradient)[0]


def _loss_pass(cfg: _Config, x, w, b, y, coef):
    """Per-row weighted losses ``coef_i * loss_i`` (0 where ``coef_i == 0``) and row statistics.

    The statistics are each row's maximum logit and ``log(sum(exp(z - max)))``, kept
    apart: their sum, the logsumexp, would round away the probabilities' precision
    at large logits.
    """
    n = x.shape[0]
    acc = _acc_dtype(coef)
    chunk = cfg.chunk

    def body(i, carry):
        rows, maxima, log_sums = carry
        start = _chunk_start(i, n, chunk)
        x_c = lax.dynamic_slice_in_dim(x, start, chunk)
        y_c = lax.dynamic_slice_in_dim(y, start, chunk)
        coef_c = lax.dynamic_slice_in_dim(coef, start, chunk)
        z = _logit_tile(cfg, x_c, w, b, acc)
        logit_mean = _logit_mean(cfg, z)
        z_y = _label_logit(cfg, x_c, w, b, y_c, acc)
        row, (m, log_sum), _ = _row_loss(cfg, z, z_y, logit_mean, coef_c)
        rows = lax.dynamic_update_slice_in_dim(rows, row, start, 0)
        maxima = lax.dynamic_update_slice_in_dim(maxima, m, start, 0)
        log_sums = lax.dynamic_update_slice_in_dim(log_sums, log_sum, start, 0)
        return rows, maxima, log_sums

    init = _varying_like((x, w, b, y, coef), *(jnp.zeros((n,), acc),) * 3, reduced=cfg.class_axes)
    rows, maxima, log_sums = _over_chunks(-(-n // chunk), body, init)
    return rows, (maxima, log_sums)


def _grad_pass(cfg: _Config, x, w, b, y, coef, stats_saved, need_x, need_w, need_b):
    """Gradients of ``sum_i coef_i * loss_i`` w.r.t. ``x``, ``w``, ``b`` in one sweep.

    With ``stats_saved`` (the backward of ``reduction="none"``: the row maxima and
    log-sums of ``_loss_pass``) the row statistics are taken from it; without it
    they are computed here and the per-row weighted losses are returned too.
    Gradients not needed come back as None.
    """
    n, d = x.shape
    columns = w.shape[1]  # this device's classes
    acc = _acc_dtype(coef)
    chunk, block = cfg.chunk, cfg.block
    n_blocks = -(-columns // block)
    want_loss = stats_saved is None

    def dw_update(dw, x_c, g, g_scale):
        def inner(k, dw):
            col = jnp.minimum(k * block, columns - block)
            g_k = lax.dynamic_slice_in_dim(g, col, block, axis=1)
            if columns % block:
                fresh = col + lax.iota(jnp.int32, block) >= k * block
                g_k = jnp.where(fresh[None, :], g_k, jnp.zeros((), g_k.dtype))
            old = lax.dynamic_slice_in_dim(dw, col, block, axis=1)
            new = old + _scaled(_dot(x_c, g_k, 0, 0, acc), g_scale)
            return lax.dynamic_update_slice_in_dim(dw, new, col, axis=1)

        def whole(dw, x_c, g):
            return dw + _scaled(_dot(x_c, g, 0, 0, acc), g_scale)

        if n_blocks == 1:
            return whole(dw, x_c, g)
        # Blocks keep XLA:CPU's update in cache; on a GPU each loop step costs
        # more than the one large matmul.
        return _stable.by_backend(
            dw, x_c, g, cpu=lambda dw, *_: lax.fori_loop(0, n_blocks, inner, dw), other=whole
        )

    def body(i, carry):
        rows, dx, dw, db = carry
        start = _chunk_start(i, n, chunk)
        fresh = _fresh_rows(i, start, n, chunk)
        x_c = lax.dynamic_slice_in_dim(x, start, chunk)
        y_c = lax.dynamic_slice_in_dim(y, start, chunk)
        coef_c = lax.dynamic_slice_in_dim(coef, start, chunk)
        if fresh is not None:
            coef_c = jnp.where(fresh, coef_c, jnp.zeros((), acc))
        z = _logit_tile(cfg, x_c, w, b, acc)
        if want_loss:
            logit_mean = _logit_mean(cfg, z)
            z_y = _label_logit(cfg, x_c, w, b, y_c, acc)
            row, stats, probs = _row_loss(cfg, z, z_y, logit_mean, coef_c, want_probs=True)
            if fresh is not None:
                row = jnp.where(fresh, row, lax.dynamic_slice_in_dim(rows, start, chunk))
            rows = lax.dynamic_update_slice_in_dim(rows, row, start, 0)
        else:
            stats = tuple(lax.dynamic_slice_in_dim(t, start, chunk) for t in stats_saved)
            probs = _probabilities(z, *stats)
        g_scale = _tile_scale(coef_c) if x.dtype == jnp.float16 else None
        coef_g = coef_c if g_scale is None else coef_c / g_scale
        g = _grad_tile(cfg, z, probs, stats, y_c, coef_g)
        if db is not None:
            db = db + _scaled(jnp.sum(g, axis=0), g_scale)
        g_mm = g.astype(x.dtype)
        if dx is not None:
            dx_c = _scaled(_dot(g_mm, w, 1, 1, acc), g_scale)
            if fresh is not None:
                dx_c = jnp.where(fresh[:, None], dx_c, lax.dynamic_slice_in_dim(dx, start, chunk))
            dx = lax.dynamic_update_slice_in_dim(dx, dx_c, start, 0)
        if dw is not None:
            # rows that take no part must add exactly 0, even if their x is not finite
            x_live = jnp.where((coef_c != 0)[:, None], x_c, jnp.zeros((), x_c.dtype))
            dw = dw_update(dw, x_live, g_mm, g_scale)
        return rows, dx, dw, db

    inputs = (x, w, b, y, coef, *(stats_saved or ()))
    (rows,) = _varying_like(
        inputs, jnp.zeros((n,), acc) if want_loss else None, reduced=cfg.class_axes
    )
    # dx is a partial sum over this device's classes until _typed_like completes it.
    init = _varying_like(
        inputs,
        jnp.zeros((n, d), acc) if need_x else None,
        jnp.zeros((d, columns), acc) if need_w else None,
        jnp.zeros((columns,), acc) if need_b and b is not None else None,
    )
    return _over_chunks(-(-n // chunk), body, (rows, *init))


def _reduce(cfg: _Config, rows):
    return rows if cfg.reduction == "none" else jnp.sum(rows)


def _cast(value, like):
    return None if value is None else value.astype(like.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg: _Config, x, w, b, y, coef):
    """``sum``/rows of ``coef_i * loss_i``: the differentiable core, inputs pre-validated."""
    rows, _ = _loss_pass(cfg, x, w, b, y, coef)
    return _reduce(cfg, rows)


def _fused_fwd(cfg: _Config, x, w, b, y, coef):
    need_x, need_w = x.perturbed, w.perturbed
    need_b = b is not None and b.perturbed
    x, w, y, coef = x.value, w.value, y.value, coef.value
    b = None if b is None else b.value
    if cfg.reduction == "none":
        # The cotangent of each example is not known yet: keep the per-row
        # statistics (max, log-sum) and recompute the logit tiles in the backward.
        rows, stats = _loss_pass(cfg, x, w, b, y, coef)
        # Which gradients to compute, carried in the residuals' static structure.
        flags = {name: None for name, on in (("x", need_x), ("w", need_w), ("b", need_b)) if on}
        return rows, ((x, w, b, y, coef, stats), flags)
    # A scalar loss: the gradients for a unit cotangent are computed now, while
    # each logit tile is in memory; the backward only scales them.
    # They stay in the accumulation dtype (one rounding, in the backward, for 16-bit
    # inputs); zero-size markers carry the dtypes to return them in.
    rows, dx, dw, db = _grad_pass(cfg, x, w, b, y, coef, None, need_x, need_w, need_b)
    # Markers are typed as their inputs (also over shard_map's manual axes).
    markers = tuple(
        None if t is None else _varying_like((t,), jnp.zeros((0,), t.dtype))[0] for t in (x, w, b)
    )
    return jnp.sum(rows), ((dx, dw, db), markers)


def _fused_bwd(cfg: _Config, res, g):
    nothing = (None, None, None, None, None)
    if isinstance(g, SymbolicZero):
        return nothing
    if cfg.reduction != "none":
        grads, markers = res

        def scale(t, marker):
            if t is None:
                return None
            return _typed_like(g.astype(t.dtype) * t, marker).astype(marker.dtype)

        return tuple(scale(t, m) for t, m in zip(grads, markers, strict=True)) + (None, None)
    (x, w, b, y, coef, stats), flags = res
    weight = jnp.where(coef != 0, g.astype(coef.dtype) * coef, jnp.zeros((), coef.dtype))
    _, dx, dw, db = _grad_pass(
        cfg, x, w, b, y, weight, stats, "x" in flags, "w" in flags, "b" in flags
    )
    db = None if b is None or db is None else _cast(_typed_like(db, b), b)
    return (_cast(_typed_like(dx, x), x), _cast(_typed_like(dw, w), w), db, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def _fused_anywhere(cfg: _Config, x, w, b, y, coef):
    """``_fused``, also called eagerly inside a user's ``shard_map``.

    There a ``custom_vjp`` with symbolic zeros raises ``NotImplementedError``
    (jax 0.10); under ``jit`` it is traced as anywhere else. Not jitted
    always: a nested ``jit`` changes the compiled programs around it.
    """
    try:
        return _fused(cfg, x, w, b, y, coef)
    except NotImplementedError as error:
        if "symbolic_zeros" not in str(error):
            raise
        return jax.jit(_fused, static_argnums=0)(cfg, x, w, b, y, coef)


def _check_softcap(logit_softcap: float | None) -> float | None:
    if logit_softcap is None:
        return None
    if isinstance(logit_softcap, bool) or not isinstance(
        logit_softcap, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"logit_softcap must be None or a Python number, got {logit_softcap!r}")
    value = float(logit_softcap)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(
            f"logit_softcap must be None or a finite number > 0, got {logit_softcap!r}"
        )
    return value


def _check_chunk_size(chunk_size: int | None) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return int(chunk_size)


def _replicated(*arrays):
    """The arrays, gathered whole onto every device if any is split under explicit sharding.

    The chunk loop walks the rows of whole arrays (a ``dynamic_slice`` of a split
    axis does not type-check), so each device computes the whole loss.
    """
    split = [a for a in arrays if a is not None and explicit_sharding(a) is not None]
    if not split:
        return arrays
    if not all(is_concrete(a) for a in arrays if a is not None):
        return _resharded(arrays, explicit_sharding(split[0]).mesh, jax.sharding.PartitionSpec())
    # Called eagerly: put onto the arrays' mesh if one is set (jax.set_mesh), else
    # onto one device; without a mesh context the loop's fresh arrays carry no mesh.
    mesh = split[0].sharding.mesh
    if jax.sharding.get_abstract_mesh().empty:
        whole = jax.sharding.SingleDeviceSharding(mesh.devices.flat[0])
    else:
        whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return tuple(None if a is None else jax.device_put(a, whole) for a in arrays)


def _resharded(arrays, mesh, spec):
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return tuple(None if a is None else jax.sharding.reshard(a, sharding) for a in arrays)


class _Layout(NamedTuple):
    """How explicit sharding splits the problem: the mesh, and the mesh axes (or None)
    that split the examples and the classes."""

    mesh: jax.sharding.AbstractMesh
    rows: tuple[str, ...] | None
    classes: tuple[str, ...] | None

    def per_example(self) -> jax.sharding.PartitionSpec:
        """The spec of ``x``, the labels and the mask: examples split as the rows."""
        return jax.sharding.PartitionSpec(self.rows)

    def of_w(self) -> jax.sharding.PartitionSpec:
        return jax.sharding.PartitionSpec(None, self.classes)

    def of_b(self) -> jax.sharding.PartitionSpec:
        return jax.sharding.PartitionSpec(self.classes)


def _mesh_axes(part) -> tuple[str, ...] | None:
    if part is None:
        return None
    return tuple(part) if isinstance(part, tuple) else (part,)


def _devices_along(mesh, axes: tuple[str, ...] | None) -> int:
    return 1 if axes is None else math.prod(mesh.shape[name] for name in axes)


def _layout(x: jax.Array, w: jax.Array) -> _Layout | None:
    """What of the problem explicit sharding splits and stays split, or None.

    Examples split by the first batch axis of ``x`` (the other axes whole, so each
    device's examples stay contiguous once flattened) are kept split: data
    parallelism. The classes of ``w`` split over other mesh axes, its features
    whole, are kept split too, when they divide evenly: vocabulary parallelism.
    Anything else is gathered. Only for traced inputs (under ``jit`` or ``grad``):
    run eagerly, ``shard_map`` does not take ``_fused``'s symbolic zeros; and not
    inside a user's ``shard_map`` over some of the mesh axes, where a nested one
    does not lower in the backward pass (jax 0.10.2); nor at ``jax.export``'s
    symbolic sizes, whose division over devices is not known.
    """
    if (
        (is_concrete(x) and is_concrete(w))
        or getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
        or not known_sizes(*x.shape, *w.shape)
    ):
        return None
    x_sharding, w_sharding = explicit_sharding(x), explicit_sharding(w)
    rows = classes = mesh = None
    if x_sharding is not None and x.ndim >= 2:
        spec = full_spec(x)
        if all(part is None for part in spec[1:-1]):
            rows, mesh = _mesh_axes(spec[0]), x_sharding.mesh
    if w_sharding is not None and (mesh is None or w_sharding.mesh == mesh):
        d_part, c_part = full_spec(w)
        c_axes = _mesh_axes(c_part)
        if (
            d_part is None
            and c_axes is not None
            and not set(c_axes) & set(rows or ())
            and w.shape[1] % _devices_along(w_sharding.mesh, c_axes) == 0
        ):
            classes, mesh = c_axes, w_sharding.mesh
    if rows is None and classes is None:
        return None
    return _Layout(mesh, rows, classes)


def _laid_out(layout: _Layout, x, w, b, labels, mask):
    """The inputs split as ``layout`` says, everything else whole on every device."""
    x, labels, mask = _resharded((x, labels, mask), layout.mesh, layout.per_example())
    (w,) = _resharded((w,), layout.mesh, layout.of_w())
    (b,) = _resharded((b,), layout.mesh, layout.of_b())
    return x, w, b, labels, mask


def _fused_on_mesh(cfg: _Config, layout: _Layout, x, w, b, y, coef):
    """``_fused`` on each device's share (``jax.shard_map``), the results put together.

    Each device computes the loss of its own examples against its own classes;
    ``_fused`` completes the per-row reductions over the devices that split the
    classes, and its backward sums the gradients of inputs the same on every
    device (see ``_typed_like``). The scalar losses of the devices splitting the
    examples are added up here.
    """
    rows = layout.per_example()

    def local(x, w, y, coef, *bias):
        out = _fused(cfg, x, w, bias[0] if bias else None, y, coef)
        if cfg.reduction == "none" or layout.rows is None:
            return out
        return lax.psum(out, layout.rows)

    bias = () if b is None else (b,)
    return jax.shard_map(
        local,
        mesh=layout.mesh,
        in_specs=(rows, layout.of_w(), rows, rows, *(layout.of_b() for _ in bias)),
        out_specs=rows if cfg.reduction == "none" else jax.sharding.PartitionSpec(),
    )(x, w, y, coef, *bias)


def _padded_to_whole_chunks(chunk: int, x, y, coef):
    """The rows padded with zero-weight examples up to a multiple of ``chunk``.

    For a symbolic number of rows (``jax.export``): the loop's slices of
    ``chunk`` rows must provably fit, which ``n`` rows may not. The padding
    (a copy of ``x``) adds 0 to the loss and to ``dw``.
    """
    n = x.shape[0]
    extra = chunk * ((n + chunk - 1) // chunk) - n
    return tuple(
        jnp.concatenate([a, jnp.zeros((extra, *a.shape[1:]), a.dtype)]) for a in (x, y, coef)
    )


def _example_mask(where: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array | None:
    if where is None:
        return None
    mask = as_bool_mask(where)
    try:
        return jnp.broadcast_to(mask, shape)
    except ValueError:
        raise ValueError(
            f"where has shape {mask.shape}, which does not fit the per-example shape {shape} "
            "(labels' shape); linear_softmax_cross_entropy takes one mask value per example"
        ) from None


def linear_softmax_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    b: ArrayLike | None = None,
    *,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> jax.Array:
    """Softmax cross-entropy of ``x @ w + b`` without materialising the logits.

    Equal (to float32 rounding) to
    ``softmax_cross_entropy_with_integer_labels(x @ w + b, labels, ...)`` with
    the same options, but computed ``chunk_size`` rows at a time so that neither
    the ``[N, C]`` logits nor their gradient is ever held in memory: the largest
    temporary is one ``[chunk_size, C]`` tile. Gradients with respect to ``x``,
    ``w`` and ``b`` are exact (nothing is filtered or approximated).

    Args:
      x: features ``[..., D]``, floating point (bfloat16/float16 are computed
        with float32 accumulation).
      w: the head's weights ``[D, C]``.
      labels: integer class indices of shape ``x.shape[:-1]``.
      b: optional bias ``[C]``.
      where: optional boolean mask of ``labels``' shape; masked-out examples
        contribute 0 loss and 0 gradient.
      ignore_index: a label value whose examples are skipped like masked ones
        (PyTorch's ``ignore_index``).
      label_smoothing: in ``[0, 1]``; the target is
        ``(1 - label_smoothing) * onehot + label_smoothing / C``.
      z_loss: adds ``z_loss * logsumexp(logits) ** 2`` per example.
      logit_softcap: if given, the logits are ``s * tanh((x @ w + b) / s)``.
      reduction: ``"mean"`` (the default: the mean over the examples that are
        neither masked nor ignored, 0 if there are none; each loss is divided
        before the sum, so a representable mean is finite), ``"sum"`` or
        ``"none"`` (per-example losses of ``labels``' shape, masked ones 0).
      chunk_size: rows per chunk, the memory/speed trade-off: the largest
        temporary is a float32 ``[chunk_size, C]`` tile. By default, rows for
        a 32 MiB tile but at least 256 (at most a 64 MiB tile); see
        ``default_chunk_size``. Exported by ``jax.export`` with a symbolic
        class count, 256 rows.

    Returns:
      The loss: a scalar, or per-example losses for ``reduction="none"``;
      float32 for 16- and 32-bit inputs.

    Raises:
      ValueError / TypeError: at trace time, for shapes that do not fit
      (``w`` not ``[x.shape[-1], C]``, ``b`` not ``[C]``, ``labels`` not
      ``x.shape[:-1]``), non-floating ``x``/``w``/``b``, non-integer labels, or
      a bad option.

    Notes:
      A label outside ``[0, C)`` that is not ``ignore_index`` makes that
      example's loss and gradient NaN (as in
      ``softmax_cross_entropy_with_integer_labels``, even under ``where``); it
      is never wrapped to another class. It also fails a check:
      ``jax.experimental.checkify.checkify(f, errors=checkify.all_checks)``
      reports the label and its position, while under plain ``jit`` the check
      compiles to nothing and adds no effect.

      Under JAX's explicit sharding (inside ``jax.set_mesh``), examples split
      over devices by their first batch axis stay split: each device computes
      the loss and gradients of its own rows, and the sums are added up across
      devices (data parallelism). The classes of ``w`` (its second axis) split
      over other mesh axes stay split too, if they divide evenly (vocabulary
      parallelism): each device computes the logits of its own classes, the
      per-row maximum, sum of exponentials and label logit are completed
      across devices for each chunk, and ``dw``, ``db`` come back split as
      ``w``, ``b``. Inputs split any other way are gathered whole first:
      correct, but every device then does all the work.

      Inside ``jax.shard_map`` each device computes the loss of its own rows
      against the ``w`` it is given, taken as the whole head (a per-device
      block of classes there would give each block's own softmax); the
      gradients of inputs the same on every device (``w`` and ``b``, say) are
      summed over the devices, as JAX's autodiff does.

      The logits take their limits as in the unfused losses: ``+inf`` logits
      (from an infinite bias, say) share the probability, a row whose logits
      are all ``-inf`` has loss 0 and gradient 0, and a NaN makes its row's
      loss NaN. Infinite entries of ``x`` or ``w`` reach the other rows and
      classes as NaN through the matmuls' ``0 * inf``, as in ``x @ w`` itself.

      This is a ``jax.custom_vjp``: ``jax.grad``/``jax.vjp`` use the closed-form
      gradients; forward mode (``jax.jvp``, ``jax.jacfwd``) raises. For a scalar
      loss the gradients are computed during the forward sweep (no recompute);
      for ``reduction="none"`` the backward recomputes each logit tile from
      ``x`` and ``w`` and the saved per-row logsumexp.
    """
    x = as_float_array("x", x)
    w = as_float_array("w", w)
    b = None if b is None else as_float_array("b", b)
    labels = as_int_array("labels", labels)
    reduction = check_reduction(reduction)
    label_smoothing = check_label_smoothing(label_smoothing)
    z_loss = check_z_loss(z_loss)
    ignore_index = check_ignore_index(ignore_index)
    softcap = _check_softcap(logit_softcap)
    chunk_size = _check_chunk_size(chunk_size)

    if x.ndim < 1:
        raise ValueError(f"x must have shape [..., D], got a scalar of shape {x.shape}")
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D with shape [D, C], got shape {w.shape}")
    d, num_classes = w.shape
    if x.shape[-1] != d:
        raise ValueError(
            f"w has shape {w.shape} but x has shape {x.shape}: "
            f"w.shape[0] must equal x.shape[-1] = {x.shape[-1]}"
        )
    if num_classes == 0:
        raise ValueError(f"w must have at least one class (column), got shape {w.shape}")
    if b is not None and b.shape != (num_classes,):
        raise ValueError(f"b must have shape ({num_classes},) to match w {w.shape}, got {b.shape}")
    batch_shape = x.shape[:-1]
    if labels.shape != batch_shape:
        raise ValueError(
            f"labels has shape {labels.shape} but x has shape {x.shape}; "
            f"labels must have shape x.shape[:-1] = {batch_shape}"
        )
    mask = _example_mask(where, batch_shape)

    layout = _layout(x, w)
    if layout is None:
        x, w, b, labels, mask = _replicated(x, w, b, labels, mask)
    else:
        x, w, b, labels, mask = _laid_out(layout, x, w, b, labels, mask)
    acc = compute_dtype(x.dtype, w.dtype)
    if x.dtype != w.dtype:
        x, w = x.astype(acc), w.astype(acc)
    if b is not None:
        b = b.astype(acc)

    if labels.dtype.itemsize < 4:
        labels = labels.astype(jnp.int32)
    labels = checked_labels(labels, num_classes, ignore_index, "linear_softmax_cross_entropy: ")
    ignored = jnp.zeros(batch_shape, jnp.bool_)
    if ignore_index is not None:
        info = np.iinfo(labels.dtype)
        if info.min <= ignore_index <= info.max:
            ignored = labels == ignore_index
    valid = ~ignored if mask is None else mask & ~ignored
    in_range = (labels >= 0) & (labels < num_classes)
    invalid = ~in_range & ~ignored
    y = jnp.where(in_range, labels, jnp.zeros((), labels.dtype)).astype(jnp.int32)

    if reduction == "mean":
        count = jnp.sum(valid.astype(acc))
        scale = jnp.where(count > 0, 1.0 / jnp.maximum(count, 1.0), jnp.zeros((), acc))
    else:
        scale = jnp.ones((), acc)
    nan = jnp.full((), jnp.nan, acc)
    # Per-example weight of the loss: 0 skips it, NaN poisons it (a bad label).
    coef = jnp.where(invalid, nan, jnp.where(valid, scale, jnp.zeros((), acc)))

    n = math.prod(batch_shape)
    if n == 0:
        # Nothing to sum; keep the result connected to the inputs for autodiff.
        zero = jnp.sum(x.astype(acc)) * 0.0 + jnp.sum(w.astype(acc)) * 0.0
        if reduction == "none":
            return jnp.zeros(batch_shape, acc) + zero
        return zero

    local_n, local_classes = n, num_classes
    if layout is not None:
        local_n //= _devices_along(layout.mesh, layout.rows)
        local_classes //= _devices_along(layout.mesh, layout.classes)
    chunk = chunk_size or default_chunk_size(local_n, d, local_classes)
    if known_sizes(local_n):
        chunk = min(chunk, local_n)
    cfg = _Config(
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        reduction=reduction,
        chunk=chunk,
        block=_class_block(d, local_classes),
        num_classes=num_classes,
        class_axes=() if layout is None or layout.classes is None else layout.classes,
    )
    x = x.reshape(n, d)
    if d == 1:
        # With D = 1 XLA:CPU turns the matmul into a multiply, repeats it in each
        # of its consumers and contracts it into an FMA in some: the row maximum then
        # differs from the entry it came from, and exp(z - m) can overflow. A zero
        # feature keeps it a matmul, computed once.
        x, w = jnp.pad(x, ((0, 0), (0, 1))), jnp.pad(w, ((0, 1), (0, 0)))
    y, coef = y.reshape(n), coef.reshape(n)
    padded = not known_sizes(n)
    if padded:
        x, y, coef = _padded_to_whole_chunks(chunk, x, y, coef)
    if layout is None:
        out = _fused_anywhere(cfg, x, w, b, y, coef)
    else:
        out = _fused_on_mesh(cfg, layout, x, w, b, y, coef)
    if reduction == "none":
        return (out[:n] if padded else out).reshape(batch_shape)
    return out
