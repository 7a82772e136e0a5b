"""How an image becomes the network input, and how a score map goes back onto the image, in numpy alone.

One home for the geometry that the estimator, the torch-free runtime and the export share: the bilinear
resize (with antialiasing when shrinking, as Pillow and ``torch.nn.functional.interpolate(antialias=True)``
compute it; plain bilinear with ``align_corners=False`` for maps), the optional centre crop, and the map's way
back to the image's own size. A separable resize is ``Wy @ image @ Wx.T``; the weights follow torch's CPU
kernels index for index, and are built once per pair of sizes (a line sees the same sizes all day).
ONNX's own antialiased Resize weighs pixels differently (up to 0.05 on a 0-1 image when shrinking 512 ->
256), so the resizes stay outside the exported graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def linear_weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """(n_out, n_in) float32 weights of a 1-D bilinear resize from ``n_in`` to ``n_out`` samples (cached,
    read-only: callers share it)."""
    w = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    if antialias:
        # torch's _upsample_bilinear2d_aa (Pillow's algorithm): a triangle filter stretched by the scale
        # when shrinking, renormalised over the input samples it covers.
        support = scale if scale >= 1.0 else 1.0
        inv = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(n_out):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            j = np.arange(lo, hi)
            f = np.clip(1.0 - np.abs((j - center + 0.5) * inv), 0.0, None)
            if f.sum() > 0:
                w[i, lo:hi] = f / f.sum()
    else:
        for i in range(n_out):
            src = max(scale * (i + 0.5) - 0.5, 0.0)
            i0 = int(src)
            i1 = i0 + 1 if i0 < n_in - 1 else i0
            frac = src - i0
            w[i, i0] += 1.0 - frac
            w[i, i1] += frac
    out = w.astype(np.float32)
    out.setflags(write=False)
    return out


def resize_planes(x: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    """Resize every (H, W) plane of a (P, H, W) float32 array to ``size``: two matrix products over all the
    planes at once, rows then columns."""
    p, h, w = x.shape
    if (h, w) == tuple(size):
        return x
    x = (x.reshape(p * h, w) @ linear_weights(w, int(size[1]), antialias).T).reshape(p, h, int(size[1]))
    return np.ascontiguousarray(linear_weights(h, int(size[0]), antialias) @ x)


def resize(a: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) float array to ``size`` = (height, width); float32 out."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 2:
        return resize_planes(a[None], size, antialias)[0]
    return np.ascontiguousarray(resize_planes(np.ascontiguousarray(a.transpose(2, 0, 1)), size,
                                              antialias).transpose(1, 2, 0))


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network input.

    ``resize`` is the (height, width) the whole image is resized to; ``crop``, when set, the (height, width)
    of a centre crop taken after resizing (the paper's 256 -> 224). Normalisation belongs to the backbone.
    Without a crop every input pixel is scored; with one, the border outside it is not.
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

    def input(self, rgb: np.ndarray) -> np.ndarray:
        """One H x W x 3 uint8 image as the (3, h, w) float32 network input in [0, 1]."""
        a = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)  # (3, H, W)
        a = resize_planes(a, self.resize, antialias=True)  # channels first, as the network wants them
        box = self.crop_box()
        if box is not None:
            top, left, h, w = box
            a = a[:, top:top + h, left:left + w]
        return np.ascontiguousarray(np.clip(a, 0.0, 1.0))

    def __call__(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """Stack RGB uint8 images into an N x 3 x h x w float32 batch in [0, 1] at the input size."""
        return np.stack([self.input(a) for a in batch])

    def to_image(self, amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Map an input-size score map (h x w) back onto the original image of ``size`` (height, width).

        With a crop, the region outside it was never seen: it gets the map's minimum, so it never
        raises an alarm, and evaluation can restrict itself to :meth:`region`.
        """
        amap = np.asarray(amap, dtype=np.float32)
        box = self.crop_box()
        if box is not None:
            top, left, h, w = box
            full = np.full(self.resize, amap.min(), dtype=np.float32)
            full[top:top + h, left:left + w] = amap
            amap = full
        return resize(amap, size, antialias=False)

    def region(self, size: tuple[int, int]) -> tuple[slice, slice]:
        """The part of an image of ``size`` (height, width) that the network sees."""
        box = self.crop_box()
        if box is None:
            return slice(0, size[0]), slice(0, size[1])
        top, left, h, w = box
        sy, sx = size[0] / self.resize[0], size[1] / self.resize[1]
        return (slice(int(round(top * sy)), int(round((top + h) * sy))),
                slice(int(round(left * sx)), int(round((left + w) * sx))))
