from bisect import bisect

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from skimage.measure import label as skimage_label
from sklearn.metrics import roc_auc_score

from patchcore.metrics import aupro, f1_max, image_auroc, pixel_auroc, pixel_f1_max, roc_curve_points

# Scores drawn from a few values so that ties are common.
scores_strategy = st.lists(st.integers(0, 5).map(float), min_size=2, max_size=40)


def pairwise_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(anomalous scores above normal), ties counting half: the definition of AUROC."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


# --- AUROC -------------------------------------------------------------------------------


@settings(deadline=None)  # sklearn's first call can be slow; correctness, not speed, is tested here
@given(st.data())
def test_image_auroc_matches_sklearn_and_definition(data: st.DataObject) -> None:
    scores = np.array(data.draw(scores_strategy))
    labels = np.array(data.draw(st.lists(st.integers(0, 1), min_size=len(scores), max_size=len(scores))))
    assume(0 < labels.sum() < len(labels))
    result = image_auroc(labels, scores)
    assert result == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result == pytest.approx(pairwise_auroc(labels, scores), abs=1e-12)


def test_image_auroc_perfect_inverted_and_bool_labels() -> None:
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_auroc(np.array([False, True]), [1.0, 1.0]) == 0.5


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_pixel_auroc_matches_pairwise_on_images_of_different_sizes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (5, 2), (1, 6)]
    masks = [rng.random(shape) < 0.3 for shape in shapes]
    maps = [rng.integers(0, 4, shape).astype(float) for shape in shapes]
    labels = np.concatenate([m.ravel() for m in masks])
    assume(0 < labels.sum() < labels.size)
    expected = pairwise_auroc(labels.astype(int), np.concatenate([m.ravel() for m in maps]))
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_accepts_0_255_masks_and_a_3d_stack() -> None:
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[0, 1, 1] = 255
    maps = masks.astype(np.float32) / 255
    assert pixel_auroc(masks, maps) == 1.0


def test_roc_curve_points_runs_from_origin_to_one() -> None:
    fpr, tpr, thresholds = roc_curve_points([0, 1, 0, 1], [0.1, 0.4, 0.35, 0.8])
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert len(fpr) == len(tpr) == len(thresholds)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1, 1], [0.1, 0.2], "3 labels but 2 scores"),
        ([1, 1], [0.1, 0.2], "only one class"),
        ([0, 0], [0.1, 0.2], "only one class"),
        ([0, 2], [0.1, 0.2], "must be 0"),
        ([0, 1], [0.1, np.nan], "finite"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_label_score_validation(labels: list, scores: list, message: str) -> None:
    for metric in (image_auroc, f1_max, roc_curve_points):
        with pytest.raises(ValueError, match=message):
            metric(labels, scores)


def test_pixel_validation() -> None:
    mask = np.array([[0, 1]])
    with pytest.raises(ValueError, match="2 masks but 1 maps"):
        pixel_auroc([mask, mask], [mask])
    with pytest.raises(ValueError, match="same 2-D shape"):
        pixel_auroc([mask], [mask.T])
    with pytest.raises(ValueError, match="same 2-D shape"):
        aupro([mask.ravel()], [mask.ravel()])
    with pytest.raises(ValueError, match="no masks"):
        aupro([], [])
    with pytest.raises(ValueError, match="only one class"):
        pixel_auroc([np.zeros((2, 2))], [np.ones((2, 2))])


# --- AUPRO: hand-computed cases -----------------------------------------------------------


def test_aupro_perfect_map_is_one() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:3, 1:3] = mask[6, 6] = True
    assert aupro([mask, np.zeros((4, 4), bool)], [mask * 0.9 + 0.05, np.zeros((4, 4))]) == pytest.approx(1.0)


def test_aupro_one_region_found_the_other_ranked_last() -> None:
    # 4x4, region A = (0,0) scored top, region B = (3,3) scored below all 14 normal pixels.
    # Curve: (0,0) -> t=1: (FPR 0, PRO 1/2) -> t=.5: (1, 1/2) -> t=0: (1, 1).
    # Area up to 0.3 is 0.3 * 1/2, so AUPRO = 0.5.
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[3, 3] = True
    score = np.full((4, 4), 0.5)
    score[0, 0], score[3, 3] = 1.0, 0.0
    assert aupro([mask], [score]) == pytest.approx(0.5)


def test_aupro_weights_regions_equally_whatever_their_size() -> None:
    # 6x6: region A is a 2x2 block with 2 of 4 pixels on top, region B one pixel on top;
    # 31 normal pixels in the middle. PRO jumps to mean(2/4, 1) = 0.75 at FPR 0 and stays
    # there until FPR 1, so AUPRO = 0.75 (pixel-wise recall would be 3/5).
    mask = np.zeros((6, 6), dtype=bool)
    mask[0:2, 0:2] = mask[5, 5] = True
    score = np.full((6, 6), 0.5)
    score[0:2, 0:2] = [[1.0, 1.0], [0.0, 0.0]]
    score[5, 5] = 1.0
    assert aupro([mask], [score]) == pytest.approx(0.75)


def test_aupro_regions_are_8_connected() -> None:
    # Diagonal pair (0,0)-(1,1) is one region (half found); (3,3) is another (found).
    # 8-connected: PRO = mean(1/2, 1) = 0.75; 4-connected would give mean(1, 0, 1) = 2/3.
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = True
    score = np.full((5, 5), 0.5)
    score[0, 0], score[1, 1], score[3, 3] = 1.0, 0.0, 1.0
    assert aupro([mask], [score]) == pytest.approx(0.75)


def test_aupro_good_image_false_positive_shifts_the_fpr_axis() -> None:
    # Defect image 2x2: its defect pixel scores 1, its 3 normal pixels 0 -> perfect alone.
    # Good image 3x3 (other size): one normal pixel scores 2, above the defect. 12 normal pixels.
    # Curve: (0,0) -> t=2: (1/12, 0) -> t=1: (1/12, 1) -> t=0: (1, 1).
    # Area up to 0.3 is (0.3 - 1/12) * 1, so AUPRO = 1 - (1/12) / 0.3.
    mask = np.array([[True, False], [False, False]])
    score = mask.astype(float)
    good_score = np.zeros((3, 3))
    good_score[1, 1] = 2.0
    assert aupro([mask], [score]) == pytest.approx(1.0)
    got = aupro([mask, np.zeros((3, 3), dtype=np.uint8)], [score, good_score])
    assert got == pytest.approx(1 - (1 / 12) / 0.3)


def test_aupro_ties_cross_the_threshold_together() -> None:
    # 1x4: the defect pixel ties with one of 3 normal pixels at the top.
    # Curve: (0,0) -> t=1: (1/3, 1) -> t=0: (1, 1); at FPR 0.3 it is interpolated to PRO 0.9.
    # Area = 0.3 * 0.9 / 2, so AUPRO = 0.45 (not 1 or 0 as an arbitrary tie order would give).
    mask = np.array([[1, 0, 0, 0]], dtype=np.uint8)
    score = np.array([[1.0, 1.0, 0.0, 0.0]])
    assert aupro([mask], [score]) == pytest.approx(0.45)
    # With the limit exactly on the curve point (1/3, 1): area 1/3 * 1 / 2 -> 0.5.
    assert aupro([mask], [score], fpr_limit=1 / 3) == pytest.approx(0.5)
    # Whole curve: 1/3 / 2 + 2/3 = 5/6.
    assert aupro([mask], [score], fpr_limit=1.0) == pytest.approx(5 / 6)


def test_aupro_errors() -> None:
    with pytest.raises(ValueError, match="at least one defect region"):
        aupro([np.zeros((3, 3))], [np.zeros((3, 3))])
    with pytest.raises(ValueError, match="normal pixels"):
        aupro([np.ones((3, 3))], [np.zeros((3, 3))])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([np.eye(3)], [np.eye(3)], fpr_limit=0)
    with pytest.raises(ValueError, match="finite"):
        aupro([np.eye(3)], [np.full((3, 3), np.inf)])


# --- AUPRO: against a slow reference --------------------------------------------------------


def reference_aupro(masks: list[np.ndarray], maps: list[np.ndarray], fpr_limit: float) -> float:
    """Straightforward AUPRO: one pass over all pixels per threshold, MVTec-style integration."""
    regions = []
    for mask, amap in zip(masks, maps):
        labelled = skimage_label(mask, connectivity=2)  # 8-connectivity
        regions += [amap[labelled == k] for k in range(1, labelled.max() + 1)]
    normal = np.concatenate([amap[~mask] for mask, amap in zip(masks, maps)])
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(region >= t) for region in regions]))
    x, y = np.array(fprs), np.array(pros)
    # Trapezoid up to fpr_limit with linear interpolation there, as in MVTec AD's evaluation code.
    correction = 0.0
    if fpr_limit not in x:
        i = bisect(list(x), fpr_limit)
        y_limit = y[i - 1] + (y[i] - y[i - 1]) * (fpr_limit - x[i - 1]) / (x[i] - x[i - 1])
        correction = 0.5 * (y_limit + y[i - 1]) * (fpr_limit - x[i - 1])
    keep = x <= fpr_limit
    x, y = x[keep], y[keep]
    return (float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x))) + correction) / fpr_limit


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.3, 0.05, 0.5, 1.0]), st.sampled_from([3, 50, 10**6]))
def test_aupro_matches_reference(seed: int, fpr_limit: float, levels: int) -> None:
    rng = np.random.default_rng(seed)
    shapes = [tuple(rng.integers(1, 9, size=2)) for _ in range(rng.integers(1, 4))]
    masks = [rng.random(shape) < rng.uniform(0, 0.5) for shape in shapes]
    # Few levels give many ties; maps loosely follow the masks so curves are not trivial.
    maps = [np.round((mask * rng.uniform(0, 1) + rng.random(mask.shape)) * levels) for mask in masks]
    assume(any(m.any() for m in masks) and any((~m).any() for m in masks))
    assert aupro(masks, maps, fpr_limit) == pytest.approx(reference_aupro(masks, maps, fpr_limit), abs=1e-6)


# --- F1 max ------------------------------------------------------------------------------------


def brute_f1(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    predicted = scores >= threshold
    tp = np.sum(predicted & (labels == 1))
    return 2 * tp / (predicted.sum() + labels.sum())


@settings(deadline=None)
@given(st.data())
def test_f1_max_matches_brute_force(data: st.DataObject) -> None:
    scores = np.array(data.draw(scores_strategy))
    labels = np.array(data.draw(st.lists(st.integers(0, 1), min_size=len(scores), max_size=len(scores))))
    assume(0 < labels.sum() < len(labels))
    f1s = {t: brute_f1(labels, scores, t) for t in np.unique(scores)}
    best = max(f1s.values())
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(best, abs=1e-12)
    assert threshold == min(t for t, value in f1s.items() if value == pytest.approx(best, abs=1e-12))


def test_f1_max_hand_case() -> None:
    # Thresholds 0.9 / 0.8 / 0.7 / 0.1 give F1 2/3 / 1/2 / 0.8 / 2/3; at 0.7 both anomalies
    # and one normal are caught: P = 2/3, R = 1, F1 = 0.8.
    assert f1_max([0, 0, 1, 1], [0.1, 0.8, 0.7, 0.9]) == pytest.approx((0.8, 0.7))


def test_pixel_f1_max_equals_f1_max_over_all_pixels() -> None:
    rng = np.random.default_rng(1)
    masks = [rng.random((4, 5)) < 0.3, rng.random((2, 3)) < 0.3]
    maps = [rng.random(m.shape) + m for m in masks]
    labels = np.concatenate([m.ravel() for m in masks]).astype(int)
    assert pixel_f1_max(masks, maps) == f1_max(labels, np.concatenate([m.ravel() for m in maps]))
