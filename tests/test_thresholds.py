import numpy as np
import pytest
from scipy.stats import norm

from patchcore.errors import PatchCoreError
from patchcore.model import Prediction
from patchcore.thresholds import calibrate_scores, f1_threshold, normalized, threshold_for_far


def test_quantile_rule_gives_at_most_the_target_rate():
    rng = np.random.default_rng(0)
    s = rng.normal(10, 1, 200)
    t, rule, resolved = threshold_for_far(s, 0.05)
    assert resolved and rule == "empirical quantile"
    assert (s >= t).sum() == 10  # k = floor(200 * 0.05) images reach it, exactly
    top = np.sort(s)[::-1]
    assert top[10] < t < top[9]


def test_quantile_rule_matches_the_far_on_fresh_samples():
    rng = np.random.default_rng(1)
    t, _, _ = threshold_for_far(rng.normal(0, 1, 2000), 0.05)
    fresh = rng.normal(0, 1, 20000)
    assert abs((fresh >= t).mean() - 0.05) < 0.01


def test_small_holdout_falls_back_to_a_normal_fit_not_below_the_max():
    s = np.array([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9])
    t, rule, resolved = threshold_for_far(s, 0.01)  # 10 images cannot resolve 1 %
    assert not resolved and "normal fit" in rule
    expected = s.mean() + norm.ppf(0.99) * s.std(ddof=1)
    assert t == pytest.approx(max(expected, s.max() * (1 + 1e-6)))
    assert (s >= t).sum() == 0
    # An outlier-free tight set still never flags its own maximum.
    tight = np.array([5.0] * 9 + [5.5])
    t2, _, _ = threshold_for_far(tight, 0.01, method="gaussian")
    assert t2 > 5.5


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
    assert cal.holdout_far <= 0.1
    assert cal.f1_threshold is not None and cal.n_defect == 4
    f1_cal = calibrate_scores(good, target_far=0.1, defect_scores=bad, threshold_from="f1")
    assert f1_cal.threshold == pytest.approx(f1_cal.f1_threshold)
    assert f1_cal.far_threshold == pytest.approx(cal.threshold)
    d = cal.to_dict()
    assert d["method"] == "quantile" and d["threshold"] == cal.threshold and len(d["scores"]) == 50
    with pytest.raises(PatchCoreError):
        calibrate_scores(good, threshold_from="f1")  # no defects


def test_f1_threshold_separates_perfectly_separable_scores():
    t, f1 = f1_threshold([1, 2, 3, 10, 11], [0, 0, 0, 1, 1])
    assert f1 == pytest.approx(1.0) and 3 < t <= 10


def test_normalized_score_puts_the_threshold_at_one():
    assert normalized(5.0, 5.0) == 1.0
    assert normalized(5.0, None) is None
    p = Prediction("x", 7.5, np.zeros((2, 2), np.float32), threshold=5.0)
    assert p.normalized_score == pytest.approx(1.5) and p.is_anomalous
    assert Prediction("x", 1.0, np.zeros((2, 2), np.float32)).normalized_score is None
