"""The station's rough edges (issue 21): clear lines for a missing GPU or torch, files others can read, the
options fit-many shares with fit, `info` on an export, help that names the extras."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from patchcore import PatchCore, PatchCoreError
from patchcore.cli import app
from patchcore.core.files import atomic_folder

from conftest import link_images

FIXTURES = Path(__file__).parent / "fixtures"
SRC = Path(__file__).resolve().parents[1] / "src"


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_one_line_on_every_command(bottle, tmp_path):
    model = FIXTURES / "legacy_export_v1.safetensors"
    image = bottle / "test" / "good" / "000.png"
    one_line_error(run("fit", bottle, "-o", tmp_path / "m.safetensors", "--device", "cuda"), "no CUDA GPU")
    one_line_error(run("fit-many", bottle.parent, "-o", tmp_path / "many", "--device", "cuda"), "no CUDA GPU")
    one_line_error(run("predict", model, image, "-o", tmp_path / "out", "--device", "cuda"), "no CUDA GPU")
    one_line_error(run("evaluate", bottle, "-o", tmp_path / "ev", "--device", "cuda"), "no CUDA GPU")
    one_line_error(run("serve", FIXTURES, "--device", "cuda"), "no CUDA GPU")  # before any model is loaded
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "out").exists()
    with pytest.raises(PatchCoreError, match="no CUDA GPU"):
        PatchCore.load(model, device="cuda:0")


def test_patchcore_without_torch_says_what_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import patchcore\n"
            "from patchcore import runtime  # the bare install's part still imports\n"
            "try:\n    patchcore.PatchCore\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(SRC)})
    assert r.returncode == 0, r.stderr
    assert 'pip install "patchcore[full]"' in r.stdout and "from patchcore import runtime" in r.stdout


def test_files_follow_the_users_umask(bottle, tmp_path):
    """Model files and exports were 0600 / 0700 (tempfile's); a service account could not read them."""
    old = os.umask(0o022)
    try:
        model = PatchCore(image_size=64, coreset_ratio=0.5, calibration_folds=0, device="cpu").fit(
            [bottle / "train" / "good" / "000.png"])
        path = model.save(tmp_path / "m.safetensors")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        folder = atomic_folder(tmp_path / "export", lambda tmp: (tmp / "a.json").write_text("{}"))
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        assert stat.S_IMODE((folder / "a.json").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_info_reads_an_export_folder():
    folder = FIXTURES / "legacy_export_v1"
    res = run("info", folder)
    assert res.exit_code == 0, res.stderr
    text = " ".join(res.stdout.replace("│", " ").split())
    assert "export for the torch-free runtime" in text and "efficientnet_lite0" in text and "128 x 128" in text
    meta = json.loads(run("info", folder, "--json").stdout)
    assert meta["format"] == "patchcore-export" and meta["bank_size"] == 256
    one_line_error(run("info", FIXTURES), "is a folder, not a model file")


def test_help_names_the_ray_extra_and_fit_many_takes_fits_options():
    env = {"COLUMNS": "200"}
    for cmd in ("fit", "fit-many", "predict"):
        out = CliRunner().invoke(app, [cmd, "--help"], env=env).stdout
        assert 'patchcore[ray]' in " ".join(out.replace("│", " ").split()), cmd
    out = CliRunner().invoke(app, ["fit-many", "--help"], env=env).stdout
    for option in ("--skip-unreadable", "--folds", "--device", "--backbone-weights"):
        assert option in out, option


def test_fit_many_skips_unreadable_images_when_asked(bottle, tmp_path):
    root = tmp_path / "products"
    good = link_images(bottle / "train" / "good", root / "bottle" / "good",
                       sorted(p.name for p in (bottle / "train" / "good").iterdir())[:4])
    (good / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    small = ["--image-size", "64", "--coreset-ratio", "0.5", "--folds", "2", "--target-far", "0.4"]
    res = run("fit-many", root, "-o", tmp_path / "models", *small, "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["products"][0]["status"] == "failed"
    res = run("fit-many", root, "-o", tmp_path / "models", *small, "--skip-unreadable", "--json")
    assert res.exit_code == 0, res.stderr
    (row,) = json.loads(res.stdout)["products"]
    assert row["status"] == "ok" and row["skipped"] == 1 and row["images"] == 5
    one_line_error(run("fit-many", root, "-o", tmp_path / "other", "--folds", "1"), "--folds must be at least 2")


def test_a_threshold_from_too_few_images_says_what_it_guarantees():
    from patchcore.inference import describe_threshold
    from patchcore.thresholds import calibrate_scores

    few = describe_threshold(calibrate_scores([1.0, 2.0, 3.0], 0.01).to_dict(), False)
    assert few == ("calibrated on 3 good images, which guarantee at most a 25% false-alarm rate "
                   "(the 1% asked for needs 99 good images)")
    enough = describe_threshold(calibrate_scores(list(np.linspace(1, 2, 120)), 0.01).to_dict(), False)
    assert enough == "calibrated for a 1% false-alarm rate on 120 good images"


def test_pixel_limits_are_one_line_in_the_library_and_the_runtime(tmp_path, monkeypatch):
    """Pillow's decompression-bomb warning used to print in the middle of a run; the runtime had no limit."""
    from PIL import Image

    from patchcore import ImageError, runtime
    from patchcore.core.imagefiles import read_image

    path = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 120,000 pixels: past the warning, not the error
    with pytest.raises(ImageError, match="too many pixels to decode safely"):
        read_image(path)
    monkeypatch.undo()
    rt = runtime.load(FIXTURES / "legacy_export_v1", max_pixels=100_000)
    with pytest.raises(ImageError, match="the limit is 0.1 megapixels"):
        rt.predict([path])
    with pytest.raises(ImageError, match="the limit is 0.1 megapixels"):
        rt.predict(np.zeros((300, 400, 3), np.uint8))
    assert len(rt.predict([path], skip_unreadable=True)) == 0 and rt.skipped_[0][0] == str(path)
    assert len(runtime.load(FIXTURES / "legacy_export_v1").predict([path])) == 1


def test_one_thread_decision_reaches_every_pool():
    """PATCHCORE_THREADS reaches OpenMP and BLAS through their variables at import (a variable the user set
    wins), torch when the network is built, and onnxruntime's sessions; a bad value is one clear error."""
    code = ("import os, patchcore\n"
            "print(os.environ['OMP_NUM_THREADS'], os.environ['OPENBLAS_NUM_THREADS'], os.environ['MKL_NUM_THREADS'])\n"
            "from patchcore import PatchCore\n"
            "import torch\n"
            "PatchCore(device='cpu').network()\n"
            "print(torch.get_num_threads())\n")
    env = {**os.environ, "PYTHONPATH": str(SRC), "PATCHCORE_THREADS": "1", "MKL_NUM_THREADS": "3"}
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.pop(var, None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1", "3", "1"]
    # A decision made after numpy started (`patchcore serve` makes it after importing patchcore) resizes the
    # BLAS pool that is running, and idle BLAS threads sleep at once instead of spinning beside a neighbour.
    code = ("import os, patchcore, numpy\n"
            "from threadpoolctl import threadpool_info\n"
            "from patchcore.core.threads import decide\n"
            "decide(1)\n"
            "print(os.environ['OPENBLAS_THREAD_TIMEOUT'], *{i['num_threads'] for i in threadpool_info() "
            "if i['user_api'] == 'blas'})\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PATCHCORE_THREADS", "OPENBLAS_NUM_THREADS",
                                                           "OMP_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**env, "PYTHONPATH": str(SRC)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["4", "1"]
    from patchcore import runtime

    os.environ["PATCHCORE_THREADS"] = "1"
    try:
        rt = runtime.load(FIXTURES / "legacy_export_v1")
        assert rt.session.get_session_options().intra_op_num_threads == 1
        os.environ["PATCHCORE_THREADS"] = "many"
        with pytest.raises(PatchCoreError, match="PATCHCORE_THREADS must be a whole number"):
            runtime.load(FIXTURES / "legacy_export_v1")
    finally:
        del os.environ["PATCHCORE_THREADS"]
