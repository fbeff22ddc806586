"""Side-by-side benchmark of jsoftmax against ``jax.nn`` and ``optax``.

Run ``python -m jsoftmax.bench`` (or ``jsoftmax bench``). It measures, in one
run, on the default JAX device:

* ``softmax``, ``log_softmax`` (against ``jax.nn``) and both cross-entropies
  (against ``optax``) at 1k, 32k and 128k classes: forward time and
  forward+backward time (``jax.value_and_grad`` of the sum of the output times
  a fixed random cotangent), as ratios ours / theirs;
* the same four functions on small arrays (10 to 1000 classes, at most a few
  MiB), timed per call: each call is waited for before the next, so the time
  is the latency a training step sees, mostly dispatch and the runtime's
  scheduling of the compiled kernels rather than arithmetic;
* the fused ``linear_softmax_cross_entropy`` against ``optax`` on ``x @ w``:
  time of the jitted ``value_and_grad`` w.r.t. ``x`` and ``w``, and the XLA
  temporary memory of that compiled function
  (``compile().memory_analysis().temp_size_in_bytes``), next to the size of
  the gradients themselves, a lower bound for any implementation.

Every timing is of a jitted function, after compilation and warm-up, with
``block_until_ready``. Ours and theirs are run alternately (the order flipping
each round) so that both see the same machine load; the ratio reported is the
median over rounds of the per-round ratio, and the times are medians too.

Prints the machine, the device and a markdown table; writes ``results.md`` and
``bench.png`` to ``--out``. ``--quick`` uses tiny sizes (seconds; for tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jsoftmax
from jsoftmax._linear_cross_entropy import linear_softmax_cross_entropy

__all__ = ["main"]

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures."""

    classes: tuple[int, ...]  # class counts of the standalone table
    array_bytes: int  # bytes of one float32 [N, C] input: N = array_bytes / (4 C)
    small: tuple[tuple[int, int], ...]  # (N, C) shapes of the per-call table
    fused: tuple[tuple[int, int, int], ...]  # (N, D, C) shapes of the fused table
    fused_repeats: int  # at most this many rounds for the fused comparisons
    min_sample_s: float  # calls are repeated within a sample until it lasts this long


FULL = Sizes(
    classes=(1024, 32768, 131072),
    array_bytes=32 * MiB,
    small=((128, 10), (1024, 100), (512, 1000)),
    fused=((2048, 512, 32768), (4096, 512, 65536)),
    fused_repeats=5,
    min_sample_s=0.05,
)
QUICK = Sizes(
    classes=(16, 256),
    array_bytes=64 * 1024,
    small=((8, 10),),
    fused=((64, 16, 256),),
    fused_repeats=3,
    min_sample_s=0.0,
)


# -- the machine -------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict[str, str]:
    """The machine and the device the benchmark runs on, as printable strings."""
    device = jax.devices()[0]
    memory = _memory_gib()
    host = f"{_cpu_model()}, {os.cpu_count()} logical cores"
    if memory is not None:
        host += f", {memory:.0f} GiB RAM"
    return {
        "device": (
            f"{jax.default_backend()} backend, {device.device_kind} "
            f"({jax.device_count()} device{'s' if jax.device_count() > 1 else ''})"
        ),
        "host": host,
        "os": platform.platform(),
        "software": (
            f"Python {platform.python_version()}, jax {jax.__version__}, "
            f"jaxlib {getattr(jax.lib, '__version__', '?')}, "
            f"optax {optax.__version__}"
        ),
    }


# -- timing ------------------------------------------------------------------------------------


def _run(fn: Callable, args: Sequence, number: int, per_call: bool = False) -> float:
    """Seconds per call of ``number`` calls; ``per_call`` waits for each before the next."""
    start = time.perf_counter()
    for _ in range(number):
        out = fn(*args)
        if per_call:
            jax.block_until_ready(out)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / number


@dataclasses.dataclass(frozen=True)
class Timing:
    ours_s: float  # median seconds per call
    theirs_s: float
    ratio: float  # median over rounds of ours / theirs


def compare(
    ours: Callable,
    theirs: Callable,
    args: Sequence,
    repeats: int,
    min_sample_s: float,
    per_call: bool = False,
):
    """Times two jitted functions alternately; medians of times and of per-round ratios.

    ``per_call``: wait for each call's result before the next (latency); otherwise
    only for the last of a sample's calls (throughput, as a loop of steps runs).
    """
    for fn in (ours, theirs):  # compile and warm up
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    single = max(_run(ours, args, 1), _run(theirs, args, 1))
    number = max(1, math.ceil(min_sample_s / max(single, 1e-9))) if min_sample_s else 1
    ours_times, theirs_times, ratios = [], [], []
    for i in range(repeats):
        if i % 2 == 0:
            a = _run(ours, args, number, per_call)
            b = _run(theirs, args, number, per_call)
        else:
            b = _run(theirs, args, number, per_call)
            a = _run(ours, args, number, per_call)
        ours_times.append(a)
        theirs_times.append(b)
        ratios.append(a / b)
    return Timing(
        statistics.median(ours_times), statistics.median(theirs_times), statistics.median(ratios)
    )


# -- the standalone functions ------------------------------------------------------------------


def _standalone_cases(num_classes: int, n: int, key: jax.Array, dtype=jnp.float32):
    """(name, ours, theirs, args) for the four functions at one size; fn(*args) is the output.

    The logits and soft labels are of ``dtype``.
    """
    k1, k2, k3 = jax.random.split(key, 3)
    logits = (jax.random.normal(k1, (n, num_classes), jnp.float32) * 3.0).astype(dtype)
    int_labels = jax.random.randint(k2, (n,), 0, num_classes)
    soft_labels = jax.nn.softmax(jax.random.normal(k3, (n, num_classes), jnp.float32), axis=-1)
    soft_labels = soft_labels.astype(dtype)
    return [
        ("softmax", jsoftmax.softmax, jax.nn.softmax, (logits,)),
        ("log_softmax", jsoftmax.log_softmax, jax.nn.log_softmax, (logits,)),
        (
            "softmax_cross_entropy",
            jsoftmax.softmax_cross_entropy,
            optax.softmax_cross_entropy,
            (logits, soft_labels),
        ),
        (
            "softmax_cross_entropy_with_integer_labels",
            jsoftmax.softmax_cross_entropy_with_integer_labels,
            optax.softmax_cross_entropy_with_integer_labels,
            (logits, int_labels),
        ),
    ]


def _forward_and_backward(fn: Callable) -> Callable:
    """``value_and_grad`` w.r.t. the first argument of ``sum(fn(...) * cotangent)``.

    The cotangent is the last argument: closed over, it would be a constant that
    XLA folds into the program (``sum(cotangent)`` precomputed at compile time).
    """

    def scalar(first, *rest_and_cotangent):
        *rest, cotangent = rest_and_cotangent
        return jnp.sum(fn(first, *rest).astype(cotangent.dtype) * cotangent)

    return jax.jit(jax.value_and_grad(scalar))


def _bench_shapes(
    shapes: Sequence[tuple[int, int]],
    sizes: Sizes,
    repeats: int,
    log: Callable[[str], None],
    per_call: bool,
    dtype=jnp.float32,
) -> list[dict]:
    """Forward and forward+backward comparisons of the four functions at each (N, C)."""
    rows = []
    key = jax.random.PRNGKey(0)
    for n, num_classes in shapes:
        key, sub, ct_key = jax.random.split(key, 3)
        for name, ours, theirs, args in _standalone_cases(num_classes, n, sub, dtype):
            out_shape = jax.eval_shape(theirs, *args).shape
            cotangent = jax.random.normal(ct_key, out_shape, jnp.float32)
            forward = compare(
                jax.jit(ours), jax.jit(theirs), args, repeats, sizes.min_sample_s, per_call
            )
            both = compare(
                _forward_and_backward(ours),
                _forward_and_backward(theirs),
                (*args, cotangent),
                repeats,
                sizes.min_sample_s,
                per_call,
            )
            row = {"function": name, "classes": num_classes, "n": n, "fwd": forward, "bwd": both}
            rows.append(row)
            log(
                f"  {name:<42} C={num_classes:<7} N={n:<6} "
                f"fwd {forward.ratio:.3f}  fwd+bwd {both.ratio:.3f}"
            )
    return rows


def bench_standalone(
    sizes: Sizes, repeats: int, log: Callable[[str], None], dtype=jnp.float32
) -> list[dict]:
    """The four functions at each class count, on inputs of ``sizes.array_bytes``.

    The rows are counted as for float32 inputs, so every ``dtype`` has the same shapes.
    """
    shapes = [(max(1, sizes.array_bytes // (4 * c)), c) for c in sizes.classes]
    return _bench_shapes(shapes, sizes, repeats, log, per_call=False, dtype=dtype)


def bench_small(
    sizes: Sizes, repeats: int, log: Callable[[str], None], dtype=jnp.float32
) -> list[dict]:
    """The four functions on small arrays, each call waited for (latency)."""
    return _bench_shapes(sizes.small, sizes, repeats, log, per_call=True, dtype=dtype)


# -- the fused loss ----------------------------------------------------------------------------


def _temp_bytes(fn: Callable, *args) -> int:
    analysis = fn.lower(*args).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes) if analysis is not None else -1


def bench_fused(sizes: Sizes, repeats: int, log: Callable[[str], None]) -> list[dict]:
    rows = []
    key = jax.random.PRNGKey(1)
    for n, d, c in sizes.fused:
        kx, kw, ky = jax.random.split(jax.random.fold_in(key, n * d + c), 3)
        x = jax.random.normal(kx, (n, d), jnp.float32)
        w = jax.random.normal(kw, (d, c), jnp.float32) / math.sqrt(d)
        labels = jax.random.randint(ky, (n,), 0, c)

        def ours(x, w, labels):
            return linear_softmax_cross_entropy(x, w, labels)

        def theirs(x, w, labels):
            return optax.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()

        ours_vg = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))
        theirs_vg = jax.jit(jax.value_and_grad(theirs, argnums=(0, 1)))
        ours_temp = _temp_bytes(ours_vg, x, w, labels)
        theirs_temp = _temp_bytes(theirs_vg, x, w, labels)
        timing = compare(ours_vg, theirs_vg, (x, w, labels), min(repeats, sizes.fused_repeats), 0.0)
        row = {
            "shape": (n, d, c),
            "time": timing,
            "ours_temp": ours_temp,
            "theirs_temp": theirs_temp,
            "grad_bytes": 4 * (n * d + d * c),
            "logit_bytes": 4 * n * c,
        }
        rows.append(row)
        log(
            f"  fused N={n} D={d} C={c}: time {timing.ratio:.3f}x, temp "
            f"{ours_temp / MiB:.1f} / {theirs_temp / MiB:.1f} MiB"
        )
    return rows


# -- output ------------------------------------------------------------------------------------


def _mib(value: int) -> str:
    return f"{value / MiB:.1f}" if value >= 0 else "n/a"


def _versus(function: str) -> str:
    return "jax.nn" if function in ("softmax", "log_softmax") else "optax"


def _ratio_table(rows: list[dict], unit: str, per_second: float, digits: int) -> list[str]:
    """Markdown lines of a forward / forward+backward table, times in ``unit``."""
    lines = [
        f"| function | vs | classes | N | fwd {unit} (ours / theirs) | fwd ratio "
        f"| fwd+bwd {unit} (ours / theirs) | fwd+bwd ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        times = [
            f"{t.ours_s * per_second:.{digits}f} / {t.theirs_s * per_second:.{digits}f} "
            f"| {t.ratio:.3f}"
            for t in (row["fwd"], row["bwd"])
        ]
        lines.append(
            f"| {row['function']} | {_versus(row['function'])} | {row['classes']} | {row['n']} "
            f"| {times[0]} | {times[1]} |"
        )
    return lines


def _dtype_note(info: dict[str, str]) -> str:
    dtype = info.get("dtype", "float32")
    if dtype == "float32":
        return "float32"
    return f"{dtype} logits and soft labels (the fused loss below stays float32)"


def render_markdown(
    info: dict[str, str], standalone: list[dict], small: list[dict], fused: list[dict]
) -> str:
    lines = [
        "## Benchmark: jsoftmax vs jax.nn / optax",
        "",
        f"- Device: {info['device']}",
        f"- Host: {info['host']}",
        f"- OS: {info['os']}",
        f"- Software: {info['software']}",
        f"- Date: {info['date']}; command: `{info['command']}`",
        "",
        "Ratios are ours / theirs (below 1 is faster), the median over alternating rounds; "
        "`fwd+bwd` is `jax.value_and_grad` of the sum of the output times a random cotangent. "
        f"{_dtype_note(info)}, jitted, after warm-up.",
        "",
        *_ratio_table(standalone, "ms", 1e3, 2),
        "",
        "### Small arrays, per call",
        "",
        "The same comparison on small inputs, each call waited for (`block_until_ready`) before "
        "the next: the latency a training step sees. At these sizes most of the time is "
        "dispatch and the runtime's scheduling of the compiled kernels, not arithmetic.",
        "",
        *_ratio_table(small, "us", 1e6, 0),
        "",
        "### Fused `linear_softmax_cross_entropy` vs optax on `x @ w`",
        "",
        "`jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`, mean reduction, float32. "
        "Temp is XLA's temporary memory of the compiled function "
        "(`compile().memory_analysis().temp_size_in_bytes`); the gradients (dx, dw) are outputs, "
        "not temp; their size is the lower bound on what any implementation must hold.",
        "",
        "| N | D | C | logits MiB | time ms (ours / optax) | time ratio "
        "| temp MiB (ours / optax) | temp ratio | gradients MiB (outputs: the lower bound) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in fused:
        n, d, c = row["shape"]
        t = row["time"]
        ratio = row["ours_temp"] / row["theirs_temp"] if row["theirs_temp"] > 0 else float("nan")
        lines.append(
            f"| {n} | {d} | {c} | {_mib(row['logit_bytes'])} "
            f"| {t.ours_s * 1e3:.1f} / {t.theirs_s * 1e3:.1f} | {t.ratio:.3f} "
            f"| {_mib(row['ours_temp'])} / {_mib(row['theirs_temp'])} | 1/{1 / ratio:.1f} "
            f"| {_mib(row['grad_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


_SHORT_NAMES = {
    "softmax": "softmax",
    "log_softmax": "log_softmax",
    "softmax_cross_entropy": "CE (soft)",
    "softmax_cross_entropy_with_integer_labels": "CE (int)",
}


def _ratio_bars(axes, rows: list[dict], title: str, with_n: bool = False) -> None:
    def label(row):
        size = f"{row['n']}x{row['classes']}" if with_n else f"C={row['classes']}"
        return f"{_SHORT_NAMES[row['function']]}\n{size}"

    xs = np.arange(len(rows))
    axes.bar(xs - 0.2, [r["fwd"].ratio for r in rows], 0.4, label="forward")
    axes.bar(xs + 0.2, [r["bwd"].ratio for r in rows], 0.4, label="forward+backward")
    axes.axhline(1.0, color="black", linewidth=1)
    axes.axhline(1.05, color="gray", linewidth=1, linestyle="--", label="1.05")
    axes.set_xticks(xs, [label(r) for r in rows], fontsize=6)
    axes.set_ylabel("time ratio, jsoftmax / (jax.nn or optax)")
    axes.set_title(title)
    axes.legend(fontsize=8)


def render_plot(
    path: Path, info: dict[str, str], standalone: list[dict], small: list[dict], fused: list[dict]
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(14, 10))
    grid = fig.add_gridspec(2, 2, width_ratios=[2.2, 1])
    left = fig.add_subplot(grid[0, 0])
    right = fig.add_subplot(grid[:, 1])
    bottom = fig.add_subplot(grid[1, 0])
    _ratio_bars(left, standalone, "Standalone functions (lower is faster)")
    _ratio_bars(bottom, small, "Small arrays, per call (latency; lower is faster)", with_n=True)

    names = [f"N={r['shape'][0]}\nD={r['shape'][1]}\nC={r['shape'][2]}" for r in fused]
    fx = np.arange(len(fused))
    mib = MiB
    right.bar(fx - 0.27, [r["theirs_temp"] / mib for r in fused], 0.27, label="optax temp")
    right.bar(fx, [r["ours_temp"] / mib for r in fused], 0.27, label="fused temp")
    right.bar(
        fx + 0.27, [r["grad_bytes"] / mib for r in fused], 0.27, label="gradients (outputs, bound)"
    )
    for i, r in enumerate(fused):
        right.annotate(
            f"time {r['time'].ratio:.2f}x",
            (i, r["ours_temp"] / mib),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=8,
        )
    right.set_yscale("log")
    right.set_xticks(fx, names, fontsize=8)
    right.set_ylabel("MiB (log scale)")
    right.set_title("Fused linear + CE: value_and_grad memory")
    right.legend(fontsize=8)
    dtype = info.get("dtype", "float32")
    dtype_label = "" if dtype == "float32" else f" | {dtype} inputs (fused: float32)"
    fig.suptitle(f"{info['device']} | {info['host']}{dtype_label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jsoftmax bench",
        description="Time jsoftmax side by side with jax.nn and optax; "
        "print a markdown table and write results.md and bench.png.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--out", default="bench-out", help="folder for results.md and bench.png")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="alternating rounds per comparison (default 15, or 3 with --quick; "
        "the fused comparisons use at most 5)",
    )
    parser.add_argument(
        "--array-mib",
        type=int,
        default=None,
        help="MiB of one float32 [N, C] input of the standalone table (default 32): "
        "N = this / (4 C); larger keeps a fast device busy longer than one dispatch",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the logits and soft labels of the standalone and small-array tables "
        "(default float32; the same shapes for every dtype; the fused table stays float32)",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.array_mib is not None:
        if args.array_mib < 1:
            parser.error(f"--array-mib must be at least 1, got {args.array_mib}")
        sizes = dataclasses.replace(sizes, array_bytes=args.array_mib * MiB)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 15)
    if repeats < 1:
        parser.error(f"--repeats must be at least 1, got {repeats}")
    out = Path(args.out)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    info = machine_info()
    info["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    info["command"] = "python -m jsoftmax.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    info["dtype"] = args.dtype
    dtype = jnp.dtype(args.dtype)
    for key in ("device", "host", "os", "software"):
        log(f"{key}: {info[key]}")
    log("standalone functions:")
    standalone = bench_standalone(sizes, repeats, log, dtype)
    log("small arrays, per call:")
    small = bench_small(sizes, repeats, log, dtype)
    log("fused linear + cross-entropy:")
    fused = bench_fused(sizes, repeats, log)

    markdown = render_markdown(info, standalone, small, fused)
    print(markdown, end="")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(markdown, encoding="utf-8")
        render_plot(out / "bench.png", info, standalone, small, fused)
    except OSError as error:
        print(f"jsoftmax bench: cannot write to {out}: {error}", file=sys.stderr)
        return 2
    log(f"wrote {out / 'results.md'} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
