import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from patchcore import Prediction
from patchcore.core.prediction import mask_level
from patchcore.errors import PatchCoreError
from patchcore.thresholds import (
    calibrate_scores,
    f1_threshold,
    guarantee,
    needed_images,
    threshold_for_far,
)


def test_conformal_rank_is_just_above_the_k_th_smallest_score():
    rng = np.random.default_rng(0)
    s = rng.normal(10, 1, 199)
    t, rule, resolved = threshold_for_far(s, 0.05)
    k = int(np.ceil(200 * 0.95))  # 190
    srt = np.sort(s)
    assert resolved and rule == f"conformal rank {k} of 199"
    assert srt[k - 1] < t <= np.nextafter(srt[k - 1], np.inf) and t < srt[k]
    assert (s >= t).sum() == 199 - k  # ties with the k-th score do not alarm
    assert threshold_for_far(s, 0.05, method="quantile")[0] == t  # the old name stays accepted


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 400), far=st.floats(0.005, 0.5), seed=st.integers(0, 2**31 - 1))
def test_conformal_guarantee_holds_in_expectation(n, far, seed):
    """The exact law of the rank rule: for exchangeable scores, P(new >= t) = (n - k + 1) / (n + 1) <= far."""
    t, _, resolved = threshold_for_far(np.random.default_rng(seed).random(n), far)
    k = int(np.ceil((n + 1) * (1 - far) - 1e-9))
    exact = (n + 1 - min(k, n)) / (n + 1)  # P(a fresh score tops the min(k, n)-th smallest of n calibration ones)
    guaranteed, sentence = guarantee(n, far, "conformal", resolved)
    assert resolved == (k <= n)
    assert exact <= guaranteed + 1e-12 and guaranteed <= max(far, 1 / (n + 1)) + 1e-12
    assert str(n) in sentence


def test_conformal_rule_holds_on_fresh_samples():
    rng = np.random.default_rng(1)
    fars = []
    for _ in range(300):  # many calibrations of 99 images, each checked on fresh good scores
        t, _, resolved = threshold_for_far(rng.normal(0, 1, 99), 0.05)
        fars.append((rng.normal(0, 1, 2000) >= t).mean())
    # k = 95 of 99: the expected rate is exactly 1 - 95/100 = 0.05; 300 runs pin the mean to about +-0.0013.
    assert resolved and abs(np.mean(fars) - 0.05) < 0.005


def test_too_few_images_say_what_can_be_guaranteed_and_what_the_target_needs():
    s = np.linspace(1.0, 1.9, 10)
    t, rule, resolved = threshold_for_far(s, 0.01)  # 10 images cannot guarantee 1 %
    assert not resolved and t > s.max() and (s >= t).sum() == 0
    cal = calibrate_scores(s, target_far=0.01)
    assert cal.guaranteed_far == pytest.approx(1 / 11) and cal.needed_n == 99 == needed_images(0.01)
    assert "9.09%" in cal.statement and "99 good images" in cal.statement
    ok = calibrate_scores(np.linspace(1, 2, 99), target_far=0.01)
    assert ok.resolved and ok.guaranteed_far == 0.01 and "At most 1.00%" in ok.statement


def test_gaussian_rule_is_an_estimate_never_below_the_max():
    s = np.array([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9])
    t, rule, resolved = threshold_for_far(s, 0.01, method="gaussian")
    expected = s.mean() + norm.ppf(0.99) * s.std(ddof=1)
    assert t == pytest.approx(max(expected, s.max() * (1 + 1e-6))) and rule == "normal fit" and not resolved
    tight = np.array([5.0] * 9 + [5.5])
    assert threshold_for_far(tight, 0.01, method="gaussian")[0] > 5.5
    cal = calibrate_scores(s, target_far=0.01, method="gaussian")
    assert cal.guaranteed_far is None and "no guarantee" in cal.statement


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_rejects_bad_rates(bad):
    with pytest.raises(PatchCoreError):
        threshold_for_far([1.0, 2.0, 3.0], bad)


def test_rejects_too_few_or_nonfinite_scores_and_unknown_method():
    with pytest.raises(PatchCoreError):
        threshold_for_far([1.0], 0.1)
    with pytest.raises(PatchCoreError):
        threshold_for_far([1.0, np.nan], 0.1)
    with pytest.raises(PatchCoreError):
        threshold_for_far([1.0, 2.0], 0.1, method="magic")


def test_calibration_statistics_and_f1_threshold():
    good = list(np.linspace(1.0, 2.0, 50))
    bad = [2.5, 3.0, 1.9, 4.0]
    cal = calibrate_scores(good, target_far=0.1, defect_scores=bad)
    assert cal.n == 50 and cal.resolved and cal.threshold_from == "far"
    assert cal.mean == pytest.approx(1.5) and cal.max == pytest.approx(2.0)
    assert set(cal.quantiles) == {"0.5", "0.9", "0.95", "0.99"}
    assert cal.calibration_far <= 0.1
    assert cal.f1_threshold is not None and cal.n_defect == 4
    f1_cal = calibrate_scores(good, target_far=0.1, defect_scores=bad, threshold_from="f1")
    assert f1_cal.threshold == pytest.approx(f1_cal.f1_threshold)
    assert f1_cal.far_threshold == pytest.approx(cal.threshold)
    d = cal.to_dict()
    assert d["method"] == "conformal" and d["threshold"] == cal.threshold and len(d["scores"]) == 50
    with pytest.raises(PatchCoreError):
        calibrate_scores(good, threshold_from="f1")  # no defects


def test_f1_threshold_separates_perfectly_separable_scores():
    t, f1 = f1_threshold([1, 2, 3, 10, 11], [0, 0, 0, 1, 1])
    assert f1 == pytest.approx(1.0) and 3 < t <= 10


def test_normalized_score_puts_the_threshold_at_one():
    assert Prediction("x", 5.0, np.zeros((2, 2), np.float32), threshold=5.0).normalized_score == 1.0
    p = Prediction("x", 7.5, np.zeros((2, 2), np.float32), threshold=5.0)
    assert p.normalized_score == pytest.approx(1.5) and p.is_anomalous
    assert Prediction("x", 1.0, np.zeros((2, 2), np.float32)).normalized_score is None


def test_masks_agree_with_verdicts():
    """A good verdict masks nothing; an anomalous one always masks its peak, even under the pixel threshold."""
    yy, xx = np.mgrid[0:64, 0:64]
    amap = (10 + 5 * np.exp(-((yy - 40) ** 2 + (xx - 20) ** 2) / 30.0)).astype(np.float32)  # peak 15 at (40, 20)
    good = Prediction("g", 9.0, amap, threshold=10.0, pixel_threshold=12.0)
    assert not good.is_anomalous and not good.defect_mask.any()  # the map crosses 12, the verdict rules
    weak = Prediction("w", 11.0, amap, threshold=10.0, pixel_threshold=20.0)  # map never reaches 20
    m = weak.defect_mask
    assert weak.is_anomalous and m[40, 20] and 0 < m.mean() < 0.2
    strong = Prediction("s", 30.0, amap, threshold=10.0, pixel_threshold=12.0)
    assert (strong.defect_mask == (amap >= 12.0)).all()
    assert mask_level(amap, 1.0, None, 12.0) == 12.0  # no image threshold: the pixel threshold alone
    assert not Prediction("n", 1.0, amap).defect_mask.any()
