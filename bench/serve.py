"""`fruitpipe serve` under load: p50/p95 latency and requests/s on the shared sample's Test photos, against raw
onnxruntime answering one photo at a time (same decode, same ONNX file, same cores, no HTTP).

    python bench/serve.py OUT                 # OUT: an output with a classifier (`fruitpipe train OUT`)
    python bench/serve.py OUT --concurrency 1 2 4 8 --requests 600 --json bench/results/serve.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("FRUITPIPE_SHARED", ROOT.parent / "shared")) / "data" / "fruits360-sample"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, data: bytes) -> float:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.jpg\"\r\n\r\n").encode() \
        + data + f"\r\n--{boundary}--\r\n".encode()
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    if resp.status != 200:
        raise SystemExit(f"server answered {resp.status}")
    return time.perf_counter() - t0


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


def raw(out: Path, photos: list[bytes]) -> dict[str, float]:
    """The same ONNX file and decode, one photo at a time, no HTTP."""
    from fruitpipe import images
    from fruitpipe.classify.export import FruitClassifier

    clf = FruitClassifier((out / "classifier" / "fruit_classifier.onnx").read_bytes())
    for p in photos[:20]:
        clf.probabilities(images.model_input(p, 224, 64_000_000)[None])
    lat = []
    t0 = time.perf_counter()
    for p in photos:
        t = time.perf_counter()
        clf.probabilities(images.model_input(p, 224, 64_000_000)[None])
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"per_s": len(photos) / wall, "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="an OUTPUT with classifier/fruit_classifier.onnx")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=600, help="requests per concurrency level")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    photos = [p.read_bytes() for p in sorted((SAMPLE / "Test").rglob("*.jpg"))]
    cores = os.cpu_count() or 1
    results: dict[str, object] = {"cores": cores, "photos": len(photos)}
    results["raw_onnxruntime"] = base = raw(args.out, photos[: args.requests])
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fruitpipe.cli", "serve", str(args.out), "--port", str(port),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ''
                    raise SystemExit(f"server did not start: {err}") from None
                time.sleep(0.2)
        for p in photos[:20]:
            _post(port, p)
        rows = []
        for c in args.concurrency:
            batch = [photos[i % len(photos)] for i in range(args.requests)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                lat = list(pool.map(lambda d: _post(port, d), batch))
            wall = time.perf_counter() - t0
            rows.append({"concurrency": c, "per_s": len(batch) / wall, "p50_ms": _pct(lat, 50),
                         "p95_ms": _pct(lat, 95)})
        results["server"] = rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"raw onnxruntime, one photo at a time: {base['per_s']:.1f} photos/s, p50 {base['p50_ms']:.1f} ms, "
          f"p95 {base['p95_ms']:.1f} ms ({cores} cores)")
    print(f"{'concurrency':>11} {'req/s':>8} {'ratio':>6} {'p50 ms':>8} {'p95 ms':>8}")
    for r in results["server"]:  # type: ignore[union-attr]
        print(f"{r['concurrency']:>11} {r['per_s']:>8.1f} {r['per_s'] / base['per_s']:>6.2f} {r['p50_ms']:>8.1f} "
              f"{r['p95_ms']:>8.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
