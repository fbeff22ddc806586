"""Every public function on 4 CPU devices, the rows or classes split; run as a script.

``tests/test_sharding.py`` runs this in a subprocess, since the number of host
devices is fixed when JAX starts. By default each device gets a quarter of the
rows (the weights of the fused loss whole) and each case runs inside
``jax.shard_map``, the per-device losses summed with ``psum``. With
``--explicit`` the cases run on whole split arrays (JAX's explicit sharding):
the rows or the classes split over 4 devices, or for the fused loss the rows
over 2 and the classes over 2 on a 2x2 mesh; most also report the flops each
device does. The value and gradients are compared with
float64 closed forms. Prints one JSON object: per case, the relative errors or
the exception. ``--other-backends`` runs the GPU/TPU forms of
``_stable.by_backend`` instead.
"""

import json
import os
import sys
from functools import partial

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsoftmax  # noqa: E402
from jsoftmax import _stable  # noqa: E402
from tests import reference as ref  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

DEVICES, N, D, C = 4, 24, 5, 12
ROWS = P("rows")
CLASSES = P(None, "rows")  # the mesh axis splitting the class axis instead
LONG_N, LONG_C = 4, 40960  # float32 rows of 160 KiB, reduced in blocks on one device


def problem():
    rng = np.random.default_rng(0)
    found = {
        "x": rng.standard_normal((N, D)).astype(np.float32),
        "w": rng.standard_normal((D, C)).astype(np.float32),
        "b": rng.standard_normal(C).astype(np.float32),
        "logits": (3 * rng.standard_normal((N, C))).astype(np.float32),
        "labels": rng.integers(0, C, N).astype(np.int32),
        "probs": rng.dirichlet(np.ones(C), N).astype(np.float32),
        "cotangent": rng.standard_normal((N, C)).astype(np.float32),
        "row_weights": rng.uniform(0.5, 2.0, N).astype(np.float32),
        "example_mask": rng.random(N) > 0.3,
        "logit_mask": (rng.random((N, C)) > 0.3) | (np.arange(C) == 0),
        "long_logits": (3 * rng.standard_normal((LONG_N, LONG_C))).astype(np.float32),
        "long_labels": rng.integers(0, LONG_C, LONG_N).astype(np.int32),
        "long_cotangent": rng.standard_normal((LONG_N, LONG_C)).astype(np.float32),
    }
    for name in ("x", "w", "b"):
        found[name + "16"] = found[name].astype(np.float16)
    return found


def one_hot(labels, num_classes):
    return (np.arange(num_classes) == labels[:, None]).astype(np.float64)


CLASS_WEIGHTS = np.linspace(0.5, 2.0, C).astype(np.float32)


def fused_reference(
    data, row_weights, label_smoothing=0.0, z_loss=0.0, softcap=None, names=("x", "w", "b")
):
    """``sum_i r_i * loss_i`` of ``x @ w + b`` and its gradients for x, w, b, in float64."""
    x, w, b = (ref.to64(data[name]) for name in names)
    raw = x @ w + b
    logits = raw if softcap is None else softcap * np.tanh(raw / softcap)
    loss, _ = ref.cross_entropy_int(logits, data["labels"], None, None, label_smoothing, z_loss)
    target = one_hot(data["labels"], C)
    d_logits = ref.soft_grad(logits, target, None, label_smoothing, z_loss)
    if softcap is not None:
        d_logits = d_logits * (1.0 - np.tanh(raw / softcap) ** 2)
    d_raw = row_weights[:, None] * d_logits
    return np.sum(row_weights * loss), (d_raw @ w.T, x.T @ d_raw, d_raw.sum(0))


def cases(data, explicit):
    """name -> (loss, argument names, their specs, float64 value and gradients).

    Inside ``shard_map`` the loss is each device's own, then summed; a mean
    would be each device's mean, so the global mean is an ``explicit`` case only.
    """
    z, ct, labels = data["logits"], data["cotangent"], data["labels"]
    mask = data["example_mask"]
    int_ce = jsoftmax.softmax_cross_entropy_with_integer_labels
    row_weights = ref.to64(data["row_weights"])
    int_loss, _ = ref.cross_entropy_int(z, labels)
    onehot = one_hot(labels, C)
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
    found["fused, sum, chunk_size=4"] = (
        lambda x, w, b, y: jsoftmax.linear_softmax_cross_entropy(
            x, w, y, b=b, reduction="sum", chunk_size=4
        ),
        ("x", "w", "b", "labels"),
        (ROWS, P(), P(), ROWS),
        *fused_reference(data, np.ones(N)),
    )
    found["fused, none, chunk_size=4"] = (
        lambda x, w, b, y, r: jnp.sum(
            r * jsoftmax.linear_softmax_cross_entropy(x, w, y, b=b, reduction="none", chunk_size=4)
        ),
        ("x", "w", "b", "labels", "row_weights"),
        (ROWS, P(), P(), ROWS, ROWS),
        *fused_reference(data, row_weights),
    )
    if not explicit:
        return found
    soft_options = {"class_weights": CLASS_WEIGHTS, "z_loss": 1e-3}
    found["soft labels, mean, class weights and z-loss"] = (
        lambda z, y: jsoftmax.softmax_cross_entropy(z, y, reduction="mean", **soft_options),
        ("logits", "probs"),
        (ROWS, ROWS),
        np.mean(ref.cross_entropy_soft(z, data["probs"], CLASS_WEIGHTS, z_loss=1e-3)),
        (ref.soft_grad(z, data["probs"], CLASS_WEIGHTS, z_loss=1e-3) / N,),
    )
    found["fused, mean, masked, default chunk"] = (
        lambda x, w, b, y, m: jsoftmax.linear_softmax_cross_entropy(x, w, y, b=b, where=m),
        ("x", "w", "b", "labels", "example_mask"),
        (ROWS, P(), P(), ROWS, ROWS),
        *fused_reference(data, mask / np.sum(mask)),
    )
    return found


def padded(spec, ndim):
    """The mesh axes each of ``ndim`` dimensions is split over (None where whole)."""
    return (*spec, *(None,) * (ndim - len(spec)))


def run_case(mesh, data, case):
    """The case inside ``shard_map``: each device its rows, the losses summed."""
    local_loss, names, specs, expected, expected_grads = case
    total = jax.shard_map(
        lambda *a: jax.lax.psum(local_loss(*a), "rows"), in_specs=specs, out_specs=P()
    )
    return compare(mesh, data, total, names, specs, expected, expected_grads)


def run_case_explicit(mesh, data, case):
    """The case on whole arrays split as ``specs`` (explicit sharding), no ``shard_map``.

    Also reports the compiled gradient's flops per device against the same
    function's on unsplit inputs: about 1/4 when each device does its share.
    """
    loss, names, specs, expected, expected_grads = case
    result = compare(mesh, data, loss, names, specs, expected, expected_grads)
    gradient = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(expected_grads)))))
    split = [put(mesh, data[n], s) for n, s in zip(names, specs, strict=True)]
    whole = [put(mesh, data[n], P()) for n in names]
    flops = [gradient.lower(*args).compile().cost_analysis()["flops"] for args in (split, whole)]
    result["flops_ratio"] = flops[0] / flops[1]
    return result


def put(mesh, array, spec):
    return jax.device_put(jnp.asarray(array), NamedSharding(mesh, spec))


def compare(mesh, data, loss, names, specs, expected, expected_grads):
    args = [put(mesh, data[n], s) for n, s in zip(names, specs, strict=True)]
    num_float = len(expected_grads)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(num_float))))(*args)
    return {
        "value": ref.rel_err(value, expected),
        "grads": [ref.rel_err(g, e) for g, e in zip(grads, expected_grads, strict=True)],
        "grads_split_as_inputs": [
            padded(jax.typeof(g).sharding.spec, g.ndim) == padded(s, g.ndim)
            for g, s in zip(grads, specs, strict=False)
        ],
    }


def class_split_cases(data):
    """Cases with the class axis split over the devices, labels and masks whole."""
    z, ct, labels, probs = data["logits"], data["cotangent"], data["labels"], data["probs"]
    logit_mask = data["logit_mask"]
    options = {"class_weights": CLASS_WEIGHTS, "label_smoothing": 0.1, "z_loss": 1e-3}
    onehot = one_hot(labels, C)
    long_z, long_labels = data["long_logits"], data["long_labels"]
    long_ct = data["long_cotangent"]
    return {
        "classes split: softmax, logit mask": (
            lambda z, ct, m: jnp.sum(jsoftmax.softmax(z, where=m) * ct),
            ("logits", "cotangent", "logit_mask"),
            (CLASSES, CLASSES, P()),
            np.sum(ref.softmax(z, mask=logit_mask) * ref.to64(ct)),
            (ref.softmax_family_vjp("softmax", z, -1, ct, mask=logit_mask),),
        ),
        "classes split: logsumexp, logit mask": (
            lambda z, m: jnp.sum(jsoftmax.logsumexp(z, axis=-1, where=m)),
            ("logits", "logit_mask"),
            (CLASSES, P()),
            np.sum(ref.logsumexp(z, mask=logit_mask)),
            (ref.softmax(z, mask=logit_mask),),
        ),
        "classes split: log_softmax": (
            lambda z, ct: jnp.sum(jsoftmax.log_softmax(z) * ct),
            ("logits", "cotangent"),
            (CLASSES, P()),
            np.sum(ref.log_softmax(z) * ref.to64(ct)),
            (ref.softmax_family_vjp("log_softmax", z, -1, ct),),
        ),
        "classes split: soft labels, options": (
            lambda z, y: jnp.sum(jsoftmax.softmax_cross_entropy(z, y, **options)),
            ("logits", "probs"),
            (CLASSES, P()),
            np.sum(ref.cross_entropy_soft(z, probs, CLASS_WEIGHTS, 0.1, 1e-3)),
            (ref.soft_grad(z, probs, CLASS_WEIGHTS, 0.1, 1e-3),),
        ),
        "classes split: soft labels, options, mean": (
            lambda z, y: jsoftmax.softmax_cross_entropy(z, y, reduction="mean", **options),
            ("logits", "probs"),
            (CLASSES, P()),
            np.mean(ref.cross_entropy_soft(z, probs, CLASS_WEIGHTS, 0.1, 1e-3)),
            (ref.soft_grad(z, probs, CLASS_WEIGHTS, 0.1, 1e-3) / N,),
        ),
        "classes split: integer labels, options": (
            lambda z, y: jsoftmax.softmax_cross_entropy_with_integer_labels(
                z, y, reduction="sum", **options
            ),
            ("logits", "labels"),
            (CLASSES, P()),
            np.sum(ref.cross_entropy_int(z, labels, CLASS_WEIGHTS, None, 0.1, 1e-3)[0]),
            (ref.soft_grad(z, onehot, CLASS_WEIGHTS, 0.1, 1e-3),),
        ),
        "classes split: softmax, long rows": (
            lambda z, ct: jnp.sum(jsoftmax.softmax(z) * ct),
            ("long_logits", "long_cotangent"),
            (CLASSES, CLASSES),
            np.sum(ref.softmax(long_z) * ref.to64(long_ct)),
            (ref.softmax_family_vjp("softmax", long_z, -1, long_ct),),
        ),
        "classes split: integer labels, long rows": (
            lambda z, y: jsoftmax.softmax_cross_entropy_with_integer_labels(z, y, reduction="sum"),
            ("long_logits", "long_labels"),
            (CLASSES, P()),
            np.sum(ref.cross_entropy_int(long_z, long_labels)[0]),
            (ref.softmax(long_z) - one_hot(long_labels, LONG_C),),
        ),
    }


def fused_class_split_cases(data):
    """The fused loss with ``w``'s classes split over the devices (vocabulary parallelism)."""
    fused = jsoftmax.linear_softmax_cross_entropy
    smoothing = {"label_smoothing": 0.1, "z_loss": 1e-3}
    capped = {"logit_softcap": 2.0, "label_smoothing": 0.2}
    return {
        "fused, classes split: sum, smoothing, z-loss": (
            lambda x, w, b, y: fused(x, w, y, b=b, reduction="sum", **smoothing),
            ("x", "w", "b", "labels"),
            (P(), CLASSES, P("rows"), P()),
            *fused_reference(data, np.ones(N), **smoothing),
        ),
        "fused, classes split: none, soft-cap, chunk_size=5": (
            lambda x, w, b, y, r: jnp.sum(
                r * fused(x, w, y, b=b, reduction="none", chunk_size=5, **capped)
            ),
            ("x", "w", "b", "labels", "row_weights"),
            (P(), CLASSES, P("rows"), P(), P()),
            *fused_reference(data, ref.to64(data["row_weights"]), 0.2, softcap=2.0),
        ),
    }


def two_axis_cases(data):
    """The fused loss on a 2x2 mesh: examples split over "data", classes over "model"."""
    mask = data["example_mask"]
    return {
        "fused, rows and classes split: mean, masked": (
            lambda x, w, b, y, m: jsoftmax.linear_softmax_cross_entropy(x, w, y, b=b, where=m),
            ("x", "w", "b", "labels", "example_mask"),
            (P("data"), P(None, "model"), P("model"), P("data"), P("data")),
            *fused_reference(data, mask / np.sum(mask)),
        ),
        "fused, rows and classes split: none": (
            lambda x, w, b, y, r: jnp.sum(
                r * jsoftmax.linear_softmax_cross_entropy(x, w, y, b=b, reduction="none")
            ),
            ("x", "w", "b", "labels", "row_weights"),
            (P("data"), P(None, "model"), P("model"), P("data"), P("data")),
            *fused_reference(data, ref.to64(data["row_weights"])),
        ),
    }


def inside_shard_map_cases(data):
    """The fused loss inside a user's ``shard_map`` over "data", ``w`` split over "model".

    (Run without the flops comparison: that ``shard_map`` needs its rows split.)
    """
    return {
        "fused, classes split, inside shard_map over the rows": (
            _inside_shard_map_over_data,
            ("x", "w", "b", "labels"),
            (P("data"), P(None, "model"), P("model"), P("data")),
            *fused_reference(data, np.ones(N)),
        ),
    }


def _inside_shard_map_over_data(x, w, b, y):
    """Each "data" device its rows, inside a user's ``shard_map`` over that axis only."""

    def local(x, w, b, y):
        loss = jsoftmax.linear_softmax_cross_entropy(x, w, y, b=b, reduction="sum")
        return jax.lax.psum(loss, "data")

    rows, whole = P("data"), P()
    return jax.shard_map(
        local, in_specs=(rows, whole, whole, rows), out_specs=whole, axis_names={"data"}
    )(x, w, b, y)


def float16_cases(data):
    """The fused loss in float16 on a 2x2 mesh, split by rows, classes or both."""
    both = (P("data"), P(None, "model"), P("model"), P("data"))
    rows = (P("data"), P(), P(), P("data"))
    classes = (P(), P(None, ("data", "model")), P(("data", "model")), P())
    return {
        f"fused, float16, {name} split": (
            lambda x, w, b, y: jsoftmax.linear_softmax_cross_entropy(x, w, y, b=b, reduction="sum"),
            ("x16", "w16", "b16", "labels"),
            specs,
            *fused_reference(data, np.ones(N), names=("x16", "w16", "b16")),
        )
        for name, specs in (("rows", rows), ("classes", classes), ("rows and classes", both))
    }


def outside_jit_cases(mesh, data):
    """name -> a check of the fused loss or integer labels on split arrays, run eagerly
    (inside ``jax.set_mesh`` or not) or jitted without a mesh context."""
    expected, expected_grads = fused_reference(data, np.ones(N))
    x, y = put(mesh, data["x"], ROWS), put(mesh, data["labels"], ROWS)
    w, b = data["w"], data["b"]
    z = put(mesh, data["logits"], ROWS)
    int_expected = np.sum(ref.cross_entropy_int(data["logits"], data["labels"])[0])

    def fused(x, w, b, y):
        return jsoftmax.linear_softmax_cross_entropy(x, w, y, b=b, reduction="sum")

    def int_ce(z, y):
        return jsoftmax.softmax_cross_entropy_with_integer_labels(z, y, reduction="sum")

    def fused_gradient(gradient_fn):
        value, grads = gradient_fn(jax.value_and_grad(fused, argnums=(0, 1, 2)))(x, w, b, y)
        return errors(value, expected, grads, expected_grads)

    def in_mesh_context(check):
        with jax.set_mesh(mesh):
            return check()

    def summed_in_shard_map(x, w, b, y):
        whole = P()
        total = jax.shard_map(
            lambda *a: jax.lax.psum(fused(*a), "rows"),
            in_specs=(ROWS, whole, whole, ROWS),
            out_specs=whole,
        )
        return total(x, w, b, y)

    def gradient_in_shard_map():
        value, grads = jax.value_and_grad(summed_in_shard_map, argnums=(0, 1, 2))(x, w, b, y)
        return errors(value, expected, grads, expected_grads)

    return {
        "fused, eager inside shard_map": lambda: in_mesh_context(
            lambda: errors(summed_in_shard_map(x, w, b, y), expected)
        ),
        "fused, eager value_and_grad inside shard_map": lambda: in_mesh_context(
            gradient_in_shard_map
        ),
        "fused, eager value_and_grad": lambda: in_mesh_context(lambda: fused_gradient(lambda f: f)),
        "fused, eager": lambda: in_mesh_context(lambda: errors(fused(x, w, b, y), expected)),
        "fused, eager, no mesh context": lambda: errors(fused(x, w, b, y), expected),
        "fused, jit, no mesh context": lambda: fused_gradient(jax.jit),
        "integer labels, jit, no mesh context": lambda: errors(jax.jit(int_ce)(z, y), int_expected),
    }


def errors(value, expected, grads=(), expected_grads=()):
    return {
        "value": ref.rel_err(value, expected),
        "grads": [ref.rel_err(g, e) for g, e in zip(grads, expected_grads, strict=True)],
    }


def reported(check):
    """The check's result, or the exception it raised, for the test to fail on."""
    try:
        return check()
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


def main():
    if "--other-backends" in sys.argv[1:]:
        _stable.by_backend = lambda *args, cpu, other: other(*args)
    explicit = "--explicit" in sys.argv[1:]
    run = run_case_explicit if explicit else run_case
    mesh = jax.make_mesh((DEVICES,), ("rows",), axis_types=(AxisType.Explicit,))
    data = problem()
    all_cases = cases(data, explicit)
    if explicit:
        all_cases.update(**class_split_cases(data), **fused_class_split_cases(data))
    checks = {name: partial(run, mesh, data, case) for name, case in all_cases.items()}
    with jax.set_mesh(mesh):
        results = {name: reported(check) for name, check in checks.items()}
    if explicit:
        mesh_2x2 = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
        with jax.set_mesh(mesh_2x2):
            for name, case in {**two_axis_cases(data), **float16_cases(data)}.items():
                results[name] = reported(partial(run, mesh_2x2, data, case))
            for name, case in inside_shard_map_cases(data).items():
                results[name] = reported(partial(compare, mesh_2x2, data, *case))
        results.update({n: reported(c) for n, c in outside_jit_cases(mesh, data).items()})
    print(json.dumps({"devices": jax.device_count(), "results": results}))


if __name__ == "__main__":
    main()
