"""Drift: do the recent scores still look like the calibration's?

A calibrated model promises that at most ``far`` of good parts score at or above its threshold (the conformal
guarantee of :mod:`patchcore.thresholds`), for parts like its calibration images. When the line changes (the
lighting drifts, a lens gathers dust, a new supplier's parts arrive), good parts score higher and the promise
silently breaks. Two checks of a stream of scores against the calibration tell when:

- **Alarms**: of the last ``window`` images, how many reached the threshold, against the ``far`` the calibration
  allows: the binomial tail P(X >= alarms) for X ~ Binomial(n, far). Real defects raise it too: an excess says
  either more defects than usual or good parts called defective, both worth a look.
- **Shift**: the one-sided two-sample Kolmogorov-Smirnov statistic of the window's scores against the calibration
  scores, with its asymptotic p-value: the scores as a whole moved up, often before the alarms show it. Only
  up: scores that fall (a model updated with more good images scores lower) break no promise.

Each check is flagged when its p-value falls below ``alpha``. The stream is tested after every image, so the
chance of a false flag over a long stream is larger than ``alpha``: docs/benchmarks.md (section 17) measures
it on unshifted streams, and how many images a brightness or blur shift takes to be flagged.

Torch-free: the service, the runtime's users and the command line share it.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

WINDOW = 200
MIN_IMAGES = 30
ALPHA = 1e-3


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (no scipy: the runtime's install lacks it)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def ks_two_sample(a: Sequence[float], b: Sequence[float], higher: bool = False) -> tuple[float, float]:
    """(D, p): the two-sample Kolmogorov-Smirnov statistic of ``a`` against ``b`` and its asymptotic p-value.
    Two-sided by default (with Stephens' small-sample correction, as Numerical Recipes' ``kstwo``); with
    ``higher``, one-sided: D = max(F_b - F_a), large when ``a`` lies above ``b``, with p = exp(-(6 n D + 1)^2 /
    (18 n)), n = n_a n_b / (n_a + n_b): closer to the exact p than exp(-2 n D^2) (within 10 % where p < 0.1
    in the tests, against scipy's exact)."""
    x, y = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    n, m = x.size, y.size
    if n == 0 or m == 0:
        return 0.0, 1.0
    grid = np.concatenate([x, y])
    diff = np.searchsorted(y, grid, side="right") / m - np.searchsorted(x, grid, side="right") / n
    en = n * m / (n + m)
    if higher:
        d = float(max(0.0, diff.max()))
        return d, float(min(1.0, math.exp(-((6.0 * en * d + 1.0) ** 2) / (18.0 * en))))
    d = float(np.abs(diff).max())
    lam = (math.sqrt(en) + 0.12 + 0.11 / math.sqrt(en)) * d
    if lam < 1e-3:
        return d, 1.0
    p = 2.0 * sum((-1) ** (j - 1) * math.exp(-2.0 * j * j * lam * lam) for j in range(1, 101))
    return d, float(min(1.0, max(0.0, p)))


@dataclass
class DriftState:
    """What :class:`DriftMonitor` says about the recent stream (JSON-ready with :meth:`to_dict`)."""

    n: int
    window: int
    alarms: int
    expected_alarms: float
    allowed_far: float
    alarm_p: float
    shift_ks: float
    shift_p: float
    alpha: float
    tested: bool
    excess_alarms: bool
    shifted: bool
    images_seen: int

    @property
    def drifting(self) -> bool:
        return self.excess_alarms or self.shifted

    def to_dict(self) -> dict:
        return {**asdict(self), "drifting": self.drifting}

    def in_words(self) -> str:
        """One line for people."""
        if not self.tested:
            return (f"not tested yet: {self.n} of the {MIN_IMAGES} images needed ({self.alarms} at or above the "
                    f"threshold)")
        alarms = (f"{self.alarms} of the last {self.n} at or above the threshold, {self.expected_alarms:.1f} "
                  f"allowed by the calibration ({self.allowed_far:.2%}; p = {self.alarm_p:.2g})")
        shift = f"scores above the calibration's by KS {self.shift_ks:.2f} (p = {self.shift_p:.2g})"
        if not self.drifting:
            return f"like the calibration (no drift): {alarms}; {shift}"
        what = " and ".join(w for w, on in (("more alarms than calibrated", self.excess_alarms),
                                           ("scores higher than the calibration's", self.shifted)) if on)
        return (f"UNLIKE THE CALIBRATION, {what}: {alarms}; {shift}. Either more defective parts than usual, "
                f"or the good parts changed (drift)")


def drift_state(scores: Sequence[float], calibration_scores: Sequence[float], threshold: float,
                allowed_far: float, alpha: float = ALPHA, images_seen: int | None = None,
                min_images: int = MIN_IMAGES, window: int | None = None) -> DriftState:
    """The drift checks of this module on ``scores`` (the recent window) against a calibration's scores,
    threshold and allowed false-alarm rate (its guaranteed rate, else its target)."""
    s = np.asarray(scores, dtype=np.float64)
    n = int(s.size)
    alarms = int((s >= threshold).sum())
    tested = n >= min_images and len(calibration_scores) >= 2
    alarm_p = binomial_tail(alarms, n, allowed_far) if n else 1.0
    ks, ks_p = ks_two_sample(s, calibration_scores, higher=True) if tested else (0.0, 1.0)
    return DriftState(n=n, window=int(window or n), alarms=alarms, expected_alarms=n * allowed_far,
                      allowed_far=float(allowed_far), alarm_p=float(alarm_p), shift_ks=float(ks), shift_p=ks_p,
                      alpha=float(alpha), tested=tested, excess_alarms=tested and alarm_p < alpha,
                      shifted=tested and ks_p < alpha, images_seen=int(images_seen if images_seen is not None else n))


def allowed_far(calibration: dict) -> float | None:
    """The false-alarm rate a calibration promises: its guarantee where it has one, else its target (None when
    the model is not calibrated)."""
    if not calibration:
        return None
    if calibration.get("threshold_from") == "f1":  # no guarantee: the rate the good calibration images showed
        far = calibration.get("calibration_far") or calibration.get("target_far")
    else:
        far = calibration.get("guaranteed_far") or calibration.get("target_far")
    return float(far) if far else None


class DriftMonitor:
    """The recent ``window`` scores of one model's stream and their drift checks, thread-safe. One per model
    the service serves, reset when the model changes (a new file, an update)."""

    def __init__(self, calibration_scores: Sequence[float], threshold: float, far: float,
                 window: int = WINDOW, alpha: float = ALPHA, min_images: int = MIN_IMAGES) -> None:
        self.calibration_scores = [float(v) for v in calibration_scores]
        self.threshold, self.far = float(threshold), float(far)
        self.window, self.alpha, self.min_images = int(window), float(alpha), int(min_images)
        self._recent: deque[float] = deque(maxlen=self.window)
        self._seen = 0
        self._lock = threading.Lock()

    @classmethod
    def for_calibration(cls, calibration: dict, threshold: float | None, **kw) -> DriftMonitor | None:
        """A monitor for a model's calibration (None when it has no threshold or no calibration scores)."""
        far = allowed_far(calibration)
        if threshold is None or far is None or len(calibration.get("scores") or []) < 2:
            return None
        return cls(calibration["scores"], threshold, far, **kw)

    def add(self, scores: float | Iterable[float]) -> None:
        values = [float(scores)] if isinstance(scores, (int, float)) else [float(v) for v in scores]
        with self._lock:
            self._recent.extend(values)
            self._seen += len(values)

    def state(self) -> DriftState:
        with self._lock:
            recent, seen = list(self._recent), self._seen
        return drift_state(recent, self.calibration_scores, self.threshold, self.far, self.alpha, seen,
                           self.min_images, self.window)
