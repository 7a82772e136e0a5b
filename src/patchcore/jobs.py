"""Fit a folder, predict a folder: the jobs behind ``patchcore fit``, ``fit-many`` and ``predict``, in one place.

The front ends parse their own input and show their own output; what is done with folders of images is here,
for the command line and for Ray's drivers and workers alike (the service scores one upload at a time, with
:mod:`patchcore.inference`, as :func:`score_files` does per image):

- the good images of a data folder (:func:`good_images`), the images to score (:func:`collect_images`), the
  names of their result files (:func:`output_names`) and their labels from folder names (:func:`folder_labels`);
- the results folder: checked before long work, cleared of our own earlier results only, and cleaned up after a
  failed run (:func:`results_folder`);
- fitting and calibrating a model from a folder (:func:`fit_folder`), and scoring images into result files, a
  summary (summary.csv, summary.json) and an optional HTML report (:func:`predict_folder`, :func:`score_files`).

Errors are :class:`~patchcore.errors.PatchCoreError` with one line that says what to do; they name the
command line's options, the front end most people use. Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .core.files import atomic_write, atomic_write_text
from .core.geometry import smallest_defect
from .core.imagefiles import as_items, is_image_file, iter_loaded, list_images
from .errors import DatasetError, PatchCoreError
from .inference import (
    THRESHOLD_OVERRIDDEN,
    Thresholds,
    check_headers,
    describe_threshold,
    load_model,
    thresholds_in_force,
)
from .results import MAP_FORMATS, RESULT_DIRS, write_result

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .model import PatchCore

__all__ = ["RESULT_FILES", "GOOD_FOLDER_NAMES", "Progress", "good_images", "collect_images", "output_names",
           "folder_labels", "check_model_path", "check_out_parent", "check_out_dir", "clear_results",
           "prepare_out_dir", "results_folder", "skip_reason", "skipped_rows", "fit_folder", "update_model",
           "score_files",
           "predict_summary", "write_summary_csv", "finish_predict", "read_result_map", "write_predict_report",
           "predict_folder"]

# Everything a run writes into a results folder besides RESULT_DIRS (predict's and evaluate's files, and the
# Ray ledger): what --overwrite may remove, and all it may remove.
RESULT_FILES = ("summary.csv", "summary.json", "report.html", "results.json", "results.csv", "progress.jsonl")
GOOD_FOLDER_NAMES = frozenset({"good", "ok", "normal", "pass"})

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``, as :meth:`patchcore.PatchCore.fit` and ``predict`` call it."""


# ------------------------------------------------------------------------------------------ data folders
def good_images(data: str | os.PathLike) -> tuple[list[Path], str]:
    """The good images of ``data`` and the layout they were found in: an MVTec category (its train/good/), a
    folder layout (its good/) or a folder of good images. Raises DatasetError when there are none."""
    data = Path(data)
    if not data.exists():
        raise DatasetError(f"{data}: no such folder")
    if not data.is_dir():
        raise DatasetError(f"{data}: not a folder; give a folder of good images or a dataset folder")
    for sub, layout in (("train/good", "MVTec category (train/good)"), ("good", "folder layout (good/)")):
        if (data / sub).is_dir():
            found = list_images(data / sub)
            if not found:
                raise DatasetError(f"{data / sub}: holds no images")
            return found, layout
    found = list_images(data)
    if not found:
        raise DatasetError(f"{data}: holds no images, and no train/good/ or good/ subfolder")
    return found, "folder of good images"


def collect_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The image files to score from files and folders, each once, in the order given. A folder gives its
    images, or else those of its subfolders (e.g. test/good, test/scratch: a labelled test folder in one go)."""
    files: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, inputs):
        if not p.exists():
            if str(p).lower() in ("true", "false", "yes", "no", "on", "off"):  # e.g. `--report true`
                raise PatchCoreError(f"{p}: no such file or folder (flags such as --report take no value)")
            raise PatchCoreError(f"{p}: no such file or folder")
        if p.is_dir():
            found = list_images(p) or [f for sub in sorted(q for q in p.iterdir() if q.is_dir()
                                                           and not q.name.startswith("."))
                                       for f in list_images(sub)]
            if not found:
                raise PatchCoreError(f"{p}: folder holds no images (nor do its subfolders)")
        elif is_image_file(p):
            found = [p]
        else:
            raise PatchCoreError(f"{p}: not an image file (by its extension)")
        for f in found:
            r = f.resolve()
            if r not in seen:
                seen.add(r)
                files.append(f)
    return files


def output_names(files: Sequence[str | os.PathLike], base: str | os.PathLike | None = None) -> list[str]:
    """Unique file stems for the results: the path relative to ``base`` (the one folder given) or else to the
    images' common folder, '/' -> '__'."""
    resolved = [Path(os.path.abspath(f)) for f in files]  # not resolve(): keep the user's (symlinked) folders
    common = Path(os.path.abspath(base)) if base is not None else \
        Path(os.path.commonpath([str(r.parent) for r in resolved]))
    names = ["__".join(r.relative_to(common).with_suffix("").parts) for r in resolved]
    if len(set(names)) < len(names):  # same stem, other extension
        names = ["__".join(r.relative_to(common).parts).replace(".", "_") for r in resolved]
    return names


def folder_labels(files: Sequence[str | os.PathLike]) -> list[int] | None:
    """Labels from folder names (good/ok/normal/pass = good, anything else = defective) when both occur."""
    labels = [0 if Path(os.path.abspath(f)).parent.name.lower() in GOOD_FOLDER_NAMES else 1 for f in files]
    return labels if len(set(labels)) == 2 else None


# -------------------------------------------------------------------------------------- results folders
def check_model_path(output: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse a model file name that is a folder, exists (unless ``overwrite``) or lies in no folder."""
    output = Path(output)
    if output.is_dir():
        raise PatchCoreError(f"{output} is a folder; give a model file name such as model.safetensors")
    if output.exists() and not overwrite:
        raise PatchCoreError(f"{output} already exists; choose another name or pass --overwrite")
    if not output.parent.is_dir():
        raise PatchCoreError(f"{output.parent}: folder does not exist")


def check_out_parent(out: str | os.PathLike) -> None:
    """Refuse a results folder whose parent folder does not exist."""
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise PatchCoreError(f"{parent}: folder does not exist")


def check_out_dir(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse a non-folder, or a folder that already holds anything unless ``overwrite`` (before long work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PatchCoreError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PatchCoreError(f"{out} already holds results (is not empty); choose another folder or pass "
                             f"--overwrite")


def clear_results(out: str | os.PathLike) -> None:
    """Remove the result files and folders we write (never anything else in ``out``)."""
    out = Path(out)
    for d in RESULT_DIRS:
        if (out / d).is_dir():
            shutil.rmtree(out / d)
    for f in RESULT_FILES:
        if (out / f).is_file():
            (out / f).unlink()


def prepare_out_dir(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Check the folder as :func:`check_out_dir` does; then clear our earlier results only, and make it."""
    out = Path(out)
    check_out_dir(out, overwrite)
    if out.is_dir() and any(out.iterdir()):
        clear_results(out)
    if not out.parent.is_dir():
        raise PatchCoreError(f"{out.parent}: folder does not exist")
    out.mkdir(exist_ok=True)


@contextlib.contextmanager
def results_folder(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Prepare ``out`` for this run's results; if the run fails (or is interrupted), remove what it wrote, and
    ``out`` itself if this run made it, so that the same command can simply be run again."""
    out = Path(out)
    made = not out.exists()
    prepare_out_dir(out, overwrite)
    try:
        yield out
    except BaseException:
        with contextlib.suppress(OSError):
            clear_results(out)
            if made:
                out.rmdir()  # only when empty: never takes anything else with it
        raise


# ------------------------------------------------------------------------------------------ skipped images
def skip_reason(name: str, reason: str) -> str:
    """The reason without the leading "NAME: " that ImageError messages carry (the name is shown beside it)."""
    return reason[len(name) + 2:] if reason.startswith(f"{name}: ") else reason


def skipped_rows(skipped: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """The (name, ImageError message) pairs of skipped images as the summaries list them."""
    return [{"name": n, "reason": skip_reason(n, r)} for n, r in skipped]


# ------------------------------------------------------------------------------------------------- fit
def fit_folder(data: str | os.PathLike, output: str | os.PathLike, params: dict[str, Any], *, folds: int = 5,
               validation: str | os.PathLike | None = None, defects: str | os.PathLike | None = None,
               threshold_method: str = "conformal", threshold_from: str = "far", use_ray: bool = False,
               address: str | None = None, skip_unreadable: bool = False, overwrite: bool = False,
               progress: Progress | None = None, stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fit ``PatchCore(**params)`` on the good images of ``data`` (:func:`good_images`), calibrate its threshold
    for ``params["target_far"]`` and save it to ``output``; returns the summary (what ``patchcore fit --json``
    prints).

    The threshold is calibrated on ``folds``-fold cross-fitted scores of the good images, or on the good images
    of ``validation`` (then nothing is cross-fitted); ``defects`` (labelled defective images) adds the F1-optimal
    threshold, which ``threshold_from="f1"`` makes the one used. Everything that can be checked is checked
    before the fit: the model file name, the folders, and every image's header (unless ``skip_unreadable``,
    which leaves unreadable images out and lists them). ``use_ray``: the fit is spread over Ray workers
    (:func:`patchcore.distributed.fit_on_ray`; a local Ray, or the cluster at ``address``). ``stage`` is called
    with "calibrating" when the calibration starts, for a progress display to start fresh bars.
    """
    from .model import PatchCore

    data, output = Path(data), Path(output)
    check_model_path(output, overwrite)
    if use_ray:
        from .distributed import require_ray

        require_ray()
        if skip_unreadable:
            raise PatchCoreError("--skip-unreadable does not work with --ray; leave the unreadable images out")
    goods, layout = good_images(data)
    val_imgs = None
    if validation is not None:
        validation = Path(validation)
        if not validation.is_dir():
            raise PatchCoreError(f"{validation}: no such folder (--validation)")
        val_imgs = list_images(validation)
        if len(val_imgs) < 2:
            raise PatchCoreError(f"{validation}: needs at least 2 good images to calibrate on")
    elif folds < 2:
        raise PatchCoreError(f"--folds must be at least 2 to calibrate on the fitted images, got {folds}; "
                             f"or give --validation DIR")
    elif len(goods) < 2:
        raise PatchCoreError(f"{data}: {len(goods)} good image; cross-fitting needs at least 2 (or give "
                             f"--validation)")
    defect_imgs = None
    if defects is not None:
        defects = Path(defects)
        if not defects.is_dir():
            raise PatchCoreError(f"{defects}: no such folder (--defects)")
        defect_imgs = list_images(defects)
        if not defect_imgs:
            raise PatchCoreError(f"{defects}: holds no images (--defects)")
    if threshold_from == "f1" and defect_imgs is None:
        raise PatchCoreError("--threshold-from f1 needs --defects DIR (labelled defective images)")
    if not skip_unreadable:
        check_headers(goods + (val_imgs or []) + (defect_imgs or []))

    # With a validation folder the cross-fit would be thrown away: skip its cost.
    params = {**params, "calibration_folds": 0 if val_imgs is not None else folds}
    t0 = time.perf_counter()
    if use_ray:
        from .distributed import fit_on_ray

        model = fit_on_ray(goods, params, address=address, progress=progress)
    else:
        model = PatchCore(**params).fit(goods, skip_unreadable=skip_unreadable, progress=progress)
    skipped = list(model.skipped_)
    if stage is not None:
        stage("calibrating")
    target_far = model.target_far
    cal = model.calibrate(val_imgs, target_far=target_far, method=threshold_method, defect_images=defect_imgs,
                          threshold_from=threshold_from, skip_unreadable=skip_unreadable, progress=progress)
    skipped += list(model.skipped_)
    if val_imgs is not None:
        cal.source = f"validation folder {validation}"
    cal.extra.update({"data": str(data), "layout": layout})
    cal.apply(model)
    cal_dict = cal.to_dict()
    model.save(output, overwrite=overwrite)
    seconds = time.perf_counter() - t0
    info = model.fit_info_
    from .report import input_in_words, left_out_in_words, suspects_in_words

    fitted = []
    for item in as_items(goods):
        with contextlib.suppress(PatchCoreError):  # a skipped unreadable image has no size to count
            fitted.append(item.size())
    median = (int(np.median([s[0] for s in fitted])), int(np.median([s[1] for s in fitted]))) if fitted else None

    return {
        "model": str(output), "data": str(data), "layout": layout, "n_good": len(goods),
        "n_fit": int(info["n_images"]), "n_calibration": cal.n, "calibration_source": cal.source,
        "n_defect": cal.n_defect, "bank_size": info["bank_size"], "threshold": cal.threshold,
        "input_size": list(model.preprocessing.input_size), "keep_aspect": model.preprocessing.keep_aspect,
        "channels": model.preprocessing.channels, "network_input": input_in_words(model.preprocessing),
        "median_image_size": median,
        "smallest_defect_px": None if median is None else smallest_defect(model.preprocessing, median),
        "threshold_from": cal.threshold_from, "pixel_threshold": cal.pixel_threshold,
        "far_threshold": cal.far_threshold, "f1_threshold": cal.f1_threshold, "f1": cal.f1,
        "target_far": target_far, "method": cal.method, "rule": cal.rule, "resolved": cal.resolved,
        "guaranteed_far": cal.guaranteed_far, "needed_n": cal.needed_n,
        "calibration_far": cal.calibration_far, "good_score_mean": cal.mean, "good_score_std": cal.std,
        "good_score_max": cal.max, "seconds": seconds, "calibration_seconds": info.get("calibration_seconds"),
        "params": model.get_params(),
        "threshold_source": describe_threshold(cal_dict, False), "guarantee": cal.statement,
        "suspects": cal_dict.get("suspects") or [], "suspects_in_words": suspects_in_words(cal_dict),
        "left_out": cal_dict.get("left_out") or [], "left_out_in_words": left_out_in_words(cal_dict),
        "skipped": skipped_rows(skipped),
        "warning": None if cal.resolved or cal.threshold_from == "f1" else cal.statement,
    }


def update_model(model_path: str | os.PathLike, images: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                 device: str = "auto", skip_unreadable: bool = False, overwrite: bool = False,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Add the good images in ``images`` (files and folders) to the model at ``model_path`` without refitting
    (:meth:`patchcore.PatchCore.update`) and write the result to ``output``, a new file: the old model is kept.
    Returns the summary (what ``patchcore update --json`` prints)."""
    model_path, output = Path(model_path), Path(output)
    if not model_path.is_file():
        raise PatchCoreError(f"{model_path}: no such model file")
    if output.exists() and output.resolve() == model_path.resolve():
        raise PatchCoreError(f"{output} is the model being updated; write the updated model to a new file "
                             f"(the old one is kept, to go back to)")
    check_model_path(output, overwrite)
    files = collect_images(images)
    if not skip_unreadable:
        check_headers(files)
    t0 = time.perf_counter()
    model = load_model(model_path, device=device)
    before = {"n_images": int(model.fit_info_["n_images"]), "bank_size": int(model.fit_info_["bank_size"]),
              "threshold": model.threshold_, "n_calibration": int((model.calibration_ or {}).get("n", 0))}
    model.update(files, skip_unreadable=skip_unreadable, progress=progress)
    model.save(output, overwrite=overwrite)
    info, cal = model.fit_info_, dict(model.calibration_ or {})
    from .report import suspects_in_words

    return {
        "model": str(output), "from_model": str(model_path), "n_given": len(files),
        "n_added": int(info["updates"][-1]["images"]), "bank_added": int(info["updates"][-1]["bank_added"]),
        "before": before,
        "after": {"n_images": int(info["n_images"]), "bank_size": int(info["bank_size"]),
                  "threshold": model.threshold_, "n_calibration": int(cal.get("n", 0))},
        "threshold_source": describe_threshold(cal, False), "guarantee": cal.get("statement"),
        "calibration_source": cal.get("source"), "suspects": cal.get("suspects") or [],
        "suspects_in_words": suspects_in_words(cal), "skipped": skipped_rows(model.skipped_),
        "seconds": time.perf_counter() - t0, "update_seconds": float(info["updates"][-1]["seconds"]),
    }


# --------------------------------------------------------------------------------------------- predict
def score_files(model: PatchCore, files: Sequence[str | os.PathLike], names: Sequence[str], output: Path,
                thresholds: Thresholds, map_format: str = "both", *, skip_unreadable: bool = False,
                skipped: list[tuple[str, str]] | None = None, batch_size: int | None = None,
                progress: Progress | None = None) -> list[dict[str, Any]]:
    """Score ``files`` with ``model`` and write each one's result files under ``output`` (named ``names``;
    its RESULT_DIRS must exist); returns their summary rows in order.

    Each image is decoded once: the array that is scored is the one its overlay is drawn on. Images go through
    the model ``batch_size`` at a time (default: the model's). Unreadable images raise, or with
    ``skip_unreadable`` are left out and appended to ``skipped`` as (name, reason). The verdicts and masks are
    made at ``thresholds`` (:func:`patchcore.results.write_result`), whatever the model's own threshold is.
    """
    size = int(batch_size or model.batch_size)
    stem_of = {str(f): n for f, n in zip(files, names)}
    rows: list[dict[str, Any]] = []
    batch: list[tuple[str, np.ndarray]] = []

    def run() -> None:
        for (name, image), pred in zip(batch, model.predict([image for _, image in batch])):
            pred.name = name
            rows.append(write_result(output, name, stem_of[name], pred, image, thresholds, map_format))
        batch.clear()

    done = 0
    for item, image in iter_loaded(as_items(list(files)), skip_unreadable, skipped):
        batch.append((item.name, image))
        if len(batch) == size:
            done += len(batch)
            run()
            if progress:
                progress("scoring", done, len(files))
    if batch:
        done += len(batch)
        run()
        if progress:
            progress("scoring", done, len(files))
    return rows


def write_summary_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """summary.csv: one row per image, the columns in order of first appearance, None as an empty cell."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    text = buf.getvalue()
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8", newline=""))


def predict_summary(output: str | os.PathLike, model_path: str | os.PathLike, rows: Sequence[dict[str, Any]],
                    skipped: Iterable[tuple[str, str]], thresholds: Thresholds, seconds: float) -> dict[str, Any]:
    """The summary of a predict run (summary.json, ``patchcore predict --json``): how to read the numbers and
    files, the counts, the skipped images and the rows."""
    if not rows:
        raise PatchCoreError("no readable images to score")
    thr, pix = thresholds.image, thresholds.pixel
    n_anom = sum(r["verdict"] == "anomalous" for r in rows)
    return {
        "model": str(model_path), "output": str(output), "threshold": thr, "threshold_source": thresholds.source,
        "pixel_threshold": pix, "normalized_score": "score / threshold (the threshold is 1.0)",
        "map_png_scale": f"raw = png / 65535 * {2 * pix!r} (clipped at twice the pixel threshold)",
        "mask": "empty for a good verdict; for an anomalous one, map >= pixel_threshold (calibrated like the "
                "image threshold, on good maps' maxima), and always at least the region around the map's peak",
        "n_images": len(rows), "n_anomalous": n_anom, "n_good": len(rows) - n_anom, "seconds": seconds,
        "skipped": skipped_rows(skipped), "images": list(rows),
    }


def folder_drift(model: PatchCore, scores: Sequence[float]):
    """The drift checks (:mod:`patchcore.core.drift`) of a folder's scores, taken as one stream, against the
    model's calibration; None for a model without calibration scores."""
    from .core.drift import DriftMonitor

    monitor = DriftMonitor.for_calibration(model.calibration_ or {}, model.threshold_, window=max(1, len(scores)))
    if monitor is None:
        return None
    monitor.add(scores)
    return monitor.state()


def finish_predict(output: Path, model: PatchCore, model_path: str | os.PathLike, files: Sequence[Path],
                   rows: Sequence[dict[str, Any]], skipped: Iterable[tuple[str, str]], thresholds: Thresholds,
                   seconds: float, report: bool = False) -> dict[str, Any]:
    """Write summary.csv, summary.json and (with ``report``) report.html for the rows; returns the summary
    (with "report" naming the page when one was written)."""
    from .evaluate import jsonable

    summary = predict_summary(output, model_path, rows, skipped, thresholds, seconds)
    drift = folder_drift(model, [r["score"] for r in rows])
    if drift is not None:
        summary["drift"], summary["drift_in_words"] = drift.to_dict(), drift.in_words()
    write_summary_csv(output / "summary.csv", rows)
    atomic_write_text(output / "summary.json", json.dumps(jsonable(summary), indent=2) + "\n")
    if report:
        summary["report"] = str(write_predict_report(output, model, model_path, summary, files))
    return summary


def read_result_map(output: str | os.PathLike, row: dict[str, Any], pixel_threshold: float) -> np.ndarray:
    """An image's anomaly map read back from its result files: the raw .npy when it was written, else the
    16-bit PNG (``png / 65535 * 2 * pixel_threshold``, clipped at twice the pixel threshold)."""
    output = Path(output)
    if "map_npy" in row:
        return np.load(output / row["map_npy"])
    from PIL import Image

    return np.asarray(Image.open(output / row["map_png"]), dtype=np.float32) / 65535.0 * 2.0 * pixel_threshold


# The calibration's fields as the prediction report names them (fields it does not have are left out).
CALIBRATION_LABELS = {"method": "method", "rule": "rule", "target_far": "target false-alarm rate",
                      "n": "good images", "mean": "score mean", "std": "score std", "max": "score max",
                      "calibration_far": "share of its images at or above the threshold",
                      "f1_threshold": "F1-optimal threshold", "source": "source"}


def write_predict_report(output: Path, model: PatchCore, model_path: str | os.PathLike, summary: dict[str, Any],
                         files: Sequence[Path]) -> Path:
    """OUTPUT/report.html of a predict run: the counts, the settings, the score histogram, a gallery and, when
    folder names tell good from defective (:func:`folder_labels`), the ROC curve and the detection counts."""
    from .report import build_section, input_in_words, left_out_in_words, render_html, suspects_in_words, write_report

    rows = summary["images"]
    idx = {str(f): i for i, f in enumerate(files)}
    scored = [idx[r["path"]] for r in rows]
    labels = folder_labels([files[i] for i in scored])
    pix = summary["pixel_threshold"]

    def get_map(i: int) -> np.ndarray:
        return read_result_map(output, rows[i], pix)

    sec = build_section("Images", [r["path"] for r in rows], [r["score"] for r in rows], labels,
                        summary["threshold"], "threshold", get_map, pixel_threshold=pix,
                        defect_types=[Path(os.path.abspath(files[i])).parent.name for i in scored] if labels else None)
    if labels is not None:
        sec.notes.append("truth taken from folder names: images in good/ (or ok/, normal/, pass/) are good, "
                         "all others defective")
    else:
        sec.notes.append("no labels (images are not split into good/ and defect folders): no ROC curve")
    headers = ["images", "anomalous", "good", "threshold", "pixel threshold", "skipped"]
    vals = [summary["n_images"], summary["n_anomalous"], summary["n_good"], f"{summary['threshold']:.6g}",
            f"{pix:.6g}", len(summary["skipped"])]
    if labels is not None:
        y = np.array(labels, bool)
        s = np.array([r["score"] for r in rows])
        headers += ["detected defects", "false alarms"]
        vals += [f"{int((s[y] >= summary['threshold']).sum())} / {int(y.sum())}",
                 f"{int((s[~y] >= summary['threshold']).sum())} / {int((~y).sum())}"]
    cal = model.calibration_ or {}
    settings = {"model file": str(model_path), "threshold source": summary["threshold_source"],
                # the calibration's guarantee holds for its own threshold only, not one set with --threshold
                **({"guarantee": cal["statement"]} if cal.get("statement")
                   and summary["threshold_source"] != THRESHOLD_OVERRIDDEN else {}),
                "normalised score": summary["normalized_score"], "mask": summary["mask"],
                "network input": input_in_words(model.preprocessing),
                **{k: v for k, v in model.get_params().items()},
                **{f"calibration {label}": cal[k] for k, label in CALIBRATION_LABELS.items()
                   if cal.get(k) is not None},
                **{label: words for label, words in (("training images that look defective", suspects_in_words(cal)),
                                                     ("left out of the fit (looked defective)",
                                                      left_out_in_words(cal)),
                                                     ("drift against the calibration", summary.get("drift_in_words")))
                   if words}}
    page = render_html("PatchCore prediction report", f"{summary['n_images']} images scored with {model_path}",
                       settings, (headers, [vals]), [sec])
    return write_report(output / "report.html", page, overwrite=True)


def predict_folder(model_path: str | os.PathLike, images: Sequence[str | os.PathLike], output: str | os.PathLike,
                   *, threshold: float | None = None, map_format: str = "both", report: bool = False,
                   device: str = "auto", batch_size: int = 8, use_ray: bool = False, address: str | None = None,
                   workers: int | None = None, skip_unreadable: bool = False, overwrite: bool = False,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Score the images of ``images`` (files and folders, :func:`collect_images`) with the model file
    ``model_path`` and write into ``output``, per image, the map(s), heat-map overlay and defect mask, plus
    summary.csv, summary.json and (with ``report``) report.html; returns the summary (what
    ``patchcore predict --json`` prints).

    The thresholds are the model's calibrated ones, or ``threshold`` for the image score (the pixel threshold
    scaled with it). ``output`` must be empty unless ``overwrite`` (then only our earlier results are removed);
    a failed run removes what it wrote. Every image's header is read before anything is written, unless
    ``skip_unreadable`` (unreadable images are then left out and listed). ``use_ray``: scored by a pool of Ray
    workers (a local Ray, or the cluster at ``address``), resumably: a rerun into the same folder scores only
    what an interrupted run left.
    """
    model_path, output, images = Path(model_path), Path(output), [Path(p) for p in images]
    if map_format not in MAP_FORMATS:
        raise PatchCoreError(f"--map-format must be one of {', '.join(MAP_FORMATS)}, got {map_format!r}")
    check_out_parent(output)
    resuming = False
    if use_ray:
        from .distributed import LEDGER, require_ray

        require_ray()
        if workers is not None and workers < 1:
            raise PatchCoreError(f"--workers must be at least 1, got {workers}")
        resuming = (output / LEDGER).is_file() and not overwrite
    if not resuming:
        check_out_dir(output, overwrite)
    model = load_model(model_path, device=device)
    model.batch_size = batch_size
    files = collect_images(images)
    thresholds = thresholds_in_force(model, threshold, "--threshold", model_name=str(model_path))
    names = output_names(files, base=images[0] if len(images) == 1 and images[0].is_dir() else None)
    if not skip_unreadable:
        check_headers(files)
    t0 = time.perf_counter()
    skipped: list[tuple[str, str]] = []
    if use_ray:
        # No clean-up on failure here: what is done stays, for the rerun to resume from.
        from .distributed import predict_files

        if not resuming:
            prepare_out_dir(output, overwrite)
        got = predict_files(model_path, files, names, output, threshold=threshold, map_format=map_format,
                            skip_unreadable=skip_unreadable, address=address, workers=workers,
                            batch_size=batch_size,
                            progress=None if progress is None else lambda i, n: progress("scoring", i, n))
        rows = [r for r in got if "skipped" not in r]
        skipped = [(r["name"], r["skipped"]) for r in got if "skipped" in r]
        return finish_predict(output, model, model_path, files, rows, skipped, thresholds,
                              time.perf_counter() - t0, report)
    with results_folder(output, overwrite):
        for d in RESULT_DIRS:
            (output / d).mkdir()
        rows = score_files(model, files, names, output, thresholds, map_format, skip_unreadable=skip_unreadable,
                           skipped=skipped, progress=progress)
        return finish_predict(output, model, model_path, files, rows, skipped, thresholds,
                              time.perf_counter() - t0, report)
