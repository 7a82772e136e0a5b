"""Does the calibrated false-alarm rate hold on good images the fit never saw?

    python benchmarks/calibration_far.py                        # bottle and screw, 5 folds, targets 1 % and 5 %
    python benchmarks/calibration_far.py --folds 2 5 --json out/far.json

Per category and number of folds: fit on train/good with cross-fitted calibration (the default model
otherwise), then for each target rate set the threshold from the cross-fitted scores and count the false
alarms among test/good, with a 95 % Clopper-Pearson interval. Also compares the two groups of good scores
(cross-fitted training images vs test images): if the test images score systematically higher, the
guarantee, which assumes exchangeable images, cannot hold for them, and the remedy is to calibrate on good
images from the production camera (``PatchCore.calibrate(folder)`` / ``patchcore fit --validation``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from scipy.stats import beta, mannwhitneyu

from _data import add_data_argument, mvtec


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    a = 1.0 - level
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from patchcore import PatchCore
    from patchcore.datasets import read_mvtec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", nargs="+", default=["bottle", "screw"])
    ap.add_argument("--folds", nargs="+", type=int, default=[5])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.01, 0.05])
    ap.add_argument("--params", type=json.loads, default={}, help="other constructor arguments as JSON")
    ap.add_argument("--json", type=Path, default=None)
    add_data_argument(ap)
    args = ap.parse_args()

    rows, shifts = [], []
    for cat in args.categories:
        ds = read_mvtec(mvtec(args.data) / cat)
        good_test = [s.path for s in ds.test if s.label == 0]
        bad_test = [s.path for s in ds.test if s.label == 1]
        for k in args.folds:
            model = PatchCore(calibration_folds=k, **args.params)
            t0 = time.perf_counter()
            model.fit(ds.train)
            fit_s = time.perf_counter() - t0
            info = model.fit_info_
            sg, sb = model.score_samples(good_test), model.score_samples(bad_test)
            cross = np.asarray(model.calibration_["scores"])
            u = mannwhitneyu(sg, cross, alternative="greater")
            shifts.append({"category": cat, "folds": k, "cross_fit_median": float(np.median(cross)),
                           "test_good_median": float(np.median(sg)),
                           "test_good_above_cross_fit_max": int((sg > cross.max()).sum()), "n_test_good": len(sg),
                           "mann_whitney_p": float(u.pvalue)})
            for far in args.targets:
                cal = model.calibrate(target_far=far)
                alarms = int((sg >= cal.threshold).sum())
                lo, hi = clopper_pearson(alarms, len(sg))
                rows.append({"category": cat, "folds": k, "target_far": far, "n_calibration": cal.n,
                             "guaranteed_far": cal.guaranteed_far, "threshold": cal.threshold,
                             "false_alarms": alarms, "n_test_good": len(sg), "test_far": alarms / len(sg),
                             "ci_low": lo, "ci_high": hi, "recall": float((sb >= cal.threshold).mean()),
                             "fit_s": fit_s, "coreset_s": info["coreset_seconds"],
                             "calibration_s": info.get("calibration_seconds", 0.0)})
    con = Console(width=160)
    t = Table(title=f"false alarms on test/good at the cross-fitted threshold (load avg {os.getloadavg()[0]:.1f})")
    for c in ("category", "folds", "target", "n calib", "guaranteed", "false alarms", "test FAR (95 % CI)",
              "defects caught", "fit s", "of it calibration s"):
        t.add_column(c, justify="right")
    for r in rows:
        g = "-" if r["guaranteed_far"] is None else f"{r['guaranteed_far']:.3f}"
        t.add_row(r["category"], str(r["folds"]), f"{r['target_far']:.2f}", str(r["n_calibration"]), g,
                  f"{r['false_alarms']} / {r['n_test_good']}",
                  f"{r['test_far']:.3f} ({r['ci_low']:.3f}-{r['ci_high']:.3f})", f"{r['recall']:.3f}",
                  f"{r['fit_s']:.0f}", f"{r['calibration_s']:.0f}")
    con.print(t)
    t2 = Table(title="good scores: cross-fitted training images vs test images")
    for c in ("category", "folds", "cross-fit median", "test median", "test above cross-fit max",
              "Mann-Whitney p (test > cross-fit)"):
        t2.add_column(c, justify="right")
    for s in shifts:
        t2.add_row(s["category"], str(s["folds"]), f"{s['cross_fit_median']:.3f}", f"{s['test_good_median']:.3f}",
                   f"{s['test_good_above_cross_fit_max']} / {s['n_test_good']}", f"{s['mann_whitney_p']:.2g}")
    con.print(t2)
    if args.json:
        args.json.write_text(json.dumps({"params": args.params, "rows": rows, "shifts": shifts}, indent=2))


if __name__ == "__main__":
    main()
