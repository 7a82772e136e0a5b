"""Pictures of what the detector saw: heat-map overlays, 16-bit map PNGs and binary defect masks.

All pictures are made at the original image's own resolution (the anomaly map already is), so an
overlay lines up pixel for pixel with the image it was computed on.

Scaling (the same for every image, so pictures are comparable): a map value ``v`` is shown as
``clip(v / (2 * pixel_threshold), 0, 1)``: 0 is blue, the pixel threshold is the middle of the colour
scale (green-yellow), twice the threshold and above is dark red. The 16-bit PNG stores that same
fraction times 65535, so ``raw = png / 65535 * 2 * pixel_threshold`` (exact raw values are in the .npy).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["turbo", "scale_map", "overlay", "mask_at", "save_map_png", "save_png", "png_bytes",
           "thumbnail", "MAP_PNG_MAX"]

MAP_PNG_MAX = 65535

# Polynomial fit of Google's Turbo colormap (Mikhailov 2019; public domain approximation).
_R4 = (0.13572138, 4.61539260, -42.66032258, 132.13108234)
_G4 = (0.09140261, 2.19418839, 4.84296658, -14.18503333)
_B4 = (0.10667330, 12.64194608, -60.58204836, 110.36276771)
_R2 = (-152.94239396, 59.28637943)
_G2 = (4.27729857, 2.82956604)
_B2 = (-89.90310912, 27.34824973)


def turbo(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to Turbo RGB colours (uint8, shape ``x.shape + (3,)``)."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    x2 = x * x
    x3 = x2 * x
    x4 = x2 * x2
    x5 = x4 * x
    out = np.empty(x.shape + (3,), dtype=np.float32)
    for c, (a, b) in enumerate(((_R4, _R2), (_G4, _G2), (_B4, _B2))):
        out[..., c] = a[0] + a[1] * x + a[2] * x2 + a[3] * x3 + b[0] * x4 + b[1] * x5
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def scale_map(amap: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """The map as a fraction in [0, 1]: ``v / (2 * pixel_threshold)`` clipped (the threshold is 0.5)."""
    if not pixel_threshold or pixel_threshold <= 0:
        raise ValueError("pixel_threshold must be positive")
    return np.clip(np.asarray(amap, dtype=np.float32) / (2.0 * float(pixel_threshold)), 0.0, 1.0)


def mask_at(amap: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """Boolean defect mask: True where the map reaches the pixel threshold."""
    return np.asarray(amap) >= pixel_threshold


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    if not mask.any():
        return mask
    inner = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~inner


def overlay(image: np.ndarray, amap: np.ndarray, pixel_threshold: float, alpha: float = 0.5,
            outline: bool = True, mask: np.ndarray | None = None) -> np.ndarray:
    """The image (H x W x 3 uint8) blended with the turbo-coloured map, same size; mask outline in white.

    ``mask`` is the defect mask to outline (``Prediction.defect_mask``, which agrees with the verdict);
    without it, the pixels at or above ``pixel_threshold``.

    Where the map is low, the image shows through more (``alpha * (0.4 + 0.6 * fraction)``), so the
    product stays recognisable and hot regions stand out.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[:2] != amap.shape:
        raise ValueError(f"map {amap.shape} and image {img.shape[:2]} differ in size")
    frac = scale_map(amap, pixel_threshold)
    color = turbo(frac).astype(np.float32)
    a = (alpha * (0.4 + 0.6 * frac))[..., None]
    out = img[..., :3].astype(np.float32) * (1.0 - a) + color * a
    if outline:
        width = max(1, round(min(amap.shape) / 256))
        edge = _outline(mask_at(amap, pixel_threshold) if mask is None else np.asarray(mask, bool), width)
        out[edge] = 255.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def map_to_uint16(amap: np.ndarray, pixel_threshold: float) -> np.ndarray:
    return (scale_map(amap, pixel_threshold) * MAP_PNG_MAX + 0.5).astype(np.uint16)


def save_map_png(path: str | os.PathLike, amap: np.ndarray, pixel_threshold: float) -> Path:
    """Write the map as a 16-bit grey PNG, ``png = clip(v / (2 * pixel_threshold), 0, 1) * 65535``."""
    path = Path(path)
    Image.fromarray(map_to_uint16(amap, pixel_threshold)).save(path)
    return path


def save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write uint8 RGB / grey or boolean (0 / 255) arrays as PNG."""
    path = Path(path)
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    Image.fromarray(a).save(path)
    return path


def thumbnail(array: np.ndarray, max_side: int = 320) -> np.ndarray:
    """A copy no larger than ``max_side`` on its longer side (aspect ratio kept)."""
    img = Image.fromarray(np.asarray(array))
    img.thumbnail((max_side, max_side), Image.LANCZOS)
    return np.asarray(img)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    Image.fromarray(a).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
