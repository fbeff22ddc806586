"""Times both cross-entropies with each option against optax's equivalent, with XLA's temp memory.

``python benchmarks/options.py [--rows N] [--classes C] [--repeats K]`` prints a markdown
table. The benchmark's main table times the losses without options; here each option
(label smoothing, z-loss, class weights, a logit mask) is set alone, and optax's side
is what an optax user writes for it: ``optax.smooth_labels``, a z-loss added with
``jax.nn.logsumexp``, class weights multiplied into the labels (soft) or taken at the
labels (integer), optax's own ``where``. The value alone (``fwd``) and ``value_and_grad``
of the summed losses (``fwd+bwd``), jitted, float32, alternating rounds, medians.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jsoftmax
from jsoftmax.bench import compare, machine_info

Z_LOSS = 1e-4
SMOOTHING = 0.1


def _optax_z_loss(logits):
    return Z_LOSS * jax.nn.logsumexp(logits, axis=-1) ** 2


def cases(num_classes: int):
    """``(name, ours, theirs, integer_labels)``; each takes ``(logits, labels, weights, mask)``."""
    soft, integer = (
        jsoftmax.softmax_cross_entropy,
        jsoftmax.softmax_cross_entropy_with_integer_labels,
    )
    optax_soft, optax_int = (
        optax.softmax_cross_entropy,
        optax.softmax_cross_entropy_with_integer_labels,
    )

    def smoothed_onehot(labels):
        return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), SMOOTHING)

    return [
        (
            "soft labels, label smoothing",
            lambda x, y, w, m: soft(x, y, label_smoothing=SMOOTHING),
            lambda x, y, w, m: optax_soft(x, optax.smooth_labels(y, SMOOTHING)),
            False,
        ),
        (
            "soft labels, z-loss",
            lambda x, y, w, m: soft(x, y, z_loss=Z_LOSS),
            lambda x, y, w, m: optax_soft(x, y) + _optax_z_loss(x),
            False,
        ),
        (
            "soft labels, class weights",
            lambda x, y, w, m: soft(x, y, class_weights=w),
            lambda x, y, w, m: optax_soft(x, y * w),
            False,
        ),
        (
            "soft labels, logit mask",
            lambda x, y, w, m: soft(x, y, where=m),
            lambda x, y, w, m: optax_soft(x, y, where=m),
            False,
        ),
        (
            "integer labels, label smoothing",
            lambda x, y, w, m: integer(x, y, label_smoothing=SMOOTHING),
            lambda x, y, w, m: optax_soft(x, smoothed_onehot(y)),
            True,
        ),
        (
            "integer labels, z-loss",
            lambda x, y, w, m: integer(x, y, z_loss=Z_LOSS),
            lambda x, y, w, m: optax_int(x, y) + _optax_z_loss(x),
            True,
        ),
        (
            "integer labels, class weights",
            lambda x, y, w, m: integer(x, y, class_weights=w),
            lambda x, y, w, m: optax_int(x, y) * w[y],
            True,
        ),
        (
            "integer labels, logit mask",
            lambda x, y, w, m: integer(x, y, where=m),
            lambda x, y, w, m: optax_int(x, y, where=m),
            True,
        ),
    ]


def _summed_value_and_grad(loss):
    return jax.value_and_grad(lambda x, *rest: jnp.sum(loss(x, *rest)))


def _temp_mib(fn, args) -> float:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def table(rows: int, classes: int, repeats: int) -> list[str]:
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((rows, classes)), jnp.float32)
    soft_labels = jnp.asarray(rng.dirichlet(np.ones(classes), rows), jnp.float32)
    int_labels = jnp.asarray(rng.integers(0, classes, rows), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.5, 2.0, classes), jnp.float32)
    mask = jnp.asarray(rng.random((rows, classes)) < 0.9)
    lines = [
        "| loss, option | fwd ratio | fwd temp MiB (ours / optax) "
        "| fwd+bwd ratio | fwd+bwd temp MiB (ours / optax) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, ours, theirs, integer in cases(classes):
        args = (logits, int_labels if integer else soft_labels, weights, mask)
        row = [name]
        for wrap in (lambda f: f, _summed_value_and_grad):
            ours_fn, theirs_fn = jax.jit(wrap(ours)), jax.jit(wrap(theirs))
            timing = compare(ours_fn, theirs_fn, args, repeats, 0.05)
            memory = f"{_temp_mib(ours_fn, args):.1f} / {_temp_mib(theirs_fn, args):.1f}"
            row += [f"{timing.ratio:.2f}", memory]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--classes", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds per case")
    args = parser.parse_args()
    print("\n".join(f"- {key}: {value}" for key, value in machine_info().items()) + "\n")
    print("\n".join(table(args.rows, args.classes, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
