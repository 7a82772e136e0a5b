"""Nearest-neighbour scores and the paper's Eq. 7, checked against hand computations."""

import math

import numpy as np
import pytest

from patchcore.bank import MemoryBank
from patchcore.core.scoring import image_score, score_map


def reweighted_score(bank: MemoryBank, patch, patch_score, nn_index, num_neighbors):
    """Eq. 7's image score as the estimator computes it: the core's, with the bank's own N_b."""
    return image_score(bank.bank, patch, patch_score, nn_index, bank.support_of(num_neighbors), num_neighbors)


def test_search_is_exact_euclidean():
    rng = np.random.default_rng(0)
    bank, q = rng.normal(size=(500, 24)).astype(np.float32), rng.normal(size=(50, 24)).astype(np.float32)
    d, i = MemoryBank(bank).search(q, 3)
    ref = np.linalg.norm(q[:, None] - bank[None], axis=2)
    assert np.array_equal(i[:, 0], ref.argmin(1))
    assert np.allclose(d, np.sort(ref, axis=1)[:, :3], atol=1e-4)


def test_eq7_by_hand():
    # Bank on a line: m* = 0 at x=0; its neighbours at x=1 and x=3. Test patch at x=-2 (score s* = 2).
    bank = MemoryBank(np.array([[0.0], [1.0], [3.0], [10.0]], dtype=np.float32))
    patch = np.array([-2.0], dtype=np.float32)
    s = reweighted_score(bank, patch, 2.0, nn_index=0, num_neighbors=3)
    # N_3(m*) = {0, 1, 3}; distances from the test patch: 2, 3, 5
    expected = (1 - math.exp(2) / (math.exp(2) + math.exp(3) + math.exp(5))) * 2.0
    assert s == pytest.approx(expected, rel=1e-9)


def test_eq7_weights_rare_nominal_neighbours_up():
    dense = MemoryBank(np.array([[0.0], [0.1], [0.2], [0.3]], dtype=np.float32))
    sparse = MemoryBank(np.array([[0.0], [5.0], [6.0], [7.0]], dtype=np.float32))
    p = np.array([-1.0], dtype=np.float32)
    w_sparse, w_dense = reweighted_score(sparse, p, 1.0, 0, 4), reweighted_score(dense, p, 1.0, 0, 4)
    assert w_sparse > w_dense
    assert w_dense > 1 - 1 / 4  # neighbours all at about the same distance: weight a bit above 1 - 1/b
    assert reweighted_score(dense, p, 1.0, 0, 1) == 1.0  # b = 1: no reweighting
    # huge distances must not overflow
    far = MemoryBank(np.array([[0.0], [1e4], [2e4]], dtype=np.float32))
    assert math.isfinite(reweighted_score(far, np.array([-5e3], np.float32), 5e3, 0, 3))


def test_smoothing_keeps_mass_and_spreads_a_peak():
    m = np.zeros((64, 64), np.float32)
    m[32, 32] = 1.0
    s = score_map(m, (64, 64), 4.0)  # at its own size the map is only smoothed
    assert float(s.sum()) == pytest.approx(1.0, abs=1e-4)
    assert float(s.max()) == pytest.approx(1 / (2 * math.pi * 16), rel=0.05)
    assert np.array_equal(score_map(m, (64, 64), 0), m)
