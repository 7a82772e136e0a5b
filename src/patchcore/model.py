"""The PatchCore estimator: fit on good images, predict a score and an anomaly map per image, save, load."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .backbones import NORMALIZATIONS, LayerTaps, fingerprint, get_backbone, load_backbone
from .coreset import (CellRunner, cell_coreset, coreset_size, kmeans_cells, lazy_greedy, random_projection, select,
                      shard_coresets)
from .errors import ModelFileError, NotFittedError, PatchCoreError
from .features import crop_border, patch_features
from .images import PRESETS, ImagesLike, Item, Preprocessing, as_items, iter_loaded
from .scoring import MemoryBank, reweighted_score, smooth
from .prediction import Prediction
from .thresholds import Calibration, calibrate, calibrate_scores

# Most features selected exactly in one piece; above that, k-means cells of about a quarter of it (8,192
# features) are selected together. Chosen on screw x 800 (docs/scaling.md): 8k cells fit in 152 s with image
# AUROC 0.947 (exact 0.946); 16k cells cover a little better (radius 15.17 vs 15.29) but took 241 s.
SHARD_FEATURES = 32768
SHARD_BY = ("features", "images")

FORMAT = "patchcore"
FORMAT_VERSION = 2  # 2: normalization and border_pad are settings (format 1 had neither)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total); stages: "features", "coreset", "scoring"."""


@dataclass
class _Fitted:
    bank: np.ndarray
    fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)


def _same(a: Any, b: Any) -> bool:
    """Equal numeric lists (nested or not) up to float rounding; False for other shapes or for None."""
    if b is None:
        return False
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return x.shape == y.shape and bool(np.allclose(x, y))


def shard_fold_banks(parts: list[np.ndarray], shard_folds: list[int], folds: int) -> list[np.ndarray]:
    """Each calibration fold's bank when the coreset was selected in shards of whole images inside the folds
    (``parts[i]``: shard i's coreset, of fold ``shard_folds[i]``): the other folds' shard coresets."""
    return [np.concatenate([p for p, f in zip(parts, shard_folds) if f != j]) for j in range(folds)]


# What each preset chooses beyond its preprocessing (images.PRESETS: resize, crop); an explicit constructor
# argument wins. "paper" reproduces the paper's protocol, whose code pads nothing; see docs/benchmarks.md for
# how "full" (the default) and "accurate" were chosen.
PRESET_SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"backbone": "efficientnet_lite0", "border_pad": 16, "rotations": ()},
    "paper": {"backbone": "efficientnet_lite0", "border_pad": 0, "rotations": ()},
    "accurate": {"backbone": "efficientnet_lite0", "border_pad": 16, "rotations": (90, 180)},
}
ROTATIONS = (90, 180, 270)


class PatchCore:
    """PatchCore (Roth et al., CVPR 2022) as an estimator: configuration in the constructor, state from fit.

    Parameters
    ----------
    backbone: a name from :data:`patchcore.backbones.BACKBONES` (``efficientnet_lite0`` works offline;
        ``wide_resnet50_2`` is the paper's and downloads torchvision's weights on first use), or several
        joined by "+", whose patch features are concatenated (an ensemble); default: the preset's.
    layers: module names to tap; default: the backbone's two (stride 8 and 16, the paper's layer 2 + 3).
    preset: ``"full"`` scores the whole image resized to 288 (default, nothing at the border is lost);
        ``"accurate"`` also fits the good images turned 90 and 180 degrees (``rotations``), for about twice
        the time per image (docs/benchmarks.md, section 13);
        ``"paper"`` resizes to 256 and centre-crops 224 without border padding, as the paper's table was made.
    image_size: side the image is resized to (overrides the preset's); crop_size: side of the centre crop.
    target_dim: patch feature width; wider features are reduced to it by adaptive average pooling.
    coreset_ratio: fraction of patch features kept in the memory bank (1.0 keeps all).
    projection_dim: width of the random projection the coreset is selected on.
    num_neighbors: b of the paper's Eq. 7 image-score reweighting (1 turns it off).
    sigma: Gaussian smoothing of the anomaly map, in input pixels.
    seed: makes projection and coreset start, hence the whole model, deterministic.
    device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    batch_size: images per forward pass.
    storage_dtype: ``"float32"`` or ``"float16"`` for the patch features held while fitting.
    backbone_weights: a local weights file to use instead of the registry's.
    normalization: input normalisation, ``"auto"`` (the one the backbone's weights were trained with, from the
        registry), ``"imagenet"`` or ``"tf"``.
    border_pad: pixels of reflection padding added around the network input; the tapped maps' cells of the
        padding are cut away before the neighbourhood aggregation, so the network computes border features
        from image-like context instead of its own zero padding (a multiple of the deepest tapped layer's
        stride, 16; 0 turns it off; default: the preset's, 16, or 0 for "paper"). Measured: docs/benchmarks.md.
    rotations: quarter turns (degrees: 90, 180, 270) of every good image whose patch features join the memory
        bank too, so the bank covers parts seen at other angles than the good images show; costs fit time and
        time per image in proportion to the bank (default: the preset's; ``"accurate"`` turns 90 and 180).
        Only fitting uses them: new images are scored as they come, and the cross-fitted calibration keeps an
        image's turns in its fold, so no held-out image is scored against its own turned copy.
    target_far: the false-alarm rate on good images that the threshold is calibrated for (see thresholds).
    calibration_folds: k of the k-fold cross-fitting that gives every good image of the fit a calibration
        score (0 or 1: fit without a threshold; calibrate later with :meth:`calibrate`).
    shard_features: most patch features whose coreset is selected exactly, in one piece. Exact greedy
        selection costs time quadratic in the features; above this the selection is split (``shard_by``), which
        keeps fit time about linear in the number of images (docs/scaling.md). None: always one exact selection.
    shard_by: how a larger selection is split. ``"features"`` (default): into k-means cells of the feature
        space of about ``shard_features / 4`` features, whose greedy loops lower one shared coverage radius
        together (:func:`patchcore.coreset.cell_coreset`; close to the exact selection). ``"images"``: into
        shards of whole images inside the calibration folds, each selecting ``coreset_ratio`` of its own
        features; only the shards' coresets need to travel between machines, but it covers less well.
    cell_exchange: with ``shard_by="features"``, the cells of the model's bank hear of each other's centres, so
        that budget is not spent twice near their borders: coverage radius within 0.3 % of the exact
        selection's instead of 5 %, for about twice that selection's time (docs/scaling.md, section 4). The
        calibration folds' banks are selected without it (their looser cover errs towards fewer false alarms).
        Off by default: it did not raise the AUROCs (screw's image AUROC was 0.008 lower with seed 0).
    exact_bank: the model's own bank is the exact greedy selection even when the selection is split (the
        calibration folds' banks still use ``shard_by``): :func:`patchcore.coreset.lazy_greedy` selects
        exactly what one unsplit greedy loop would, on one core of the machine that selects (the driver with
        ``fit --ray``), in about 5x the time of the cells (screw x 800: 42 s against 8.5 s; docs/scaling.md).
    n_jobs: cells or shards selected, and calibration folds scored, at a time (threads; default one per CPU).
    calibration_max_images: most good images the cross-fit scores (drawn evenly from the folds; None: all).
        Scoring an image costs time in proportion to the bank, which grows with the images, so scoring all
        of them would make fit time quadratic; 256 scores still resolve a 1 % false-alarm rate (99 needed).
    """

    def __init__(self, backbone: str | None = None, layers: tuple[str, ...] | None = None,
                 preset: str = "full", image_size: int | None = None, crop_size: int | None = None,
                 target_dim: int = 1024, coreset_ratio: float = 0.1, projection_dim: int = 128,
                 num_neighbors: int = 9, sigma: float = 4.0, seed: int = 0, device: str = "auto",
                 batch_size: int = 8, storage_dtype: str = "float32",
                 backbone_weights: str | os.PathLike | None = None, normalization: str = "auto",
                 border_pad: int | None = None, rotations: tuple[int, ...] | None = None,
                 target_far: float = 0.01, calibration_folds: int = 5,
                 shard_features: int | None = SHARD_FEATURES, shard_by: str = "features",
                 cell_exchange: bool = False, exact_bank: bool = False, n_jobs: int | None = None,
                 calibration_max_images: int | None = 256) -> None:
        self.backbone = backbone
        self.layers = layers
        self.preset = preset
        self.image_size = image_size
        self.crop_size = crop_size
        self.target_dim = target_dim
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.num_neighbors = num_neighbors
        self.sigma = sigma
        self.seed = seed
        self.device = device
        self.batch_size = batch_size
        self.storage_dtype = storage_dtype
        self.backbone_weights = backbone_weights
        self.normalization = normalization
        self.border_pad = border_pad
        self.rotations = rotations
        self.target_far = target_far
        self.calibration_folds = calibration_folds
        self.shard_features = shard_features
        self.shard_by = shard_by
        self.cell_exchange = cell_exchange
        self.exact_bank = exact_bank
        self.n_jobs = n_jobs
        self.calibration_max_images = calibration_max_images
        self._fitted: _Fitted | None = None
        self._net: tuple[list[tuple[LayerTaps, torch.Tensor, torch.Tensor]], str] | None = None
        self._bank: MemoryBank | None = None
        self.threshold_: float | None = None
        self.calibration_: dict[str, Any] = {}
        self._check_params()

    # ----------------------------------------------------------------------------------------- config
    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, as scikit-learn estimators report them."""
        return {k: getattr(self, k) for k in (
            "backbone", "layers", "preset", "image_size", "crop_size", "target_dim", "coreset_ratio",
            "projection_dim", "num_neighbors", "sigma", "seed", "device", "batch_size", "storage_dtype",
            "backbone_weights", "normalization", "border_pad", "rotations", "target_far", "calibration_folds",
            "shard_features", "shard_by", "cell_exchange", "exact_bank", "n_jobs", "calibration_max_images")}

    def _setting(self, name: str) -> Any:
        """A setting a preset can choose: the constructor's value, or the preset's where that is None."""
        value = getattr(self, name)
        return PRESET_SETTINGS[self.preset][name] if value is None else value

    def _check_params(self) -> None:
        if self.preset not in PRESETS:
            raise PatchCoreError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        for m in self.members:
            get_backbone(m)
        if len(self.members) > 1 and (self.layers or self.backbone_weights is not None):
            raise PatchCoreError("layers and backbone_weights apply to a single backbone, not to an ensemble")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise PatchCoreError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.storage_dtype not in ("float32", "float16"):
            raise PatchCoreError(f"storage_dtype must be float32 or float16, got {self.storage_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise PatchCoreError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not 0.0 < float(self.target_far) < 1.0:
            raise PatchCoreError(f"target_far must be in (0, 1), got {self.target_far}")
        if int(self.calibration_folds) < 0:
            raise PatchCoreError(f"calibration_folds must be 0 or more (below 2: no calibration in fit), "
                                 f"got {self.calibration_folds}")
        if self.shard_features is not None and int(self.shard_features) < 1:
            raise PatchCoreError(f"shard_features must be at least 1 (or None), got {self.shard_features}")
        if self.shard_by not in SHARD_BY:
            raise PatchCoreError(f"shard_by must be one of {', '.join(SHARD_BY)}, got {self.shard_by!r}")
        if self.exact_bank and (self.shard_by != "features" or self.cell_exchange):
            raise PatchCoreError("exact_bank selects the model's bank from every feature in one place: it goes "
                                 "with shard_by='features' and without cell_exchange")
        if self.calibration_max_images is not None and int(self.calibration_max_images) < 2:
            raise PatchCoreError(f"calibration_max_images must be at least 2 (or None), got "
                                 f"{self.calibration_max_images}")
        if self.n_jobs is not None and int(self.n_jobs) < 1:
            raise PatchCoreError(f"n_jobs must be at least 1 (or None), got {self.n_jobs}")
        for name in ("target_dim", "projection_dim", "num_neighbors", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise PatchCoreError(f"{name} must be at least 1")
        given = str(self.normalization).split("+")
        if any(g != "auto" and g not in NORMALIZATIONS for g in given) or len(given) not in (1, len(self.members)):
            raise PatchCoreError(f"unknown normalization {self.normalization!r}; known: auto, "
                                 f"{', '.join(NORMALIZATIONS)} (one, or one per ensemble member joined by '+')")
        if int(self._setting("border_pad")) < 0 or int(self._setting("border_pad")) % 16:
            raise PatchCoreError(f"border_pad must be a non-negative multiple of 16 pixels (the deepest tapped "
                                 f"layer's stride), got {self.border_pad}")
        for name in ("image_size", "crop_size"):
            v = getattr(self, name)
            if v is not None and int(v) < 32:
                raise PatchCoreError(f"{name} must be at least 32 pixels")
        p = self.preprocessing
        if p.crop is not None and (p.crop[0] > p.resize[0] or p.crop[1] > p.resize[1]):
            raise PatchCoreError(f"crop {p.crop} is larger than the resized image {p.resize}")
        rot = self._setting("rotations")
        if (isinstance(rot, (str, bytes)) or not all(isinstance(r, (int, np.integer)) and r in ROTATIONS for r in rot)
                or len(set(rot)) != len(rot)):
            raise PatchCoreError(f"rotations must be distinct quarter turns among {', '.join(map(str, ROTATIONS))} "
                                 f"(degrees), got {self.rotations!r}")
        if rot and p.input_size[0] != p.input_size[1]:
            raise PatchCoreError(f"rotations need a square network input, got {p.input_size}")

    @property
    def turns(self) -> tuple[int, ...]:
        """The quarter turns each good image is fitted at (0 first: the image as it comes)."""
        return (0,) + tuple(int(r) // 90 for r in self._setting("rotations"))

    @property
    def preprocessing(self) -> Preprocessing:
        base = PRESETS[self.preset]
        resize = (self.image_size,) * 2 if self.image_size else base.resize
        crop = (self.crop_size,) * 2 if self.crop_size else base.crop
        return Preprocessing(resize=tuple(resize), crop=tuple(crop) if crop else None)

    @property
    def members(self) -> list[str]:
        """The backbones whose patch features are concatenated: ``"a+b"`` is an ensemble of a and b."""
        return str(self._setting("backbone")).split("+")

    @property
    def normalization_names(self) -> list[str]:
        """The input normalisation of each member: ``normalization`` (one name for all, or one per member
        joined by "+"), or each backbone's own where it is "auto"."""
        given = str(self.normalization).split("+")
        if len(given) == 1:
            given = given * len(self.members)
        return [get_backbone(m).normalization if g == "auto" else g for m, g in zip(self.members, given)]

    @property
    def normalization_name(self) -> str:
        """The input normalisation in force, resolved ("+"-joined for an ensemble of different ones)."""
        names = self.normalization_names
        return names[0] if len(set(names)) == 1 else "+".join(names)

    def _input_stats(self) -> tuple[list, list]:
        """The mean and std the network input is normalised with, as the model file records them
        (one RGB triple each; for an ensemble, one per member)."""
        stats = [NORMALIZATIONS[n] for n in self.normalization_names]
        if len(stats) == 1:
            return list(stats[0][0]), list(stats[0][1])
        return [list(m) for m, _ in stats], [list(s) for _, s in stats]

    @property
    def tapped_layers(self) -> tuple[str, ...]:
        if len(self.members) > 1:
            return tuple(f"{m}:{layer}" for m in self.members for layer in get_backbone(m).layers)
        return tuple(self.layers) if self.layers else get_backbone(self.members[0]).layers

    def _device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    # ---------------------------------------------------------------------------------------- network
    def _network(self) -> tuple[list[tuple[LayerTaps, torch.Tensor, torch.Tensor]], str]:
        """Each member's (taps, mean, std) on the device, and the weights' fingerprint ("+"-joined)."""
        if self._net is None:
            dev = self._device()
            members, fps = [], []
            for name, norm in zip(self.members, self.normalization_names):
                mean, std = NORMALIZATIONS[norm]
                model = load_backbone(name, self.backbone_weights)
                fps.append(fingerprint(model))
                members.append((LayerTaps(model, self.tapped_layers if len(self.members) == 1
                                          else get_backbone(name).layers).to(dev),
                                torch.tensor(mean, device=dev).view(1, 3, 1, 1),
                                torch.tensor(std, device=dev).view(1, 3, 1, 1)))
            fp = "+".join(fps)
            if self._fitted is not None and self._fitted.fingerprint != fp:
                raise ModelFileError(
                    f"this model was fitted with other {self._setting('backbone')} weights (fingerprint "
                    f"{self._fitted.fingerprint}) than the ones loaded now ({fp}); pass the same backbone weights")
            self._net = (members, fp)
        return self._net

    def _batches(self, items: list[Item], skip_unreadable: bool, skipped: list[tuple[str, str]],
                 turns: tuple[int, ...] | None = None
                 ) -> Iterator[tuple[list[Item], list[np.ndarray], torch.Tensor]]:
        """Patch features (N, h, w, D) of consecutive batches, with the items and their RGB arrays; with
        ``turns`` (quarter turns), (N, len(turns), h, w, D): the features of the network input turned so."""
        members, _ = self._network()
        pre = self.preprocessing
        pad = int(self._setting("border_pad"))
        batch: list[tuple[Item, np.ndarray]] = []

        def features(x0: torch.Tensor) -> torch.Tensor:
            feats = []
            with torch.inference_mode():
                for taps, mean, std in members:
                    x = (x0.to(mean.device) - mean) / std
                    if pad:
                        x = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
                    fmaps = [crop_border(f, pad, x.shape[-2:]) for f in taps(x)]
                    feats.append(patch_features(fmaps, self.target_dim).cpu())
            return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

        def run(batch):
            imgs = [a for _, a in batch]
            x0 = pre(imgs)
            feats = features(x0) if turns is None else torch.stack(
                [features(torch.rot90(x0, k, dims=(2, 3)) if k else x0) for k in turns], dim=1)
            return [it for it, _ in batch], imgs, feats

        for pair in iter_loaded(items, skip_unreadable, skipped):
            batch.append(pair)
            if len(batch) == self.batch_size:
                yield run(batch)
                batch = []
        if batch:
            yield run(batch)

    # -------------------------------------------------------------------------------------------- fit
    def fit(self, images: ImagesLike, skip_unreadable: bool = False, progress: Progress | None = None) -> PatchCore:
        """Build the memory bank from good images (a folder, a list of paths or arrays, or an N x H x W x C
        array) and, with ``calibration_folds`` >= 2, calibrate the threshold on all of them, cross-fitted.

        Cross-fitting scores each good image with a bank built, the same way, from the other folds' images,
        so every good image gives one honest calibration score (a model scores its own training images too
        low); the model's own bank still uses every image. An unreadable image is an error, unless
        ``skip_unreadable``; then it is left out and listed in ``skipped_``. Returns self.
        """
        self._check_params()
        items = as_items(images)
        self.skipped_: list[tuple[str, str]] = []
        t0 = time.perf_counter()
        feats, sizes = self._extract(items, skip_unreadable, progress, turned=True)
        t1 = time.perf_counter()
        n_img, n_turns, h, w, d = feats.shape
        folds = min(int(self.calibration_folds), n_img)
        bank, fold_banks, n_parts = self._select_banks(feats, progress)
        t2 = time.perf_counter()
        # New images are scored as they come, so the calibration scores the images unturned.
        cross = self._cross_fit(feats[:, 0], sizes, fold_banks, progress) if folds >= 2 else None
        return self._assemble(bank, {
            "n_images": n_img, "n_features": n_img * n_turns * h * w, "feature_dim": int(d), "grid": [h, w],
            "turns": n_turns,
            "extract_seconds": t1 - t0, "shards": n_parts, "shard_by": self.shard_by,
            "coreset_seconds": t2 - t1,
            "skipped": len(self.skipped_)}, cross, folds, t0, t2)

    def _select_banks(self, feats: torch.Tensor, progress: Progress | None, runner: CellRunner | None = None
                      ) -> tuple[np.ndarray, list[np.ndarray], int]:
        """The memory bank of patch features ``feats`` (N, T, h, w, D: each image at each of its ``turns``),
        each calibration fold's bank (none when not cross-fitted) and how many parts the selection was split
        into. An image's turns go with it, into the same shard and calibration fold. Also used by
        :func:`patchcore.distributed.fit_on_ray`, whose workers extract the features and, through ``runner``
        (see :func:`patchcore.coreset.cell_coreset`), run the cells."""
        n_img, n_turns, h, w, d = feats.shape
        folds = min(int(self.calibration_folds), n_img)
        flat = feats.reshape(-1, d)
        per_image = n_turns * h * w

        def rows(imgs: np.ndarray) -> torch.Tensor:  # the images' rows of ``flat``, all their turns
            return torch.from_numpy((imgs[:, None] * per_image + np.arange(per_image)).ravel())

        if self.shard_by == "images" and self._split(n_img * per_image):
            shards = self.plan_shards(n_img, per_image)
            shard_rows = [rows(imgs) for imgs, _ in shards]
            picks = self._select_shards([flat.index_select(0, r) for r in shard_rows], progress)
            parts = [flat.index_select(0, r[p]).float().numpy() for r, p in zip(shard_rows, picks)]
            fold_banks = shard_fold_banks(parts, [f for _, f in shards], folds) if folds >= 2 else []
            return np.concatenate(parts), fold_banks, len(shards)
        # Each fold's calibration bank is selected the same way from the other folds' images, so the
        # cross-fit scores images as the fitted model will score new ones.
        sets = [np.arange(n_img)] + ([np.setdiff1d(np.arange(n_img), held)
                                      for held in self.calibration_split(n_img, folds)[0]] if folds >= 2 else [])
        wanted = [self._n_keep(len(imgs) * per_image) for imgs in sets]
        banks = []
        for k, imgs in enumerate(sets):
            x = flat if k == 0 else flat.index_select(0, rows(imgs))
            done = sum(wanted[:k])  # one "coreset" bar over the model's selection and the folds' ones
            report = (lambda i, n, done=done: progress("coreset", done + i, sum(wanted))) if progress else None
            # Only the model's own bank exchanges centres between cells (cell_exchange): the folds' banks
            # cover 4-5 % less tightly, so the calibration errs on the side of fewer false alarms (800
            # images at 288 px: 13 s more than without it, against 91 s with it in all six selections).
            picks = self._coreset(x, report, runner, exchange=self.cell_exchange and k == 0,
                                  exact=self.exact_bank and k == 0)
            banks.append(x.index_select(0, picks).float().numpy())
            del x
        return banks[0], banks[1:], self._n_cells(n_img * per_image)

    def _assemble(self, bank: np.ndarray, info: dict[str, Any], cross: tuple[list[float], list[float]] | None,
                  folds: int, t0: float, t2: float) -> PatchCore:
        """Set the fitted state from the bank and, when cross-fitted, the calibration scores (also used by
        :func:`patchcore.distributed.fit_on_ray`, which computes both on workers)."""
        self._fitted = _Fitted(bank=bank, fingerprint=self._network()[1], info={
            **info, "bank_size": int(bank.shape[0]), "fit_seconds": t2 - t0})
        self._bank = None
        self.threshold_, self.calibration_ = None, {}
        if cross is not None:
            scores, maxima = cross
            cal = calibrate_scores(scores, self.target_far, map_maxima=maxima,
                                   source=f"{folds}-fold cross-fit on {len(scores)} of the {info['n_images']} "
                                          f"fitted images")
            cal.extra.update(folds=folds)
            cal.apply(self)
            self._fitted.info["calibration_seconds"] = time.perf_counter() - t2
            self._fitted.info["fit_seconds"] = time.perf_counter() - t0
        return self

    def _split(self, n_features: int) -> bool:
        """Whether a selection from ``n_features`` features is split (see ``shard_features``)."""
        return self.shard_features is not None and n_features > int(self.shard_features)

    def _n_keep(self, n_features: int) -> int:
        return coreset_size(n_features, self.coreset_ratio)

    def _check_keep(self, n_keep: int) -> None:
        if n_keep < self.num_neighbors:
            raise PatchCoreError(
                f"the coreset would hold {n_keep} features, fewer than num_neighbors={self.num_neighbors}: "
                f"use more good images or a larger coreset_ratio")

    def _n_cells(self, n_features: int) -> int:
        """k-means cells for a split selection from ``n_features`` features (1: not split)."""
        if not self._split(n_features):
            return 1
        return max(1, min(self._n_keep(n_features), -(-n_features // max(1, int(self.shard_features) // 4))))

    def _coreset(self, x: torch.Tensor, progress: Callable[[int, int], None] | None = None,
                 runner: CellRunner | None = None, exchange: bool = False, exact: bool = False) -> torch.Tensor:
        """Indices of the coreset of patch features ``x`` (N, D): exact greedy selection up to
        ``shard_features`` features, greedy selection in k-means cells of the feature space above (or, with
        ``exact``, still the exact one, computed lazily)."""
        n_keep = self._n_keep(len(x))
        self._check_keep(n_keep)
        if n_keep >= len(x):
            return torch.arange(len(x))
        cells = self._n_cells(len(x))
        if cells == 1:
            return select(x, self.coreset_ratio, self.projection_dim, self.seed, progress=progress)
        z = random_projection(x, self.projection_dim, self.seed)
        if exact:
            return lazy_greedy(z, n_keep, self.seed, progress)
        labels, centroids = kmeans_cells(z, cells, self.seed)
        return cell_coreset(z, n_keep, labels, self.seed, self.n_jobs, progress, runner,
                            centroids if exchange else None)

    def plan_shards(self, n_images: int, per_image: int) -> list[tuple[np.ndarray, int]]:
        """How ``fit`` splits ``n_images`` good images of ``per_image`` patch features each for the coreset:
        (image indices, calibration fold) per shard. One shard (fold -1) when they fit in ``shard_features``;
        otherwise each calibration fold (drawn by seed, as the cross-fit draws them) is cut into equal shards,
        so a fold's calibration bank is the other folds' shard coresets."""
        limit = self.shard_features
        if limit is None or n_images * per_image <= int(limit):
            return [(np.arange(n_images), -1)]
        folds = min(int(self.calibration_folds), n_images)
        folds = folds if folds >= 2 else 1
        per_fold = -(-n_images * per_image // (int(limit) * folds))  # shards per fold
        order = np.random.default_rng(self.seed).permutation(n_images)
        return [(np.sort(part), j) for j, held in enumerate(np.array_split(order, folds))
                for part in np.array_split(held, min(per_fold, len(held)))]

    def _extract(self, items: list[Item], skip_unreadable: bool, progress: Progress | None, turned: bool = False
                 ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Patch features (N, h, w, D) of all readable items, in ``storage_dtype``, and their (H, W) sizes;
        ``turned``: (N, T, h, w, D), the features of each of the model's ``turns`` (the image itself first)."""
        chunks, sizes = [], []
        dtype = torch.float16 if self.storage_dtype == "float16" else torch.float32
        for _, imgs, feats in self._batches(items, skip_unreadable, self.skipped_, self.turns if turned else None):
            chunks.append(feats.to(dtype))
            sizes += [a.shape[:2] for a in imgs]
            if progress:
                progress("features", len(sizes), len(items))
        if not chunks:
            raise PatchCoreError("no readable good images to fit on")
        return torch.cat(chunks), sizes

    def _select_shards(self, shards: list[torch.Tensor], progress: Progress | None) -> list[torch.Tensor]:
        """Each shard's coreset (indices into the shard), ``coreset_ratio`` of its features."""
        self._check_keep(sum(self._n_keep(len(x)) for x in shards))
        return shard_coresets(shards, self.coreset_ratio, self.projection_dim, self.seed, self.n_jobs,
                              progress=(lambda i, n: progress("coreset", i, n)) if progress else None)

    def _cross_fit(self, feats: torch.Tensor, sizes: list[tuple[int, int]], fold_banks: list[np.ndarray],
                   progress: Progress | None) -> tuple[list[float], list[float]]:
        """Scores and map maxima of (at most ``calibration_max_images``, drawn evenly from the folds) images,
        each against ``fold_banks[j]``, the bank selected without its fold j (folds drawn by seed). Folds are
        scored ``n_jobs`` at a time."""
        folds = len(fold_banks)
        _, scored_of = self.calibration_split(feats.shape[0], folds)
        done = [0]

        def one(j: int) -> list[tuple[float, float]]:
            scored = scored_of[j]
            out = [(score, float(amap.max())) for score, amap in self._score(
                MemoryBank(fold_banks[j]), feats[torch.from_numpy(scored)].float(), [sizes[i] for i in scored])]
            done[0] += 1
            if progress:
                progress("calibration", done[0], folds)
            return out

        jobs = max(1, min(folds, self.n_jobs or os.cpu_count() or 1))
        if jobs == 1:
            results = [one(j) for j in range(folds)]
        else:
            with ThreadPoolExecutor(jobs) as pool:
                results = list(pool.map(one, range(folds)))
        pairs = [pair for fold in results for pair in fold]
        return [a for a, _ in pairs], [b for _, b in pairs]

    def calibration_split(self, n_images: int, folds: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The cross-fit's folds (drawn by seed) and, per fold, the images it scores: a prefix of the fold in
        its random order, the same share of every fold, at most ``calibration_max_images`` in all."""
        order = np.random.default_rng(self.seed).permutation(n_images)
        cap = n_images if self.calibration_max_images is None else min(n_images, int(self.calibration_max_images))
        splits = np.array_split(order, folds)
        return splits, [held[:max(1, round(len(held) * cap / n_images))] for held in splits]

    def _score(self, bank: MemoryBank, feats: torch.Tensor, sizes: list[tuple[int, int]]
               ) -> Iterator[tuple[float, np.ndarray]]:
        """(image score, anomaly map at the image's own size) for each image's (h, w, D) patch features."""
        n, h, w, d = feats.shape
        pre = self.preprocessing
        flat = feats.reshape(-1, d).numpy()
        dist, nn = bank.nearest(flat)
        dist, nn = dist.reshape(n, h * w), nn.reshape(n, h * w)
        for i in range(n):
            j = int(dist[i].argmax())
            score = reweighted_score(bank, flat[i * h * w + j], float(dist[i, j]), int(nn[i, j]),
                                     self.num_neighbors)
            grid = torch.from_numpy(dist[i].reshape(1, 1, h, w))
            up = torch.nn.functional.interpolate(grid, size=pre.input_size, mode="bilinear", align_corners=False)
            yield score, pre.to_image(smooth(up[0, 0], self.sigma), sizes[i]).astype(np.float32)

    def calibrate(self, good_images: ImagesLike | None = None, target_far: float | None = None,
                  method: str = "conformal", defect_images: ImagesLike | None = None, threshold_from: str = "far",
                  skip_unreadable: bool = False, progress: Progress | None = None) -> Calibration:
        """Set the threshold for a target false-alarm rate (default: ``target_far``) and return how.

        ``good_images``: good images the bank was not built from, ideally from the production camera;
        None re-uses the stored calibration scores (the fit's cross-fitted ones, or those of the last call
        with images), to change the target without refitting.
        ``defect_images`` (optional) add the F1-optimal threshold; ``threshold_from="f1"`` makes it the one used.
        """
        far = self.target_far if target_far is None else target_far
        if good_images is not None:
            return calibrate(self, good_images, far, method, defect_images, threshold_from,
                             source="good images given to calibrate()", skip_unreadable=skip_unreadable,
                             progress=progress)
        prev = self.calibration_ or {}
        self.skipped_ = []  # what this call skipped (only defect images can be)
        if not prev.get("scores"):
            raise PatchCoreError("no cross-fitted scores to recalibrate from: fit with calibration_folds >= 2, "
                                 "or pass good images the model was not fitted on")
        defects = None if defect_images is None else [
            p.score for p in self.predict(defect_images, skip_unreadable=skip_unreadable, progress=progress)]
        cal = calibrate_scores(prev["scores"], far, method, map_maxima=prev.get("map_maxima"),
                               defect_scores=defects, threshold_from=threshold_from, source=prev.get("source", "fit"))
        cal.extra.update({k: prev[k] for k in ("folds",) if k in prev})
        cal.apply(self)
        return cal

    @property
    def memory_bank_(self) -> np.ndarray:
        return self._require().bank

    @property
    def fit_info_(self) -> dict[str, Any]:
        return dict(self._require().info)

    def _require(self) -> _Fitted:
        if self._fitted is None:
            raise NotFittedError("this PatchCore is not fitted yet: call fit() or PatchCore.load()")
        return self._fitted

    def _memory(self) -> MemoryBank:
        if self._bank is None:
            self._bank = MemoryBank(self._require().bank)
        return self._bank

    # ---------------------------------------------------------------------------------------- predict
    def iter_predict(self, images: ImagesLike, skip_unreadable: bool = False,
                     progress: Progress | None = None) -> Iterator[Prediction]:
        """Yield a :class:`Prediction` per image as soon as its batch is scored (for large folders)."""
        bank = self._memory()
        items = as_items(images)
        self.skipped_ = []
        pixel = (self.calibration_ or {}).get("pixel_threshold")
        done = 0
        for batch_items, imgs, feats in self._batches(items, skip_unreadable, self.skipped_):
            for item, (score, amap) in zip(batch_items, self._score(bank, feats, [a.shape[:2] for a in imgs])):
                yield Prediction(item.name, score, amap, self.threshold_, pixel)
            done += len(batch_items)
            if progress:
                progress("scoring", done, len(items))

    def predict(self, images: ImagesLike, skip_unreadable: bool = False,
                progress: Progress | None = None) -> list[Prediction]:
        """Score images: for each, an anomaly score and a map at the image's own resolution."""
        return list(self.iter_predict(images, skip_unreadable, progress))

    def score_samples(self, images: ImagesLike) -> np.ndarray:
        """Only the image scores, as an array."""
        return np.array([p.score for p in self.iter_predict(images)], dtype=np.float64)

    def export(self, out_dir: str | os.PathLike, images: ImagesLike | None = None,
               overwrite: bool = False, source: str | os.PathLike | None = None) -> dict[str, Any]:
        """Write an ONNX export for the torch-free runtime (:func:`patchcore.runtime.load`), after checking on
        ``images`` (default: generated ones) that it scores like this model; returns the export's metadata.
        See :func:`patchcore.export.export`."""
        from .export import export

        return export(self, out_dir, images=images, source=source, overwrite=overwrite)

    # ----------------------------------------------------------------------------------------- saving
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the model to one safetensors file (tensors + JSON metadata; loading it runs no code).

        An existing file is never replaced unless ``overwrite``; the file is written next to its target
        and renamed into place, so an interrupted save leaves no half-written model.
        """
        from safetensors.numpy import save_file

        fitted = self._require()
        path = Path(path)
        if path.exists() and not overwrite:
            raise PatchCoreError(f"{path} already exists; pass overwrite=True to replace it, or choose another name")
        if not path.parent.is_dir():
            raise PatchCoreError(f"{path.parent}: folder does not exist")
        params = self.get_params()
        params["backbone_weights"] = None if params["backbone_weights"] is None else str(params["backbone_weights"])
        params["layers"] = list(self.tapped_layers) if len(self.members) == 1 else None
        # What the preset chose is written out, so the file scores the same whatever presets become.
        params["backbone"], params["border_pad"] = self._setting("backbone"), int(self._setting("border_pad"))
        params["normalization"] = self.normalization_name
        params["rotations"] = [int(r) for r in self._setting("rotations")]
        # The sizes too, so a file keeps its preprocessing when a preset's sizes change (as "full" did:
        # 256 -> 288 px).
        pre = self.preprocessing
        params["image_size"] = pre.resize[0] if pre.resize[0] == pre.resize[1] else params["image_size"]
        if pre.crop is not None and pre.crop[0] == pre.crop[1]:
            params["crop_size"] = pre.crop[0]
        mean, std = self._input_stats()
        meta = {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "patchcore_version": __version__,
            "params": json.dumps(params), "backbone_fingerprint": fitted.fingerprint,
            "preprocessing": json.dumps({"resize": list(self.preprocessing.resize),
                                         "crop": list(self.preprocessing.crop) if self.preprocessing.crop else None,
                                         "mean": mean, "std": std,
                                         "border_pad": int(self._setting("border_pad"))}),
            "fit_info": json.dumps(fitted.info),
            "threshold": json.dumps(self.threshold_), "calibration": json.dumps(self.calibration_),
        }
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({"memory_bank": np.ascontiguousarray(fitted.bank)}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto",
             backbone_weights: str | os.PathLike | None = None) -> PatchCore:
        """Read a model saved by :meth:`save`. Corrupt, truncated or foreign files raise ModelFileError."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            raise ModelFileError(f"{path} is a folder, not a model file (.safetensors written by fit/save)")
        if not path.is_file():
            raise ModelFileError(f"{path}: no such model file")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ModelFileError(f"{path}: a safetensors file, but not a patchcore model")
                bank = f.get_tensor("memory_bank") if "memory_bank" in f.keys() else None
        except ModelFileError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise ModelFileError(f"{path}: not a patchcore model file (corrupt, truncated or another format: "
                                 f"{type(e).__name__})") from None
        try:
            version = int(meta["format_version"])
            params = json.loads(meta["params"])
            info = json.loads(meta["fit_info"])
            fp = meta["backbone_fingerprint"]
            threshold = json.loads(meta.get("threshold", "null"))
            calibration = json.loads(meta.get("calibration", "{}"))
            prep = json.loads(meta["preprocessing"])
        except (KeyError, ValueError, TypeError) as e:
            raise ModelFileError(f"{path}: model metadata is damaged ({type(e).__name__}: {e})") from None
        if version > FORMAT_VERSION:
            raise ModelFileError(f"{path}: model format {version} is newer than this patchcore "
                                 f"({__version__}) reads; upgrade patchcore")
        if bank is None or bank.ndim != 2 or bank.shape[1] != info.get("feature_dim") or bank.dtype != np.float32:
            raise ModelFileError(f"{path}: memory bank is missing or does not match its metadata")
        if not np.isfinite(bank).all():
            raise ModelFileError(f"{path}: memory bank holds NaN or infinite values")
        if version == 1:
            # Format 1 had no such settings: it normalised with the statistics it stored and did not pad.
            params.setdefault("border_pad", 0)
            params.setdefault("normalization", next(
                (k for k, (m, s) in NORMALIZATIONS.items() if _same(m, prep.get("mean")) and _same(s, prep.get("std"))),
                "unknown"))
        params["layers"] = None if params.get("layers") is None else tuple(params["layers"])
        # Files from before rotations existed were fitted unturned (whatever their preset chooses today).
        params["rotations"] = tuple(params.get("rotations") or ())
        # Files written before the sizes were recorded (preset "full" was 256 px then) take theirs from the
        # preprocessing they record, so they score exactly as before.
        for key, size in (("image_size", prep.get("resize")), ("crop_size", prep.get("crop"))):
            if params.get(key) is None and isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
                params[key] = int(size[0])
        params["device"] = device
        if backbone_weights is not None:
            params["backbone_weights"] = backbone_weights
        try:
            model = cls(**params)
        except TypeError as e:
            raise ModelFileError(f"{path}: unexpected model parameters ({e})") from None
        except PatchCoreError as e:
            raise ModelFileError(f"{path}: {e}; refit the model with this patchcore ({__version__})") from None
        # The file records the preprocessing it was fitted with; if this version would feed the network
        # differently, its scores would silently change, so refuse instead.
        pre = model.preprocessing
        mean, std = model._input_stats()
        if (list(pre.resize) != prep.get("resize") or (list(pre.crop) if pre.crop else None) != prep.get("crop")
                or not _same(mean, prep.get("mean")) or not _same(std, prep.get("std"))
                or int(model._setting("border_pad")) != int(prep.get("border_pad", 0))):
            raise ModelFileError(f"{path}: this patchcore ({__version__}) would preprocess images differently "
                                 f"from the patchcore that fitted the model ({meta.get('patchcore_version', '?')}), "
                                 f"so its scores would change; refit the model")
        model._fitted = _Fitted(bank=bank, fingerprint=fp, info=info)
        model.threshold_ = None if threshold is None else float(threshold)
        model.calibration_ = calibration
        return model

    def __repr__(self) -> str:
        defaults = PatchCore.__init__.__defaults__ or ()
        names = list(self.get_params())
        changed = [f"{k}={getattr(self, k)!r}" for k, d in zip(names, defaults) if getattr(self, k) != d]
        return f"PatchCore({', '.join(changed)})"

