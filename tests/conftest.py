"""Shared fixtures: where the real data is, and small symlinked subsets of it (nothing is copied)."""

import os
from pathlib import Path

import pytest

DATA = Path(os.environ.get("PATCHCORE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def bottle() -> Path:
    """The MVTec AD bottle category (skips when the shared data is absent)."""
    path = DATA / "mvtec_ad" / "bottle"
    if not (path / "train" / "good").is_dir():
        pytest.skip(f"MVTec AD bottle not found under {DATA} (set PATCHCORE_DATA)")
    return path


def link_images(src: Path, dst: Path, names: list[str]) -> Path:
    """Make ``dst`` hold symlinks to ``src/<name>`` for each name (a subset of real images, no copies)."""
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        (dst / n).symlink_to((src / n).resolve())
    return dst
