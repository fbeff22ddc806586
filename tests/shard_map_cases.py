"""Every public function inside ``jax.shard_map`` on 4 CPU devices; run as a script.

``tests/test_sharding.py`` runs this in a subprocess, since the number of host
devices is fixed when JAX starts. Each device gets a quarter of the rows (the
weights of the fused loss whole), the per-device losses are summed with
``psum``, and the value and gradients are compared with float64 closed forms.
Prints one JSON object: per case, the relative errors or the exception.
``--other-backends`` runs the GPU/TPU forms of ``_stable.by_backend`` instead.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from scipy import special  # noqa: E402

import jsoftmax  # noqa: E402
from jsoftmax import _stable  # noqa: E402
from tests import reference as ref  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

DEVICES, N, D, C = 4, 24, 5, 11
ROWS = P("rows")


def problem():
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((N, D)).astype(np.float32),
        "w": rng.standard_normal((D, C)).astype(np.float32),
        "b": rng.standard_normal(C).astype(np.float32),
        "logits": (3 * rng.standard_normal((N, C))).astype(np.float32),
        "labels": rng.integers(0, C, N).astype(np.int32),
        "probs": rng.dirichlet(np.ones(C), N).astype(np.float32),
        "cotangent": rng.standard_normal((N, C)).astype(np.float32),
        "row_weights": rng.uniform(0.5, 2.0, N).astype(np.float32),
        "example_mask": rng.random(N) > 0.3,
    }


def fused_reference(data, row_weights):
    """``sum_i r_i * loss_i`` of ``x @ w + b`` and its gradients for x, w, b, in float64."""
    x, w, b = ref.to64(data["x"]), ref.to64(data["w"]), ref.to64(data["b"])
    logits = x @ w + b
    loss, _ = ref.cross_entropy_int(logits, data["labels"])
    onehot = np.eye(C)[data["labels"]]
    d_logits = row_weights[:, None] * (special.softmax(logits, axis=-1) - onehot)
    return np.sum(row_weights * loss), (d_logits @ w.T, x.T @ d_logits, d_logits.sum(0))


def cases(data):
    """name -> (per-device loss, argument names, their specs, float64 value and gradients)."""
    z, ct, labels = data["logits"], data["cotangent"], data["labels"]
    mask = data["example_mask"]
    int_ce = jsoftmax.softmax_cross_entropy_with_integer_labels
    row_weights = ref.to64(data["row_weights"])
    int_loss, _ = ref.cross_entropy_int(z, labels)
    onehot = np.eye(C)[labels]
    found = {}
    for name, function in (("softmax", jsoftmax.softmax), ("log_softmax", jsoftmax.log_softmax)):
        found[name] = (
            lambda z, ct, f=function: jnp.sum(f(z) * ct),
            ("logits", "cotangent"),
            (ROWS, ROWS),
            np.sum(ref.softmax_family(name, z) * ref.to64(ct)),
            (ref.softmax_family_vjp(name, z, -1, ct),),
        )
    found["logsumexp"] = (
        lambda z: jnp.sum(jsoftmax.logsumexp(z, axis=-1)),
        ("logits",),
        (ROWS,),
        np.sum(ref.logsumexp(z)),
        (ref.softmax(z),),
    )
    found["softmax_cross_entropy"] = (
        lambda z, y: jnp.sum(jsoftmax.softmax_cross_entropy(z, y)),
        ("logits", "probs"),
        (ROWS, ROWS),
        np.sum(ref.cross_entropy_soft(z, data["probs"])),
        (ref.soft_grad(z, data["probs"]),),
    )
    found["integer labels, masked"] = (
        lambda z, y, m: int_ce(z, y, where=m, reduction="sum"),
        ("logits", "labels", "example_mask"),
        (ROWS, ROWS, ROWS),
        np.sum(np.where(mask, int_loss, 0.0)),
        (np.where(mask[:, None], ref.softmax(z) - onehot, 0.0),),
    )
    found["fused, sum"] = (
        lambda x, w, b, y: jsoftmax.linear_softmax_cross_entropy(
            x, w, y, b=b, reduction="sum", chunk_size=4
        ),
        ("x", "w", "b", "labels"),
        (ROWS, P(), P(), ROWS),
        *fused_reference(data, np.ones(N)),
    )
    found["fused, none"] = (
        lambda x, w, b, y, r: jnp.sum(
            r * jsoftmax.linear_softmax_cross_entropy(x, w, y, b=b, reduction="none", chunk_size=4)
        ),
        ("x", "w", "b", "labels", "row_weights"),
        (ROWS, P(), P(), ROWS, ROWS),
        *fused_reference(data, row_weights),
    )
    return found


def first_axis(spec):
    """The mesh axis the first dimension is split over, or None."""
    return (*spec, None)[0]


def run_case(mesh, data, case):
    local_loss, names, specs, expected, expected_grads = case
    args = [
        jax.device_put(jnp.asarray(data[n]), NamedSharding(mesh, s))
        for n, s in zip(names, specs, strict=True)
    ]
    num_float = len(expected_grads)
    total = jax.shard_map(
        lambda *a: jax.lax.psum(local_loss(*a), "rows"), in_specs=specs, out_specs=P()
    )
    value, grads = jax.jit(jax.value_and_grad(total, argnums=tuple(range(num_float))))(*args)
    return {
        "value": ref.rel_err(value, expected),
        "grads": [ref.rel_err(g, e) for g, e in zip(grads, expected_grads, strict=True)],
        "grads_split_as_inputs": [
            first_axis(jax.typeof(g).sharding.spec) == first_axis(s)
            for g, s in zip(grads, specs, strict=False)
        ],
    }


def main():
    if "--other-backends" in sys.argv[1:]:
        _stable.by_backend = lambda *args, cpu, other: other(*args)
    mesh = jax.make_mesh((DEVICES,), ("rows",), axis_types=(AxisType.Explicit,))
    data = problem()
    results = {}
    with jax.set_mesh(mesh):
        for name, case in cases(data).items():
            try:
                results[name] = run_case(mesh, data, case)
            except Exception as error:  # reported to the test, which fails on it
                results[name] = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps({"devices": jax.device_count(), "results": results}))


if __name__ == "__main__":
    main()
