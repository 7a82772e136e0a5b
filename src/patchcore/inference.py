"""One image in, what people and programs are shown: the per-image work of ``patchcore predict`` and the service.

Both shells call these functions and nothing else for an image: loading a model file with errors people can
act on, checking image headers before work, the thresholds in force (the model's calibrated ones, or an
override), and what a :class:`~patchcore.Prediction` becomes: the summary row, the heat-map overlay, the
defect mask, its outline as polygons, and the map as a viewer needs it to look at other thresholds.

Nothing here imports torch at module level, so a shell that only formats results stays light.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .core.prediction import Prediction
from .errors import ModelFileError, PatchCoreError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .model import PatchCore

__all__ = ["load_model", "check_headers", "describe_threshold", "Thresholds", "thresholds_in_force",
           "ImageResult", "result_of", "defect_polygons", "percent", "THRESHOLD_OVERRIDDEN"]


# ------------------------------------------------------------------------------------------------ models
def load_model(path: str | os.PathLike, device: str = "cpu") -> PatchCore:
    """PatchCore.load, after the mistakes we can name better (a folder given where the model file goes)."""
    from .model import PatchCore

    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file (.safetensors written by patchcore fit)")
    return PatchCore.load(path, device=device)


def check_headers(files: Iterable[str | os.PathLike]) -> None:
    """Read every file's header before long work, so most bad images stop a run before anything is done.

    Raises the first file's ImageError; damage past a header only shows when the image is decoded.
    """
    from .core.imagefiles import check_image_file

    for f in files:
        check_image_file(f)


# -------------------------------------------------------------------------------------------- thresholds
THRESHOLD_OVERRIDDEN = "set with --threshold"


def percent(rate: float) -> str:
    """A rate for people: 0.01 -> '1%'."""
    return f"{100 * rate:.3g}%"


def describe_threshold(calibration: dict[str, Any], overridden: bool, override_name: str = "--threshold") -> str:
    """Where the image threshold comes from, as a short phrase for people (tables, summaries, reports)."""
    if overridden:
        return f"set with {override_name}"
    if not calibration:
        return "not calibrated"
    n = calibration.get("n")
    on = f" on {n} good images" if n else ""
    if calibration.get("threshold_from") == "f1":
        f1, n_defect = calibration.get("f1"), calibration.get("n_defect")
        return (f"best F1{f' ({f1:.3f})' if f1 is not None else ''} on {n or 'the'} good and "
                f"{n_defect or 'the'} defective images")
    far = calibration.get("target_far")
    if far is None:
        return f"calibrated{on}"
    if calibration.get("resolved") is False and calibration.get("guaranteed_far") is not None:
        # too few good images for the rate asked: say the rate they can guarantee, not the one asked for
        needed = calibration.get("needed_n")
        return (f"calibrated{on}, which guarantee at most a {percent(calibration['guaranteed_far'])} false-alarm "
                f"rate (the {percent(far)} asked for needs {needed or 'more'} good images)")
    return f"calibrated for a {percent(far)} false-alarm rate{on}"


@dataclass(frozen=True)
class Thresholds:
    """The thresholds a verdict is made at: the image score's, the map's (masks), and where they come from."""

    image: float
    pixel: float
    source: str
    overridden: bool = False


def thresholds_in_force(model: Any, override: float | None = None, override_name: str = "--threshold",
                        model_name: str = "the model") -> Thresholds:
    """The model's calibrated thresholds, or ``override`` for the image score with the pixel threshold scaled
    in proportion (so masks follow the verdict). ``override_name`` is how the caller's users set it (a CLI
    flag, a query parameter), for the messages."""
    cal = dict(model.calibration_ or {})
    if override is not None:
        if not override > 0:
            raise PatchCoreError(f"{override_name} must be positive, got {override}")
        thr = float(override)
        ratio = cal.get("pixel_threshold", thr) / model.threshold_ if model.threshold_ else 1.0
        return Thresholds(thr, thr * ratio, describe_threshold(cal, True, override_name), True)
    if model.threshold_ is None:
        raise PatchCoreError(f"{model_name} has no calibrated threshold; refit it with `patchcore fit` or pass "
                             f"{override_name}")
    thr = float(model.threshold_)
    return Thresholds(thr, float(cal.get("pixel_threshold", thr)), describe_threshold(cal, False))


# ---------------------------------------------------------------------------------------------- results
def defect_polygons(mask: np.ndarray, tolerance: float = 1.0) -> list[list[list[float]]]:
    """The outlines of a boolean mask's regions as polygons of [x, y] pixel coordinates (closed: the last point
    repeats the first), simplified to within ``tolerance`` pixels; holes come out as polygons of their own."""
    from skimage.measure import approximate_polygon, find_contours

    m = np.asarray(mask, bool)
    if not m.any():
        return []
    # Padding closes the contours of regions that touch the image border.
    contours = find_contours(np.pad(m, 1).astype(np.float32), 0.5)
    out = []
    for c in contours:
        c = approximate_polygon(c - 1.0, tolerance) if tolerance > 0 else c - 1.0
        out.append([[round(float(x), 2), round(float(y), 2)] for y, x in c])
    return out


@dataclass
class ImageResult:
    """A prediction at the thresholds in force, with the image its map belongs to."""

    prediction: Prediction
    image: np.ndarray  # H x W x 3 uint8, the pixels that were scored
    thresholds: Thresholds

    @cached_property
    def mask(self) -> np.ndarray:
        """The defect mask (agrees with the verdict: empty when good, never empty when anomalous)."""
        return self.prediction.defect_mask

    def summary(self) -> dict[str, Any]:
        """The numbers one image gets in every output: a CLI summary row, an HTTP response."""
        p = self.prediction
        return {"score": float(p.score), "normalized_score": p.normalized_score, "is_anomalous": p.is_anomalous,
                "verdict": "anomalous" if p.is_anomalous else "good", "threshold": self.thresholds.image,
                "pixel_threshold": self.thresholds.pixel, "width": int(self.image.shape[1]),
                "height": int(self.image.shape[0]), "defect_area_fraction": float(self.mask.mean())}

    def overlay(self, outline: bool = True) -> np.ndarray:
        """The heat map blended on the image (scaled so the pixel threshold is mid-scale), defect mask outlined."""
        from .visualize import overlay

        return overlay(self.image, self.prediction.anomaly_map, self.thresholds.pixel, mask=self.mask,
                       outline=outline)

    def polygons(self, tolerance: float = 1.0) -> list[list[list[float]]]:
        return defect_polygons(self.mask, tolerance)

    def map_view(self) -> dict[str, Any]:
        """The map for a viewer that shows other thresholds than the model's, without scoring again.

        ``png``: 8-bit grey, ``value = png / 255 * scale`` (``scale`` covers the map's maximum). At an image
        threshold ``t`` the verdict is ``score >= t`` and the defect mask is ``value >= min(t * pixel_ratio,
        peak_level)`` for an anomalous verdict (empty for a good one): the rule of ``Prediction.defect_mask``,
        with ``peak_level`` the floor that keeps the region around the map's peak in every anomalous mask.
        """
        from .visualize import png_bytes

        p = self.prediction
        amap = np.asarray(p.anomaly_map, np.float32)
        scale = max(float(amap.max()), 2.0 * self.thresholds.pixel, 1e-12)
        grey = (np.clip(amap / scale, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        # The peak floor is the mask level of an anomalous verdict that has no pixel threshold of its own.
        peak = Prediction(p.name, p.score, amap, threshold=float(p.score), pixel_threshold=None).mask_level
        return {"png": png_bytes(grey), "scale": scale, "peak_level": float(peak),
                "pixel_ratio": self.thresholds.pixel / self.thresholds.image}


def result_of(prediction: Prediction, image: np.ndarray, thresholds: Thresholds) -> ImageResult:
    """Put a prediction at the thresholds in force (its verdict and mask follow them)."""
    prediction.threshold, prediction.pixel_threshold = thresholds.image, thresholds.pixel
    return ImageResult(prediction, image, thresholds)
