"""Models that live on the line (issue 22): adding good images, and a training set with defects in it.

    python benchmarks/living.py update --category bottle --first 150 -o out/living
    python benchmarks/living.py contamination --category bottle --share 0.05 0.10 -o out/living
    python benchmarks/living.py contamination-seeds --category screw --share 0.05 --seeds 0 1 2 -o out/living
    python benchmarks/living.py drift --category bottle --first 150 -o out/living
    python benchmarks/living.py feedback --category bottle --first 150 -o out/living

``update``: fit on the first ``--first`` good images (drawn by seed), add the rest with ``PatchCore.update``,
and fit all of them at once; prints the times (the update's as a share of the full fit's), the image and pixel
AUROC of both models on the test set, and their false-alarm rate on test/good against the calibrated bound.
Time it with nothing else running (the load average is printed).

``contamination``: move ``share`` of the category's test defects (drawn by seed, with their masks) into its
training set; fit with the default settings and with ``leave_out_suspects``; evaluate both (and a clean fit)
on the test set without the moved images, and count how many moved images the audit ranks in its top k
(k = how many were moved) and how many it lists as suspects. ``contamination-seeds``: the same planting, the
fits' seed varied (``--seeds``): clean, default and robust image AUROC for each (``--models``: some of them).

``drift``: fit on the first ``--first`` good images; score the other good images as they are and shifted
(darker and brighter by 10 and 20 %, Gaussian blur of 1 and 2 px); then run the service's drift monitor
(:mod:`patchcore.core.drift`) over streams drawn from those scores, ``--streams`` seeds each: how often an
unshifted stream of ``--length`` images is flagged (false drift alarms), and after how many shifted images a
stream that turns from unshifted (a full window) to shifted is flagged. The test/good images' scores are
checked against the calibration too (another session of the same camera).

``feedback``: fit on the first ``--first`` good images; a stream of good parts mixes the test set's good
images with a calibration-breaking variant of the other good images (darker by ``--darker``, default 30 %),
shuffled by seed. The operator overrules the false alarms in the stream's first half; they are applied with
``PatchCore.update`` (as the service's ``:apply-feedback`` does); the false-alarm rate on the second half is
measured before and after, against the calibrated bound.

Each run writes a JSON file under ``-o`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from patchcore import PatchCore
from patchcore.datasets import Dataset, read_mvtec
from patchcore.evaluate import evaluate_model
from patchcore.metrics import image_auroc

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad"


def metrics(model: PatchCore, ds: Dataset) -> dict:
    r = evaluate_model(model, ds, keep_maps=False)
    return {"image_auroc": r.image_auroc, "pixel_auroc": r.pixel_auroc, "aupro": r.aupro, "good_far": r.good_far,
            "defect_recall": r.defect_recall, "threshold": r.threshold,
            "guaranteed_far": (model.calibration_ or {}).get("guaranteed_far")}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def split_train(ds: Dataset, args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    """The first ``--first`` good training images (drawn by seed, in file order) and the others."""
    order = np.random.default_rng(args.seed).permutation(len(ds.train))
    return ([ds.train[i] for i in sorted(order[:args.first])], [ds.train[i] for i in sorted(order[args.first:])])


def update_run(args: argparse.Namespace) -> dict:
    ds = read_mvtec(Path(args.data) / args.category)
    first, rest = split_train(ds, args)
    out = {"category": args.category, "n_first": len(first), "n_added": len(rest), "load_start": load()}

    t = time.perf_counter()
    full = PatchCore(seed=args.seed).fit(ds.train)
    out["full_fit_seconds"] = time.perf_counter() - t
    out["full"] = metrics(full, ds)
    out["full_bank"] = int(full.fit_info_["bank_size"])
    del full

    t = time.perf_counter()
    model = PatchCore(seed=args.seed).fit(first)
    out["first_fit_seconds"] = time.perf_counter() - t
    out["first"] = metrics(model, ds)
    out["load_before_update"] = load()
    t = time.perf_counter()
    model.update(rest)
    out["update_seconds"] = time.perf_counter() - t
    out["update_share"] = out["update_seconds"] / out["full_fit_seconds"]
    out["update_step"] = model.fit_info_["updates"][-1]
    out["updated"] = metrics(model, ds)
    out["updated_bank"] = int(model.fit_info_["bank_size"])
    out["updated_calibration_n"] = int(model.calibration_["n"])
    out["load_end"] = load()
    return out


def plant(ds: Dataset, share: float, seed: int) -> tuple[list[Path], Dataset]:
    """The test defects (drawn by ``seed``) that make ``share`` of the contaminated training set, and the
    dataset without them in its test set. A larger share of one seed holds the smaller one's."""
    defects = [i for i, s in enumerate(ds.test) if s.label == 1]
    shuffled = list(np.random.default_rng(seed).permutation(defects))
    moved = set(shuffled[:max(1, round(share * len(ds.train) / (1 - share)))])
    return ([ds.test[i].path for i in sorted(moved)],
            Dataset(ds.name, ds.train, [s for i, s in enumerate(ds.test) if i not in moved]))


def contamination_run(args: argparse.Namespace) -> dict:
    ds = read_mvtec(Path(args.data) / args.category)
    out = {"category": args.category, "n_train": len(ds.train),
           "n_defects": sum(s.label == 1 for s in ds.test), "runs": []}
    clean = PatchCore(seed=args.seed).fit(ds.train)
    out["clean_suspects"] = clean.calibration_.get("suspects")
    for share in args.share:
        planted, test = plant(ds, share, args.seed)
        train = list(ds.train) + planted
        names = {"/".join(p.parts[-2:]) for p in planted}
        run = {"share": share, "planted": len(planted), "clean": metrics(clean, test)}
        for label, robust in (("default", False), ("robust", True)):
            t = time.perf_counter()
            model = PatchCore(seed=args.seed, leave_out_suspects=robust).fit(train)
            cal = model.calibration_
            row = {"fit_seconds": time.perf_counter() - t, **metrics(model, test),
                   "n_fitted": int(model.fit_info_["n_images"]),
                   "suspects": len(cal.get("suspects") or []),
                   "planted_in_suspects": sum(n in names for n, _ in cal.get("suspects") or [])}
            if robust:
                gone = cal.get("left_out") or []
                row["left_out"] = len(gone)
                row["planted_left_out"] = sum(n in names for n, _ in gone)
            else:
                ranked = sorted(zip(cal["scores"], cal["images"]), reverse=True)
                row["scored"] = len(ranked)
                row["planted_scored"] = sum(n in names for _, n in ranked)
                row["planted_in_top_k"] = sum(n in names for _, n in ranked[:len(planted)])
                q1, q3 = np.percentile(cal["scores"], [25, 75])
                # How far above the fence's Q3 each image lies, in IQRs: where a stricter fence would cut.
                row["iqrs_above_q3"] = {"planted": sorted(round((v - q3) / (q3 - q1), 2) for v, n in ranked
                                                          if n in names),
                                        "good_top10": [round((v - q3) / (q3 - q1), 2) for v, n in ranked
                                                       if n not in names][:10]}
            run[label] = row
            print(json.dumps({label: row}), file=sys.stderr, flush=True)
        out["runs"].append(run)
    return out


def contamination_seeds_run(args: argparse.Namespace) -> dict:
    """The planting of seed ``--seed`` (each ``--share``), fitted with each of ``--seeds``: image AUROC of the
    clean fit, the default fit and the robust fit on the test set without the planted images. Seed to seed,
    the clean fit alone moves about as much as contamination costs (docs/benchmarks.md, section 20)."""
    ds = read_mvtec(Path(args.data) / args.category)
    out = {"category": args.category, "planted_by_seed": args.seed, "runs": []}
    for share in args.share:
        planted, test = plant(ds, share, args.seed)
        names = {"/".join(p.parts[-2:]) for p in planted}
        y = np.array([s.label for s in test.test])
        dirty = list(ds.train) + planted
        for seed in args.seeds:
            row = {"share": share, "planted": len(planted), "seed": seed}
            # Default and clean without a threshold: their banks, and so their AUROC, do not depend on it.
            for label, params, train in (("clean", {"calibration_folds": 0}, ds.train),
                                         ("default", {"calibration_folds": 0}, dirty),
                                         ("robust", {"leave_out_suspects": True}, dirty)):
                if label not in args.models:
                    continue
                model = PatchCore(seed=seed, **params).fit(train)
                row[label] = image_auroc(y, model.score_samples([s.path for s in test.test]))
                if label == "robust":
                    gone = model.calibration_.get("left_out") or []
                    row["left_out"], row["planted_left_out"] = len(gone), sum(n in names for n, _ in gone)
            print(json.dumps(row), file=sys.stderr, flush=True)
            out["runs"].append(row)
    return out


SHIFTS = {"darker 10%": ("scale", 0.9), "darker 20%": ("scale", 0.8), "brighter 10%": ("scale", 1.1),
          "brighter 20%": ("scale", 1.2), "blur 1 px": ("blur", 1.0), "blur 2 px": ("blur", 2.0)}


def shifted(path: Path, how: tuple[str, float]) -> np.ndarray:
    from PIL import Image, ImageFilter

    from patchcore.core.imagefiles import read_image

    a = read_image(path)
    kind, amount = how
    if kind == "scale":
        return np.clip(a.astype(np.float32) * amount, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(amount)))


def drift_run(args: argparse.Namespace) -> dict:
    from patchcore.core.drift import WINDOW, DriftMonitor

    ds = read_mvtec(Path(args.data) / args.category)
    first, pool = split_train(ds, args)
    model = PatchCore(seed=args.seed).fit(first)
    cal = model.calibration_
    scores = {"unshifted": model.score_samples(pool)}
    for name, how in SHIFTS.items():
        scores[name] = np.array([p.score for p in model.predict([shifted(f, how) for f in pool])])
    test_good = model.score_samples([s.path for s in ds.test if s.label == 0])
    out = {"category": args.category, "n_fit": len(first), "n_pool": len(pool), "window": WINDOW,
           "streams": args.streams, "length": args.length, "threshold": model.threshold_,
           "guaranteed_far": cal.get("guaranteed_far"),
           "pool_far": {k: float((v >= model.threshold_).mean()) for k, v in scores.items()},
           "pool_median_ratio": {k: float(np.median(v) / np.median(cal["scores"])) for k, v in scores.items()}}
    mon = DriftMonitor.for_calibration(cal, model.threshold_, window=len(test_good))
    mon.add(test_good)
    out["test_good"] = {"n": len(test_good), **mon.state().to_dict()}

    def first_flag(stream: np.ndarray, start: int = 0) -> int | None:
        m = DriftMonitor.for_calibration(cal, model.threshold_)
        for i, v in enumerate(stream):
            m.add(float(v))
            if i >= start and m.state().drifting:
                return i - start + 1
        return None

    rng = np.random.default_rng(args.seed + 1)
    false = [first_flag(rng.choice(scores["unshifted"], args.length)) for _ in range(args.streams)]
    out["unshifted"] = {"streams_flagged": sum(f is not None for f in false), "streams": args.streams,
                        "first_flag_at": sorted(f for f in false if f is not None)[:20]}
    out["shifts"] = {}
    for name in SHIFTS:
        delays = []
        for _ in range(args.streams):
            stream = np.concatenate([rng.choice(scores["unshifted"], WINDOW), rng.choice(scores[name], args.length)])
            delays.append(first_flag(stream, start=WINDOW))
        found = [d for d in delays if d is not None]
        out["shifts"][name] = {"flagged": len(found), "streams": args.streams,
                               "median_images": float(np.median(found)) if found else None,
                               "p90_images": float(np.percentile(found, 90)) if found else None}
    return out


def feedback_run(args: argparse.Namespace) -> dict:
    ds = read_mvtec(Path(args.data) / args.category)
    first, others = split_train(ds, args)
    model = PatchCore(seed=args.seed).fit(first)
    bound = model.calibration_.get("guaranteed_far")
    stream = [("test good", read_image_of(s.path)) for s in ds.test if s.label == 0]
    stream += [(f"darker {args.darker:.0%}", shifted(p, ("scale", 1.0 - args.darker))) for p in others]
    rng = np.random.default_rng(args.seed + 2)
    stream = [stream[i] for i in rng.permutation(len(stream))]
    half = len(stream) // 2
    early, late = stream[:half], stream[half:]

    def alarms(images: list[np.ndarray]) -> np.ndarray:
        return np.array([p.score >= model.threshold_ for p in model.predict(images)])

    before_early, before_late = alarms([a for _, a in early]), alarms([a for _, a in late])
    defects = [s.path for s in ds.test if s.label == 1]
    recall_before = float(alarms(defects).mean())
    overruled = [a for (_, a), alarm in zip(early, before_early) if alarm]
    out = {"category": args.category, "n_fit": len(first), "stream": len(stream),
           "variant": f"darker {args.darker:.0%}", "guaranteed_far": bound, "threshold_before": model.threshold_,
           "far_first_half_before": float(before_early.mean()), "far_second_half_before": float(before_late.mean()),
           "overruled": len(overruled), "defect_recall_before": recall_before,
           "far_second_half_before_by_kind": {k: float(np.mean([al for (kk, _), al in zip(late, before_late)
                                                                 if kk == k])) for k in {k for k, _ in late}}}
    t = time.perf_counter()
    if overruled:
        model.update(overruled)
    out["update_seconds"] = time.perf_counter() - t
    after_late = alarms([a for _, a in late])
    out["threshold_after"] = model.threshold_
    out["far_second_half_after"] = float(after_late.mean())
    out["far_second_half_after_by_kind"] = {k: float(np.mean([al for (kk, _), al in zip(late, after_late) if kk == k]))
                                            for k in {k for k, _ in late}}
    out["defect_recall_after"] = float(alarms(defects).mean())
    return out


def read_image_of(path: Path) -> np.ndarray:
    from patchcore.core.imagefiles import read_image

    return read_image(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", choices=["update", "contamination", "contamination-seeds", "drift", "feedback"])
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--first", type=int, default=150)
    ap.add_argument("--share", type=float, nargs="+", default=[0.05, 0.10])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="contamination-seeds: the fits' seeds")
    ap.add_argument("--models", nargs="+", default=["clean", "default", "robust"],
                    help="contamination-seeds: which fits (clean, default, robust); the others' rows stay empty")
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--darker", type=float, default=0.3)
    ap.add_argument("-o", "--output", default="out/living")
    args = ap.parse_args()
    out = {"update": update_run, "contamination": contamination_run, "contamination-seeds": contamination_seeds_run,
           "drift": drift_run, "feedback": feedback_run}[args.job](args)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    path = Path(args.output) / f"{args.job}_{args.category}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
