"""Turning PatchCore scores into decisions: a threshold calibrated on good images, and normalised scores.

PatchCore scores have no natural scale (they are feature distances, and differ per product), so a bare
score is not a decision. The threshold is calibrated on **held-out good images only** (images the
memory bank was *not* built from: a model scores its own training images too low), for a target
false-alarm rate (FAR, the fraction of good images called anomalous):

``method="quantile"`` (default)
    With ``n`` held-out good scores and target FAR ``a``, the FAR can be resolved when ``n * a >= 1``.
    Then the threshold is placed half-way between the ``k``-th and ``(k+1)``-th largest good score,
    ``k = floor(n * a)``: exactly ``k`` held-out good images (a fraction ``k / n <= a``) reach it.
    When ``n * a < 1`` (e.g. 20 images for 1 %), no empirical quantile exists; the rule then falls back
    to the ``"gaussian"`` rule below and says so (``rule: "normal fit (n too small for the quantile)"``,
    ``resolved: false``).
``method="gaussian"``
    Fit a normal distribution to the good scores and take its ``1 - a`` quantile,
    ``mean + z(1 - a) * std``, but never below the largest held-out good score (times 1 + 1e-6), so no
    held-out good image is a false alarm. This extrapolates the tail; it is an estimate, not a guarantee.

An image is anomalous when ``score >= threshold``. The normalised score is ``score / threshold``: the
threshold sits at 1.0 for every product, 2.0 means twice the threshold.

The anomaly map's pixel threshold (for the binary defect mask) is calibrated by the same rule on the
per-image *maxima* of the held-out good maps, so a good image shows any masked pixel at most at the
target rate. (The image score is a reweighted patch distance, the map a smoothed one; both are in the
same units but not identical, hence a separate value.)

Where labelled defect images are available, :func:`f1_threshold` gives the threshold with the best F1
over held-out good + defect scores; it is stored beside the FAR threshold and can be chosen instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.stats import norm

from .errors import PatchCoreError

__all__ = ["Calibration", "METHODS", "calibrate", "calibrate_scores", "f1_threshold", "threshold_for_far",
           "normalized"]

METHODS = ("quantile", "gaussian")
QUANTILES = (0.5, 0.9, 0.95, 0.99)
_ABOVE_MAX = 1.0 + 1e-6


@dataclass
class Calibration:
    """How the threshold was obtained, with the statistics of the held-out good scores."""

    threshold: float
    pixel_threshold: float
    method: str
    rule: str
    resolved: bool
    target_far: float
    n: int
    mean: float
    std: float
    min: float
    max: float
    quantiles: dict[str, float]
    holdout_far: float
    scores: list[float] = field(default_factory=list)
    map_maxima: list[float] = field(default_factory=list)
    source: str = "holdout"
    threshold_from: str = "far"
    far_threshold: float | None = None
    f1_threshold: float | None = None
    f1: float | None = None
    n_defect: int = 0
    defect_scores: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d

    def apply(self, model) -> None:
        """Store this calibration in ``model.threshold_`` and ``model.calibration_`` (saved with the model)."""
        model.threshold_ = float(self.threshold)
        model.calibration_ = self.to_dict()


def threshold_for_far(scores: Sequence[float], target_far: float, method: str = "quantile"
                      ) -> tuple[float, str, bool]:
    """(threshold, rule, resolved) for good-image ``scores`` and a target false-alarm rate; see module doc."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]  # descending
    n = s.size
    if n < 2:
        raise PatchCoreError(f"calibration needs at least 2 held-out good images, got {n}")
    if not np.isfinite(s).all():
        raise PatchCoreError("calibration scores must be finite")
    if not 0.0 < target_far < 1.0:
        raise PatchCoreError(f"the target false-alarm rate must be in (0, 1), got {target_far}")
    if method not in METHODS:
        raise PatchCoreError(f"unknown threshold method {method!r}; known: {', '.join(METHODS)}")
    k = int(math.floor(n * target_far + 1e-9))
    if method == "quantile" and k >= 1:
        if k >= n:
            return float(s[-1]), "empirical quantile", True
        return float((s[k - 1] + s[k]) / 2.0), "empirical quantile", True
    mean, std = float(s.mean()), float(s.std(ddof=1))
    t = max(mean + float(norm.ppf(1.0 - target_far)) * std, float(s[0]) * _ABOVE_MAX)
    if method == "gaussian":
        return t, "normal fit", k >= 1
    return t, "normal fit (n too small for the quantile)", False


def f1_threshold(scores: Sequence[float], labels: Sequence[int]) -> tuple[float, float]:
    """(threshold, F1) with the best F1 over good (0) and defective (1) scores; anomalous when score >= it."""
    from .metrics import f1_max

    try:
        f1, t = f1_max(list(labels), list(scores))
    except ValueError as e:
        raise PatchCoreError(f"F1 threshold: {e}") from None
    return float(t), float(f1)


def calibrate_scores(scores: Sequence[float], target_far: float = 0.01, method: str = "quantile",
                     map_maxima: Sequence[float] | None = None, defect_scores: Sequence[float] | None = None,
                     threshold_from: str = "far", source: str = "holdout") -> Calibration:
    """A :class:`Calibration` from already computed held-out good scores (and optional defect scores)."""
    s = np.asarray(scores, dtype=np.float64)
    t, rule, resolved = threshold_for_far(s, target_far, method)
    mm = np.asarray(map_maxima if map_maxima is not None else s, dtype=np.float64)
    pt, _, _ = threshold_for_far(mm, target_far, method)
    cal = Calibration(
        threshold=t, pixel_threshold=pt, method=method, rule=rule, resolved=resolved, target_far=float(target_far),
        n=int(s.size), mean=float(s.mean()), std=float(s.std(ddof=1)), min=float(s.min()), max=float(s.max()),
        quantiles={f"{q:g}": float(np.quantile(s, q)) for q in QUANTILES},
        holdout_far=float((s >= t).mean()), scores=[float(v) for v in s], map_maxima=[float(v) for v in mm],
        source=source, threshold_from="far", far_threshold=t)
    if threshold_from not in ("far", "f1"):
        raise PatchCoreError(f"threshold_from must be 'far' or 'f1', got {threshold_from!r}")
    if defect_scores is not None and len(defect_scores) > 0:
        d = [float(v) for v in defect_scores]
        ft, f1 = f1_threshold(list(s) + d, [0] * s.size + [1] * len(d))
        cal.f1_threshold, cal.f1, cal.n_defect, cal.defect_scores = ft, f1, len(d), d
        if threshold_from == "f1":
            # Move the pixel threshold with the image threshold, keeping their calibrated ratio.
            cal.pixel_threshold = pt * ft / t
            cal.threshold, cal.threshold_from = ft, "f1"
            cal.holdout_far = float((s >= ft).mean())
    elif threshold_from == "f1":
        raise PatchCoreError("the F1 threshold needs labelled defect images")
    return cal


def calibrate(model, good_images, target_far: float = 0.01, method: str = "quantile", defect_images=None,
              threshold_from: str = "far", source: str = "holdout", skip_unreadable: bool = False,
              progress=None) -> Calibration:
    """Score held-out good images (never the ones ``model`` was fitted on) and set the model's threshold.

    ``defect_images`` (optional) are labelled defective images; with them the F1-optimal threshold is
    computed too, and ``threshold_from="f1"`` makes it the model's threshold. Stores the result in
    ``model.threshold_`` / ``model.calibration_`` and returns it. Skipped unreadable images (with
    ``skip_unreadable``) are listed in ``calibration.extra["skipped"]``.
    """
    skipped: list[tuple[str, str]] = []
    good = model.predict(good_images, skip_unreadable=skip_unreadable, progress=progress)
    skipped += list(getattr(model, "skipped_", []))
    defects = None
    if defect_images is not None:
        defects = model.predict(defect_images, skip_unreadable=skip_unreadable,
                                progress=(lambda stage, d, t: progress("defects", d, t)) if progress else None)
        skipped += list(getattr(model, "skipped_", []))
    cal = calibrate_scores([p.score for p in good], target_far, method,
                           map_maxima=[float(p.anomaly_map.max()) for p in good],
                           defect_scores=None if defects is None else [p.score for p in defects],
                           threshold_from=threshold_from, source=source)
    if skipped:
        cal.extra["skipped"] = [[n, r] for n, r in skipped]
    cal.apply(model)
    model.skipped_ = skipped
    return cal


def normalized(score: float, threshold: float | None) -> float | None:
    """``score / threshold`` (the threshold sits at 1.0); None without a threshold."""
    if threshold is None or threshold <= 0:
        return None
    return float(score) / float(threshold)
