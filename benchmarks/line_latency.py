"""The line path side by side in one run: library, runtime, service (model file and export), torch-free service.

    python benchmarks/line_latency.py                       # fits and exports the default bottle model first
    python benchmarks/line_latency.py --busy --threads 1    # one busy process beside it; PATCHCORE_THREADS=1
    python benchmarks/line_latency.py --model m.safetensors --export m-export --json out/line.json

Rows, each image scored alone (batch 1) after 3 warm-up images, over --images bottle test images:

- ``library``: ``PatchCore.load(model).predict([path])`` in this process;
- ``runtime (fast)``: ``patchcore.runtime.load(export).predict([path])`` in this process;
- ``service, model file`` / ``service, export``: ``patchcore serve`` in a subprocess serving both, one request
  after the other over loopback (raw PNG body); the client's wall time per request;
- ``torch-free service``: ``patchcore serve`` of the export alone, in a process where torch cannot be imported;
- ``8 clients``: closed-loop clients against the model-file service for --seconds: answers per second, errors,
  the server's resident memory before and after; beside it the library's best batch throughput (batch 8).

``--busy`` starts a pure-Python busy loop beside the run (another job on the machine); ``--threads N`` sets
PATCHCORE_THREADS for this process and the servers. Only 127.0.0.1 is contacted; every loop is bounded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from latency import timed
from load_service import free_port, rss_mb

from _data import add_data_argument

SRC = Path(__file__).resolve().parents[1] / "src"


def _post(port: int, name: str, body: bytes, timeout: float = 120.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", f"/v1/models/{name}:predict", body=body, headers={"Content-Type": "image/png"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _ready(port: int, proc: subprocess.Popen, models: int, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.communicate()[1][-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            got = json.loads(conn.getresponse().read())
            conn.close()
            if len(got.get("models", [])) >= models:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    raise RuntimeError("server not ready in time")


def _serve(folder: Path, env: dict[str, str], torch_free: bool = False) -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = ["serve", str(folder), "--port", str(port), "--log-level", "warning", "--device", "cpu"]
    code = ("import sys; sys.modules['torch'] = None\n" if torch_free else "") + \
        f"from patchcore.entry import main\nmain({args!r})\n"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return proc, port


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def _timed(fn, items) -> dict[str, float]:
    """latency.timed's loop (3 warm-up items, then each item timed); p99 is the 99th-rank sample, not an
    interpolation, so that with 30 images it is the slowest one."""
    ms = sorted(timed(fn, items))
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
            "max_ms": ms[-1]}


def _clients(port: int, name: str, bodies: list[bytes], n: int, seconds: float) -> dict[str, float]:
    end = time.monotonic() + seconds
    done, errors, lock = [0], [0], threading.Lock()

    def loop(k: int) -> None:
        i = k
        while time.monotonic() < end:
            try:
                status, _ = _post(port, name, bodies[i % len(bodies)])
            except OSError:
                status = 0
            with lock:
                if status == 200:
                    done[0] += 1
                else:
                    errors[0] += 1
            i += n

    t0 = time.monotonic()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 180)
    return {"answers_per_s": done[0] / (time.monotonic() - t0), "answers": done[0], "errors": errors[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(ap)
    ap.add_argument("--model", type=Path, help="model file (default: fit the default model on bottle)")
    ap.add_argument("--export", type=Path, help="its export folder (default: export the model)")
    ap.add_argument("--images", type=int, default=30, help="test images per row")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the clients phase")
    ap.add_argument("--busy", action="store_true", help="run a busy loop in another process meanwhile")
    ap.add_argument("--threads", type=int, help="PATCHCORE_THREADS for this process and the servers")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    if args.threads is not None:
        os.environ["PATCHCORE_THREADS"] = str(args.threads)
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    from patchcore import PatchCore, runtime

    bottle = Path(args.data) / "mvtec_ad" / "bottle"
    tests = sorted(p for d in sorted((bottle / "test").iterdir()) for p in sorted(d.iterdir()))
    paths = tests[:: max(1, len(tests) // args.images)][: args.images]
    bodies = [p.read_bytes() for p in paths]
    work = Path(tempfile.mkdtemp(prefix="line_latency."))
    busy = None
    try:
        model_path = args.model
        if model_path is None:
            model_path = PatchCore().fit(bottle / "train" / "good").save(work / "fitted.safetensors")
        export_path = args.export
        if export_path is None:
            export_path = work / "fitted-export"
            PatchCore.load(model_path).export(export_path, images=paths[:4])
        both, only = work / "both", work / "only"
        both.mkdir()
        only.mkdir()
        shutil.copy(model_path, both / "bottle.safetensors")
        shutil.copytree(export_path, both / "bottle-export")
        shutil.copytree(export_path, only / "bottle")
        if args.busy:
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        rows: dict[str, dict] = {}
        model = PatchCore.load(model_path, device="cpu")
        rows["library"] = _timed(lambda p: model.predict([p]), paths)
        rt = runtime.load(export_path, path="fast")
        rows["runtime (fast)"] = _timed(lambda p: rt.predict([p]), paths)
        batch = [paths[i:i + 8] for i in range(0, len(paths) - 7, 8)] or [paths[:8]]
        model.predict(batch[0])
        t0 = time.perf_counter()
        for b in batch:
            model.predict(b)
        rows["library, batch 8"] = {"images_per_s": sum(map(len, batch)) / (time.perf_counter() - t0)}
        proc, port = _serve(both, env)
        try:
            _ready(port, proc, 2)
            for name, row in (("bottle", "service, model file"), ("bottle-export", "service, export")):
                rows[row] = _timed(lambda b, name=name: _post(port, name, b), bodies)
            rss0 = rss_mb(proc.pid)
            rows[f"{args.clients} clients, model file"] = {**_clients(port, "bottle", bodies, args.clients,
                                                                      args.seconds),
                                                          "rss_before_mb": rss0, "rss_after_mb": rss_mb(proc.pid)}
        finally:
            _stop(proc)
        proc, port = _serve(only, env, torch_free=True)
        try:
            t0 = time.perf_counter()
            _ready(port, proc, 1)
            status, _ = _post(port, "bottle", bodies[0])
            cold = time.perf_counter() - t0
            rows["torch-free service"] = {**_timed(lambda b: _post(port, "bottle", b), bodies),
                                          "cold_start_s": cold, "first_status": status,
                                          "rss_mb": rss_mb(proc.pid)}
        finally:
            _stop(proc)
    finally:
        if busy is not None:
            busy.kill()
        shutil.rmtree(work, ignore_errors=True)
    lib = rows["library"]["p50_ms"]
    print(f"{'row':32s} {'p50 ms':>8s} {'p99 ms':>8s} {'x library':>10s}")
    for name, r in rows.items():
        if "p50_ms" in r:
            print(f"{name:32s} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['p50_ms'] / lib:10.2f}")
        else:
            print(f"{name:32s} {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()})}")
    meta = {"busy": args.busy, "threads": os.environ.get("PATCHCORE_THREADS"), "loadavg": os.getloadavg(),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    print(json.dumps(meta))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, **meta}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
