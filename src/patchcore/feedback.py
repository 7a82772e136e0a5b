"""The operator's verdicts on the service's predictions: what they overruled and what they confirmed.

The service answers every prediction with an ``id`` and holds the recent uploads in memory (:class:`Recent`:
at most ``RECENT_IMAGES`` images and ``RECENT_BYTES`` bytes, the oldest dropped first). ``POST
/v1/models/{name}:feedback`` with ``{"id": ..., "label": "good" | "defect"}`` then files the image in the store
next to the models::

    MODELS_DIR/.feedback/NAME/good/<id>.<ext>      images the operator called good (overruled false alarms
                                                   and confirmed good verdicts)
    MODELS_DIR/.feedback/NAME/defect/<id>.<ext>    images the operator called defective (for the record)
    MODELS_DIR/.feedback/NAME/applied/<n>/...      good images an update has taken into the model
    MODELS_DIR/.feedback/NAME/feedback.jsonl       one line per verdict: id, label, the model's score,
                                                   verdict and threshold, the model's version, when

The store is bounded: at most ``STORE_IMAGES`` images per label and model (the oldest are removed, their lines
kept). ``patchcore update MODEL MODELS_DIR/.feedback/NAME/good -o NEW`` applies the good ones by hand; the
service's ``:apply-feedback`` does the same and puts the new model in place (the old one stays a version).

Torch-free: the service and the command line share it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .core.files import atomic_write
from .core.imagefiles import list_images
from .errors import PatchCoreError

__all__ = ["FEEDBACK", "LABELS", "Held", "Recent", "FeedbackStore"]

FEEDBACK = ".feedback"
LABELS = ("good", "defect")
RECENT_IMAGES = 256
RECENT_BYTES = 256 * 2 ** 20
STORE_IMAGES = 1000
_SUFFIXES = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"BM": ".bmp", b"II*\x00": ".tif", b"MM\x00*": ".tif",
             b"RIFF": ".webp"}


@dataclass(frozen=True)
class Held:
    """A recent prediction, held until the operator's verdict on it (or until newer ones push it out)."""

    id: str
    model: str
    version: int | None
    score: float
    verdict: str
    threshold: float
    data: bytes
    at: float


class Recent:
    """The recent predictions by id, bounded in count and bytes, thread-safe."""

    def __init__(self, max_images: int = RECENT_IMAGES, max_bytes: int = RECENT_BYTES) -> None:
        self.max_images, self.max_bytes = int(max_images), int(max_bytes)
        self._held: OrderedDict[str, Held] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, held: Held) -> None:
        if self.max_images <= 0 or len(held.data) > self.max_bytes:
            return
        with self._lock:
            self._held[held.id] = held
            self._bytes += len(held.data)
            while len(self._held) > self.max_images or self._bytes > self.max_bytes:
                _, old = self._held.popitem(last=False)
                self._bytes -= len(old.data)

    def get(self, id: str) -> Held | None:
        with self._lock:
            return self._held.get(id)

    def __len__(self) -> int:
        return len(self._held)


def _suffix(data: bytes) -> str:
    return next((s for magic, s in _SUFFIXES.items() if data.startswith(magic)), ".img")


class FeedbackStore:
    """The feedback of the models of ``models_dir`` (see the module's docstring), thread-safe."""

    def __init__(self, models_dir: str | os.PathLike, max_images: int = STORE_IMAGES) -> None:
        self.root = Path(models_dir) / FEEDBACK
        self.max_images = int(max_images)
        self._lock = threading.Lock()

    def folder(self, name: str, label: str = "good") -> Path:
        return self.root / name / label

    def add(self, held: Held, label: str, note: str | None = None) -> dict:
        """File ``held`` under ``label``; returns its line of feedback.jsonl. The same id given again replaces
        the earlier verdict (an operator's correction)."""
        if label not in LABELS:
            raise PatchCoreError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        with self._lock:
            for other in LABELS:  # a corrected verdict moves the image
                for old in self.folder(held.model, other).glob(f"{held.id}.*"):
                    old.unlink()
            folder = self.folder(held.model, label)
            folder.mkdir(parents=True, exist_ok=True)
            path = atomic_write(folder / f"{held.id}{_suffix(held.data)}", lambda p: p.write_bytes(held.data))
            line = {"id": held.id, "label": label, "overrules": (label == "good") == (held.verdict == "anomalous"),
                    "score": held.score, "verdict": held.verdict, "threshold": held.threshold,
                    "model_version": held.version, "predicted_at": held.at, "at": time.time(),
                    "file": f"{label}/{path.name}", "note": note}
            with open(self.root / held.model / "feedback.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            files = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns)
            for old in files[:max(0, len(files) - self.max_images)]:
                old.unlink()
            return line

    def good_images(self, name: str) -> list[Path]:
        """The good images not yet applied to the model."""
        folder = self.folder(name, "good")
        return list_images(folder) if folder.is_dir() else []

    def counts(self, name: str) -> dict[str, int]:
        return {label: len(list_images(self.folder(name, label))) if self.folder(name, label).is_dir() else 0
                for label in LABELS}

    def mark_applied(self, name: str, files: list[Path], version: int | None) -> Path:
        """Move good images an update took in out of good/, into applied/<version>/ (so none is applied twice)."""
        target = self.root / name / "applied" / str(version if version is not None else int(time.time()))
        target.mkdir(parents=True, exist_ok=True)
        with self._lock:
            for f in files:
                if f.exists():
                    shutil.move(str(f), target / f.name)
        return target
