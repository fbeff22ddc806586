"""Times a whole training step on small inputs: the latency the loss adds where it is used.

``python benchmarks/train_step.py [--repeats K]`` prints a markdown table. The step
is a jitted Adam update of a linear classifier, ``x @ w + b`` with the mean
integer-label cross-entropy, its ``value_and_grad`` and ``optax.adam``; the same step
with ``optax.softmax_cross_entropy_with_integer_labels`` is the reference. Each call
is waited for before the next, as in the benchmark's small-array table, which times
the loss alone as its own program: there the runtime's scheduling of a few
microsecond-long kernels sets the ratio, here the loss is one part of a larger program.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import jsoftmax
from jsoftmax.bench import compare, machine_info

# (examples, features, classes): the bundled `jsoftmax train` default (digits, batch 64)
# and the benchmark's small-array sizes.
SHAPES = ((64, 64, 10), (128, 64, 10), (1024, 64, 100), (512, 64, 1000))


def ours(logits, labels):
    return jsoftmax.softmax_cross_entropy_with_integer_labels(logits, labels, reduction="mean")


def theirs(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(loss, optimizer):
    """A jitted ``step(params, opt_state, x, y) -> (params, opt_state, loss)``."""

    def step(params, opt_state, x, y):
        def objective(params):
            return loss(x @ params["w"] + params["b"], y)

        value, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step)


def step_arguments(n: int, d: int, c: int, optimizer):
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w": jax.random.normal(kw, (d, c)) / d**0.5, "b": jnp.zeros(c)}
    x = jax.random.normal(kx, (n, d))
    y = jax.random.randint(ky, (n,), 0, c)
    return params, optimizer.init(params), x, y


def table(repeats: int) -> list[str]:
    optimizer = optax.adam(1e-3)
    lines = [
        "| N | D | C | step us (ours / optax) | ratio |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, d, c in SHAPES:
        args = step_arguments(n, d, c, optimizer)
        ours_step, theirs_step = train_step(ours, optimizer), train_step(theirs, optimizer)
        timing = compare(ours_step, theirs_step, args, repeats, 0.05, per_call=True)
        lines.append(
            f"| {n} | {d} | {c} | {timing.ours_s * 1e6:.0f} / {timing.theirs_s * 1e6:.0f} "
            f"| {timing.ratio:.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds per size")
    args = parser.parse_args()
    print("\n".join(f"- {key}: {value}" for key, value in machine_info().items()) + "\n")
    print("\n".join(table(args.repeats)), flush=True)


if __name__ == "__main__":
    main()
