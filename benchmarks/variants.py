"""Times implementation choices on the current device, to tune them per backend.

``python benchmarks/variants.py [--repeats K] [--array-mib M]`` prints markdown tables:

* blocks: the standalone functions at long rows (128k classes) with the long-row
  block path on (the default) and off, each as a ratio to jax.nn / optax (only
  XLA:CPU uses blocks, so elsewhere the two columns run the same program);
* forms: the standalone functions with this backend's forms (``_stable.by_backend``)
  and with the XLA:CPU forms forced, and with the label check as ``checkify.debug_check``;
* chunks: the fused loss at several ``chunk_size`` values against optax on ``x @ w``:
  time ratio and XLA temporary memory, and with the chunk loop unrolled.

The block threshold and the default chunk were tuned on a 2-core CPU; this is the
script to rerun on another backend before changing them. ``benchmarks/gpu.sh`` runs
it on a lent GPU; the H100's numbers are in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import types

import jax
import jax.numpy as jnp
import optax

from jsoftmax import _label_check, _linear_cross_entropy, _stable
from jsoftmax._linear_cross_entropy import default_chunk_size, linear_softmax_cross_entropy
from jsoftmax.bench import (
    MiB,
    _forward_and_backward,
    _standalone_cases,
    _temp_bytes,
    compare,
    machine_info,
)


@contextlib.contextmanager
def patched(module, name, value):
    """``module.name = value`` inside the block, with the jit caches cleared around it."""
    old = getattr(module, name)
    setattr(module, name, value)
    jax.clear_caches()
    try:
        yield
    finally:
        setattr(module, name, old)
        jax.clear_caches()


def _cpu_forms(*args, cpu, other):
    del other
    return cpu(*args)


def standalone_table(title: str, classes: int, array_bytes: int, repeats: int, variants):
    """Ratios to jax.nn / optax of the four functions, fwd and fwd+bwd, under each variant.

    ``variants`` maps a column label to a context manager factory that sets it up.
    """
    n = max(1, array_bytes // (4 * classes))
    cases = _standalone_cases(classes, n, jax.random.PRNGKey(0))
    columns = [f"{mode} ({label})" for mode in ("fwd", "fwd+bwd") for label in variants]
    lines = [
        f"### {title} (C={classes}, N={n}), ratios to jax.nn / optax",
        "",
        "| function | " + " | ".join(columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for name, ours, theirs, args in cases:
        cotangent = jax.random.normal(jax.random.PRNGKey(1), jax.eval_shape(theirs, *args).shape)
        forward, both = [], []
        for context in variants.values():
            with context():
                forward.append(compare(jax.jit(ours), jax.jit(theirs), args, repeats, 0.05))
                both.append(
                    compare(
                        _forward_and_backward(ours),
                        _forward_and_backward(theirs),
                        (*args, cotangent),
                        repeats,
                        0.05,
                    )
                )
        lines.append(f"| {name} | " + " | ".join(f"{t.ratio:.3f}" for t in forward + both) + " |")
    return lines


FORMS = {
    "this backend": contextlib.nullcontext,
    "XLA:CPU forms": lambda: patched(_stable, "by_backend", _cpu_forms),
    # the label check as checkify.debug_check, as it was (its effect turns off fast dispatch)
    "debug_check": lambda: patched(_label_check, "_label_check_p", None),
}
BLOCKS = {
    "blocks on": contextlib.nullcontext,
    "blocks off": lambda: patched(_stable, "_LONGEST_ROW_BYTES", 2**62),
}


def _unrolled_lax():
    lax = _linear_cross_entropy.lax
    namespace = types.SimpleNamespace(**{k: getattr(lax, k) for k in dir(lax) if k[0] != "_"})
    namespace.fori_loop = functools.partial(lax.fori_loop, unroll=True)
    return namespace


def chunks_table(shape: tuple[int, int, int], chunks: list[int], repeats: int) -> list[str]:
    n, d, c = shape
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(2), 3)
    x = jax.random.normal(kx, (n, d), jnp.float32)
    w = jax.random.normal(kw, (d, c), jnp.float32) / math.sqrt(d)
    labels = jax.random.randint(ky, (n,), 0, c)

    def theirs(x, w, labels):
        return optax.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()

    theirs_vg = jax.jit(jax.value_and_grad(theirs, argnums=(0, 1)))
    theirs_temp = _temp_bytes(theirs_vg, x, w, labels)
    lines = [
        f"### Fused loss, N={n} D={d} C={c}: chunk_size (default {default_chunk_size(n, d, c)})",
        "",
        f"optax temp {theirs_temp / MiB:.1f} MiB",
        "",
        "| chunk_size | time ms (ours / optax) | time ratio | temp MiB | temp ratio |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    variants = {
        "": contextlib.nullcontext,
        " unrolled": lambda: patched(_linear_cross_entropy, "lax", _unrolled_lax()),
    }
    for label, context in variants.items():
        for chunk in chunks:

            def ours(x, w, labels, chunk=chunk):
                return linear_softmax_cross_entropy(x, w, labels, chunk_size=chunk)

            with context():
                ours_vg = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))
                temp = _temp_bytes(ours_vg, x, w, labels)
                t = compare(ours_vg, theirs_vg, (x, w, labels), repeats, 0.05)
            lines.append(
                f"| {chunk}{label} | {t.ours_s * 1e3:.2f} / {t.theirs_s * 1e3:.2f} "
                f"| {t.ratio:.3f} | {temp / MiB:.1f} | 1/{theirs_temp / max(temp, 1):.1f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--array-mib", type=int, default=32)
    args = parser.parse_args()
    array_bytes = args.array_mib * MiB

    def show(lines: list[str]) -> None:
        print("\n".join(lines) + "\n", flush=True)

    show([f"- {key}: {value}" for key, value in machine_info().items()])
    for classes in (1024, 131072):
        show(standalone_table("Forms", classes, array_bytes, args.repeats, FORMS))
    show(standalone_table("Long-row blocks", 131072, array_bytes, args.repeats, BLOCKS))
    for shape in ((2048, 512, 32768), (4096, 512, 65536)):
        show(chunks_table(shape, [128, 256, 512, 1024], args.repeats))


if __name__ == "__main__":
    main()
