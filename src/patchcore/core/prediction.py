"""What scoring one image gives: the score, the map, the verdict and the defect mask (numpy only).

Shared by the PyTorch estimator and the torch-free runtime, so both answer with the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Prediction:
    """The result for one image."""

    name: str
    score: float
    anomaly_map: np.ndarray  # float32, H x W at the input image's own resolution
    threshold: float | None = None
    pixel_threshold: float | None = None  # the map level calibrated with the threshold (see defect_mask)

    @property
    def is_anomalous(self) -> bool | None:
        """True when the score reaches the model's threshold; None when the model has no threshold."""
        return None if self.threshold is None else bool(self.score >= self.threshold)

    @property
    def normalized_score(self) -> float | None:
        """score / threshold: the threshold sits at 1.0 whatever the product; None without a threshold."""
        return None if not self.threshold else float(self.score) / float(self.threshold)

    @property
    def mask_level(self) -> float:
        """The map value from which pixels are defect pixels (infinite for a good verdict)."""
        return mask_level(self.anomaly_map, self.score, self.threshold, self.pixel_threshold)

    @property
    def defect_mask(self) -> np.ndarray:
        """Boolean H x W: where the defect is. Empty for a good verdict; for an anomalous one it always holds
        at least the region around the map's peak, so the verdict can be seen in it."""
        return self.anomaly_map >= self.mask_level


def mask_level(amap: np.ndarray, score: float, threshold: float | None, pixel_threshold: float | None,
               peak_share: float = 0.25) -> float:
    """The map value from which pixels belong to the defect mask, so that masks agree with verdicts.

    A good verdict (``score < threshold``) masks nothing. An anomalous one masks every pixel at or above the
    pixel threshold, and always at least the region around the map's peak (the pixels within
    ``peak_share`` of the peak's height above the map's median), so the mask shows where the score came
    from even when the map's peak stays under the pixel threshold. Without a threshold, the pixel
    threshold alone decides (and without that, nothing is masked).
    """
    a = np.asarray(amap)
    if threshold is None:
        return float(pixel_threshold) if pixel_threshold is not None else float("inf")
    if score < threshold:
        return float("inf")
    peak = float(a.max())
    around_peak = peak - peak_share * (peak - float(np.median(a)))
    return around_peak if pixel_threshold is None else min(float(pixel_threshold), around_peak)
