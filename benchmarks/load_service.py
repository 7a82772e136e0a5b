"""Load on `patchcore serve`: throughput, latency, errors and the server's memory, on loopback only.

    python benchmarks/load_service.py                          # fits the default bottle model first (~3 min)
    python benchmarks/load_service.py --model bottle.safetensors --seconds 60 --json out.json

Starts `patchcore serve` as a subprocess on 127.0.0.1 and runs, one after the other, bounded phases of
closed-loop clients (each sends the next image when the last answer came back) that POST bottle test images
(good and defective, 256 x 256 PNG) as raw bodies to /v1/models/bottle:predict:

  1. below saturation: --clients (8) clients for --seconds (60) against a server whose scorers + queue hold
     them all (scorers + queue = clients): every request must succeed;
  2. above saturation: 2 x --clients clients for --seconds / 2 against the same server: the excess must be
     refused with 503 (and Retry-After) and nothing else; clients told 503 wait the Retry-After seconds.

A first short phase with one client gives the latency of a request that waits for nobody.

Reports per phase requests/s (answered 200), p50/p90/p99 latency of those, counts by status, and the server
process's resident memory (VmRSS) after warm-up, after each phase and its peak sampled every second, plus
the 1-minute load average (other work on the machine slows everything here). Nothing leaves 127.0.0.1; every
loop stops at its deadline.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from _data import add_data_argument, mvtec

HOST = "127.0.0.1"  # loopback only


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, dict]:
    conn.request("POST", "/v1/models/bottle:predict", body=body, headers={"Content-Type": "image/png"})
    r = conn.getresponse()
    data = r.read()
    return r.status, (json.loads(data) if r.status == 200 else {"retry_after": r.getheader("Retry-After")})


def phase(port: int, images: list[bytes], clients: int, seconds: float, pid: int) -> dict:
    """``clients`` closed-loop clients for ``seconds``; latencies of answered requests and statuses."""
    deadline = time.monotonic() + seconds
    lat: list[float] = []
    statuses: Counter = Counter()
    retry_after: set = set()
    lock = threading.Lock()
    peak = [rss_mb(pid)]

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        i = k
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                status, body = post(conn, images[i % len(images)])
            except (OSError, http.client.HTTPException):
                # The server closes idle keep-alive connections (uvicorn: after 5 s); like any HTTP client,
                # send once more on a new connection before counting an error.
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=120)
                try:
                    status, body = post(conn, images[i % len(images)])
                except (OSError, http.client.HTTPException):
                    status, body = -1, {}
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, port, timeout=120)
            dt = time.perf_counter() - t0
            with lock:
                statuses[status] += 1
                if status == 200:
                    lat.append(dt)
                elif status == 503:
                    retry_after.add(body.get("retry_after"))
            if status == 503:  # as a well-behaved client does: wait as long as the server asks
                time.sleep(max(0.0, min(float(body.get("retry_after") or 1), deadline - time.monotonic())))
            i += clients
        conn.close()

    def sample() -> None:
        while time.monotonic() < deadline:
            peak.append(rss_mb(pid))
            time.sleep(1.0)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)] + [threading.Thread(target=sample)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.array(lat) * 1000
    return {"clients": clients, "seconds": wall, "ok": len(lat), "requests_per_s": len(lat) / wall,
            "p50_ms": float(np.percentile(a, 50)) if len(a) else None,
            "p90_ms": float(np.percentile(a, 90)) if len(a) else None,
            "p99_ms": float(np.percentile(a, 99)) if len(a) else None,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "retry_after": sorted(str(r) for r in retry_after), "rss_end_mb": rss_mb(pid),
            "rss_peak_mb": max(peak + [rss_mb(pid)]), "loadavg_1min_end": os.getloadavg()[0]}


def fit_default(folder: Path, train: list[Path]) -> Path:
    from patchcore import PatchCore

    t0 = time.perf_counter()
    model = PatchCore(device="cpu").fit(train)
    print(f"fitted the default bottle model in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return model.save(folder / "bottle.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model file to serve as 'bottle' (default: fit the default one)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--concurrency", type=int, default=1, help="the server's --concurrency")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    add_data_argument(ap)
    args = ap.parse_args()
    from patchcore.datasets import read_mvtec

    if not (mvtec(args.data) / "bottle" / "test").is_dir():
        sys.exit(f"error: MVTec AD bottle not found under {mvtec(args.data)} (set PATCHCORE_DATA or --data)")
    bottle = read_mvtec(mvtec(args.data) / "bottle")
    images = [s.path.read_bytes() for s in bottle.test]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.model:
            (folder / "bottle.safetensors").symlink_to(args.model.resolve())
        else:
            fit_default(folder, bottle.train)
        port = free_port()
        # The queue holds every client of phase 1 beside the scorers, so phase 1 is below saturation.
        queue = max(0, args.clients - args.concurrency)
        server = subprocess.Popen([sys.executable, "-m", "patchcore", "serve", str(folder), "--host", HOST,
                                   "--port", str(port), "--concurrency", str(args.concurrency), "--queue", str(queue),
                                   "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None:
                    sys.exit(f"error: the server stopped: {server.stderr.read().decode()[-2000:]}")
                try:
                    conn = http.client.HTTPConnection(HOST, port, timeout=5)
                    conn.request("GET", "/readyz")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    sys.exit("error: the server was not ready within 180 s")
                time.sleep(0.5)
            conn = http.client.HTTPConnection(HOST, port, timeout=120)
            for img in images[:10]:  # warm-up: first allocations, caches
                assert post(conn, img)[0] == 200
            conn.close()
            result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores, "
                      f"{platform.machine()}", "python": platform.python_version(),
                      "concurrency": args.concurrency, "queue": queue, "images": len(images),
                      "rss_start_mb": rss_mb(server.pid), "loadavg_1min_start": os.getloadavg()[0]}
            result["one_client"] = phase(port, images, 1, args.seconds / 4, server.pid)
            result["below_saturation"] = phase(port, images, args.clients, args.seconds, server.pid)
            result["above_saturation"] = phase(port, images, 2 * args.clients, args.seconds / 2, server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)

    below, above = result["below_saturation"], result["above_saturation"]
    below["errors_ok"] = set(below["statuses"]) == {"200"} == set(result["one_client"]["statuses"])
    above["errors_ok"] = set(above["statuses"]) <= {"200", "503"}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"patchcore serve, concurrency {args.concurrency}, queue {queue}; RSS after warm-up "
                    f"{result['rss_start_mb']:.0f} MB, load average {result['loadavg_1min_start']:.2f} at start")
    for col in ("phase", "clients", "req/s", "p50 ms", "p90 ms", "p99 ms", "statuses", "RSS end / peak MB",
                "load avg"):
        t.add_column(col, justify="left" if col in ("phase", "statuses") else "right")
    for name, r in (("one client", result["one_client"]), ("below saturation", below),
                    ("above saturation", above)):
        t.add_row(name, str(r["clients"]), f"{r['requests_per_s']:.2f}", f"{r['p50_ms']:.0f}", f"{r['p90_ms']:.0f}",
                  f"{r['p99_ms']:.0f}", ", ".join(f"{k}: {v}" for k, v in r["statuses"].items()),
                  f"{r['rss_end_mb']:.0f} / {r['rss_peak_mb']:.0f}", f"{r['loadavg_1min_end']:.2f}")
    Console(stderr=True, width=150).print(t)
    if not (below["errors_ok"] and above["errors_ok"]):
        sys.exit("error: unexpected statuses (below saturation only 200, above it only 200 and 503)")


if __name__ == "__main__":
    main()
