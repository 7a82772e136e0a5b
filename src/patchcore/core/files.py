"""Writing files so that a crash never leaves half of one, and reading back what we wrote, checked.

Every file the package writes for users (model files, results, reports, exports) goes through
:func:`atomic_write`: the content is written to a hidden file next to its target and renamed into place, so
a reader sees the old file or the new one, never a torn one. Files are created like any other file of the
user's (their umask decides who may read them), not with ``tempfile``'s owner-only 0600 (nor
safetensors', which writes 0600 too).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import PatchCoreError


def umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_name(path: Path) -> Path:
    # Keeps the target's suffix: some writers (numpy, Pillow) choose the format by it.
    return path.with_name(f".{path.stem}.{os.getpid()}.{id(path):x}.tmp{path.suffix}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], overwrite: bool = True) -> Path:
    """Call ``write(tmp)`` to write the file, then rename it onto ``path``; on any failure nothing is left.

    With ``overwrite=False`` an existing ``path`` is an error, raised before anything is written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise PatchCoreError(f"{path} already exists; choose another name or allow overwriting")
    if not path.parent.is_dir():
        raise PatchCoreError(f"{path.parent}: folder does not exist")
    tmp = _temp_name(path)
    try:
        write(tmp)
        # Some writers (safetensors) create their file 0600 whatever the umask: a user's file is the umask's.
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), overwrite)


def atomic_folder(target: str | os.PathLike, fill: Callable[[Path], object], replace: bool = False) -> Path:
    """Make a folder by filling a hidden sibling with ``fill(tmp)`` and renaming it onto ``target``.

    ``replace``: an existing ``target`` is removed just before the rename (the caller has checked that it is
    ours to replace). On any failure the hidden folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()  # the umask's permissions, unlike tempfile.mkdtemp's 0700
    try:
        fill(tmp)
        if target.exists() and replace:
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (exports and resumable runs record files by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
