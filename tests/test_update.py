"""Models that live on: adding good images without refitting (PatchCore.update, patchcore update), and the audit
of the training set (suspects in the cross-fitted scores, and the fit that leaves them out)."""

import hashlib

import numpy as np
import pytest
from typer.testing import CliRunner

from patchcore import PatchCore
from patchcore.cli import app
from patchcore.core.imagefiles import read_image
from patchcore.coreset import CoresetSampler, cell_coreset, coreset_size, greedy_coreset, kmeans_cells, lazy_greedy
from patchcore.thresholds import calibrate_scores, suspect_fence, suspects

SMALL = dict(image_size=160, coreset_ratio=0.05, calibration_folds=3, target_far=0.1, device="cpu")


def goods(bottle, n, start=0):
    return sorted((bottle / "train" / "good").glob("*.png"))[start:start + n]


@pytest.mark.parametrize("method", ["plain", "lazy"])
def test_a_selection_continued_from_its_first_centres_is_the_selection_in_one_go(method):
    z = torch_randn(4000, 16)
    whole = greedy_coreset(z, 300, seed=3, method="plain")
    first = whole[:120]
    distance = (z[:, None, :] - z[first][None]).pow(2).sum(-1).min(1).values.sqrt()
    rest = greedy_coreset(z, 180, seed=3, method=method, initial=distance)
    assert rest.tolist() == whole[120:].tolist()


def test_cells_continued_from_a_bank_choose_what_it_does_not_cover():
    """A large update's selection runs in k-means cells, each continued from the bank: in one cell it is the
    continued greedy selection itself; with several, the places go to the new points the bank leaves far."""
    z = torch_randn(3000, 8)
    initial = torch_randn(3000).abs() * 0.5 + 2.0
    one = cell_coreset(z, 200, np.zeros(3000, dtype=np.int64), seed=1, initial=initial)
    assert one.tolist() == greedy_coreset(z, 200, seed=1, method="plain", initial=initial).tolist()
    import torch

    covered = torch.cat([z[:1500] * 0.1, z[1500:] * 0.1 + 20.0])  # two clusters; the bank sits on the first
    start = torch.cat([torch.full((1500,), 1e-3), (covered[1500:] - covered[1500:].mean(0)).norm(dim=1) + 20.0])
    labels, _ = kmeans_cells(covered, 6, seed=0)
    picks = cell_coreset(covered, 100, labels, seed=0, n_jobs=2, initial=start)
    assert len(set(picks.tolist())) == 100
    assert (picks >= 1500).float().mean() >= 0.95  # a cell on the covered cluster still takes its first centre


def test_covering_continues_the_greedy_selection_until_the_radius():
    """Covering to a radius is the greedy selection continued from the bank, stopped where the farthest point
    comes within the radius, by the plain loop and by the lazy one alike."""
    import torch

    from patchcore import coreset
    from patchcore.coreset import cover

    z = torch_randn(6000, 8)  # the lazy loop's cells hold 1,600 points: 3 cells
    initial = torch_randn(6000).abs() + 2.0
    picks = cover(z, 2.5, initial)
    assert 0 < len(picks) < 6000
    assert picks.tolist() == greedy_coreset(z, len(picks), seed=0, method="plain", initial=initial).tolist()
    reach = torch.minimum(initial, torch.cdist(z, z[picks]).min(1).values)
    assert float(reach.max()) <= 2.5
    coreset.PLAIN_MAX, plain = 1000, coreset.PLAIN_MAX  # the lazy loop, as for many new features
    try:
        assert cover(z, 2.5, initial).tolist() == picks.tolist()
        many = cover(z, 1.0, initial)  # more centres than the lazy loop first makes room for (4,096)
        assert len(many) > 4096
        assert many.tolist() == lazy_greedy(z, len(many), initial=initial).tolist()
    finally:
        coreset.PLAIN_MAX = plain
    assert len(cover(z, float(initial.max()), initial)) == 0  # all covered already: nothing joins


def test_an_update_covers_its_images_to_the_fits_radius(bottle):
    """The new features join until none lies farther from the bank (on the fit's projection) than the fit's
    own selection radius (here a radius of cells: the fit's selection split)."""
    import torch

    from patchcore.coreset import random_projection

    model = PatchCore(**SMALL, sampler=CoresetSampler(shard_features=2000)).fit(goods(bottle, 6))
    radius = model.fit_info_["coreset_radius"]
    old = model.memory_bank_.copy()
    new = goods(bottle, 6, start=6)
    model.update(new)
    bank = model.memory_bank_
    np.testing.assert_array_equal(bank[:len(old)], old)
    assert model.fit_info_["updates"][0]["added_by"] == "radius"
    assert len(np.unique(bank, axis=0)) == len(bank)
    feats, _ = model.extract(new)
    z = random_projection(feats.reshape(-1, feats.shape[-1]), 128, model.seed)
    zb = random_projection(torch.from_numpy(bank), 128, model.seed)
    reach = torch.cdist(z, zb).min(1).values
    assert float(reach.max()) <= radius * 1.0001
    # The fit's own selection: what a share of the new features would have added is more than was needed.
    assert 0 < len(bank) - len(old) < coreset_size(len(z), SMALL["coreset_ratio"])


def test_an_update_of_the_fitted_images_adds_little(bottle):
    """Images the bank already covers add (almost) nothing: a share rule would add a fit's share of them."""
    images = goods(bottle, 8)
    model = PatchCore(**SMALL).fit(images)
    before = len(model.memory_bank_)
    model.update(images[:4])
    h, w = model.fit_info_["grid"]
    assert len(model.memory_bank_) - before <= 0.1 * coreset_size(4 * h * w, SMALL["coreset_ratio"])


def without_radius(path, out):
    """The model file at ``path`` as one saved before fits recorded their selection radius, loaded."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="numpy") as f:
        meta, bank = dict(f.metadata()), f.get_tensor("memory_bank")
    info = json.loads(meta["fit_info"])
    del info["coreset_radius"]
    save_file({"memory_bank": bank}, str(out), metadata={**meta, "fit_info": json.dumps(info)})
    return PatchCore.load(out)


def torch_randn(*shape):
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def test_update_recalibrates_honestly_and_an_older_model_grows_by_a_fits_share(bottle, tmp_path):
    fitted = PatchCore(**SMALL).fit(goods(bottle, 12))
    model = without_radius(fitted.save(tmp_path / "m.safetensors"), tmp_path / "old.safetensors")
    old_bank, old_cal = model.memory_bank_.copy(), dict(model.calibration_)
    h, w = model.fit_info_["grid"]
    new = goods(bottle, 6, start=100)
    model.update(new)
    bank = model.memory_bank_
    # The old bank is kept as it was; the new images add the share a fit would keep of their features.
    np.testing.assert_array_equal(bank[:len(old_bank)], old_bank)
    assert model.fit_info_["updates"][0]["added_by"] == "share"
    assert len(bank) - len(old_bank) == coreset_size(6 * h * w, SMALL["coreset_ratio"])
    info = model.fit_info_
    assert info["n_images"] == 18 and info["bank_size"] == len(bank) and info["updates"][0]["images"] == 6
    cal = model.calibration_
    assert cal["n"] == old_cal["n"] + 6 and cal["scores"][:old_cal["n"]] == old_cal["scores"]
    assert cal["target_far"] == old_cal["target_far"] and cal["method"] == old_cal["method"]
    assert cal["images"][-6:] and all(name.startswith("good/") for name in cal["images"])
    # Each new calibration score comes from a bank without that image: higher than its in-bank score.
    new_scores = dict(zip(cal["images"][-6:], cal["scores"][-6:]))
    in_bank = dict(zip([f"good/{p.name}" for p in new], model.score_samples(new)))
    assert all(new_scores[name] > in_bank[name] for name in new_scores)
    # The threshold is the conformal rank of all the scores, old and new.
    k = int(np.ceil((cal["n"] + 1) * (1 - cal["target_far"])))
    assert model.threshold_ == pytest.approx(sorted(cal["scores"])[k - 1], rel=1e-9)


def test_update_teaches_a_new_variant_of_good_part(bottle, tmp_path):
    """Good bottles seen darker (a new lighting): alarms before the update, accepted after it."""
    model = PatchCore(**SMALL).fit(goods(bottle, 12))
    dark = [(read_image(p).astype(np.float32) * 0.55).astype(np.uint8) for p in goods(bottle, 10, start=150)]
    before = np.array([p.score for p in model.predict(dark[5:])])
    assert (before >= model.threshold_).all()
    model.update(dark[:5])
    after = np.array([p.score for p in model.predict(dark[5:])])
    assert (after < model.threshold_).all() and (after < before).all()
    # The bottles as they were are still accepted.
    assert (model.score_samples(goods(bottle, 4, start=60)) < model.threshold_).all()
    # And the file keeps what happened.
    back = PatchCore.load(model.save(tmp_path / "m.safetensors"))
    assert back.fit_info_["updates"] == model.fit_info_["updates"] and back.threshold_ == model.threshold_


def test_update_refuses_what_the_model_cannot_take(bottle, tmp_path):
    model = PatchCore(**SMALL).fit(goods(bottle, 8))
    bank = model.memory_bank_.copy()
    gray = read_image(goods(bottle, 1, start=50)[0]).mean(2).astype(np.uint8)
    with pytest.raises(Exception, match="grayscale"):
        model.update([gray])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(Exception, match="broken.png"):
        model.update([bad])
    np.testing.assert_array_equal(model.memory_bank_, bank)  # nothing changed by a failed update
    model.update([bad] + goods(bottle, 2, start=50), skip_unreadable=True)
    assert model.fit_info_["updates"][0]["images"] == 2 and model.skipped_[0][0].endswith("broken.png")
    with pytest.raises(Exception, match="not fitted"):
        PatchCore(**SMALL).update(goods(bottle, 2))


def test_update_of_a_model_without_calibration_keeps_it_without_threshold(bottle):
    model = PatchCore(**{**SMALL, "calibration_folds": 0}).fit(goods(bottle, 6))
    model.update(goods(bottle, 2, start=40))
    assert model.threshold_ is None and model.fit_info_["n_images"] == 8


def test_update_command_writes_a_new_file_and_keeps_the_old(bottle, tmp_path):
    old = PatchCore(**SMALL).fit(goods(bottle, 8)).save(tmp_path / "m.safetensors")
    digest = hashlib.sha256(old.read_bytes()).hexdigest()
    runner = CliRunner()
    same = runner.invoke(app, ["update", str(old), str(goods(bottle, 1, start=30)[0]), "-o", str(old)])
    assert same.exit_code == 1 and "the model being updated" in same.output and "Traceback" not in same.output
    r = runner.invoke(app, ["update", str(old), *map(str, goods(bottle, 3, start=30)), "-o",
                            str(tmp_path / "m2.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    assert hashlib.sha256(old.read_bytes()).hexdigest() == digest
    summary = __import__("json").loads(r.stdout)
    assert summary["n_added"] == 3 and summary["after"]["n_images"] == 11 and summary["before"]["n_images"] == 8
    assert summary["after"]["bank_size"] > summary["before"]["bank_size"]
    assert PatchCore.load(tmp_path / "m2.safetensors").fit_info_["n_images"] == 11
    again = runner.invoke(app, ["update", str(old), str(goods(bottle, 1, start=30)[0]), "-o",
                                str(tmp_path / "m2.safetensors")])
    assert again.exit_code == 1 and "already exists" in again.output


def test_suspects_are_the_scores_far_above_the_others():
    rng = np.random.default_rng(0)
    clean = rng.normal(10.0, 0.5, 200)
    assert len(suspects(clean)) <= 2
    planted = np.concatenate([clean, [16.0, 14.0]])
    assert suspects(planted)[:2] == [200, 201]  # highest first
    assert suspects([1.0, 9.0, 2.0]) == []  # too few scores to tell


def test_a_floor_raises_the_threshold_and_says_so():
    scores = np.linspace(10.0, 12.0, 199)
    plain = calibrate_scores(scores, 0.01)
    raised = calibrate_scores(scores, 0.01, floor=13.0)
    assert raised.threshold == 13.0 > plain.threshold and "raised" in raised.rule and raised.extra["floor"] == 13.0
    assert calibrate_scores(scores, 0.01, floor=5.0).threshold == plain.threshold


def test_fit_lists_a_defective_image_hidden_among_the_good_and_can_leave_it_out(bottle, tmp_path):
    hidden = tmp_path / "good"
    hidden.mkdir()
    for p in goods(bottle, 14):
        (hidden / p.name).symlink_to(p.resolve())
    defect = sorted((bottle / "test" / "broken_large").glob("*.png"))[0]
    (hidden / "zz_planted.png").symlink_to(defect.resolve())
    model = PatchCore(**SMALL).fit(hidden)
    cal = model.calibration_
    assert cal["suspects"] and cal["suspects"][0][0] == "good/zz_planted.png"
    # Said where people look: info (and fit's summary, the predict report: report.suspects_in_words).
    info = CliRunner().invoke(app, ["info", str(model.save(tmp_path / "m.safetensors"))])
    assert info.exit_code == 0 and "look defective" in info.output and "zz_planted.png" in info.output
    robust = PatchCore(**SMALL, leave_out_suspects=True).fit(hidden)
    assert [name for name, _ in robust.calibration_["left_out"]] == [n for n, _ in cal["suspects"]]
    assert robust.fit_info_["n_images"] == 15 - len(cal["suspects"])
    assert "good/zz_planted.png" not in robust.calibration_["images"]
    # Its threshold is never below the score above which it left images out (were they good after all).
    assert robust.threshold_ >= robust.calibration_["floor"] == pytest.approx(suspect_fence(cal["scores"]))
    # Left out, the defect is scored as a defect again.
    assert robust.score_samples([defect])[0] > robust.threshold_ > model.score_samples([defect])[0]


def test_the_leave_out_audits_again_on_what_is_left(bottle, tmp_path, monkeypatch):
    """After a round leaves images out, the next cross-fit audits the rest (defects of one kind in other folds
    stop covering each other): here an audit that takes each round's highest score, twice, then nothing."""
    import patchcore.model as model_module

    hidden = tmp_path / "good"
    hidden.mkdir()
    for p in goods(bottle, 14):
        (hidden / p.name).symlink_to(p.resolve())
    (hidden / "zz_planted.png").symlink_to(sorted((bottle / "test" / "broken_large").glob("*.png"))[0].resolve())
    rounds: list[list[float]] = []

    def highest_twice(scores, fence=3.0):
        rounds.append(list(scores))
        return [int(np.argmax(scores))] if len(rounds) <= 2 else []

    monkeypatch.setattr(model_module, "suspects", highest_twice)
    robust = PatchCore(**SMALL, leave_out_suspects=True).fit(hidden)
    # Three audits, each scoring every image left, then the list of suspects the calibration keeps.
    assert [len(r) for r in rounds] == [15, 14, 13, 13]
    gone = robust.calibration_["left_out"]
    assert gone[0][0] == "good/zz_planted.png" and gone[0][1] == max(rounds[0])
    assert gone[1][1] == max(rounds[1]) and gone[1][0] != gone[0][0]
    assert robust.fit_info_["n_images"] == 13 and not {n for n, _ in gone} & set(robust.calibration_["images"])
    # The floor is the first audit's fence, over every image: later rounds do not lower it.
    assert robust.calibration_["floor"] == pytest.approx(suspect_fence(rounds[0]))
