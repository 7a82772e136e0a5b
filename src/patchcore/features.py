"""From an image batch to one locally aware patch feature per position (the paper's Sec. 3.1).

:class:`FeatureExtractor` is the network part of a model: the frozen backbone(s) with their tapped layers,
the input normalisation, the border padding and its cut, the neighbourhood aggregation and the concatenation.
The estimator runs it, and the export traces the very same module into ONNX.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import NORMALIZATIONS, LayerTaps, fingerprint, get_backbone, load_backbone


def aggregate_neighbourhood(fmap: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Average each position's features over its ``size`` x ``size`` neighbourhood, zero-padded at the border.

    Zero padding, as in the paper's code, shrinks border features a little (by 6/9, 4/9 in corners), and
    with them the distances between border patches. We tried averaging over the real neighbours only
    (count_include_pad=False): on MVTec screw (Lite0, 1 % coreset) it made the maps of good images peak at
    the border (73 % vs 24 % of them) and cost image AUROC 0.67 -> 0.57, pixel AUROC 0.971 -> 0.967.
    """
    return F.avg_pool2d(fmap, size, stride=1, padding=size // 2, count_include_pad=True)


def _pool_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling over the channel axis of a (P, C) matrix, as the paper's code reduces dims."""
    return F.adaptive_avg_pool1d(x[:, None, :], dim)[:, 0, :]


def patch_features(fmaps: list[torch.Tensor], target_dim: int) -> torch.Tensor:
    """Turn the tapped maps of a batch into patch features of shape (N, h, w, D).

    Every map is aggregated over its 3x3 neighbourhood and bilinearly upsampled to the grid of the first
    (shallowest) map. Where the concatenated width exceeds ``target_dim``, each layer is first pooled to
    ``target_dim`` channels and the stack is pooled again to ``target_dim``, as in the paper's code, so every
    layer weighs the same; narrower features are kept whole (pooling them up would only repeat channels).
    """
    n, _, h, w = fmaps[0].shape
    maps = []
    for f in fmaps:
        f = aggregate_neighbourhood(f.float())
        if f.shape[-2:] != (h, w):
            f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
        maps.append(f.permute(0, 2, 3, 1).reshape(n * h * w, -1))
    if sum(m.shape[1] for m in maps) > target_dim:
        feats = _pool_channels(torch.cat([_pool_channels(m, target_dim) for m in maps], dim=1), target_dim)
    else:
        feats = torch.cat(maps, dim=1)
    return feats.reshape(n, h, w, -1)


def crop_border(fmap: torch.Tensor, pad: int, input_hw: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Cut the cells computed for ``pad`` pixels of input padding off an (N, C, h, w) feature map.

    The map's stride is read off the padded input size; the padding must be a whole number of cells.
    Cropping the tapped maps, before the neighbourhood aggregation, keeps the aggregation's zero padding at
    the image border as in the paper's code, while the network itself saw reflected image there instead of
    its zero padding. Measured on screw (Lite0, 16 px): border peaks of good maps 0 % (2 % unpadded), image
    AUROC 0.940 (0.935). Cropping after the aggregation instead gave 22 % and 0.938 (docs/benchmarks.md).
    """
    if not pad:
        return fmap
    y0, y1, x0, x1 = border_cut(pad, (int(fmap.shape[-2]), int(fmap.shape[-1])), input_hw)
    return fmap[..., y0:y1, x0:x1]


def border_cut(pad: int, map_hw: tuple[int, int], input_hw: tuple[int, int] | torch.Size) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of what :func:`crop_border` keeps of an h x w map, in plain ints (under
    ONNX tracing the network input size is fixed, so these are constants of the graph)."""
    h, w = map_hw
    ch, rh = divmod(pad * h, int(input_hw[0]))
    cw, rw = divmod(pad * w, int(input_hw[1]))
    if rh or rw or not ch or not cw:
        raise ValueError(f"border padding of {pad} px is not a whole number of feature cells "
                         f"({h}x{w} cells for a {input_hw[0]}x{input_hw[1]} input)")
    return ch, h - ch, cw, w - cw


class FeatureExtractor(nn.Module):
    """The patch features of a batch: ``extractor(x)`` with x (N, 3, h, w) in [0, 1] gives (N, h', w', D).

    ``backbones``: one name, or several whose patch features are concatenated (an ensemble); ``layers``: the
    tapped module names of a single backbone (default: its registry's two); ``normalizations``: one name of
    :data:`patchcore.backbones.NORMALIZATIONS` per backbone; ``weights``: a local weights file (single
    backbone); ``border_pad``: pixels of reflection padding around the input, whose cells are cut off the
    tapped maps before the aggregation (see :func:`crop_border`). ``fingerprint`` identifies the weights.
    """

    def __init__(self, backbones: Sequence[str], layers: Sequence[str] | None, normalizations: Sequence[str],
                 weights: str | None, target_dim: int, border_pad: int) -> None:
        super().__init__()
        taps, prints = [], []
        for name in backbones:
            model = load_backbone(name, weights)
            prints.append(fingerprint(model))
            taps.append(LayerTaps(model, tuple(layers) if layers and len(backbones) == 1
                                  else get_backbone(name).layers))
        self.taps = nn.ModuleList(taps)
        self.register_buffer("mean", torch.tensor([NORMALIZATIONS[n][0] for n in normalizations]).view(-1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([NORMALIZATIONS[n][1] for n in normalizations]).view(-1, 3, 1, 1))
        self.pad = int(border_pad)
        self.target_dim = int(target_dim)
        self.fingerprint = "+".join(prints)

    def cell(self) -> int:
        """Input pixels between neighbouring patches (the shallowest tapped layer's stride), measured once."""
        if not hasattr(self, "_cell"):
            side = 64
            with torch.inference_mode():
                grid = self(torch.zeros(1, 3, side, side, device=self.mean.device)).shape[1]
            self._cell = side // int(grid)
        return self._cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for i, taps in enumerate(self.taps):
            z = (x - self.mean[i:i + 1]) / self.std[i:i + 1]
            if self.pad:
                z = F.pad(z, (self.pad,) * 4, mode="reflect")
            hw = (int(z.shape[-2]), int(z.shape[-1]))
            fmaps = [crop_border(f, self.pad, hw) for f in taps(z)]
            feats.append(patch_features(fmaps, self.target_dim))
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
