"""Real camera images: the aspect ratio is kept, the margin never scores, and the channels are the model's.

KolektorSDD (about 500 x 1250 grayscale) is the elongated product; bottle (900 x 900 colour) the square one.
"""

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from patchcore import PatchCore
from patchcore.core.geometry import Preprocessing, input_size_for, resize, to_gray
from patchcore.core.tiling import TILE_MARGIN, plan_tiles
from patchcore.errors import ImageError, ModelFileError, PatchCoreError

DATA = Path(os.environ.get("PATCHCORE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
KSDD = DATA / "ksdd" / "kolektor"


@pytest.fixture(scope="module")
def ksdd() -> Path:
    if not (KSDD / "train" / "good").is_dir():
        pytest.skip(f"KolektorSDD not found under {DATA}")
    return KSDD


@pytest.fixture(scope="module")
def ksdd_model(ksdd):
    """A small default model on 12 KolektorSDD good images."""
    good = sorted((ksdd / "train" / "good").iterdir())[::20][:12]
    return PatchCore(coreset_ratio=0.05, calibration_folds=3, target_far=0.2, device="cpu").fit(good)


def test_input_size_keeps_the_median_aspect_and_square_stays_square():
    assert input_size_for([(900, 900), (900, 900)], 288) == (288, 288)  # today's default on square images
    assert input_size_for([(1024, 1024)], 288) == (288, 288)
    # KolektorSDD: 500 wide, 1240-1285 high -> shorter side 288, the other 288 * 1260 / 500 to the stride.
    assert input_size_for([(1240, 500), (1260, 500), (1285, 500)], 288) == (720, 288)
    assert input_size_for([(1260, 500)], None, scale=1.0) == (1264, 496)  # native, to the stride of 16


def test_the_smallest_defect_enlarges_the_input_and_never_shrinks_it():
    # 800 x 600 images: shorter side 288 by default (0.48 of native); a 32 px defect asks for native pixels,
    # a 64 px one for half of them (0.5, just above 0.48), a 400 px one for less than the default gives.
    assert input_size_for([(800, 600)], 288) == (384, 288)
    assert input_size_for([(800, 600)], 288, defect_size=32) == (800, 608)
    assert input_size_for([(800, 600)], 288, defect_size=64) == (400, 304)
    assert input_size_for([(800, 600)], 288, defect_size=400) == (384, 288)
    # KolektorSDD's cracks are 130 px or more across (10th percentile of its masks): the default stands.
    assert input_size_for([(1260, 500)], 288, defect_size=130) == (720, 288)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(32, 300), w=st.integers(32, 300), ch=st.integers(2, 12), cw=st.integers(2, 12))
def test_placement_scales_both_axes_alike_and_fits(h, w, ch, cw):
    pre = Preprocessing((16 * ch, 16 * cw), keep_aspect=True)
    top, left, ph, pw = pre.placement((h, w))
    assert 0 <= top and 0 <= left and top + ph <= 16 * ch and left + pw <= 16 * cw
    assert ph == 16 * ch or pw == 16 * cw  # it fills one side
    # one factor for both axes, up to rounding to whole pixels
    assert abs(ph / h - pw / w) <= 1.0 / min(h, w) + 1.0 / min(ph, pw)


def test_an_elongated_image_is_not_squashed():
    """A 200 x 500 image on a 288 x 576 input is resized by one factor (to 230 x 576) and mirrored above and
    below; the squashing preprocessing stretches it to 288 x 576 instead."""
    rng = np.random.default_rng(0)
    img = (rng.random((200, 500, 3)) * 255).astype(np.uint8)
    keep = Preprocessing((288, 576), keep_aspect=True)
    x = keep.input(img)
    top, left, h, w = keep.placement((200, 500))
    assert (top, left, h, w) == (29, 0, 230, 576) and x.shape == (3, 288, 576)
    expected = np.clip(resize(img.astype(np.float32) / 255, (230, 576), antialias=True), 0, 1).transpose(2, 0, 1)
    np.testing.assert_allclose(x[:, top:top + h], expected, atol=1e-6)
    np.testing.assert_allclose(x[:, top - 1], x[:, top + 1], atol=1e-6)  # the margin mirrors the image
    # a map at the input size goes back onto the image without the margin
    amap = np.zeros((288, 576), np.float32)
    amap[top:top + h] = 1.0
    back = keep.to_image(amap, (200, 500))
    assert back.shape == (200, 500) and back.min() == 1.0
    # patches whose centres fall in the margin are not on the image
    rows, cols = keep.cells((36, 72), (200, 500))
    assert (rows.start, rows.stop, cols.start, cols.stop) == (4, 32, 0, 72)


def test_gray_conversion_is_pillows_luminance():
    rgb = (np.random.default_rng(1).random((40, 50, 3)) * 255).astype(np.uint8)
    ours = to_gray(rgb)
    pil = np.asarray(Image.fromarray(rgb).convert("L"))
    assert ours.shape == rgb.shape and np.abs(ours[..., 0].astype(int) - pil).max() <= 1
    assert (ours[..., 0] == ours[..., 2]).all()


def test_ksdd_keeps_its_shape_and_its_channels(ksdd, ksdd_model, tmp_path):
    pre = ksdd_model.preprocessing
    assert pre.resize[1] == 288 and pre.resize[0] in (720, 736) and pre.keep_aspect and pre.channels == "gray"
    crack = sorted((ksdd / "test" / "crack").iterdir())[0]
    (p,) = ksdd_model.predict([crack])
    h, w = np.asarray(Image.open(crack)).shape[:2]
    assert p.anomaly_map.shape == (h, w)
    # The model file records the shape and the channels, and scores the same after loading.
    path = ksdd_model.save(tmp_path / "k.safetensors")
    loaded = PatchCore.load(path)
    assert loaded.preprocessing == pre
    assert loaded.predict([crack])[0].score == pytest.approx(p.score, rel=1e-6)
    # A colour image on a grayscale model is scored as its luminance, the same way every time.
    gray = np.asarray(Image.open(crack).convert("L"))
    tinted = np.stack([gray, np.clip(gray.astype(int) + 9, 0, 255), gray], axis=2).astype(np.uint8)
    (a,) = ksdd_model.predict([tinted])
    (b,) = ksdd_model.predict([to_gray(tinted)])
    assert a.score == b.score


def test_a_gray_image_on_a_colour_model_is_refused_in_one_line(small_model, bottle):
    model = PatchCore.load(small_model)
    assert model.preprocessing.channels == "color"
    gray = np.asarray(Image.open(sorted((bottle / "test" / "good").iterdir())[0]).convert("L"))
    with pytest.raises(ImageError, match="grayscale image, but this model takes colour") as e:
        model.predict([gray])
    assert "\n" not in str(e.value)
    # A uniform frame (a lamp out, a blank) says nothing of its camera: scored, not refused.
    assert np.isfinite(model.predict([np.zeros((300, 300), np.uint8)])[0].score)


def test_rotations_work_on_an_elongated_input(ksdd):
    good = sorted((ksdd / "train" / "good").iterdir())[::40][:4]
    model = PatchCore(rotations=(90, 180), coreset_ratio=0.05, calibration_folds=0, device="cpu").fit(good)
    info = model.fit_info_
    h, w = model.preprocessing.input_size
    assert h > w and info["turns"] == 3 and info["n_features"] == 4 * 3 * (h // 8) * (w // 8)
    assert np.isfinite(model.predict(good[:1])[0].score)


def test_an_image_size_pair_sets_the_input_exactly_and_bad_sizes_are_refused(ksdd):
    good = sorted((ksdd / "train" / "good").iterdir())[:3]
    model = PatchCore(image_size=(512, 224), coreset_ratio=0.1, calibration_folds=0, device="cpu").fit(good)
    assert model.preprocessing.resize == (512, 224)
    for bad in ({"image_size": (500, 224)}, {"image_size": 16}, {"scale": 0.0}, {"scale": 1.0, "image_size": 288},
                {"preset": "paper", "keep_aspect": True}, {"scale": 1.0, "keep_aspect": False},
                {"defect_size": 2}, {"defect_size": "small"}, {"defect_size": 40, "scale": 1.0},
                {"defect_size": 40, "image_size": (512, 224)}, {"defect_size": 40, "keep_aspect": False}):
        with pytest.raises(PatchCoreError):
            PatchCore(**bad).fit(good)


def test_the_cli_fits_for_the_smallest_defect_and_the_file_keeps_its_input(ksdd, tmp_path):
    """``--defect-size 40`` on KolektorSDD (500 px wide): 32 / 40 = 0.8 network pixels per image pixel, more
    than the default's 288 / 500, so a 1008 x 400 input; the file records it and loads with it."""
    import json

    from typer.testing import CliRunner

    from patchcore.cli import app

    from conftest import link_images

    src = ksdd / "train" / "good"
    good = link_images(src, tmp_path / "good", sorted(p.name for p in src.iterdir())[:4])
    out = tmp_path / "m.safetensors"
    res = CliRunner().invoke(app, ["fit", str(good), "-o", str(out), "--defect-size", "40", "--folds", "2",
                                   "--coreset-ratio", "0.05", "--target-far", "0.5"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    # The summary says which defects the input shows at four patches: 40 px at 0.8 of native.
    assert "smallest defect seen well" in res.stdout and "about 40 image px" in res.stdout
    info = json.loads(CliRunner().invoke(app, ["info", str(out), "--json"]).stdout)
    assert info["params"]["defect_size"] == 40 and info["fit_info"]["input_size"] == [1008, 400]
    model = PatchCore.load(out)
    assert model.preprocessing.resize == (1008, 400) and model.defect_size == 40
    res = CliRunner().invoke(app, ["fit", str(good), "-o", str(tmp_path / "n.safetensors"), "--defect-size", "1"])
    assert res.exit_code == 1 and "defect_size" in res.stderr and "Traceback" not in res.stderr


def test_a_squashing_model_file_from_before_loads_square(small_model, tmp_path):
    """Files written before the aspect was kept record neither keep_aspect, channels nor tiles: they squash to
    a square, take any image and go through the network in one pass, as they did."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(small_model), framework="numpy") as f:
        meta = dict(f.metadata())
    params, prep = json.loads(meta["params"]), json.loads(meta["preprocessing"])
    for key in ("keep_aspect", "scale", "tile_size"):
        params.pop(key)
    for key in ("keep_aspect", "channels", "tile"):
        prep.pop(key)
    meta.update(params=json.dumps(params), preprocessing=json.dumps(prep))
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(small_model)), str(old), metadata=meta)
    model = PatchCore.load(old)
    assert model.preprocessing == Preprocessing((288, 288), None, keep_aspect=False, channels=None)
    gray = np.full((300, 200), 128, np.uint8)
    assert np.isfinite(model.predict([gray])[0].score)  # any channels, squashed as before
    prep["channels"] = "sepia"
    meta.update(preprocessing=json.dumps(prep))
    save_file(load_file(str(small_model)), str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ModelFileError, match="channels"):
        PatchCore.load(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------------------------ tiles
@settings(max_examples=60, deadline=None)
@given(h=st.integers(2, 160), w=st.integers(2, 160), tile=st.sampled_from([320, 384, 512, 1024]))
def test_tile_interiors_cover_the_grid_once_with_context_at_every_cut(h, w, tile):
    H, W, cell = 16 * h, 16 * w, 8
    tiles = plan_tiles((H, W), tile, cell)
    count = np.zeros((H // cell, W // cell), int)
    for t in tiles:
        top, left, th, tw = t.box
        assert 0 <= top and top + th <= H and 0 <= left and left + tw <= W
        assert len(tiles) == 1 or (th <= tile and tw <= tile)
        count[t.keep] += 1
        assert (t.keep[0].stop - t.keep[0].start, t.keep[1].stop - t.keep[1].start) == (
            t.local[0].stop - t.local[0].start, t.local[1].stop - t.local[1].start)
        # every kept cell is TILE_MARGIN px from a cut of its tile (or at the input's own border)
        for lo, hi, start, size, n in ((t.local[0].start, t.local[0].stop, top, th, H),
                                       (t.local[1].start, t.local[1].stop, left, tw, W)):
            assert start == 0 or lo * cell >= TILE_MARGIN
            assert start + size == n or size - hi * cell >= TILE_MARGIN
    assert (count == 1).all()
    if H * W <= tile * tile:
        assert len(tiles) == 1 and tiles[0].box == (0, 0, H, W)


@pytest.fixture(scope="module")
def native_ksdd(ksdd):
    """KolektorSDD at its native size (scale 1: a 1248 x 496 input), fitted in one pass."""
    good = sorted((ksdd / "train" / "good").iterdir())[::25][:8]
    return PatchCore(scale=1.0, tile_size=None, coreset_ratio=0.05, calibration_folds=0, device="cpu").fit(good)


def _tiled_like(model: PatchCore, tile: int) -> PatchCore:
    """The same fitted bank, scored in tiles of ``tile``."""
    tiled = PatchCore(scale=1.0, tile_size=tile, coreset_ratio=0.05, calibration_folds=0, device="cpu")
    pre = model.preprocessing
    tiled.set_geometry(pre.resize, pre.channels)
    return tiled.set_state(model.memory_bank_, model.fingerprint_, model.fit_info_, None, {})


def test_a_defect_on_a_tile_cut_scores_as_in_one_pass(ksdd, native_ksdd):
    """A dark scratch drawn across the cut between two tiles, and the same scratch in a tile's centre: the tiled
    model scores both as the untiled one does (no seam), and both well above the part without it."""
    tiled = _tiled_like(native_ksdd, 512)
    pre = tiled.preprocessing
    tiles = pre.tiles(8)
    assert len(tiles) > 2
    cut = tiles[0].keep[0].stop * 8  # input row where the first tile's interior ends and the second's begins
    good = np.asarray(Image.open(sorted((ksdd / "test" / "good").iterdir())[3]))
    top, _, h, _ = pre.placement(good.shape[:2])
    row_cut = int(round((cut - top) * good.shape[0] / h))  # the cut, in image rows
    centre = int(round(((tiles[0].box[2] // 2) - top) * good.shape[0] / h))
    images = [good]
    for row in (row_cut, centre):
        img = good.copy()
        img[row - 6:row + 6, 200:260] = 20  # 12 x 60 px, straddling the cut for the first
        images.append(img)
    one, tile = native_ksdd.predict(images), tiled.predict(images)
    for a, b in zip(one, tile):
        assert b.score == pytest.approx(a.score, rel=1e-3)
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-2 * np.ptp(a.anomaly_map)
    assert min(tile[1].score, tile[2].score) > 1.5 * tile[0].score


def test_a_tiled_model_exports_and_the_runtime_tiles_alike(ksdd, native_ksdd, tmp_path):
    from patchcore import runtime

    tiled = _tiled_like(native_ksdd, 512)
    crack = sorted((ksdd / "test" / "crack").iterdir())[:2]
    meta = tiled.export(tmp_path / "exp", images=crack)
    assert meta["preprocessing"]["tile"] == 512 and meta["tile_input"] == [512, 496]
    for path in ("fast", "graph"):
        assert meta["parity"][path]["score_max_rel_diff"] <= 1e-4
        rt = runtime.load(tmp_path / "exp", path=path)
        got, ref = rt.predict(crack), tiled.predict(crack)
        assert [g.anomaly_map.shape for g in got] == [r.anomaly_map.shape for r in ref]


def test_features_do_not_depend_on_the_processes_blas_threads(ksdd):
    """The resize's matrix products run on one BLAS thread whatever the process's pool holds: OpenBLAS sums
    in another order with two threads, and the greedy coreset turned that into another bank for one seed."""
    import torch
    from threadpoolctl import threadpool_limits

    good = sorted((ksdd / "train" / "good").iterdir())[:2]
    model = PatchCore(calibration_folds=0, device="cpu")
    with threadpool_limits(limits=1, user_api="blas"):
        one, _ = model.extract(good)
    with threadpool_limits(limits=2, user_api="blas"):
        two, _ = model.extract(good)
    assert torch.equal(one, two)
    image = np.asarray(Image.open(good[0]).convert("RGB"), dtype=np.float32)
    with threadpool_limits(limits=2, user_api="blas"):
        assert np.array_equal(resize(image, (720, 288), True), resize(image, (720, 288), True))
