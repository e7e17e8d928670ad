"""S3 listing benchmark: time to list N objects (default 5,000) flat vs fanned out, on a moto S3 server on 127.0.0.1.

The loopback server answers in about a millisecond where S3 takes tens; `--latency-ms` adds that round trip to
every request (a WSGI wrapper around moto), so the effect of parallel listing shows as it would on S3.

    python bench/s3_listing.py                    # 5,000 objects, 0 and 30 ms of added latency
    python bench/s3_listing.py --objects 20000 --latency-ms 0 50
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("FRUITPIPE_SHARED", ROOT.parent / "shared")) / "data" / "fruits360-sample"
REGION = "eu-west-3"
log = logging.getLogger("bench.s3_listing")


class _Delayed:
    """WSGI middleware: sleep before each request, like a round trip to a remote S3 endpoint."""

    def __init__(self, app, delay_s: float) -> None:
        self.app, self.delay_s = app, delay_s

    def __call__(self, environ, start_response):
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.app(environ, start_response)


def start_server(delay_s: float) -> tuple[str, object]:
    """moto's S3 app behind the delay, threaded, on a free loopback port."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, _Delayed(DomainDispatcherApplication(create_backend_app), delay_s),
                         threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def upload(endpoint: str, n: int) -> None:
    """n objects laid out as Training|Test/<Class>/<file>, cycling through the sample's real photos."""
    import boto3

    files = sorted(SAMPLE.rglob("*.jpg"))
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    s3.create_bucket(Bucket="listing", CreateBucketConfiguration={"LocationConstraint": REGION})

    def put(i: int) -> None:
        f = files[i % len(files)]
        rel = f.relative_to(SAMPLE).as_posix()
        s3.put_object(Bucket="listing", Key=f"fruits/{rel[:-4]}-{i}.jpg", Body=f.read_bytes())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(n)))


def time_listing(endpoint: str, threads: int, repeats: int) -> tuple[float, int]:
    """Median seconds of list_images over `repeats` runs, and the count listed."""
    from fruitpipe import storage
    from fruitpipe.pipeline.listing import list_images
    from fruitpipe.storage import StorageOptions

    opts = StorageOptions(endpoint, REGION)
    times, count = [], 0
    for _ in range(repeats):
        storage._FS_CACHE.clear()
        t = time.perf_counter()
        count = list_images("s3://listing/fruits", opts, threads).count
        times.append(time.perf_counter() - t)
    return statistics.median(times), count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=5000)
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 30.0])
    ap.add_argument("--threads", type=int, default=16, help="parallel listing threads to compare with 1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "bench" / ".work" / "s3_listing.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    rows = []
    for latency in args.latency_ms:
        endpoint, server = start_server(latency / 1000)
        upload(endpoint, args.objects)
        flat, n1 = time_listing(endpoint, 1, args.repeats)
        fanned, n2 = time_listing(endpoint, args.threads, args.repeats)
        assert n1 == n2 == args.objects, (n1, n2)
        rows.append({"objects": args.objects, "added_latency_ms": latency, "flat_s": round(flat, 3),
                     f"fanned_out_{args.threads}_threads_s": round(fanned, 3), "speedup": round(flat / fanned, 2),
                     "objects_per_s_fanned": round(args.objects / fanned)})
        server.shutdown()
        from moto.core import DEFAULT_ACCOUNT_ID  # noqa: F401  (moto keeps state per process: reset between runs)
        from moto.s3.models import s3_backends

        s3_backends[DEFAULT_ACCOUNT_ID]["global"].reset()
    header = list(rows[0])
    sys.stdout.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
    for r in rows:
        sys.stdout.write("| " + " | ".join(str(r[h]) for h in header) + " |\n")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
