"""Export a fitted model to ONNX for the torch-free runtime (:mod:`patchcore.runtime`), parity-checked.

An export holds the network as the estimator runs it (:class:`patchcore.features.FeatureExtractor`, traced
as is) and the memory bank; what follows the search is not in any graph: the runtime computes it with the
estimator's own code (:mod:`patchcore.core.scoring`, :mod:`patchcore.core.geometry`). Two graphs:
``features.onnx`` (the patch features of a batch; the runtime's fast path searches the bank exactly in numpy,
visiting only the k-means cells that can hold each answer) and ``model.onnx`` (the features and a
brute-force nearest-neighbour search of the bank in onnxruntime, faster for a small bank). The input of both
is a float (N, 3, h, w) batch at the input size (of one tile, for a model that tiles large inputs), in [0, 1].

An export is a folder with the graphs, ``search.npz`` (the bank, its cells and Eq. 7's neighbourhoods) and
``patchcore.json`` (the threshold, preprocessing, calibration, the source model's fingerprint and the parity
measured at export). Before anything is written, the export scores a few images with both paths; if they
differ by more than the tolerances below, it is an error and nothing is written.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .core.files import atomic_folder, file_sha256
from .core.imagefiles import ImagesLike, as_items, iter_loaded
from .errors import PatchCoreError
from .features import FeatureExtractor
from .runtime import EXPORT_FORMAT, EXPORT_VERSION, META_FILE, Runtime

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .model import PatchCore

ONNX_FILE = "model.onnx"
FEATURES_FILE, SEARCH_FILE = "features.onnx", "search.npz"
FILES = (ONNX_FILE, META_FILE, FEATURES_FILE, SEARCH_FILE)
OPSET = 18
# Parity required of an export (issue 8): image scores within 1e-4 relative, maps within 1e-3 of their range.
SCORE_RTOL, MAP_TOL = 1e-4, 1e-3


class _Features(nn.Module):
    """The network alone: (N, h * w, D) patch features."""

    def __init__(self, net: FeatureExtractor) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net(x)
        return f.reshape(f.shape[0], f.shape[1] * f.shape[2], f.shape[3])


class _Search(nn.Module):
    """The network and the exact brute-force search of the bank: each patch's distance to its nearest bank
    feature and that feature's index, with the patch features (what Eq. 7 needs)."""

    def __init__(self, net: FeatureExtractor, bank: np.ndarray) -> None:
        super().__init__()
        self.features = _Features(net)
        self.register_buffer("bank_t", torch.from_numpy(np.ascontiguousarray(bank.T)))
        self.register_buffer("bank_sq", torch.from_numpy((bank.astype(np.float64) ** 2).sum(1).astype(np.float32)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.features(x)
        # Squared distances as faiss's exact search computes them: |q|^2 - 2 q.m + |m|^2.
        d2 = (q * q).sum(-1, keepdim=True) - 2.0 * torch.matmul(q, self.bank_t) + self.bank_sq
        d2min, nn_idx = d2.min(dim=-1)
        return d2min.clamp(min=0.0).sqrt(), nn_idx, q


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

    See the module for the files. ``images`` (a few real images of the product, recommended) are scored by the
    model and by both runtime paths first; without them, generated images are used. A parity failure raises
    PatchCoreError and writes nothing. ``source`` is the model file, recorded by its SHA-256.
    """
    bank = model.memory_bank_.astype(np.float32)  # NotFittedError before anything else
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # Only an earlier export is ever replaced, never a folder with the user's other files.
        if not overwrite or not out.is_dir() or sorted(p.name for p in out.iterdir()) != sorted(FILES):
            raise PatchCoreError(f"{out} already exists and is not empty" + (
                "" if overwrite else "; choose another folder, or overwrite an earlier export")
                + ("" if not overwrite else " (only an earlier export folder is overwritten)"))
    if not out.parent.is_dir():
        raise PatchCoreError(f"{out.parent}: folder does not exist")
    net = model.network()
    pre = model.preprocessing
    h, w = pre.input_size
    # The graphs take one tile (the whole input when it fits in one); the runtime tiles as the model does.
    _, _, th, tw = pre.tiles(net.cell())[0].box
    example = torch.rand(1, 3, th, tw, device=net.mean.device)
    with torch.inference_mode():
        grid = list(net(example).shape[1:3])
    memory = model.memory()
    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "patchcore_version": __version__,
        "onnx_file": ONNX_FILE, "opset": OPSET, "grid": grid, "cell": net.cell(), "tile_input": [th, tw],
        "fast_path": {"features_file": FEATURES_FILE, "search_file": SEARCH_FILE, "grid": grid,
                      "cells": memory.cells().n_cells},
        "source_model": {"path": Path(source).name if source else None,
                         "sha256": file_sha256(source) if source else None,
                         "backbone": model.resolved("backbone"), "backbone_fingerprint": model.fingerprint_},
        "preprocessing": {"resize": list(pre.resize), "crop": list(pre.crop) if pre.crop else None,
                          "keep_aspect": pre.keep_aspect, "channels": pre.channels, "tile": pre.tile},
        "input_size": [h, w], "num_neighbors": int(model.num_neighbors), "sigma": float(model.sigma),
        "bank_size": int(bank.shape[0]), "feature_dim": int(bank.shape[1]),
        "threshold": model.threshold_,
        "pixel_threshold": (model.calibration_ or {}).get("pixel_threshold"),
        # The scores stay (the service's drift checks compare the stream with them); the training images' names
        # do not travel with an export.
        "calibration": {k: v for k, v in (model.calibration_ or {}).items()
                        if k not in ("map_maxima", "images", "suspects", "left_out")},
    }
    check = check_images((h, w)) if images is None else [a for _, a in iter_loaded(as_items(images))][:8]

    def fill(tmp: Path) -> None:
        _onnx(_Search(net, bank).eval(), example, tmp / ONNX_FILE, ["distances", "indices", "features"])
        _onnx(_Features(net).eval(), example, tmp / FEATURES_FILE, ["features"])
        arrays = {"bank": bank, **memory.cells().to_arrays()}
        if model.num_neighbors > 1:
            arrays["support"] = memory.support_table(int(model.num_neighbors))
        np.savez(tmp / SEARCH_FILE, **arrays)
        for key, name in (("onnx_sha256", ONNX_FILE), ("features_sha256", FEATURES_FILE),
                          ("search_sha256", SEARCH_FILE)):
            meta[key] = file_sha256(tmp / name)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        meta["parity"] = {}
        for path in ("fast", "graph"):
            result = parity(model, Runtime(tmp, path=path), check)
            checked_on = "given images" if images is not None else "generated images"
            meta["parity"][path] = {**result, "checked_on": checked_on, "score_rtol": SCORE_RTOL, "map_tol": MAP_TOL}
            if not (result["score_max_rel_diff"] <= SCORE_RTOL and result["map_max_diff_of_range"] <= MAP_TOL
                    and result["verdicts_identical"]):
                raise PatchCoreError(
                    f"the export ({path} path) does not score like the model (score difference "
                    f"{result['score_max_rel_diff']:.2e} relative, map {result['map_max_diff_of_range']:.2e} of its "
                    f"range, verdicts identical: {result['verdicts_identical']}); nothing was written")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))

    atomic_folder(out, fill, replace=True)
    return meta
