"""The `patchcore` command through its real entry point (typer's runner on the app; a few subprocesses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binom
from typer.testing import CliRunner

from patchcore.cli import app
from patchcore.core.prediction import mask_level

from conftest import link_images

FAST = ["--coreset-ratio", "0.01"]
SRC = Path(__file__).resolve().parents[1] / "src"


def run(*args, ok=True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def assert_one_line_error(result, *needles):
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for n in needles:
        assert n in lines[0], lines[0]


def train_names(bottle, n, step=1):
    return sorted(p.name for p in (bottle / "train" / "good").iterdir())[::step][:n]


@pytest.fixture(scope="module")
def fitted(bottle, tmp_path_factory):
    """A model fitted by `patchcore fit` on 14 good bottle images, calibrated on all 14 by 4-fold cross-fitting."""
    root = tmp_path_factory.mktemp("fit")
    good = link_images(bottle / "train" / "good", root / "good", train_names(bottle, 14))
    model = root / "model.safetensors"
    res = run("fit", good, "-o", model, "--folds", "4", "--target-far", "0.05", "--json",
              "--defects", link_images(bottle / "test" / "broken_large", root / "defects",
                                       ["000.png", "001.png", "002.png"]), *FAST)
    return model, json.loads(res.stdout), good


# ------------------------------------------------------------------------------------------------- fit / info
def test_fit_writes_model_with_calibrated_threshold(fitted):
    model, summary, _ = fitted
    assert model.is_file()
    assert summary["n_fit"] == 14 and summary["n_calibration"] == 14 and summary["n_defect"] == 3
    assert "4-fold cross-fit" in summary["calibration_source"]
    assert summary["threshold"] > summary["good_score_max"]  # 14 images cannot guarantee 5 %: above all of them
    assert summary["resolved"] is False and summary["guaranteed_far"] == pytest.approx(1 / 15)
    assert summary["needed_n"] == 19 and "needs at least 19 good images" in summary["guarantee"]
    assert summary["f1_threshold"] is not None
    assert summary["warning"] == summary["guarantee"]


def test_info_shows_threshold_and_calibration(fitted):
    model, summary, _ = fitted
    d = json.loads(run("info", model, "--json").stdout)
    assert d["threshold"] == pytest.approx(summary["threshold"])
    cal = d["calibration"]
    for key in ("method", "rule", "n", "mean", "std", "quantiles", "target_far", "pixel_threshold", "scores",
                "f1_threshold", "statement", "guaranteed_far"):
        assert key in cal
    assert cal["n"] == 14 and cal["target_far"] == 0.05 and len(cal["scores"]) == 14 and cal["folds"] == 4
    assert d["params"]["target_far"] == 0.05
    human = run("info", model).stdout
    assert "threshold" in human and "efficientnet_lite0" in human


def test_fit_refuses_existing_model_and_mvtec_layout_uses_train_good(fitted, tmp_path):
    model, _, good = fitted
    assert_one_line_error(run("fit", good, "-o", model, *FAST, ok=False), "already exists", "--overwrite")
    mvtec = tmp_path / "cat"
    link_images(good, mvtec / "train" / "good", sorted(p.name for p in good.iterdir())[:6])
    res = run("fit", mvtec, "-o", tmp_path / "m.safetensors", "-q", *FAST)
    assert res.stdout == "" and (tmp_path / "m.safetensors").is_file()


# --------------------------------------------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def predicted(fitted, bottle, tmp_path_factory):
    model, _, _ = fitted
    root = tmp_path_factory.mktemp("pred")
    imgs = root / "imgs"
    link_images(bottle / "test" / "good", imgs / "good", ["000.png", "001.png", "002.png"])
    link_images(bottle / "test" / "broken_large", imgs / "broken_large", ["003.png", "004.png", "005.png"])
    # An image of another size and aspect ratio, and one named like another folder's.
    odd = np.asarray(Image.open(bottle / "test" / "broken_large" / "006.png").convert("RGB"))[:, 20:220]
    (imgs / "odd").mkdir()
    Image.fromarray(odd).resize((300, 384)).save(imgs / "odd" / "000.png")
    out = root / "out"
    res = run("predict", model, imgs / "good", imgs / "broken_large", imgs / "odd" / "000.png", "-o", out,
              "--report", "--json")
    return out, json.loads(res.stdout), imgs


def test_predict_writes_everything_per_image(predicted):
    out, summary, _ = predicted
    rows = summary["images"]
    assert len(rows) == 7 and summary["n_images"] == 7
    assert len({r["name"] for r in rows}) == 7  # good/000 and odd/000 do not collide
    for r in rows:
        assert r["verdict"] in ("good", "anomalous")
        assert r["normalized_score"] == pytest.approx(r["score"] / summary["threshold"])
        assert (r["verdict"] == "anomalous") == (r["score"] >= summary["threshold"])
        amap = np.load(out / r["map_npy"])
        png16 = np.asarray(Image.open(out / r["map_png"]))
        overlay = Image.open(out / r["overlay"])
        mask = np.asarray(Image.open(out / r["mask"]))
        assert amap.shape == (r["height"], r["width"]) == png16.shape == mask.shape
        assert overlay.size == (r["width"], r["height"]) and overlay.mode == "RGB"
        assert png16.dtype == np.uint16 or Image.open(out / r["map_png"]).mode.startswith("I")
        assert set(np.unique(mask)) <= {0, 255}
        # the mask follows the verdict (prediction.mask_level): nothing for a good image; at least the pixel
        # threshold's region, and the region around the peak, for an anomalous one
        level = mask_level(amap, r["score"], summary["threshold"], summary["pixel_threshold"])
        assert ((mask > 0) == (amap >= level)).all()
        assert r["verdict"] == "good" or ((mask > 0) >= (amap >= summary["pixel_threshold"])).all()
        # 16-bit PNG scale as documented in the summary
        back = png16.astype(np.float64) / 65535 * 2 * summary["pixel_threshold"]
        np.testing.assert_allclose(np.minimum(amap, 2 * summary["pixel_threshold"]), back,
                                   atol=2 * summary["pixel_threshold"] / 65535)
    odd = next(r for r in rows if r["name"].startswith("odd"))
    assert (odd["width"], odd["height"]) == (300, 384)
    broken = [r for r in rows if r["name"].startswith("broken_large")]
    assert all(r["verdict"] == "anomalous" for r in broken)
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 8 and "normalized_score" in csv_lines[0] and "verdict" in csv_lines[0]
    assert json.loads((out / "summary.json").read_text())["n_images"] == 7


def test_predict_report_is_self_contained(predicted):
    out, _, _ = predicted
    page = (out / "report.html").read_text()
    assert "<table" in page and page.count("data:image/png;base64,") >= 6
    assert "<svg" in page and "AUROC" in page and "threshold" in page
    assert "<script" not in page and 'src="http' not in page


def test_predict_refuses_existing_results_and_overwrite_replaces_them(predicted, fitted):
    out, _, imgs = predicted
    model, _, _ = fitted
    before = (out / "summary.json").read_text()
    assert_one_line_error(run("predict", model, imgs / "good", "-o", out, ok=False), "already holds results")
    assert (out / "summary.json").read_text() == before
    # a human-readable run with --overwrite replaces the earlier results
    res = run("predict", model, imgs / "good" / "000.png", "-o", out, "--overwrite", "--map-format", "npy")
    assert "1 images" in res.stdout
    assert json.loads((out / "summary.json").read_text())["n_images"] == 1
    assert not (out / "report.html").exists() and len(list((out / "overlays").iterdir())) == 1


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_paths_and_model_files(fitted, tmp_path):
    model, _, good = fitted
    assert_one_line_error(run("fit", tmp_path / "nope", "-o", tmp_path / "m.st", ok=False), "no such folder")
    assert_one_line_error(run("predict", tmp_path / "nope.safetensors", good, "-o", tmp_path / "o", ok=False),
                          "no such model file")
    fake = tmp_path / "fake.safetensors"
    fake.write_text("not a model at all")
    assert_one_line_error(run("predict", fake, good, "-o", tmp_path / "o", ok=False), "not a patchcore model")
    assert_one_line_error(run("info", fake, ok=False), "not a patchcore model")
    assert_one_line_error(run("predict", model, tmp_path / "missing.png", "-o", tmp_path / "o", ok=False),
                          "no such file")
    assert_one_line_error(run("evaluate", tmp_path / "nope", ok=False), "no such folder")
    assert_one_line_error(run("evaluate", good, "--report", ok=False), "--output")
    assert not (tmp_path / "o").exists()


def test_unreadable_good_image_is_an_error_unless_skipped(bottle, tmp_path):
    good = link_images(bottle / "train" / "good", tmp_path / "good", train_names(bottle, 8))
    (good / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    res = run("fit", good, "-o", tmp_path / "m.safetensors", *FAST, ok=False)
    assert_one_line_error(res, "broken.png", "--skip-unreadable")
    assert not (tmp_path / "m.safetensors").exists()
    res = run("fit", good, "-o", tmp_path / "m.safetensors", "--skip-unreadable", "--json", *FAST)
    summary = json.loads(res.stdout)
    assert [s["name"] for s in summary["skipped"]] == [str(good / "broken.png")]
    res = run("fit", good, "-o", tmp_path / "m2.safetensors", "--skip-unreadable", *FAST)
    assert "skipped 1 unreadable" in res.stderr and res.stderr.count("broken.png") == 1  # listed once
    cal = json.loads(run("info", tmp_path / "m2.safetensors", "--json").stdout)["calibration"]
    assert "guarantee" in res.stdout and cal["statement"]  # the calibration's own sentence


def test_rotations_option_fits_turns_and_refuses_bad_angles(bottle, tmp_path):
    good = link_images(bottle / "train" / "good", tmp_path / "good", train_names(bottle, 4))
    for bad, needle in (("45", "rotations must be distinct quarter turns"), ("ninety", "--rotations takes")):
        assert_one_line_error(run("fit", good, "-o", tmp_path / "bad.safetensors", "--rotations", bad, ok=False),
                              needle)
    assert not (tmp_path / "bad.safetensors").exists()
    run("fit", good, "-o", tmp_path / "m.safetensors", "--rotations", "90,270", "--folds", "2", "--image-size", "96")
    info = json.loads(run("info", tmp_path / "m.safetensors", "--json").stdout)
    assert info["params"]["rotations"] == [90, 270] and info["fit_info"]["turns"] == 3
    assert info["fit_info"]["n_features"] == 4 * 3 * 12 * 12
    assert "fitted turns (degrees)" in run("info", tmp_path / "m.safetensors").stdout


def test_subprocess_entry_point_help_and_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OMP_WAIT_POLICY", None)
    res = subprocess.run([sys.executable, "-m", "patchcore", "--help"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and all(c in res.stdout for c in ("fit", "predict", "evaluate", "info"))
    res = subprocess.run([sys.executable, "-m", "patchcore", "info", str(tmp_path / "none.safetensors")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1 and res.stderr.strip().startswith("error: ")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_help_explains_options_with_defaults():
    for cmd, needles in (("fit", ["--folds", "[default: 5]", "--target-far", "conformal", "--border-pad",
                                  "--validation", "--defects", "--skip-unreadable", "--overwrite", "--json",
                                  "--quiet"]),
                         ("predict", ["--threshold", "--map-format", "--report", "[default: both]"]),
                         ("evaluate", ["--category", "--report", "--output"]),
                         ("info", ["--json"])):
        text = " ".join(run(cmd, "--help").stdout.split())
        for n in needles:
            assert n in text, (cmd, n)


# -------------------------------------------------------------------------------------------------- evaluate
def test_evaluate_with_report(bottle, tmp_path, monkeypatch):
    cat = tmp_path / "bottle"
    link_images(bottle / "train" / "good", cat / "train" / "good", train_names(bottle, 12))
    link_images(bottle / "test" / "good", cat / "test" / "good", ["000.png", "001.png", "002.png"])
    link_images(bottle / "test" / "broken_large", cat / "test" / "broken_large", ["000.png", "001.png", "002.png"])
    link_images(bottle / "ground_truth" / "broken_large", cat / "ground_truth" / "broken_large",
                ["000_mask.png", "001_mask.png", "002_mask.png"])
    out = tmp_path / "eval"
    res = run("evaluate", cat, "-o", out, "--report", "--json", *FAST)
    assert res.stderr == ""  # --json draws no progress bars
    d = json.loads(res.stdout)
    (r,) = d["categories"]
    assert r["category"] == "bottle" and r["n_test"] == 6 and r["image_auroc"] > 0.9
    assert (out / "results.json").is_file() and (out / "results.csv").is_file()
    page = (out / "report.html").read_text()
    assert "image AUROC" in page and "Worst misses" in page and "Worst false alarms" in page
    assert page.count("data:image/png;base64,") >= 6 and "<svg" in page
    from patchcore import cli
    from patchcore.evaluate import COLUMNS

    monkeypatch.setattr(cli.out_console, "width", 80)  # as when piped: headers must not be broken mid-word
    human = run("evaluate", cat, *FAST).stdout
    assert "AUROC" in human and "mean" in human and "bottle" in human
    assert max(len(line) for line in human.splitlines()) <= 80
    words = set(human.replace("┃", " ").replace("│", " ").split())
    for _, head, _ in COLUMNS:
        assert set(head.split()) <= words, (head, human)
    assert f"{r['image_auroc']:.4f}" in words  # numbers are never cut either
    assert_one_line_error(run("evaluate", cat, "-o", out, *FAST, ok=False), "already holds results")


# ----------------------------------------------------------------------------------- threshold on real data
@pytest.mark.slow
def test_cross_fitted_threshold_gives_target_false_alarm_rate_on_test_good(bottle, tmp_path):
    """Fit on 60 good images, calibrate 5 % on all 60 cross-fitted; test/good's (20) false-alarm rate must be
    plausible. Tolerance: the count must lie in the central 99 % of Binomial(20, 0.05), i.e. 0 to 4 of 20.
    """
    good = link_images(bottle / "train" / "good", tmp_path / "good", train_names(bottle, 60, step=3))
    model = tmp_path / "m.safetensors"
    fit = json.loads(run("fit", good, "-o", model, "--target-far", "0.05", "--json", *FAST).stdout)
    assert fit["n_calibration"] == 60 and fit["resolved"] and fit["rule"] == "conformal rank 58 of 60"
    assert fit["calibration_far"] <= 0.05 and fit["guaranteed_far"] == 0.05
    pred = json.loads(run("predict", model, bottle / "test" / "good", "-o", tmp_path / "o", "--json",
                          "--map-format", "npy").stdout)
    n = pred["n_images"]
    false_alarms = pred["n_anomalous"]
    lo, hi = binom.ppf(0.005, n, 0.05), binom.ppf(0.995, n, 0.05)
    assert n == 20 and lo <= false_alarms <= hi, (false_alarms, n)


# ------------------------------------------------------------------------------------ rough edges a new user hit
def test_demo_overwrite_replaces_only_the_demo(tmp_path):
    from patchcore.demo import make_demo

    make_demo(tmp_path, n_train=2, n_test_good=1, n_per_defect=1)  # an earlier (small) demo
    (tmp_path / "notes.txt").write_text("mine")
    assert_one_line_error(run("demo", tmp_path, ok=False), "already exists", "--overwrite")
    run("demo", tmp_path, "--overwrite")
    assert len(list((tmp_path / "disc" / "train" / "good").iterdir())) == 60
    assert (tmp_path / "notes.txt").read_text() == "mine"
    # A file the demo did not write inside FOLDER/disc: not ours to delete, even with --overwrite.
    (tmp_path / "disc" / "test" / "mine.png").write_bytes(b"x")
    assert_one_line_error(run("demo", tmp_path, "--overwrite", ok=False), "did not write")
    assert (tmp_path / "disc" / "test" / "mine.png").exists() and (tmp_path / "disc" / "train").is_dir()


def test_failed_predict_leaves_nothing_that_blocks_its_rerun(fitted, bottle, tmp_path):
    model, _, _ = fitted
    imgs = link_images(bottle / "test" / "good", tmp_path / "imgs", ["000.png", "001.png"])
    # A PNG cut short: its header reads, so only scoring it (after the output folder is made) fails.
    data = (bottle / "test" / "good" / "002.png").read_bytes()
    (imgs / "cut.png").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    assert_one_line_error(run("predict", model, imgs, "-o", out, ok=False), "cut.png", "--skip-unreadable")
    assert not out.exists()
    # An empty folder made beforehand stays, and empty; a user's file beside results survives --overwrite.
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("predict", model, imgs, "-o", tmp_path / "empty", ok=False), "cut.png")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert_one_line_error(run("predict", model, imgs, "-o", tmp_path / "mine", "--overwrite", ok=False), "cut.png")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    # A too small image is found before anything is written.
    Image.new("RGB", (8, 8)).save(imgs / "tiny.png")
    assert_one_line_error(run("predict", model, imgs, "-o", out, ok=False), "tiny.png", "8x8")
    assert not out.exists()
    # Skipping them, the same command succeeds into the same folder; each skipped file is listed once.
    res = run("predict", model, imgs, "-o", out, "--skip-unreadable", "--map-format", "npy")
    assert "skipped 2 unreadable" in res.stderr
    for name in ("cut.png", "tiny.png"):
        assert res.stderr.count(name) == 1, res.stderr
    assert json.loads((out / "summary.json").read_text())["n_images"] == 2
    (imgs / "cut.png").unlink()
    (imgs / "tiny.png").unlink()
    run("predict", model, imgs, "-o", tmp_path / "empty", "-q")
    assert (tmp_path / "empty" / "summary.json").is_file()


def test_flags_take_no_value(fitted, bottle, tmp_path):
    for cmd in ("fit", "predict", "evaluate", "info", "demo"):
        text = run(cmd, "--help").stdout
        assert "<bool>" not in text, (cmd, text)
    assert "<bool>" not in run("--help").stdout
    model, _, _ = fitted
    img = bottle / "test" / "good" / "000.png"
    # --report anywhere: before the arguments, between them, after -o.
    for i, args in enumerate((("--report", model, img, "-o"), (model, "--report", img, "-o"),
                              (model, img, "-o"))):
        out = tmp_path / f"o{i}"
        extra = ("--report",) if i == 2 else ()
        res = run("predict", *args, out, *extra, "--json", "--map-format", "npy")
        assert (out / "report.html").is_file() and json.loads(res.stdout)["report"]
        assert res.stderr == ""  # --json: no progress bars
    res = run("predict", model, img, "-o", tmp_path / "o3", "--report", "true", ok=False)
    assert_one_line_error(res, "true", "take no value")


def test_info_and_predict_speak_plainly(fitted, predicted):
    from patchcore.cli import describe_threshold

    model, _, _ = fitted
    human = run("info", model).stdout
    for raw in ("('", "None", "(from far)", "far)"):
        assert raw not in human, (raw, human)
    assert "blocks.2, blocks.4" in human
    text = " ".join(human.replace("│", " ").split())
    # 14 good images cannot guarantee the 5 % asked for (19 are needed): the source says what they guarantee
    promise = "calibrated on 14 good images, which guarantee at most a 6.67% false-alarm rate (the 5% asked for " \
              "needs 19 good images)"
    assert promise in text
    cal = json.loads(run("info", model, "--json").stdout)["calibration"]
    assert "guarantee" in text and cal["statement"] in text
    _, summary, _ = predicted
    assert summary["threshold_source"] == promise
    assert describe_threshold(cal, overridden=True) == "set with --threshold"
    assert describe_threshold({"threshold_from": "f1", "f1": 0.9, "n": 6, "n_defect": 3}, False) == \
        "best F1 (0.900) on 6 good and 3 defective images"
    assert describe_threshold({"target_far": 0.01, "n": 209}, False) == \
        "calibrated for a 1% false-alarm rate on 209 good images"


def test_a_folder_given_as_the_model_is_named_as_such(fitted, tmp_path):
    _, _, good = fitted
    for args in (("predict", good, good, "-o", tmp_path / "o"), ("info", good)):
        assert_one_line_error(run(*args, ok=False), "is a folder, not a model file", "written by patchcore fit")
    assert not (tmp_path / "o").exists()


def test_long_output_names_are_shown_whole(fitted, bottle, tmp_path, monkeypatch):
    from patchcore import cli
    from patchcore.jobs import output_names

    model, _, _ = fitted
    far = link_images(bottle / "test" / "good", tmp_path / "a_rather_long_folder_name" / "and_another_one",
                      ["000.png"])
    monkeypatch.setattr(cli.out_console, "width", 80)
    res = run("predict", model, far / "000.png", bottle / "test" / "good" / "001.png", "-o", tmp_path / "o",
              "--map-format", "npy")
    names = [r["name"] for r in json.loads((tmp_path / "o" / "summary.json").read_text())["images"]]
    assert max(len(n) for n in names) > 40
    first_column = "".join(line.split("│")[1].strip() for line in res.stdout.splitlines() if line.startswith("│"))
    for n in names:
        assert n in first_column, (n, res.stdout)
    # One folder given: names are relative to it.
    assert output_names([far / "000.png"], base=far.parent) == ["and_another_one__000"]
