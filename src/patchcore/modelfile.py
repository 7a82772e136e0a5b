"""The model file: one safetensors file with the memory bank and JSON metadata (loading it runs no code).

Format 2 records the settings (``params``, flat: the sampler's fields sit beside the others), the backbone's
fingerprint, the preprocessing with the input statistics, the fit's info, the threshold and its calibration.
Every file written since format 1 loads and scores as it did: the migrations below fill in what older files
did not record, from what they did.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__, settings
from .backbones import NORMALIZATIONS
from .core.files import atomic_write
from .coreset import CoresetSampler
from .devices import check_device
from .errors import ModelFileError, PatchCoreError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .model import PatchCore

FORMAT = "patchcore"
FORMAT_VERSION = 2  # 2: normalization and border_pad are settings (format 1 had neither)
# Since format 2 files also record keep_aspect, channels and tile; files without them squashed images to a
# square, took any channels and went through the network in one pass, and still do.
SAMPLER_FIELDS = tuple(f.name for f in fields(CoresetSampler))


def _same(a: Any, b: Any) -> bool:
    """Equal numeric lists (nested or not) up to float rounding; False for other shapes or for None."""
    if b is None:
        return False
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return x.shape == y.shape and bool(np.allclose(x, y))


def file_params(model: PatchCore) -> dict[str, Any]:
    """The settings as the file records them: what the preset chose written out, so the file scores the
    same whatever presets become, and the sampler's fields flat beside the others."""
    params = {k: v for k, v in model.get_params().items() if k != "sampler"}
    params.update({k: getattr(model.sampler, k) for k in SAMPLER_FIELDS})
    params["backbone_weights"] = None if params["backbone_weights"] is None else str(params["backbone_weights"])
    params["layers"] = list(model.tapped_layers) if len(model.members) == 1 else None
    params["backbone"], params["border_pad"] = model.resolved("backbone"), int(model.resolved("border_pad"))
    params["normalization"] = model.normalization_name
    params["rotations"] = [int(r) for r in model.resolved("rotations")]
    # The sizes too, so a file keeps its preprocessing when a preset's sizes change (as "full" did: 256 -> 288).
    pre = model.preprocessing
    params["keep_aspect"] = pre.keep_aspect
    if not pre.keep_aspect:
        params["image_size"] = pre.resize[0] if pre.resize[0] == pre.resize[1] else params["image_size"]
    elif params["image_size"] is None and params["scale"] is None:
        params["image_size"] = settings.preset(model.preset).resize[0]
    if isinstance(params["image_size"], tuple):
        params["image_size"] = list(params["image_size"])
    params["crop_size"] = pre.crop[0] if pre.crop is not None and pre.crop[0] == pre.crop[1] else None
    return params


def save(model: PatchCore, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` (fitted) to ``path``; an existing file is kept unless ``overwrite``."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise PatchCoreError(f"{path} already exists; pass overwrite=True to replace it, or choose another name")
    mean, std = model.input_stats()
    pre = model.preprocessing
    meta = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "patchcore_version": __version__,
        "params": json.dumps(file_params(model)), "backbone_fingerprint": model.fingerprint_,
        "preprocessing": json.dumps({"resize": list(pre.resize), "crop": list(pre.crop) if pre.crop else None,
                                     "mean": mean, "std": std, "border_pad": int(model.resolved("border_pad")),
                                     "keep_aspect": pre.keep_aspect, "channels": pre.channels,
                                     "tile": pre.tile}),
        "fit_info": json.dumps(model.fit_info_),
        "threshold": json.dumps(model.threshold_), "calibration": json.dumps(model.calibration_),
    }
    bank = np.ascontiguousarray(model.memory_bank_)
    return atomic_write(path, lambda tmp: save_file({"memory_bank": bank}, str(tmp), metadata=meta), overwrite)


def _read(path: Path) -> tuple[dict[str, str], np.ndarray | None]:
    from safetensors import safe_open

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
    return meta, bank


def migrate(params: dict[str, Any], version: int, prep: dict[str, Any]) -> dict[str, Any]:
    """The constructor's keyword arguments from a file's recorded ``params`` of format ``version``."""
    params = dict(params)
    if version == 1:
        # Format 1 had no such settings: it normalised with the statistics it stored and did not pad.
        params.setdefault("border_pad", 0)
        params.setdefault("normalization", next(
            (k for k, (m, s) in NORMALIZATIONS.items() if _same(m, prep.get("mean")) and _same(s, prep.get("std"))),
            "unknown"))
    params["layers"] = None if params.get("layers") is None else tuple(params["layers"])
    # Files from before the aspect ratio was kept squashed every image to a square, and took any channels.
    params.setdefault("keep_aspect", False)
    params.setdefault("tile_size", None)  # and went through the network in one pass
    if isinstance(params.get("image_size"), list):
        params["image_size"] = tuple(params["image_size"])
    # Files from before rotations existed were fitted unturned (whatever their preset chooses today).
    params["rotations"] = tuple(params.get("rotations") or ())
    # Files written before the sizes were recorded (preset "full" was 256 px then) take theirs from the
    # preprocessing they record, so they score exactly as before.
    size = prep.get("resize")
    if params.get("image_size") is None and isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        params["image_size"] = int(size[0])
    # The centre crop is the preset's; the check of the preprocessing below refuses a file whose crop differs.
    params.pop("crop_size", None)
    params["sampler"] = CoresetSampler(**{k: params.pop(k) for k in SAMPLER_FIELDS if k in params})
    return params


def load(cls: type[PatchCore], path: str | os.PathLike, device: str = "auto",
         backbone_weights: str | os.PathLike | None = None) -> PatchCore:
    """Read a model saved by :func:`save` as a ``cls``; corrupt, truncated or foreign files raise
    ModelFileError, and so does a file this version would score differently from its writer."""
    check_device(device)  # the caller's mistake, not the file's: said before the file is read
    path = Path(path)
    meta, bank = _read(path)
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
    try:
        params = migrate(params, version, prep)
        params["device"] = device
        if backbone_weights is not None:
            params["backbone_weights"] = backbone_weights
        model = cls(**params)
    except TypeError as e:
        raise ModelFileError(f"{path}: unexpected model parameters ({e})") from None
    try:
        model.check_params()
    except PatchCoreError as e:
        raise ModelFileError(f"{path}: {e}; refit the model with this patchcore ({__version__})") from None
    # What the fit chose from its good images (the input's shape, the channels) is the file's to say.
    size = prep.get("resize")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(x, int) and x > 0 for x in size)):
        raise ModelFileError(f"{path}: model metadata is damaged (preprocessing size {size!r})")
    if prep.get("channels") not in (None, "gray", "color"):
        raise ModelFileError(f"{path}: model metadata is damaged (channels {prep.get('channels')!r})")
    model.set_geometry(size if model.resolved("keep_aspect") else None, prep.get("channels"))
    # The file records the preprocessing it was fitted with; if this version would feed the network
    # differently, its scores would silently change, so refuse instead.
    pre = model.preprocessing
    mean, std = model.input_stats()
    if (list(pre.resize) != prep.get("resize") or (list(pre.crop) if pre.crop else None) != prep.get("crop")
            or not _same(mean, prep.get("mean")) or not _same(std, prep.get("std"))
            or int(model.resolved("border_pad")) != int(prep.get("border_pad", 0))
            or pre.keep_aspect != bool(prep.get("keep_aspect", False)) or pre.tile != prep.get("tile")):
        raise ModelFileError(f"{path}: this patchcore ({__version__}) would preprocess images differently "
                             f"from the patchcore that fitted the model ({meta.get('patchcore_version', '?')}), "
                             f"so its scores would change; refit the model")
    return model.set_state(bank, fp, info, threshold, calibration)
