"""Reading what users hand us: every odd image either becomes RGB uint8 or gives a clear ImageError."""

import numpy as np
import pytest
from PIL import Image

from patchcore.core.geometry import Preprocessing
from patchcore.core.imagefiles import as_items, list_images, read_image, to_rgb
from patchcore.errors import ImageError
from patchcore.settings import PRESETS


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_grayscale_rgba_palette_become_rgb(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    rgba = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    a = read_image(_save(tmp_path / "g.png", gray))
    assert a.shape == (40, 50, 3) and a.dtype == np.uint8
    assert (a[..., 0] == gray).all() and (a[..., 2] == gray).all()
    b = read_image(_save(tmp_path / "a.png", rgba))
    assert (b == rgba[..., :3]).all()
    pal = Image.fromarray(rgba[..., :3]).convert("P")
    pal.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (40, 50, 3)


def test_16bit_png_scaled_over_full_range(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "d.png")
    a = read_image(tmp_path / "d.png")
    assert a.shape == (48, 64, 3)
    assert a.min() == 0 and a.max() == 255
    assert np.abs(a[..., 0].astype(int) - np.round(ramp / 257.0)).max() <= 1


def test_arrays_of_every_kind():
    rng = np.random.default_rng(1)
    f = rng.random((33, 40))
    assert to_rgb(f).shape == (33, 40, 3)
    assert (to_rgb(np.ones((33, 33, 1), np.uint8)) == 1).all()
    with pytest.raises(ImageError, match="float images must lie"):
        to_rgb(f * 3)
    with pytest.raises(ImageError, match="shape"):
        to_rgb(np.zeros((2, 40, 40, 3), np.uint8))


def test_tiny_image_refused(tmp_path):
    with pytest.raises(ImageError, match="at least 32x32"):
        read_image(_save(tmp_path / "t.png", np.zeros((10, 300, 3), np.uint8)))


def test_unreadable_files_name_the_file(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="notes.png: not a readable image"):
        read_image(tmp_path / "notes.png")
    _save(tmp_path / "ok.png", np.zeros((64, 64, 3), np.uint8))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing.png")


def test_folders(tmp_path):
    with pytest.raises(ImageError, match="holds no images"):
        as_items(tmp_path)
    _save(tmp_path / "b.png", np.zeros((64, 64, 3), np.uint8))
    _save(tmp_path / "a.jpg", np.zeros((64, 64, 3), np.uint8))
    (tmp_path / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "readme.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    with pytest.raises(ImageError, match="no such file or folder"):
        as_items(tmp_path / "nope")


def test_array_batches_and_single_images():
    assert len(as_items(np.zeros((5, 64, 64, 3), np.uint8))) == 5
    assert len(as_items(np.zeros((5, 64, 64), np.uint8))) == 5
    assert len(as_items(np.zeros((64, 64, 3), np.uint8))) == 1
    assert len(as_items([np.zeros((64, 64), np.uint8), np.zeros((70, 64), np.uint8)])) == 2


def test_preprocessing_resize_crop_and_back():
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, 200:] = 255
    full = PRESETS["full"].preprocessing
    x = full([img])
    assert x.shape == (1, 3, 288, 288) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    paper = PRESETS["paper"].preprocessing
    assert paper([img]).shape == (1, 3, 224, 224)
    assert paper.crop_box() == (16, 16, 224, 224)
    # A map at input size comes back at the image's own size; outside the crop it is the minimum.
    m = paper.to_image(np.ones((224, 224), np.float32) * 5, (300, 400))
    assert m.shape == (300, 400)
    rows, cols = paper.region((300, 400))
    assert m[0, 0] == 5 and (rows.start, rows.stop) == (19, 281) and (cols.start, cols.stop) == (25, 375)
    assert full.to_image(np.zeros((288, 288), np.float32), (300, 400)).shape == (300, 400)
    assert Preprocessing(resize=(128, 96)).input_size == (128, 96)


def test_check_image_file_reads_the_header_only(tmp_path):
    from patchcore.core.imagefiles import check_image_file

    rng = np.random.default_rng(0)
    good = _save(tmp_path / "ok.png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    check_image_file(good)
    with pytest.raises(ImageError, match="8x8 pixels"):
        check_image_file(_save(tmp_path / "tiny.png", np.zeros((8, 8), np.uint8)))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="junk.png: not a readable image"):
        check_image_file(tmp_path / "junk.png")
    with pytest.raises(ImageError, match="no such file"):
        check_image_file(tmp_path / "missing.png")
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    check_image_file(tmp_path / "cut.png")  # damaged past its header: only reading it all tells
    with pytest.raises(ImageError):
        read_image(tmp_path / "cut.png")
