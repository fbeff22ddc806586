"""Every public function under JAX's explicit sharding and inside ``jax.shard_map``.

Explicit sharding (sharding in types) on a 1-device mesh: a split batch axis
makes JAX type-check every gather, scatter and loop carry against the operands'
shardings; the results must equal the unsharded ones. On 4 CPU devices, in a
subprocess (``tests/multi_device_cases.py``), against float64 closed forms: the
rows split (explicit sharding, and inside ``shard_map`` each device its own
rows, the per-device losses summed), the class axis split, and for the fused
loss both at once on a 2x2 mesh; and the fused loss's memory per device
(``benchmarks/sharded.py``).
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax
from tests import reference as ref

N, C = 8, 5


@pytest.fixture
def mesh():
    mesh = jax.make_mesh((1,), ("batch",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        yield mesh


def split(mesh, array):
    """``array`` split over the mesh along its first (batch) axis."""
    return jax.device_put(jnp.asarray(array), NamedSharding(mesh, P("batch")))


def problem(rng):
    logits = rng.standard_normal((N, C)).astype(np.float32)
    labels = rng.integers(0, C, N).astype(np.int32)
    probs = rng.dirichlet(np.ones(C), N).astype(np.float32)
    logit_mask = rng.random((N, C)) > 0.3
    example_mask = rng.random(N) > 0.3
    return logits, labels, probs, logit_mask, example_mask


def loss_cases(labels, probs, logit_mask, example_mask):
    """(name, fn of the logits) with every batch-shaped argument given by the caller."""
    weights = jnp.linspace(0.5, 2.0, C, dtype=jnp.float32)
    int_ce = jsoftmax.softmax_cross_entropy_with_integer_labels
    soft_ce = jsoftmax.softmax_cross_entropy
    return {
        "softmax": lambda x: jsoftmax.softmax(x, where=logit_mask),
        "log_softmax": lambda x: jnp.maximum(
            jsoftmax.log_softmax(x, where=example_mask[:, None]), -1e3
        ),
        "logsumexp": lambda x: jsoftmax.logsumexp(x, where=logit_mask),
        "soft": lambda x: soft_ce(x, probs, class_weights=weights, label_smoothing=0.1),
        "soft weights z-loss mean": lambda x: soft_ce(
            x, probs, where=example_mask, class_weights=weights, z_loss=1e-3, reduction="mean"
        ),
        "int": lambda x: int_ce(x, labels, z_loss=1e-3, label_smoothing=0.1),
        "int weights mean": lambda x: int_ce(
            x, labels, where=example_mask, class_weights=weights, reduction="mean"
        ),
        "int ignore_index": lambda x: int_ce(
            x, jnp.where(example_mask, labels, -100), ignore_index=-100, reduction="mean"
        ),
        "int logit mask": lambda x: int_ce(
            x, labels, where=logit_mask | (jnp.arange(C) == labels[:, None])
        ),
    }


@pytest.mark.parametrize(
    "name",
    list(loss_cases(*(np.zeros((N, C)),) * 4)),
)
def test_losses_and_gradients_match_the_unsharded_ones(rng, mesh, name):
    logits, labels, probs, logit_mask, example_mask = problem(rng)
    plain = loss_cases(labels, probs, logit_mask, example_mask)[name]
    split_args = (split(mesh, a) for a in (labels, probs, logit_mask, example_mask))
    sharded = loss_cases(*split_args)[name]

    def value_and_grad(fn, x):
        return jax.jit(jax.value_and_grad(lambda x: jnp.sum(fn(x))))(x)

    expected, expected_grad = value_and_grad(plain, jnp.asarray(logits))
    value, grad = value_and_grad(sharded, split(mesh, logits))
    assert jax.typeof(grad).sharding.spec[0] == "batch"
    assert ref.rel_err(value, expected) < 1e-6
    assert ref.rel_err(grad, expected_grad) < 1e-6


def test_fused_loss_with_split_rows_matches(rng, mesh):
    x = rng.standard_normal((N, 3)).astype(np.float32)
    w = rng.standard_normal((3, C)).astype(np.float32)
    labels = rng.integers(0, C, N).astype(np.int32)

    def loss(x, w, labels):
        return jsoftmax.linear_softmax_cross_entropy(x, w, labels, chunk_size=3)

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    expected, (expected_dx, expected_dw) = grad_fn(x, w, labels)
    value, (dx, dw) = grad_fn(split(mesh, x), w, split(mesh, labels))
    assert jax.typeof(dx).sharding.spec[0] == "batch"
    assert ref.rel_err(value, expected) < 1e-6
    assert ref.rel_err(dx, expected_dx) < 1e-6 and ref.rel_err(dw, expected_dw) < 1e-6


ROOT = Path(__file__).resolve().parent.parent
FOUR_DEVICE_CASES = (
    "softmax",
    "log_softmax",
    "logsumexp",
    "softmax_cross_entropy",
    "integer labels, masked",
    "fused, sum, chunk_size=4",
    "fused, none, chunk_size=4",
)


def run_four_device_cases(*options):
    """The results of ``tests/multi_device_cases.py`` run on 4 host devices."""
    argv = [sys.executable, "-m", "tests.multi_device_cases", *options]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["devices"] == 4
    return report["results"]


def backend_options(param):
    return ("--other-backends",) if param == "other backends" else ()


@pytest.fixture(scope="module", params=["this backend", "other backends"])
def shard_map_results(request):
    return run_four_device_cases(*backend_options(request.param))


@pytest.fixture(scope="module", params=["this backend", "other backends"])
def split_results(request):
    return run_four_device_cases("--explicit", *backend_options(request.param))


def assert_matches_float64(result):
    assert "error" not in result, result.get("error")
    assert result["value"] < 1e-5
    assert max(result["grads"], default=0.0) < 1e-5
    assert all(result.get("grads_split_as_inputs", ()))


@pytest.mark.parametrize("name", FOUR_DEVICE_CASES)
def test_inside_shard_map_each_device_its_rows(shard_map_results, name):
    """Values and gradients, ``w`` and ``b``'s summed over the devices, as in float64."""
    assert_matches_float64(shard_map_results[name])


EXPLICIT_ONLY_CASES = (
    "fused, mean, masked, default chunk",
    "soft labels, mean, class weights and z-loss",
)


@pytest.mark.parametrize("name", (*FOUR_DEVICE_CASES, *EXPLICIT_ONLY_CASES))
def test_rows_split_over_four_devices_each_does_its_share(split_results, name):
    """Explicit sharding, 4 devices: exact, and each device does a quarter of the work.

    XLA's cost analysis counts a loop's body once, so the flops of a fused loss
    with several chunks per device are no measure of the share; with the default
    chunk (one per device here) they are, and gathering the rows whole gives 1.
    """
    result = split_results[name]
    assert_matches_float64(result)
    if "chunk_size" not in name:
        assert result["flops_ratio"] < 0.3


CLASS_SPLIT_CASES = (
    "classes split: softmax, logit mask",
    "classes split: logsumexp, logit mask",
    "classes split: log_softmax",
    "classes split: soft labels, options",
    "classes split: soft labels, options, mean",
    "classes split: integer labels, options",
    "classes split: softmax, long rows",
    "classes split: integer labels, long rows",
)


@pytest.mark.parametrize("name", CLASS_SPLIT_CASES)
def test_classes_split_over_four_devices(split_results, name):
    """The class axis split (vocabulary parallelism), labels and masks whole: exact.

    Each device does well under the whole work; the per-row statistics and the
    per-example terms, small here with 12 classes, are computed on every device.
    """
    result = split_results[name]
    assert_matches_float64(result)
    assert result["flops_ratio"] < 0.6


FUSED_CLASS_SPLIT_CASES = (
    "fused, classes split: sum, smoothing, z-loss",
    "fused, classes split: none, soft-cap, chunk_size=5",
    "fused, rows and classes split: mean, masked",
    "fused, rows and classes split: none",
)


@pytest.mark.parametrize("name", FUSED_CLASS_SPLIT_CASES)
def test_fused_loss_with_classes_split_keeps_them_split(split_results, name):
    """``w``'s classes split over 4 devices (or 2, with the rows over the other 2).

    Exact, ``dw`` and ``db`` split as ``w`` and ``b``, and each device computes
    only its classes' logits: gathering ``w`` whole gives a flops ratio of 1
    (0.5 on the 2x2 mesh); the per-row work, large with 12 classes, is what
    every device repeats.
    """
    result = split_results[name]
    assert_matches_float64(result)
    assert result["flops_ratio"] < 0.45


def test_fused_loss_inside_shard_map_over_some_axes_with_classes_split(split_results):
    """Inside a user's ``shard_map`` over "data" only, ``w`` split over "model": exact."""
    assert_matches_float64(split_results["fused, classes split, inside shard_map over the rows"])


@pytest.mark.parametrize("split", ["rows", "classes", "rows and classes"])
def test_fused_loss_float16_gradients_are_rounded_once(split_results, split):
    """float16 on a 2x2 mesh: the gradients summed over devices in float32, then rounded.

    One rounding to float16 is off by at most 2**-11 of the largest entry; a
    sum of per-device float16 gradients (rounded twice) was off by more in dw.
    """
    result = split_results[f"fused, float16, {split} split"]
    assert "error" not in result, result.get("error")
    assert result["value"] < 1e-5
    assert max(result["grads"]) < 2.0**-11 + 1e-5
    assert all(result["grads_split_as_inputs"])


@pytest.mark.parametrize(
    "name",
    [
        "fused, eager value_and_grad",
        "fused, eager",
        "fused, eager, no mesh context",
        "fused, eager inside shard_map",
        "fused, eager value_and_grad inside shard_map",
        "fused, jit, no mesh context",
        "integer labels, jit, no mesh context",
    ],
)
def test_split_rows_outside_jit_or_without_a_mesh_context(split_results, name):
    """Called eagerly (inside ``jax.set_mesh`` or not, or inside a ``shard_map``), or jitted
    without a mesh context."""
    assert_matches_float64(split_results[name])


def test_sharded_memory_script_each_device_holds_its_share_of_w():
    """``benchmarks/sharded.py``: with the classes split each device's arguments and
    temporaries shrink (gathering ``w`` whole would leave them as on one device)."""
    argv = [sys.executable, "benchmarks/sharded.py", "--shape", "512", "128", "8192"]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = {}
    for line in run.stdout.splitlines():
        if line.startswith("| ") and "/" in line:
            name, ours, _ = (cell.strip() for cell in line.strip("|").split("|"))
            rows[name] = [float(v) for v in ours.split("/")]
    whole_args, whole_temp, _ = rows["one device (nothing split)"]
    class_args, class_temp, class_out = rows["classes over 4"]
    assert class_args < 0.5 * whole_args and class_out < 0.5 * whole_args
    assert class_temp < 0.5 * whole_temp
    assert rows["examples over 2 x classes over 2"][0] < 0.6 * whole_args
