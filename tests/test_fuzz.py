"""A few seeded cases of ``tests/fuzz.py`` in each form, so that it keeps running.

Longer runs: ``python -m tests.fuzz --seed S --cases 300 --forms cpu|other|default``
(``--one-row`` for single rows).
"""

import numpy as np
import pytest

from tests import fuzz
from tests import reference as ref


@pytest.mark.usefixtures("backend_forms")
@pytest.mark.parametrize("seed", [0, 1])
def test_random_rows_with_special_values_take_their_limits(seed):
    assert fuzz.run(seed, cases=3, many_rows=True) == []


@pytest.mark.usefixtures("backend_forms")
def test_single_random_rows_take_their_limits():
    """One-element losses, where XLA simplifies differently (a tiny z-loss went NaN there)."""
    assert fuzz.run(2, cases=3, one_row=True) == []


def test_limit_reference_shares_probability_among_infinite_logits():
    x = np.array([[np.inf, 0.0, np.inf], [1e30, 1e30, -np.inf], [np.nan, 0.0, 1.0]])
    limits = ref.row_limits(x, np.ones(x.shape, bool))
    np.testing.assert_array_equal(limits.probabilities[:2], [[0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
    np.testing.assert_allclose(limits.log_probabilities[1, :2], -np.log(2), rtol=1e-15)
    assert np.isnan(limits.logsumexp[2]) and limits.logsumexp[0] == np.inf


def test_mismatches_catch_nan_infinity_and_distance():
    expected = np.array([1.0, np.inf, np.nan, 4e38])
    assert not fuzz.mismatches([1.0 + 1e-7, np.inf, np.nan, np.inf], expected, 1e-5).any()
    wrong = fuzz.mismatches([1.001, 3e38, 0.0, np.inf], expected, 1e-5)
    np.testing.assert_array_equal(wrong, [True, True, True, False])
