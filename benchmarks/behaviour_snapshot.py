"""Record what the library computes on the shared categories, to show that a change of code changes nothing.

    python benchmarks/behaviour_snapshot.py record out/snap-before            # fit, save, predict
    ... change the code ...
    python benchmarks/behaviour_snapshot.py record out/snap-after
    python benchmarks/behaviour_snapshot.py rescore out/snap-before out/snap-old-files   # old files, new code
    python benchmarks/behaviour_snapshot.py compare out/snap-before out/snap-after
    python benchmarks/behaviour_snapshot.py compare out/snap-before out/snap-old-files

`record` fits the default model (and the "paper" preset, which crops) on each category's train/good, saves
the model file and writes every test image's score and map; `rescore` loads the model files of an earlier
record and scores the same images with the code installed now; `compare` prints the largest differences.
Only the public API is used (PatchCore, fit, save, load, predict), so the same script runs on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("PATCHCORE_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
RUNS = (("bottle", "mvtec_ad/bottle", {}), ("screw", "mvtec_ad/screw", {}),
        ("bottle-paper", "mvtec_ad/bottle", {"preset": "paper"}))


def _test_images(category: Path) -> list[Path]:
    return sorted(p for d in sorted((category / "test").iterdir()) for p in sorted(d.iterdir()))


def _score(model, images: list[Path], out: Path, name: str) -> None:
    preds = model.predict(images)
    np.savez_compressed(out / f"{name}.npz", scores=np.array([p.score for p in preds]),
                        maps=np.stack([p.anomaly_map for p in preds]))
    (out / f"{name}.json").write_text(json.dumps({
        "threshold": model.threshold_, "calibration": {k: v for k, v in model.calibration_.items()},
        "bank_shape": list(model.memory_bank_.shape)}, indent=1))


def record(out: Path) -> None:
    from patchcore import PatchCore

    out.mkdir(parents=True, exist_ok=False)
    for name, rel, params in RUNS:
        category = DATA / rel
        t0 = time.perf_counter()
        model = PatchCore(**params).fit(category / "train" / "good")
        model.save(out / f"{name}.safetensors")
        np.save(out / f"{name}-bank.npy", model.memory_bank_)
        _score(model, _test_images(category), out, name)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)


def rescore(before: Path, out: Path) -> None:
    from patchcore import PatchCore

    out.mkdir(parents=True, exist_ok=False)
    for name, rel, _ in RUNS:
        model = PatchCore.load(before / f"{name}.safetensors")
        np.save(out / f"{name}-bank.npy", model.memory_bank_)
        _score(model, _test_images(DATA / rel), out, name)
        print(f"{name}: rescored", flush=True)


def compare(a: Path, b: Path) -> int:
    worst = 0.0
    for name, _, _ in RUNS:
        x, y = np.load(a / f"{name}.npz"), np.load(b / f"{name}.npz")
        ja, jb = json.loads((a / f"{name}.json").read_text()), json.loads((b / f"{name}.json").read_text())
        bank_same = np.array_equal(np.load(a / f"{name}-bank.npy"), np.load(b / f"{name}-bank.npy"))
        s_rel = float(np.max(np.abs(x["scores"] - y["scores"]) / np.abs(x["scores"])))
        m_rel = float(np.max(np.abs(x["maps"] - y["maps"])) / np.ptp(x["maps"]))
        t_a, t_b = ja["threshold"], jb["threshold"]
        t_rel = abs(t_a - t_b) / abs(t_a) if t_a is not None and t_b is not None else (0.0 if t_a == t_b else 1.0)
        print(f"{name:13s} bank identical: {bank_same}  scores max rel diff {s_rel:.2e}  "
              f"maps max diff / range {m_rel:.2e}  threshold rel diff {t_rel:.2e}")
        worst = max(worst, s_rel, m_rel, t_rel, 0.0 if bank_same else 1.0)
    print(f"worst: {worst:.2e}")
    return 0 if worst < 1e-4 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("record").add_argument("out", type=Path)
    r = sub.add_parser("rescore")
    r.add_argument("before", type=Path)
    r.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "record":
        record(args.out)
    elif args.cmd == "rescore":
        rescore(args.before, args.out)
    else:
        return compare(args.a, args.b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
