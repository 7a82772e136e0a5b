"""Dataset readers: the MVTec AD layout and a plain good/defect folder layout.

Images are recognised by extension (see IMAGE_EXTENSIONS, case-insensitive); hidden files
and everything else (Thumbs.db, readme.txt, ...) are skipped. Lists are sorted by file name,
so the same folder always gives the same dataset. Readers only look at image headers.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from .core.imagefiles import IMAGE_EXTENSIONS, is_image_file
from .errors import DatasetError, ImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Dataset",
    "Sample",
    "image_size",
    "load_mask",
    "read_dataset",
    "read_folder",
    "read_mvtec",
]

_LAYOUTS = (
    "accepted layouts: MVTec (train/good/, test/<type>/, ground_truth/<type>/<stem>_mask.png) "
    "or folder (good/, optional defect/ or bad/, optional masks/<stem>_mask.png)"
)


@dataclass(frozen=True)
class Sample:
    """One test image: label 0 is good, 1 is defective; mask is None where there is none."""

    path: Path
    label: int
    defect_type: str
    mask: Path | None = None


@dataclass(frozen=True)
class Dataset:
    """Good training images and labelled test samples."""

    name: str
    train: list[Path]
    test: list[Sample]

    def check_masks(self) -> None:
        """Raise DatasetError if any mask's size differs from its image's size."""
        for sample in self.test:
            if sample.mask is not None:
                _check_same_size(sample.path, sample.mask)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) of an image, read from its header without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as error:
        raise ImageError(f"cannot read image {path}: {error}") from error


def load_mask(path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> NDArray[np.bool_]:
    """Read a mask as a (height, width) boolean array; True (defect) where its grey level >= 128.

    Any image mode is accepted and converted to 8-bit grey first. ``size`` is the
    (width, height) of the mask's image; a mask of another size raises DatasetError.
    """
    try:
        with Image.open(path) as image:
            if size is not None and image.size != tuple(size):
                raise DatasetError(f"mask {path} is {_wxh(image.size)} but its image is {_wxh(size)}; make them match")
            grey = np.asarray(image.convert("L"))
    except (OSError, UnidentifiedImageError) as error:
        raise ImageError(f"cannot read mask {path}: {error}") from error
    return grey >= 128


def read_mvtec(category_dir: str | os.PathLike[str]) -> Dataset:
    """Read an MVTec AD category folder.

    train/good/ holds the training images; test/<type>/ the test images, label 0 for type
    'good' and 1 otherwise; every defect image needs a mask ground_truth/<type>/<stem>_mask.*
    (good images may have one). Raises DatasetError for a missing or empty train/good/ or
    test/, a defect image without a mask, or a mask whose size differs from its image's.
    """
    root = _existing_dir(category_dir)
    train = _images(_existing_dir(root / "train" / "good"), required=True)
    test_dir = _existing_dir(root / "test")
    test: list[Sample] = []
    for type_dir in _subdirs(test_dir):
        masks = _masks_by_stem(root / "ground_truth" / type_dir.name, suffix="_mask")
        label = 0 if type_dir.name == "good" else 1
        for path in _images(type_dir):
            mask = masks.get(path.stem)
            if mask is None and label == 1:
                expected = root / "ground_truth" / type_dir.name / f"{path.stem}_mask.png"
                raise DatasetError(f"defect image {path} has no mask; expected {expected}")
            test.append(Sample(path, label, type_dir.name, mask))
    if not test:
        raise DatasetError(f"test folder {test_dir} has no images in its <type>/ subfolders")
    dataset = Dataset(root.name, train, test)
    dataset.check_masks()
    return dataset


def read_folder(root: str | os.PathLike[str], test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Read a plain folder: good/ images, optional defect/ (or bad/) images, optional masks/.

    Good images are split into training images and held-out good test images; about
    ``test_fraction`` of them are held out (at least one stays for training). The split
    depends only on file names and ``seed``, so it is the same on every machine. All defect
    images go to the test set, with defect_type 'defect' (or 'bad'); a defect image's mask
    is masks/<stem>_mask.* (preferred) or masks/<stem>.*, and may be missing (mask None).
    Raises DatasetError for a missing or empty good/, both defect/ and bad/ present,
    or a mask whose size differs from its image's.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    base = _existing_dir(root)
    good = _images(_existing_dir(base / "good"), required=True)
    defect_dirs = [base / name for name in ("defect", "bad") if (base / name).is_dir()]
    if len(defect_dirs) > 1:
        raise DatasetError(f"{base} has both defect/ and bad/; put all defective images in one of them")

    n_test = min(round(len(good) * test_fraction), len(good) - 1)
    # Rank by a hash of seed and name: a deterministic shuffle independent of library versions.
    ranked = sorted(good, key=lambda path: hashlib.sha256(f"{seed}/{path.name}".encode()).digest())
    held_out = set(ranked[:n_test])
    test = [Sample(path, 0, "good") for path in good if path in held_out]

    masks_dir = base / "masks"
    masks = {**_masks_by_stem(masks_dir, suffix=""), **_masks_by_stem(masks_dir, suffix="_mask")}
    for defect_dir in defect_dirs:
        test += [Sample(path, 1, defect_dir.name, masks.get(path.stem)) for path in _images(defect_dir)]
    dataset = Dataset(base.name, [path for path in good if path not in held_out], test)
    dataset.check_masks()
    return dataset


def read_dataset(path: str | os.PathLike[str], test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Read a dataset in either layout: MVTec if it has train/ or test/, folder if it has good/.

    ``test_fraction`` and ``seed`` apply to the folder layout only (see read_folder).
    """
    root = _existing_dir(path)
    if (root / "train").is_dir() or (root / "test").is_dir():
        return read_mvtec(root)
    if (root / "good").is_dir():
        return read_folder(root, test_fraction, seed)
    raise DatasetError(f"{root} matches no dataset layout; {_LAYOUTS}")


def _existing_dir(path: str | os.PathLike[str]) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise DatasetError(f"folder {folder} does not exist ({_LAYOUTS})")
    return folder


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _images(folder: Path, required: bool = False) -> list[Path]:
    """Image files in a folder, sorted by name; DatasetError if required and there are none."""
    images = sorted(path for path in folder.iterdir() if is_image_file(path))
    if required and not images:
        extensions = " ".join(sorted(IMAGE_EXTENSIONS))
        raise DatasetError(f"folder {folder} has no images; expected files ending in {extensions}")
    return images


def _subdirs(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if _visible(path) and path.is_dir())


def _masks_by_stem(folder: Path, suffix: str) -> dict[str, Path]:
    """Map image stem to mask for masks named <stem><suffix>.<image extension>."""
    if not folder.is_dir():
        return {}
    masks: dict[str, Path] = {}
    for path in _images(folder):
        if not path.stem.endswith(suffix):
            continue
        stem = path.stem[: len(path.stem) - len(suffix)]
        if stem in masks:
            raise DatasetError(f"two masks for image {stem!r}: {masks[stem]} and {path}; keep one")
        masks[stem] = path
    return masks


def _check_same_size(image: Path, mask: Path) -> None:
    image_wh, mask_wh = image_size(image), image_size(mask)
    if image_wh != mask_wh:
        raise DatasetError(f"mask {mask} is {_wxh(mask_wh)} but its image {image} is {_wxh(image_wh)}; make them match")


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
