import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore.datasets import Dataset, Sample, image_size, load_mask, read_dataset, read_folder, read_mvtec
from patchcore.errors import DatasetError, ImageError

DATA = Path(os.environ.get("PATCHCORE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
MVTEC = DATA / "mvtec_ad"


def write_image(path: Path, size: tuple[int, int] = (8, 6), mode: str = "RGB", value: int = 100) -> Path:
    """Write a small uniform image of the given (width, height) and mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode in ("L", "1") else (value,) * len(mode)).save(path)
    return path


def make_mvtec(root: Path, size: tuple[int, int] = (8, 6)) -> Path:
    """A tiny MVTec category: 3 train, 2 good test, 2 'crack' test images with masks."""
    for i in range(3):
        write_image(root / "train" / "good" / f"{i:03d}.png", size)
    for i in range(2):
        write_image(root / "test" / "good" / f"{i:03d}.png", size)
        write_image(root / "test" / "crack" / f"{i:03d}.png", size)
        write_image(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", size, mode="L", value=255)
    return root


def make_folder(root: Path, n_good: int = 10) -> Path:
    for i in range(n_good):
        write_image(root / "good" / f"g{i:02d}.png")
    for i in range(3):
        write_image(root / "defect" / f"d{i}.png")
    write_image(root / "masks" / "d0_mask.png", mode="L")
    write_image(root / "masks" / "d1.png", mode="L")
    return root


# --- real data ------------------------------------------------------------------------------

needs_data = pytest.mark.skipif(not MVTEC.is_dir(), reason=f"MVTec AD data not found at {MVTEC}")


@needs_data
@pytest.mark.parametrize(
    ("category", "n_train", "n_good", "n_defect"),
    [("bottle", 209, 20, 63), ("screw", 320, 41, 119)],
)
def test_real_mvtec_counts(category: str, n_train: int, n_good: int, n_defect: int) -> None:
    dataset = read_mvtec(MVTEC / category)
    assert dataset.name == category
    assert len(dataset.train) == n_train
    assert len(dataset.test) == n_good + n_defect
    assert sum(s.label == 0 for s in dataset.test) == n_good
    assert sum(s.mask is not None for s in dataset.test) == n_defect
    assert all((s.label == 0) == (s.defect_type == "good") for s in dataset.test)
    assert all(s.mask is None or s.mask.name == f"{s.path.stem}_mask.png" for s in dataset.test)
    assert dataset.train == sorted(dataset.train)
    assert read_dataset(MVTEC / category) == dataset


@needs_data
def test_real_screw_is_grayscale_and_masks_load() -> None:
    sample = next(s for s in read_mvtec(MVTEC / "screw").test if s.label == 1)
    with Image.open(sample.path) as image:
        assert image.mode == "L"
    assert image_size(sample.path) == (256, 256)
    mask = load_mask(sample.mask, image_size(sample.path))
    assert mask.dtype == bool and mask.shape == (256, 256) and 0 < mask.sum() < mask.size


# --- MVTec layout ------------------------------------------------------------------------------


def test_mvtec_order_labels_and_masks(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "toy")
    dataset = read_mvtec(root)
    assert dataset.name == "toy"
    assert [p.name for p in dataset.train] == ["000.png", "001.png", "002.png"]
    assert dataset.test == [
        Sample(root / "test/crack/000.png", 1, "crack", root / "ground_truth/crack/000_mask.png"),
        Sample(root / "test/crack/001.png", 1, "crack", root / "ground_truth/crack/001_mask.png"),
        Sample(root / "test" / "good" / "000.png", 0, "good", None),
        Sample(root / "test" / "good" / "001.png", 0, "good", None),
    ]


def test_mvtec_ignores_stray_files(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "toy")
    for folder in ("train/good", "test/good", "test/crack", "ground_truth/crack", "test"):
        for name in (".DS_Store", "Thumbs.db", "readme.txt", "._000.png"):
            (root / folder / name).write_bytes(b"junk")
    write_image(root / "test" / ".ipynb_checkpoints" / "x.png")
    dataset = read_mvtec(root)
    assert len(dataset.train) == 3
    assert [(s.defect_type, s.path.name) for s in dataset.test] == [
        ("crack", "000.png"), ("crack", "001.png"), ("good", "000.png"), ("good", "001.png"),
    ]


def test_mvtec_accepts_other_extensions_grayscale_and_varying_sizes(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "toy")
    write_image(root / "train" / "good" / "003.JPG", (20, 11), mode="L")
    write_image(root / "test" / "crack" / "002.bmp", (5, 7), mode="L")
    write_image(root / "ground_truth" / "crack" / "002_mask.tif", (5, 7), mode="L")
    dataset = read_mvtec(root)
    assert dataset.train[-1].name == "003.JPG"
    assert dataset.test[2].mask == root / "ground_truth" / "crack" / "002_mask.tif"


def test_mvtec_good_image_may_have_a_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "toy")
    write_image(root / "ground_truth" / "good" / "000_mask.png", mode="L", value=0)
    good = [s for s in read_mvtec(root).test if s.label == 0]
    assert good[0].mask is not None and good[1].mask is None


def test_mvtec_defect_without_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "toy")
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"crack/001\.png has no mask"):
        read_mvtec(root)


def test_mvtec_mask_of_wrong_size(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "toy")
    write_image(root / "ground_truth" / "crack" / "001_mask.png", (6, 8), mode="L")
    with pytest.raises(DatasetError, match=r"001_mask\.png is 6x8 but its image .*001\.png is 8x6"):
        read_mvtec(root)


def test_mvtec_two_masks_for_one_image(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "toy")
    write_image(root / "ground_truth" / "crack" / "001_mask.bmp", mode="L")
    with pytest.raises(DatasetError, match="two masks"):
        read_mvtec(root)


@pytest.mark.parametrize(
    ("change", "folder"),
    [
        (lambda root: [p.unlink() for p in (root / "train" / "good").iterdir()], "train/good has no images"),
        (lambda root: [p.rename(p.with_suffix(".txt")) for p in (root / "train/good").iterdir()], "train/good"),
        (lambda root: (root / "train" / "good").rename(root / "train" / "ok"), "train/good does not exist"),
        (lambda root: (root / "test").rename(root / "tests"), "test does not exist"),
        (lambda root: [p.unlink() for p in (root / "test").glob("*/*")], "test has no images"),
    ],
)
def test_mvtec_missing_or_empty_folders(tmp_path: Path, change, folder: str) -> None:
    root = make_mvtec(tmp_path / "toy")
    change(root)
    with pytest.raises(DatasetError, match=folder):
        read_mvtec(root)


# --- masks and sizes ---------------------------------------------------------------------------


def test_load_mask_threshold_modes_and_size(tmp_path: Path) -> None:
    grey = np.array([[0, 127], [128, 255], [1, 200]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "m.png")
    expected = np.array([[False, False], [True, True], [False, True]])
    assert np.array_equal(load_mask(tmp_path / "m.png"), expected)
    assert np.array_equal(load_mask(tmp_path / "m.png", (2, 3)), expected)
    Image.fromarray(grey).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(grey >= 128).save(tmp_path / "bits.png")  # mode "1"
    assert np.array_equal(load_mask(tmp_path / "rgb.png"), expected)
    assert np.array_equal(load_mask(tmp_path / "bits.png"), expected)
    with pytest.raises(DatasetError, match=r"m\.png is 2x3 but its image is 3x2"):
        load_mask(tmp_path / "m.png", (3, 2))


def test_unreadable_files_raise_image_error(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match="bad.png"):
        image_size(tmp_path / "bad.png")
    with pytest.raises(ImageError, match="bad.png"):
        load_mask(tmp_path / "bad.png")


def test_image_size_is_width_height(tmp_path: Path) -> None:
    assert image_size(write_image(tmp_path / "a.png", (13, 4))) == (13, 4)


def test_check_masks(tmp_path: Path) -> None:
    image = write_image(tmp_path / "a.png", (4, 4))
    mask = write_image(tmp_path / "a_mask.png", (4, 5), mode="L")
    Dataset("x", [image], [Sample(image, 0, "good")]).check_masks()
    with pytest.raises(DatasetError, match="4x5"):
        Dataset("x", [image], [Sample(image, 1, "hole", mask)]).check_masks()


# --- folder layout -----------------------------------------------------------------------------


def test_folder_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "mine")
    dataset = read_folder(root)
    assert dataset == read_folder(root)
    good_test = [s.path for s in dataset.test if s.label == 0]
    assert len(good_test) == 2 and len(dataset.train) == 8
    assert not set(good_test) & set(dataset.train)
    assert sorted(good_test + dataset.train) == sorted((root / "good").iterdir())
    assert dataset.train == sorted(dataset.train)
    splits = {tuple(s.path for s in read_folder(root, seed=seed).test if s.label == 0) for seed in range(5)}
    assert len(splits) > 1


def test_folder_defects_and_optional_masks(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "mine")
    (root / "good" / ".DS_Store").write_bytes(b"junk")
    (root / "masks" / "Thumbs.db").write_bytes(b"junk")
    defects = [s for s in read_folder(root).test if s.label == 1]
    assert [s.path.name for s in defects] == ["d0.png", "d1.png", "d2.png"]
    assert {s.defect_type for s in defects} == {"defect"}
    assert [s.mask and s.mask.name for s in defects] == ["d0_mask.png", "d1.png", None]


def test_folder_edge_cases(tmp_path: Path) -> None:
    root = tmp_path / "one"
    write_image(root / "good" / "only.png")
    write_image(root / "bad" / "x.png")
    dataset = read_folder(root, test_fraction=0.9)
    assert [p.name for p in dataset.train] == ["only.png"]
    assert dataset.test == [Sample(root / "bad" / "x.png", 1, "bad", None)]
    assert [s.label for s in read_folder(make_folder(tmp_path / "all"), test_fraction=0).test] == [1, 1, 1]
    with pytest.raises(ValueError, match="test_fraction"):
        read_folder(root, test_fraction=1.0)
    write_image(root / "defect" / "y.png")
    with pytest.raises(DatasetError, match="both defect/ and bad/"):
        read_folder(root)


def test_folder_errors(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "mine")
    write_image(root / "masks" / "d2_mask.png", (3, 3), mode="L")
    with pytest.raises(DatasetError, match="3x3"):
        read_folder(root)
    (root / "empty" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="good has no images"):
        read_folder(root / "empty")


# --- layout detection --------------------------------------------------------------------------


def test_read_dataset_detects_layouts(tmp_path: Path) -> None:
    mvtec = make_mvtec(tmp_path / "toy")
    folder = make_folder(tmp_path / "mine")
    assert read_dataset(mvtec) == read_mvtec(mvtec)
    assert read_dataset(str(folder), test_fraction=0.5, seed=3) == read_folder(folder, 0.5, 3)
    (tmp_path / "neither" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="matches no dataset layout.*MVTec.*train/good.*folder.*good/"):
        read_dataset(tmp_path / "neither")
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "missing")
