"""Export a fitted model to ONNX for the torch-free runtime (:mod:`patchcore.runtime`), parity-checked.

The graph holds the whole per-image pipeline that ONNX can express exactly: normalisation, border padding,
the backbone to its deepest tapped layer, the cut of the padding cells, the 3x3 neighbourhood aggregation,
upsampling and concatenation, the nearest-neighbour distances to the memory bank, the paper's Eq. 7
reweighting (each bank feature's b nearest bank features are computed here, once) and the smoothed map at
the network's input size. Its input is a float (N, 3, h, w) batch at the input size, in [0, 1]; the resizes
before and after the graph are done by the runtime (:mod:`patchcore.resample`, the same weights as torch).

An export is a folder with ``model.onnx`` and ``patchcore.json`` (the threshold, preprocessing,
calibration, the source model's fingerprint and the parity measured at export). Before anything is
written, the export scores a few images with both paths; if they differ by more than the tolerances below,
it is an error and nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .errors import PatchCoreError
from .features import crop_border, patch_features
from .images import ImagesLike, as_items, iter_loaded
from .model import PatchCore
from .postprocess import gaussian_kernel, reflect_index
from .runtime import EXPORT_FORMAT, EXPORT_VERSION, META_FILE, Runtime, file_sha256
from .scoring import MemoryBank, support_order

ONNX_FILE = "model.onnx"
FEATURES_FILE, SEARCH_FILE = "features.onnx", "search.npz"
FILES = (ONNX_FILE, META_FILE, FEATURES_FILE, SEARCH_FILE)
OPSET = 18
# Parity required of an export (issue 8): image scores within 1e-4 relative, maps within 1e-3 of their range.
SCORE_RTOL, MAP_TOL = 1e-4, 1e-3


def eq7_support(bank: np.ndarray, b: int) -> np.ndarray:
    """(K, b) int64: for each bank feature, itself first, then its b - 1 nearest other bank features:
    what :func:`patchcore.scoring.reweighted_score` uses at predict time, for every bank feature at once."""
    mb = MemoryBank(bank, cells=1)
    b = min(b, len(mb))
    _, nn_idx = mb.search(mb.bank, b)
    return np.stack([support_order(i, row) for i, row in enumerate(nn_idx)]).astype(np.int64)


class _Features(nn.Module):
    """The network part of the pipeline alone (the runtime's fast path searches the bank in numpy)."""

    def __init__(self, pipe: _Pipeline) -> None:
        super().__init__()
        self.pipe = pipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.pipe.features(x)
        return f.reshape(f.shape[0], f.shape[1] * f.shape[2], f.shape[3])


class _Pipeline(nn.Module):
    """The per-image PatchCore of a fitted model, as one traceable module (see the module docstring)."""

    def __init__(self, model: PatchCore) -> None:
        super().__init__()
        members, _ = model._network()
        self.taps = nn.ModuleList([t for t, _, _ in members])
        self.register_buffer("mean", torch.cat([m for _, m, _ in members]).float())
        self.register_buffer("std", torch.cat([s for _, _, s in members]).float())
        self.pad = int(model._setting("border_pad"))
        self.target_dim = int(model.target_dim)
        self.input_size = tuple(model.preprocessing.input_size)
        bank = model.memory_bank_.astype(np.float32)
        self.register_buffer("bank_t", torch.from_numpy(np.ascontiguousarray(bank.T)))
        self.register_buffer("bank_sq", torch.from_numpy((bank.astype(np.float64) ** 2).sum(1).astype(np.float32)))
        self.b = int(model.num_neighbors)
        if self.b > 1:
            self.register_buffer("bank", torch.from_numpy(bank))
            self.register_buffer("support", torch.from_numpy(eq7_support(bank, self.b)))
        # Where the padding's cells are cut off each tapped map, worked out once with plain ints: under
        # tracing, shapes are tensors and crop_border's arithmetic on them would not trace.
        hp, wp = self.input_size[0] + 2 * self.pad, self.input_size[1] + 2 * self.pad
        self.cuts: list[list[tuple[int, int, int, int]]] = []
        with torch.inference_mode():
            for taps in self.taps:
                maps = taps(torch.zeros(1, 3, hp, wp, device=self.mean.device))
                cuts = []
                for f in maps:
                    h, w = f.shape[-2:]
                    c = crop_border(f, self.pad, (hp, wp)).shape[-2:]
                    cy, cx = (h - c[0]) // 2, (w - c[1]) // 2
                    cuts.append((cy, h - cy, cx, w - cx))
                self.cuts.append(cuts)
        self.sigma = float(model.sigma)
        if self.sigma > 0:
            k = gaussian_kernel(self.sigma).astype(np.float32)
            r = len(k) // 2
            self.register_buffer("kernel", torch.from_numpy(k))
            self.register_buffer("pad_y", torch.from_numpy(reflect_index(self.input_size[0], r)))
            self.register_buffer("pad_x", torch.from_numpy(reflect_index(self.input_size[1], r)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, h, w, D) patch features of a (N, 3, h, w) input in [0, 1]."""
        feats = []
        for i, taps in enumerate(self.taps):
            z = (x - self.mean[i:i + 1]) / self.std[i:i + 1]
            if self.pad:
                z = F.pad(z, (self.pad,) * 4, mode="reflect")
            fmaps = [f[..., y0:y1, x0:x1] for f, (y0, y1, x0, x1) in zip(taps(z), self.cuts[i])]
            feats.append(patch_features(fmaps, self.target_dim))
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        f = self.features(x)
        h, w, d = f.shape[1], f.shape[2], f.shape[3]
        q = f.reshape(n, h * w, d)
        # Squared distances as faiss's exact search computes them: |q|^2 - 2 q.m + |m|^2.
        d2 = (q * q).sum(-1, keepdim=True) - 2.0 * torch.matmul(q, self.bank_t) + self.bank_sq
        d2min, nn_idx = d2.min(dim=-1)
        dist = d2min.clamp(min=0.0).sqrt()  # (n, h*w)
        s_star, j = dist.max(dim=-1)
        if self.b > 1:
            patch = torch.gather(q, 1, j.view(n, 1, 1).expand(n, 1, d))  # (n, 1, d)
            m_star = torch.gather(nn_idx, 1, j.view(n, 1)).view(n)
            sup = self.support.index_select(0, m_star)  # (n, b)
            nb = self.bank.index_select(0, sup.reshape(-1)).reshape(n, self.b, d)
            dd = (nb - patch).pow(2).sum(-1).sqrt()
            score = (1.0 - torch.softmax(dd, dim=-1)[:, 0]) * s_star
        else:
            score = s_star
        amap = F.interpolate(dist.reshape(n, 1, h, w), size=self.input_size, mode="bilinear", align_corners=False)
        if self.sigma > 0:
            k = self.kernel.numel()
            amap = amap.index_select(2, self.pad_y).index_select(3, self.pad_x)
            amap = F.conv2d(amap, self.kernel.view(1, 1, k, 1))
            amap = F.conv2d(amap, self.kernel.view(1, 1, 1, k))
        return score, amap[:, 0]


def check_images(size: tuple[int, int], n: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Deterministic RGB test images for the export's self-check when the user gives none: smooth random
    fields (so the backbone sees structure, not noise), one of them not at the input size."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (size[0], size[1]) if i < n - 1 else (size[0] + 37, size[1] - 21)
        coarse = rng.random((h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
        t = torch.from_numpy(coarse).permute(2, 0, 1)[None]
        img = F.interpolate(t, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
        img = img + 0.05 * rng.standard_normal((h, w, 3)).astype(np.float32)
        out.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return out


def parity(model: PatchCore, runtime: Any, images: list[Any]) -> dict[str, float | bool]:
    """Compare the PyTorch path with an exported runtime on ``images``: the largest relative score
    difference, the largest map difference relative to the map's range, and whether verdicts agree."""
    ref = model.predict(images)
    got = runtime.predict(images)
    score_rel = max(abs(a.score - b.score) / max(abs(a.score), 1e-12) for a, b in zip(ref, got))
    map_rel = max(float(np.abs(a.anomaly_map - b.anomaly_map).max())
                  / max(float(np.ptp(a.anomaly_map)), 1e-12) for a, b in zip(ref, got))
    verdicts = all(a.is_anomalous == b.is_anomalous for a, b in zip(ref, got))
    return {"images": len(ref), "score_max_rel_diff": float(score_rel), "map_max_diff_of_range": float(map_rel),
            "verdicts_identical": bool(verdicts)}


def _onnx(module: nn.Module, example: torch.Tensor, path: Path, outputs: list[str]) -> None:
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings are about shapes we fixed on purpose
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=outputs,
                          dynamic_axes={"image": {0: "batch"}, **{o: {0: "batch"} for o in outputs}})


def export(model: PatchCore, out_dir: str | os.PathLike, images: ImagesLike | None = None,
           source: str | os.PathLike | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write ``model`` as an export folder for :func:`patchcore.runtime.load`; return its metadata.

    The folder holds ``model.onnx`` (the whole per-image pipeline in one graph), ``features.onnx`` (the
    network part) with ``search.npz`` (the bank, its k-means cells and Eq. 7's neighbours) for the runtime's
    fast path, which searches the bank exactly in numpy, visiting only the cells that can hold the answer,
    and ``patchcore.json``. ``images`` (a few real images of the product, recommended) are scored by the
    model and by both runtime paths first; without them, generated images are used. A parity failure raises
    PatchCoreError and writes nothing. ``source`` is the model file, recorded by its SHA-256.
    """
    model._require()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # Only an earlier export is ever replaced, never a folder with the user's other files.
        if not overwrite or not out.is_dir() or sorted(p.name for p in out.iterdir()) != sorted(FILES):
            raise PatchCoreError(f"{out} already exists and is not empty" + (
                "" if overwrite else "; choose another folder, or overwrite an earlier export")
                + ("" if not overwrite else " (only an earlier export folder is overwritten)"))
    if not out.parent.is_dir():
        raise PatchCoreError(f"{out.parent}: folder does not exist")
    pipe = _Pipeline(model).eval()
    h, w = model.preprocessing.input_size
    example = torch.rand(1, 3, h, w)
    bank = model.memory_bank_.astype(np.float32)
    with torch.inference_mode():
        grid = list(pipe.features(example).shape[1:3])
    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "patchcore_version": __version__,
        "onnx_file": ONNX_FILE, "opset": OPSET,
        "fast_path": {"features_file": FEATURES_FILE, "search_file": SEARCH_FILE, "grid": grid},
        "source_model": {"path": Path(source).name if source else None,
                         "sha256": file_sha256(source) if source else None,
                         "backbone": model._setting("backbone"), "backbone_fingerprint": model._require().fingerprint},
        "preprocessing": {"resize": list(model.preprocessing.resize),
                          "crop": list(model.preprocessing.crop) if model.preprocessing.crop else None},
        "input_size": [h, w], "num_neighbors": int(model.num_neighbors), "sigma": float(model.sigma),
        "bank_size": int(bank.shape[0]), "feature_dim": int(bank.shape[1]),
        "threshold": model.threshold_,
        "pixel_threshold": (model.calibration_ or {}).get("pixel_threshold"),
        "calibration": {k: v for k, v in (model.calibration_ or {}).items() if k not in ("scores", "map_maxima")},
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _onnx(pipe, example, tmp / ONNX_FILE, ["score", "anomaly_map"])
        _onnx(_Features(pipe).eval(), example, tmp / FEATURES_FILE, ["features"])
        cells = model._memory().cells()
        meta["fast_path"]["cells"] = cells.n_cells
        arrays = {"bank": bank, **cells.to_arrays()}
        if model.num_neighbors > 1:
            arrays["support"] = eq7_support(bank, int(model.num_neighbors))
        np.savez(tmp / SEARCH_FILE, **arrays)
        for key, name in (("onnx_sha256", ONNX_FILE), ("features_sha256", FEATURES_FILE),
                          ("search_sha256", SEARCH_FILE)):
            meta[key] = file_sha256(tmp / name)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        check = check_images((h, w)) if images is None else [a for _, a in iter_loaded(as_items(images))][:8]
        meta["parity"] = {}
        for path in ("fast", "graph"):
            result = parity(model, Runtime(tmp, path=path), check)
            meta["parity"][path] = {**result, "checked_on": "given images" if images is not None else "generated images",
                                    "score_rtol": SCORE_RTOL, "map_tol": MAP_TOL}
            if not (result["score_max_rel_diff"] <= SCORE_RTOL and result["map_max_diff_of_range"] <= MAP_TOL
                    and result["verdicts_identical"]):
                raise PatchCoreError(
                    f"the export ({path} path) does not score like the model (score difference "
                    f"{result['score_max_rel_diff']:.2e} relative, map {result['map_max_diff_of_range']:.2e} of its "
                    f"range, verdicts identical: {result['verdicts_identical']}); nothing was written")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta
