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
