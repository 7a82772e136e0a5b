"""Section 20 of docs/benchmarks.md: screw with 5 % of the training set planted defects (seed 0's draw, as
`living.py contamination` draws them), the fit's seed varied: the clean and the default fit, image AUROC
on the test set without the planted images. Run from the repository root: python benchmarks/contam_seeds.py"""

from pathlib import Path

import numpy as np

from patchcore import PatchCore
from patchcore.datasets import read_mvtec
from patchcore.metrics import image_auroc

share = 0.05
ds = read_mvtec(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad" / "screw")
defects = [i for i, s in enumerate(ds.test) if s.label == 1]
shuffled = list(np.random.default_rng(0).permutation(defects))
k = max(1, round(share * len(ds.train) / (1 - share)))
moved = sorted(shuffled[:k])
planted = [ds.test[i].path for i in moved]
test = [s for i, s in enumerate(ds.test) if i not in set(moved)]
y = np.array([s.label for s in test])
for seed in (0, 1, 2):
    row = []
    for _tag, imgs in (("clean", list(ds.train)), ("dirty", list(ds.train) + planted)):
        m = PatchCore(calibration_folds=0, seed=seed).fit(imgs)
        row.append(image_auroc(y, m.score_samples([s.path for s in test])))
    print(f"seed {seed}: clean {row[0]:.4f} dirty {row[1]:.4f} loss {row[0]-row[1]:+.4f}", flush=True)
