"""The files `patchcore predict` writes for one image, in one place, so that a single process and a pool of Ray
workers write byte-identical results."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .core.files import atomic_write
from .core.prediction import Prediction
from .inference import Thresholds, result_of

RESULT_DIRS = ("maps", "overlays", "masks")
MAP_FORMATS = ("both", "npy", "png")


def write_result(output: Path, path: str | os.PathLike, stem: str, pred: Prediction, image: np.ndarray,
                 thresholds: Thresholds, map_format: str = "both") -> dict[str, Any]:
    """Write the map(s), overlay and mask of one prediction under ``output`` and return its summary row.

    Each file is written next to its place and renamed into it (:func:`patchcore.core.files.atomic_write`): a
    worker killed mid-write leaves no half file behind."""
    from .visualize import save_map_png, save_png

    res = result_of(pred, image, thresholds)  # what `patchcore serve` answers, too
    amap, mask = pred.anomaly_map, res.mask
    row: dict[str, Any] = {"name": stem, "path": str(path), **res.summary()}
    if map_format in ("npy", "both"):
        atomic_write(output / "maps" / f"{stem}.npy", lambda p: np.save(p, amap))
        row["map_npy"] = f"maps/{stem}.npy"
    if map_format in ("png", "both"):
        atomic_write(output / "maps" / f"{stem}.png", lambda p: save_map_png(p, amap, thresholds.pixel))
        row["map_png"] = f"maps/{stem}.png"
    atomic_write(output / "overlays" / f"{stem}.png", lambda p: save_png(p, res.overlay()))
    atomic_write(output / "masks" / f"{stem}.png", lambda p: save_png(p, mask))
    row["overlay"], row["mask"] = f"overlays/{stem}.png", f"masks/{stem}.png"
    return row
