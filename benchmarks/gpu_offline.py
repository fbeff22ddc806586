"""Compile for an H100 on a machine without a GPU: XLA temp memory and optimized HLO.

JAX compiles for a described GPU without one ("deviceless AOT": a topology made
from a target config). Nothing runs, so there are no timings and no autotuning:
XLA picks its default GEMM backend (Triton) and cuBLAS's default 4 MiB workspace,
where a real H100 autotunes (it chose cuBLAS with a 32 MiB workspace and a
split-K ``dx`` for the fused loss). ``--cublas`` turns Triton GEMMs off to come
closer; buffer sharing is then as on the device, the workspace is not.

Setup, in a virtual environment of its own (about 4.5 GB of CUDA libraries)::

    python -m venv /tmp/gpuvenv && . /tmp/gpuvenv/bin/activate
    pip install "jax[cuda13]==$(python -c 'import jax; print(jax.__version__)')" optax
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=. python benchmarks/gpu_offline.py --cublas

Prints the fused loss's and optax's temp memory for ``value_and_grad`` w.r.t. ``x``
and ``w`` at each chunk size; ``--hlo FILE`` writes the fused loss's optimized HLO.
"""

from __future__ import annotations

import argparse
import os

# Set before JAX starts: compile only, never look for a device.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
runtime_version { major: 13 minor: 0 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="2048x512x32768", help="N x D x C")
    parser.add_argument("--chunks", default="default,128,256,512", help="chunk sizes")
    parser.add_argument("--cublas", action="store_true", help="GEMMs on cuBLAS, not Triton")
    parser.add_argument("--hlo", help="write the first chunk size's optimized HLO here")
    args = parser.parse_args()
    if args.cublas:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false"
        )

    import jax
    import jax.numpy as jnp
    import optax
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    import jsoftmax

    topology = topologies.get_topology_desc(
        platform="cuda", target_config=H100_TARGET, topology="1x1x1"
    )
    whole = NamedSharding(topologies.make_mesh(topology, (1,), ("d",)), PartitionSpec())
    n, d, c = (int(v) for v in args.shape.split("x"))
    x = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=whole)
    w = jax.ShapeDtypeStruct((d, c), jnp.float32, sharding=whole)
    y = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=whole)

    def temp_mib(compiled) -> float:
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    def unfused(x, w, y):
        return optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()

    grad = jax.value_and_grad(unfused, argnums=(0, 1))
    optax_mib = temp_mib(jax.jit(grad).lower(x, w, y).compile())
    print(f"H100 (compiled offline{', cuBLAS GEMMs' if args.cublas else ''}), {args.shape}")
    print(f"optax on x @ w: {optax_mib:.1f} MiB")
    for i, name in enumerate(args.chunks.split(",")):
        chunk = None if name == "default" else int(name)

        def fused(x, w, y, chunk=chunk):
            return jsoftmax.linear_softmax_cross_entropy(x, w, y, chunk_size=chunk)

        compiled = jax.jit(jax.value_and_grad(fused, argnums=(0, 1))).lower(x, w, y).compile()
        mib = temp_mib(compiled)
        print(f"fused, chunk {name}: {mib:.1f} MiB (1/{optax_mib / mib:.1f})")
        if args.hlo and i == 0:
            with open(args.hlo, "w") as file:
                file.write(compiled.as_text())


if __name__ == "__main__":
    main()
