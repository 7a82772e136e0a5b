"""End-to-end evaluation on real MVTec AD bottle images, the report files, determinism and the crop protocol."""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from patchcore.core.geometry import Preprocessing
from patchcore.datasets import Dataset, read_mvtec
from patchcore.errors import DatasetError, PatchCoreError
from patchcore.evaluate import (
    CategoryResult,
    EvaluationReport,
    compute_metrics,
    crop_to_region,
    evaluate,
    evaluate_dataset,
    find_categories,
)
from patchcore.settings import PRESETS

DATA = Path(os.environ.get("PATCHCORE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
MVTEC = DATA / "mvtec_ad"
BOTTLE = MVTEC / "bottle"

needs_bottle = pytest.mark.skipif(not BOTTLE.is_dir(), reason=f"MVTec AD bottle not found at {BOTTLE}")

FAST = {"coreset_ratio": 0.01, "device": "cpu", "seed": 0}


@pytest.fixture(scope="module")
def bottle_report() -> EvaluationReport:
    """The one full fit of bottle in this file (1% coreset keeps it to a few seconds of coreset)."""
    return evaluate(BOTTLE, FAST, keep_maps=True)


def small_bottle() -> Dataset:
    """20 train images and 15 test samples (5 good, 10 defective of three types) of bottle."""
    full = read_mvtec(BOTTLE)
    good = [s for s in full.test if s.label == 0][:5]
    bad = [s for s in full.test if s.label == 1]
    return Dataset("bottle-small", full.train[:20], good + bad[::6][:10])


# ---------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@needs_bottle
def test_bottle_end_to_end(bottle_report):
    (r,) = bottle_report.results
    assert r.name == "bottle" and (r.n_train, r.n_test, r.n_defect) == (209, 83, 63)
    assert r.image_auroc >= 0.99
    assert r.pixel_auroc >= 0.95
    assert 0.8 < r.aupro <= 1.0
    assert 0.0 < r.image_f1_max <= 1.0 and 0.0 < r.pixel_f1_max <= 1.0
    assert r.pixel_region == "whole image" and r.n_pixel_images == 83
    assert r.fit_seconds > 0 and r.ms_per_image > 0
    assert r.fit_seconds >= r.extract_seconds + r.coreset_seconds + r.calibration_seconds - 1e-6
    assert r.calibration_seconds > 0  # the default fit cross-fits its threshold ...
    # ... and the test set's 20 good images, never fitted on, check it: at 1 %, 0-2 alarms are plausible.
    assert r.threshold is not None and r.good_far is not None and r.good_far <= 0.1
    assert 0.0 < r.defect_recall <= 1.0 and 0.0 <= r.border_peak <= 1.0
    assert len(r.scores) == len(r.paths) == len(r.labels) == len(r.defect_types) == 83
    assert r.maps is not None and all(m.shape == (256, 256) for m in r.maps)
    assert bottle_report.seed == 0 and bottle_report.params["layers"]  # resolved layers recorded
    mean = bottle_report.mean_row()
    assert mean["category"] == "mean" and mean["image_auroc"] == r.image_auroc
    rows = bottle_report.table_rows()
    assert [row["category"] for row in rows] == ["bottle", "mean"]
    assert "image AUROC" in bottle_report.format_table()


@pytest.mark.slow
@needs_bottle
def test_report_files(bottle_report, tmp_path):
    js = bottle_report.to_json(tmp_path / "report.json")
    data = json.loads(js.read_text())
    assert data["seed"] == 0 and data["patchcore_version"]
    from patchcore import PatchCore

    defaults = PatchCore(**FAST).get_params()
    assert set(defaults) <= set(data["params"])  # every setting is in the JSON
    assert data["params"]["coreset_ratio"] == 0.01 and data["params"]["seed"] == 0
    assert isinstance(data["params"]["layers"], list) and data["params"]["layers"]
    assert data["pixel_region"] == "whole image"
    assert {"torch", "faiss", "numpy"} <= set(data["versions"])
    assert data["machine"]["cpu_count"] and data["machine"]["platform"] and data["date"]
    (cat,) = data["categories"]
    assert cat["image_auroc"] == bottle_report.results[0].image_auroc
    assert len(cat["images"]) == 83 and {"path", "label", "defect_type", "score"} == set(cat["images"][0])
    assert "maps" not in json.dumps(data)

    cs = bottle_report.to_csv(tmp_path / "report.csv")
    rows = list(csv.DictReader(cs.open()))
    assert [r["category"] for r in rows] == ["bottle", "mean"]
    assert float(rows[0]["image_auroc"]) == bottle_report.results[0].image_auroc
    assert float(rows[1]["aupro"]) == pytest.approx(bottle_report.results[0].aupro)
    for col in ("pixel_auroc", "aupro", "f1_max", "fit_s", "ms_per_image"):
        assert col in rows[0]

    # never overwrite unless asked
    before = js.read_text()
    with pytest.raises(PatchCoreError, match="already exists"):
        bottle_report.to_json(js)
    with pytest.raises(PatchCoreError, match="already exists"):
        bottle_report.to_csv(cs)
    assert js.read_text() == before
    bottle_report.to_json(js, overwrite=True)
    bottle_report.to_csv(cs, overwrite=True)


# --------------------------------------------------------------------------------------- determinism
@pytest.mark.slow
@needs_bottle
def test_same_seed_gives_identical_results():
    ds = small_bottle()
    params = {"coreset_ratio": 0.05, "device": "cpu", "seed": 3}
    a, model_a = evaluate_dataset(ds, params)
    b, model_b = evaluate_dataset(ds, params)
    assert a.scores == b.scores
    assert all(np.array_equal(x, y) for x, y in zip(a.maps, b.maps))
    assert np.array_equal(model_a.memory_bank_, model_b.memory_bank_)
    assert (a.image_auroc, a.pixel_auroc, a.aupro) == (b.image_auroc, b.pixel_auroc, b.aupro)
    c, _ = evaluate_dataset(ds, {**params, "seed": 4}, keep_maps=False)
    assert c.maps is None
    assert c.scores != a.scores  # another seed picks another coreset


# ----------------------------------------------------------------------------------- crop protocol
def test_crop_to_region_on_synthetic_arrays():
    paper = PRESETS["paper"].preprocessing  # resize 256, centre crop 224: 16 px off every side at 256
    a = np.arange(256 * 256).reshape(256, 256)
    (cut,) = crop_to_region([a], paper)
    assert cut.shape == (224, 224)
    assert cut[0, 0] == a[16, 16] and cut[-1, -1] == a[239, 239]
    # at another image resolution the region scales with it (900 px: 56..844)
    (big,) = crop_to_region([np.zeros((900, 900), bool)], paper)
    assert big.shape == (788, 788)
    # no crop: arrays come back untouched
    (same,) = crop_to_region([a], PRESETS["full"].preprocessing)
    assert same is a
    # non-square resize
    pre = Preprocessing(resize=(64, 128), crop=(32, 64))
    (r,) = crop_to_region([np.zeros((64, 128))], pre)
    assert r.shape == (32, 64)


def test_crop_changes_pixel_metrics_only_inside_region():
    """A false alarm at the border is ignored with the crop, counted without it."""
    paper = PRESETS["paper"].preprocessing
    mask = np.zeros((256, 256), bool)
    mask[100:140, 100:140] = True
    amap = mask.astype(np.float32)
    amap[0:8, 0:8] = 5.0  # border alarm outside the 224 crop
    good = np.zeros((256, 256), np.float32)
    whole = compute_metrics([1, 0], [1.0, 0.0], [mask, None], [amap, good])
    cm, cg = crop_to_region([mask], paper)[0], crop_to_region([amap, good], paper)
    cropped = compute_metrics([1, 0], [1.0, 0.0], [cm, None], cg)
    assert cropped["pixel_auroc"] == pytest.approx(1.0)
    assert whole["pixel_auroc"] < 1.0
    assert cropped["n_pixel_images"] == 2


def test_compute_metrics_without_masks_or_one_class():
    amap = np.zeros((40, 40), np.float32)
    m = compute_metrics([1, 0], [2.0, 1.0], [None, None], [amap, amap])  # defect image without mask
    assert m["image_auroc"] == 1.0 and m["pixel_auroc"] is None and m["aupro"] is None
    assert m["pixel_f1_max"] is None and m["n_pixel_images"] == 0
    one = compute_metrics([0, 0], [2.0, 1.0], [None, None], [amap, amap])  # one class only
    assert one["image_auroc"] is None and one["f1_max"] is None


@needs_bottle
def test_paper_preset_restricts_pixels(monkeypatch):
    """evaluate_dataset with the paper preset hands the metrics arrays cut to 224 of 256."""
    import patchcore.evaluate as ev

    seen = {}
    real = ev.compute_metrics

    def spy(labels, scores, masks, maps):
        seen["shapes"] = {m.shape for m in maps} | {m.shape for m in masks if m is not None}
        return real(labels, scores, masks, maps)

    monkeypatch.setattr(ev, "compute_metrics", spy)
    full = read_mvtec(BOTTLE)
    ds = Dataset("tiny", full.train[:10], [s for s in full.test if s.label == 0][:2] + full.test[:3])
    r, model = ev.evaluate_dataset(ds, {"preset": "paper", "coreset_ratio": 0.1, "device": "cpu"})
    assert model.preprocessing.crop == (224, 224)
    assert seen["shapes"] == {(224, 224)}
    assert r.pixel_region == "centre crop"
    assert all(m.shape == (256, 256) for m in r.maps)  # maps themselves stay at the image's resolution


# ------------------------------------------------------------------------------------ folder layout
@needs_bottle
def test_folder_layout(tmp_path):
    root = tmp_path / "mybottles"
    full = read_mvtec(BOTTLE)
    (root / "good").mkdir(parents=True)
    (root / "defect").mkdir()
    (root / "masks").mkdir()
    for p in full.train[:15]:
        shutil.copy(p, root / "good" / p.name)
    bad = [s for s in full.test if s.label == 1][::10][:5]
    for i, s in enumerate(bad):
        shutil.copy(s.path, root / "defect" / f"d{i}.png")
        if i < 3:  # two defect images have no mask
            shutil.copy(s.mask, root / "masks" / f"d{i}_mask.png")
    progress = []
    rep = evaluate(root, {"coreset_ratio": 0.1, "device": "cpu"}, progress=lambda *a: progress.append(a))
    (r,) = rep.results
    assert r.name == "mybottles" and r.n_defect == 5 and r.n_test == 5 + 3  # 20% of 15 good held out
    assert r.n_train == 12
    assert r.image_auroc is not None and r.pixel_auroc is not None and r.aupro is not None
    assert r.n_pixel_images == 3 + 3  # masked defects + good images
    stages = {s for s, _, _ in progress}
    assert {"category", "features", "scoring"} <= stages
    assert progress[0] == ("category", 0, 1) and progress[-1] == ("category", 1, 1)


# ------------------------------------------------------------------------------------ categories
def test_find_categories(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "root" / name / "train" / "good").mkdir(parents=True)
    (tmp_path / "root" / "notes").mkdir()
    assert [p.name for p in find_categories(tmp_path / "root")] == ["a", "b"]
    assert [p.name for p in find_categories(tmp_path / "root", ["b"])] == ["b"]
    with pytest.raises(DatasetError, match="there are: a, b"):
        find_categories(tmp_path / "root", ["zzz"])
    assert find_categories(tmp_path / "root" / "a") == [tmp_path / "root" / "a"]
    with pytest.raises(DatasetError):
        find_categories(tmp_path / "root" / "notes")
    with pytest.raises(DatasetError):
        find_categories(tmp_path / "missing")


def test_category_result_row():
    r = CategoryResult("x", 1, 2, 1, 0.5, None, None, 0.6, 0.1, None, 1.0, 0.6, 0.4, 3.0)
    row = r.metrics_row()
    assert row["category"] == "x" and row["pixel_auroc"] is None and row["ms_per_image"] == 3.0
    assert "images" in r.to_dict() and "maps" not in r.to_dict()
