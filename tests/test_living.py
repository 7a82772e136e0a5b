"""Models that live on the line: drift checks, the operator's feedback, applying it, versions and rollback; the
service is the real one (uvicorn on a loopback port)."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from typer.testing import CliRunner

from patchcore import versions
from patchcore.cli import app as cli_app
from patchcore.core.drift import DriftMonitor, binomial_tail, drift_state, ks_two_sample
from patchcore.core.imagefiles import read_image
from patchcore.feedback import FeedbackStore, Held, Recent

from test_service import call, one_line_error, predict, running, wait_for


# ------------------------------------------------------------------------------------------------ drift
@pytest.mark.parametrize(("k", "n", "p"), [(0, 10, 0.1), (3, 50, 0.01), (12, 200, 0.01), (40, 60, 0.5), (7, 7, 0.3)])
def test_binomial_tail_is_scipys(k, n, p):
    assert binomial_tail(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-300)


def test_ks_statistic_is_scipys_and_its_p_value_close():
    rng = np.random.default_rng(1)
    for shift in (0.0, 0.3, 1.0):
        a, b = rng.normal(shift, 1, 150), rng.normal(0, 1, 90)
        d, p = ks_two_sample(a, b)
        ref = stats.ks_2samp(a, b, method="asymp")
        assert d == pytest.approx(ref.statistic, abs=1e-12)
        assert p == pytest.approx(ref.pvalue, abs=0.02)
        # One-sided: a above b is scipy's alternative "less" (a's distribution function lies below b's).
        d, p = ks_two_sample(a, b, higher=True)
        ref = stats.ks_2samp(a, b, alternative="less", method="exact")
        assert d == pytest.approx(ref.statistic, abs=1e-12)
        assert p == pytest.approx(ref.pvalue, rel=0.1, abs=1e-3)
    assert ks_two_sample(rng.normal(-2, 1, 100), rng.normal(0, 1, 100), higher=True)[1] > 0.5  # lower: no shift


def test_a_shifted_stream_is_flagged_and_an_unshifted_one_is_not():
    rng = np.random.default_rng(0)
    calibration = rng.normal(10.0, 1.0, 200)
    threshold = float(np.sort(calibration)[int(np.ceil(201 * 0.99)) - 1])
    same = DriftMonitor(calibration, threshold, 0.01)
    same.add(rng.normal(10.0, 1.0, 200))
    state = same.state()
    assert state.tested and not state.drifting and "(no drift)" in state.in_words()
    moved = DriftMonitor(calibration, threshold, 0.01)
    moved.add(rng.normal(11.5, 1.0, 200))
    state = moved.state()
    assert state.shifted and state.excess_alarms and state.in_words().startswith("UNLIKE THE CALIBRATION")
    # Too few images: not tested, whatever they are.
    few = drift_state([99.0] * 5, calibration, threshold, 0.01)
    assert not few.tested and not few.drifting


def test_predict_summary_says_whether_a_folder_drifted(small_model, bottle, tmp_path):
    runner = CliRunner()
    dark = tmp_path / "dark"
    dark.mkdir()
    for p in sorted((bottle / "train" / "good").glob("*.png"))[100:132]:
        Image.fromarray((read_image(p) * 0.6).astype(np.uint8)).save(dark / p.name)
    r = runner.invoke(cli_app, ["predict", str(small_model), str(dark), "-o", str(tmp_path / "out"),
                                "--map-format", "npy", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["drift"]["tested"] and summary["drift"]["drifting"] and summary["drift"]["n"] == 32
    assert summary["drift_in_words"].startswith("UNLIKE THE CALIBRATION")


# ------------------------------------------------------------------------------------- feedback, versions
def test_recent_predictions_are_bounded_in_count_and_bytes():
    recent = Recent(max_images=3, max_bytes=100)
    for i in range(5):
        recent.add(Held(str(i), "m", 1, 1.0, "good", 2.0, b"x" * 30, 0.0))
    assert len(recent) == 3 and recent.get("0") is None and recent.get("4") is not None
    recent.add(Held("big", "m", 1, 1.0, "good", 2.0, b"x" * 90, 0.0))
    assert len(recent) == 1 and recent.get("big") is not None


def test_feedback_store_files_verdicts_moves_corrections_and_stays_bounded(tmp_path):
    store = FeedbackStore(tmp_path, max_images=2)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    held = [Held(f"id{i}", "bottle", 3, 5.0, "anomalous", 4.0, png.getvalue(), 0.0) for i in range(3)]
    line = store.add(held[0], "good")
    assert line["overrules"] and line["file"] == "good/id0.png" and line["model_version"] == 3
    assert store.add(held[0], "defect")["overrules"] is False  # corrected: moved, not copied
    assert store.counts("bottle") == {"good": 0, "defect": 1}
    for h in held:
        store.add(h, "good")
    assert store.counts("bottle")["good"] == 2  # bounded: the oldest went
    lines = (tmp_path / ".feedback" / "bottle" / "feedback.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(x)["id"].startswith("id") for x in lines)
    goods = store.good_images("bottle")
    store.mark_applied("bottle", goods, 3)
    assert store.good_images("bottle") == [] and len(list((tmp_path / ".feedback/bottle/applied/3").iterdir())) == 2


def test_versions_are_kept_once_per_content_and_rollback_goes_back(small_model, tmp_path):
    from patchcore import PatchCore

    folder = tmp_path / "models"
    folder.mkdir()
    served = shutil.copy(small_model, folder / "m.safetensors")
    v1 = versions.record(folder, "m", served)
    assert versions.record(folder, "m", served).number == v1.number == 1  # same content: kept once
    other = PatchCore.load(small_model)
    other.calibrate(target_far=0.3)
    other.save(served, overwrite=True)
    v2 = versions.record(folder, "m", served)
    assert v2.number == 2 and [v.number for v in versions.list_versions(folder, "m")] == [1, 2]
    runner = CliRunner()
    r = runner.invoke(cli_app, ["rollback", str(folder), "m"])
    assert r.exit_code == 0, r.output
    assert versions.content_hash(served) == v1.sha256
    r = runner.invoke(cli_app, ["versions", str(folder), "m", "--json"])
    rows = json.loads(r.stdout)["versions"]
    assert [(x["version"], x["in_place"]) for x in rows] == [(1, True), (2, False)]
    r = runner.invoke(cli_app, ["rollback", str(folder), "m"])
    assert r.exit_code == 1 and "no version older" in r.output
    r = runner.invoke(cli_app, ["rollback", str(folder), "m", "--to", "2"])
    assert r.exit_code == 0 and versions.content_hash(served) == v2.sha256
    r = runner.invoke(cli_app, ["rollback", str(folder), "nothing"])
    assert r.exit_code == 1 and "serves no model named 'nothing'" in r.output
    # Bounded.
    for far in (0.2, 0.25, 0.35):
        other.calibrate(target_far=far)
        versions.record(folder, "m", other.save(served, overwrite=True), keep=3)
    assert [v.number for v in versions.list_versions(folder, "m")] == [3, 4, 5]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_the_service_learns_from_the_operator_notices_drift_and_rolls_back(small_model, bottle, tmp_path):
    """Darker good bottles (a lamp dimmed) are false alarms: the stream drifts; the operator overrules them; the
    update is applied and served as a new version; a rollback puts the old one back."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(small_model, folder / "bottle.safetensors")
    goods = sorted((bottle / "train" / "good").glob("*.png"))
    dark = [_png((read_image(p) * 0.55).astype(np.uint8)) for p in goods[100:136]]

    def model() -> dict:
        return call(base, "GET", "/v1/models/bottle").json()

    with running(folder) as base:
        first = model()
        assert first["version"] == 1 and first["drift"]["tested"] is False and first["feedback"] == {
            "good": 0, "defect": 0}
        answers = [predict(base, "bottle", data).json() for data in dark[:32]]
        assert all(a["verdict"] == "anomalous" and a["model_version"] == 1 for a in answers)
        drift = model()["drift"]
        assert drift["tested"] and drift["drifting"] and drift["excess_alarms"] and drift["alarms"] == 32
        metrics = call(base, "GET", "/metrics").body.decode()
        assert 'patchcore_drift{model="bottle",value="drifting"} 1.0' in metrics

        # The operator's verdicts.
        def feedback(body: dict, name: str = "bottle"):
            return call(base, "POST", f"/v1/models/{name}:feedback", json.dumps(body).encode(),
                        {"Content-Type": "application/json"})

        for a in answers[:6]:
            r = feedback({"id": a["id"], "label": "good"})
            assert r.status == 200 and r.json()["overrules"] is True, r.body
        assert feedback({"id": answers[6]["id"], "label": "defect"}).json()["held"] == {"good": 6, "defect": 1}
        one_line_error(feedback({"id": "f" * 32, "label": "good"}), 404, "no recent prediction")
        assert feedback({"id": answers[0]["id"], "label": "maybe"}).status == 422
        assert call(base, "GET", "/v1/models/bottle:feedback").status == 405
        assert len(list((folder / ".feedback" / "bottle" / "good").glob("*.png"))) == 6
        assert 'patchcore_feedback_total{label="good",model="bottle",overrules="true"} 6.0' in \
            call(base, "GET", "/metrics").body.decode()

        # Applied: a new version serves, which takes darker bottles as good.
        r = call(base, "POST", "/v1/models/bottle:apply-feedback")
        assert r.status == 200, r.body
        applied = r.json()
        assert applied["images"] == 6 and applied["bank_added"] > 0 and applied["previous_version"] == 1
        now = model()
        assert now["version"] == 2 and now["drift"]["n"] == 0  # a new model: a new stream
        later = [predict(base, "bottle", data).json() for data in dark[32:]]
        assert all(a["verdict"] == "good" and a["model_version"] == 2 for a in later), [a["score"] for a in later]
        assert predict(base, "bottle", goods[60].read_bytes()).json()["verdict"] == "good"
        one_line_error(call(base, "POST", "/v1/models/bottle:apply-feedback"), 409, "no images called good")

        # Going back is one command; the service serves the old version after its next scan.
        r = CliRunner().invoke(cli_app, ["rollback", str(folder), "bottle"])
        assert r.exit_code == 0, r.output
        wait_for(lambda: model()["version"] == 1)
        assert predict(base, "bottle", dark[33]).json()["verdict"] == "anomalous"
