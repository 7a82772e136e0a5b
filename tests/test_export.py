"""ONNX export and the torch-free runtime: parity with the PyTorch path on real images, safety, no torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from patchcore import ModelFileError, PatchCore, PatchCoreError, runtime
from patchcore.cli import app
from patchcore.core.geometry import resize

DATA = Path(os.environ.get("PATCHCORE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
MVTEC = DATA / "mvtec_ad"


def _category(name: str) -> Path:
    path = MVTEC / name
    if not (path / "train" / "good").is_dir():
        pytest.skip(f"MVTec AD {name} not found under {DATA} (set PATCHCORE_DATA)")
    return path


def _test_images(cat: Path) -> list[Path]:
    return sorted(p for d in sorted((cat / "test").iterdir()) if d.is_dir() for p in sorted(d.glob("*.png")))


@pytest.fixture(scope="module")
def _exports() -> dict:
    return {}


def _export(name: str, cache: dict, tmp_path_factory):
    """A small model of the category, calibrated (so verdicts exist), exported with a check on test images."""
    if name not in cache:
        cat = _category(name)
        good = sorted((cat / "train" / "good").glob("*.png"))[::16][:16]
        model = PatchCore(coreset_ratio=0.05, calibration_folds=4, target_far=0.1, device="cpu").fit(good)
        root = tmp_path_factory.mktemp(f"export_{name}")
        src = model.save(root / f"{name}.safetensors")
        meta = model.export(root / "export", images=_test_images(cat)[::20], source=src)
        cache[name] = (name, cat, model, root / "export", meta)
    return cache[name]


@pytest.fixture(scope="module", params=["bottle", "screw"])
def exported(request, _exports, tmp_path_factory):
    return _export(request.param, _exports, tmp_path_factory)


@pytest.fixture(scope="module")
def bottle_exported(_exports, tmp_path_factory):
    return _export("bottle", _exports, tmp_path_factory)


@pytest.mark.slow
def test_runtime_matches_pytorch_on_the_real_test_set(exported):
    name, cat, model, folder, meta = exported
    files = _test_images(cat)[::2]  # every other test image: good and every defect type
    ref = model.predict(files)
    for path in ("fast", "graph"):
        got = runtime.load(folder, path=path).predict(files)
        assert [p.name for p in got] == [str(f) for f in files]
        rel = np.array([abs(a.score - b.score) / abs(a.score) for a, b in zip(ref, got)])
        map_diff = np.array([np.abs(a.anomaly_map - b.anomaly_map).max() / np.ptp(a.anomaly_map)
                             for a, b in zip(ref, got)])
        assert rel.max() <= 1e-4, (name, path, rel.max())
        assert map_diff.max() <= 1e-3, (name, path, map_diff.max())
        assert [a.is_anomalous for a in ref] == [b.is_anomalous for b in got]
        assert any(p.is_anomalous for p in got) and not all(p.is_anomalous for p in got)  # both verdicts occur
        for a, b in zip(ref, got):
            assert b.anomaly_map.shape == a.anomaly_map.shape and b.anomaly_map.dtype == np.float32
            assert b.threshold == a.threshold and b.pixel_threshold == a.pixel_threshold
            assert (b.defect_mask == a.defect_mask).mean() > 0.999
    # the export recorded the check it made on its own
    assert all(p["verdicts_identical"] and p["score_max_rel_diff"] <= 1e-4 for p in meta["parity"].values())
    written = json.loads((folder / "patchcore.json").read_text())
    assert written["source_model"]["sha256"] == meta["source_model"]["sha256"]


@pytest.mark.slow
def test_crop_preset_and_odd_sized_images_keep_parity(tmp_path):
    """The paper preset (centre crop) and images that must be resized: the runtime's numpy resizes."""
    cat = _category("bottle")
    good = sorted((cat / "train" / "good").glob("*.png"))[::25][:8]
    model = PatchCore(preset="paper", coreset_ratio=0.05, calibration_folds=0, device="cpu").fit(good)
    model.export(tmp_path / "x")
    img = Image.open(cat / "test" / "broken_large" / "000.png").convert("RGB")
    arrays = [np.asarray(img.resize((300, 280), Image.BILINEAR)), np.asarray(img.resize((181, 203), Image.BILINEAR))]
    ref = model.predict(arrays)
    got = runtime.load(tmp_path / "x").predict(arrays) + runtime.load(tmp_path / "x", path="graph").predict(arrays)
    for a, b in zip(ref + ref, got):
        assert b.anomaly_map.shape == a.anomaly_map.shape
        assert abs(a.score - b.score) <= 1e-4 * a.score
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-3 * np.ptp(a.anomaly_map)
        assert b.is_anomalous is None  # no threshold without calibration


@settings(max_examples=25, deadline=None)
@given(h=st.integers(32, 400), w=st.integers(32, 400), oh=st.integers(32, 400), ow=st.integers(32, 400),
       antialias=st.booleans())
def test_numpy_resize_is_torch_interpolate(h, w, oh, ow, antialias):
    a = np.random.default_rng(h * w).random((h, w, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(a).permute(2, 0, 1)[None], size=(oh, ow), mode="bilinear",
                        align_corners=False, antialias=antialias)[0].permute(1, 2, 0).numpy()
    assert np.abs(resize(a, (oh, ow), antialias) - ref).max() < 1e-4


def test_runtime_imports_no_torch():
    """The runtime and the whole torch-free core import with torch, faiss, scipy and sklearn unimportable
    (tests/test_architecture.py checks their import statements)."""
    code = ("import sys\n"
            "for m in ('torch', 'timm', 'faiss', 'torchvision', 'scipy', 'sklearn'): sys.modules[m] = None\n"
            "from patchcore import runtime\n"
            "import patchcore.core.imagefiles, patchcore.core.geometry, patchcore.core.scoring\n"
            "import patchcore.core.search, patchcore.core.files, patchcore.core.threads\n"
            "print(runtime.load)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.slow
def test_export_refuses_to_replace_user_files_and_overwrites_only_an_export(bottle_exported, tmp_path):
    name, cat, model, folder, _ = bottle_exported
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(PatchCoreError, match="not empty"):
        model.export(busy, overwrite=True)
    assert (busy / "notes.txt").read_text() == "mine"
    again = tmp_path / "again"
    model.export(again)
    with pytest.raises(PatchCoreError, match="overwrite"):
        model.export(again)
    model.export(again, overwrite=True)
    assert sorted(p.name for p in again.iterdir()) == ["features.onnx", "model.onnx", "patchcore.json", "search.npz"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


@pytest.mark.slow
def test_a_parity_failure_writes_nothing(bottle_exported, tmp_path, monkeypatch):
    name, cat, model, folder, _ = bottle_exported
    real = runtime.Runtime.score_array

    def off(self, rgb, name="image"):
        p = real(self, rgb, name)
        p.score *= 1.001  # a 1e-3 error: ten times what is allowed
        return p

    monkeypatch.setattr(runtime.Runtime, "score_array", off)
    with pytest.raises(PatchCoreError, match="does not score like the model"):
        model.export(tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_runtime_refuses_foreign_and_tampered_exports(bottle_exported, tmp_path):
    name, cat, model, folder, _ = bottle_exported
    with pytest.raises(ModelFileError, match="not a patchcore export"):
        runtime.load(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "patchcore.json").write_text((folder / "patchcore.json").read_text())
    for name in ("model.onnx", "features.onnx", "search.npz"):
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / name).write_bytes(bytes(data))
    for path in ("fast", "graph"):
        with pytest.raises(ModelFileError, match="checksum"):
            runtime.load(copy, path=path)
    (copy / "patchcore.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="damaged"):
        runtime.load(copy)


@pytest.mark.slow
def test_export_command(small_model, tmp_path):
    res = CliRunner().invoke(app, ["export", str(small_model), "-o", str(tmp_path / "x"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["parity"]["fast"]["verdicts_identical"] and doc["parity"]["graph"]["checked_on"] == "generated images"
    res = CliRunner().invoke(app, ["export", str(small_model), "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and "error:" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["export", str(tmp_path / "none.safetensors"), "-o", str(tmp_path / "y")])
    assert res.exit_code == 1 and "no such model file" in res.output


def test_command_on_a_runtime_only_install_says_what_to_install():
    def bare(*args):
        code = ("import sys\n"
                "sys.modules['typer'] = None\n"
                "from patchcore.entry import main\n"
                f"main({list(args)!r})\n")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    res = bare("fit", "data", "-o", "m.safetensors")
    assert res.returncode == 1
    assert 'pip install "patchcore[full]"' in res.stderr and "Traceback" not in res.stderr
    res = bare("--help")  # says what this install can do, and what the others add (issue 21)
    assert res.returncode == 0 and "runtime.load" in res.stdout
    assert 'pip install "patchcore[serve]"' in res.stdout and 'pip install "patchcore[full]"' in res.stdout


def test_an_export_of_format_1_still_scores_as_its_model(tmp_path):
    """Format 1 (before the restructure) computed the score and the map inside model.onnx; its fast path and
    its graph still load, and both score as the model file they were exported from (written by that version)."""
    fixtures = Path(__file__).parent / "fixtures"
    folder = fixtures / "legacy_export_v1"
    assert json.loads((folder / "patchcore.json").read_text())["format_version"] == 1
    model = PatchCore.load(fixtures / "legacy_export_v1.safetensors", device="cpu")
    images = [DATA / "mvtec_ad" / "bottle" / "test" / "broken_large" / "000.png",
              DATA / "mvtec_ad" / "bottle" / "test" / "good" / "000.png"]
    ref = model.predict(images)
    for path in ("fast", "graph"):
        got = runtime.load(folder, path=path).predict(images)
        for a, b in zip(ref, got):
            assert abs(a.score - b.score) <= 1e-4 * a.score
            assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-3 * np.ptp(a.anomaly_map)
            assert a.is_anomalous == b.is_anomalous
