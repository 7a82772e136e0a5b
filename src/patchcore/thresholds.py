"""Turning PatchCore scores into decisions: a threshold with a stated false-alarm rate, and normalised scores.

PatchCore scores have no natural scale (they are feature distances, and differ per product), so a bare
score is not a decision. The threshold is calibrated on good images **the memory bank was not built
from** (a model scores its own training images too low): by default the cross-fitted scores that
:meth:`PatchCore.fit` computes for every good image with a bank built without it, or the scores of a
separate folder of good images (:func:`calibrate`, ``PatchCore.calibrate``). The target is a false-alarm
rate (FAR, the fraction of good images called anomalous):

``method="conformal"`` (default)
    Split-conformal rank: with ``n`` calibration scores and target FAR ``a``, the threshold is just above
    the ``k = ceil((n + 1)(1 - a))``-th smallest score. For a new good image exchangeable with the
    calibration images (same product, camera and conditions), the chance that it reaches the threshold is
    then at most ``a`` (and at least ``a - 1 / (n + 1)``): a guarantee, not an estimate. When ``k > n``
    (fewer than ``1 / a - 1`` images), no rank guarantees ``a``; the threshold then sits just above the
    largest score, which guarantees ``1 / (n + 1)``, and the calibration says so (``resolved: false``) and
    how many images the target needs.
``method="gaussian"``
    Fit a normal distribution to the good scores and take its ``1 - a`` quantile, never below the largest
    calibration score. This extrapolates the tail: an estimate, no guarantee.

Exchangeability is the whole assumption. Good images taken apart from the training images can score
higher than the cross-fitted training images (MVTec bottle's test images do, slightly; screw's do not:
docs/benchmarks.md, section 7): calibrate on good images from the production camera, taken as the line
runs, to have the guarantee hold there.

An image is anomalous when ``score >= threshold``. The normalised score is ``score / threshold``: the
threshold sits at 1.0 for every product, 2.0 means twice the threshold.

The anomaly map's pixel threshold (for the defect mask) is calibrated by the same rule on the per-image
*maxima* of the calibration maps, so a good image shows a masked pixel at most at the target rate.
:func:`patchcore.core.prediction.mask_level` makes masks agree with verdicts: a good verdict has an empty
mask, and an anomalous one always shows at least the region around its map's peak.

Where labelled defect images are available, :func:`f1_threshold` gives the threshold with the best F1
over good + defect scores; it is stored beside the FAR threshold and can be chosen instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.stats import norm

from .errors import PatchCoreError

__all__ = ["Calibration", "METHODS", "calibrate", "calibrate_scores", "f1_threshold", "suspects", "threshold_for_far"]

METHODS = ("conformal", "gaussian")
_ALIASES = {"quantile": "conformal"}  # the name of the default rule before it became split-conformal
QUANTILES = (0.5, 0.9, 0.95, 0.99)
_ABOVE_MAX = 1.0 + 1e-6


@dataclass
class Calibration:
    """How the threshold was obtained, with the statistics of the good calibration scores."""

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
    calibration_far: float
    scores: list[float] = field(default_factory=list)
    map_maxima: list[float] = field(default_factory=list)
    source: str = "calibration images"
    threshold_from: str = "far"
    far_threshold: float | None = None
    guaranteed_far: float | None = None
    needed_n: int = 0
    statement: str = ""
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


def needed_images(target_far: float) -> int:
    """The fewest calibration images for which the conformal rank can guarantee ``target_far``."""
    return max(1, math.ceil(1.0 / target_far - 1.0 - 1e-9))


def threshold_for_far(scores: Sequence[float], target_far: float, method: str = "conformal"
                      ) -> tuple[float, str, bool]:
    """(threshold, rule, resolved) for good-image ``scores`` and a target false-alarm rate; see module doc."""
    method = _ALIASES.get(method, method)
    s = np.sort(np.asarray(scores, dtype=np.float64))  # ascending
    n = s.size
    if n < 2:
        raise PatchCoreError(f"calibration needs at least 2 good images, got {n}")
    if not np.isfinite(s).all():
        raise PatchCoreError("calibration scores must be finite")
    if not 0.0 < target_far < 1.0:
        raise PatchCoreError(f"the target false-alarm rate must be in (0, 1), got {target_far}")
    if method not in METHODS:
        raise PatchCoreError(f"unknown threshold method {method!r}; known: {', '.join(METHODS)}")
    if method == "conformal":
        k = math.ceil((n + 1) * (1.0 - target_far) - 1e-9)
        # Just above the k-th smallest score, so "score >= threshold" means "above it": ties never alarm.
        if k <= n:
            return float(np.nextafter(s[k - 1], np.inf)), f"conformal rank {k} of {n}", True
        return float(np.nextafter(s[-1], np.inf)), f"above all {n} (too few for the target)", False
    mean, std = float(s.mean()), float(s.std(ddof=1))
    t = max(mean + float(norm.ppf(1.0 - target_far)) * std, float(s[-1]) * _ABOVE_MAX)
    return t, "normal fit", False


def guarantee(n: int, target_far: float, method: str, resolved: bool) -> tuple[float | None, str]:
    """(guaranteed false-alarm rate or None, one plain sentence) for a calibration of ``n`` good images."""
    method = _ALIASES.get(method, method)
    need = needed_images(target_far)
    if method != "conformal":
        return None, (f"The threshold extrapolates a normal fit of {n} good scores to a {target_far:.2%} "
                      f"false-alarm rate: an estimate, with no guarantee.")
    if resolved:
        return target_far, (f"At most {target_far:.2%} of good parts like the {n} calibration images will be "
                            f"rejected (split-conformal guarantee for exchangeable images).")
    return 1.0 / (n + 1), (f"{n} good calibration images can guarantee a false-alarm rate of at most "
                           f"{1.0 / (n + 1):.2%}, not the {target_far:.2%} asked for, which needs at least "
                           f"{need} good images.")


# Tukey's "far out" fence: a cross-fitted score above Q3 + 3 IQR of the others. On clean training sets it lists
# 1-2 of 209 bottle and 1 of 255 screw images (docs/benchmarks.md, section 17), few enough to look at.
SUSPECT_FENCE = 3.0
SUSPECT_MIN_IMAGES = 8


def suspect_fence(scores: Sequence[float], fence: float = SUSPECT_FENCE) -> float:
    """The score above which a calibration image is a suspect: Q3 + ``fence`` x IQR of ``scores``."""
    q1, q3 = np.percentile(np.asarray(scores, dtype=np.float64), [25, 75])
    return float(q3 + fence * (q3 - q1))


def suspects(scores: Sequence[float], fence: float = SUSPECT_FENCE) -> list[int]:
    """Positions of the calibration scores far above the others (above Q3 + ``fence`` x IQR), highest first.

    Cross-fitted scores come from banks built without the scored image, so a defective part hidden among the
    good images scores as a defect would, while the good ones score as new good parts do: the audit of a
    training set. Needs at least SUSPECT_MIN_IMAGES scores (none listed below that)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size < SUSPECT_MIN_IMAGES:
        return []
    out = np.flatnonzero(s > suspect_fence(s, fence))
    return [int(i) for i in out[np.argsort(-s[out], kind="stable")]]


def f1_threshold(scores: Sequence[float], labels: Sequence[int]) -> tuple[float, float]:
    """(threshold, F1) with the best F1 over good (0) and defective (1) scores; anomalous when score >= it."""
    from .metrics import f1_max

    try:
        f1, t = f1_max(list(labels), list(scores))
    except ValueError as e:
        raise PatchCoreError(f"F1 threshold: {e}") from None
    return float(t), float(f1)


def calibrate_scores(scores: Sequence[float], target_far: float = 0.01, method: str = "conformal",
                     map_maxima: Sequence[float] | None = None, defect_scores: Sequence[float] | None = None,
                     threshold_from: str = "far", source: str = "calibration images",
                     floor: float | None = None) -> Calibration:
    """A :class:`Calibration` from already computed good calibration scores (and optional defect scores).

    ``floor``: the threshold is never below it (a fit that left training images out as defective passes the
    score above which it did: were they good parts after all, new parts like them are not called defective
    more often than the training images were)."""
    method = _ALIASES.get(method, method)
    s = np.asarray(scores, dtype=np.float64)
    t, rule, resolved = threshold_for_far(s, target_far, method)
    if floor is not None and t < floor:
        t, rule = float(floor), f"{rule}, raised to the score above which training images were left out"
    guaranteed, statement = guarantee(int(s.size), target_far, method, resolved)
    mm = np.asarray(map_maxima if map_maxima is not None else s, dtype=np.float64)
    pt, _, _ = threshold_for_far(mm, target_far, method)
    cal = Calibration(
        threshold=t, pixel_threshold=pt, method=method, rule=rule, resolved=resolved, target_far=float(target_far),
        n=int(s.size), mean=float(s.mean()), std=float(s.std(ddof=1)), min=float(s.min()), max=float(s.max()),
        quantiles={f"{q:g}": float(np.quantile(s, q)) for q in QUANTILES},
        calibration_far=float((s >= t).mean()), scores=[float(v) for v in s], map_maxima=[float(v) for v in mm],
        source=source, threshold_from="far", far_threshold=t, guaranteed_far=guaranteed,
        needed_n=needed_images(target_far), statement=statement)
    if threshold_from not in ("far", "f1"):
        raise PatchCoreError(f"threshold_from must be 'far' or 'f1', got {threshold_from!r}")
    if floor is not None:
        cal.extra["floor"] = float(floor)
    if defect_scores is not None and len(defect_scores) > 0:
        d = [float(v) for v in defect_scores]
        ft, f1 = f1_threshold(list(s) + d, [0] * s.size + [1] * len(d))
        cal.f1_threshold, cal.f1, cal.n_defect, cal.defect_scores = ft, f1, len(d), d
        if threshold_from == "f1":
            # Move the pixel threshold with the image threshold, keeping their calibrated ratio.
            cal.pixel_threshold = pt * ft / t
            cal.threshold, cal.threshold_from = ft, "f1"
            cal.calibration_far = float((s >= ft).mean())
            cal.guaranteed_far, cal.statement = None, (
                f"The threshold maximises F1 on {s.size} good and {len(d)} defective images; its false-alarm "
                f"rate on those good images is {cal.calibration_far:.2%} (not a guarantee).")
    elif threshold_from == "f1":
        raise PatchCoreError("the F1 threshold needs labelled defect images")
    return cal


def calibrate(model, good_images, target_far: float = 0.01, method: str = "conformal", defect_images=None,
              threshold_from: str = "far", source: str = "calibration images", skip_unreadable: bool = False,
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
