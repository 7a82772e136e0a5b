"""The PatchCore estimator: fit on good images, predict a score and an anomaly map per image, save, load."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .backbones import LayerTaps, fingerprint, get_backbone, load_backbone
from .coreset import greedy_coreset, random_projection
from .errors import ModelFileError, NotFittedError, PatchCoreError
from .features import patch_features
from .images import PRESETS, ImagesLike, Item, Preprocessing, as_items, iter_loaded
from .scoring import MemoryBank, reweighted_score, smooth

FORMAT = "patchcore"
FORMAT_VERSION = 1

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total); stages: "features", "coreset", "scoring"."""


@dataclass
class Prediction:
    """The result for one image."""

    name: str
    score: float
    anomaly_map: np.ndarray  # float32, H x W at the input image's own resolution
    threshold: float | None = None

    @property
    def is_anomalous(self) -> bool | None:
        """True when the score reaches the model's threshold; None when the model has no threshold."""
        return None if self.threshold is None else bool(self.score >= self.threshold)

    @property
    def normalized_score(self) -> float | None:
        """score / threshold: the threshold sits at 1.0 whatever the product; None without a threshold."""
        return None if not self.threshold else float(self.score) / float(self.threshold)


@dataclass
class _Fitted:
    bank: np.ndarray
    fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)


class PatchCore:
    """PatchCore (Roth et al., CVPR 2022) as an estimator: configuration in the constructor, state from fit.

    Parameters
    ----------
    backbone: a name from :data:`patchcore.backbones.BACKBONES` (``efficientnet_lite0`` works offline;
        ``wide_resnet50_2`` is the paper's and downloads torchvision's weights on first use).
    layers: module names to tap; default: the backbone's two (stride 8 and 16, the paper's layer 2 + 3).
    preset: ``"full"`` scores the whole image resized (default, nothing at the border is lost);
        ``"paper"`` resizes to 256 and centre-crops 224, as the paper's table was made.
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
    """

    def __init__(self, backbone: str = "efficientnet_lite0", layers: tuple[str, ...] | None = None,
                 preset: str = "full", image_size: int | None = None, crop_size: int | None = None,
                 target_dim: int = 1024, coreset_ratio: float = 0.1, projection_dim: int = 128,
                 num_neighbors: int = 9, sigma: float = 4.0, seed: int = 0, device: str = "auto",
                 batch_size: int = 8, storage_dtype: str = "float32",
                 backbone_weights: str | os.PathLike | None = None) -> None:
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
        self._fitted: _Fitted | None = None
        self._net: tuple[LayerTaps, torch.Tensor, torch.Tensor, str] | None = None
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
            "backbone_weights")}

    def _check_params(self) -> None:
        get_backbone(self.backbone)
        if self.preset not in PRESETS:
            raise PatchCoreError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise PatchCoreError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.storage_dtype not in ("float32", "float16"):
            raise PatchCoreError(f"storage_dtype must be float32 or float16, got {self.storage_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise PatchCoreError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("target_dim", "projection_dim", "num_neighbors", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise PatchCoreError(f"{name} must be at least 1")
        for name in ("image_size", "crop_size"):
            v = getattr(self, name)
            if v is not None and int(v) < 32:
                raise PatchCoreError(f"{name} must be at least 32 pixels")
        p = self.preprocessing
        if p.crop is not None and (p.crop[0] > p.resize[0] or p.crop[1] > p.resize[1]):
            raise PatchCoreError(f"crop {p.crop} is larger than the resized image {p.resize}")

    @property
    def preprocessing(self) -> Preprocessing:
        base = PRESETS[self.preset]
        resize = (self.image_size,) * 2 if self.image_size else base.resize
        crop = (self.crop_size,) * 2 if self.crop_size else base.crop
        return Preprocessing(resize=tuple(resize), crop=tuple(crop) if crop else None)

    @property
    def tapped_layers(self) -> tuple[str, ...]:
        return tuple(self.layers) if self.layers else get_backbone(self.backbone).layers

    def _device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    # ---------------------------------------------------------------------------------------- network
    def _network(self) -> tuple[LayerTaps, torch.Tensor, torch.Tensor, str]:
        if self._net is None:
            entry = get_backbone(self.backbone)
            model = load_backbone(self.backbone, self.backbone_weights)
            fp = fingerprint(model)
            if self._fitted is not None and self._fitted.fingerprint != fp:
                raise ModelFileError(
                    f"this model was fitted with other {self.backbone} weights (fingerprint "
                    f"{self._fitted.fingerprint}) than the ones loaded now ({fp}); pass the same backbone weights")
            dev = self._device()
            taps = LayerTaps(model, self.tapped_layers).to(dev)
            mean = torch.tensor(entry.mean, device=dev).view(1, 3, 1, 1)
            std = torch.tensor(entry.std, device=dev).view(1, 3, 1, 1)
            self._net = (taps, mean, std, fp)
        return self._net

    def _batches(self, items: list[Item], skip_unreadable: bool, skipped: list[tuple[str, str]]
                 ) -> Iterator[tuple[list[Item], list[np.ndarray], torch.Tensor]]:
        """Patch features (N, h, w, D) of consecutive batches, with the items and their RGB arrays."""
        taps, mean, std, _ = self._network()
        pre = self.preprocessing
        batch: list[tuple[Item, np.ndarray]] = []

        def run(batch):
            imgs = [a for _, a in batch]
            x = pre(imgs).to(mean.device)
            with torch.inference_mode():
                feats = patch_features(taps((x - mean) / std), self.target_dim).cpu()
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
        """Build the memory bank from good images: a folder, a list of paths or arrays, or an N x H x W x C array.

        An unreadable image is an error, unless ``skip_unreadable``; then it is left out and listed in
        ``skipped_``. Returns self.
        """
        self._check_params()
        items = as_items(images)
        self.skipped_: list[tuple[str, str]] = []
        t0 = time.perf_counter()
        chunks, done, grid = [], 0, None
        dtype = torch.float16 if self.storage_dtype == "float16" else torch.float32
        for batch_items, _, feats in self._batches(items, skip_unreadable, self.skipped_):
            grid = tuple(feats.shape[1:3])
            chunks.append(feats.reshape(-1, feats.shape[-1]).to(dtype))
            done += len(batch_items)
            if progress:
                progress("features", done, len(items))
        if not chunks:
            raise PatchCoreError("no readable good images to fit on")
        features = torch.cat(chunks)
        del chunks
        t1 = time.perf_counter()
        n_total = features.shape[0]
        n_keep = n_total if self.coreset_ratio >= 1.0 else max(1, int(n_total * self.coreset_ratio))
        if n_keep < self.num_neighbors:
            raise PatchCoreError(
                f"the coreset would hold {n_keep} features, fewer than num_neighbors={self.num_neighbors}: "
                f"use more good images or a larger coreset_ratio")
        if n_keep < n_total:
            z = random_projection(features, self.projection_dim, self.seed)
            idx = greedy_coreset(z, n_keep, seed=self.seed,
                                 progress=(lambda i, n: progress("coreset", i, n)) if progress else None)
            del z
            bank = features.index_select(0, idx)
        else:
            bank = features
        bank = bank.float().numpy()
        t2 = time.perf_counter()
        self._fitted = _Fitted(bank=bank, fingerprint=self._network()[3], info={
            "n_images": done, "n_features": int(n_total), "bank_size": int(bank.shape[0]),
            "feature_dim": int(bank.shape[1]), "grid": list(grid), "extract_seconds": t1 - t0,
            "coreset_seconds": t2 - t1, "fit_seconds": t2 - t0, "skipped": len(self.skipped_)})
        self._bank = None
        self.threshold_, self.calibration_ = None, {}
        return self

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
        pre = self.preprocessing
        done = 0
        for batch_items, imgs, feats in self._batches(items, skip_unreadable, self.skipped_):
            n, h, w, d = feats.shape
            flat = feats.reshape(-1, d).numpy()
            dist, nn = bank.search(flat)
            dist, nn = dist[:, 0].reshape(n, h * w), nn[:, 0].reshape(n, h * w)
            for i, (item, img) in enumerate(zip(batch_items, imgs)):
                j = int(dist[i].argmax())
                score = reweighted_score(bank, flat[i * h * w + j], float(dist[i, j]), int(nn[i, j]),
                                         self.num_neighbors)
                grid = torch.from_numpy(dist[i].reshape(1, 1, h, w))
                up = torch.nn.functional.interpolate(grid, size=pre.input_size, mode="bilinear",
                                                     align_corners=False)[0, 0]
                amap = pre.to_image(smooth(up, self.sigma), img.shape[:2])
                yield Prediction(item.name, score, amap.astype(np.float32), self.threshold_)
            done += n
            if progress:
                progress("scoring", done, len(items))

    def predict(self, images: ImagesLike, skip_unreadable: bool = False,
                progress: Progress | None = None) -> list[Prediction]:
        """Score images: for each, an anomaly score and a map at the image's own resolution."""
        return list(self.iter_predict(images, skip_unreadable, progress))

    def score_samples(self, images: ImagesLike) -> np.ndarray:
        """Only the image scores, as an array."""
        return np.array([p.score for p in self.iter_predict(images)], dtype=np.float64)

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
            raise PatchCoreError(f"{path} already exists; choose another name or allow overwriting")
        if not path.parent.is_dir():
            raise PatchCoreError(f"{path.parent}: folder does not exist")
        params = self.get_params()
        params["backbone_weights"] = None if params["backbone_weights"] is None else str(params["backbone_weights"])
        params["layers"] = list(self.tapped_layers)
        meta = {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "patchcore_version": __version__,
            "params": json.dumps(params), "backbone_fingerprint": fitted.fingerprint,
            "preprocessing": json.dumps({"resize": list(self.preprocessing.resize),
                                         "crop": list(self.preprocessing.crop) if self.preprocessing.crop else None,
                                         "mean": list(get_backbone(self.backbone).mean),
                                         "std": list(get_backbone(self.backbone).std)}),
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
        except (KeyError, ValueError, TypeError) as e:
            raise ModelFileError(f"{path}: model metadata is damaged ({type(e).__name__}: {e})") from None
        if version > FORMAT_VERSION:
            raise ModelFileError(f"{path}: model format {version} is newer than this patchcore "
                                 f"({__version__}) reads; upgrade patchcore")
        if bank is None or bank.ndim != 2 or bank.shape[1] != info.get("feature_dim") or bank.dtype != np.float32:
            raise ModelFileError(f"{path}: memory bank is missing or does not match its metadata")
        if not np.isfinite(bank).all():
            raise ModelFileError(f"{path}: memory bank holds NaN or infinite values")
        params["layers"] = tuple(params["layers"])
        params["device"] = device
        if backbone_weights is not None:
            params["backbone_weights"] = backbone_weights
        try:
            model = cls(**params)
        except TypeError as e:
            raise ModelFileError(f"{path}: unexpected model parameters ({e})") from None
        model._fitted = _Fitted(bank=bank, fingerprint=fp, info=info)
        model.threshold_ = None if threshold is None else float(threshold)
        model.calibration_ = calibration
        return model

    def __repr__(self) -> str:
        defaults = PatchCore.__init__.__defaults__ or ()
        names = list(self.get_params())
        changed = [f"{k}={getattr(self, k)!r}" for k, d in zip(names, defaults) if getattr(self, k) != d]
        return f"PatchCore({', '.join(changed)})"

