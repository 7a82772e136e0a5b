"""Measure candidate settings on every shared category, one fresh process per (candidate, category).

    python benchmarks/accuracy_sweep.py -o out/sweep.jsonl                  # every candidate below
    python benchmarks/accuracy_sweep.py -o out/sweep.jsonl --only tf_pad16 lite0_320
    python benchmarks/accuracy_sweep.py -o out/sweep.jsonl --table         # print what is measured so far

Each row is bench_core's figures (fit seconds, ms/image p50 and p99 at batch size 1, image AUROC, pixel
AUROC, AUPRO, the share of good test images whose map peaks within 16 px of the border) for one candidate
on one category. Rows are appended as they finish, so an interrupted sweep resumes where it stopped.
This is how the defaults in docs/benchmarks.md were chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _data import add_data_argument

HERE = Path(__file__).resolve().parent

# name -> constructor arguments (everything else at the library's defaults, coreset 10 %)
CANDIDATES: dict[str, dict] = {
    "imagenet_pad0": {"normalization": "imagenet", "border_pad": 0},  # the defaults before issue 7
    "tf_pad0": {"normalization": "tf", "border_pad": 0},
    "tf_pad16_maps": {"normalization": "tf", "border_pad": 16},  # padding cut off the tapped maps (the default)
    "tf_pad32": {"normalization": "tf", "border_pad": 32},
    "tf_pad16_paper": {"normalization": "tf", "border_pad": 16, "preset": "paper"},
    "lite0_288": {"border_pad": 16, "image_size": 288},
    "lite0_320": {"border_pad": 16, "image_size": 320},
    "lite2_pad16": {"backbone": "efficientnet_lite2", "border_pad": 16},
    "lite2_320": {"backbone": "efficientnet_lite2", "border_pad": 16, "image_size": 320},
    "lite0_3layers": {"border_pad": 16, "layers": ["blocks.2", "blocks.3", "blocks.4"]},
    "lite0_320_3layers": {"border_pad": 16, "image_size": 320, "layers": ["blocks.2", "blocks.3", "blocks.4"]},
    "lite0_320_r25": {"border_pad": 16, "image_size": 320, "coreset_ratio": 0.25},
    "lite0_384": {"border_pad": 16, "image_size": 384},
    "ens_lite0_lite2": {"backbone": "efficientnet_lite0+efficientnet_lite2", "border_pad": 16},
    "ens_lite0_lite1_lite2": {"backbone": "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2", "border_pad": 16},
    "ens_lite0_lite2_288": {"backbone": "efficientnet_lite0+efficientnet_lite2", "border_pad": 16, "image_size": 288},
    "ens_lite0_lite1_320": {"backbone": "efficientnet_lite0+efficientnet_lite1", "border_pad": 16, "image_size": 320},
    "lite0_352": {"border_pad": 16, "image_size": 352},
}
CATEGORIES = ("bottle", "screw")


def done_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="accuracy sweep (Lite0, 10 % coreset unless named)")
    cols = [("candidate", "{}"), ("category", "{}"), ("fit_s", "{:.0f}"), ("ms_per_image", "{:.0f}"),
            ("ms_p99", "{:.0f}"), ("image_auroc", "{:.4f}"), ("pixel_auroc", "{:.4f}"), ("aupro", "{:.4f}"),
            ("border_peak", "{:.2f}"), ("load", "{:.1f}")]
    for c, _ in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[f.format(r[c]) if r.get(c) is not None else "-" for c, f in cols])
    Console(width=160).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, required=True, help="JSON lines, appended and resumed")
    ap.add_argument("--only", nargs="+", default=None, help="candidate names (default: all)")
    ap.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    ap.add_argument("--table", action="store_true", help="only print the rows measured so far")
    add_data_argument(ap)
    args = ap.parse_args()
    rows = done_rows(args.output)
    if args.table:
        print_table(rows)
        return
    names = args.only or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        sys.exit(f"unknown candidate(s): {', '.join(unknown)}; known: {', '.join(CANDIDATES)}")
    have = {(r["candidate"], r["category"]) for r in rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        for cat in args.categories:
            if (name, cat) in have:
                continue
            # The threshold does not change the metrics measured here: skip the cross-fitted calibration.
            params = {"calibration_folds": 0, **CANDIDATES[name]}
            cmd = [sys.executable, str(HERE / "bench_core.py"), "--one", cat, "--params", json.dumps(params),
                   "--data", str(args.data)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{name} / {cat}: failed\n{out.stderr[-1500:]}", file=sys.stderr)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row.update(candidate=name, params=CANDIDATES[name], load=os.getloadavg()[0])
            with args.output.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} / {cat}: image {row['image_auroc']:.4f} pixel {row['pixel_auroc']:.4f} "
                  f"aupro {row['aupro']:.4f} border {row['border_peak']:.2f} {row['ms_per_image']:.0f} ms",
                  flush=True)
    print_table(done_rows(args.output))


if __name__ == "__main__":
    main()
