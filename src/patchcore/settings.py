"""The presets, and the checks of an estimator's settings (run by fit and load, never by the constructor).

A preset chooses the network input (resize, centre crop), the backbone, the border padding and the fitted
turns; an explicit constructor argument wins over its preset. "paper" reproduces the paper's protocol, whose
code pads nothing; docs/benchmarks.md says how "full" (the default) and "accurate" were chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .backbones import NORMALIZATIONS, get_backbone
from .core.geometry import Preprocessing
from .devices import check_device
from .errors import PatchCoreError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .model import PatchCore


@dataclass(frozen=True)
class Preset:
    resize: tuple[int, int]
    crop: tuple[int, int] | None
    backbone: str
    border_pad: int
    rotations: tuple[int, ...]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(resize=self.resize, crop=self.crop)


PRESETS: dict[str, Preset] = {
    # Whole image, resized: nothing at the border is lost. Our default; 288 rather than 256 px was measured
    # on both shared categories (docs/benchmarks.md, section 11): screw image AUROC 0.946 -> 0.968.
    "full": Preset((288, 288), None, "efficientnet_lite0", 16, ()),
    # The paper's protocol (resize 256, centre crop 224, no padding), for reproducing its table.
    "paper": Preset((256, 256), (224, 224), "efficientnet_lite0", 0, ()),
    # The default's input, with every good image also fitted turned 90 and 180 degrees: screw 0.971-0.976
    # against 0.961-0.968, for about twice the time per image. 320 px was this preset before
    # (docs/benchmarks.md, sections 11 and 13).
    "accurate": Preset((288, 288), None, "efficientnet_lite0", 16, (90, 180)),
}
ROTATIONS = (90, 180, 270)


def preset(name: str) -> Preset:
    """The preset of that name; an unknown name is a PatchCoreError that lists the known ones."""
    if name not in PRESETS:
        raise PatchCoreError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def check(model: PatchCore) -> None:
    """Raise PatchCoreError (BackboneError for an unknown backbone) for settings that cannot work."""
    preset(model.preset)
    members = model.members
    for m in members:
        get_backbone(m)
    if len(members) > 1 and (model.layers or model.backbone_weights is not None):
        raise PatchCoreError("layers and backbone_weights apply to a single backbone, not to an ensemble")
    if not 0.0 < model.coreset_ratio <= 1.0:
        raise PatchCoreError(f"coreset_ratio must be in (0, 1], got {model.coreset_ratio}")
    if model.storage_dtype not in ("float32", "float16"):
        raise PatchCoreError(f"storage_dtype must be float32 or float16, got {model.storage_dtype!r}")
    check_device(model.device)
    check_target_far(model.target_far)
    if int(model.calibration_folds) < 0:
        raise PatchCoreError(f"calibration_folds must be 0 or more (below 2: no calibration in fit), "
                             f"got {model.calibration_folds}")
    try:
        model.sampler.check()
    except ValueError as e:
        raise PatchCoreError(str(e)) from None
    if model.calibration_max_images is not None and int(model.calibration_max_images) < 2:
        raise PatchCoreError(f"calibration_max_images must be at least 2 (or None), got "
                             f"{model.calibration_max_images}")
    if model.n_jobs is not None and int(model.n_jobs) < 1:
        raise PatchCoreError(f"n_jobs must be at least 1 (or None), got {model.n_jobs}")
    for name in ("target_dim", "num_neighbors", "batch_size"):
        if int(getattr(model, name)) < 1:
            raise PatchCoreError(f"{name} must be at least 1")
    given = str(model.normalization).split("+")
    if any(g != "auto" and g not in NORMALIZATIONS for g in given) or len(given) not in (1, len(members)):
        raise PatchCoreError(f"unknown normalization {model.normalization!r}; known: auto, "
                             f"{', '.join(NORMALIZATIONS)} (one, or one per ensemble member joined by '+')")
    pad = int(model.resolved("border_pad"))
    if pad < 0 or pad % 16:
        raise PatchCoreError(f"border_pad must be a non-negative multiple of 16 pixels (the deepest tapped "
                             f"layer's stride), got {model.border_pad}")
    if model.image_size is not None and int(model.image_size) < 32:
        raise PatchCoreError("image_size must be at least 32 pixels")
    p = model.preprocessing
    if p.crop is not None and (p.crop[0] > p.resize[0] or p.crop[1] > p.resize[1]):
        raise PatchCoreError(f"crop {p.crop} is larger than the resized image {p.resize}")
    rot = model.resolved("rotations")
    if (isinstance(rot, (str, bytes)) or not all(isinstance(r, (int, np.integer)) and r in ROTATIONS for r in rot)
            or len(set(rot)) != len(rot)):
        raise PatchCoreError(f"rotations must be distinct quarter turns among {', '.join(map(str, ROTATIONS))} "
                             f"(degrees), got {model.rotations!r}")
    if rot and p.input_size[0] != p.input_size[1]:
        raise PatchCoreError(f"rotations need a square network input, got {p.input_size}")


def check_target_far(target_far: float, name: str = "target_far") -> None:
    """The one check of a target false-alarm rate, for the estimator and every front end (``name``: how the
    caller's users spell it, e.g. "--target-far")."""
    try:
        ok = 0.0 < float(target_far) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise PatchCoreError(f"{name} must be between 0 and 1, got {target_far}")
