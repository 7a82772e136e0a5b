"""MVTec-style evaluation: fit on each category's good training images, score its test set, report the metrics.

``evaluate(path)`` takes one category folder (MVTec AD or plain folder layout) or a root holding several
MVTec categories as subfolders, and returns an :class:`EvaluationReport`: one :class:`CategoryResult` per
category (image AUROC, pixel AUROC, AUPRO, F1-max, fit seconds, ms per image), a mean row, every setting
of the model used, the seed, library versions and the machine. ``to_json`` / ``to_csv`` write it.

Protocol, stated once so the numbers can be trusted and compared:

* Image metrics use every test image. Image AUROC and F1-max are None when the test set has one class only.
* Pixel metrics (pixel AUROC, AUPRO, pixel F1-max) are computed exactly (no subsampling) over the anomaly
  maps at each image's own resolution, against the ground-truth masks read at that resolution. Good images
  without a mask count as all-normal. Defect images without a mask (possible in the folder layout) are left
  out of the pixel metrics, which then use the images that have masks plus all good images; with no masked
  defect image at all the pixel metrics are None. ``n_pixel_images`` says how many images they used.
* With a centre-crop preprocessing (``preset="paper"``: resize 256, crop 224) the network never sees the
  border, so the pixel metrics are restricted to the crop region of every mask and map, as in the paper's
  protocol (``pixel_region: "centre crop"``). Without a crop the whole image is scored (``"whole image"``).
* ms per image is the wall time of ``PatchCore.predict`` over the whole test set (reading the images
  included) divided by the number of test images; fit seconds is ``fit_info_["fit_seconds"]`` (feature
  extraction + coreset + cross-fitted calibration; reading the images included).
* ``good FAR`` is the share of the test set's good images at or above the threshold the fit calibrated
  (cross-fitted on the training images, for the model's ``target_far``): the false-alarm rate on good parts
  the fit never saw. ``defect_recall`` is the share of defective images at or above it. ``border peaks``
  is the share of good test images whose map peaks within 16 px of the image edge.
* A fixed seed gives identical scores and maps (the seed is the model's ``seed`` parameter).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .core.files import atomic_write_text
from .core.geometry import Preprocessing
from .datasets import Dataset, load_mask, read_dataset, read_mvtec
from .errors import DatasetError, PatchCoreError
from .metrics import aupro, border_peak_share, f1_max, image_auroc, pixel_auroc, pixel_f1_max
from .model import PatchCore

__all__ = ["CategoryResult", "EvaluationReport", "COLUMNS", "compute_metrics", "crop_to_region",
           "evaluate", "evaluate_dataset", "evaluate_model", "find_categories"]

Progress = Callable[[str, int, int], None]

#: (key in metrics_row, column header, format) of the printed / CSV table.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("category", "category", "{}"),
    ("image_auroc", "image AUROC", "{:.4f}"),
    ("pixel_auroc", "pixel AUROC", "{:.4f}"),
    ("aupro", "AUPRO", "{:.4f}"),
    ("f1_max", "F1-max", "{:.4f}"),
    ("pixel_f1_max", "pixel F1-max", "{:.4f}"),
    ("good_far", "good FAR", "{:.3f}"),
    ("border_peak", "border peaks", "{:.2f}"),
    ("fit_s", "fit s", "{:.1f}"),
    ("ms_per_image", "ms/image", "{:.1f}"),
)
_METRIC_KEYS = [k for k, _, _ in COLUMNS if k != "category"]
_CSV_KEYS = ["category", "n_train", "n_test", "n_defect", "image_auroc", "pixel_auroc", "aupro", "f1_max",
             "f1_threshold", "pixel_f1_max", "threshold", "good_far", "defect_recall", "border_peak", "fit_s",
             "extract_s", "coreset_s", "calibration_s", "ms_per_image", "pixel_region", "n_pixel_images"]

WHOLE_IMAGE = "whole image"
CENTRE_CROP = "centre crop"


@dataclass
class CategoryResult:
    """The evaluation of one category: metrics, timings and the per-image scores (and maps, in memory)."""

    name: str
    n_train: int
    n_test: int
    n_defect: int
    image_auroc: float | None
    pixel_auroc: float | None
    aupro: float | None
    image_f1_max: float | None
    image_f1_threshold: float | None
    pixel_f1_max: float | None
    fit_seconds: float
    extract_seconds: float
    coreset_seconds: float
    ms_per_image: float
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    maps: list[np.ndarray] | None = field(default=None, repr=False)
    pixel_region: str = WHOLE_IMAGE
    n_pixel_images: int = 0
    threshold: float | None = None
    good_far: float | None = None
    defect_recall: float | None = None
    border_peak: float | None = None
    calibration_seconds: float = 0.0

    def metrics_row(self) -> dict[str, Any]:
        """The table columns (see :data:`COLUMNS`): category, metrics, fit s, ms/image."""
        return {"category": self.name, "image_auroc": self.image_auroc, "pixel_auroc": self.pixel_auroc,
                "aupro": self.aupro, "f1_max": self.image_f1_max, "pixel_f1_max": self.pixel_f1_max,
                "good_far": self.good_far, "border_peak": self.border_peak, "fit_s": self.fit_seconds,
                "ms_per_image": self.ms_per_image}

    def csv_row(self) -> dict[str, Any]:
        return {**self.metrics_row(), "n_train": self.n_train, "n_test": self.n_test, "n_defect": self.n_defect,
                "f1_threshold": self.image_f1_threshold, "extract_s": self.extract_seconds,
                "coreset_s": self.coreset_seconds, "calibration_s": self.calibration_seconds,
                "threshold": self.threshold, "defect_recall": self.defect_recall, "pixel_region": self.pixel_region,
                "n_pixel_images": self.n_pixel_images}

    def to_dict(self) -> dict[str, Any]:
        """Everything except the maps, JSON-ready."""
        return {
            "category": self.name, "n_train": self.n_train, "n_test": self.n_test, "n_defect": self.n_defect,
            "image_auroc": self.image_auroc, "pixel_auroc": self.pixel_auroc, "aupro": self.aupro,
            "f1_max": self.image_f1_max, "f1_threshold": self.image_f1_threshold,
            "pixel_f1_max": self.pixel_f1_max, "pixel_region": self.pixel_region,
            "n_pixel_images": self.n_pixel_images, "threshold": self.threshold, "good_far": self.good_far,
            "defect_recall": self.defect_recall, "border_peak": self.border_peak,
            "calibration_seconds": self.calibration_seconds, "fit_seconds": self.fit_seconds,
            "extract_seconds": self.extract_seconds, "coreset_seconds": self.coreset_seconds,
            "ms_per_image": self.ms_per_image,
            "images": [{"path": p, "label": int(lab), "defect_type": t, "score": float(s)}
                       for p, lab, t, s in zip(self.paths, self.labels, self.defect_types, self.scores)],
        }


# ------------------------------------------------------------------------------------------------ metrics
def crop_to_region(arrays: Sequence[np.ndarray], preprocessing: Preprocessing) -> list[np.ndarray]:
    """Cut every 2-D array down to ``preprocessing.region`` of its own shape (the part the network sees).

    Without a crop the arrays come back unchanged.
    """
    if preprocessing.crop is None:
        return list(arrays)
    out = []
    for a in arrays:
        rows, cols = preprocessing.region(tuple(a.shape[:2]))
        out.append(a[rows, cols])
    return out


def _or_none(fn: Callable[[], Any]) -> Any:
    """The metric, or None where it is undefined (one class only, no defect region, no normal pixel)."""
    try:
        return fn()
    except ValueError:
        return None


def compute_metrics(labels: Sequence[int], scores: Sequence[float], masks: Sequence[np.ndarray | None],
                    maps: Sequence[np.ndarray]) -> dict[str, Any]:
    """Image and pixel metrics of one test set by the protocol in this module's docstring.

    ``masks[i]`` is a boolean array of ``maps[i]``'s shape, or None for a defect image without mask (a good
    image's None counts as all-normal). Returns image_auroc, f1_max, f1_threshold, pixel_auroc, aupro,
    pixel_f1_max (None where undefined) and n_pixel_images.
    """
    labels = [int(v) for v in labels]
    scores = [float(v) for v in scores]
    out: dict[str, Any] = {"image_auroc": _or_none(lambda: image_auroc(labels, scores))}
    f1 = _or_none(lambda: f1_max(labels, scores))
    out["f1_max"], out["f1_threshold"] = (None, None) if f1 is None else (float(f1[0]), float(f1[1]))
    pm, pa = [], []
    for lab, mask, amap in zip(labels, masks, maps):
        if mask is None:
            if lab == 1:
                continue
            mask = np.zeros(amap.shape, dtype=bool)
        if mask.shape != amap.shape:
            raise PatchCoreError(f"mask shape {mask.shape} differs from its map's {amap.shape}")
        pm.append(mask)
        pa.append(amap)
    has_defect = any(m.any() for m in pm)
    out["n_pixel_images"] = len(pm) if has_defect else 0
    if has_defect:
        out["pixel_auroc"] = _or_none(lambda: pixel_auroc(pm, pa))
        out["aupro"] = _or_none(lambda: aupro(pm, pa))
        pf = _or_none(lambda: pixel_f1_max(pm, pa))
        out["pixel_f1_max"] = None if pf is None else float(pf[0])
    else:
        out["pixel_auroc"] = out["aupro"] = out["pixel_f1_max"] = None
    return out


# --------------------------------------------------------------------------------------------- evaluation
def evaluate_dataset(dataset: Dataset, params: dict[str, Any], *, keep_maps: bool = True,
                     progress: Progress | None = None) -> tuple[CategoryResult, PatchCore]:
    """Fit ``PatchCore(**params)`` on ``dataset.train``, score ``dataset.test``, and compute the metrics."""
    if not dataset.test:
        raise DatasetError(f"{dataset.name}: the test set is empty")
    model = PatchCore(**params)
    model.fit(list(dataset.train), progress=progress)
    return evaluate_model(model, dataset, keep_maps=keep_maps, progress=progress), model


def evaluate_model(model: PatchCore, dataset: Dataset, *, keep_maps: bool = True,
                   progress: Progress | None = None) -> CategoryResult:
    """Score ``dataset.test`` with a fitted ``model`` (however it was made: a fit, an update) and compute the
    metrics; the fit's times are the model's own."""
    if not dataset.test:
        raise DatasetError(f"{dataset.name}: the test set is empty")
    info = model.fit_info_
    paths = [s.path for s in dataset.test]
    t0 = time.perf_counter()
    preds = model.predict(paths, progress=progress)
    ms = (time.perf_counter() - t0) * 1000.0 / len(paths)
    maps = [p.anomaly_map for p in preds]
    masks: list[np.ndarray | None] = []
    for s, amap in zip(dataset.test, maps):
        h, w = amap.shape
        masks.append(load_mask(s.mask, size=(w, h)) if s.mask is not None else None)
    pre = model.preprocessing
    region = WHOLE_IMAGE if pre.crop is None else CENTRE_CROP
    # With a crop, evaluate only the pixels the network saw, as the paper does.
    eval_maps = crop_to_region(maps, pre)
    eval_masks = [None if mk is None else crop_to_region([mk], pre)[0] for mk in masks]
    labels = [s.label for s in dataset.test]
    scores = [float(p.score) for p in preds]
    m = compute_metrics(labels, scores, eval_masks, eval_maps)
    good = [i for i, lab in enumerate(labels) if lab == 0]
    bad = [i for i, lab in enumerate(labels) if lab == 1]
    thr = model.threshold_
    result = CategoryResult(
        name=dataset.name, n_train=int(info.get("n_images", len(dataset.train))), n_test=len(paths),
        n_defect=sum(labels), image_auroc=m["image_auroc"], pixel_auroc=m["pixel_auroc"], aupro=m["aupro"],
        image_f1_max=m["f1_max"], image_f1_threshold=m["f1_threshold"], pixel_f1_max=m["pixel_f1_max"],
        fit_seconds=float(info["fit_seconds"]), extract_seconds=float(info["extract_seconds"]),
        coreset_seconds=float(info["coreset_seconds"]), ms_per_image=ms, paths=[str(p) for p in paths],
        labels=labels, defect_types=[s.defect_type for s in dataset.test], scores=scores,
        maps=maps if keep_maps else None, pixel_region=region, n_pixel_images=m["n_pixel_images"],
        threshold=thr, calibration_seconds=float(info.get("calibration_seconds", 0.0)),
        good_far=None if thr is None or not good else float(np.mean([scores[i] >= thr for i in good])),
        defect_recall=None if thr is None or not bad else float(np.mean([scores[i] >= thr for i in bad])),
        border_peak=border_peak_share([eval_maps[i] for i in good]) if good else None)
    return result


def find_categories(path: str | os.PathLike, categories: Sequence[str] | None = None) -> list[Path]:
    """The category folders under ``path``: itself when it is a dataset, else its subfolders with train/good/.

    ``categories`` keeps only those names (an unknown one is a DatasetError listing the ones there are).
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    if any((root / d).is_dir() for d in ("train", "test", "good")):
        if categories and root.name not in categories:
            raise DatasetError(f"{root} is the single category {root.name!r}; asked for {', '.join(categories)}")
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and (p / "train" / "good").is_dir())
    if not found:
        raise DatasetError(f"{root} is neither a dataset folder nor a root of MVTec categories "
                           f"(subfolders with train/good/)")
    if categories:
        names = {p.name for p in found}
        missing = [c for c in categories if c not in names]
        if missing:
            raise DatasetError(f"no category {', '.join(missing)} under {root}; there are: "
                               f"{', '.join(sorted(names))}")
        found = [p for p in found if p.name in set(categories)]
    return found


def _versions() -> dict[str, str]:
    import scipy
    import sklearn
    import torch

    v = {"patchcore": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "numpy": np.__version__, "scipy": scipy.__version__, "scikit-learn": sklearn.__version__}
    try:
        import faiss

        v["faiss"] = faiss.__version__
    except Exception:  # noqa: BLE001 - version info only
        v["faiss"] = "unknown"
    try:
        import timm

        v["timm"] = timm.__version__
    except Exception:  # noqa: BLE001
        pass
    return v


def _machine() -> dict[str, Any]:
    import torch

    m: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                         "processor": platform.processor(), "cpu_count": os.cpu_count(),
                         "torch_threads": torch.get_num_threads(),
                         "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    m["loadavg"] = _loadavg()  # at the end; timings on a busy machine are noisy
    return m


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def resolved_params(model: PatchCore) -> dict[str, Any]:
    """get_params() made JSON-ready, with the layers actually tapped and the preprocessing spelled out."""
    p = model.get_params()
    p["layers"] = list(model.tapped_layers)
    p["backbone_weights"] = None if p["backbone_weights"] is None else str(p["backbone_weights"])
    return p


@dataclass
class EvaluationReport:
    """Per-category results with everything needed to reproduce them."""

    results: list[CategoryResult]
    params: dict[str, Any]
    seed: int
    patchcore_version: str
    versions: dict[str, str]
    machine: dict[str, Any]
    date: str
    dataset: str = ""
    pixel_region: str = WHOLE_IMAGE
    preprocessing: dict[str, Any] = field(default_factory=dict)
    total_seconds: float = 0.0

    @property
    def torch_version(self) -> str:
        return self.versions.get("torch", "")

    @property
    def faiss_version(self) -> str:
        return self.versions.get("faiss", "")

    def mean_row(self) -> dict[str, Any]:
        """The mean over categories of every metric and timing (None where no category has it)."""
        row: dict[str, Any] = {"category": "mean"}
        for key in _METRIC_KEYS:
            vals = [r.metrics_row()[key] for r in self.results]
            vals = [v for v in vals if v is not None]
            row[key] = float(np.mean(vals)) if vals else None
        return row

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per category (keys of :data:`COLUMNS`), then the mean row."""
        return [r.metrics_row() for r in self.results] + [self.mean_row()]

    def format_table(self) -> str:
        """The table as aligned plain text ("-" for a metric that is undefined)."""
        rows = [[h for _, h, _ in COLUMNS]]
        for r in self.table_rows():
            rows.append(["-" if r[k] is None else fmt.format(r[k]) for k, _, fmt in COLUMNS])
        widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "patchcore-evaluation", "format_version": 1, "patchcore_version": self.patchcore_version,
            "date": self.date, "dataset": self.dataset, "seed": self.seed, "params": self.params,
            "preprocessing": self.preprocessing, "pixel_region": self.pixel_region,
            "protocol": {"pixel_metrics": "exact, at each image's own resolution; good images without mask are "
                                          "all-normal; defect images without mask are left out",
                         "aupro_fpr_limit": 0.3, "ms_per_image": "predict wall time / test images",
                         "fit_seconds": "feature extraction + coreset + cross-fitted calibration"},
            "versions": self.versions, "machine": self.machine, "total_seconds": self.total_seconds,
            "mean": self.mean_row(), "categories": [r.to_dict() for r in self.results],
        }

    def to_json(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the report (without maps) as JSON; an existing file is kept unless ``overwrite``."""
        text = json.dumps(jsonable(self.to_dict()), indent=2, allow_nan=False) + "\n"
        return _write(Path(path), text, overwrite)

    def to_csv(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write one row per category and a final ``mean`` row as CSV; an existing file is kept unless asked."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=_CSV_KEYS, lineterminator="\n")
        writer.writeheader()
        for r in self.results:
            writer.writerow({k: _csv_value(v) for k, v in r.csv_row().items()})
        writer.writerow({k: _csv_value(v) for k, v in self.mean_row().items()})
        return _write(Path(path), buf.getvalue(), overwrite)


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def jsonable(obj: Any) -> Any:
    """Plain JSON types for numpy scalars, paths and dataclasses (their fields); NaN and infinities become null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (Path, os.PathLike)):
        return str(obj)
    if is_dataclass(obj) and not isinstance(obj, type):  # e.g. the sampler in get_params(): its fields
        return jsonable(asdict(obj))
    return obj


def _write(path: Path, text: str, overwrite: bool) -> Path:
    """Write ``text`` atomically, making missing folders; an existing file is an error unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise PatchCoreError(f"{path} already exists; choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text, overwrite)


def evaluate(path: str | os.PathLike, params: dict[str, Any] | None = None,
             categories: Sequence[str] | None = None, progress: Progress | None = None, *,
             keep_maps: bool = False) -> EvaluationReport:
    """Evaluate PatchCore(**params) on one category folder or on every MVTec category under a root.

    Each category is fitted on its own train images and scored on its own test images. ``progress`` gets
    ("category", i, n) before category i (0-based) and (… n, n) at the end, and the model's "features",
    "coreset" and "scoring" stages in between. ``keep_maps`` keeps the anomaly maps in the results.
    """
    params = dict(params or {})
    folders = find_categories(path, categories)
    load_start = _loadavg()
    t0 = time.perf_counter()
    results, model = [], None
    for i, folder in enumerate(folders):
        if progress:
            progress("category", i, len(folders))
        dataset = read_dataset(folder) if len(folders) == 1 else read_mvtec(folder)
        result, model = evaluate_dataset(dataset, params, keep_maps=keep_maps, progress=progress)
        results.append(result)
    if progress:
        progress("category", len(folders), len(folders))
    assert model is not None
    pre = model.preprocessing
    return EvaluationReport(
        results=results, params=resolved_params(model), seed=int(model.seed), patchcore_version=__version__,
        versions=_versions(), machine={**_machine(), "loadavg_start": load_start},
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), dataset=str(path),
        pixel_region=WHOLE_IMAGE if pre.crop is None else CENTRE_CROP,
        preprocessing={"resize": list(pre.resize), "crop": list(pre.crop) if pre.crop else None,
                       "keep_aspect": pre.keep_aspect},
        total_seconds=time.perf_counter() - t0)
