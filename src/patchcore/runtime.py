"""Score images with an exported model, without torch: onnxruntime, numpy and Pillow only.

    from patchcore import runtime
    rt = runtime.load("bottle-export")          # a folder written by `patchcore export`
    for p in rt.predict(["part1.png", "part2.png"]):
        print(p.name, p.score, p.is_anomalous)

Predictions have the fields of :meth:`patchcore.PatchCore.predict` (score, anomaly map at the image's own
size, threshold, verdict, defect mask), and the same values within the parity the export checked
(``Runtime.meta["parity"]``). Importing this module imports neither torch nor faiss. By default the network runs
in onnxruntime and the memory bank is searched exactly in numpy, visiting only the k-means cells of the bank
that can hold each patch's nearest neighbour (:mod:`patchcore.search`); ``path="graph"`` runs the export's
single graph of the whole pipeline instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from .errors import ImageError, ModelFileError, PatchCoreError
from .imagefiles import list_images, read_image, to_rgb
from .postprocess import eq7_weight, score_map
from .prediction import Prediction
from .resample import resize
from .search import CellSearch

EXPORT_FORMAT, EXPORT_VERSION = "patchcore-export", 1
META_FILE = "patchcore.json"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

ImageInput = Union[str, os.PathLike, np.ndarray]


def _items(images: ImageInput | Sequence[ImageInput]) -> list[tuple[str, ImageInput]]:
    """(name, source) pairs: a file, a folder of images, one array, or a list of files and arrays."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [(f"image_{i}", a) for i, a in enumerate(images)]
    if isinstance(images, (str, os.PathLike, np.ndarray)):
        images = [images]
    out: list[tuple[str, ImageInput]] = []
    for i, src in enumerate(images):
        if isinstance(src, np.ndarray):
            out.append((f"image_{i}", src))
        elif Path(src).is_dir():
            out += [(str(p), p) for p in list_images(src)]
        else:
            out.append((str(src), src))
    return out


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (exports record and check their files by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Runtime:
    """An exported model, loaded for scoring. Use :func:`load`."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 path: str = "auto") -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise PatchCoreError("the runtime needs onnxruntime: pip install onnxruntime "
                                 "(or pip install \"patchcore[runtime]\")") from None
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
        if device not in PROVIDERS:
            raise PatchCoreError(f"device must be one of {', '.join(PROVIDERS)}, got {device!r}")
        if PROVIDERS[device] not in ort.get_available_providers():
            raise PatchCoreError(f"onnxruntime here has no {PROVIDERS[device]}; install onnxruntime-gpu for cuda")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(graph), opts, providers=[PROVIDERS[device]])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for damaged graphs
            raise ModelFileError(f"{graph}: onnxruntime cannot load it ({type(e).__name__})") from None
        self.path = path
        if fast:
            arrays_path = folder / fast["search_file"]
            if not arrays_path.is_file() or file_sha256(arrays_path) != meta.get("search_sha256"):
                raise ModelFileError(f"{arrays_path}: missing, or not the one this export was written with (checksum)")
            with np.load(arrays_path, allow_pickle=False) as z:  # plain arrays only: loading runs no code
                arrays = {k: z[k] for k in z.files}
            self.bank = np.ascontiguousarray(arrays["bank"], dtype=np.float32)
            self.cells = CellSearch.from_arrays(self.bank, arrays)
            self.support = arrays.get("support")
            self.grid = tuple(fast["grid"])
        self.num_neighbors = int(meta.get("num_neighbors", 1))
        self.sigma = float(meta.get("sigma", 0.0))
        self.folder = folder
        self.meta: dict[str, Any] = meta
        prep = meta["preprocessing"]
        self.resize_to = tuple(prep["resize"])
        self.crop = tuple(prep["crop"]) if prep.get("crop") else None
        self.input_size = tuple(meta["input_size"])
        self.threshold: float | None = meta.get("threshold")
        self.pixel_threshold: float | None = meta.get("pixel_threshold")

    def _input(self, rgb: np.ndarray) -> np.ndarray:
        """The (1, 3, h, w) network input, as the PyTorch path's Preprocessing makes it."""
        a = rgb.astype(np.float32) / np.float32(255.0)
        if a.shape[:2] != self.resize_to:
            a = resize(a, self.resize_to, antialias=True)
        if self.crop is not None:
            top, left = self._crop_box()
            a = a[top:top + self.crop[0], left:left + self.crop[1]]
        return np.ascontiguousarray(np.clip(a, 0.0, 1.0).transpose(2, 0, 1)[None])

    def _crop_box(self) -> tuple[int, int]:
        (H, W), (h, w) = self.resize_to, self.crop
        return int(round((H - h) / 2.0)), int(round((W - w) / 2.0))

    def _to_image(self, amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """The input-size map back onto the image (outside a crop: the map's minimum, never an alarm)."""
        if self.crop is not None:
            full = np.full(self.resize_to, amap.min(), dtype=np.float32)
            top, left = self._crop_box()
            full[top:top + self.crop[0], left:left + self.crop[1]] = amap
            amap = full
        return resize(amap, size, antialias=False).astype(np.float32)

    def _fast(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """Score and input-size map from the network graph, the exact cell search and numpy post-processing:
        what the one-graph path computes, with a fraction of the bank compared."""
        (feats,) = self.session.run(None, {"image": x})
        q = feats[0]
        dist, nn_idx, _ = self.cells.nearest(q)
        j = int(dist.argmax())
        score = float(dist[j])
        if self.num_neighbors > 1 and self.support is not None:
            sup = self.support[int(nn_idx[j])]
            d = np.linalg.norm(self.bank[sup].astype(np.float64) - q[j].astype(np.float64), axis=1)
            score *= eq7_weight(d)
        return score, score_map(dist.reshape(self.grid), self.input_size, self.sigma)

    def score_array(self, rgb: np.ndarray, name: str = "image") -> Prediction:
        """Score one H x W x 3 uint8 image."""
        x = self._input(rgb)
        if self.path == "fast":
            score, amap = self._fast(x)
        else:
            s, m = self.session.run(None, {"image": x})
            score, amap = float(s[0]), m[0]
        return Prediction(name, score, self._to_image(amap, rgb.shape[:2]), self.threshold, self.pixel_threshold)

    def iter_predict(self, images: ImageInput | Sequence[ImageInput], skip_unreadable: bool = False
                     ) -> Iterator[Prediction]:
        """Yield a Prediction per image, one at a time (as a station scores them)."""
        self.skipped_: list[tuple[str, str]] = []
        for name, src in _items(images):
            try:
                rgb = to_rgb(src, name) if isinstance(src, np.ndarray) else read_image(src)
            except ImageError as e:
                if not skip_unreadable:
                    raise
                self.skipped_.append((name, str(e)))
                continue
            yield self.score_array(rgb, name)

    def predict(self, images: ImageInput | Sequence[ImageInput], skip_unreadable: bool = False) -> list[Prediction]:
        """Score images: a file, a folder, an array, or a list of files and arrays."""
        return list(self.iter_predict(images, skip_unreadable))

    def __repr__(self) -> str:
        src = self.meta.get("source_model", {})
        return f"Runtime({str(self.folder)!r}, backbone={src.get('backbone')!r}, threshold={self.threshold})"


def load(folder: str | os.PathLike, device: str = "cpu", threads: int | None = None, path: str = "auto") -> Runtime:
    """Load an export folder written by ``patchcore export`` / :func:`patchcore.export.export`.

    ``path="fast"`` runs the network graph and searches the bank exactly in numpy, comparing each patch with
    the cells that can hold its nearest neighbour; ``path="graph"`` runs the single graph of the whole
    pipeline (brute-force search inside onnxruntime). Both were checked against the model at export.
    ``"auto"`` (default) takes the fast path for a bank split into cells, the graph for a small bank.
    """
    return Runtime(folder, device, threads, path)
