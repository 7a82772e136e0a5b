"""The cell-pruned nearest-neighbour search gives the brute-force answer while comparing far less."""

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchcore import Prediction
from patchcore.bank import MemoryBank
from patchcore.core.search import CellSearch


def brute(bank: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    d2, i = index.search(q, 1)
    return np.sqrt(np.maximum(d2[:, 0], 0)), i[:, 0]


def clustered(rng: np.random.Generator, n: int, d: int, centres: int, spread: float) -> np.ndarray:
    c = rng.normal(size=(centres, d)).astype(np.float32) * 4
    return (c[rng.integers(0, centres, n)] + spread * rng.normal(size=(n, d))).astype(np.float32)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(200, 6000), d=st.integers(2, 64), cells=st.integers(1, 80),
       spread=st.floats(0.05, 3.0))
def test_same_neighbours_as_brute_force(seed, n, d, cells, spread):
    rng = np.random.default_rng(seed)
    bank = clustered(rng, n, d, 12, spread)
    # queries near the bank (as good patches are) and far from it (as defects are), plus exact bank points
    q = np.concatenate([bank[rng.integers(0, n, 200)] + 0.1 * spread * rng.normal(size=(200, d)).astype(np.float32),
                        clustered(rng, 50, d, 3, 5.0), bank[:20]]).astype(np.float32)
    dist, idx, _ = CellSearch(bank, max(1, min(cells, n // 40)), seed=seed).nearest(q)
    ref_d, ref_i = brute(bank, q)
    ours = np.linalg.norm(bank[idx].astype(np.float64) - q, axis=1)
    theirs = np.linalg.norm(bank[ref_i].astype(np.float64) - q, axis=1)
    # Our neighbour is as near as brute force's (they differ only between near-ties, within float32 rounding
    # of |q|^2 - 2 q.m + |m|^2), and the distance returned is its distance.
    scale = float(np.sqrt((q.astype(np.float64) ** 2).sum(1).max() + (bank.astype(np.float64) ** 2).sum(1).max()))
    assert (ours <= theirs + 1e-3 * scale).all()
    np.testing.assert_allclose(dist, ours, rtol=1e-5, atol=1e-6 * scale)
    assert (idx == ref_i).mean() > 0.95


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(200, 4000), d=st.integers(2, 32), cells=st.integers(1, 60),
       share=st.floats(0.05, 1.0))
def test_a_subset_searches_as_a_fresh_build_over_it(seed, n, d, cells, share):
    """An update's calibration searches the new features less one fold's through the cells of all of them."""
    rng = np.random.default_rng(seed)
    bank = clustered(rng, n, d, 8, 0.5)
    keep = rng.random(n) < share
    keep[rng.integers(0, n)] = True
    q = np.concatenate([bank[rng.integers(0, n, 150)] + 0.05 * rng.normal(size=(150, d)),
                        clustered(rng, 30, d, 3, 4.0)]).astype(np.float32)
    full = CellSearch(bank, max(1, min(cells, n // 40)), seed=seed)
    sub = full.subset(keep)
    dist, idx, _ = sub.nearest(q)
    part = bank[keep]
    assert len(sub) == keep.sum() and (np.diff(sub.starts) > 0).all()
    ref_d, ref_i = brute(part, q)
    ours = np.linalg.norm(part[idx].astype(np.float64) - q, axis=1)
    scale = float(np.sqrt((q.astype(np.float64) ** 2).sum(1).max() + (part.astype(np.float64) ** 2).sum(1).max()))
    assert (ours <= ref_d + 1e-3 * scale).all()  # as near as brute force over the subset, and within it
    np.testing.assert_allclose(dist, ours, rtol=1e-5, atol=1e-6 * scale)
    with pytest.raises(ValueError, match="no feature"):
        full.subset(np.zeros(n, bool))


@pytest.mark.slow
def test_real_patches_give_brute_force_scores_comparing_a_fraction_of_the_bank(bottle):
    from patchcore import PatchCore

    good = sorted((bottle / "train" / "good").glob("*.png"))[::10][:20]
    model = PatchCore(coreset_ratio=0.25, calibration_folds=0, device="cpu").fit(good)
    assert model.fit_info_["bank_size"] >= 4096  # large enough to be split into cells
    test = sorted((bottle / "test").glob("*/*.png"))[::12]
    fast = model.predict(test)
    feats, sizes = model.extract(test)
    slow = model.score_features(MemoryBank(model.memory_bank_, cells=1), feats, sizes)  # brute force
    for a, (score, amap) in zip(fast, slow):
        b = Prediction(a.name, score, amap)
        assert abs(a.score - b.score) <= 1e-5 * b.score
        # (brute force carries float32 rounding of |q|^2 - 2 q.m + |m|^2; ours are computed directly)
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-4 * b.anomaly_map.max()
    _, _, share = CellSearch(model.memory_bank_).nearest(feats.reshape(-1, feats.shape[-1]).numpy())
    assert share < 0.5


def test_memory_bank_nearest_and_eq7_support_agree_with_search():
    rng = np.random.default_rng(1)
    bank = clustered(rng, 5000, 16, 30, 0.5)
    mb = MemoryBank(bank)
    q = bank[:300] + 0.01
    d, i = mb.nearest(q)
    rd, ri = mb.search(q, 1)
    assert (i == ri[:, 0]).all() and np.allclose(d, rd[:, 0], rtol=1e-4, atol=1e-5)
    s = mb.support(7, 5)
    assert s[0] == 7 and len(s) == 5 and len(set(s.tolist())) == 5
    assert mb.support(7, 5) is s  # cached


def test_threaded_chunks_give_the_one_call_answer():
    """A batch's patches are searched in chunks on several threads (predict, update): chunking must not change
    any neighbour or distance, whatever the chunk boundaries."""
    rng = np.random.default_rng(2)
    bank = clustered(rng, 6000, 24, 40, 0.5)
    mb = MemoryBank(bank)
    q = (bank[rng.integers(0, 6000, 9000)] + rng.normal(0, 0.3, (9000, 24))).astype(np.float32)
    d1, i1 = mb.nearest(q)
    for jobs in (2, 3, 4):
        d, i = mb.nearest(q, n_jobs=jobs)
        assert (i == i1).all() and np.array_equal(d, d1)
