"""A self-contained HTML report: settings, metric table, score histogram, ROC curve and a gallery.

The page has inline CSS, its charts are inline SVG drawn here, its pictures are base64 PNG data URIs:
no scripts, no external files, nothing fetched. It can be mailed or archived as one file.

Per section (one per category, or one for a predict run):

* a histogram of the image scores of good vs defective images, the threshold as a dashed line;
* the ROC curve (when both good and defective images are labelled), with the threshold's operating point;
* a gallery of the worst misses (defective images with the lowest scores) and the worst false alarms
  (good images with the highest scores), each as the image beside its heat-map overlay.
  Without labels: the highest-scoring images and the closest calls (scores nearest the threshold).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .core.files import atomic_write_text
from .core.geometry import Preprocessing
from .core.imagefiles import read_image
from .core.prediction import mask_level
from .errors import PatchCoreError
from .visualize import overlay, png_bytes, thumbnail

__all__ = ["Section", "GalleryItem", "build_section", "histogram_svg", "roc_svg", "render_html", "write_report"]

GOOD_COLOR = "#2a9d8f"
BAD_COLOR = "#e76f51"
ALL_COLOR = "#457b9d"


@dataclass
class GalleryItem:
    title: str
    caption: str
    image_png: bytes
    overlay_png: bytes | None


@dataclass
class Section:
    name: str
    scores: list[float]
    labels: list[int] | None
    threshold: float | None
    threshold_label: str
    galleries: list[tuple[str, str, list[GalleryItem]]] = field(default_factory=list)
    table: tuple[list[str], list[list[str]]] | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- charts
def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    a = abs(v)
    return f"{v:.3g}" if a < 1000 else f"{v:.0f}"


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def histogram_svg(scores: Sequence[float], labels: Sequence[int] | None, threshold: float | None,
                  threshold_label: str = "threshold", width: int = 560, height: int = 260, bins: int = 30) -> str:
    """Score histogram (good vs defective when labelled) with the threshold as a dashed vertical line."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return "<p>no scores</p>"
    lo, hi = float(s.min()), float(s.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    pad = (hi - lo) * 0.05 or max(abs(hi) * 0.05, 1e-6)
    lo, hi = lo - pad, hi + pad
    edges = np.linspace(lo, hi, bins + 1)
    groups: list[tuple[str, str, np.ndarray]] = []
    if labels is not None:
        y = np.asarray(labels)
        groups = [(f"good ({int((y == 0).sum())})", GOOD_COLOR, s[y == 0]),
                  (f"defective ({int((y == 1).sum())})", BAD_COLOR, s[y == 1])]
    else:
        groups = [(f"images ({s.size})", ALL_COLOR, s)]
    counts = [np.histogram(g, edges)[0] for _, _, g in groups]
    cmax = max(1, max(int(c.max()) for c in counts))
    ml, mr, mt, mb = 48, 16, 28, 40
    pw, ph = width - ml - mr, height - mt - mb

    def X(v: float) -> float:
        return ml + (v - lo) / (hi - lo) * pw

    def Y(c: float) -> float:
        return mt + ph - c / cmax * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="score histogram" class="chart">',
           f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    for t in [v for v in _nice_ticks(0, cmax, 4) if float(v).is_integer()] or [0, cmax]:
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{ml - 6}" y="{Y(t) + 4:.1f}" text-anchor="end" class="tick">{int(t)}</text>')
    for t in _nice_ticks(lo, hi, 6):
        out.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" stroke="#666"/>'
                   f'<text x="{X(t):.1f}" y="{mt + ph + 16}" text-anchor="middle" class="tick">{_fmt(t)}</text>')
    for (_name, color, _), c in zip(groups, counts):
        for i, k in enumerate(c):
            if k:
                x0, x1 = X(edges[i]), X(edges[i + 1])
                out.append(f'<rect x="{x0 + 0.5:.1f}" y="{Y(k):.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                           f'height="{mt + ph - Y(k):.1f}" fill="{color}" fill-opacity="0.6" stroke="{color}"/>')
    if threshold is not None:
        tx = X(threshold)
        out.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{mt - 4}" y2="{mt + ph}" stroke="#111" '
                   f'stroke-width="2" stroke-dasharray="6 4"/>'
                   f'<text x="{tx + 4:.1f}" y="{mt + 10}" class="tick" font-weight="bold">'
                   f'{html.escape(threshold_label)} = {_fmt(threshold)}</text>')
    lx = ml + 8
    for i, (name, color, _) in enumerate(groups):
        yy = mt - 14
        x = lx + i * 150
        out.append(f'<rect x="{x}" y="{yy - 9}" width="12" height="10" fill="{color}" fill-opacity="0.6"/>'
                   f'<text x="{x + 16}" y="{yy}" class="tick">{html.escape(name)}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 6}" text-anchor="middle" class="axis">image score</text>'
               f'<text x="12" y="{mt + ph / 2}" text-anchor="middle" class="axis" '
               f'transform="rotate(-90 12 {mt + ph / 2})">images</text></svg>')
    return "".join(out)


def roc_svg(labels: Sequence[int], scores: Sequence[float], threshold: float | None = None,
            size: int = 260) -> str:
    """ROC curve (false-alarm rate vs detection rate) with the AUROC and the threshold's operating point."""
    from .metrics import image_auroc, roc_curve_points

    try:
        fpr, tpr, _ = roc_curve_points(labels, scores)
        auc = image_auroc(labels, scores)
    except ValueError as e:
        return f"<p class=note>No ROC curve: {html.escape(str(e))}.</p>"
    ml, mr, mt, mb = 44, 12, 12, 40
    pw, ph = size - ml - mr, size - mt - mb
    pts = " ".join(f"{ml + f * pw:.1f},{mt + ph - t * ph:.1f}" for f, t in zip(fpr, tpr))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" viewBox="0 0 {size} {size}" '
           f'role="img" aria-label="ROC curve" class="chart">',
           f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>',
           f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt}" stroke="#bbb" stroke-dasharray="4 4"/>']
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<text x="{ml + t * pw:.1f}" y="{mt + ph + 14}" text-anchor="middle" class="tick">{t:g}</text>'
                   f'<text x="{ml - 5}" y="{mt + ph - t * ph + 4:.1f}" text-anchor="end" class="tick">{t:g}</text>')
    out.append(f'<polyline points="{pts}" fill="none" stroke="{ALL_COLOR}" stroke-width="2"/>')
    if threshold is not None:
        y = np.asarray(labels).astype(bool)
        s = np.asarray(scores, dtype=np.float64)
        f, t = float((s[~y] >= threshold).mean()), float((s[y] >= threshold).mean())
        out.append(f'<circle cx="{ml + f * pw:.1f}" cy="{mt + ph - t * ph:.1f}" r="5" fill="#111">'
                   f'<title>threshold: false alarms {f:.1%}, detected {t:.1%}</title></circle>')
    out.append(f'<text x="{ml + pw - 6}" y="{mt + ph - 8}" text-anchor="end" class="tick" font-weight="bold">'
               f'AUROC {auc:.4f}</text>'
               f'<text x="{ml + pw / 2}" y="{size - 6}" text-anchor="middle" class="axis">false-alarm rate</text>'
               f'<text x="12" y="{mt + ph / 2}" text-anchor="middle" class="axis" '
               f'transform="rotate(-90 12 {mt + ph / 2})">detection rate</text></svg>')
    return "".join(out)


# ---------------------------------------------------------------------------------------------- gallery
def _item(path: str, title: str, caption: str, amap: np.ndarray | None, pixel_threshold: float | None,
          max_side: int, score: float | None = None, threshold: float | None = None) -> GalleryItem:
    try:
        img = read_image(path)
    except PatchCoreError as e:
        blank = np.full((64, 64, 3), 200, np.uint8)
        return GalleryItem(title, f"{caption} (image unreadable: {e})", png_bytes(blank), None)
    ov = None
    if amap is not None and pixel_threshold and amap.shape == img.shape[:2]:
        # The outline is the defect mask that agrees with the verdict (nothing on a good one).
        mask = None if score is None else amap >= mask_level(amap, score, threshold, pixel_threshold)
        ov = png_bytes(thumbnail(overlay(img, amap, pixel_threshold, mask=mask), max_side))
    return GalleryItem(title, caption, png_bytes(thumbnail(img, max_side)), ov)


def build_section(name: str, paths: Sequence[str], scores: Sequence[float], labels: Sequence[int] | None,
                  threshold: float | None, threshold_label: str, get_map: Callable[[int], np.ndarray | None],
                  pixel_threshold: float | None = None, n_gallery: int = 6, max_side: int = 300,
                  defect_types: Sequence[str] | None = None) -> Section:
    """A report section; ``get_map(i)`` returns image i's anomaly map (or None) for the gallery overlays."""
    s = np.asarray(scores, dtype=np.float64)
    pt = pixel_threshold if pixel_threshold else threshold

    def caption(i: int) -> str:
        parts = [f"score {s[i]:.4g}"]
        if threshold:
            parts.append(f"normalised {s[i] / threshold:.3f}")
            parts.append("anomalous" if s[i] >= threshold else "good")
        if defect_types is not None:
            parts.append(f"truth: {defect_types[i]}")
        elif labels is not None:
            parts.append("truth: " + ("defective" if labels[i] else "good"))
        return " · ".join(parts)

    def items(idx: Sequence[int]) -> list[GalleryItem]:
        return [_item(paths[i], Path(paths[i]).name if defect_types is None else
                      f"{defect_types[i]}/{Path(paths[i]).name}", caption(i), get_map(i), pt, max_side,
                      float(s[i]), threshold)
                for i in idx]

    sec = Section(name, [float(v) for v in s], None if labels is None else [int(v) for v in labels],
                  threshold, threshold_label)
    if labels is not None and len(set(int(v) for v in labels)) == 2:
        y = np.asarray(labels).astype(bool)
        bad = np.flatnonzero(y)[np.argsort(s[y], kind="stable")][:n_gallery]
        good = np.flatnonzero(~y)[np.argsort(-s[~y], kind="stable")][:n_gallery]
        n_miss = int((s[y] < threshold).sum()) if threshold is not None else None
        n_fa = int((s[~y] >= threshold).sum()) if threshold is not None else None
        sec.galleries.append((
            "Worst misses", "defective images with the lowest scores" +
            ("" if n_miss is None else f"; {n_miss} of {int(y.sum())} defective images are below the threshold"),
            items(bad)))
        sec.galleries.append((
            "Worst false alarms", "good images with the highest scores" +
            ("" if n_fa is None else f"; {n_fa} of {int((~y).sum())} good images reach the threshold"),
            items(good)))
    else:
        top = np.argsort(-s, kind="stable")[:n_gallery]
        sec.galleries.append(("Highest scores", "the most anomalous-looking images", items(top)))
        if threshold is not None:
            close = [i for i in np.argsort(np.abs(s - threshold), kind="stable") if i not in set(top)][:n_gallery]
            sec.galleries.append(("Closest calls", "images whose scores are nearest the threshold", items(close)))
        if labels is not None:
            sec.notes.append("only one class is labelled: no ROC curve")
    return sec


# ------------------------------------------------------------------------------------------------- page
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;color:#222;
background:#f4f5f7}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px} h2{font-size:1.3em;margin:32px 0 8px;border-bottom:2px solid #ddd;
padding-bottom:4px} h3{font-size:1.05em;margin:18px 0 4px}
.sub{color:#666;margin:0 0 16px}
table{border-collapse:collapse;background:#fff;margin:8px 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:right}
th{background:#eef0f3} td:first-child,th:first-child{text-align:left}
table.kv td,table.kv th{text-align:left} table.kv td:first-child{color:#555;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.chart{background:#fff;border:1px solid #ddd}
.chart .tick{font-size:11px;fill:#333} .chart .axis{font-size:12px;fill:#333}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;padding:8px}
.card .pair{display:flex;gap:4px} .card img{width:50%;height:auto;display:block;image-rendering:auto}
.card .t{font-weight:600;font-size:.9em;word-break:break-all} .card .c{font-size:.8em;color:#555}
.note{color:#666;font-size:.9em}
.anom{color:#b3261e;font-weight:600} .ok{color:#1b7f5a;font-weight:600}
details{margin:8px 0} summary{cursor:pointer;color:#444}
"""


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else html.escape(str(c))}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class _Raw(str):
    """A table cell holding HTML that must not be escaped."""


def raw(s: str) -> _Raw:
    return _Raw(s)


def render_html(title: str, subtitle: str, settings: dict[str, Any], metric_table: tuple[list[str], list[list[Any]]],
                sections: Sequence[Section], notes: Sequence[str] = ()) -> str:
    """The whole page as a string."""
    parts = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>",
             f"<h1>{html.escape(title)}</h1><p class=sub>{html.escape(subtitle)}</p>"]
    for n in notes:
        parts.append(f"<p class=note>{html.escape(n)}</p>")
    parts.append("<h2>Results</h2>")
    parts.append(_table(*metric_table, cls="metrics"))
    parts.append("<h2>Settings</h2>")
    parts.append(_table(["setting", "value"], [list(row) for row in settings_in_words(settings)], cls="kv"))
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.name)}</h2>")
        for n in sec.notes:
            parts.append(f"<p class=note>{html.escape(n)}</p>")
        if sec.table is not None:
            parts.append(_table(*sec.table))
        parts.append('<div class="charts">')
        parts.append(histogram_svg(sec.scores, sec.labels, sec.threshold, sec.threshold_label))
        if sec.labels is not None and len(set(sec.labels)) == 2:
            parts.append(roc_svg(sec.labels, sec.scores, sec.threshold))
        parts.append("</div>")
        for gtitle, gnote, gitems in sec.galleries:
            parts.append(f"<h3>{html.escape(gtitle)}</h3><p class=note>{html.escape(gnote)}; "
                         f"left: image, right: heat map (blue low, red high; white outline: defect mask)</p>")
            if not gitems:
                parts.append("<p class=note>none</p>")
                continue
            parts.append('<div class="gallery">')
            for it in gitems:
                pair = _img(it.image_png, it.title) + (_img(it.overlay_png, it.title + " overlay")
                                                       if it.overlay_png else "")
                parts.append(f'<div class="card"><div class="pair">{pair}</div>'
                             f'<div class="t">{html.escape(it.title)}</div>'
                             f'<div class="c">{html.escape(it.caption)}</div></div>')
            parts.append("</div>")
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    parts.append(f"<p class=note>Generated by patchcore at {stamp}.</p></main></body></html>")
    return "".join(parts)


# Settings whose constructor names say little to people (the rest read fine with spaces for "_").
SETTING_LABELS = {"target_far": "target false-alarm rate", "num_neighbors": "score neighbours (Eq. 7 b)",
                  "sigma": "map smoothing (sigma, px)", "target_dim": "feature width", "coreset_ratio": "coreset ratio",
                  "projection_dim": "coreset projection width", "border_pad": "border padding (px)",
                  "rotations": "fitted turns (degrees)", "calibration_folds": "calibration folds",
                  "calibration_max_images": "most images cross-fitted", "n_jobs": "parallel jobs",
                  "shard_features": "most features selected in one piece", "shard_by": "large selections split by",
                  "cell_exchange": "coreset cells exchange centres", "exact_bank": "exact bank selection",
                  "storage_dtype": "feature storage while fitting", "image_size": "network input, shorter side (px)",
                  "scale": "network pixels per image pixel",
                  "defect_size": "smallest defect to find (image px)", "keep_aspect": "aspect ratio kept",
                  "leave_out_suspects": "training images that look defective left out"}


def words(value: Any) -> str:
    """A setting's value for people: no Python reprs (tuples, None, True, dataclasses)."""
    if value is None:
        return "default"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {words(x)}" for k, x in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(words(v) for v in value) if value else "none"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def input_in_words(pre: Preprocessing) -> str:
    """The network input in words: its size, whether it keeps the aspect ratio, the channels, the tiles."""
    h, w = pre.input_size
    how = "aspect ratio kept" if pre.keep_aspect else "images squashed to it"
    kind = {"gray": "grayscale", "color": "colour"}.get(pre.channels or "", "any channels")
    tiles = f"; larger than {pre.tile} x {pre.tile} px in tiles" if pre.tile and h * w > pre.tile ** 2 else ""
    return f"{h} x {w} px (height x width), {how}; {kind}{tiles}"


def settings_in_words(settings: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of settings for people; a dataclass setting (the coreset sampler) gives a row per
    field, as the model file records them."""
    rows = []
    for key, value in settings.items():
        items = asdict(value).items() if is_dataclass(value) and not isinstance(value, type) else [(key, value)]
        rows += [(SETTING_LABELS.get(k, k.replace("_", " ")), words(v)) for k, v in items]
    return rows


def write_report(path: str | os.PathLike, page: str, overwrite: bool = False) -> Path:
    """Write the page (atomically: a reader never sees half of it); an existing file is kept unless
    ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise PatchCoreError(f"{path} already exists; choose another name or pass --overwrite")
    return atomic_write_text(path, page)


def suspects_in_words(calibration: dict[str, Any], limit: int = 5) -> str | None:
    """The training images whose cross-fitted score looks defective, for people (None when there are none):
    how many, and the first ``limit`` with their score as a multiple of the median calibration score."""
    found = calibration.get("suspects") or []
    if not found:
        return None
    median = float(np.median(calibration["scores"])) if calibration.get("scores") else 0.0
    shown = ", ".join(f"{name} ({score / median:.2f}x the median)" if median > 0 else f"{name} ({score:.4g})"
                      for name, score in found[:limit])
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return (f"{len(found)} of {calibration.get('n', '?')} scored far above the others (Tukey's far-out fence): "
            f"{shown}{more}; look at them, and refit without the defective ones (--leave-out-suspects)")


def left_out_in_words(calibration: dict[str, Any]) -> str | None:
    """The training images a fit left out as defective-looking, for people (None when none were)."""
    gone = calibration.get("left_out") or []
    if not gone:
        return None
    return f"{len(gone)}: " + ", ".join(name for name, _ in gone[:10]) + (" ..." if len(gone) > 10 else "")
