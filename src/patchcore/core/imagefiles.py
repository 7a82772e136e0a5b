"""The images a call is given (paths, folders, arrays), and image files and arrays to RGB uint8.

Numpy and Pillow only: the estimator, the runtime and the service read images with this module.

Everything a user might hand us ends up as an ``H x W x 3`` uint8 array: grayscale is replicated,
alpha is dropped, 16-bit and float images are scaled to 8 bits over their full nominal range.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
MIN_SIDE = 32  # below this the network sees only interpolated mush; refuse rather than guess


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


def _decode(img: Image.Image) -> np.ndarray:
    """The opened image's pixels as an array that :func:`to_rgb` understands."""
    img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img)
        # Mode "I" from 16-bit PNGs holds values up to 65535; scale like uint16.
        return a.astype(np.uint16) if a.max() <= 65535 and a.min() >= 0 else a
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if img.mode in ("L", "RGB"):
        return np.asarray(img)
    if img.mode in ("LA", "La"):
        return np.asarray(img.convert("L"))
    return np.asarray(img.convert("RGB"))  # P, RGBA, CMYK, YCbCr, 1, ...: Pillow knows how to get RGB


# Pillow refuses images past twice its MAX_IMAGE_PIXELS as possible decompression bombs; say so in one line.
_UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError)


def _bomb(name: str, e: Exception) -> ImageError:
    return ImageError(f"{name}: too many pixels to decode safely ({' '.join(str(e).split())}; raise "
                      f"PIL.Image.MAX_IMAGE_PIXELS to read larger images on purpose)")


def _read(source: Path | io.BytesIO, name: str) -> np.ndarray:
    """Decode a file or an in-memory image as H x W x 3 uint8; any failure is an ImageError naming ``name``."""
    try:
        # Pillow warns (and goes on) past MAX_IMAGE_PIXELS and refuses past twice that: both are one line here,
        # never a warning in the middle of a run's output.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                a = _decode(img)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(name, e) from None
    except _UNREADABLE as e:
        raise ImageError(f"{name}: not a readable image ({type(e).__name__})") from None
    return to_rgb(a, name=name)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as H x W x 3 uint8; any failure is an ImageError naming the file."""
    return _read(Path(path), str(Path(path)))


def read_image_bytes(data: bytes, name: str = "image") -> np.ndarray:
    """Decode an image held in memory (an upload) as :func:`read_image` decodes a file; errors name ``name``."""
    return _read(io.BytesIO(data), name)


def _check_size(name: str, w: int, h: int, max_pixels: int | None) -> tuple[int, int]:
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{name}: image is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"{name}: image is {w}x{h} pixels ({w * h / 1e6:.1f} megapixels); the limit is "
                         f"{max_pixels / 1e6:g} megapixels")
    return w, h


def check_image_file(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int]:
    """Cheap check before long work: the file opens as an image of at least MIN_SIDE pixels a side and at most
    ``max_pixels`` pixels (header only). Returns (width, height).

    Raises the ImageError that :func:`read_image` would; a file whose pixel data is damaged past its header
    still passes (only reading it all can tell).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except Image.DecompressionBombError as e:
        raise _bomb(str(path), e) from None
    except _UNREADABLE as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__})") from None
    return _check_size(str(path), w, h, max_pixels)


def check_image_bytes(data: bytes, name: str = "image", max_pixels: int | None = None) -> tuple[int, int]:
    """:func:`check_image_file` for an image in memory: reads the header only, decodes nothing."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Image.DecompressionBombError as e:
        raise _bomb(name, e) from None
    except _UNREADABLE as e:
        raise ImageError(f"{name}: not a readable image ({type(e).__name__})") from None
    return _check_size(name, w, h, max_pixels)


# ------------------------------------------------------------------------------------- what users pass
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

    def size(self) -> tuple[int, int]:
        """(height, width), from a file's header without decoding it."""
        if isinstance(self.source, np.ndarray):
            return int(self.source.shape[0]), int(self.source.shape[1])
        w, h = check_image_file(self.source)
        return h, w


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
        if isinstance(x, Item):
            items.append(x)
        elif isinstance(x, np.ndarray):
            items.append(Item(f"array[{i}]", x))
        elif isinstance(x, (str, os.PathLike)):
            items.append(Item(str(x), Path(x)))
        else:
            raise ImageError(f"item {i}: expected a path or a numpy array, got {type(x).__name__}")
    if not items:
        raise ImageError("no images given")
    return items


def iter_loaded(items: Iterable[Item], skip_unreadable: bool = False,
                skipped: list[tuple[str, str]] | None = None,
                max_pixels: int | None = None) -> Iterator[tuple[Item, np.ndarray]]:
    """Yield (item, rgb array); unreadable ones raise, or are skipped and recorded when asked. With
    ``max_pixels``, a larger image is refused as unreadable (a file from its header, before it is decoded)."""
    for item in items:
        try:
            if max_pixels is not None:
                if isinstance(item.source, np.ndarray):
                    _check_size(item.name, item.source.shape[1], item.source.shape[0], max_pixels)
                else:
                    check_image_file(item.source, max_pixels)
            yield item, item.load()
        except ImageError as e:
            if not skip_unreadable:
                raise
            if skipped is not None:
                skipped.append((item.name, str(e)))
