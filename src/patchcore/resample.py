"""Bilinear resizing as two small matrices, in numpy, computing what torch's ``F.interpolate`` computes.

The torch-free runtime needs the resizes of the PyTorch path without torch: the input resize (bilinear with
antialiasing, as Pillow and ``interpolate(antialias=True)`` do it) and the map's resize back to the image
(plain bilinear, ``align_corners=False``). ONNX's own antialiased Resize weighs pixels differently from
torch's (measured: up to 0.05 on a 0-1 image when shrinking 512 -> 256), so these stay outside the graph.
A separable resize is ``Wy @ image @ Wx.T``; the weights follow torch's CPU kernels index for index.
"""

from __future__ import annotations

import numpy as np


def linear_weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """(n_out, n_in) float64 weights of a 1-D bilinear resize from ``n_in`` to ``n_out`` samples."""
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
        return w
    for i in range(n_out):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        i0 = int(src)
        i1 = i0 + 1 if i0 < n_in - 1 else i0
        frac = src - i0
        w[i, i0] += 1.0 - frac
        w[i, i1] += frac
    return w


def resize(a: np.ndarray, size: tuple[int, int], antialias: bool) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) float array to ``size`` = (height, width); float32 out."""
    h, w = a.shape[:2]
    if (h, w) == tuple(size):
        return np.asarray(a, dtype=np.float32)
    wy = linear_weights(h, size[0], antialias).astype(np.float32)
    wx = linear_weights(w, size[1], antialias).astype(np.float32)
    a = np.asarray(a, dtype=np.float32)
    out = np.tensordot(wy, a, axes=(1, 0))  # (h', W, ...)
    out = np.tensordot(wx, out, axes=(1, 1))  # (w', h', ...)
    return np.ascontiguousarray(np.swapaxes(out, 0, 1))
