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


@pytest.fixture(scope="session")
def small_model(bottle, tmp_path_factory) -> Path:
    """A small model fitted on 10 good bottle images (1 % coreset, 3-fold cross-fitted calibration, target 10 %),
    saved once per session for the tests that need a model file rather than a particular fit."""
    from patchcore import PatchCore

    root = tmp_path_factory.mktemp("small_model")
    good = sorted((bottle / "train" / "good").iterdir())[::20][:10]
    model = PatchCore(coreset_ratio=0.01, calibration_folds=3, target_far=0.1, device="cpu").fit(good)
    return model.save(root / "bottle.safetensors")
