"""Versions of the models a folder serves: every model the service loads is kept, and going back is one command.

Layout, next to the models (hidden folders, which the service does not serve)::

    MODELS_DIR/.versions/NAME/0001-<sha256[:12]>.safetensors   (or a folder, for an export)
    MODELS_DIR/.versions/NAME/versions.jsonl                      one line per version: when, sha256, source

When the service takes a model into service (:meth:`patchcore.registry.ModelRegistry`), its file is copied here
unless a version with the same content is already kept, so a model file later replaced by hand (a copy over
it, a new fit, an update) can still be brought back. At most ``KEEP`` versions are kept per name (the oldest
are removed). :func:`rollback` puts the version served before the current one back in place, by a copy and an
atomic rename: the service takes it up on its next scan, as any new file. ``patchcore rollback`` is the command.

Torch-free: the service and the command line share it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .core.files import atomic_folder, atomic_write, atomic_write_text, file_sha256
from .errors import PatchCoreError

__all__ = ["KEEP", "Version", "content_hash", "list_versions", "record", "rollback", "versions_dir"]

KEEP = 10
VERSIONS = ".versions"
_INDEX = "versions.jsonl"


@dataclass(frozen=True)
class Version:
    number: int
    sha256: str
    path: Path
    recorded_at: float
    source: str


def versions_dir(models_dir: str | os.PathLike, name: str) -> Path:
    return Path(models_dir) / VERSIONS / name


def content_hash(path: Path) -> str:
    """sha256 of a model file, or of an export folder's files (their names and hashes, in name order)."""
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def list_versions(models_dir: str | os.PathLike, name: str) -> list[Version]:
    """The kept versions of ``name``, oldest first (those whose copy is gone are left out)."""
    index = versions_dir(models_dir, name) / _INDEX
    if not index.is_file():
        return []
    out = []
    for line in index.read_text().splitlines():
        try:
            d = json.loads(line)
            v = Version(int(d["number"]), str(d["sha256"]), index.parent / d["file"], float(d["recorded_at"]),
                        str(d.get("source", "")))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash: the others still count
        if v.path.exists():
            out.append(v)
    return out


def _write_index(folder: Path, versions: list[Version]) -> None:
    atomic_write_text(folder / _INDEX, "".join(
        json.dumps({"number": v.number, "sha256": v.sha256, "file": v.path.name, "recorded_at": v.recorded_at,
                    "source": v.source}) + "\n" for v in versions))


def record(models_dir: str | os.PathLike, name: str, path: Path, sha256: str | None = None,
           source: str = "served", keep: int = KEEP) -> Version:
    """Keep a copy of the model at ``path`` as a version of ``name`` (none when the same content is kept
    already: that version is returned). The oldest versions beyond ``keep`` are removed."""
    sha256 = sha256 or content_hash(path)
    folder = versions_dir(models_dir, name)
    kept = list_versions(models_dir, name)
    for v in kept:
        if v.sha256 == sha256:
            return v
    folder.mkdir(parents=True, exist_ok=True)
    number = max((v.number for v in kept), default=0) + 1
    target = folder / f"{number:04d}-{sha256[:12]}{'' if path.is_dir() else path.suffix}"
    if path.is_dir():
        atomic_folder(target, lambda tmp: shutil.copytree(path, tmp, dirs_exist_ok=True))
    else:
        atomic_write(target, lambda tmp: shutil.copyfile(path, tmp))
    version = Version(number, sha256, target, time.time(), source)
    kept.append(version)
    for old in kept[:-keep] if keep > 0 else []:
        shutil.rmtree(old.path, ignore_errors=True) if old.path.is_dir() else old.path.unlink(missing_ok=True)
    _write_index(folder, kept[-keep:] if keep > 0 else kept)
    return version


def served_path(models_dir: str | os.PathLike, name: str) -> Path | None:
    """Where ``name`` is served from in ``models_dir``: NAME.safetensors, else the export folder NAME/."""
    from .registry import served_paths

    return served_paths(Path(models_dir)).get(name)


def rollback(models_dir: str | os.PathLike, name: str, to: int | None = None) -> tuple[Version, Version | None]:
    """Put back the version of ``name`` kept before the one in place now (or version number ``to``); returns
    (the version put back, the version it replaced when that one is kept). The file in place is kept as a
    version first, so a rollback can itself be undone with ``to``."""
    models_dir = Path(models_dir)
    current = served_path(models_dir, name)
    if current is None:
        raise PatchCoreError(f"{models_dir}: serves no model named {name!r}")
    now = record(models_dir, name, current, source="in place before a rollback")
    kept = list_versions(models_dir, name)
    if to is not None:
        chosen = next((v for v in kept if v.number == int(to)), None)
        if chosen is None:
            raise PatchCoreError(f"{name}: no version {to} is kept (kept: "
                                 f"{', '.join(str(v.number) for v in kept) or 'none'})")
    else:
        before = [v for v in kept if v.number < now.number]
        if not before:
            raise PatchCoreError(f"{name}: no version older than the one in place ({now.number}) is kept")
        chosen = before[-1]
    if chosen.sha256 == now.sha256:
        raise PatchCoreError(f"{name}: version {chosen.number} is the one in place")
    if current.is_dir():
        tmp = models_dir / f".{name}.rollback"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(chosen.path, tmp)
        old = models_dir / f".{name}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(current, old)
        os.replace(tmp, current)
        shutil.rmtree(old, ignore_errors=True)
    else:
        atomic_write(current, lambda tmp: shutil.copyfile(chosen.path, tmp))
    return chosen, now
