"""Test configuration: strict dtype promotion, as equinox's test suite does.

Under strict promotion, any implicit mixing of dtypes inside the library (say a
float32 array times a float64 one) raises instead of silently promoting, so the
tests catch it.
"""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(params=["this backend", "other backends"])
def backend_forms(request, monkeypatch):
    """Runs a test twice: with this backend's forms, then with the GPU/TPU forms forced.

    ``_stable.by_backend`` picks XLA:CPU's or the other backends' form of a
    computation when lowering; forcing the latter runs the GPU code here, so a CPU
    machine tests both. XLA:CPU also takes the other forms for inputs of a few
    thousand elements, as most tests' are, and softmax's 16-bit branch is only for
    large inputs; "this backend" takes its own forms at every size, so that they
    are tested on small inputs too.
    """
    from jsoftmax import _stable

    if request.param == "other backends":
        monkeypatch.setattr(_stable, "by_backend", lambda *args, cpu, other: other(*args))
    else:
        monkeypatch.setattr(_stable, "_BRANCH_FREE_ELEMENTS", 0)
        monkeypatch.setattr(_stable, "_FEWEST_BRANCHING_ELEMENTS", 0)
    jax.clear_caches()
    yield request.param
    jax.clear_caches()
