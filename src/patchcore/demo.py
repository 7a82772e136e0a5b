"""A small synthetic inspection data set in the MVTec AD layout, so the tool can be tried anywhere.

The "part" is a machined disc with concentric grooves, a bore and six bolt holes on a textured plate, with
small random shifts, rotations and lighting changes from image to image. Defects are scratches, dents
(dark spots) and chips (missing material at the rim), each with its ground-truth mask. It is generated,
not shipped, so it is the same on every machine and carries no licence of its own.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from .errors import DatasetError

SIZE = 256
DEFECTS = ("scratch", "dent", "chip")


def _part(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cx, cy = SIZE / 2 + rng.normal(0, 2), SIZE / 2 + rng.normal(0, 2)
    angle = rng.uniform(0, 2 * np.pi)
    r = np.hypot(xx - cx, yy - cy)
    theta = np.arctan2(yy - cy, xx - cx) + angle
    plate = 0.35 + 0.04 * gaussian_filter(rng.normal(size=(SIZE, SIZE)), 2)
    disc = 0.62 + 0.05 * np.sin(r * 0.9) + 0.02 * np.cos(6 * theta)
    img = np.where(r < 92, disc, plate)
    img = np.where(r < 18, 0.15, img)  # bore
    for k in range(6):
        a = angle + k * np.pi / 3
        hx, hy = cx + 62 * np.cos(a), cy + 62 * np.sin(a)
        img = np.where(np.hypot(xx - hx, yy - hy) < 7, 0.2, img)
    img = gaussian_filter(img, 0.8) * rng.uniform(0.92, 1.08) + rng.normal(0, 0.012, img.shape)
    return img.astype(np.float32)


def _defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    c = SIZE / 2
    if kind == "scratch":
        a, rad = rng.uniform(0, 2 * np.pi), rng.uniform(30, 70)
        x0, y0 = c + rad * np.cos(a), c + rad * np.sin(a)
        b = rng.uniform(0, np.pi)
        dx, dy = np.cos(b), np.sin(b)
        t = (xx - x0) * dx + (yy - y0) * dy
        dist = np.abs((xx - x0) * dy - (yy - y0) * dx)
        mask = (dist < 1.8) & (np.abs(t) < rng.uniform(15, 30))
        img = np.where(mask, img + 0.3, img)
    elif kind == "dent":
        a, rad = rng.uniform(0, 2 * np.pi), rng.uniform(25, 80)
        x0, y0 = c + rad * np.cos(a), c + rad * np.sin(a)
        d = np.hypot(xx - x0, yy - y0)
        size = rng.uniform(5, 9)
        mask = d < size
        img = img - 0.25 * np.exp(-(d / size) ** 2 * 2)
    else:  # chip: a bite out of the rim, showing the plate
        a = rng.uniform(0, 2 * np.pi)
        x0, y0 = c + 92 * np.cos(a), c + 92 * np.sin(a)
        mask = (np.hypot(xx - x0, yy - y0) < rng.uniform(10, 16)) & (np.hypot(xx - c, yy - c) < 93)
        img = np.where(mask, 0.33, img)
    return img.astype(np.float32), mask


def _write(path: Path, img: np.ndarray) -> None:
    Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(path)


def _is_earlier_demo(cat: Path) -> bool:
    """True when everything under ``cat`` is named as make_demo names its own folders and files."""
    kinds = "|".join(DEFECTS)
    folders = re.compile(rf"train|train/good|test|test/(good|{kinds})|ground_truth|ground_truth/({kinds})")
    files = re.compile(rf"(train/good|test/(good|{kinds}))/\d+\.png|ground_truth/({kinds})/\d+_mask\.png")
    for p in cat.rglob("*"):
        rel = p.relative_to(cat).as_posix()
        if p.is_symlink() or not (folders if p.is_dir() else files).fullmatch(rel):
            return False
    return True


def make_demo(root: str | os.PathLike, n_train: int = 60, n_test_good: int = 12, n_per_defect: int = 8,
              seed: int = 0, overwrite: bool = False) -> Path:
    """Write the demo category ``root/disc`` in the MVTec layout and return its folder.

    Refuses to write into a ``root/disc`` that already holds files, so nothing of the user's is overwritten.
    With ``overwrite``, an earlier demo there is replaced; still refused when ``root/disc`` holds anything
    the demo does not write (then it is not ours to delete). Nothing outside ``root/disc`` is touched.
    """
    root = Path(root)
    cat = root / "disc"
    if cat.exists() and not cat.is_dir():
        raise DatasetError(f"{cat} exists and is not a folder; pick another folder")
    if cat.exists() and any(cat.iterdir()):
        if not overwrite:
            raise DatasetError(f"{cat} already exists and is not empty; pick another folder or pass overwrite=True")
        if cat.is_symlink() or not _is_earlier_demo(cat):
            raise DatasetError(f"{cat} holds files the demo did not write; not replacing it, pick another folder")
        shutil.rmtree(cat)
    rng = np.random.default_rng(seed)
    (cat / "train" / "good").mkdir(parents=True, exist_ok=True)
    (cat / "test" / "good").mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        _write(cat / "train" / "good" / f"{i:03d}.png", _part(rng))
    for i in range(n_test_good):
        _write(cat / "test" / "good" / f"{i:03d}.png", _part(rng))
    for kind in DEFECTS:
        (cat / "test" / kind).mkdir(parents=True)
        (cat / "ground_truth" / kind).mkdir(parents=True)
        for i in range(n_per_defect):
            img, mask = _defect(_part(rng), kind, rng)
            _write(cat / "test" / kind / f"{i:03d}.png", img)
            Image.fromarray(mask.astype(np.uint8) * 255).save(cat / "ground_truth" / kind / f"{i:03d}_mask.png")
    return cat
