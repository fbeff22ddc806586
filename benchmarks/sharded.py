"""Per-device memory of the fused loss with its inputs split over 4 devices.

``python benchmarks/sharded.py [--shape N D C]`` prints a markdown table: for each
layout (one device; the examples split; the classes of ``w`` split; both, on a 2x2
mesh), the XLA memory per device of ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))``
under JAX's explicit sharding, for ``linear_softmax_cross_entropy`` and for optax's
integer-label loss on ``x @ w``. The devices are 4 host (CPU) devices, so the figures
are XLA:CPU's compiled buffer sizes; no time is reported (4 simulated devices share
this machine's cores).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)
# The 4 host devices, also on a machine with one GPU (JAX would pick the GPU alone).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsoftmax  # noqa: E402
from jsoftmax.bench import machine_info  # noqa: E402

MIB = 2**20


def ours(x, w, labels):
    return jsoftmax.linear_softmax_cross_entropy(x, w, labels)


def theirs(x, w, labels):
    return optax.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()


def layouts():
    """(name, mesh, x's spec, w's spec): x's spec also splits the labels."""
    line = jax.make_mesh((4,), ("devices",), axis_types=(AxisType.Explicit,))
    grid = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    return (
        ("one device (nothing split)", line, P(), P()),
        ("examples over 4", line, P("devices"), P()),
        ("classes over 4", line, P(), P(None, "devices")),
        ("examples over 2 x classes over 2", grid, P("data"), P(None, "model")),
    )


def memory(loss, mesh, x_spec, w_spec, shape) -> str:
    """``args / temp / outputs`` MiB per device, or why it does not compile."""
    n, d, c = shape

    def spec(dims, dtype, part):
        return jax.ShapeDtypeStruct(dims, dtype, sharding=NamedSharding(mesh, part))

    labels_spec = P(x_spec[0] if len(x_spec) else None)
    arguments = (
        spec((n, d), jnp.float32, x_spec),
        spec((d, c), jnp.float32, w_spec),
        spec((n,), jnp.int32, labels_spec),
    )
    gradient = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    try:
        with jax.set_mesh(mesh):
            stats = gradient.lower(*arguments).compile().memory_analysis()
    except Exception as error:  # noqa: BLE001 -- reported in the table
        return f"fails: {type(error).__name__}"
    sizes = (stats.argument_size_in_bytes, stats.temp_size_in_bytes, stats.output_size_in_bytes)
    return " / ".join(f"{size / MIB:.1f}" for size in sizes)


def table(shape) -> list[str]:
    n, d, c = shape
    lines = [
        f"N={n}, D={d}, C={c}, float32; MiB per device: arguments / temp / outputs",
        "",
        "| layout | jsoftmax fused | optax on `x @ w` |",
        "| --- | ---: | ---: |",
    ]
    for name, mesh, x_spec, w_spec in layouts():
        ours_mib = memory(ours, mesh, x_spec, w_spec, shape)
        theirs_mib = memory(theirs, mesh, x_spec, w_spec, shape)
        lines.append(f"| {name} | {ours_mib} | {theirs_mib} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(2048, 512, 32768))
    args = parser.parse_args(argv)
    for key, value in machine_info().items():
        print(f"{key}: {value}")
    print()
    print("\n".join(table(tuple(args.shape))))


if __name__ == "__main__":
    main()
