"""Ray: batch scoring equals the single-process path and resumes after an interruption; fit-many equals single
fits and survives a failing product. Each test starts (and stops) its own local Ray with 2 CPUs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import link_images

ray = pytest.importorskip("ray", reason='needs the ray extra: pip install "patchcore[ray]"')

from patchcore import PatchCore  # noqa: E402
from patchcore.coreset import CoresetSampler  # noqa: E402
from patchcore.distributed import LEDGER, fit_many, predict_files, read_ledger  # noqa: E402


def _cli(*args: str, threads: int | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-m", "patchcore", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def test_images(bottle, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray_images")
    link_images(bottle / "test" / "good", root / "good", ["000.png", "001.png", "002.png", "003.png"])
    link_images(bottle / "test" / "broken_large", root / "broken_large", ["000.png", "001.png", "002.png"])
    link_images(bottle / "test" / "contamination", root / "contamination", ["000.png", "001.png", "002.png"])
    return root


def assert_same_bank(a: np.ndarray, b: np.ndarray) -> None:
    """Banks from features computed on other thread counts: rounding differs by ~1e-5, which may flip a late
    near-tie of the greedy selection, so nearly every row (not all) must agree."""
    assert a.shape == b.shape
    rows = np.isclose(a, b, atol=1e-3).all(axis=1)
    assert rows.mean() >= 0.98, f"{(~rows).sum()} of {len(rows)} bank rows differ"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_ray_predict_writes_exactly_what_one_process_writes(small_model, test_images, tmp_path):
    one, on_ray, default = tmp_path / "one", tmp_path / "ray", tmp_path / "default"
    # Ray gives each worker one CPU, hence one torch thread; the forward pass's float rounding depends on the
    # thread count (features differ by ~1e-5), so the byte-for-byte reference is one process on one thread.
    r = _cli("predict", str(small_model), str(test_images), "-o", str(one), "-q", threads=1)
    assert r.returncode == 0, r.stderr
    r = _cli("predict", str(small_model), str(test_images), "-o", str(on_ray), "--workers", "2", "--batch-size",
             "3", "--json", "--ray")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_images"] == 10
    a, b = json.loads((one / "summary.json").read_text()), json.loads((on_ray / "summary.json").read_text())
    assert a["images"] == b["images"]  # every score, verdict and file name, in input order
    assert (on_ray / "summary.csv").read_text() == (one / "summary.csv").read_text()
    for f in _files(one / "maps") + _files(one / "masks") + _files(one / "overlays"):
        assert f.read_bytes() == (on_ray / f.relative_to(one)).read_bytes(), f
    # ... and on the default threads it agrees to float rounding, with the same verdicts.
    r = _cli("predict", str(small_model), str(test_images), "-o", str(default), "-q")
    assert r.returncode == 0, r.stderr
    c = json.loads((default / "summary.json").read_text())["images"]
    assert [x["verdict"] for x in c] == [x["verdict"] for x in b["images"]]
    np.testing.assert_allclose([x["score"] for x in c], [x["score"] for x in b["images"]], rtol=1e-5)


@pytest.mark.slow
def test_interrupted_ray_predict_resumes_where_it_stopped(small_model, test_images, tmp_path):
    files = sorted(p for p in test_images.rglob("*.png"))
    names = [f"{p.parent.name}__{p.stem}" for p in files]
    out = tmp_path / "out"
    seen: list[int] = []

    def stop_after_first_batch(done: int, total: int) -> None:
        seen.append(done)
        if done > 0:
            raise KeyboardInterrupt  # what Ctrl-C or a crash of the driver does mid-run

    with pytest.raises(KeyboardInterrupt):
        predict_files(small_model, files, names, out, batch_size=2, workers=2, progress=stop_after_first_batch)
    key, done = read_ledger(out)
    assert key is not None and 0 < len(done) < len(files)
    stamps = {n: (out / "maps" / f"{n}.npy").stat().st_mtime_ns for n in done}
    with open(out / LEDGER, "a") as fh:
        fh.write('{"name": "torn li')  # a crash mid-write leaves half a line: it must be ignored
    first = len(done)
    progress: list[int] = []
    rows = predict_files(small_model, files, names, out, batch_size=2, workers=2,
                         progress=lambda d, t: progress.append(d))
    assert progress[0] == first  # the rerun starts from what was finished ...
    assert [r["name"] for r in rows] == names
    for n in stamps:  # ... and does not score those again
        assert (out / "maps" / f"{n}.npy").stat().st_mtime_ns == stamps[n]
    fresh = predict_files(small_model, files, names, tmp_path / "fresh", batch_size=5, workers=2)
    assert [r["score"] for r in rows] == [r["score"] for r in fresh]
    # A folder holding another model's run is refused rather than mixed.
    with pytest.raises(Exception, match="another model or other options"):
        predict_files(small_model, files, names, out, threshold=1.0)


@pytest.mark.slow
def test_fit_many_on_ray_equals_single_fits_and_survives_a_bad_product(bottle, tmp_path):
    screw = bottle.parent / "screw"
    if not (screw / "train" / "good").is_dir():
        pytest.skip("MVTec AD screw not found")
    root = tmp_path / "products"
    picks = {"bottle": bottle, "screw": screw}
    for name, src in picks.items():
        link_images(src / "train" / "good", root / name / "train" / "good",
                    sorted(p.name for p in (src / "train" / "good").iterdir())[::25][:10])
    (root / "broken").mkdir()
    (root / "broken" / "000.png").write_bytes(b"not a png")
    params = {"coreset_ratio": 0.05, "calibration_folds": 3, "target_far": 0.1, "device": "cpu"}
    models = tmp_path / "models"
    models.mkdir()
    reports: list[dict] = []
    rows = fit_many(root, models, params, use_ray=True, progress=reports.append)
    assert [r["product"] for r in rows] == ["bottle", "broken", "screw"]
    assert {r["product"] for r in reports} == {"bottle", "broken", "screw"}
    status = {r["product"]: r for r in rows}
    assert status["broken"]["status"] == "failed" and "000.png" in status["broken"]["error"]
    for name in picks:
        assert status[name]["status"] == "ok", status[name]
        got = PatchCore.load(models / f"{name}.safetensors", device="cpu")
        ref = PatchCore(**params).fit(sorted((root / name / "train" / "good").iterdir()))
        assert_same_bank(got.memory_bank_, ref.memory_bank_)  # one torch thread per Ray task
        assert got.threshold_ == pytest.approx(ref.threshold_, rel=1e-3)


def test_without_ray_the_cli_says_how_to_install_it(small_model, tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from patchcore.entry import main; sys.argv = ['patchcore'] + "
            "sys.argv[1:]; main()")
    for args in (["predict", str(small_model), str(tmp_path), "-o", str(tmp_path / "o"), "--ray"],
                 ["fit-many", str(tmp_path), "-o", str(tmp_path / "m"), "--ray"]):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1
        assert 'pip install "patchcore[ray]"' in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) <= 3


@pytest.mark.slow
@pytest.mark.parametrize("shard_by,exchange,rotations", [
    ("features", False, ()), ("features", True, ()), ("images", False, ()), ("images", False, (180,))])
def test_large_product_fit_on_ray_equals_the_local_fit(bottle, shard_by, exchange, rotations):
    """With cell_exchange the workers also pass each other's new centres through the driver every step; with
    rotations the workers extract each image's turns too, and a shard keeps them with their image."""
    from patchcore.distributed import fit_on_ray

    good = sorted((bottle / "train" / "good").iterdir())[:30]
    # 6 images a shard: 36 x 36 patch features each at the default 288 px (3 images with a turn each)
    params = {"coreset_ratio": 0.1, "calibration_folds": 3, "device": "cpu", "rotations": rotations,
              "sampler": CoresetSampler(shard_features=6 * 36 * 36, shard_by=shard_by, cell_exchange=exchange)}
    local = PatchCore(**params).fit(good)
    remote = fit_on_ray(good, params)
    assert remote.sampler.shard_by == remote.fit_info_["shard_by"] == shard_by
    assert remote.fit_info_["ray"] and remote.fit_info_["ray_workers"] >= 1 and remote.fit_info_["coreset_on_workers"]
    assert remote.fit_info_["turns"] == local.fit_info_["turns"] == 1 + len(rotations)
    # features: the driver selects in k-means cells of ~1,944 features; images: 3 folds of 2 shards (4 with turns)
    assert local.fit_info_["shards"] == remote.fit_info_["shards"] == (
        20 if shard_by == "features" else 6 * (1 + len(rotations)))
    assert_same_bank(remote.memory_bank_, local.memory_bank_)
    assert remote.threshold_ == pytest.approx(local.threshold_, rel=1e-3)
    assert remote.calibration_["n"] == local.calibration_["n"] == 30


@pytest.mark.slow
def test_fit_many_cli_reports_every_product_and_fails_if_one_did(bottle, tmp_path):
    root = tmp_path / "products"
    for name in ("cap_a", "cap_b"):
        link_images(bottle / "train" / "good", root / name / "good",
                    sorted(p.name for p in (bottle / "train" / "good").iterdir())[:6])
    (root / "cap_c").mkdir()
    (root / "cap_c" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = _cli("fit-many", str(root), "-o", str(tmp_path / "models"), "--coreset-ratio", "0.05", "--json")
    assert r.returncode == 1, r.stderr
    got = json.loads(r.stdout)
    assert [p["status"] for p in got["products"]] == ["ok", "ok", "failed"]
    assert (tmp_path / "models" / "cap_a.safetensors").is_file()
    assert not (tmp_path / "models" / "cap_c.safetensors").exists()
    # a rerun refuses to replace the models, per product, and says so
    r = _cli("fit-many", str(root), "-o", str(tmp_path / "models"), "--coreset-ratio", "0.05", "--json")
    assert [p["status"] for p in json.loads(r.stdout)["products"]] == ["failed"] * 3
    assert "already exists" in json.loads(r.stdout)["products"][0]["error"]
