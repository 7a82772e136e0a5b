import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore.errors import PatchCoreError
from patchcore.report import build_section, histogram_svg, render_html, roc_svg, write_report
from patchcore.visualize import overlay, turbo


def make_case(tmp_path: Path, n: int = 8):
    rng = np.random.default_rng(0)
    paths, maps, labels, scores = [], [], [], []
    for i in range(n):
        label = int(i >= n // 2)
        img = np.full((60, 90, 3), 120, np.uint8)
        m = rng.random((60, 90)).astype(np.float32)
        if label:
            img[20:40, 30:60] = 250
            m[20:40, 30:60] += 3.0
        p = tmp_path / f"img{i}.png"
        Image.fromarray(img).save(p)
        paths.append(str(p))
        maps.append(m)
        labels.append(label)
        scores.append(float(m.max()))
    return paths, maps, labels, scores


def render(tmp_path: Path) -> str:
    paths, maps, labels, scores = make_case(tmp_path)
    sec = build_section("widgets", paths, scores, labels, 2.0, "threshold", lambda i: maps[i], pixel_threshold=2.0,
                        n_gallery=3)
    return render_html("Test report", "sub", {"coreset_ratio": 0.01, "layers": ["a", "b"]},
                       (["category", "image AUROC"], [["widgets", "1.0000"]]), [sec])


def test_report_has_tables_charts_and_embedded_images(tmp_path):
    page = render(tmp_path)
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<table") == 2 and "image AUROC" in page
    # settings in words (issue 21): labels and plain values, not constructor keys and Python reprs
    assert "coreset ratio" in page and "coreset_ratio" not in page and "a, b" in page and "['a'" not in page
    assert page.count("<svg") == 2 and "AUROC 1.0000" in page and "threshold = 2" in page
    assert "Worst misses" in page and "Worst false alarms" in page
    assert page.count("data:image/png;base64,") == 12  # 3 + 3 cards, each image + overlay
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    out = write_report(tmp_path / "r.html", page)
    with pytest.raises(PatchCoreError):
        write_report(out, page)  # never silently overwritten


def test_unlabelled_section_has_no_roc_and_escapes_names(tmp_path):
    paths, maps, _, scores = make_case(tmp_path)
    sec = build_section("<b>x</b>", paths, scores, None, 2.0, "threshold", lambda i: maps[i])
    page = render_html("t", "s", {}, (["a"], [["1"]]), [sec])
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "ROC curve" not in page and "Highest scores" in page
    assert "roc" not in histogram_svg(scores, None, 2.0).lower()
    assert "No ROC curve" in roc_svg([0, 0], [1.0, 2.0])


def test_overlay_keeps_size_and_colours_hot_regions():
    img = np.full((50, 70, 3), 128, np.uint8)
    amap = np.zeros((50, 70), np.float32)
    amap[10:20, 10:20] = 10.0
    ov = overlay(img, amap, pixel_threshold=1.0)
    assert ov.shape == img.shape and ov.dtype == np.uint8
    assert ov[15, 15, 0] > ov[15, 15, 2]  # red where hot
    # where the map is cold the image shows through more than where it is hot
    assert np.abs(ov[40, 60].astype(int) - 128).max() < np.abs(ov[15, 15].astype(int) - 128).max()
    assert (ov[10, 10:20] == 255).all()  # mask outline
    assert tuple(turbo(np.array([0.0]))[0]) != tuple(turbo(np.array([1.0]))[0])


def test_report_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed")
    html_path = write_report(tmp_path / "report.html", render(tmp_path))
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1000,1400",
                        html_path.resolve().as_uri()], capture_output=True, timeout=120)
    assert shot.is_file()
    a = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert a.shape[:2] == (1400, 1000)
    assert a.std() > 10  # not a blank page
    # The turbo colours of the overlays made it onto the page (images rendered, not broken icons).
    reddish = (a[..., 0] > 150) & (a[..., 2] < 100)
    assert reddish.sum() > 50
