"""The images a call is given (paths, folders, arrays) and the resize / crop that feeds the network.

Decoding files to RGB uint8 lives in :mod:`patchcore.imagefiles` (torch-free); it is re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ImageError
from .imagefiles import (IMAGE_EXTENSIONS, MIN_SIDE, check_image_file, is_image_file,  # noqa: F401
                         list_images, read_image, to_rgb)

ImageLike = Union[str, os.PathLike, np.ndarray]
ImagesLike = Union[str, os.PathLike, np.ndarray, Sequence[ImageLike]]


@dataclass(frozen=True)
class Item:
    """One image to process: a display name and where to get its pixels."""

    name: str
    source: ImageLike

    def load(self) -> np.ndarray:
        if isinstance(self.source, np.ndarray):
            return to_rgb(self.source, name=self.name)
        return read_image(self.source)


def as_items(images: ImagesLike) -> list[Item]:
    """Normalise what users pass (a folder, a path, a list of paths or arrays, an N x H x W [x C] array)."""
    if isinstance(images, (str, os.PathLike)):
        p = Path(images)
        if p.is_dir():
            files = list_images(p)
            if not files:
                raise ImageError(f"{p}: folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            return [Item(str(f), f) for f in files]
        if not p.exists():
            raise ImageError(f"{p}: no such file or folder")
        return [Item(str(p), p)]
    if isinstance(images, np.ndarray):
        # N x H x W x C and N x H x W (no channel axis of 1, 3 or 4) are batches; the rest one image.
        if images.ndim == 4 or (images.ndim == 3 and images.shape[2] not in (1, 3, 4)):
            return [Item(f"array[{i}]", a) for i, a in enumerate(images)]
        return [Item("array", images)]
    items = []
    for i, x in enumerate(images):
        if isinstance(x, np.ndarray):
            items.append(Item(f"array[{i}]", x))
        elif isinstance(x, (str, os.PathLike)):
            items.append(Item(str(x), Path(x)))
        else:
            raise ImageError(f"item {i}: expected a path or a numpy array, got {type(x).__name__}")
    if not items:
        raise ImageError("no images given")
    return items


def iter_loaded(items: Iterable[Item], skip_unreadable: bool = False,
                skipped: list[tuple[str, str]] | None = None) -> Iterator[tuple[Item, np.ndarray]]:
    """Yield (item, rgb array); unreadable ones raise, or are skipped and recorded when asked."""
    for item in items:
        try:
            yield item, item.load()
        except ImageError as e:
            if not skip_unreadable:
                raise
            if skipped is not None:
                skipped.append((item.name, str(e)))


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network input.

    ``resize`` is the side (or (height, width)) the whole image is resized to; ``crop``, when set, is the
    side of a centre crop taken after resizing (the paper's 256 -> 224). Normalisation belongs to the
    backbone. Without a crop every input pixel is scored; with one, the border outside it is not.
    """

    resize: tuple[int, int] = (256, 256)
    crop: tuple[int, int] | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        return self.crop if self.crop is not None else self.resize

    def crop_box(self) -> tuple[int, int, int, int] | None:
        """(top, left, height, width) of the crop inside the resized image, as torchvision's center_crop."""
        if self.crop is None:
            return None
        (H, W), (h, w) = self.resize, self.crop
        return int(round((H - h) / 2.0)), int(round((W - w) / 2.0)), h, w

    def __call__(self, batch: Sequence[np.ndarray]) -> torch.Tensor:
        """Stack RGB uint8 images into an N x 3 x h x w float tensor in [0, 1] at the input size."""
        out = []
        for a in batch:
            t = torch.from_numpy(a).permute(2, 0, 1)[None].float().div_(255.0)
            if tuple(t.shape[-2:]) != self.resize:
                # antialias=True matches PIL's bilinear resize, which the paper's transforms used.
                t = F.interpolate(t, size=self.resize, mode="bilinear", align_corners=False, antialias=True)
            box = self.crop_box()
            if box is not None:
                top, left, h, w = box
                t = t[..., top:top + h, left:left + w]
            out.append(t.clamp_(0.0, 1.0))
        return torch.cat(out)

    def to_image(self, amap: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """Map an input-size score map (h x w) back onto the original image of ``size`` (height, width).

        With a crop, the region outside it was never seen: it gets the map's minimum, so it never
        raises an alarm, and evaluation can restrict itself to :meth:`region`.
        """
        m = amap[None, None]
        box = self.crop_box()
        if box is not None:
            top, left, h, w = box
            full = torch.full((1, 1, *self.resize), float(m.min()), dtype=m.dtype)
            full[..., top:top + h, left:left + w] = m
            m = full
        if tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
        return m[0, 0].numpy()

    def region(self, size: tuple[int, int]) -> tuple[slice, slice]:
        """The part of an image of ``size`` (height, width) that the network sees."""
        box = self.crop_box()
        if box is None:
            return slice(0, size[0]), slice(0, size[1])
        top, left, h, w = box
        sy, sx = size[0] / self.resize[0], size[1] / self.resize[1]
        return (slice(int(round(top * sy)), int(round((top + h) * sy))),
                slice(int(round(left * sx)), int(round((left + w) * sx))))


PRESETS: dict[str, Preprocessing] = {
    # Whole image, resized: nothing at the border is lost. Our default; 288 rather than 256 px was measured
    # on both shared categories (docs/benchmarks.md, section 11): screw image AUROC 0.946 -> 0.968.
    "full": Preprocessing(resize=(288, 288)),
    # The paper's protocol (resize 256, centre crop 224), for reproducing its table.
    "paper": Preprocessing(resize=(256, 256), crop=(224, 224)),
    # The default's input; what makes it accurate is in model.PRESET_SETTINGS (the good images' turns fitted
    # too). 320 px was this preset before (docs/benchmarks.md, sections 11 and 13).
    "accurate": Preprocessing(resize=(288, 288)),
}
