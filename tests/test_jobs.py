"""patchcore.jobs, where it does more than the command line's tests show: each image decoded once, the
thresholds in force applied in one place, one finding of a data folder's good images."""

import json

import numpy as np
import pytest

from patchcore.errors import PatchCoreError

from conftest import link_images


@pytest.mark.slow  # shares the small model's fit
def test_predict_folder_decodes_each_image_once(small_model, bottle, tmp_path, monkeypatch):
    from patchcore import PatchCore
    from patchcore.core import imagefiles
    from patchcore.jobs import predict_folder

    imgs = tmp_path / "imgs"
    link_images(bottle / "test" / "good", imgs / "good", ["000.png", "001.png", "002.png"])
    link_images(bottle / "test" / "broken_large", imgs / "broken_large", ["000.png", "001.png"])
    reads: list[str] = []
    read = imagefiles.read_image

    def counting(path):
        reads.append(str(path))
        return read(path)

    monkeypatch.setattr(imagefiles, "read_image", counting)
    summary = predict_folder(small_model, [imgs], tmp_path / "out", map_format="npy", device="cpu", batch_size=2)
    rows = summary["images"]
    assert len(rows) == 5 and sorted(reads) == sorted(r["path"] for r in rows)  # once each, no second read
    monkeypatch.setattr(imagefiles, "read_image", read)
    # the same scores and maps as scoring the files by path, in batches of other sizes
    ref = PatchCore.load(small_model, device="cpu").predict([r["path"] for r in rows])
    assert [r["score"] for r in rows] == [float(p.score) for p in ref]
    for r, p in zip(rows, ref):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / r["map_npy"]), p.anomaly_map)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["images"] == rows


@pytest.mark.slow  # shares the small model's fit
def test_score_files_applies_the_thresholds_in_force_not_the_models(small_model, bottle, tmp_path):
    from patchcore.inference import load_model, thresholds_in_force
    from patchcore.jobs import score_files
    from patchcore.results import RESULT_DIRS

    model = load_model(small_model)
    own = model.threshold_
    files = [bottle / "test" / "good" / "000.png", bottle / "test" / "broken_large" / "000.png"]
    scores = [p.score for p in model.predict(files)]
    override = float(np.mean(scores))  # one image on each side of it
    thresholds = thresholds_in_force(model, override)
    for d in RESULT_DIRS:
        (tmp_path / d).mkdir()
    rows = score_files(model, files, ["a", "b"], tmp_path, thresholds, "npy")
    assert model.threshold_ == own  # the model is left alone
    assert [r["verdict"] for r in rows] == ["good" if s < override else "anomalous" for s in scores]
    assert {r["threshold"] for r in rows} == {override}
    assert [r["normalized_score"] for r in rows] == pytest.approx([s / override for s in scores])


def test_one_finding_of_good_images_for_fit_and_fit_many(tmp_path):
    from patchcore.distributed import products_of
    from patchcore.jobs import good_images

    def images(folder, n=2):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (folder / f"{i:03d}.png").write_bytes(b"")  # listed by name; not read here
        return folder

    images(tmp_path / "mvtec" / "train" / "good")
    images(tmp_path / "layout" / "good", 3)
    images(tmp_path / "plain", 1)
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    images(tmp_path / "empty", 2)  # train/good/ decides, and it is empty
    assert good_images(tmp_path / "mvtec")[1] == "MVTec category (train/good)"
    assert [len(good_images(tmp_path / p)[0]) for p in ("mvtec", "layout", "plain")] == [2, 3, 1]
    assert good_images(tmp_path / "plain")[1] == "folder of good images"
    with pytest.raises(PatchCoreError, match="train/good: holds no images"):
        good_images(tmp_path / "empty")
    with pytest.raises(PatchCoreError, match="no such folder"):
        good_images(tmp_path / "nope")
    assert [p.name for p in products_of(tmp_path)] == ["layout", "mvtec", "plain"]
