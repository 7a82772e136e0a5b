"""Evaluation metrics for anomaly detection: image/pixel AUROC, AUPRO and best F1.

Conventions: label 1 (or True) means anomalous; a higher score means more anomalous;
a mask pixel is defective where it is nonzero, so boolean, 0/1 and 0/255 masks all work.
Masks and maps are sequences of 2-D arrays (a 3-D array works too); each map has the shape
of its mask, but different images may have different sizes. Bad input raises ValueError.
"""

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from scipy.integrate import trapezoid
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

__all__ = ["aupro", "f1_max", "image_auroc", "pixel_auroc", "pixel_f1_max", "roc_curve_points"]

# MVTec AD's official evaluation labels defect regions with 8-connectivity.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of per-image scores."""
    y, s = _labels_and_scores(labels, scores)
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: Sequence[ArrayLike], maps: Sequence[ArrayLike]) -> float:
    """Area under the ROC curve over all pixels of all images (exact, no subsampling)."""
    y, s = _labels_and_scores(*_flat_pixels(masks, maps))
    return float(roc_auc_score(y, s))


def roc_curve_points(
    labels: ArrayLike, scores: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """ROC curve as (fpr, tpr, thresholds) from sklearn, for plotting; thresholds[0] is +inf."""
    y, s = _labels_and_scores(labels, scores)
    fpr, tpr, thresholds = roc_curve(y, s)
    return fpr, tpr, thresholds


def f1_max(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold reaching it.

    A sample is predicted anomalous when its score >= threshold. When several thresholds
    reach the best F1, the lowest one is returned.
    """
    y, s = _labels_and_scores(labels, scores)
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision=1, recall=0) point has no threshold; drop it.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    # Where precision and recall are both 0, F1 is 0 rather than 0/0.
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    # Thresholds ascend; equal F1s can differ in the last bits, so compare with a tolerance.
    best = int(np.flatnonzero(f1 >= f1.max() - 1e-12)[0])
    return float(f1[best]), float(thresholds[best])


def pixel_f1_max(masks: Sequence[ArrayLike], maps: Sequence[ArrayLike]) -> tuple[float, float]:
    """f1_max over all pixels of all images."""
    return f1_max(*_flat_pixels(masks, maps))


def aupro(masks: Sequence[ArrayLike], maps: Sequence[ArrayLike], fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD).

    Every 8-connected defect region of every mask counts once, whatever its size:
    PRO(t) is the mean over regions of the fraction of region pixels scoring >= t, and
    FPR(t) the fraction of all normal pixels (good images included) scoring >= t.
    PRO is integrated over FPR in [0, fpr_limit] with the trapezoid rule, the curve being
    linearly interpolated at fpr_limit, and divided by fpr_limit, so a perfect map gives 1.
    Raises ValueError when there is no defect region or no normal pixel at all.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    _, scores = _flat_pixels(masks, maps)
    # Give every region a globally unique id (0 = normal) so one bincount sizes them all.
    regions = np.empty(scores.size, dtype=np.int64)
    start = n_regions = 0
    for mask in masks:
        labelled, n = ndimage.label(np.asarray(mask) != 0, structure=_EIGHT_CONNECTED)
        flat = labelled.ravel().astype(np.int64)
        regions[start : start + flat.size] = np.where(flat > 0, flat + n_regions, 0)
        start += flat.size
        n_regions += n
    if n_regions == 0:
        raise ValueError("aupro needs at least one defect region, but every mask is empty")
    sizes = np.bincount(regions)
    n_normal = int(sizes[0])
    if n_normal == 0:
        raise ValueError("aupro needs normal pixels, but every mask pixel is a defect")

    # Each defect pixel carries its share of its region's 1/n_regions weight in the mean.
    pro_weight = np.where(regions > 0, 1.0 / (n_regions * sizes[regions]), 0.0)
    # Grouping by unique score makes tied pixels cross a threshold together.
    unique, group = np.unique(scores, return_inverse=True)
    fp_per_score = np.bincount(group, weights=regions == 0, minlength=unique.size)
    pro_per_score = np.bincount(group, weights=pro_weight, minlength=unique.size)
    # Lowering the threshold from above the maximum score walks the curve from (0, 0) to (1, 1).
    fpr = np.concatenate(([0.0], np.cumsum(fp_per_score[::-1]) / n_normal))
    pro = np.concatenate(([0.0], np.minimum(np.cumsum(pro_per_score[::-1]), 1.0)))
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _area_up_to(x: NDArray[np.float64], y: NDArray[np.float64], limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit]; x is nondecreasing from 0 to 1."""
    k = int(np.searchsorted(x, limit, side="right"))  # x[:k] <= limit < x[k:]
    xs, ys = x[:k], y[:k]
    if xs[-1] < limit:  # the curve crosses the limit between points k-1 and k
        y_limit = y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1])
        xs, ys = np.append(xs, limit), np.append(ys, y_limit)
    return float(trapezoid(ys, xs))


def _labels_and_scores(
    labels: ArrayLike, scores: ArrayLike
) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    """Validate 1-D binary labels and finite scores of equal length holding both classes."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.size != s.size:
        raise ValueError(f"got {y.size} labels but {s.size} scores; give one score per label")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite; found NaN or infinity")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("need both normal and anomalous samples, but only one class is present")
    return y, s


def _flat_pixels(
    masks: Sequence[ArrayLike], maps: Sequence[ArrayLike]
) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    """Validate pairwise-equal 2-D shapes; return all pixels as defect flags and finite scores."""
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} maps; give one map per mask")
    if len(masks) == 0:
        raise ValueError("got no masks and maps")
    flat_masks, flat_maps = [], []
    for i, (mask, amap) in enumerate(zip(masks, maps)):
        m, a = np.asarray(mask), np.asarray(amap, dtype=np.float64)
        if m.ndim != 2 or m.shape != a.shape:
            raise ValueError(f"mask {i} is {m.shape} but map {i} is {a.shape}; both must have the same 2-D shape")
        flat_masks.append(m.ravel() != 0)
        flat_maps.append(a.ravel())
    scores = np.concatenate(flat_maps)
    if not np.isfinite(scores).all():
        raise ValueError("maps must be finite; found NaN or infinity")
    return np.concatenate(flat_masks), scores


def border_peak_share(maps: Sequence[ArrayLike], border: int = 16) -> float:
    """The share of maps whose maximum lies within ``border`` pixels of the image edge.

    Measured on good images, this is how often a model "lights up at the border" where nothing is wrong.
    """
    if not maps:
        raise ValueError("no maps given")
    hits = 0
    for m in maps:
        a = np.asarray(m)
        y, x = np.unravel_index(int(np.argmax(a)), a.shape)
        hits += min(y, x, a.shape[0] - 1 - y, a.shape[1] - 1 - x) < border
    return hits / len(maps)
