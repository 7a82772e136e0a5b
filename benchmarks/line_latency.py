"""The line path side by side in one run: library, runtime, service (model file and export), torch-free service.

    python benchmarks/line_latency.py                       # fits and exports the default bottle model first
    python benchmarks/line_latency.py --busy --threads 1    # one busy process beside it; PATCHCORE_THREADS=1
    python benchmarks/line_latency.py --model m.safetensors --export m-export --json out/line.json

Rows, each image scored alone (batch 1) after 3 warm-up images, --rounds times over --images bottle test images,
**interleaved**: each image goes through every row in turn, the order rotating from image to image, so that a
neighbour that slows the machine for a while slows every row alike (p99: the ceil(0.99 n)-th smallest sample):

- ``library``: ``PatchCore.load(model).predict([path])`` in this process;
- ``runtime (fast)``: ``patchcore.runtime.load(export).predict([path])`` in this process;
- ``service, model file`` / ``service, export``: ``patchcore serve`` in a subprocess serving both, one request
  after the other over loopback (raw PNG body); the client's wall time per request;
- ``torch-free service``: ``patchcore serve`` of the export alone, in a process where torch cannot be imported
  (started first and alone, for its cold start: process start, import, load, first answer);
- ``8 clients``: closed-loop clients against the model-file service, --seconds in --slices slices, each slice
  after a slice of the library's batch-8 throughput: answers per second, errors, the server's resident memory
  after each slice.

``--busy`` starts a pure-Python busy loop beside the run (another job on the machine); ``--threads N`` sets
PATCHCORE_THREADS for this process and the servers. Only 127.0.0.1 is contacted; every loop is bounded.
"""

from __future__ import annotations

# First, as a user's program would: importing patchcore sets the OpenMP and OpenBLAS waiting policies, which
# those libraries read when they start (load_service below starts numpy).
import patchcore  # noqa: F401

# isort: split
import argparse
import http.client
import json
import math
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
from typing import Callable

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


def _nearest_rank(ms: list[float], q: float) -> float:
    """The q-quantile as the ceil(q * n)-th smallest sample: with 120 samples, p99 is the second slowest."""
    ms = sorted(ms)
    return ms[max(0, math.ceil(q * len(ms)) - 1)]


def _interleaved(rows: dict[str, Callable[[int], object]], n_items: int, rounds: int) -> dict[str, dict]:
    """Each item is scored by every row in turn, the order rotating from item to item, so that a neighbour
    that slows the machine for a while slows every row alike (timing the rows one block after another made
    their ratios as noisy as the machine). 3 warm-up items per row first."""
    names = list(rows)
    for name in names:
        for i in range(min(3, n_items)):
            rows[name](i)
    ms: dict[str, list[float]] = {name: [] for name in names}
    k = 0
    for _ in range(rounds):
        for i in range(n_items):
            for j in range(len(names)):
                name = names[(j + k) % len(names)]
                t = time.perf_counter()
                rows[name](i)
                ms[name].append((time.perf_counter() - t) * 1e3)
            k += 1
    return {name: {"n": len(v), "p50_ms": statistics.median(v), "p99_ms": _nearest_rank(v, 0.99),
                   "max_ms": max(v)} for name, v in ms.items()}


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


def _posting(port: int, name: str) -> Callable[[bytes], None]:
    def post(body: bytes) -> None:
        status, text = _post(port, name, body)
        if status != 200:
            raise RuntimeError(f"{name}: HTTP {status}: {text[:200]!r}")
    return post


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(ap)
    ap.add_argument("--model", type=Path, help="model file (default: fit the default model on bottle)")
    ap.add_argument("--export", type=Path, help="its export folder (default: export the model)")
    ap.add_argument("--images", type=int, default=40, help="test images per round")
    ap.add_argument("--rounds", type=int, default=3, help="times each image is scored by each row")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=24.0, help="length of the clients phase, in --slices parts")
    ap.add_argument("--slices", type=int, default=4, help="clients slices, each after a library batch-8 slice")
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
    busy, servers = None, []
    rows: dict[str, dict] = {}
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
        # The torch-free service first and alone, for its cold start (process start, import, load, first answer).
        t0 = time.perf_counter()
        proc, free_port_ = _serve(only, env, torch_free=True)
        servers.append(proc)
        _ready(free_port_, proc, 1)
        status, _ = _post(free_port_, "bottle", bodies[0])
        cold = {"cold_start_s": time.perf_counter() - t0, "first_status": status}
        proc, port = _serve(both, env)
        servers.append(proc)
        _ready(port, proc, 2)
        model = PatchCore.load(model_path, device="cpu")
        rt = runtime.load(export_path, path="fast")
        post_model, post_export, post_free = (_posting(port, "bottle"), _posting(port, "bottle-export"),
                                              _posting(free_port_, "bottle"))
        rows.update(_interleaved({
            "library": lambda i: model.predict([paths[i]]),
            "runtime (fast)": lambda i: rt.predict([paths[i]]),
            "service, model file": lambda i: post_model(bodies[i]),
            "service, export": lambda i: post_export(bodies[i]),
            "torch-free service": lambda i: post_free(bodies[i]),
        }, len(paths), args.rounds))
        rows["torch-free service"].update(cold, rss_mb=rss_mb(servers[0].pid))
        # Throughput: library batch-8 slices and clients slices alternate, for the same reason as above.
        batch = [paths[i:i + 8] for i in range(0, len(paths) - 7, 8)] or [paths[:8]]
        model.predict(batch[0])
        lib_rates, cli_rates, rss, answers, errors = [], [], [rss_mb(servers[1].pid)], 0, 0
        for _ in range(args.slices):
            t0 = time.perf_counter()
            for b in batch:
                model.predict(b)
            lib_rates.append(sum(map(len, batch)) / (time.perf_counter() - t0))
            got = _clients(port, "bottle", bodies, args.clients, args.seconds / args.slices)
            cli_rates.append(got["answers_per_s"])
            answers, errors = answers + got["answers"], errors + got["errors"]
            rss.append(rss_mb(servers[1].pid))
        rows["library, batch 8"] = {"images_per_s": statistics.mean(lib_rates),
                                    "slices": [round(r, 2) for r in lib_rates]}
        rows[f"{args.clients} clients, model file"] = {
            "answers_per_s": statistics.mean(cli_rates), "slices": [round(r, 2) for r in cli_rates],
            "answers": answers, "errors": errors, "rss_mb": [round(r) for r in rss]}
    finally:
        for proc in servers:
            _stop(proc)
        if busy is not None:
            busy.kill()
        shutil.rmtree(work, ignore_errors=True)
    lib, run = rows["library"]["p50_ms"], rows["runtime (fast)"]["p50_ms"]
    print(f"{'row':24s} {'p50 ms':>8s} {'p99 ms':>8s} {'p99/p50':>8s} {'x library':>10s} {'x runtime':>10s}")
    for name, r in rows.items():
        if "p50_ms" in r:
            print(f"{name:24s} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['p99_ms'] / r['p50_ms']:8.2f} "
                  f"{r['p50_ms'] / lib:10.2f} {r['p50_ms'] / run:10.2f}")
    tf = rows["torch-free service"]
    print(f"torch-free service: cold start {tf['cold_start_s']:.2f} s (status {tf['first_status']}), "
          f"{tf['rss_mb']:.0f} MB resident")
    lb, cl = rows["library, batch 8"], rows[f"{args.clients} clients, model file"]
    print(f"throughput: {args.clients} clients {cl['answers_per_s']:.2f} answers/s {cl['slices']} vs library "
          f"batch 8 {lb['images_per_s']:.2f} images/s {lb['slices']} = "
          f"{cl['answers_per_s'] / lb['images_per_s']:.0%}; errors {cl['errors']} of {cl['answers'] + cl['errors']}; "
          f"service MB before and after each slice {cl['rss_mb']}")
    meta = {"busy": args.busy, "threads": os.environ.get("PATCHCORE_THREADS"), "loadavg": os.getloadavg(),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    print(json.dumps(meta))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, **meta}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
