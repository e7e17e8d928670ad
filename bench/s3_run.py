"""End to end from S3: `fruitpipe run` on the same photos from a local folder and from an S3 API on 127.0.0.1.

The EMR cost estimate multiplies a per-vCPU throughput; this measures it with the images read from S3 (one GET
each) and the outputs written there, as on EMR, next to the local-file figure. The loopback server answers in about
a millisecond where S3 takes 20-50 ms for a small GET; `--latency-ms` adds that round trip to every request
(bench/s3_listing.py's WSGI wrapper), which the per-task read-ahead (8 GETs in flight) is meant to hide.

    python bench/s3_run.py                      # the 5,280 sample photos, 0 and 30 ms of added latency
    python bench/s3_run.py --latency-ms 0 50 --json bench/results/s3-run.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3_listing import REGION, SAMPLE, start_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def upload_sample(endpoint: str, bucket: str) -> int:
    """The sample, in its own layout, under s3://bucket/fruits360/."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    files = sorted(SAMPLE.rglob("*.jpg"))
    if bucket in {b["Name"] for b in s3.list_buckets()["Buckets"]}:  # moto's state outlives one server
        return len(files)
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda f: s3.put_object(Bucket=bucket, Key=f"fruits360/{f.relative_to(SAMPLE).as_posix()}",
                                              Body=f.read_bytes()), files))
    return len(files)


def run(inp: str, out: str, extra: list[str]) -> dict[str, object]:
    """`fruitpipe run` in its own process; wall time (JVM start included) and its run.json."""
    cmd = [sys.executable, "-m", "fruitpipe.cli", "run", inp, out, "--quiet", *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"fruitpipe failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"wall_s": round(wall, 2)}


def read_report(uri: str, endpoint: str | None) -> dict:
    if not uri.startswith("s3://"):
        return json.loads((Path(uri) / "run.json").read_text())
    import boto3

    bucket, key = uri[5:].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    return json.loads(s3.get_object(Bucket=bucket, Key=f"{key}/run.json")["Body"].read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 30.0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / ".work" / "s3-run")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.setdefault("FRUITPIPE_MODELS", str(SAMPLE.parents[1] / "models"))  # the shared weights, offline
    cores = os.cpu_count() or 1
    rows = []
    local_out = args.workdir / "local"
    subprocess.run(["rm", "-rf", str(local_out)], check=True)
    res = run(str(SAMPLE), str(local_out), [])
    report = read_report(str(local_out), None)
    rows.append({"source": "local files", "latency_ms": 0, **res, "images": report["counts"]["embedded"],
                 "timings_s": report["timings_s"]})
    for latency in args.latency_ms:
        endpoint, server = start_server(latency / 1000)
        try:
            n = upload_sample(endpoint, "bench-in")
            import boto3

            s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
            if "bench-out" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
                s3.create_bucket(Bucket="bench-out", CreateBucketConfiguration={"LocationConstraint": REGION})
            out = f"s3://bench-out/runs/latency-{latency:g}ms"
            res = run("s3://bench-in/fruits360", out, ["--s3-endpoint", endpoint])
            report = read_report(out, endpoint)
            assert report["counts"]["embedded"] == n, report["counts"]
            rows.append({"source": "loopback S3", "latency_ms": latency, **res, "images": n,
                         "timings_s": report["timings_s"]})
        finally:
            server.shutdown()
    print(f"{'source':<14} {'+ms/req':>7} {'wall s':>7} {'img/s wall':>10} {'img/s/vCPU':>10}  stages (s)")
    for r in rows:
        ips = r["images"] / r["wall_s"]
        r["img_s_wall"] = round(ips, 1)
        r["img_s_per_vcpu_wall"] = round(ips / cores, 1)
        stages = " ".join(f"{k}={v:.1f}" for k, v in r["timings_s"].items())
        print(f"{r['source']:<14} {r['latency_ms']:>7.0f} {r['wall_s']:>7.1f} {ips:>10.1f} {ips / cores:>10.1f}  "
              f"{stages}")
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
