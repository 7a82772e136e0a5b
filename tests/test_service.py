"""`patchcore serve`: the real server (uvicorn on a loopback port, started here) spoken to over HTTP."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from patchcore.cli import app as cli_app
from patchcore.service import ServiceSettings, create_app

SRC = Path(__file__).resolve().parents[1] / "src"


# --------------------------------------------------------------------------------------------- plumbing
@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def call(base: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> Reply:
    host, port = base.rsplit("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def multipart(field: str, data: bytes, filename: str = "image.png") -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def predict(base: str, model: str, data: bytes, query: str = "", raw: bool = False, headers: dict | None = None,
            ) -> Reply:
    if raw:
        body, h = data, {"Content-Type": "image/png"}
    else:
        body, h = multipart("image", data)
    return call(base, "POST", f"/v1/models/{model}:predict{query}", body, {**h, **(headers or {})})


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` and whose pixel data is 16 bytes of zeros: it can be
    opened, but never decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bytes(16)) + chunk(b"IEND", b"")


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def wait_for(check, timeout: float = 30.0, every: float = 0.1):
    """Poll ``check()`` until it returns something truthy; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {check.__doc__ or check}")
        time.sleep(every)


@contextmanager
def running(models_dir: Path, **settings):
    """The service's app on uvicorn, on a free loopback port, in a thread; yields its base URL once ready."""
    import uvicorn

    app = create_app(ServiceSettings(models_dir=models_dir, **{"reload_interval": 0.2, **settings}))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.started, timeout=30)
        wait_for(lambda: call(base, "GET", "/readyz").status == 200 or None, timeout=60)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def serving_subprocess(args_for_port, **env_vars):
    """`patchcore serve` in a Python subprocess (``args_for_port(port)``: its arguments after the interpreter)
    on a free loopback port; yields (base URL, process) once /readyz answers 200, then stops it with Ctrl-C.
    The process's stderr is in ``proc.stderr_text`` afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_vars)
    proc = subprocess.Popen([sys.executable, *args_for_port(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready():
            """the subprocess serves its models"""
            assert proc.poll() is None, proc.communicate()
            try:
                return call(base, "GET", "/readyz", timeout=5).status == 200
            except OSError:
                return False

        wait_for(ready, timeout=90, every=0.3)
        yield base, proc
    finally:
        proc.send_signal(signal.SIGINT)
        _, proc.stderr_text = proc.communicate(timeout=60)


def one_line_error(reply: Reply, status: int, *needles: str) -> str:
    assert reply.status == status, (reply.status, reply.body[:300])
    detail = reply.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail, detail
    for n in needles:
        assert n in detail, (n, detail)
    return detail


@pytest.fixture(scope="module")
def server(small_model, tmp_path_factory):
    """One server for the read-only tests: a 1 MB upload limit and a 2 megapixel limit, so the error paths
    are cheap to reach."""
    folder = tmp_path_factory.mktemp("served")
    shutil.copy(small_model, folder / "bottle.safetensors")
    with running(folder, max_upload_bytes=1024 * 1024, max_pixels=2_000_000) as base:
        yield base


# ----------------------------------------------------------------------------------------------- tests
def test_predict_gives_the_numbers_and_pictures_of_patchcore_predict(server, small_model, bottle, tmp_path):
    images = [bottle / "test" / "good" / "000.png", bottle / "test" / "broken_large" / "000.png"]
    out = tmp_path / "cli"
    res = CliRunner().invoke(cli_app, ["predict", str(small_model), *map(str, images), "-o", str(out), "--json",
                                       "--batch-size", "1", "--map-format", "npy"])
    assert res.exit_code == 0, res.stderr
    rows = {Path(r["path"]).parent.name: r for r in json.loads(res.stdout)["images"]}
    for img in images:
        row = rows[img.parent.name]
        for raw in (False, True):  # a multipart form, and the bytes as the body
            reply = predict(server, "bottle", img.read_bytes(), "?overlay=true&mask=true&polygons=true", raw=raw)
            assert reply.status == 200, reply.body[:300]
            got = reply.json()
            for key in ("score", "normalized_score", "is_anomalous", "verdict", "threshold", "pixel_threshold",
                        "width", "height", "defect_area_fraction"):
                assert got[key] == row[key], (img, key, got[key], row[key])
            assert got["model"] == "bottle" and got["threshold_source"] == json.loads(res.stdout)["threshold_source"]
            overlay = decode_png(got["overlay_png"])
            # The same picture up to float rounding: the server and the CLI run their threads differently, and
            # a blended pixel may round to the next grey level (seen: one pixel of 196,608, by 1).
            ref = np.asarray(Image.open(out / row["overlay"]))
            assert overlay.shape == ref.shape
            diff = np.abs(overlay.astype(int) - ref.astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
            mask = decode_png(got["mask_png"])
            np.testing.assert_array_equal(mask, np.asarray(Image.open(out / row["mask"])))
            if got["is_anomalous"]:
                assert got["polygons"] and all(len(p) >= 3 and p[0] == p[-1] for p in got["polygons"])
                pts = np.array([pt for poly in got["polygons"] for pt in poly])
                rows_, cols = np.nonzero(mask)  # the outlines run around the mask, within half a pixel or so
                assert cols.min() - 1 <= pts[:, 0].min() and pts[:, 0].max() <= cols.max() + 1
                assert rows_.min() - 1 <= pts[:, 1].min() and pts[:, 1].max() <= rows_.max() + 1
            else:
                assert got["polygons"] == [] and not mask.any()
    assert rows["broken_large"]["verdict"] == "anomalous"
    # Judged at another threshold on request, as `patchcore predict --threshold` does.
    high = predict(server, "bottle", images[1].read_bytes(), f"?threshold={rows['broken_large']['score'] * 2}")
    assert high.status == 200 and high.json()["verdict"] == "good" and high.json()["threshold_source"].startswith(
        "set with")


def test_models_health_metrics_docs_and_page(server, bottle):
    listing = call(server, "GET", "/v1/models").json()
    (m,) = listing["models"]
    assert m["name"] == "bottle" and m["backbone"] == "efficientnet_lite0" and m["threshold"] > 0
    assert m["calibration"]["n"] == 10 and m["calibration"]["statement"] and listing["failures"] == []
    assert call(server, "GET", "/v1/models/bottle").json()["threshold"] == m["threshold"]
    assert call(server, "GET", "/healthz").json()["status"] == "ok"
    assert call(server, "GET", "/readyz").json() == {"ready": True, "models": 1, "failures": 0}

    def count(text: str, line: str) -> float:
        found = [ln for ln in text.splitlines() if ln.startswith(line + " ")]
        return float(found[0].split()[-1]) if found else 0.0

    verdict_line = 'patchcore_predictions_total{model="bottle",verdict="anomalous"}'
    before = call(server, "GET", "/metrics").body.decode()
    assert predict(server, "bottle", (bottle / "test" / "broken_large" / "001.png").read_bytes()).status == 200
    after = call(server, "GET", "/metrics").body.decode()
    assert count(after, verdict_line) == count(before, verdict_line) + 1
    assert 'patchcore_http_request_seconds_bucket{le="30.0",method="POST",route="/v1/models/{name}:predict"}' in after
    assert 'patchcore_http_requests_total{method="GET",route="/healthz",status="200"}' in after
    # OpenAPI from the typed models; the docs page and its scripts come from the package, not a CDN.
    spec = call(server, "GET", "/openapi.json").json()
    props = spec["components"]["schemas"]["PredictResponse"]["properties"]
    assert {"score", "normalized_score", "is_anomalous", "threshold"} <= set(props)
    assert "multipart/form-data" in spec["paths"]["/v1/models/{name}:predict"]["post"]["requestBody"]["content"]
    docs = call(server, "GET", "/docs").body.decode()
    assert "http://" not in docs and "https://" not in docs and "swagger-ui-bundle.js" in docs
    assert call(server, "GET", "/static-offline-docs/swagger-ui-bundle.js").status == 200
    page = call(server, "GET", "/").body.decode()
    assert 'id="model"' in page and 'id="file"' in page and 'id="threshold"' in page
    for asset in ("/ui/app.js", "/ui/style.css"):
        reply = call(server, "GET", asset)
        assert reply.status == 200 and b"http://" not in reply.body and b"https://" not in reply.body


def test_bad_requests_get_one_line_reasons(server, bottle):
    good = (bottle / "test" / "good" / "000.png").read_bytes()
    one_line_error(predict(server, "nope", good), 404, "no model named 'nope'", "bottle")
    one_line_error(predict(server, "bottle", b"this is not an image"), 422, "not a readable image")
    one_line_error(predict(server, "bottle", good[: len(good) // 3]), 422, "not a readable image")  # cut short
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, format="PNG")
    one_line_error(predict(server, "bottle", tiny.getvalue()), 422, "8x8", "at least 32x32")
    # Absurd dimensions are refused from the header: these files hold no pixel data that could be decoded.
    t0 = time.perf_counter()
    one_line_error(predict(server, "bottle", png_header_only(100_000, 100_000)), 422, "too many pixels")
    one_line_error(predict(server, "bottle", png_header_only(2000, 2000)), 422, "2000x2000", "limit is 2 megapixels")
    assert time.perf_counter() - t0 < 5
    one_line_error(call(server, "POST", "/v1/models/bottle:predict", *multipart("picture", good)), 422, "'image'")
    one_line_error(call(server, "POST", "/v1/models/bottle:predict", b""), 422, "empty")
    reply = call(server, "GET", "/v1/models/bottle:predict")  # the URL is right, the method is not
    one_line_error(reply, 405, "POST")
    assert reply.headers.get("allow", reply.headers.get("Allow")) == "POST"
    one_line_error(predict(server, "bottle", good, "?threshold=-1"), 422, "threshold")
    # Over the upload limit (1 MB here): refused from the declared length, before any of the body is sent ...
    conn = http.client.HTTPConnection(*server.rsplit("//", 1)[1].split(":"), timeout=30)
    conn.putrequest("POST", "/v1/models/bottle:predict")
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(25 * 1024 * 1024))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "larger than the limit of 1 MB" in json.loads(r.read())["detail"]
    conn.close()
    # ... or, sent without a length (chunked), once the bytes read pass the limit.
    conn = http.client.HTTPConnection(*server.rsplit("//", 1)[1].split(":"), timeout=30)
    chunks = (bytes(64 * 1024) for _ in range(24))  # 1.5 MB
    conn.request("POST", "/v1/models/bottle:predict", body=chunks, encode_chunked=True,
                 headers={"Content-Type": "image/png"})
    r = conn.getresponse()
    assert r.status == 413 and "larger than the limit" in json.loads(r.read())["detail"]
    conn.close()
    # Every refusal left the server serving.
    assert predict(server, "bottle", good).status == 200


def test_api_key_guards_everything_but_health(small_model, tmp_path, bottle):
    shutil.copy(small_model, tmp_path / "bottle.safetensors")
    img = (bottle / "test" / "good" / "000.png").read_bytes()
    with running(tmp_path, api_key="s3cret") as base:
        for path in ("/healthz", "/readyz", "/", "/ui/app.js"):
            assert call(base, "GET", path).status == 200, path
        for path in ("/v1/models", "/v1/models/bottle", "/metrics"):
            one_line_error(call(base, "GET", path), 401, "API key")
            one_line_error(call(base, "GET", path, headers={"X-API-Key": "wrong"}), 401, "API key")
            assert call(base, "GET", path, headers={"X-API-Key": "s3cret"}).status == 200, path
        one_line_error(predict(base, "bottle", img), 401, "API key")
        one_line_error(predict(base, "nope", img), 401)  # the key comes before anything about the request
        assert predict(base, "bottle", img, headers={"X-API-Key": "s3cret"}).status == 200
        assert predict(base, "bottle", img, headers={"Authorization": "Bearer s3cret"}).status == 200


def test_models_are_added_replaced_and_kept_when_a_new_file_is_bad(small_model, tmp_path, bottle):
    from patchcore import PatchCore

    folder, spare = tmp_path / "models", tmp_path / "spare"
    folder.mkdir()
    spare.mkdir()
    shutil.copy(small_model, folder / "a.safetensors")
    other = PatchCore.load(small_model)
    other.calibrate(target_far=0.3)  # the same bank at another threshold: tells the versions apart
    other_file = other.save(spare / "other.safetensors")
    img = (bottle / "test" / "good" / "000.png").read_bytes()

    def served() -> dict:
        return {m["name"]: m for m in call(base, "GET", "/v1/models").json()["models"]}

    def failures() -> dict:
        return {f["name"]: f for f in call(base, "GET", "/v1/models").json()["failures"]}

    with running(folder) as base:
        first = served()["a"]["threshold"]
        assert first != other.threshold_
        # Added while serving.
        shutil.copy(other_file, folder / "b.safetensors")
        wait_for(lambda: "b" in served())
        assert served()["b"]["threshold"] == pytest.approx(other.threshold_)
        assert predict(base, "b", img).json()["threshold"] == pytest.approx(other.threshold_)
        # Half copied: never served; reported by name.
        data = other_file.read_bytes()
        (folder / "c.safetensors").write_bytes(data[: len(data) // 2])
        wait_for(lambda: "c" in failures())
        assert "c" not in served() and predict(base, "c", img).status == 404
        assert "truncated" in failures()["c"]["detail"]
        (folder / "c.safetensors").write_bytes(data)  # the copy completes
        wait_for(lambda: "c" in served())
        assert "c" not in failures()
        # Replaced in place: the new version serves.
        shutil.copy(other_file, folder / "a.safetensors")
        wait_for(lambda: served()["a"]["threshold"] == pytest.approx(other.threshold_))
        # Replaced by a damaged file: reported, and the version before keeps serving.
        shutil.copy(small_model, folder / "a.safetensors")
        wait_for(lambda: served()["a"]["threshold"] == pytest.approx(first))
        (folder / "a.safetensors").write_bytes(b"not a model at all" * 100)
        wait_for(lambda: "a" in failures())
        assert "not a patchcore model" in failures()["a"]["detail"]
        assert served()["a"]["threshold"] == pytest.approx(first)
        reply = predict(base, "a", img)
        assert reply.status == 200 and reply.json()["threshold"] == pytest.approx(first)
        # Removed: no longer served.
        (folder / "b.safetensors").unlink()
        wait_for(lambda: "b" not in served())
        assert predict(base, "b", img).status == 404


def test_a_full_queue_answers_503_with_retry_after_and_health_stays_quick(small_model, tmp_path, bottle):
    shutil.copy(small_model, tmp_path / "bottle.safetensors")
    # A larger image makes each scoring slow enough that the burst below overlaps it.
    big = Image.open(bottle / "test" / "broken_large" / "000.png").convert("RGB").resize((768, 768))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    img = buf.getvalue()
    n = 8
    with running(tmp_path, concurrency=1, queue_size=1) as base:
        barrier = threading.Barrier(n + 1)
        replies: list[Reply] = []

        def client() -> None:
            barrier.wait()
            replies.append(predict(base, "bottle", img))

        threads = [threading.Thread(target=client) for _ in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        time.sleep(0.05)
        t0 = time.perf_counter()
        assert call(base, "GET", "/healthz").status == 200
        health_seconds = time.perf_counter() - t0
        for t in threads:
            t.join(timeout=120)
        statuses = sorted(r.status for r in replies)
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 2 and 503 in statuses, statuses
        for r in replies:
            if r.status == 503:
                assert int(r.headers["retry-after"]) >= 1
                one_line_error(r, 503, "busy")
        metrics = call(base, "GET", "/metrics").body.decode()
        assert f'patchcore_rejected_total{{reason="busy"}} {float(statuses.count(503))}' in metrics
    # Scoring runs in its own threads: the event loop answered while images were being scored.
    assert health_seconds < 1.0, health_seconds


def test_concurrent_requests_are_scored_in_batches_with_the_answers_of_one_at_a_time(small_model, tmp_path, bottle):
    """Eight clients at once on one scorer: the requests that waited together are scored in batches (the
    batch histogram counts fewer batches than images), each answer is the one the image gets alone, and a bad
    image among them fails only its own request."""
    shutil.copy(small_model, tmp_path / "bottle.safetensors")
    files = sorted((bottle / "test" / "broken_large").iterdir())[:7]
    images = [f.read_bytes() for f in files] + [_gray_png()]  # the last: grayscale, refused by a colour model
    with running(tmp_path, concurrency=1, queue_size=8, max_batch=8) as base:
        alone = [json.loads(predict(base, "bottle", img).body) for img in images[:7]]
        barrier = threading.Barrier(len(images))
        replies: dict[int, Reply] = {}

        def client(i: int) -> None:
            barrier.wait()
            replies[i] = predict(base, "bottle", images[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        metrics = call(base, "GET", "/metrics").body.decode()
    for i, a in enumerate(alone):
        got = json.loads(replies[i].body)
        assert replies[i].status == 200 and got["verdict"] == a["verdict"]
        assert got["score"] == pytest.approx(a["score"], rel=1e-5)
    one_line_error(replies[7], 422, "grayscale image")
    count = float(re.search(r'patchcore_batch_images_count\{model="bottle"\} ([0-9.]+)', metrics).group(1))
    total = float(re.search(r'patchcore_batch_images_sum\{model="bottle"\} ([0-9.]+)', metrics).group(1))
    assert total >= 7 + 7 and count < 7 + 7, metrics  # 7 alone, then the burst in fewer batches than images


def _gray_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)).save(buf, format="PNG")
    return buf.getvalue()


def test_serve_command(small_model, tmp_path):
    """`patchcore serve` as a user runs it: a subprocess, the key from the environment, Ctrl-C to stop."""
    res = CliRunner().invoke(cli_app, ["serve", str(tmp_path / "missing")])
    assert res.exit_code == 1 and res.stderr.strip().startswith("error: ") and "no such folder" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(small_model, folder / "bottle.safetensors")
    with serving_subprocess(lambda port: ["-m", "patchcore", "serve", str(folder), "--port", str(port)],
                            PATCHCORE_API_KEY="from-env") as (base, proc):
        assert call(base, "GET", "/v1/models").status == 401
        listing = call(base, "GET", "/v1/models", headers={"X-API-Key": "from-env"}).json()
        assert [m["name"] for m in listing["models"]] == ["bottle"]
    err = proc.stderr_text
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "serving 1 model file(s)" in err and "model bottle loaded" in err


@pytest.mark.slow
def test_exports_serve_without_torch_and_answer_as_the_model_file(small_model, bottle, tmp_path):
    """A folder with a model file and its export: both listed (with their kind), both answer the same numbers
    within the export's parity; then the export alone, served by `patchcore serve` from a process in which
    torch cannot be imported."""
    from patchcore import PatchCore

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(small_model, folder / "bottle.safetensors")
    PatchCore.load(small_model, device="cpu").export(folder / "bottle-export",
                                                     images=[bottle / "test" / "broken_large" / "000.png"])
    images = [bottle / "test" / "good" / "000.png", bottle / "test" / "broken_large" / "000.png"]
    with running(folder) as base:
        wait_for(lambda: len(call(base, "GET", "/v1/models").json()["models"]) == 2 or None, timeout=60)
        kinds = {m["name"]: m["kind"] for m in call(base, "GET", "/v1/models").json()["models"]}
        assert kinds == {"bottle": "model file", "bottle-export": "export"}
        for img in images:
            a = predict(base, "bottle", img.read_bytes(), "?map=true").json()
            b = predict(base, "bottle-export", img.read_bytes(), "?map=true").json()
            assert abs(a["score"] - b["score"]) <= 1e-4 * a["score"] and a["verdict"] == b["verdict"]
            assert a["threshold"] == b["threshold"] and a["pixel_threshold"] == pytest.approx(b["pixel_threshold"])
            ma, mb = decode_png(a["map"]["png"]) * a["map"]["scale"] / 255, \
                decode_png(b["map"]["png"]) * b["map"]["scale"] / 255
            assert np.abs(ma - mb).max() <= 0.01 * np.ptp(ma) + 2 * a["map"]["scale"] / 255  # 8-bit views
    only = tmp_path / "exports"
    only.mkdir()
    shutil.copytree(folder / "bottle-export", only / "bottle")
    def torch_free(port: int) -> list[str]:  # as on an install without torch
        return ["-c", "import sys; sys.modules['torch'] = None\nfrom patchcore.entry import main\n"
                      f"main(['serve', {str(only)!r}, '--port', '{port}'])\n"]

    with serving_subprocess(torch_free) as (base, proc):
        reply = predict(base, "bottle", images[1].read_bytes())
        assert reply.status == 200 and reply.json()["verdict"] == "anomalous"
    err = proc.stderr_text
    assert "Traceback" not in err and "1 export(s)" in err, err
