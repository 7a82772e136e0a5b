"""The models of one folder, by file stem, kept in step with the folder while they serve.

A model file is taken into service only when it has stayed the same (size, modification time, inode) for one
scan interval, has loaded completely, was not changed while loading, has a calibrated threshold and has
scored a warm-up image. Until then, and whenever a new version fails, the version already serving keeps
serving and the failure is reported by name. So a half-copied file is never served: a copy in progress
changes between scans, and a truncated safetensors file does not load. Writers that save next to the
target and rename into place (``PatchCore.save`` does) are picked up on the first stable scan.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import versions
from .core.drift import DriftMonitor
from .errors import PatchCoreError
from .inference import Thresholds, load_model, thresholds_in_force
from .runtime import META_FILE as EXPORT_META  # what makes a folder an export
from .runtime import load as load_export

__all__ = ["ModelEntry", "ModelRegistry", "MODEL_SUFFIX", "served_paths", "kind_of"]

log = logging.getLogger("patchcore.registry")

MODEL_SUFFIX = ".safetensors"
Signature = tuple[int, int, int]  # size, mtime_ns, inode


@dataclass
class ModelEntry:
    """A model in service."""

    name: str
    path: Path
    model: Any
    thresholds: Thresholds
    signature: Signature
    loaded_at: float = field(default_factory=time.time)
    version: int | None = None  # its number among the kept versions (patchcore.versions), None when not kept
    drift: DriftMonitor | None = None  # the recent scores against the calibration's; None when uncalibrated


@dataclass
class LoadFailure:
    name: str
    path: Path
    detail: str
    signature: Signature
    at: float = field(default_factory=time.time)


def kind_of(path: Path) -> str:
    """"export" for an export folder (served by the torch-free runtime), else "model file"."""
    return "export" if path.is_dir() else "model file"


def served_paths(folder: Path) -> dict[str, Path]:
    """What a folder serves, by name: every ``NAME.safetensors`` model file and every export folder ``NAME/``
    (one that holds ``patchcore.json``); hidden ones are left out. A model file and an export of one name: the
    model file serves (the export is logged, to be renamed)."""
    files = {p.stem: p for p in sorted(folder.iterdir())
             if p.suffix == MODEL_SUFFIX and not p.name.startswith(".") and p.is_file()}
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not p.name.startswith(".") and (p / EXPORT_META).is_file():
            if p.name in files:
                log.warning("export folder %s has the name of model file %s, which serves; rename the folder",
                            p, files[p.name].name)
                continue
            files[p.name] = p
    return dict(sorted(files.items()))


def _signature(path: Path) -> Signature | None:
    try:
        # An export is written to a hidden folder and renamed into place: its metadata file is new each time.
        st = (path / EXPORT_META).stat() if path.is_dir() else path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def load_and_warm(path: Path, device: str = "cpu") -> tuple[Any, Thresholds]:
    """Load a model file (PatchCore) or an export folder (the torch-free runtime) and score one blank image,
    so that the network, the bank's index and the weights' fingerprint check happen now and not on the first
    request."""
    if path.is_dir():
        model = load_export(path, device=device)
    else:
        model = load_model(path, device=device)
    thresholds = thresholds_in_force(model, model_name=path.name)
    model.predict([np.full((64, 64, 3), 128, np.uint8)])
    return model, thresholds


class ModelRegistry:
    """Every ``*.safetensors`` file of ``folder`` as a model named by its stem, and every export folder by its
    name (:func:`served_paths`; hidden ones are left out).

    ``scan()`` brings the served set in step with the folder once; ``start(interval)`` does so in a thread
    every ``interval`` seconds. ``on_event(kind, name, detail)`` hears of "loaded", "failed" and "removed".
    Every model taken into service is kept as a version (:mod:`patchcore.versions`, at most ``keep_versions``
    per name; 0 keeps none), and gets a drift monitor of its scores (:mod:`patchcore.core.drift`).
    """

    def __init__(self, folder: str | os.PathLike, device: str = "cpu",
                 loader: Callable[[Path, str], tuple[Any, Thresholds]] = load_and_warm,
                 on_event: Callable[[str, str, str], None] | None = None,
                 keep_versions: int = versions.KEEP) -> None:
        self.folder = Path(folder)
        self.device = device
        self.keep_versions = int(keep_versions)
        self._loader = loader
        self._on_event = on_event
        self._entries: dict[str, ModelEntry] = {}
        self._failures: dict[str, LoadFailure] = {}
        self._seen: dict[str, Signature] = {}  # signature at the previous scan, for the stability check
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.scans = 0

    # ------------------------------------------------------------------------------------------- reading
    def get(self, name: str) -> ModelEntry | None:
        return self._entries.get(name)

    def entries(self) -> list[ModelEntry]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    def failures(self) -> list[LoadFailure]:
        return sorted(self._failures.values(), key=lambda f: f.name)

    @property
    def ready(self) -> bool:
        """The folder has been scanned once and at least one model serves."""
        return self.scans > 0 and bool(self._entries)

    # ------------------------------------------------------------------------------------------ scanning
    def _files(self) -> dict[str, Path]:
        try:
            return served_paths(self.folder)
        except OSError as e:
            log.warning("cannot list %s: %s", self.folder, _one_line(e))
            return {}

    def scan(self) -> None:
        """Load new and changed files that have stayed the same since the last scan (on the first scan, all),
        and stop serving models whose file is gone."""
        files = self._files()
        first = self.scans == 0
        for name in [n for n in self._entries if n not in files]:
            with self._lock:
                self._entries.pop(name, None)
            self._event("removed", name, "file removed")
        for name in [n for n in self._failures if n not in files]:
            self._failures.pop(name, None)
        for name, path in files.items():
            sig = _signature(path)
            if sig is None:
                continue
            previous, self._seen[name] = self._seen.get(name), sig
            current = self._entries.get(name)
            if current is not None and current.signature == sig:
                continue
            failed = self._failures.get(name)
            if failed is not None and failed.signature == sig:
                continue  # reported already; tried again once the file changes
            if not first and previous != sig:
                continue  # new or still changing: wait until it has stayed the same for one interval
            self._load(name, path, sig)
        for name in [n for n in self._seen if n not in files]:
            self._seen.pop(name, None)
        self.scans += 1

    def take(self, name: str) -> None:
        """Load ``name``'s file now, without waiting for a stable scan: for a file this process has just put in
        place whole (an applied update). The version serving keeps serving if it fails."""
        path = self._files().get(name)
        sig = None if path is None else _signature(path)
        if sig is None:
            raise PatchCoreError(f"{name}: its model file is gone")
        self._seen[name] = sig
        self._load(name, path, sig)

    def _load(self, name: str, path: Path, sig: Signature) -> None:
        try:
            model, thresholds = self._loader(path, self.device)
        except (PatchCoreError, OSError, ValueError, MemoryError) as e:
            self._fail(name, path, sig, _one_line(e))
            return
        except Exception as e:  # noqa: BLE001 - a bad file must never stop the models that serve
            log.exception("unexpected error loading %s", path)
            self._fail(name, path, sig, f"{type(e).__name__}: {_one_line(e)}")
            return
        if _signature(path) != sig:
            return  # changed while loading: the next stable scan loads the new version
        version = None
        if self.keep_versions > 0:
            try:
                version = versions.record(self.folder, name, path, keep=self.keep_versions).number
            except OSError as e:  # a read-only folder still serves; it only cannot go back
                log.warning("model %s: not kept as a version (%s)", name, _one_line(e))
        drift = DriftMonitor.for_calibration(dict(getattr(model, "calibration_", None) or {}), thresholds.image)
        with self._lock:
            self._entries[name] = ModelEntry(name, path, model, thresholds, sig, version=version, drift=drift)
        self._failures.pop(name, None)
        self._event("loaded", name, str(path))

    def _fail(self, name: str, path: Path, sig: Signature, detail: str) -> None:
        # Reported to clients (the listing, the page): the server's own paths are not theirs to see.
        for where, shown in ((str(path.resolve()), path.name), (str(path), path.name),
                             (str(self.folder.resolve()), "."), (str(self.folder), ".")):
            detail = detail.replace(where, shown)
        self._failures[name] = LoadFailure(name, path, detail, sig)
        serving = " (the version loaded before keeps serving)" if name in self._entries else ""
        self._event("failed", name, detail + serving)

    def _event(self, kind: str, name: str, detail: str) -> None:
        (log.warning if kind == "failed" else log.info)("model %s %s: %s", name, kind, detail)
        if self._on_event is not None:
            self._on_event(kind, name, detail)

    # ------------------------------------------------------------------------------------------- thread
    def start(self, interval: float) -> None:
        """Scan now and then every ``interval`` seconds in a daemon thread, until :meth:`stop`."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.scan()
                except Exception:  # noqa: BLE001 - keep watching whatever one scan hit
                    log.exception("model folder scan failed")
                self._stop.wait(interval)

        self._thread = threading.Thread(target=loop, name="patchcore-models", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
