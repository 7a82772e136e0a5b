"""The PatchCore estimator: fit on good images, predict a score and an anomaly map per image, save, load.

The steps live elsewhere, each in one place: the network and patch features in :mod:`.features`, the coreset
in :mod:`.coreset`, the banks and the cross-fit in :mod:`.fitting`, the search in :mod:`.bank`, the scoring
after the search in :mod:`.core.scoring`, the threshold in :mod:`.thresholds`, the file format in
:mod:`.modelfile`. This class holds the settings and the fitted state, and runs the steps in order.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import settings
from .backbones import NORMALIZATIONS, get_backbone
from .bank import MemoryBank
from .core.geometry import Preprocessing, input_size_for, is_gray
from .core.imagefiles import ImagesLike, Item, as_items, iter_loaded
from .core.prediction import Prediction
from .core.scoring import score_assembled, score_patches
from .core.search import CellSearch
from .core.threads import threads
from .core.tiling import Assembled, crop, tile_grid
from .coreset import CoresetSampler
from .devices import apply_torch_threads
from .errors import ImageError, ModelFileError, NotFittedError, PatchCoreError
from .features import FeatureExtractor
from .fitting import FitPlan, Progress
from .thresholds import Calibration, calibrate, calibrate_scores, suspect_fence, suspects

# What a calibration keeps about the images it was made on, through recalibration and updates.
_CALIBRATION_RECORD = ("folds", "images", "left_out", "updates", "floor")
# Most audits (cross-fits) a fit with leave_out_suspects runs, each leaving out what the last one found.
LEAVE_OUT_ROUNDS = 3


NO_GOOD_IMAGES = "no readable good images to fit on"


def _short_name(name: str) -> str:
    """An image's name as a model file records it: its folder and file name, without the machine's path."""
    return "/".join(Path(name).parts[-2:]) if ("/" in name or os.sep in name) else name


class PatchCore:
    """PatchCore (Roth et al., CVPR 2022) as an estimator: configuration in the constructor, state from fit.

    The constructor only stores its (keyword) arguments; they are checked by :meth:`fit` and :meth:`load`.

    Parameters users set
    --------------------
    backbone: a name from :data:`patchcore.backbones.BACKBONES` (``efficientnet_lite0`` works offline;
        ``wide_resnet50_2`` is the paper's and downloads torchvision's weights on first use), or several
        joined by "+", whose patch features are concatenated (an ensemble); default: the preset's.
    preset: ``"full"`` scores the whole image resized to 288 (default, nothing at the border is lost);
        ``"accurate"`` also fits the good images turned 90 and 180 degrees (``rotations``), for about twice
        the time per image (docs/benchmarks.md, section 13);
        ``"paper"`` resizes to 256 and centre-crops 224 without border padding, as the paper's table was made.
    image_size: the network input's shorter side; the longer one follows the good images' aspect ratio
        (overrides the preset's 288; a square image gives a square input of that side, as before aspect was
        kept). Or (height, width), multiples of 16: the network input exactly. Each image is scaled to fit
        inside the input without changing its shape, the margin mirrored (see ``keep_aspect``).
    scale: instead of ``image_size``, network pixels per image pixel (1.0: native resolution; 0.5: half),
        applied to the median good image; for small defects on large images.
    defect_size: the smallest defect to find, in image pixels across: the input is enlarged where needed so
        that such a defect spans 32 network pixels (four patches; never smaller than ``image_size`` makes
        it), so a small defect on a large image is not shrunk away. Time grows with the input's pixels.
    keep_aspect: keep each image's aspect ratio (default: the preset's; True but for "paper", which squashes
        every image to a square as the paper's table was made).
    tile_size: a network input with more pixels than a square of this side goes through the network in
        overlapping tiles of at most this side, searched tile by tile, so the memory per image stays bounded
        and the time grows with the pixels (None: one pass whatever the size). See :mod:`.core.tiling`.
    rotations: quarter turns (degrees: 90, 180, 270) of every good image whose patch features join the memory
        bank too, so the bank covers parts seen at other angles than the good images show; costs fit time and
        time per image in proportion to the bank (default: the preset's; ``"accurate"`` turns 90 and 180).
        Only fitting uses them: new images are scored as they come, and the cross-fitted calibration keeps an
        image's turns in its fold, so no held-out image is scored against its own turned copy.
    border_pad: pixels of reflection padding added around the network input; the tapped maps' cells of the
        padding are cut away before the neighbourhood aggregation, so the network computes border features
        from image-like context instead of its own zero padding (a multiple of the deepest tapped layer's
        stride, 16; 0 turns it off; default: the preset's, 16, or 0 for "paper"). Measured: docs/benchmarks.md.
    coreset_ratio: fraction of patch features kept in the memory bank (1.0 keeps all).
    num_neighbors: b of the paper's Eq. 7 image-score reweighting (1 turns it off).
    sigma: Gaussian smoothing of the anomaly map, in input pixels.
    target_far: the false-alarm rate on good images that the threshold is calibrated for (see thresholds).
    calibration_folds: k of the k-fold cross-fitting that gives every good image of the fit a calibration
        score (0 or 1: fit without a threshold; calibrate later with :meth:`calibrate`).
    leave_out_suspects: the cross-fit scores every good image against a bank built without it, so a defective
        part hidden among the good images stands out (:func:`patchcore.thresholds.suspects`, listed in
        ``calibration_["suspects"]`` by every fit); with True, the fit then selects its banks and calibrates
        again without those images (listed in ``calibration_["left_out"]``) and audits what is left, up to
        three rounds (defects of one kind in several folds cover each other until some are out), each one
        scoring every image: for up to about four times the fit time where every round finds some.
    seed: makes projection and coreset start, hence the whole model, deterministic.
    device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    batch_size: images per forward pass.
    backbone_weights: a local weights file to use instead of the registry's.

    Expert settings
    ---------------
    layers: module names to tap; default: the backbone's two (stride 8 and 16, the paper's layer 2 + 3).
    normalization: input normalisation, ``"auto"`` (the one the backbone's weights were trained with, from the
        registry), ``"imagenet"`` or ``"tf"``.
    target_dim: patch feature width; wider features are reduced to it by adaptive average pooling.
    storage_dtype: ``"float32"`` or ``"float16"`` for the patch features held while fitting.
    calibration_max_images: most good images the cross-fit scores (drawn evenly from the folds; None: all).
        Scoring an image costs time in proportion to the bank, which grows with the images, so scoring all
        of them would make fit time quadratic; 256 scores still resolve a 1 % false-alarm rate (99 needed).
    n_jobs: coreset cells or shards selected, and calibration folds scored, at a time (threads; default one
        per CPU).
    sampler: how the bank is selected (:class:`patchcore.coreset.CoresetSampler`: the random projection's
        width, and when and how a large selection is split: the research settings of docs/scaling.md).
    """

    def __init__(self, *, backbone: str | None = None, preset: str = "full",
                 image_size: int | tuple[int, int] | None = None, scale: float | None = None,
                 defect_size: float | None = None, keep_aspect: bool | None = None, tile_size: int | None = 1024,
                 rotations: tuple[int, ...] | None = None, border_pad: int | None = None,
                 coreset_ratio: float = 0.1, num_neighbors: int = 9, sigma: float = 4.0, target_far: float = 0.01,
                 calibration_folds: int = 5, leave_out_suspects: bool = False, seed: int = 0,
                 device: str = "auto", batch_size: int = 8,
                 backbone_weights: str | os.PathLike | None = None, layers: tuple[str, ...] | None = None,
                 normalization: str = "auto", target_dim: int = 1024, storage_dtype: str = "float32",
                 calibration_max_images: int | None = 256, n_jobs: int | None = None,
                 sampler: CoresetSampler = CoresetSampler()) -> None:
        self.backbone = backbone
        self.preset = preset
        self.image_size = image_size
        self.scale = scale
        self.defect_size = defect_size
        self.keep_aspect = keep_aspect
        self.tile_size = tile_size
        self.rotations = rotations
        self.border_pad = border_pad
        self.coreset_ratio = coreset_ratio
        self.num_neighbors = num_neighbors
        self.sigma = sigma
        self.target_far = target_far
        self.calibration_folds = calibration_folds
        self.leave_out_suspects = leave_out_suspects
        self.seed = seed
        self.device = device
        self.batch_size = batch_size
        self.backbone_weights = backbone_weights
        self.layers = layers
        self.normalization = normalization
        self.target_dim = target_dim
        self.storage_dtype = storage_dtype
        self.calibration_max_images = calibration_max_images
        self.n_jobs = n_jobs
        self.sampler = sampler
        self.threshold_: float | None = None
        self.calibration_: dict[str, Any] = {}
        self.skipped_: list[tuple[str, str]] = []
        self._bank: np.ndarray | None = None
        self._fingerprint: str | None = None
        self._info: dict[str, Any] = {}
        self._input_size: tuple[int, int] | None = None  # chosen from the good images (aspect kept)
        self._channels: str | None = None
        self._search: MemoryBank | None = None
        self._extractor: FeatureExtractor | None = None

    # ----------------------------------------------------------------------------------------- config
    @classmethod
    def _param_names(cls) -> list[str]:
        return [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind == p.KEYWORD_ONLY]

    def get_params(self, deep: bool = False) -> dict[str, Any]:
        """The constructor arguments, as scikit-learn estimators report them (read off the signature)."""
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params: Any) -> PatchCore:
        """Change constructor arguments (checked at the next fit); returns self."""
        unknown = set(params) - set(self._param_names())
        if unknown:
            raise PatchCoreError(f"unknown parameter(s) {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(self._param_names())}")
        for k, v in params.items():
            setattr(self, k, v)
        self._extractor = None
        return self

    def __repr__(self) -> str:
        sig = inspect.signature(type(self).__init__).parameters
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if v != sig[k].default]
        return f"{type(self).__name__}({', '.join(changed)})"

    def check_params(self) -> None:
        """Raise PatchCoreError for settings that cannot work (fit and load call it)."""
        settings.check(self)

    def resolved(self, name: str) -> Any:
        """A setting a preset can choose (backbone, border_pad, rotations, keep_aspect): the constructor's
        value, or the preset's where that is None."""
        value = getattr(self, name)
        if value is not None:
            return value
        return getattr(settings.preset(self.preset), name)

    @property
    def turns(self) -> tuple[int, ...]:
        """The quarter turns each good image is fitted at (0 first: the image as it comes)."""
        return (0,) + tuple(int(r) // 90 for r in self.resolved("rotations"))

    @property
    def preprocessing(self) -> Preprocessing:
        """How images become the network input. An aspect-keeping model's input size is chosen from its good
        images (:meth:`input_size_for`), so it is known once the model is fitted or that size is set."""
        resize = self._set_size() or self._input_size
        if resize is None:
            raise NotFittedError("an aspect-keeping model takes its input size from its good images: fit it "
                                 "first, or give image_size as (height, width)")
        tile = None if self.tile_size is None else int(self.tile_size)
        return Preprocessing(resize=resize, crop=settings.preset(self.preset).crop,
                             keep_aspect=bool(self.resolved("keep_aspect")), channels=self._channels, tile=tile)

    def _set_size(self) -> tuple[int, int] | None:
        """The network input's size where the settings fix it (a (height, width) image_size, or a squashing
        model's square); None where an aspect-keeping model takes it from its good images."""
        if isinstance(self.image_size, (tuple, list)):
            return int(self.image_size[0]), int(self.image_size[1])
        if not self.resolved("keep_aspect"):
            return (int(self.image_size),) * 2 if self.image_size else settings.preset(self.preset).resize
        return None

    def input_size_for(self, images: ImagesLike, skip_unreadable: bool = False) -> tuple[int, int]:
        """The network input (height, width) this model would fit ``images`` at: the median image's shape at
        ``image_size`` (its shorter side) or ``scale``, enlarged for ``defect_size``, each side rounded to the
        stride. Files are sized from their headers, without decoding them."""
        fixed = self._set_size()
        if fixed is not None:
            return fixed
        sizes = []
        for item in as_items(images):
            try:
                sizes.append(item.size())
            except ImageError:
                if not skip_unreadable:
                    raise
        if not sizes:
            raise PatchCoreError(NO_GOOD_IMAGES)
        return input_size_for(sizes, self.image_size or settings.preset(self.preset).resize[0], self.scale,
                              self.defect_size)

    def channels_for(self, images: ImagesLike, skip_unreadable: bool = False) -> str:
        """What a model fitted on ``images`` takes, "gray" or "color": its first readable good image's kind.
        A fit then converts colour images to gray for a grayscale model and refuses a grayscale image among
        colour ones, as prediction will."""
        for _, rgb in iter_loaded(as_items(images)[:1] if not skip_unreadable else as_items(images),
                                  skip_unreadable):
            return "gray" if is_gray(rgb) else "color"
        raise PatchCoreError(NO_GOOD_IMAGES)

    def set_geometry(self, input_size: tuple[int, int] | None, channels: str | None) -> PatchCore:
        """Set what a fit chooses from its good images, the network input size and the channels ("gray" or
        "color"); :meth:`fit` calls it, and so do Ray's workers with what the driver chose."""
        self._input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        self._channels = channels
        return self

    @property
    def members(self) -> list[str]:
        """The backbones whose patch features are concatenated: ``"a+b"`` is an ensemble of a and b."""
        return str(self.resolved("backbone")).split("+")

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

    def input_stats(self) -> tuple[list, list]:
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

    def fit_plan(self) -> FitPlan:
        """The rules that decide the banks and the calibration of a fit with these settings."""
        return FitPlan(float(self.coreset_ratio), self.sampler, int(self.seed), int(self.calibration_folds),
                       self.calibration_max_images, int(self.num_neighbors), self.n_jobs)

    def _device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    # ---------------------------------------------------------------------------------------- network
    def network(self) -> FeatureExtractor:
        """The feature extractor on the model's device, built once; for a fitted model, refused when its
        weights are not those the model was fitted with."""
        if self._extractor is None:
            apply_torch_threads()
            extractor = FeatureExtractor(
                self.members, self.layers, self.normalization_names,
                None if self.backbone_weights is None else str(self.backbone_weights),
                int(self.target_dim), int(self.resolved("border_pad"))).to(self._device()).eval()
            if self._device() == "cpu":
                # oneDNN's convolutions run 1.4-1.6x faster on NHWC weights on a CPU (lite0, batch 8 at 288 px:
                # 371 -> 258 ms); same features up to float rounding (1e-5 of 30).
                extractor = extractor.to(memory_format=torch.channels_last)
            if self._fingerprint is not None and self._fingerprint != extractor.fingerprint:
                raise ModelFileError(
                    f"this model was fitted with other {self.resolved('backbone')} weights (fingerprint "
                    f"{self._fingerprint}) than the ones loaded now ({extractor.fingerprint}); pass the same "
                    f"backbone weights")
            self._extractor = extractor
        return self._extractor

    def _inputs(self, items: list[Item], skip_unreadable: bool
                ) -> Iterator[tuple[list[Item], list[np.ndarray], np.ndarray]]:
        """Consecutive batches of images: the items, their RGB arrays and the network input (N, 3, h, w).
        Unreadable images raise, or with ``skip_unreadable`` are recorded in ``skipped_``."""
        pre = self.preprocessing

        def done(batch: list[tuple[Item, np.ndarray]]):
            its, imgs = [it for it, _ in batch], [a for _, a in batch]
            return its, imgs, pre(imgs, [it.name for it in its])

        batch: list[tuple[Item, np.ndarray]] = []
        for pair in iter_loaded(items, skip_unreadable, self.skipped_):
            batch.append(pair)
            if len(batch) == self.batch_size:
                yield done(batch)
                batch = []
        if batch:
            yield done(batch)

    def _forward(self, x: np.ndarray) -> torch.Tensor:
        """The network's patch features (N, h, w, D) of one network input or tile batch (N, 3, H, W)."""
        net = self.network()
        with torch.inference_mode():
            return net(torch.from_numpy(np.ascontiguousarray(x)).to(net.mean.device)).cpu()

    def _features(self, x: np.ndarray) -> torch.Tensor:
        """Patch features (N, h, w, D) of a network input (N, 3, H, W) of any size, in tiles when it is larger
        than one (stitched: each tile gives its interior)."""
        tiles = self.preprocessing.tiles(self.network().cell(), x.shape[-2:])
        if len(tiles) == 1:
            return self._forward(x)
        out = None
        for t in tiles:
            f = self._forward(crop(x, t))
            if out is None:
                out = torch.empty((x.shape[0], *tile_grid(tiles), f.shape[-1]), dtype=f.dtype)
            out[:, t.keep[0], t.keep[1]] = f[:, t.local[0], t.local[1]]
        return out

    def _batches(self, items: list[Item], skip_unreadable: bool, turns: tuple[int, ...] | None = None
                 ) -> Iterator[tuple[list[Item], list[np.ndarray], torch.Tensor]]:
        """Patch features (N, h, w, D) of consecutive batches, with the items and their RGB arrays; with
        ``turns`` (quarter turns), (N, len(turns), h, w, D): the features of the network input turned so.
        A quarter turn of a non-square input has the transposed grid; its patches are kept in the same h * w
        rows (the bank does not care where a patch came from; only the unturned grid is ever scored)."""
        for batch_items, imgs, x in self._inputs(items, skip_unreadable):
            first = self._features(x)
            if turns is None:
                yield batch_items, imgs, first
                continue
            views = [first] + [self._features(np.rot90(x, k, axes=(2, 3))).reshape(first.shape) for k in turns[1:]]
            yield batch_items, imgs, torch.stack(views, dim=1)

    def extract(self, images: ImagesLike, skip_unreadable: bool = False, progress: Progress | None = None,
                turned: bool = False) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Patch features (N, h, w, D) of all readable images, in ``storage_dtype``, and their (H, W) sizes;
        ``turned``: (N, T, h, w, D), the features of each of the model's ``turns`` (the image itself first).
        Skipped unreadable images (with ``skip_unreadable``) are added to ``skipped_``. An unfitted
        aspect-keeping model first takes its network input and channels from these images, as a fit would."""
        items = as_items(images)
        if self._bank is None and self._input_size is None and not isinstance(self.image_size, (tuple, list)):
            self.set_geometry(self.input_size_for(items, skip_unreadable), self.channels_for(items, skip_unreadable))
        chunks, sizes = [], []
        dtype = torch.float16 if self.storage_dtype == "float16" else torch.float32
        for _, imgs, feats in self._batches(items, skip_unreadable, self.turns if turned else None):
            chunks.append(feats.to(dtype))
            sizes += [a.shape[:2] for a in imgs]
            if progress:
                progress("features", len(sizes), len(items))
        if not chunks:
            raise PatchCoreError(NO_GOOD_IMAGES)
        return torch.cat(chunks), sizes

    # -------------------------------------------------------------------------------------------- fit
    def fit(self, images: ImagesLike, skip_unreadable: bool = False, progress: Progress | None = None) -> PatchCore:
        """Build the memory bank from good images (a folder, a list of paths or arrays, or an N x H x W x C
        array) and, with ``calibration_folds`` >= 2, calibrate the threshold on all of them, cross-fitted.

        Cross-fitting scores each good image with a bank built, the same way, from the other folds' images,
        so every good image gives one honest calibration score (a model scores its own training images too
        low); the model's own bank still uses every image. An unreadable image is an error, unless
        ``skip_unreadable``; then it is left out and listed in ``skipped_``. Returns self.
        """
        self.check_params()
        self._bank, self._fingerprint, self._search = None, None, None
        self.skipped_ = []
        plan = self.fit_plan()
        t0 = time.perf_counter()
        items = as_items(images)
        self.set_geometry(self.input_size_for(items, skip_unreadable), self.channels_for(items, skip_unreadable))
        feats, sizes = self.extract(items, skip_unreadable, progress, turned=True)
        names = self._kept_names(items)
        t1 = time.perf_counter()
        n_img, n_turns, h, w, d = feats.shape
        folds = plan.folds(n_img)
        bank, fold_banks, n_parts, radius = plan.select_banks(feats, progress)
        # New images are scored as they come, so the calibration scores the images unturned. Leaving suspects
        # out, every cross-fit scores every image (no calibration_max_images): each one is audited.
        audit = replace(plan, calibration_max_images=None) if self.leave_out_suspects else plan
        cross = audit.cross_fit(feats[:, 0], sizes, fold_banks, self.score_summary, progress) if folds >= 2 else None
        order = audit.scored_order(n_img, folds) if cross is not None else []
        left_out: list[list] = []
        floor = None
        # Defects of one kind hidden in several folds cover each other in a cross-fit; once the most
        # obvious are out, the next cross-fit exposes those they covered. So audit again, a few rounds.
        for _ in range(LEAVE_OUT_ROUNDS if cross is not None and self.leave_out_suspects else 0):
            found = suspects(cross[0])
            if not found or n_img - len(found) < max(2, folds):
                break
            # The first round's fence, on every image, is the floor: a clean set's tail is not cut away.
            floor = suspect_fence(cross[0]) if floor is None else floor
            left_out += [[names[order[i]], cross[0][i]] for i in found]
            keep = np.setdiff1d(np.arange(n_img), [order[i] for i in found])
            feats, sizes = feats[torch.from_numpy(keep)], [sizes[i] for i in keep]
            names, n_img = [names[i] for i in keep], len(keep)
            folds = audit.folds(n_img)
            bank, fold_banks, n_parts, radius = audit.select_banks(feats, progress)
            cross = audit.cross_fit(feats[:, 0], sizes, fold_banks, self.score_summary, progress)
            order = audit.scored_order(n_img, folds)
        t2 = time.perf_counter()
        record = {"images": [names[i] for i in order]} if cross is not None else {}
        if left_out:
            record["left_out"], record["floor"] = left_out, floor
        return self.set_fitted(bank, {
            "n_images": n_img, "n_features": n_img * n_turns * h * w, "feature_dim": int(d), "grid": [h, w],
            "turns": n_turns, "extract_seconds": t1 - t0, "shards": n_parts, "shard_by": self.sampler.shard_by,
            "coreset_seconds": t2 - t1, "coreset_radius": radius, "skipped": len(self.skipped_)},
            cross, folds, t0, t2, record)

    def _kept_names(self, items: list[Item]) -> list[str]:
        """The names of ``items`` that were read (not in ``skipped_``), as the model records them."""
        skipped = {n for n, _ in self.skipped_}
        return [_short_name(it.name) for it in items if it.name not in skipped]

    def set_fitted(self, bank: np.ndarray, info: dict[str, Any], cross: tuple[list[float], list[float]] | None,
                   folds: int, started: float, selected: float, record: dict[str, Any] | None = None) -> PatchCore:
        """Set the fitted state from the bank and, when cross-fitted, the calibration scores (and map maxima);
        ``started`` and ``selected`` are the perf_counter times the fit began and its banks were selected;
        ``record``: what the calibration keeps about its images (their names, those left out).
        :meth:`fit` and :func:`patchcore.distributed.fit_on_ray` (which computes both on workers) end here."""
        self._bank, self._search = bank, None
        self._fingerprint = self.network().fingerprint
        pre = self.preprocessing
        self._info = {**info, "bank_size": int(bank.shape[0]), "fit_seconds": selected - started,
                      "input_size": list(pre.input_size), "channels": pre.channels}
        self.threshold_, self.calibration_ = None, {}
        if cross is not None:
            scores, maxima = cross
            cal = calibrate_scores(scores, self.target_far, map_maxima=maxima, floor=(record or {}).get("floor"),
                                   source=f"{folds}-fold cross-fit on {len(scores)} of the {info['n_images']} "
                                          f"fitted images")
            self._apply_calibration(cal, {"folds": folds, **(record or {})})
            self._info["calibration_seconds"] = time.perf_counter() - selected
            self._info["fit_seconds"] = time.perf_counter() - started
        return self

    def set_state(self, bank: np.ndarray, fingerprint: str, info: dict[str, Any], threshold: float | None,
                  calibration: dict[str, Any]) -> PatchCore:
        """Restore a fitted state as a model file records it (:mod:`patchcore.modelfile`)."""
        self._bank, self._fingerprint, self._info, self._search = bank, fingerprint, dict(info), None
        self.threshold_ = None if threshold is None else float(threshold)
        self.calibration_ = dict(calibration)
        return self

    # -------------------------------------------------------------------------------------- calibrate
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
                               defect_scores=defects, threshold_from=threshold_from, source=prev.get("source", "fit"),
                               floor=prev.get("floor"))
        self._apply_calibration(cal, {k: prev[k] for k in _CALIBRATION_RECORD if k in prev})
        return cal

    def _apply_calibration(self, cal: Calibration, record: dict[str, Any]) -> None:
        """Make ``cal`` the model's calibration, with ``record`` (what it keeps about its images: their names,
        folds, those left out, updates) and the suspects: [name, score] of the calibration images that look
        defective (:func:`patchcore.thresholds.suspects`), highest first, named "#i" (the i-th calibration
        score) where the model did not record the names."""
        cal.extra.update(record)
        names = cal.extra.get("images")
        if names is None or len(names) != len(cal.scores):
            names = [f"#{i}" for i in range(len(cal.scores))]
        cal.extra["suspects"] = [[names[i], float(cal.scores[i])] for i in suspects(cal.scores)]
        cal.apply(self)

    # ----------------------------------------------------------------------------------------- update
    def _cross_fit_added(self, feats: torch.Tensor, sizes: list[tuple[int, int]], added: np.ndarray,
                         owner: np.ndarray, folds: int, dist_old: np.ndarray, nn_old: np.ndarray,
                         progress: Progress | None = None) -> tuple[list[float], list[float]]:
        """(scores, map maxima) of the images an update adds, ``feats`` (N, h, w, D), in the order of
        :meth:`FitPlan.scored_order`: each against the bank grown without its fold's images, the bank as it
        was plus the added features ``added`` whose ``owner`` image lies in another fold. A patch's nearest
        neighbour is the nearer of its nearest in the old bank (``dist_old``, ``nn_old``: N * h * w each) and
        in the other folds' added features (the exact cell search over them), so no bank is selected per fold."""
        plan, n_old = self.fit_plan(), len(self._bank)
        splits, scored_of = plan.calibration_split(len(feats), folds)
        fold_of = np.empty(len(feats), dtype=np.int64)
        for j, held in enumerate(splits):
            fold_of[held] = j
        n, gh, gw, dd = feats.shape
        hw, pre, b = gh * gw, self.preprocessing, int(self.num_neighbors)

        cells = CellSearch(added, seed=self.seed) if len(added) else None  # one k-means; each fold a subset

        def one(j: int) -> list[tuple[float, float]]:
            scored = scored_of[j]
            others = fold_of[owner] != j
            extra = np.ascontiguousarray(added[others])
            rows = (scored[:, None] * hw + np.arange(hw)).ravel()
            flat = feats[torch.from_numpy(scored)].reshape(-1, dd).float().numpy()
            dist, nn = dist_old[rows], nn_old[rows]
            if len(extra):
                dx, ix, _ = cells.subset(others).nearest(flat)
                closer = dx < dist
                dist, nn = np.where(closer, dx, dist), np.where(closer, n_old + ix, nn)
            grown = MemoryBank(np.concatenate([self._bank, extra]))  # for Eq. 7's neighbours only: never searched
            support, out = grown.support_of(b), []
            for k, i in enumerate(scored):
                r = slice(k * hw, (k + 1) * hw)
                score, amap = score_patches(dist[r], nn[r], flat[r], grown.bank, support, b, (gh, gw), pre,
                                            float(self.sigma), tuple(sizes[i]))
                out.append((score, float(amap.max())))
            return out

        return plan.score_folds(one, folds, progress)

    def update(self, images: ImagesLike, skip_unreadable: bool = False,
               progress: Progress | None = None) -> PatchCore:
        """Add good images to the fitted model without refitting; returns self.

        Their patch features join the memory bank by the coreset's rule, continued from the bank
        (:meth:`patchcore.fitting.FitPlan.grow`: the farthest from what the bank already covers first, until
        none lies farther from the bank than the fit's selection radius; a model saved before the radius was
        recorded adds the share of them a fit would keep), so time grows with the images added, not with
        those fitted before.

        The threshold is recalibrated with the same guarantee as a fit's. The new images are split into the
        calibration's folds; each is scored against the bank as it was plus the features the other folds' new
        images added (a bank without its own features, as a fit cross-fits), and these honest scores join the
        calibration's earlier ones, which were scored against banks without any new features: a bank that
        only grows can only lower a good image's distances, so the earlier scores err on the side of fewer
        false alarms. The conformal threshold is then taken over all of them, at the calibration's target rate
        and method. A calibration from defect images (``threshold_from="f1"``) falls back to the false-alarm
        threshold: its defect scores were made against the old bank. A model without calibration scores is
        updated without a threshold.
        """
        self._require()
        self.check_params()
        plan = self.fit_plan()
        t0 = time.perf_counter()
        items = as_items(images)
        self.skipped_ = []
        feats, sizes = self.extract(items, skip_unreadable, progress, turned=True)
        names = self._kept_names(items)
        t_extract = time.perf_counter() - t0
        n_img, n_turns, h, w, d = feats.shape
        if n_turns != int(self._info.get("turns", 1)) or d != self._bank.shape[1]:
            raise ModelFileError(f"the new images' features ({n_turns} turns x {d}) do not match the model's "
                                 f"({self._info.get('turns', 1)} turns x {self._bank.shape[1]})")
        prev = dict(self.calibration_ or {})
        folds = max(1, min(int(prev.get("folds") or self.calibration_folds or 1), n_img)) if prev.get("scores") else 0
        before = len(self._bank)
        flat = feats.reshape(-1, d)
        # One search of the old bank serves both: the coreset's starting distances and the calibration.
        dist, nn = self.memory().nearest(flat.float().numpy(), n_jobs=self._search_jobs())
        radius = self._info.get("coreset_radius")  # None in files written before fits recorded it
        picks = plan.grow(self._bank, flat, nearest=nn, radius=radius)
        added = flat.index_select(0, picks).float().numpy()
        t1 = time.perf_counter()
        owner = (picks // (n_turns * h * w)).numpy()  # the new image each added feature came from
        unturned = (np.arange(n_img)[:, None] * n_turns * h * w + np.arange(h * w)).ravel()
        cross = self._cross_fit_added(feats[:, 0], sizes, added, owner, folds, dist[unturned], nn[unturned],
                                      progress) if folds else None
        bank = np.concatenate([self._bank, added])
        self._bank, self._search = bank, None
        step = {"images": n_img, "bank_added": len(bank) - before, "skipped": len(self.skipped_),
                "added_by": "share" if radius is None else "radius",
                "seconds": time.perf_counter() - t0, "extract_seconds": t_extract,
                "select_seconds": t1 - t0 - t_extract}
        self._info.update(n_images=int(self._info["n_images"]) + n_img,
                          n_features=int(self._info["n_features"]) + n_img * n_turns * h * w,
                          bank_size=len(bank), updates=list(self._info.get("updates", [])) + [step])
        if cross is None:
            self.threshold_, self.calibration_ = None, {}
            return self
        old_names = prev.get("images")
        scored = [names[i] for i in plan.scored_order(n_img, folds)]
        cal = calibrate_scores(
            list(prev["scores"]) + cross[0], prev.get("target_far", self.target_far), prev.get("method", "conformal"),
            map_maxima=list(prev.get("map_maxima") or prev["scores"]) + cross[1], floor=prev.get("floor"),
            source=f"{prev.get('source', 'fit')}; {len(cross[0])} added image(s) scored in {folds} fold(s) "
                   f"against the bank grown without them")
        self._apply_calibration(cal, {
            **{k: prev[k] for k in _CALIBRATION_RECORD if k in prev},
            "images": (old_names + scored) if old_names and len(old_names) == len(prev["scores"]) else None,
            "updates": list(prev.get("updates", [])) + [{"images": n_img, "scored": len(scored), "folds": folds}]})
        return self

    # ---------------------------------------------------------------------------------------- fitted
    @property
    def memory_bank_(self) -> np.ndarray:
        self._require()
        return self._bank

    @property
    def fit_info_(self) -> dict[str, Any]:
        self._require()
        return dict(self._info)

    @property
    def fingerprint_(self) -> str:
        """The fingerprint of the backbone weights the model was fitted with."""
        self._require()
        return self._fingerprint

    def _require(self) -> None:
        if self._bank is None:
            raise NotFittedError("this PatchCore is not fitted yet: call fit() or PatchCore.load()")

    def memory(self) -> MemoryBank:
        """The fitted bank's search structure (built once)."""
        self._require()
        if self._search is None:
            self._search = MemoryBank(self._bank)
        return self._search

    # ---------------------------------------------------------------------------------------- predict
    def _search_jobs(self) -> int:
        """Threads searching a batch's patches: ``n_jobs``, else the process's thread decision
        (PATCHCORE_THREADS: one for ``patchcore serve``), else one per CPU."""
        return max(1, int(self.n_jobs or threads() or os.cpu_count() or 1))

    def score_features(self, bank: MemoryBank | np.ndarray, feats: torch.Tensor, sizes: list[tuple[int, int]]
                       ) -> list[tuple[float, np.ndarray]]:
        """(image score, anomaly map at the image's own size) for each image's (h, w, D) patch features,
        against ``bank`` (the model's own, a calibration fold's, or any other)."""
        bank = bank if isinstance(bank, MemoryBank) else MemoryBank(bank)
        n, h, w, d = feats.shape
        flat = feats.reshape(-1, d).float().numpy()
        dist, nn = bank.nearest(flat)
        support = bank.support_of(self.num_neighbors)
        pre, hw = self.preprocessing, h * w
        return [score_patches(dist[i * hw:(i + 1) * hw], nn[i * hw:(i + 1) * hw], flat[i * hw:(i + 1) * hw],
                              bank.bank, support, int(self.num_neighbors), (h, w), pre, float(self.sigma),
                              tuple(sizes[i]))
                for i in range(n)]

    def score_summary(self, bank: MemoryBank | np.ndarray, feats: torch.Tensor, sizes: list[tuple[int, int]]
                      ) -> list[tuple[float, float]]:
        """(image score, map maximum) per image, as the cross-fitted calibration keeps them."""
        return [(score, float(amap.max())) for score, amap in self.score_features(bank, feats, sizes)]

    def iter_predict(self, images: ImagesLike, skip_unreadable: bool = False,
                     progress: Progress | None = None) -> Iterator[Prediction]:
        """Yield a :class:`Prediction` per image as soon as its batch is scored (for large folders). Large
        inputs are searched tile by tile (:mod:`.core.tiling`): only one tile's patch features are held."""
        bank = self.memory()
        items = as_items(images)
        self.skipped_ = []
        pixel = (self.calibration_ or {}).get("pixel_threshold")
        pre, net = self.preprocessing, self.network()
        tiles = pre.tiles(net.cell())
        grid = tile_grid(tiles)
        support = bank.support_of(self.num_neighbors)
        jobs = self._search_jobs()
        done = 0
        for batch_items, imgs, x in self._inputs(items, skip_unreadable):
            sizes = [tuple(a.shape[:2]) for a in imgs]
            accs = [Assembled(grid, pre.cells(grid, size)) for size in sizes]
            for t in tiles:
                f = self._forward(crop(x, t))
                n, gh, gw, d = f.shape
                flat = f.reshape(-1, d).float().numpy()
                dist, nn = bank.nearest(flat, n_jobs=jobs)
                k = gh * gw
                for i, acc in enumerate(accs):
                    acc.add(t, dist[i * k:(i + 1) * k], nn[i * k:(i + 1) * k], flat[i * k:(i + 1) * k], (gh, gw))
            for item, acc, size in zip(batch_items, accs, sizes):
                score, amap = score_assembled(acc, bank.bank, support, int(self.num_neighbors), pre,
                                              float(self.sigma), size)
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

    # -------------------------------------------------------------------------------- export and files
    def export(self, out_dir: str | os.PathLike, images: ImagesLike | None = None,
               overwrite: bool = False, source: str | os.PathLike | None = None) -> dict[str, Any]:
        """Write an ONNX export for the torch-free runtime (:func:`patchcore.runtime.load`), after checking on
        ``images`` (default: generated ones) that it scores like this model; returns the export's metadata.
        See :func:`patchcore.export.export`."""
        from .export import export

        return export(self, out_dir, images=images, source=source, overwrite=overwrite)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the model to one safetensors file (tensors + JSON metadata; loading it runs no code).

        An existing file is never replaced unless ``overwrite``; the file is written next to its target
        and renamed into place, so an interrupted save leaves no half-written model.
        """
        from .modelfile import save

        self._require()
        return save(self, path, overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto",
             backbone_weights: str | os.PathLike | None = None) -> PatchCore:
        """Read a model saved by :meth:`save`. Corrupt, truncated or foreign files raise ModelFileError."""
        from .modelfile import load

        return load(cls, path, device, backbone_weights)
