"""Score images with an exported model, without torch: onnxruntime, numpy and Pillow only.

    from patchcore import runtime
    rt = runtime.load("bottle-export")          # a folder written by `patchcore export`
    for p in rt.predict(["part1.png", "part2.png"]):
        print(p.name, p.score, p.is_anomalous)

Predictions have the fields of :meth:`patchcore.PatchCore.predict` (score, anomaly map at the image's own
size, threshold, verdict, defect mask), and the same values within the parity the export checked
(``Runtime.meta["parity"]``). Importing this module imports neither torch nor faiss. By default the network runs
in onnxruntime and the memory bank is searched exactly in numpy, visiting only the k-means cells of the bank
that can hold each patch's nearest neighbour (:mod:`patchcore.core.search`); ``path="graph"`` runs the
export's graph of the network and a brute-force search instead. Either way the score and the map are computed
by the estimator's own code (:mod:`patchcore.core.scoring`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .core.files import file_sha256
from .core.geometry import Preprocessing
from .core.imagefiles import ImagesLike, as_items, iter_loaded
from .core.prediction import Prediction
from .core.scoring import score_assembled
from .core.search import CellSearch
from .core.threads import threads as process_threads
from .core.tiling import Assembled, crop, tile_grid
from .errors import ModelFileError, PatchCoreError

# 2: model.onnx ends at the search (distances, indices, features) and the scoring is the estimator's own code;
# 1: model.onnx computed the score and the input-size map itself (still read).
EXPORT_FORMAT, EXPORT_VERSION = "patchcore-export", 2
META_FILE = "patchcore.json"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """An export folder's metadata (``patchcore.json``), checked to be an export this runtime reads."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise ModelFileError(f"{folder}: not a patchcore export (no {META_FILE}); make one with `patchcore export`")
    try:
        meta = json.loads(meta_path.read_text())
        fmt, version = meta["format"], int(meta["format_version"])
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{meta_path}: damaged export metadata ({type(e).__name__})") from None
    if fmt != EXPORT_FORMAT:
        raise ModelFileError(f"{meta_path}: not a patchcore export")
    if version > EXPORT_VERSION:
        raise ModelFileError(f"{folder}: export format {version} is newer than this runtime reads; upgrade patchcore")
    return meta


class Runtime:
    """An exported model, loaded for scoring. Use :func:`load`."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 path: str = "auto", max_pixels: int | None = None) -> None:
        self.max_pixels = max_pixels
        try:
            import onnxruntime as ort
        except ImportError:
            raise PatchCoreError("the runtime needs onnxruntime: pip install onnxruntime") from None
        folder = Path(folder)
        meta = read_meta(folder)
        version = int(meta["format_version"])
        if path not in ("auto", "fast", "graph"):
            raise PatchCoreError(f"path must be 'auto', 'fast' or 'graph', got {path!r}")
        if path == "auto":
            # A bank small enough to be one cell is searched by brute force either way, and onnxruntime's
            # multi-threaded graph does that faster than numpy on one thread (measured: 22 vs 57 ms per image
            # for a 2,140-feature bank; 85 vs 62 ms the other way round for 21,401 features).
            path = "fast" if meta.get("fast_path", {}).get("cells", 1) > 1 else "graph"
        fast = meta.get("fast_path") if path == "fast" else None
        if path == "fast" and not fast:
            raise ModelFileError(f"{folder}: this export has no fast path; load it with path='graph'")
        graph = folder / (fast["features_file"] if fast else meta["onnx_file"])
        digest = meta.get("features_sha256") if fast else meta.get("onnx_sha256")
        if not graph.is_file() or file_sha256(graph) != digest:
            raise ModelFileError(f"{graph}: missing, or not the graph this export was written with (checksum)")
        if device == "auto":
            device = "cuda" if PROVIDERS["cuda"] in ort.get_available_providers() else "cpu"
        if device not in PROVIDERS:
            raise PatchCoreError(f"device must be auto or one of {', '.join(PROVIDERS)}, got {device!r}")
        if PROVIDERS[device] not in ort.get_available_providers():
            raise PatchCoreError(f"onnxruntime here has no {PROVIDERS[device]}; install onnxruntime-gpu for cuda")
        opts = ort.SessionOptions()
        threads = threads or process_threads()
        if threads:
            opts.intra_op_num_threads = int(threads)
        # onnxruntime's pool spins after each run by default, taking the cores from the numpy search and map
        # that follow it: measured on 2 cores, 94 -> 65 ms per bottle image (docs/benchmarks.md, section 15).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(graph), opts, providers=[PROVIDERS[device]])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for damaged graphs
            raise ModelFileError(f"{graph}: onnxruntime cannot load it ({type(e).__name__})") from None
        self.path = path
        meta_grid = meta.get("grid") or meta.get("fast_path", {}).get("grid")
        self.grid = tuple(meta_grid) if meta_grid else None
        self.bank: np.ndarray | None = None
        self.cells: CellSearch | None = None
        self.support: np.ndarray | None = None
        # Exports of format 1 computed the score and the map inside model.onnx; every later one ends the graph
        # at the search and scores here, with the estimator's code.
        self._graph_scores = version < 2 and path == "graph"
        if fast or not self._graph_scores:
            arrays_path = folder / meta["fast_path"]["search_file"]
            if not arrays_path.is_file() or file_sha256(arrays_path) != meta.get("search_sha256"):
                raise ModelFileError(f"{arrays_path}: missing, or not the one this export was written with (checksum)")
            with np.load(arrays_path, allow_pickle=False) as z:  # plain arrays only: loading runs no code
                arrays = {k: z[k] for k in z.files}
            self.bank = np.ascontiguousarray(arrays["bank"], dtype=np.float32)
            self.cells = CellSearch.from_arrays(self.bank, arrays) if fast else None
            self.support = arrays.get("support")
        self.num_neighbors = int(meta.get("num_neighbors", 1))
        self.sigma = float(meta.get("sigma", 0.0))
        self.folder = folder
        self.meta: dict[str, Any] = meta
        prep = meta["preprocessing"]
        # Exports from before the aspect ratio was kept squashed images to a square and took any channels.
        self.preprocessing = Preprocessing(tuple(prep["resize"]), tuple(prep["crop"]) if prep.get("crop") else None,
                                           bool(prep.get("keep_aspect", False)), prep.get("channels"), prep.get("tile"))
        # The graphs give one tile's grid; exports from before tiling took the whole input in one pass.
        self.cell = int(meta.get("cell") or self.preprocessing.input_size[0] // self.grid[0]) if self.grid else None
        self.threshold: float | None = meta.get("threshold")
        self.pixel_threshold: float | None = meta.get("pixel_threshold")

    def score_array(self, rgb: np.ndarray, name: str = "image") -> Prediction:
        """Score one H x W x 3 uint8 image."""
        x = self.preprocessing.input(rgb, name)[None]
        size = rgb.shape[:2]
        if self._graph_scores:
            s, m = self.session.run(None, {"image": x})
            score, amap = float(s[0]), self.preprocessing.to_image(m[0], size)
        else:
            pre = self.preprocessing
            tiles = pre.tiles(self.cell)
            grid = tile_grid(tiles)
            acc = Assembled(grid, pre.cells(grid, size))
            for t in tiles:
                xt = np.ascontiguousarray(crop(x, t))
                if self.path == "fast":
                    (feats,) = self.session.run(None, {"image": xt})
                    q = feats[0]
                    dist, nn_idx, _ = self.cells.nearest(q)
                else:
                    dist, nn_idx, feats = self.session.run(None, {"image": xt})
                    dist, nn_idx, q = dist[0], nn_idx[0], feats[0]
                acc.add(t, dist, nn_idx, q, self.grid)
            support = None if self.support is None else (lambda m: self.support[m])
            score, amap = score_assembled(acc, self.bank, support, self.num_neighbors, pre, self.sigma, size)
        return Prediction(name, score, amap, self.threshold, self.pixel_threshold)

    def iter_predict(self, images: ImagesLike, skip_unreadable: bool = False) -> Iterator[Prediction]:
        """Yield a Prediction per image, one at a time (as a station scores them)."""
        self.skipped_: list[tuple[str, str]] = []
        for item, rgb in iter_loaded(as_items(images), skip_unreadable, self.skipped_, self.max_pixels):
            yield self.score_array(rgb, item.name)

    def predict(self, images: ImagesLike, skip_unreadable: bool = False) -> list[Prediction]:
        """Score images: a file, a folder, an array, or a list of files and arrays."""
        return list(self.iter_predict(images, skip_unreadable))

    # The estimator's names for what the front ends read (thresholds, settings, fit summary), so that the
    # service and patchcore.inference take an export where they take a PatchCore.
    @property
    def threshold_(self) -> float | None:
        return self.threshold

    @property
    def calibration_(self) -> dict[str, Any]:
        cal = dict(self.meta.get("calibration") or {})
        if self.pixel_threshold is not None:
            cal["pixel_threshold"] = self.pixel_threshold
        return cal

    @property
    def fit_info_(self) -> dict[str, Any]:
        return {k: self.meta.get(k) for k in ("bank_size", "feature_dim")}

    def get_params(self) -> dict[str, Any]:
        src = self.meta.get("source_model", {})
        return {"backbone": src.get("backbone"), "num_neighbors": self.num_neighbors, "sigma": self.sigma}

    def __repr__(self) -> str:
        src = self.meta.get("source_model", {})
        return f"Runtime({str(self.folder)!r}, backbone={src.get('backbone')!r}, threshold={self.threshold})"


def load(folder: str | os.PathLike, device: str = "cpu", threads: int | None = None, path: str = "auto",
         max_pixels: int | None = None) -> Runtime:
    """Load an export folder written by ``patchcore export`` / :func:`patchcore.export.export`.

    ``path="fast"`` runs the network graph and searches the bank exactly in numpy, comparing each patch with
    the cells that can hold its nearest neighbour; ``path="graph"`` runs the single graph of the whole
    pipeline (brute-force search inside onnxruntime). Both were checked against the model at export.
    ``"auto"`` (default) takes the fast path for a bank split into cells, the graph for a small bank.
    ``max_pixels``: larger images are refused from their header before they are decoded (as the service's
    ``--max-megapixels``); either way, images past Pillow's decompression-bomb limit are one ImageError.
    """
    return Runtime(folder, device, threads, path, max_pixels)
