"""How an image becomes the network input, and how a score map goes back onto the image, in numpy alone.

One home for the geometry that the estimator, the torch-free runtime and the export share: the network input's
size chosen from the good images (:func:`input_size_for`), each image fitted into it without changing its
aspect ratio (the margin mirrored, and never scored), the channels the model takes, the bilinear
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

from ..errors import ImageError
from .threads import one_blas_thread
from .tiling import Tile, plan_tiles


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
    with one_blas_thread:  # the same sums in the same order whatever the process's BLAS threads
        x = (x.reshape(p * h, w) @ linear_weights(w, int(size[1]), antialias).T).reshape(p, h, int(size[1]))
        return np.ascontiguousarray(linear_weights(h, int(size[0]), antialias) @ x)


def resize(a: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) float array to ``size`` = (height, width); float32 out."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 2:
        return resize_planes(a[None], size, antialias)[0]
    return np.ascontiguousarray(resize_planes(np.ascontiguousarray(a.transpose(2, 0, 1)), size,
                                              antialias).transpose(1, 2, 0))


STRIDE = 16  # the deepest tapped layer's stride: every network input side is a multiple of it


def round_side(x: float) -> int:
    """A network input side: ``x`` rounded to the nearest multiple of :data:`STRIDE`, at least two strides."""
    return max(2 * STRIDE, int(round(x / STRIDE)) * STRIDE)


# Network pixels the smallest defect to find should span: four cells of the stride-8 patch grid, more than the
# 3 x 3 neighbourhood (24 px) every patch feature averages over, so the defect fills at least one patch's.
DEFECT_SPAN = 32


def input_size_for(sizes: Sequence[tuple[int, int]], short_side: int | None = None, scale: float | None = None,
                   defect_size: float | None = None) -> tuple[int, int]:
    """The network input (height, width) for images of ``sizes`` (height, width): the median image's shape,
    scaled so that its shorter side is ``short_side`` or by ``scale`` (network pixels per image pixel), each
    side rounded to the stride. ``defect_size`` (image pixels across the smallest defect to find) enlarges
    the input where needed so that such a defect spans :data:`DEFECT_SPAN` network pixels; it never makes the
    input smaller. The aspect ratio is kept within that rounding; the images themselves are never stretched
    to it (see :attr:`Preprocessing.keep_aspect`)."""
    if not sizes:
        raise ValueError("no image sizes to choose the network input from")
    h, w = (float(np.median([s[i] for s in sizes])) for i in (0, 1))
    s = float(scale) if scale is not None else float(short_side) / min(h, w)
    if defect_size is not None:
        s = max(s, DEFECT_SPAN / float(defect_size))
    return round_side(h * s), round_side(w * s)


def smallest_defect(pre: Preprocessing, size: tuple[int, int]) -> float:
    """Image pixels across the smallest defect that an image of ``size`` (height, width) shows at
    :data:`DEFECT_SPAN` network pixels through ``pre`` (along its more shrunk side): smaller ones are shrunk
    below four patches, and ``defect_size`` is what enlarges the input for them."""
    _, _, h, w = pre.placement(size)
    return DEFECT_SPAN * max(size[0] / h, size[1] / w)


def is_gray(rgb: np.ndarray) -> bool:
    """True when an H x W x 3 image's three channels are equal (a grayscale image read as RGB). A uniform image
    (a black or saturated frame, a blank) says nothing of its camera and counts as either kind: False."""
    r = rgb[..., 0]
    return bool(np.array_equal(r, rgb[..., 1]) and np.array_equal(r, rgb[..., 2]) and r.min() != r.max())


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """An RGB uint8 image as its luminance (ITU-R 601, as Pillow's "L" mode), replicated to three channels."""
    y = (rgb.astype(np.uint32) @ np.array([299, 587, 114], dtype=np.uint32) + 500) // 1000
    return np.repeat(y.astype(np.uint8)[..., None], 3, axis=2)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network input.

    ``resize`` is the (height, width) of the network input before any crop. With ``keep_aspect`` each image is
    scaled by one factor for both axes to fit inside it, centred, and the margin left over is filled by
    mirroring the image (never stretched, never squashed); without it (square presets and models fitted
    before aspect was kept) the whole image is resized to ``resize``. ``crop``, when set, is the (height,
    width) of a centre crop taken after resizing (the paper's 256 -> 224); without one every input pixel is
    scored, with one the border outside it is not. ``channels`` is what the model was fitted on, "gray" or
    "color": a colour image given to a grayscale model is converted to its luminance, a grayscale image given
    to a colour model is refused (None: models from before channels were recorded, which take either).
    ``tile``: an input with more pixels than a ``tile`` x ``tile`` square goes through the network in
    overlapping tiles of at most that side (None: one pass whatever its size).
    Normalisation belongs to the backbone.
    """

    resize: tuple[int, int] = (256, 256)
    crop: tuple[int, int] | None = None
    keep_aspect: bool = False
    channels: str | None = None
    tile: int | None = None

    def tiles(self, cell: int, size: tuple[int, int] | None = None) -> list[Tile]:
        """The tiles the network input (or an input of ``size``, such as a turned one) goes through the network
        in, for patches ``cell`` input pixels apart (see :mod:`patchcore.core.tiling`)."""
        return plan_tiles(size or self.input_size, self.tile, cell)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.crop if self.crop is not None else self.resize

    def crop_box(self) -> tuple[int, int, int, int] | None:
        """(top, left, height, width) of the crop inside the resized image, as torchvision's center_crop."""
        if self.crop is None:
            return None
        (H, W), (h, w) = self.resize, self.crop
        return int(round((H - h) / 2.0)), int(round((W - w) / 2.0)), h, w

    def placement(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, left, height, width) that an image of ``size`` (height, width) covers in the resized input."""
        H, W = self.resize
        if not self.keep_aspect:
            return 0, 0, H, W
        s = min(H / size[0], W / size[1])
        h, w = min(H, max(1, int(round(size[0] * s)))), min(W, max(1, int(round(size[1] * s))))
        return (H - h) // 2, (W - w) // 2, h, w

    def channels_of(self, rgb: np.ndarray, name: str = "image") -> np.ndarray:
        """The image as the model takes it: converted to gray for a grayscale model; a grayscale image on a
        colour model is an ImageError (it would be scored as a colour part that lost its colour)."""
        if self.channels == "gray":
            return rgb if is_gray(rgb) else to_gray(rgb)
        if self.channels == "color" and is_gray(rgb):
            raise ImageError(f"{name}: a grayscale image, but this model takes colour images (its good images "
                             f"were colour); give it colour images, or fit a model on grayscale ones")
        return rgb

    def input(self, rgb: np.ndarray, name: str = "image") -> np.ndarray:
        """One H x W x 3 uint8 image as the (3, h, w) float32 network input in [0, 1]."""
        rgb = self.channels_of(rgb, name)
        a = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)  # (3, H, W)
        top, left, h, w = self.placement(rgb.shape[:2])
        a = resize_planes(a, (h, w), antialias=True)  # channels first, as the network wants them
        if (h, w) != tuple(self.resize):
            H, W = self.resize
            a = np.pad(a, ((0, 0), (top, H - h - top), (left, W - w - left)), mode="reflect")
        box = self.crop_box()
        if box is not None:
            top, left, h, w = box
            a = a[:, top:top + h, left:left + w]
        return np.ascontiguousarray(np.clip(a, 0.0, 1.0))

    def __call__(self, batch: Sequence[np.ndarray], names: Sequence[str] | None = None) -> np.ndarray:
        """Stack RGB uint8 images into an N x 3 x h x w float32 batch in [0, 1] at the input size."""
        names = names if names is not None else ["image"] * len(batch)
        return np.stack([self.input(a, n) for a, n in zip(batch, names)])

    def cells(self, grid: tuple[int, int], size: tuple[int, int]) -> tuple[slice, slice]:
        """The rows and columns of an input-size ``grid`` of patches whose centres lie on an image of ``size``
        (the rest saw only the mirrored margin, which no image score may come from)."""
        top, left, h, w = self.placement(size)
        H, W = self.input_size
        box = self.crop_box()
        off_y, off_x = (box[0], box[1]) if box is not None else (0, 0)

        def span(n: int, side: int, lo: int, hi: int, off: int) -> slice:
            c = (np.arange(n) + 0.5) * side / n + off
            inside = np.flatnonzero((c >= lo) & (c < hi))
            return slice(0, n) if inside.size == 0 else slice(int(inside[0]), int(inside[-1]) + 1)

        return span(grid[0], H, top, top + h, off_y), span(grid[1], W, left, left + w, off_x)

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
        top, left, h, w = self.placement(size)
        if (h, w) != amap.shape:
            amap = np.ascontiguousarray(amap[top:top + h, left:left + w])
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
