"""Benchmark: the driver's memory as the number of inputs grows, with --input-list.

    python bench/driver_scale.py [--sizes 20000,2000000] [--real 120] [--partition-size 50000] [--json FILE]

For each size N, a Parquet input list of N entries: `--real` real Fruits-360 photos (copied from the shared sample)
and N - real URIs in the same class folders that do not exist. Each size runs twice in a fresh process (a new driver
and a new local[2] JVM), on a fresh OUTPUT: `fruitpipe embed --input-list ... --dry-run` (list, compare, plan,
accounting of what is committed) and then the real `fruitpipe embed --input-list ...`, which embeds the real photos,
records every missing one as `unreadable`, deduplicates, commits and accounts for all N. Printed per run: wall time,
counts, the Python driver's peak RSS (VmHWM of that process: ru_maxrss would carry this script's own peak over the
exec) and the JVM's (VmHWM; in local mode the JVM also
hosts the executors, so its memory follows the work, not the driver's bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FRUITPIPE_SHARED", ROOT.parent / "shared"))
SAMPLE = SHARED / "data" / "fruits360-sample"
os.environ.setdefault("FRUITPIPE_MODELS", str(SHARED / "models"))  # the shared weights, no download

CHILD = r"""
import json, sys, time
from fruitpipe import Config
from fruitpipe.monitor.resources import driver_peak_rss
from fruitpipe.pipeline.run import run
from fruitpipe.spark import spark_session

listing, out, partition_size, dry = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "dry"
config = Config(input=listing, input_list=True, output=out, master="local[2]", quiet=True,
                partition_size=partition_size)
t0 = time.perf_counter()
with spark_session("local[2]", "driver-scale", conf={"spark.ui.enabled": "false"}) as spark:
    report = run(config, ("embed",), dry_run=dry).report
    jvm = spark.sparkContext._gateway.proc.pid
    hwm = [int(line.split()[1]) * 1024 for line in open(f"/proc/{jvm}/status") if line.startswith("VmHWM")][0]
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": round(wall, 1), "driver_peak_rss": driver_peak_rss(), "jvm_peak_rss": hwm, "plan": report.get("plan"), "counts": report.get("counts"),
                  "timings_s": report.get("timings_s")}))
"""


def make_list(n: int, real: list[Path], images: Path, dest: Path) -> Path:
    """A Parquet list of n URIs: the real photos, then missing files spread over the same class folders."""
    missing = n - len(real)
    folders = sorted({p.parent for p in real})
    uris = [str(p) for p in real] + [str(folders[i % len(folders)] / f"missing-{i:08d}.jpg") for i in range(missing)]
    pq.write_table(pa.table({"uri": uris}), dest, compression="zstd")
    return dest


def one(listing: Path, out: Path, partition_size: int, dry: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(listing), str(out), str(partition_size),
                           "dry" if dry else "real"], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20000,2000000")
    parser.add_argument("--real", type=int, default=120, help="real photos among the entries")
    parser.add_argument("--partition-size", type=int, default=50_000)
    parser.add_argument("--workdir", default="/tmp/fruitpipe-driver-scale")
    parser.add_argument("--modes", default="dry,real", help="dry, real or both")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    images = work / "images"
    shutil.rmtree(images, ignore_errors=True)
    files = sorted(SAMPLE.glob("Training/*/*.jpg"))[: args.real]
    real = []
    for f in files:
        target = images / f.relative_to(SAMPLE)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
        real.append(target)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        listing = make_list(n, real, images, work / f"list-{n}.parquet")
        for mode in args.modes.split(","):
            t0 = time.perf_counter()
            got = one(listing, work / f"out-{n}", args.partition_size, mode == "dry")
            got.update(entries=n, mode=mode, total_s=round(time.perf_counter() - t0, 1))
            rows.append(got)
            c = got["plan"] if mode == "dry" else got["counts"]
            print(f"{n:>9,} {mode:4}  {got['wall_s']:7.1f} s  driver peak RSS {got['driver_peak_rss'] / 2**20:7.1f} MB"
                  f"  JVM peak RSS {got['jvm_peak_rss'] / 2**20:7.1f} MB  "
                  + (f"listed {c['listed']:,}, to embed {c['to_embed']:,}" if mode == "dry" else
                     f"listed {c['listed']:,}, embedded {c['embedded']:,}, rejected {c['rejected']:,}, "
                     f"accounted {c['accounted']}"), flush=True)
    base = {r["mode"]: r["driver_peak_rss"] for r in rows if r["entries"] == min(r2["entries"] for r2 in rows)}
    for r in rows:
        r["driver_ratio_to_smallest"] = round(r["driver_peak_rss"] / base[r["mode"]], 3)
        print(f"{r['entries']:>9,} {r['mode']:4}  driver peak RSS {r['driver_ratio_to_smallest']:.3f}x the smallest")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
