"""The per-image functions both shells use (patchcore.inference), and decoding uploads (imagefiles)."""

import copy
import io

import numpy as np
import pytest
from PIL import Image

from patchcore.core.imagefiles import check_image_bytes, read_image, read_image_bytes
from patchcore.errors import ImageError, PatchCoreError
from patchcore.inference import defect_polygons, load_model, result_of, thresholds_in_force


@pytest.fixture(scope="module")
def scored(small_model, bottle):
    model = load_model(small_model)
    image = read_image(bottle / "test" / "broken_large" / "000.png")
    (pred,) = model.predict([image])
    return model, image, result_of(pred, image, thresholds_in_force(model))


def test_the_map_view_reproduces_the_defect_mask_at_any_threshold(scored):
    """The page redraws masks from map_view() by its documented rule; that rule must be the library's."""
    model, image, res = scored
    view = res.map_view()
    grey = np.asarray(Image.open(io.BytesIO(view["png"])))
    amap = res.prediction.anomaly_map
    assert grey.dtype == np.uint8 and grey.shape == amap.shape and view["scale"] >= amap.max()
    np.testing.assert_allclose(grey / 255 * view["scale"], amap, atol=view["scale"] / 255)
    thr = res.thresholds.image
    for t in (0.5 * thr, thr, 1.2 * thr, 0.999 * res.prediction.score, 1.001 * res.prediction.score):
        at_t = result_of(copy.copy(res.prediction), image, thresholds_in_force(model, t))
        rule = amap >= min(t * view["pixel_ratio"], view["peak_level"]) if res.prediction.score >= t else \
            np.zeros(amap.shape, bool)
        np.testing.assert_array_equal(at_t.mask, rule)
        assert at_t.summary()["is_anomalous"] == (res.prediction.score >= t)
    assert res.summary()["is_anomalous"] and 0 < res.summary()["defect_area_fraction"] < 1


def test_thresholds_in_force_and_their_messages(scored):
    model, _, res = scored
    cal = model.calibration_
    own = thresholds_in_force(model)
    assert (own.image, own.pixel, own.overridden) == (model.threshold_, cal["pixel_threshold"], False)
    assert own.source.startswith("calibrated for a 10% false-alarm rate")
    over = thresholds_in_force(model, 2 * model.threshold_, "--threshold")
    assert over.pixel == pytest.approx(2 * cal["pixel_threshold"]) and over.source == "set with --threshold"
    with pytest.raises(PatchCoreError, match="threshold must be positive"):
        thresholds_in_force(model, 0.0, "threshold")
    bare = copy.copy(model)
    bare.threshold_ = None
    with pytest.raises(PatchCoreError, match="m.safetensors has no calibrated threshold.*pass --threshold"):
        thresholds_in_force(bare, model_name="m.safetensors")


def test_defect_polygons_outline_each_region():
    mask = np.zeros((60, 80), bool)
    mask[10:30, 10:40] = True
    mask[15:20, 20:25] = False  # a hole
    mask[40:60, 70:80] = True  # touches two borders
    polys = defect_polygons(mask)
    assert len(polys) == 3 and all(p[0] == p[-1] and len(p) >= 4 for p in polys)
    pts = np.array([pt for p in polys for pt in p])
    assert pts[:, 0].min() >= -0.5 and pts[:, 0].max() <= 79.5 and pts[:, 1].max() <= 59.5
    boxes = sorted((min(x for x, _ in p), min(y for _, y in p), max(x for x, _ in p), max(y for _, y in p))
                   for p in polys)
    assert boxes[0] == pytest.approx((9.5, 9.5, 39.5, 29.5), abs=0.51)
    assert defect_polygons(np.zeros((5, 5), bool)) == []


def test_uploads_decode_like_files_and_are_checked_from_the_header(bottle, tmp_path):
    path = bottle / "test" / "good" / "000.png"
    np.testing.assert_array_equal(read_image_bytes(path.read_bytes()), read_image(path))
    assert check_image_bytes(path.read_bytes()) == (256, 256)
    with pytest.raises(ImageError, match=r"upload: image is 256x256 pixels \(0.1 megapixels\); the limit is 0.05"):
        check_image_bytes(path.read_bytes(), name="upload", max_pixels=50_000)
    with pytest.raises(ImageError, match="upload: not a readable image"):
        read_image_bytes(b"GIF89a but not really", name="upload")
    buf = io.BytesIO()
    Image.new("L", (40, 20)).save(buf, format="PNG")
    with pytest.raises(ImageError, match="40x20 pixels; at least 32x32"):
        check_image_bytes(buf.getvalue())
