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
from .core.geometry import DEFECT_SPAN, Preprocessing
from .core.tiling import TILE_MARGIN
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
    keep_aspect: bool = True

    @property
    def preprocessing(self) -> Preprocessing:
        """The preset's preprocessing of a square image (an aspect-keeping model takes its network input's
        shape from its good images at fit)."""
        return Preprocessing(resize=self.resize, crop=self.crop, keep_aspect=self.keep_aspect)


PRESETS: dict[str, Preset] = {
    # Whole image, its shorter side resized to 288 and its aspect ratio kept: nothing at the border is lost
    # and nothing is squashed. Our default; 288 rather than 256 px was measured on both shared categories
    # (docs/benchmarks.md, section 11): screw image AUROC 0.946 -> 0.968; keeping the aspect, on KolektorSDD
    # (section 16). Square images give the square input they always had.
    "full": Preset((288, 288), None, "efficientnet_lite0", 16, ()),
    # The paper's protocol (resize 256 squashing any aspect, centre crop 224, no padding), for its table.
    "paper": Preset((256, 256), (224, 224), "efficientnet_lite0", 0, (), keep_aspect=False),
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
    size = model.image_size
    sides = list(size) if isinstance(size, (tuple, list)) else [] if size is None else [size]
    if isinstance(size, (tuple, list)) and len(sides) != 2:
        raise PatchCoreError(f"image_size must be one side (the shorter one) or (height, width), got {size!r}")
    if any(not isinstance(x, (int, np.integer)) or x < 32 for x in sides):
        raise PatchCoreError(f"image_size must be at least 32 pixels a side, got {size!r}")
    if len(sides) == 2 and any(x % 16 for x in sides):
        raise PatchCoreError(f"an image_size of (height, width) must be multiples of 16 (the network's stride), "
                             f"got {tuple(sides)}")
    keep = bool(model.resolved("keep_aspect"))
    if model.scale is not None:
        if not (isinstance(model.scale, (int, float, np.floating)) and 0.0 < float(model.scale) <= 8.0):
            raise PatchCoreError(f"scale (network pixels per image pixel) must be in (0, 8], got {model.scale!r}")
        if size is not None or not keep:
            raise PatchCoreError("scale sets the network input's size from the good images' own: give image_size "
                                 "or scale, not both, and not with keep_aspect=False")
    if model.defect_size is not None:
        low = DEFECT_SPAN / 8.0  # the largest scale allowed
        if not (isinstance(model.defect_size, (int, float, np.integer, np.floating))
                and low <= float(model.defect_size)):
            raise PatchCoreError(f"defect_size (image pixels across the smallest defect) must be at least {low:g}, "
                                 f"got {model.defect_size!r}")
        if model.scale is not None or isinstance(size, (tuple, list)) or not keep:
            raise PatchCoreError("defect_size enlarges the network input chosen from the good images: give it "
                                 "without scale, without an image_size of (height, width) and without "
                                 "keep_aspect=False")
    tile = model.tile_size
    if tile is not None and (not isinstance(tile, (int, np.integer)) or tile % 16 or tile < 2 * TILE_MARGIN + 64):
        raise PatchCoreError(f"tile_size must be a multiple of 16 of at least {2 * TILE_MARGIN + 64} pixels "
                             f"(or None: one pass), got {tile!r}")
    base = preset(model.preset)
    if base.crop is not None and keep:
        raise PatchCoreError(f"preset {model.preset!r} centre-crops a square input: it cannot keep the aspect ratio")
    if base.crop is not None and size is not None and min(sides) < max(base.crop):
        raise PatchCoreError(f"crop {base.crop} is larger than the resized image {size}")
    rot = model.resolved("rotations")
    if (isinstance(rot, (str, bytes)) or not all(isinstance(r, (int, np.integer)) and r in ROTATIONS for r in rot)
            or len(set(rot)) != len(rot)):
        raise PatchCoreError(f"rotations must be distinct quarter turns among {', '.join(map(str, ROTATIONS))} "
                             f"(degrees), got {model.rotations!r}")


def check_target_far(target_far: float, name: str = "target_far") -> None:
    """The one check of a target false-alarm rate, for the estimator and every front end (``name``: how the
    caller's users spell it, e.g. "--target-far")."""
    try:
        ok = 0.0 < float(target_far) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise PatchCoreError(f"{name} must be between 0 and 1, got {target_far}")
