"""Reading images from disk or memory into RGB uint8 arrays, and the resize / crop that feeds the network.

Everything a user might hand us ends up as an ``H x W x 3`` uint8 array: grayscale is replicated,
alpha is dropped, 16-bit and float images are scaled to 8 bits over their full nominal range.
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
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
MIN_SIDE = 32  # below this the network sees only interpolated mush; refuse rather than guess

ImageLike = Union[str, os.PathLike, np.ndarray]
ImagesLike = Union[str, os.PathLike, np.ndarray, Sequence[ImageLike]]


def is_image_file(path: Path) -> bool:
    """True for visible files with a known image extension (skips .DS_Store, ._foo, Thumbs.db)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def to_rgb(array: np.ndarray, name: str = "image") -> np.ndarray:
    """Convert a 2-D or 3-D array (gray, gray+alpha, RGB, RGBA; uint8/uint16/float) to H x W x 3 uint8."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] in (1, 2, 3, 4):
        a = a[:, :, :1] if a.shape[2] in (1, 2) else a[:, :, :3]  # drop alpha
    elif a.ndim != 2:
        raise ImageError(f"{name}: expected an H x W or H x W x C image array, got shape {a.shape}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = (a.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageError(f"{name}: image contains NaN or infinite values")
        if a.min() < 0 or a.max() > 1:
            raise ImageError(f"{name}: float images must lie in [0, 1], got [{a.min():.3g}, {a.max():.3g}]")
        a = (a * 255.0).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise ImageError(f"{name}: integer images must be uint8 or uint16, got {a.dtype} outside 0-255")
        a = a.astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported image dtype {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    h, w = a.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageError(f"{name}: image is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    return np.require(a, requirements=["C", "W"])  # writable, so torch.from_numpy needs no copy warning


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as H x W x 3 uint8; any failure is an ImageError naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(img)
                # Mode "I" from 16-bit PNGs holds values up to 65535; scale like uint16.
                a = a.astype(np.uint16) if a.max() <= 65535 and a.min() >= 0 else a
            elif img.mode == "F":
                a = np.asarray(img, dtype=np.float32)
                lo, hi = float(a.min()), float(a.max())
                a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
            elif img.mode in ("L", "RGB"):
                a = np.asarray(img)
            elif img.mode in ("LA", "La"):
                a = np.asarray(img.convert("L"))
            else:  # P, RGBA, CMYK, YCbCr, 1, ...: Pillow knows how to get RGB
                a = np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__})") from None
    return to_rgb(a, name=str(path))


def check_image_file(path: str | os.PathLike) -> None:
    """Cheap check before long work: the file opens as an image of at least MIN_SIDE pixels (header only).

    Raises the ImageError that :func:`read_image` would; a file whose pixel data is damaged past its header
    still passes (only reading it all can tell).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__})") from None
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{path}: image is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")


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
    # Whole image, resized: nothing at the border is lost. Our default.
    "full": Preprocessing(resize=(256, 256)),
    # The paper's protocol (resize 256, centre crop 224), for reproducing its table.
    "paper": Preprocessing(resize=(256, 256), crop=(224, 224)),
    # More pixels per defect, for users who can spend more time per image (model.PRESET_SETTINGS).
    "accurate": Preprocessing(resize=(320, 320)),
}
