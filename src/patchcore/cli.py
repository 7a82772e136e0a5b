"""The ``patchcore`` command: fit, predict, evaluate, info, serve.

Exit codes: 0 success; 1 an error in the input (missing paths, unreadable images, a bad model file,
results already present, ...), reported as one line ``error: ...`` on stderr; 2 a wrong command line
(unknown option, missing argument), reported by the argument parser; 130 interrupted.

``--json`` prints one JSON document on stdout and nothing else there (progress and warnings go to
stderr); ``--quiet`` prints nothing but errors.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from . import __version__
from .errors import ImageError, PatchCoreError
from .inference import check_headers, describe_threshold, load_model
from .inference import percent as _percent
from .jobs import (
    check_out_dir,
    check_out_parent,
    collect_images,
    fit_folder,
    predict_folder,
    results_folder,
    update_model,
)

APP_HELP = (
    "PatchCore visual anomaly detection from the shell.\n\n"
    "Typical job: `patchcore fit GOOD_IMAGES -o model.safetensors` fits on good images and calibrates a "
    "pass/fail threshold for a target false-alarm rate on them (cross-fitted); "
    "`patchcore predict model.safetensors NEW_IMAGES -o out` writes "
    "per image the score, verdict, heat map and defect mask, plus summary.csv / summary.json; "
    "`patchcore update model.safetensors NEW_GOOD_IMAGES -o model2.safetensors` adds good images without "
    "refitting; `patchcore evaluate MVTEC_CATEGORY -o eval --report` measures a setting on labelled data.\n\n"
    "Exit codes: 0 ok, 1 bad input (one line 'error: ...' on stderr), 2 wrong command line.")


class _FlagsWithoutType:
    """Show no value type for flags in --help: recent typer (0.29) labels every flag ``<bool>``, which reads as
    if ``--report true`` were the way to use it (``true`` would then be taken as an input path)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


def _looks_like_address(token: str) -> bool:
    """A Ray address (ray://host:port, host:port, auto, local) rather than an image or folder given next."""
    return token in ("auto", "local") or token.startswith("ray://") or (
        ":" in token and not Path(token).exists() and token.rsplit(":", 1)[1].isdigit())


class _Command(_FlagsWithoutType, TyperCommand):
    def parse_args(self, ctx, args: list[str]) -> list[str]:
        # `--ray [ADDRESS]`: the address is optional, which the option parser cannot express; a bare --ray
        # (last, or followed by something that is not an address) means a local Ray.
        args = list(args)
        for i, a in enumerate(args):
            if a == "--ray" and (i + 1 == len(args) or not _looks_like_address(args[i + 1])):
                args[i] = "--ray=local"
        return super().parse_args(ctx, args)


class _Group(_FlagsWithoutType, TyperGroup):
    pass


app = typer.Typer(help=APP_HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


class CliError(PatchCoreError):
    """A command-line mistake found by the CLI itself (reported like every PatchCoreError)."""


# ---------------------------------------------------------------------------------------------- plumbing
def _handles_errors(fn):
    """Report PatchCoreError / OSError as one line on stderr and exit 1; Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except PatchCoreError as e:
            _fail(str(e))
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _fail(f"{where}{e.strerror or e}")
        except ModuleNotFoundError as e:
            from .entry import FULL

            if (e.name or "").split(".")[0] not in FULL:
                raise
            _fail(f"this command needs the full install ({e.name} is missing): pip install \"patchcore[full]\"; "
                  f"this install serves and scores exported models (patchcore serve, patchcore info)")
        except MemoryError:
            _fail("out of memory; use fewer or smaller images, a smaller --coreset-ratio or --batch-size")
        except KeyboardInterrupt:
            err_console.print("error: interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _fail(message: str) -> None:
    line = " ".join(str(message).split())  # always one line
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    raise typer.Exit(1)


def _emit_json(obj: Any) -> None:
    from .evaluate import jsonable

    sys.stdout.write(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


STAGE_LABELS = {"features": "extracting features", "coreset": "selecting coreset", "scoring": "scoring",
                "defects": "scoring defect images"}


class _Progress:
    """Rich progress bars on stderr, one per stage; ``callback(stage, done, total)`` feeds them."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.prefix = ""
        self.scoring_label = "scoring"
        self._bar: Progress | None = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._bar = Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=err_console, transient=False)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            if exc[0] is not None:  # an error ends the run: leave its one line alone on the terminal
                self._bar.live.transient = True
            self._bar.__exit__(*exc)

    def stage(self, scoring_label: str) -> None:
        """Start fresh bars (e.g. 'calibrating' for the next scoring pass)."""
        self.scoring_label = scoring_label
        self._tasks = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self._bar is None:
            return
        if stage == "category":
            self._tasks = {}
            return
        label = self.scoring_label if stage == "scoring" else STAGE_LABELS.get(stage, stage)
        desc = f"{self.prefix}{label}"
        task = self._tasks.get(stage)
        if task is None:
            task = self._tasks[stage] = self._bar.add_task(desc, total=total)
        self._bar.update(task, completed=done, total=total, description=desc)


def _print_skipped(skipped: list[dict[str, str]], quiet: bool) -> None:
    """The summaries' "skipped" rows (name, reason), on stderr."""
    if skipped and not quiet:
        err_console.print(f"skipped {len(skipped)} unreadable image(s):", style="yellow")
        for s in skipped:
            err_console.print(f"  {s['name']}: {s['reason']}", markup=False, soft_wrap=True)


_load_model = load_model  # the library's: friendly errors for a folder or a damaged file


def _image_error_hint(e: ImageError) -> CliError:
    return CliError(f"{e}; pass --skip-unreadable to leave unreadable images out (they are listed)")


def _run_job(job: Callable[[_Progress], dict[str, Any]], quiet: bool, json_out: bool) -> dict[str, Any] | None:
    """Run one of the jobs (fit, update, predict) with progress bars unless quiet or JSON, an image error as
    one line with its hint; then print the JSON summary and the skipped images. Returns the summary for the
    command's own table, or None when quiet or JSON ask for nothing more."""
    with _Progress(not (quiet or json_out)) as prog:
        try:
            summary = job(prog)
        except ImageError as e:
            raise _image_error_hint(e) from None
    if json_out:
        _emit_json(summary)
    _print_skipped(summary["skipped"], quiet or json_out)
    return None if quiet or json_out else summary


def _rotations(text: str | None) -> tuple[int, ...] | None:
    """--rotations "90,180" (or "none") as the constructor takes it; None leaves it to the preset."""
    if text is None:
        return None
    if text.strip().lower() in ("none", "0", ""):
        return ()
    try:
        return tuple(int(t) for t in text.replace(" ", "").split(","))
    except ValueError:
        raise CliError(f"--rotations takes degrees separated by commas, such as 90,180, or none; "
                       f"got {text!r}") from None


def _model_params(*, backbone: str | None, coreset_ratio: float, preset: str, image_size: int | None,
                  num_neighbors: int, sigma: float, seed: int, device: str, batch_size: int, target_far: float,
                  backbone_weights: Path | None = None, border_pad: int | None = None, rotations: str | None = None,
                  **more: Any) -> dict[str, Any]:
    """The PatchCore settings of the model options that fit, fit-many and evaluate share (``more``: others,
    such as calibration_folds), checked as the command line spells them."""
    from .settings import check_target_far

    check_target_far(target_far, "--target-far")
    p = {"backbone": backbone, "coreset_ratio": coreset_ratio, "preset": preset, "image_size": image_size,
         "num_neighbors": num_neighbors, "sigma": sigma, "seed": seed, "device": device, "batch_size": batch_size,
         "border_pad": border_pad, "rotations": _rotations(rotations), "target_far": target_far, **more}
    if backbone_weights is not None:
        if not backbone_weights.is_file():
            raise CliError(f"{backbone_weights}: no such weights file")
        p["backbone_weights"] = str(backbone_weights)
    return p


# ------------------------------------------------------------------------------------------- options
class ThresholdMethod(str, Enum):
    conformal = "conformal"
    gaussian = "gaussian"


class ThresholdFrom(str, Enum):
    far = "far"
    f1 = "f1"


class MapFormat(str, Enum):
    both = "both"
    npy = "npy"
    png = "png"


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (no progress, no table).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables "
                                                      "(progress and warnings go to stderr).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing results instead of refusing.")]
SkipUnreadable = Annotated[bool, typer.Option(
    "--skip-unreadable", help="Leave out images that cannot be read (they are listed) instead of stopping.")]
Backbone = Annotated[Optional[str], typer.Option(help="Feature extractor: efficientnet_lite0 (offline), "
                                                      "efficientnet_lite1/2, wide_resnet50_2 (the paper's; "
                                                      "downloads), or an ensemble such as A+B; default: the "
                                                      "preset's.")]
CoresetRatio = Annotated[float, typer.Option(help="Fraction of patch features kept in the memory bank (0-1]; "
                                                  "smaller is faster, 0.01-0.1 is typical.")]
Preset = Annotated[str, typer.Option(help="'full' scores the whole image resized to 288; 'accurate' also fits "
                                          "the good images turned 90 and 180 degrees (about twice the time per "
                                          "image); 'paper' resizes to 256 and centre-crops 224 (borders unseen), "
                                          "as the paper's table was made.")]
Rotations = Annotated[Optional[str], typer.Option(help="Quarter turns of every good image that are fitted too, "
                                                       "in degrees: e.g. 90,180 or none (default: the preset's). "
                                                       "For parts that come at any angle.")]
BorderPad = Annotated[Optional[int], typer.Option(help="Pixels of reflection padding around the network input "
                                                       "(multiple of 16; 0 = none; default: the preset's).")]
ImageSize = Annotated[Optional[int], typer.Option(help="Shorter side of the network input (overrides the preset's "
                                                       "288 for full); the longer follows the good images' aspect "
                                                       "ratio. Larger sees smaller defects, slower.")]
Scale = Annotated[Optional[float], typer.Option(help="Instead of --image-size: network pixels per image pixel "
                                                     "(1 = native resolution), for small defects on large images.")]
DefectSize = Annotated[Optional[float], typer.Option(help="The smallest defect to find, in image pixels across: "
                                                          "the network input is enlarged where needed so that it "
                                                          "spans 32 network pixels (never made smaller).")]
KeepAspect = Annotated[Optional[bool], typer.Option("--keep-aspect/--squash", help="Keep each image's aspect "
                                                     "ratio, or squash it to a square (default: the preset's; "
                                                     "paper squashes).", show_default=False)]
NumNeighbors = Annotated[int, typer.Option(help="b of the paper's Eq. 7 score reweighting (1 turns it off).")]
Sigma = Annotated[float, typer.Option(help="Gaussian smoothing of the anomaly map, in network-input pixels.")]
Seed = Annotated[int, typer.Option(help="Seed of the coreset and of the calibration folds (same seed, same model).")]
Device = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")]
BatchSize = Annotated[int, typer.Option(help="Images per forward pass.")]
BackboneWeights = Annotated[Optional[Path], typer.Option(help="Local backbone weights file instead of the "
                                                               "registry's (for offline use).")]


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"patchcore {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


# ----------------------------------------------------------------------------------------------- fit
@app.command(cls=_Command)
@_handles_errors
def fit(
    data: Annotated[Path, typer.Argument(help="Good images: a folder of them, an MVTec category (uses "
                                              "train/good/) or a folder layout (uses good/).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model file to write (.safetensors).",
                                         show_default=False)],
    folds: Annotated[int, typer.Option(help="Cross-fitting folds: every good image gets a calibration score from "
                                            "a bank built without its fold (the model's bank uses all images).")] = 5,
    validation: Annotated[Optional[Path], typer.Option(help="Folder of separate good images (ideally from the "
                                                            "production camera) to calibrate on instead of the "
                                                            "cross-fitted scores.")] = None,
    defects: Annotated[Optional[Path], typer.Option(help="Folder of labelled defective images: adds the "
                                                         "F1-optimal threshold (with the good calibration "
                                                         "scores).")] = None,
    target_far: Annotated[float, typer.Option(help="Target false-alarm rate on good images, e.g. 0.01 = 1 in "
                                                   "100 good parts rejected.")] = 0.01,
    threshold_method: Annotated[ThresholdMethod, typer.Option(
        help="conformal: split-conformal rank of the good scores, a guaranteed rate for exchangeable images "
             "(needs 1/rate - 1 images, else says what it guarantees); gaussian: a normal fit, an estimate."
    )] = ThresholdMethod.conformal,
    threshold_from: Annotated[ThresholdFrom, typer.Option(
        help="Which threshold the model uses: far (target false-alarm rate) or f1 (needs --defects).")
    ] = ThresholdFrom.far,
    backbone: Backbone = None,
    coreset_ratio: CoresetRatio = 0.1,
    preset: Preset = "full",
    image_size: ImageSize = None,
    scale: Scale = None,
    defect_size: DefectSize = None,
    keep_aspect: KeepAspect = None,
    border_pad: BorderPad = None,
    rotations: Rotations = None,
    num_neighbors: NumNeighbors = 9,
    sigma: Sigma = 4.0,
    seed: Seed = 0,
    device: Device = "auto",
    batch_size: BatchSize = 8,
    backbone_weights: BackboneWeights = None,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="[ADDRESS]",
        help="Spread a large product's feature extraction, coreset cells and calibration scoring over Ray "
             "workers (this machine gathers the features and coordinates the cells): a local Ray, or the "
             'cluster at ADDRESS. Same model as without it. Needs pip install "patchcore\\[ray]".'
    )] = None,
    leave_out_suspects: Annotated[bool, typer.Option(
        "--leave-out-suspects",
        help="Fit again without the good images whose cross-fitted score looks defective (a defective part "
             "hidden among the good ones), and audit what is left again, up to three rounds; up to about four "
             "times the fit time. Without it they are only listed.")] = False,
    skip_unreadable: SkipUnreadable = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Fit a model on good images and calibrate its pass/fail threshold for a target false-alarm rate."""
    params = _model_params(backbone=backbone, coreset_ratio=coreset_ratio, preset=preset, image_size=image_size,
                           scale=scale, defect_size=defect_size, keep_aspect=keep_aspect,
                           num_neighbors=num_neighbors, sigma=sigma, seed=seed, device=device,
                           batch_size=batch_size, target_far=target_far, backbone_weights=backbone_weights,
                           border_pad=border_pad, rotations=rotations)
    if leave_out_suspects:
        if validation is not None:
            raise PatchCoreError("--leave-out-suspects finds the suspects in the cross-fitted scores; it does not "
                                 "work with --validation")
        params["leave_out_suspects"] = True
    summary = _run_job(lambda prog: fit_folder(
        data, output, params, folds=folds, validation=validation, defects=defects,
        threshold_method=threshold_method.value, threshold_from=threshold_from.value, use_ray=ray is not None,
        address=None if ray in (None, "local") else ray, skip_unreadable=skip_unreadable, overwrite=overwrite,
        progress=prog, stage=prog.stage), quiet, json_out)
    if summary is None:
        return
    if summary["warning"]:
        err_console.print(f"warning: {summary['warning']}", style="yellow", markup=False, soft_wrap=True)
    t = Table(title=f"model written: {output}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    n_cal = summary["n_calibration"]
    rows = [("good images", f"{summary['n_good']} ({summary['layout']})"),
            ("fitted on", f"{summary['n_fit']} images -> memory bank of {summary['bank_size']} patches"),
            ("network input", summary["network_input"]),
            ("smallest defect seen well", "-" if summary["smallest_defect_px"] is None else
             f"about {summary['smallest_defect_px']:.0f} image px across (32 network px); --defect-size "
             f"enlarges the input for smaller ones"),
            ("calibrated on", f"{n_cal} good images ({summary['calibration_source']})"),
            ("threshold", f"{summary['threshold']:.6g}  ({summary['threshold_source']})"),
            ("guarantee", summary["guarantee"]),
            ("good calibration scores", f"mean {summary['good_score_mean']:.4g}, std {summary['good_score_std']:.3g}, "
                                        f"max {summary['good_score_max']:.4g}; "
                                        f"{_percent(summary['calibration_far'])} at or above the threshold"),
            ("pixel threshold (masks)", f"{summary['pixel_threshold']:.6g}")]
    if summary["left_out_in_words"]:
        rows.append(("left out (looked defective)", summary["left_out_in_words"]))
    if summary["suspects_in_words"]:
        rows.append(("look defective", summary["suspects_in_words"]))
    if summary["f1_threshold"] is not None:
        rows.append(("F1-optimal threshold", f"{summary['f1_threshold']:.6g}  (F1 {summary['f1']:.3f} on {n_cal} "
                                             f"good + {summary['n_defect']} defective)"))
    rows.append(("skipped", str(len(summary["skipped"]))))
    timing = f"{summary['seconds']:.1f} s"
    if summary["calibration_seconds"]:
        timing += f" (of which cross-fitted calibration {summary['calibration_seconds']:.1f} s)"
    rows.append(("time", timing))
    for k, v in rows:
        t.add_row(k, v)
    out_console.print(t)


# ------------------------------------------------------------------------------------------ fit-many
@app.command("fit-many", cls=_Command)
@_handles_errors
def fit_many_cmd(
    data_root: Annotated[Path, typer.Argument(metavar="DATA_ROOT", help="Folder of product folders, each with "
                                              "its good images (train/good/, good/ or the images themselves).",
                                              show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="MODELS_DIR", help="Folder for the models "
                                         "(PRODUCT.safetensors each; created).", show_default=False)],
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="[ADDRESS]",
        help="One Ray task per product: on a local Ray started here, or the cluster at ADDRESS (ray://host:port "
             'or host:port). Needs pip install "patchcore\\[ray]". Without it products are fitted one by one.')] = None,
    backbone: Backbone = None,
    coreset_ratio: CoresetRatio = 0.1,
    preset: Preset = "full",
    image_size: ImageSize = None,
    scale: Scale = None,
    defect_size: DefectSize = None,
    keep_aspect: KeepAspect = None,
    border_pad: BorderPad = None,
    rotations: Rotations = None,
    num_neighbors: NumNeighbors = 9,
    sigma: Sigma = 4.0,
    seed: Seed = 0,
    device: Device = "auto",
    batch_size: BatchSize = 8,
    backbone_weights: BackboneWeights = None,
    folds: Annotated[int, typer.Option(help="Cross-fitting folds of every product's calibration (at least 2): "
                                            "every good image gets a score from a bank built without its fold.")] = 5,
    target_far: Annotated[float, typer.Option(help="Target false-alarm rate of every model's threshold.")] = 0.01,
    skip_unreadable: SkipUnreadable = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing model files.")] = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Fit one model per product folder (as `patchcore fit` would, cross-fitted threshold included); report
    every product's outcome. A product that fails does not stop the others; the exit status is 1 if any did."""
    from .distributed import fit_many, products_of, require_ray
    from .model import PatchCore

    if ray is not None:
        require_ray()
    products = products_of(data_root)
    if output.exists() and not output.is_dir():
        raise CliError(f"{output} exists and is not a folder")
    if not output.parent.resolve().is_dir():
        raise CliError(f"{output.parent}: folder does not exist")
    params = _model_params(backbone=backbone, coreset_ratio=coreset_ratio, preset=preset, image_size=image_size,
                           scale=scale, defect_size=defect_size, keep_aspect=keep_aspect,
                           num_neighbors=num_neighbors, sigma=sigma, seed=seed, device=device,
                           batch_size=batch_size, target_far=target_far, border_pad=border_pad, rotations=rotations,
                           backbone_weights=backbone_weights, calibration_folds=folds)
    if folds < 2:
        raise CliError(f"--folds must be at least 2 to calibrate every product's threshold, got {folds}")
    PatchCore(**params).check_params()  # a bad setting fails here, once, rather than once per product
    output.mkdir(exist_ok=True)
    show = not (quiet or json_out)
    if show:
        err_console.print(f"fitting {len(products)} products" + (" on Ray" if ray else " one by one"))

    def done(row: dict[str, Any]) -> None:
        if show:
            style = "green" if row["status"] == "ok" else "bold red"
            why = "" if row["status"] == "ok" else ": " + escape(row["error"])
            err_console.print(f"  [{style}]{row['status']}[/] {escape(row['product'])} "
                              f"({row.get('seconds', 0):.0f} s){why}")

    t0 = time.perf_counter()
    rows = fit_many(data_root, output, params, use_ray=ray is not None,
                    address=None if ray in (None, "local") else ray, overwrite=overwrite,
                    skip_unreadable=skip_unreadable, progress=done)
    failed = [r for r in rows if r["status"] != "ok"]
    summary = {"data_root": str(data_root), "models_dir": str(output), "ray": ray, "n_products": len(rows),
               "n_failed": len(failed), "seconds": time.perf_counter() - t0, "products": rows}
    if json_out:
        from .evaluate import jsonable

        _emit_json(jsonable(summary))
    elif not quiet:
        t = Table(box=box.SIMPLE_HEAD)
        for col, just in (("product", "left"), ("status", "left"), ("images", "right"), ("bank", "right"),
                          ("threshold", "right"), ("seconds", "right"), ("model or error", "left")):
            t.add_column(col, justify=just, overflow="fold")
        for r in rows:
            ok = r["status"] == "ok"
            t.add_row(r["product"], Text(r["status"], style="green" if ok else "bold red"), str(r.get("images", "")),
                      str(r.get("bank_size", "")), f"{r['threshold']:.4g}" if ok and r.get("threshold") else "",
                      f"{r.get('seconds', 0):.1f}", r["model"] if ok else r["error"])
        out_console.print(t)
    if failed:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------- predict
@app.command(cls=_Command)
@_handles_errors
def predict(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file written by `patchcore fit`.",
                                               show_default=False)],
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders of images.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the results (created; must be "
                                                                "empty unless --overwrite).", show_default=False)],
    threshold: Annotated[Optional[float], typer.Option(help="Use this image threshold instead of the model's "
                                                            "calibrated one (masks scale with it).")] = None,
    map_format: Annotated[MapFormat, typer.Option(help="Anomaly map files: npy (raw float32), png (16-bit, "
                                                       "png/65535*2*pixel_threshold = raw) or both.")] = MapFormat.both,
    report: Annotated[bool, typer.Option("--report", help="Also write OUTPUT/report.html (histogram, gallery; "
                                                          "ROC when folders name good/defective).")] = False,
    device: Device = "auto",
    batch_size: BatchSize = 8,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="[ADDRESS]",
        help="Score on Ray: a local one started here, or the cluster at ADDRESS (ray://host:port or host:port). "
             "Resumable: run the same command again after a crash and only the missing images are scored. "
             'Needs pip install "patchcore\\[ray]".')] = None,
    workers: Annotated[Optional[int], typer.Option(help="Ray workers (each loads the model once; default: "
                                                        "one per CPU of the cluster).")] = None,
    skip_unreadable: SkipUnreadable = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Score images: per image the score, normalised score, verdict, anomaly map, heat-map overlay and mask.

    Writes into OUTPUT: summary.csv and summary.json (one row per image), maps/NAME.npy and maps/NAME.png,
    overlays/NAME.png (heat map blended on the image, white outline = defect mask) and masks/NAME.png
    (255 = defect). The normalised score is score / threshold, so the threshold sits at 1.0.
    """
    summary = _run_job(lambda prog: predict_folder(
        model_path, images, output, threshold=threshold, map_format=map_format.value, report=report,
        device=device, batch_size=batch_size, use_ray=ray is not None,
        address=None if ray in (None, "local") else ray, workers=workers, skip_unreadable=skip_unreadable,
        overwrite=overwrite, progress=prog), quiet, json_out)
    if summary is None:
        return
    _print_predictions(summary["images"], summary, output)


def _print_predictions(rows: list[dict[str, Any]], summary: dict[str, Any], output: Path, limit: int = 40) -> None:
    shown = rows if len(rows) <= limit else sorted(rows, key=lambda r: -r["score"])[:limit]
    t = Table(title=None if len(rows) <= limit else f"the {limit} highest scores of {len(rows)}")
    # Names fold rather than being cut: people look them up in OUTPUT; the numbers never wrap.
    t.add_column("image", overflow="fold")
    for col, just in (("score", "right"), ("normalised", "right"), ("verdict", "left"), ("defect area", "right")):
        t.add_column(col, justify=just, no_wrap=True)
    for r in shown:
        style = "bold red" if r["verdict"] == "anomalous" else "green"
        t.add_row(Text(r["name"]), f"{r['score']:.4f}", f"{r['normalized_score']:.3f}",
                  f"[{style}]{r['verdict']}[/]", f"{r['defect_area_fraction']:.2%}")
    out_console.print(t)
    out_console.print(f"{summary['n_images']} images: [bold red]{summary['n_anomalous']} anomalous[/], "
                      f"[green]{summary['n_good']} good[/] at threshold {summary['threshold']:.6g} "
                      f"({escape(summary['threshold_source'])}); results in {escape(str(output))}", markup=True)
    if summary.get("drift_in_words"):
        style = "bold yellow" if summary["drift"]["drifting"] else "dim"
        out_console.print(Text(f"against the calibration: {summary['drift_in_words']}", style=style))


# ------------------------------------------------------------------------------------------ evaluate
@app.command(cls=_Command)
@_handles_errors
def evaluate(
    data: Annotated[Path, typer.Argument(help="An MVTec category folder, a folder layout (good/, defect/, "
                                              "masks/) or an MVTec root holding categories.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for results.json, results.csv "
                                                                          "and report.html.")] = None,
    category: Annotated[Optional[list[str]], typer.Option(help="Only this category (repeatable); default all.")] = None,
    report: Annotated[bool, typer.Option("--report", help="Also write OUTPUT/report.html (needs --output).")] = False,
    target_far: Annotated[float, typer.Option(help="Target false-alarm rate the fit calibrates for; the "
                                                   "table's 'good FAR' checks it on the test set's good images.")
                          ] = 0.01,
    folds: Annotated[int, typer.Option(help="Cross-fitting folds of the calibration (0: no threshold).")] = 5,
    backbone: Backbone = None,
    coreset_ratio: CoresetRatio = 0.1,
    preset: Preset = "full",
    image_size: ImageSize = None,
    scale: Scale = None,
    defect_size: DefectSize = None,
    keep_aspect: KeepAspect = None,
    border_pad: BorderPad = None,
    rotations: Rotations = None,
    num_neighbors: NumNeighbors = 9,
    sigma: Sigma = 4.0,
    seed: Seed = 0,
    device: Device = "auto",
    batch_size: BatchSize = 8,
    backbone_weights: BackboneWeights = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Fit on each category's good training images, score its test set, print image/pixel AUROC, AUPRO, F1."""
    from .evaluate import evaluate as run_evaluation
    from .evaluate import find_categories

    if report and output is None:
        raise CliError("--report needs --output FOLDER to write report.html into")
    if output is not None:
        check_out_parent(output)
        check_out_dir(output, overwrite)
    if not data.exists():
        raise CliError(f"{data}: no such folder")
    params = _model_params(backbone=backbone, coreset_ratio=coreset_ratio, preset=preset, image_size=image_size,
                           scale=scale, defect_size=defect_size, keep_aspect=keep_aspect,
                           num_neighbors=num_neighbors, sigma=sigma, seed=seed, device=device,
                           batch_size=batch_size, target_far=target_far, backbone_weights=backbone_weights,
                           border_pad=border_pad, rotations=rotations, calibration_folds=folds)
    folders = find_categories(data, category)
    sections = []
    merged = None
    with _Progress(not (quiet or json_out)) as prog:
        for folder in folders:
            prog.prefix = f"{folder.name}: " if len(folders) > 1 else ""
            prog.stage("scoring")
            # One category at a time, so only one category's maps are held in memory for the report.
            rep = run_evaluation(data, params, categories=[folder.name], progress=prog, keep_maps=report)
            res = rep.results[0]
            if report:
                sections.append(_evaluation_section(res))
                res.maps = None
            if merged is None:
                merged = rep
            else:
                merged.results.append(res)
                merged.total_seconds += rep.total_seconds
    assert merged is not None
    merged.dataset = str(data)
    if output is not None:
        with results_folder(output, overwrite):
            merged.to_json(output / "results.json", overwrite=True)
            merged.to_csv(output / "results.csv", overwrite=True)
            if report:
                _evaluation_report(output / "report.html", merged, sections)
    if json_out:
        d = merged.to_dict()
        if output is not None:
            d["files"] = {"json": str(output / "results.json"), "csv": str(output / "results.csv")}
            if report:
                d["files"]["report"] = str(output / "report.html")
        _emit_json(d)
    if quiet or json_out:
        return
    out_console.print(_evaluation_table(merged, f"PatchCore on {data}"))
    if output is not None:
        out_console.print(f"results in {output}" + (f" (report: {output / 'report.html'})" if report else ""))


def _evaluation_table(rep, title: str) -> Table:
    """The metrics table, in the first of three layouts that fits the console (80 columns when piped): boxed
    with one-line headers; borderless with headers on two lines; the same without padding. Headers are
    split only where they have a space, and numbers never wrap, rather than rich breaking them anywhere."""
    from .evaluate import COLUMNS

    rows = rep.table_rows()
    layouts = ({}, dict(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True),
               dict(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0)))
    for n, layout in enumerate(layouts):
        t = Table(title=Text(title), title_justify="left", **layout)
        for i, (_, head, _) in enumerate(COLUMNS):
            t.add_column(head.replace(" ", "\n", 1) if n else head, justify="left" if i == 0 else "right",
                         no_wrap=True)
        for j, r in enumerate(rows):
            t.add_row(*["-" if r[k] is None else fmt.format(r[k]) for k, _, fmt in COLUMNS],
                      end_section=(j == len(rows) - 2))
        wide = out_console.options.update_width(10_000)  # the table's natural width, not capped
        if out_console.measure(t, options=wide).maximum <= out_console.width:
            break
    return t


def _evaluation_section(res):
    from .report import build_section

    maps = res.maps

    def get_map(i: int):
        return None if maps is None else maps[i]

    thr = res.image_f1_threshold
    sec = build_section(res.name, res.paths, res.scores, res.labels, thr, "F1-optimal threshold", get_map,
                        pixel_threshold=thr, defect_types=res.defect_types)
    sec.notes.append("threshold: the F1-optimal one on this test set, to show the galleries; the threshold the "
                     "fit calibrated is checked in the table's 'good FAR' column. Overlays are scaled so that the "
                     "F1 threshold is the middle of the colour scale")
    return sec


def _evaluation_report(path: Path, rep, sections) -> None:
    from .evaluate import COLUMNS
    from .report import render_html, write_report

    headers = [h for _, h, _ in COLUMNS] + ["train", "test", "defective"]
    rows = []
    for r, cr in zip(rep.table_rows(), [*rep.results, None]):
        cells = ["-" if r[k] is None else fmt.format(r[k]) for k, _, fmt in COLUMNS]
        cells += ["", "", ""] if cr is None else [cr.n_train, cr.n_test, cr.n_defect]
        rows.append(cells)
    settings = {"dataset": rep.dataset, **rep.params, "preprocessing": rep.preprocessing,
                "pixel region": rep.pixel_region, "date": rep.date, "patchcore": rep.patchcore_version,
                "versions": rep.versions, "total seconds": rep.total_seconds}
    page = render_html("PatchCore evaluation report", f"{len(rep.results)} categor"
                       f"{'y' if len(rep.results) == 1 else 'ies'} of {rep.dataset}", settings, (headers, rows),
                       sections)
    write_report(path, page, overwrite=True)


# ---------------------------------------------------------------------------------------------- info
def _export_info(folder: Path, json_out: bool) -> None:
    """`patchcore info EXPORT_DIR`: what the export's metadata records (no graph is loaded)."""
    from .runtime import read_meta

    meta = read_meta(folder)
    if json_out:
        _emit_json({"export": str(folder), **meta})
        return
    src, cal = meta.get("source_model", {}), meta.get("calibration", {})
    t = Table(title=f"{folder} (export for the torch-free runtime)", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("format", f"patchcore export {meta['format_version']}, written by patchcore "
                        f"{meta.get('patchcore_version')}")
    t.add_row("from model", Text(f"{src.get('path') or '(not recorded)'}"
                                 + (f" (sha256 {src['sha256'][:16]})" if src.get("sha256") else "")))
    t.add_row("backbone", Text(f"{src.get('backbone')} (weights {src.get('backbone_fingerprint')})"))
    size = meta.get("input_size") or ["?", "?"]
    t.add_row("network input", f"{size[0]} x {size[1]} px; memory bank {meta.get('bank_size')} x "
                               f"{meta.get('feature_dim')}")
    t.add_row("threshold", "none" if meta.get("threshold") is None else Text(
        f"{meta['threshold']:.6g} ({describe_threshold(cal, False)})"))
    if cal.get("statement"):
        t.add_row("guarantee", Text(str(cal["statement"])))
    for path, p in meta.get("parity", {}).items():
        t.add_row(f"parity ({path})", f"{p['images']} {p['checked_on']}: scores within {p['score_max_rel_diff']:.1e} "
                                      f"(relative), maps within {p['map_max_diff_of_range']:.1e} of their range")
    out_console.print(t)


@app.command(cls=_Command)
@_handles_errors
def info(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file written by `patchcore fit`, or "
                                                                    "an export folder written by `patchcore export`.",
                                               show_default=False)],
    json_out: JsonOut = False,
) -> None:
    """Show a model file's (or an export's) settings, training summary, threshold and calibration."""
    from .runtime import META_FILE

    if model_path.is_dir() and (model_path / META_FILE).is_file():  # an export folder
        _export_info(model_path, json_out)
        return
    model = _load_model(model_path)
    cal = dict(model.calibration_ or {})
    d = {"model": str(model_path), "size_bytes": model_path.stat().st_size, "params": model.get_params(),
         "fit_info": model.fit_info_, "threshold": model.threshold_, "calibration": cal}
    if json_out:
        _emit_json(d)
        return
    t = Table(title=f"{model_path}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    from .report import input_in_words, settings_in_words

    for label, value in settings_in_words(model.get_params()):
        t.add_row(label, Text(value))
    fi = model.fit_info_
    turns = f" (each also turned: {fi['turns']} views)" if fi.get("turns", 1) > 1 else ""
    t.add_row("fitted on", f"{fi.get('n_images')} images{turns}, memory bank {fi.get('bank_size')} x "
                           f"{fi.get('feature_dim')}, {fi.get('fit_seconds', 0):.1f} s")
    t.add_row("network input", input_in_words(model.preprocessing))
    if model.threshold_ is None:
        t.add_row("threshold", "none (not calibrated: `patchcore predict` needs --threshold)")
    else:
        t.add_row("threshold", Text(f"{model.threshold_:.6g} ({describe_threshold(cal, False)})"))
        if cal.get("statement"):
            t.add_row("guarantee", Text(str(cal["statement"])))
        if "pixel_threshold" in cal:
            t.add_row("pixel threshold", f"{cal['pixel_threshold']:.6g}")
        if "target_far" in cal:
            t.add_row("calibration", Text(f"{cal.get('method')}: {cal.get('rule')}; target false-alarm rate "
                                          f"{_percent(cal['target_far'])}, {cal.get('n')} good images "
                                          f"({cal.get('source')})"))
            far = cal.get("calibration_far", cal.get("holdout_far", 0.0))
            t.add_row("calibration scores", f"mean {cal['mean']:.4g}, std {cal['std']:.3g}, max {cal['max']:.4g}; "
                                            f"{_percent(far)} of them at or above the threshold")
        if cal.get("f1_threshold") is not None:
            t.add_row("F1-optimal threshold", f"{cal['f1_threshold']:.6g} (F1 {cal['f1']:.3f}, "
                                              f"{cal.get('n_defect')} defective images)")
    from .report import left_out_in_words, suspects_in_words

    for label, words in (("left out (looked defective)", left_out_in_words(cal)),
                         ("look defective", suspects_in_words(cal))):
        if words:
            t.add_row(label, Text(words))
    for i, step in enumerate(fi.get("updates", []), 1):
        t.add_row(f"update {i}", f"{step['images']} good images added, {step['bank_added']} patches joined the "
                                 f"bank, {step['seconds']:.1f} s")
    t.add_row("file size", f"{d['size_bytes'] / 1e6:.2f} MB")
    out_console.print(t)


@app.command(cls=_Command)
@_handles_errors
def update(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file written by `patchcore fit` (or an "
                                                                    "earlier update); it is kept as it is.",
                                               show_default=False)],
    images: Annotated[list[Path], typer.Argument(help="New good images: files and/or folders.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The updated model file to write (a new file).",
                                         show_default=False)],
    device: Device = "auto",
    skip_unreadable: SkipUnreadable = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUTPUT (never MODEL).")] = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Add good images to a model without refitting: their patch features join the memory bank by the coreset's
    rule, and the threshold is recalibrated with them (cross-fitted) for the same false-alarm rate."""
    summary = _run_job(lambda prog: update_model(model_path, images, output, device=device,
                                                 skip_unreadable=skip_unreadable, overwrite=overwrite,
                                                 progress=prog), quiet, json_out)
    if summary is None:
        return
    b, a = summary["before"], summary["after"]

    def thr(v: float | None) -> str:
        return "none" if v is None else f"{v:.6g}"

    t = Table(title=f"updated model written: {output} (from {model_path}, kept)", title_justify="left")
    t.add_column("", style="bold")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_row("good images fitted", str(b["n_images"]), str(a["n_images"]))
    t.add_row("memory bank (patches)", str(b["bank_size"]), str(a["bank_size"]))
    t.add_row("calibration images", str(b["n_calibration"]), str(a["n_calibration"]))
    t.add_row("threshold", thr(b["threshold"]), thr(a["threshold"]))
    out_console.print(t)
    rows = [("added", f"{summary['n_added']} of {summary['n_given']} images; {summary['bank_added']} patches "
                      f"joined the bank"),
            ("threshold", summary["threshold_source"]), ("guarantee", summary["guarantee"] or "none"),
            ("time", f"{summary['seconds']:.1f} s")]
    if summary["suspects_in_words"]:
        rows.insert(2, ("look defective", summary["suspects_in_words"]))
    t2 = Table(show_header=False, box=None)
    t2.add_column(style="bold")
    t2.add_column()
    for k, v in rows:
        t2.add_row(k, Text(str(v)))
    out_console.print(t2)


@app.command("versions", cls=_Command)
@_handles_errors
def versions_cmd(
    models_dir: Annotated[Path, typer.Argument(metavar="MODELS_DIR", help="The folder `patchcore serve` serves.",
                                               show_default=False)],
    name: Annotated[str, typer.Argument(help="The model's name (its file stem).", show_default=False)],
    json_out: JsonOut = False,
) -> None:
    """List the versions kept of a served model (the service keeps each one it serves)."""
    from . import versions as v

    kept = v.list_versions(models_dir, name)
    current = v.served_path(models_dir, name) if models_dir.is_dir() else None
    now = v.content_hash(current) if current is not None else None
    rows = [{"version": x.number, "sha256": x.sha256, "recorded_at": x.recorded_at, "source": x.source,
             "in_place": x.sha256 == now} for x in kept]
    if json_out:
        _emit_json({"models_dir": str(models_dir), "name": name, "versions": rows})
        return
    if not rows:
        raise CliError(f"{models_dir}: no versions kept of {name!r} (the service keeps each model it serves)")
    import datetime as dt

    t = Table(title=f"versions of {name}", title_justify="left")
    for col in ("version", "kept since", "sha256", "what", "in place"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["version"]), dt.datetime.fromtimestamp(r["recorded_at"]).strftime("%Y-%m-%d %H:%M:%S"),
                  r["sha256"][:12], r["source"], "yes" if r["in_place"] else "")
    out_console.print(t)


@app.command(cls=_Command)
@_handles_errors
def rollback(
    models_dir: Annotated[Path, typer.Argument(metavar="MODELS_DIR", help="The folder `patchcore serve` serves.",
                                               show_default=False)],
    name: Annotated[str, typer.Argument(help="The model's name (its file stem).", show_default=False)],
    to: Annotated[Optional[int], typer.Option(help="Put back this version (see `patchcore versions`) instead of "
                                                   "the one before the model in place.")] = None,
    quiet: Quiet = False,
) -> None:
    """Put back the previous version of a served model; the service serves it after its next scan."""
    from . import versions as v

    if not models_dir.is_dir():
        raise CliError(f"{models_dir}: no such folder")
    chosen, replaced = v.rollback(models_dir, name, to)
    if not quiet:
        out_console.print(Text(f"{name}: version {chosen.number} put back in place of version {replaced.number} "
                               f"(kept; `patchcore rollback {models_dir} {name} --to {replaced.number}` undoes "
                               f"this)"))


@app.command("export", cls=_Command)
@_handles_errors
def export_cmd(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file written by `patchcore fit`.",
                                               show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="DIR", show_default=False,
                                         help="Folder to write the export to (model.onnx + patchcore.json).")],
    images: Annotated[Optional[list[Path]], typer.Option(
        "--images", metavar="PATH", show_default=False,
        help="Images of the product (files or folders; the first 8 are used) to check the export on; "
             "default: generated images. Repeatable.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export in DIR.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Export a model for the torch-free runtime (ONNX); it must score like the model, or nothing is written."""
    from .export import export

    model = _load_model(model_path)
    files = collect_images(images)[:8] if images else None
    if files:
        check_headers(files)  # export has no --skip-unreadable: the images checked on must all read
    meta = export(model, output, images=files, source=model_path, overwrite=overwrite)
    par = meta["parity"]
    if json_out:
        _emit_json({"export": str(output), **meta})
        return
    t = Table(title=f"{output}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("from", f"{model_path} (sha256 {meta['source_model']['sha256'][:16]})")
    tile = meta.get("tile_input") or meta["input_size"]
    tiled = "" if list(tile) == list(meta["input_size"]) else f", in tiles of {tile[0]}x{tile[1]}"
    t.add_row("graphs", f"{meta['onnx_file']} (network and bank search), {meta['fast_path']['features_file']} + "
                        f"{meta['fast_path']['search_file']} (the runtime's fast path); opset {meta['opset']}, "
                        f"input {meta['input_size'][0]}x{meta['input_size'][1]}{tiled}")
    t.add_row("threshold", "none" if meta["threshold"] is None else f"{meta['threshold']:.6g}")
    for path, p in par.items():
        t.add_row(f"parity ({path})", f"{p['images']} {p['checked_on']}: scores within {p['score_max_rel_diff']:.1e} "
                                      f"(relative), maps within {p['map_max_diff_of_range']:.1e} of their range, "
                                      f"verdicts {'identical' if p['verdicts_identical'] else 'DIFFERENT'}")
    t.add_row("score with", Text(f"from patchcore import runtime; runtime.load({str(output)!r}).predict(images)"))
    out_console.print(t)


@app.command(cls=_Command)
@_handles_errors
def demo(
    folder: Annotated[Path, typer.Argument(help="Folder to create the demo category in (as FOLDER/disc).")],
    seed: Annotated[int, typer.Option(help="Random seed of the generated images.")] = 0,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an earlier demo in FOLDER/disc (nothing else in FOLDER is touched).")] = False,
) -> None:
    """Generate a small synthetic data set in the MVTec layout (machined discs; scratches, dents, chips).

    Try the whole job on it: `patchcore fit FOLDER/disc -o disc.safetensors`, then
    `patchcore predict disc.safetensors FOLDER/disc/test -o predictions --report`.
    """
    from .demo import make_demo

    cat = folder / "disc"
    if folder.exists() and not folder.is_dir():
        raise CliError(f"{folder} exists and is not a folder")
    if cat.is_dir() and any(cat.iterdir()) and not overwrite:
        raise CliError(f"{cat} already exists; choose another folder or pass --overwrite (replaces {cat} only)")
    make_demo(folder, seed=seed, overwrite=overwrite)
    out_console.print(f"wrote {escape(str(cat))} (train/good, test/<type>, ground_truth/<type>)")


# --------------------------------------------------------------------------------------------- serve
@app.command(cls=_Command)
@_handles_errors
def serve(
    models_dir: Annotated[Path, typer.Argument(metavar="MODELS_DIR", help="Folder of model files (.safetensors); "
                                               "each serves under its file stem, and files added or replaced "
                                               "there are picked up while serving.", show_default=False)],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="PATCHCORE_API_KEY", show_envvar=True, show_default=False,
        help="Require this key (X-API-Key header or Authorization: Bearer) on every endpoint but the health "
             "checks, the page and the docs.")] = None,
    concurrency: Annotated[int, typer.Option(help="Images scored at the same time (threads).")] = 1,
    queue: Annotated[int, typer.Option(help="Requests that may wait for a scorer; more get 503 with "
                                            "Retry-After.")] = 8,
    max_batch: Annotated[int, typer.Option(help="Requests for one model waiting together are scored in one "
                                                "batch of at most this many (1: one at a time).")] = 8,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted (413 beyond).")] = 20.0,
    max_megapixels: Annotated[float, typer.Option(help="Largest image accepted, read from its header before "
                                                       "decoding (422 beyond).")] = 25.0,
    reload_interval: Annotated[float, typer.Option(help="Seconds between looks at MODELS_DIR for new or "
                                                        "replaced model files.")] = 2.0,
    device: Device = "auto",
    log_level: Annotated[str, typer.Option(help="uvicorn's log level: debug, info, warning, error.")] = "info",
    feedback_images: Annotated[int, typer.Option(
        help="Recent uploads held (at most 256 MB of them) for the operator's verdict, POST "
             "/v1/models/NAME:feedback with the prediction's id (0: none held).")] = 256,
    keep_versions: Annotated[int, typer.Option(
        help="Versions kept of every model served, in MODELS_DIR/.versions (0: none; `patchcore rollback` "
             "needs them).")] = 10,
    threads: Annotated[Optional[int], typer.Option(
        help="Threads each scorer's network uses (torch, onnxruntime, BLAS); default 1, or PATCHCORE_THREADS. "
             "One thread a scorer kept latency steady beside other work (docs/benchmarks.md, section 15); "
             "raise it on a machine that does nothing else.")] = None,
) -> None:
    """Serve every model of MODELS_DIR over HTTP, with a web page to try them (FastAPI on uvicorn).

    POST /v1/models/NAME:predict with an image (multipart field 'image', or the raw body) answers the score,
    normalised score, verdict and threshold, as `patchcore predict` would; GET / is the web page, /docs the
    API reference, /metrics Prometheus metrics, /healthz and /readyz the health checks.
    POST /v1/models/NAME:feedback takes the operator's verdict on a prediction (its id and the true label);
    POST /v1/models/NAME:apply-feedback adds the images called good to the model and serves the update. Every
    model served is kept as a version (`patchcore rollback MODELS_DIR NAME` goes back one).
    """
    import os

    from .core.threads import POOL_VARIABLES, decide

    if threads is not None and threads < 1:
        raise CliError(f"--threads must be at least 1, got {threads}")
    # Before anything starts torch or onnxruntime: the pools read it when they start; --threads wins over all.
    if threads is not None:
        for var in ("PATCHCORE_THREADS", *POOL_VARIABLES):
            os.environ[var] = str(threads)
    decide(1)
    from .service import ServiceSettings
    from .service import serve as run_service

    if not 0 < port < 65536:
        raise CliError(f"--port must be between 1 and 65535, got {port}")
    if models_dir.exists() and not models_dir.is_dir():
        raise CliError(f"{models_dir} is a file; give the folder that holds the model files")
    settings = ServiceSettings(models_dir=models_dir, api_key=api_key or None,
                               max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                               max_pixels=int(max_megapixels * 1e6), concurrency=concurrency, queue_size=queue,
                               max_batch=max_batch, reload_interval=reload_interval, device=device,
                               feedback_images=feedback_images, keep_versions=keep_versions)
    settings.check()
    from .registry import kind_of, served_paths

    paths = list(served_paths(models_dir).values())
    found = [f"{p.name} ({kind_of(p)})" for p in paths]
    n_exports = sum(kind_of(p) == "export" for p in paths)
    err_console.print(f"serving {len(paths) - n_exports} model file(s) and {n_exports} export(s) from "
                      f"{escape(str(models_dir))}"
                      f"{': ' + escape(', '.join(found)) if found else ' (none yet: add some, they are picked up)'}"
                      f"; page http://{host}:{port}/ , API reference http://{host}:{port}/docs", soft_wrap=True)
    if settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"warning: listening on {escape(host)} without --api-key: whoever reaches this machine "
                          f"can use the service", style="yellow", soft_wrap=True)
    run_service(settings, host=host, port=port, log_level=log_level)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``patchcore``) and ``python -m patchcore``."""
    # OMP_WAIT_POLICY=PASSIVE is already set by importing patchcore (see __init__.py), before torch loads.
    app(args=list(sys.argv[1:] if argv is None else argv), prog_name="patchcore")


if __name__ == "__main__":
    main()
