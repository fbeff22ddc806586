"""Random rows with special values against the float64 limits of ``reference.row_limits``.

Each case draws small ``[N, C]`` logits mixing ordinary values with ``+-inf``,
NaN, huge and tiny ones, rows of only ``-inf``, a random mask, float32, bfloat16
or float16, and random options (label smoothing, class weights, z-loss,
``ignore_index``), and checks all five functions' values and logit gradients:
NaN exactly where the reference has it, the same infinities, finite values
within rounding. The fused ``linear_softmax_cross_entropy`` is checked on
``x = I``, ``w`` the logits made finite and infinities or NaN in ``b`` (in
``w`` they would reach every row through ``0 * inf``), with a soft-cap, any
reduction and a random chunk size: its value and ``dx``, ``dw``, ``db``.
Run it longer than the test suite does with::

    python -m tests.fuzz --seed 0 --cases 300 --forms cpu

``--forms`` picks XLA:CPU's forms at every size (``cpu``), the GPU/TPU forms
(``other``) or the library's own choice (``default``); ``--long-rows`` draws
rows long enough for the block-by-block reductions; ``--one-row`` draws single
rows (XLA simplifies one-element arrays differently: ``--seed 101`` found a
tiny z-loss's term regrouped into NaN there).

Left out by construction, as documented: a finite logit equal to the largest
float beside a ``+inf`` (it counts as one), a masked logit as the integer
label's own (read as given), and masked entries of a NaN row. Logits more than
the largest float apart (``+-3e38``) are drawn: their losses overflow only
where the float64 limit is past float32's range.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import jsoftmax
from tests import reference as ref

SPECIAL_VALUES = np.array(
    [np.inf, -np.inf, np.nan, 1e30, -1e30, 1.5e38, -1.5e38, 3e38, -3e38, 0.0, 1e-30, 1e-40]
)
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Relative rounding of an output or gradient returned in each dtype (computed in float32).
ROUNDING = {jnp.float32: 1e-5, jnp.bfloat16: 2.0**-7, jnp.float16: 2.0**-10}
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class Case:
    logits: np.ndarray  # float64 values exactly representable in dtype
    mask: np.ndarray  # bool, per logit
    dtype: object


def draw_case(
    rng: np.random.Generator, long_rows: bool = False, many_rows: bool = False, one_row=False
) -> Case:
    """``one_row``: a single row (one-element losses, where XLA simplifies differently)."""
    dtype = DTYPES[rng.integers(len(DTYPES))] if rng.random() < 0.4 else jnp.float32
    if long_rows:
        n, c = int(rng.integers(1, 4)), int(rng.choice([33792, 40960]))
    else:
        n, c = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        if many_rows:
            n = int(rng.integers(400, 700))
    if one_row:
        n = 1
    logits = rng.standard_normal((n, c)) * rng.choice([1.0, 10.0, 1e4])
    is_special = rng.random((n, c)) < rng.choice([0.0, 0.05, 0.3, 0.8])
    logits = np.where(is_special, rng.choice(SPECIAL_VALUES, (n, c)), logits)
    logits[rng.random(n) < 0.1] = -np.inf
    mask = rng.random((n, c)) < rng.choice([1.0, 0.7, 0.3])
    return Case(_representable(logits, dtype), mask, dtype)


def _representable(values: np.ndarray, dtype) -> np.ndarray:
    """``values`` rounded to ``dtype`` (through float32), back in float64."""
    return np.asarray(
        jnp.asarray(values, jnp.float32).astype(dtype).astype(jnp.float32), np.float64
    )


def mismatches(
    actual, expected, rtol: float, atol: float = 0.0, largest: float = FLOAT32_MAX
) -> np.ndarray:
    """Where ``actual`` differs from ``expected``: NaN-ness, infinities, or beyond the tolerance.

    The expected values are first taken to the range of ``actual``'s dtype,
    float32's by default (beyond it, ``inf`` is right). The tolerance is
    relative to each entry (1-D) or to its row's largest finite value (2-D),
    plus ``atol``.
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    with np.errstate(invalid="ignore"):
        expected = np.where(np.abs(expected) > largest, np.sign(expected) * np.inf, expected)
    finite = np.isfinite(expected)
    scale = np.abs(np.where(finite, expected, 0.0))
    if expected.ndim == 2:
        scale = np.max(scale, -1, keepdims=True, initial=0.0)
    with np.errstate(invalid="ignore"):
        too_far = finite & ~(np.abs(actual - expected) <= rtol * scale + atol)
    wrong_infinity = np.isinf(expected) & (actual != expected)
    return (np.isnan(actual) != np.isnan(expected)) | wrong_infinity | too_far


def _first_mismatch(label: str, bad, got, want, **row_context) -> list[str]:
    """A line for the first row where ``bad`` holds (none if it holds nowhere).

    The line shows that row of each ``row_context`` array, then of ``got`` and ``want``.
    """
    if not np.any(bad):
        return []
    row = np.argwhere(bad)[0][0]
    shown = {**row_context, "got": got, "expected": want}
    return [label + ": " + " ".join(f"{k} {np.asarray(v)[row].tolist()}" for k, v in shown.items())]


def _as64(x: jax.Array) -> np.ndarray:
    return np.asarray(x.astype(jnp.float32), np.float64)


def _logit_gradient(fn, logits: jax.Array, cotangent: jax.Array) -> np.ndarray:
    _, vjp = jax.vjp(fn, logits)
    return _as64(vjp(cotangent)[0])


def check_softmax_family(case: Case, rng: np.random.Generator) -> list[str]:
    """softmax, log_softmax and logsumexp: values, and gradients for a random cotangent."""
    limits = ref.row_limits(case.logits, case.mask)
    x = jnp.asarray(case.logits, jnp.float32).astype(case.dtype)
    where = jnp.asarray(case.mask)
    rounding = ROUNDING[case.dtype]
    # The outputs are of the input's dtype: beyond its range inf is right (a float16
    # log-probability below -65504 is -inf).
    largest = float(jnp.finfo(case.dtype).max)
    # Masked entries of a NaN row: either is fine.
    counted = np.where(limits.has_nan[:, None], case.mask, True)
    found = []

    def note(name, bad, actual, expected):
        label = f"{name} {np.dtype(case.dtype).name}"
        found.extend(
            _first_mismatch(label, bad, actual, expected, logits=case.logits, mask=case.mask)
        )

    probabilities = _as64(jsoftmax.softmax(x, where=where))
    note(
        "softmax",
        mismatches(probabilities, limits.probabilities, rounding, 1e-7) & counted,
        probabilities,
        limits.probabilities,
    )
    log_probabilities = _as64(jsoftmax.log_softmax(x, where=where))
    # In a +inf row the finite entries give x - largest (documented), whose limit is -inf.
    far_below = (limits.num_infinite > 0)[:, None] & (log_probabilities < -1e37)
    note(
        "log_softmax",
        mismatches(
            np.where(far_below, -np.inf, log_probabilities),
            limits.log_probabilities,
            rounding,
            rounding,
            largest,
        )
        & counted,
        log_probabilities,
        limits.log_probabilities,
    )
    logsumexp = _as64(jsoftmax.logsumexp(x, where=where))
    note(
        "logsumexp",
        mismatches(logsumexp, limits.logsumexp, rounding, rounding, largest)[:, None],
        logsumexp[:, None],
        limits.logsumexp[:, None],
    )

    g = _representable(rng.standard_normal(case.logits.shape), case.dtype)
    # log_softmax: a cotangent of 0 on its -inf outputs, whose products would be NaN.
    g_log = np.where(limits.log_probabilities == -np.inf, 0.0, g)
    g_lse = rng.standard_normal(case.logits.shape[0])
    p = limits.probabilities
    with np.errstate(invalid="ignore"):
        expected = {
            "softmax": p * (g - np.sum(g * p, -1, keepdims=True)),
            "log_softmax": np.where(case.mask, g_log, 0.0)
            - p * np.sum(np.where(case.mask, g_log, 0.0), -1, keepdims=True),
            "logsumexp": g_lse[:, None] * p,
        }
    cotangents = {
        "softmax": jnp.asarray(g, jnp.float32).astype(case.dtype),
        "log_softmax": jnp.asarray(g_log, jnp.float32).astype(case.dtype),
        "logsumexp": jnp.asarray(g_lse, jnp.float32).astype(case.dtype),
    }
    scale = {"softmax": np.abs(g), "log_softmax": np.abs(g_log), "logsumexp": np.abs(g_lse)}
    for name, want in expected.items():
        fn = getattr(jsoftmax, name)
        got = _logit_gradient(lambda v, fn=fn: fn(v, where=where), x, cotangents[name])
        want = np.where(limits.empty[:, None] | ~case.mask, 0.0, want)
        atol = 8 * rounding * np.max(scale[name], initial=0.0)
        bad = mismatches(got, want, 4 * rounding, atol) & case.mask & ~limits.has_nan[:, None]
        bad |= np.isnan(got) & ~limits.has_nan[:, None]
        note(f"{name} gradient", bad, got, want)
    return found


@dataclasses.dataclass(frozen=True)
class LossOptions:
    label_smoothing: float
    z_loss: float
    class_weights: np.ndarray | None
    per_logit_mask: bool


def _draw_options(rng: np.random.Generator, num_classes: int) -> LossOptions:
    weights = rng.uniform(0.5, 2.0, num_classes) if rng.random() < 0.5 else None
    # 1e-40 is below float32's normal range: it counts only next to logits near 1e38.
    z_loss = float(rng.choice([0.0, 1e-3, 1e-40]))
    return LossOptions(float(rng.choice([0.0, 0.1])), z_loss, weights, rng.random() < 0.5)


def _smoothing_share(options: LossOptions, mask: np.ndarray) -> np.ndarray:
    """Per logit: ``e / K`` over the ``K`` classes taking part, times their weights; 0 if masked."""
    share = options.label_smoothing / np.maximum(mask.sum(-1, keepdims=True), 1)
    weights = 1.0 if options.class_weights is None else options.class_weights
    return np.where(mask, share * weights, 0.0)


def _check_loss(name, case, mask, target, options, loss_fn, rng, ignored=None) -> list[str]:
    """One loss against ``ref.cross_entropy_limit`` of the per-logit ``target``."""
    loss, grad = ref.cross_entropy_limit(case.logits, target, mask, options.z_loss)
    if ignored is not None:
        loss = np.where(ignored, 0.0, loss)
        grad = np.where(ignored[:, None], 0.0, grad)
    x = jnp.asarray(case.logits, jnp.float32).astype(case.dtype)
    g = rng.standard_normal(case.logits.shape[0])
    # The value alone and the value under a gradient are computed in different forms.
    value = loss_fn(x)
    value_for_gradient, vjp = jax.vjp(loss_fn, x)
    got_grad = _as64(vjp(jnp.asarray(g, jnp.float32))[0])
    want_grad = g[:, None] * grad
    scale = np.max(np.abs(want_grad[np.isfinite(want_grad)]), initial=1.0)
    bad_loss = mismatches(_as64(value), loss, 2e-5, 1e-6)
    bad_loss |= mismatches(_as64(value_for_gradient), loss, 2e-5, 1e-6)
    bad_grad = mismatches(got_grad, want_grad, ROUNDING[case.dtype], 1e-6 * scale)
    bad_grad &= ~np.isnan(want_grad)  # rows the reference leaves open
    bad_grad |= np.isnan(got_grad) & ~ref.row_limits(case.logits, mask).has_nan[:, None]
    label = f"{np.dtype(case.dtype).name} {options}"
    context = dict(logits=case.logits, mask=mask, target=target)
    return [
        *_first_mismatch(f"{name} loss {label}", bad_loss, _as64(value), loss, **context),
        *_first_mismatch(f"{name} gradient {label}", bad_grad, got_grad, want_grad, **context),
    ]


def _keywords(options: LossOptions) -> dict:
    weights = options.class_weights
    return dict(
        label_smoothing=options.label_smoothing,
        z_loss=options.z_loss,
        class_weights=None if weights is None else jnp.asarray(weights, jnp.float32),
    )


def check_soft_labels(case: Case, rng: np.random.Generator) -> list[str]:
    n, c = case.logits.shape
    options = _draw_options(rng, c)
    labels = rng.dirichlet(np.ones(c), n) * rng.choice([1.0, 2.0])
    labels = _representable(np.where(rng.random((n, c)) < 0.3, 0.0, labels), case.dtype)
    mask = case.mask if options.per_logit_mask else np.ones_like(case.mask)
    weights = 1.0 if options.class_weights is None else options.class_weights
    target = np.where(mask, (1 - options.label_smoothing) * labels * weights, 0.0)
    target = target + _smoothing_share(options, mask)
    y = jnp.asarray(labels, jnp.float32).astype(case.dtype)
    where = jnp.asarray(mask) if options.per_logit_mask else None

    def loss_fn(x):
        return jsoftmax.softmax_cross_entropy(x, y, where=where, **_keywords(options))

    return _check_loss("soft labels", case, mask, target, options, loss_fn, rng)


def check_integer_labels(case: Case, rng: np.random.Generator) -> list[str]:
    n, c = case.logits.shape
    options = _draw_options(rng, c)
    labels = rng.integers(0, c, n)
    ignore_index = -100 if rng.random() < 0.5 else None
    ignored = (rng.random(n) < 0.2) if ignore_index is not None else np.zeros(n, bool)
    mask = case.mask.copy() if options.per_logit_mask else np.ones_like(case.mask)
    mask[np.arange(n), labels] = True  # the label's own logit is read as given: keep it unmasked
    weights = np.ones(c) if options.class_weights is None else options.class_weights
    onehot = np.eye(c)[labels]
    target = (1 - options.label_smoothing) * weights[labels][:, None] * onehot
    target = target + _smoothing_share(options, mask)
    given_labels = jnp.asarray(np.where(ignored, ignore_index or 0, labels), jnp.int32)
    where = jnp.asarray(mask) if options.per_logit_mask else None

    def loss_fn(x):
        return jsoftmax.softmax_cross_entropy_with_integer_labels(
            x, given_labels, where=where, ignore_index=ignore_index, **_keywords(options)
        )

    return _check_loss("integer labels", case, mask, target, options, loss_fn, rng, ignored)


def _fused_problem(case: Case, rng: np.random.Generator):
    """``x = I``, ``w`` the case's logits made finite and ``b`` per class, so ``x @ w + b``
    is exact: infinities and NaN come only from ``b`` (in ``w`` they would reach every
    row through the matmul's ``0 * inf``)."""
    n, c = case.logits.shape
    finite = np.isfinite(case.logits)
    w = np.where(finite, case.logits, rng.choice([3e38, -3e38, 1e30, 0.0], (n, c)))
    # XLA:CPU reads subnormal floats as 0 (a 1e-40 in w would reach dx so).
    w = np.where(np.abs(w) < np.finfo(np.float32).tiny, 0.0, w)
    # No huge finite b: w + b past float32's range is inf in the tile, but the smoothing
    # term's mean logit, taken from means of w and b, is the float64 value.
    b = np.where(rng.random(c) < 0.2, rng.choice([np.inf, -np.inf, np.nan, 1e30, -1e30], c), 0.0)
    return np.eye(n), _representable(w, case.dtype), _representable(b, case.dtype)


def _through_matmuls(g: np.ndarray, x: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """dx, dw, db from the logits' gradient ``g``: also for sizes, with ``abs`` taken first."""
    with np.errstate(over="ignore", invalid="ignore"):
        return {"dx": g @ w.T, "dw": x.T @ g, "db": g.sum(0)}


def check_fused(case: Case, rng: np.random.Generator) -> list[str]:
    """``linear_softmax_cross_entropy`` against the limits of its logits' loss, in float64."""
    n, c = case.logits.shape
    x, w, b = _fused_problem(case, rng)
    softcap = float(rng.choice([2.0, 30.0])) if rng.random() < 0.3 else None
    with np.errstate(over="ignore", invalid="ignore"):
        raw = (x @ w + b).astype(np.float32).astype(np.float64)  # the tile's one rounding
    z = raw if softcap is None else softcap * np.tanh(raw / softcap)
    smoothing, z_loss = float(rng.choice([0.0, 0.1])), float(rng.choice([0.0, 1e-3, 1e-40]))
    labels = rng.integers(0, c, n)
    ignored = rng.random(n) < 0.2
    example_mask = rng.random(n) < 0.8
    reduction = str(rng.choice(["none", "sum", "mean"]))
    target = (1 - smoothing) * np.eye(c)[labels] + smoothing / c
    loss, grad = ref.cross_entropy_limit(z, target, np.ones((n, c), bool), z_loss)
    # The size of the terms of p * (sum(target) + 2 z lse) - target, which cancel.
    size = np.abs(grad) + 2 * target
    if softcap is not None:
        with np.errstate(invalid="ignore"):
            derivative = 1 - np.tanh(raw / softcap) ** 2  # 0 where raw is infinite
        # Computed in float32 from the rounded capped logit, the derivative is off by a
        # few ulps of 1 near saturation: an absolute 5e-7, whatever its size.
        slack = 5e-7 / (8 * ROUNDING[case.dtype])
        grad, size = grad * derivative, size * (derivative + slack)
    active = example_mask & ~ignored
    loss, grad = np.where(active, loss, 0.0), np.where(active[:, None], grad, 0.0)
    options = dict(label_smoothing=smoothing, z_loss=z_loss, logit_softcap=softcap)
    label = f"fused {np.dtype(case.dtype).name} {reduction} {options}"
    context = dict(logits=z, labels=labels[:, None])

    def fused(x, w, b, where):
        return jsoftmax.linear_softmax_cross_entropy(
            x,
            w,
            jnp.asarray(np.where(ignored, -100, labels), jnp.int32),
            b,
            where=where,
            ignore_index=-100,
            reduction=reduction,
            chunk_size=int(rng.integers(1, n + 1)),
            **options,
        )

    args = [jnp.asarray(v, jnp.float32).astype(case.dtype) for v in (x, w, b)]
    value = _as64(fused(*args, jnp.asarray(example_mask)))
    expected = loss if reduction == "none" else ref.reduce(loss, reduction, np.sum(active))
    found = _first_mismatch(
        f"{label} loss",
        np.atleast_1d(mismatches(value, expected, 2e-5, 1e-6)),
        np.atleast_1d(value),
        np.atleast_1d(expected),
        **({} if reduction != "none" else context),
    )
    # Gradients: rows the reference leaves open (NaN: a NaN logit, +inf with a z-loss)
    # are masked out, as they would poison every entry of dx, dw, db through the matmuls.
    open_rows = np.any(np.isnan(grad), -1)
    kept = active & ~open_rows
    count = max(np.sum(kept), 1)
    grad, size = np.where(kept[:, None], grad, 0.0), np.where(kept[:, None], size, 0.0)
    cotangent = rng.standard_normal(n) if reduction == "none" else rng.standard_normal()
    row_scale = cotangent * (1 / count if reduction == "mean" else 1.0)
    row_scale = np.reshape(row_scale, (-1, 1))
    g, g_size = row_scale * grad, np.abs(row_scale) * size
    # float32 flushes what falls below its normal range (also on its way to dx through
    # w); float16 rounds gradients below its own to its subnormals.
    flushed = 4 * np.finfo(np.float32).tiny * max(1.0, float(np.max(np.abs(cotangent))))
    flushed = max(flushed, float(jnp.finfo(case.dtype).smallest_subnormal))
    want, bounds = _through_matmuls(g, x, w), _through_matmuls(g_size, x, np.abs(w))
    floors = _through_matmuls(np.full_like(g, flushed), x, np.abs(w))
    floors["dx"] = floors["dx"] + flushed
    where = jnp.asarray(example_mask & ~open_rows)
    _, vjp = jax.vjp(lambda *a: fused(*a, where), *args)
    got = dict(zip(want, (_as64(t) for t in vjp(jnp.asarray(cotangent, jnp.float32))), strict=True))
    rounding, largest = ROUNDING[case.dtype], float(jnp.finfo(case.dtype).max)
    # The float32 matmuls' own size: a scalar loss's gradients are computed for a
    # cotangent of 1, and 16-bit tiles are weighted relative to their largest
    # weight (each row's, for a mean), then scaled back.
    if case.dtype != jnp.float32 or reduction == "sum":
        unit_size = size
    else:
        unit_size = g_size if reduction == "none" else size / count
    unit = _through_matmuls(unit_size, x, np.abs(w))
    for name in want:
        atol = 8 * rounding * bounds[name] + floors[name]
        bad = mismatches(got[name], want[name], 4 * rounding, atol, largest)
        # A sum can overflow before it cancels.
        bad &= (bounds[name] < largest) & (unit[name] < FLOAT32_MAX)
        rows = context if name != "db" else {}  # rows of dx and dw are examples (x = I)
        found += _first_mismatch(
            f"{label} {name}", np.atleast_1d(bad), got[name], want[name], **rows
        )
    return found


def mismatches_found(
    seed: int, cases: int, long_rows: bool = False, many_rows: bool = False, one_row=False
):
    """Yields the mismatches of ``cases`` random cases as found; each checks all five functions."""
    rng = np.random.default_rng(seed)
    for _ in range(cases):
        case = draw_case(rng, long_rows, many_rows and rng.random() < 0.3, one_row)
        for check in (check_softmax_family, check_soft_labels, check_integer_labels, check_fused):
            yield from check(case, rng)


def run(
    seed: int, cases: int, long_rows: bool = False, many_rows: bool = False, one_row=False
) -> list[str]:
    """All the mismatches of ``mismatches_found``."""
    return list(mismatches_found(seed, cases, long_rows, many_rows, one_row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--forms", choices=["default", "cpu", "other"], default="default")
    parser.add_argument("--long-rows", action="store_true")
    parser.add_argument("--one-row", action="store_true", help="every case a single row")
    args = parser.parse_args(argv)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    from jsoftmax import _cross_entropy, _stable

    if args.forms == "other":
        _stable.by_backend = lambda *arrays, cpu, other: other(*arrays)
        # The integer-label value's chain for large arrays of short rows (the tests
        # take the other one at their sizes).
        _cross_entropy._LABEL_FIRST_MIN_BYTES = 0
    elif args.forms == "cpu":
        _stable._BRANCH_FREE_ELEMENTS = 0
        _stable._FEWEST_BRANCHING_ELEMENTS = 0
    found = 0
    many_rows = args.forms != "other" and not args.one_row
    for line in mismatches_found(args.seed, args.cases, args.long_rows, many_rows, args.one_row):
        print(line, flush=True)
        found += 1
    print(f"{args.cases} cases, {found} mismatches")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
