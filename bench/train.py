"""Benchmark: `fruitpipe train`'s one-pass classifier against scikit-learn, and as the rows grow.

    .venv/bin/pip install -e '.[bench]'   # scikit-learn: the reference, never a dependency of the package
    FRUITPIPE_MODELS=../shared/models .venv/bin/python bench/train.py OUT [--sizes 10000,1000000] [--json FILE]

OUT: an output of `fruitpipe run` with a Test split (e.g. the shared sample's). In one run, on the same cores:

1. reference: `fruitpipe train OUT` (the default, --classifier linear) in a Spark session started beforehand (its
   start is excluded; the first job's warm-up is not) and once more in the same session (warm); then
   scikit-learn's LogisticRegression (lbfgs, the same square-rooted, L2-normalised features) with as many fits as
   today's Spark ML default made: 3 C values x 3 folds + the final fit; Test top-1 of both, and the ratio of times.
2. scale: OUT's Training rows repeated with small multiplicative noise (and new content ids, so folds and the hold-
   out spread them) up to each size N, Test rows unchanged (OUT's real ones), written as Parquet parts of 50,000
   rows; each size in a fresh process (new driver, new local[2] JVM): the one-pass fit (statistics, cross-
   validation, open-set threshold, test pass; what grows with the rows), its wall time without the Spark start
   and the Python driver's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
PART_ROWS = 50_000

CHILD = r"""
import json, sys, time
import pyarrow.parquet as pq
from fruitpipe.classify import onepass, stats
from fruitpipe.monitor.resources import driver_peak_rss
from fruitpipe.spark import spark_session
from fruitpipe.storage import StorageOptions

folder = sys.argv[1]
files = sorted(str(p) for p in __import__("pathlib").Path(folder).glob("*.parquet"))
t0 = time.perf_counter()
with spark_session("local[2]", "bench-train", conf={"spark.ui.enabled": "false"}) as spark:
    started = time.perf_counter() - t0
    t1 = time.perf_counter()
    got = onepass.fit(spark, files, StorageOptions(), folds=3, holdout=0.2, dim=1280,
                      fmap=stats.FeatureMap(onepass.DEFAULT_TRANSFORM), compare_pca=True,
                      stats_uri=folder + "/stats.npz.ignore", model_sha256="bench")
    wall = time.perf_counter() - t1
import numpy as np
print(json.dumps({"spark_start_s": round(started, 1), "fit_s": round(wall, 1), "n_train": got.n_train,
                  "n_test": int(len(got.y)), "top1": round(float(np.mean(np.argmax(got.proba, 1) == got.y)), 5),
                  "timings_s": {k: round(v, 2) for k, v in got.timings.items()},
                  "chosen": got.cross_validation["chosen"], "threshold": got.open_set.get("threshold"),
                  "driver_peak_rss": driver_peak_rss()}))
"""


def _embeddings(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "embeddings", columns=["id", "uri", "label", "split", "features"])


def reference(out: Path, folds: int = 3) -> dict:
    """fruitpipe train (cold and warm, Spark start excluded) and scikit-learn's 10 fits, same features and cores."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from fruitpipe.classify import TrainSettings, train
    from fruitpipe.classify.stats import transform
    from fruitpipe.spark import spark_session

    result: dict = {}
    with spark_session("local[2]", "bench-train", conf={"spark.ui.enabled": "false"}) as spark:
        for name in ("fruitpipe_train_s", "fruitpipe_train_warm_s"):
            (out / "classifier" / "stats.npz").unlink(missing_ok=True)  # a fresh statistics pass each time
            t0 = time.perf_counter()
            m = train(TrainSettings(output=str(out), master="local[2]"), spark=spark)
            result[name] = round(time.perf_counter() - t0, 2)
        result["fruitpipe_top1"] = m["top1"]
        result["fruitpipe_timings_s"] = m["timings_s"]
    df = _embeddings(out)
    tr, te = df[df.split == "Training"], df[df.split == "Test"]
    x, y = transform(np.stack(tr.features.to_numpy()), "sqrt_l2"), tr.label.to_numpy()
    xt, yt = transform(np.stack(te.features.to_numpy()), "sqrt_l2"), te.label.to_numpy()
    t0 = time.perf_counter()
    grid = (1.0, 10.0, 100.0)
    scores = {}
    for c in grid:
        acc = []
        for a, b in StratifiedKFold(folds, shuffle=True, random_state=7).split(x, y):
            acc.append(LogisticRegression(C=c, max_iter=1000).fit(x[a], y[a]).score(x[b], y[b]))
        scores[c] = float(np.mean(acc))
    best = max(grid, key=lambda c: scores[c])
    final = LogisticRegression(C=best, max_iter=1000).fit(x, y)
    result["sklearn_s"] = round(time.perf_counter() - t0, 2)
    result["sklearn_fits"] = len(grid) * folds + 1
    result["sklearn_top1"] = round(float(final.score(xt, yt)), 5)
    result["sklearn_chosen_C"] = best
    result["ratio_cold"] = round(result["fruitpipe_train_s"] / result["sklearn_s"], 2)
    result["ratio_warm"] = round(result["fruitpipe_train_warm_s"] / result["sklearn_s"], 2)
    return result


def synthetic(out: Path, n: int, dest: Path) -> Path:
    """OUT's Training rows repeated to n rows with 2 % multiplicative noise, OUT's Test rows as they are."""
    folder = dest / f"rows-{n}"
    if (folder / "_done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    df = _embeddings(out)
    tr, te = df[df.split == "Training"].reset_index(drop=True), df[df.split == "Test"]
    base = np.stack(tr.features.to_numpy()).astype(np.float32)
    rng = np.random.default_rng(11)
    schema = pa.schema([("id", pa.string()), ("uri", pa.string()), ("label", pa.string()), ("split", pa.string()),
                        ("features", pa.list_(pa.float32()))])
    pq.write_table(pa.Table.from_pandas(te, schema=schema, preserve_index=False), folder / "test.parquet")
    for start in range(0, n, PART_ROWS):
        idx = np.arange(start, min(start + PART_ROWS, n))
        src = idx % len(base)
        feats = base[src] * (1 + 0.02 * rng.standard_normal((len(idx), base.shape[1]), dtype=np.float32))
        np.clip(feats, 0, None, out=feats)
        ids = [hashlib.sha256(f"bench-{i}".encode()).hexdigest() for i in idx]
        table = pa.table({"id": ids, "uri": [f"synthetic://{i}" for i in idx], "label": tr.label.to_numpy()[src],
                          "split": ["Training"] * len(idx),
                          "features": pa.FixedSizeListArray.from_arrays(feats.ravel(), base.shape[1]).cast(
                              pa.list_(pa.float32()))}, schema=schema)
        pq.write_table(table, folder / f"part-{start // PART_ROWS:05d}.parquet")
    (folder / "_done").write_text("")
    return folder


def scale(out: Path, sizes: list[int], workdir: Path) -> list[dict]:
    rows = []
    for n in sizes:
        folder = synthetic(out, n, workdir)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True,
                              check=False)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        got = {"rows": n, **json.loads(proc.stdout.strip().splitlines()[-1])}
        print(json.dumps(got), flush=True)
        rows.append(got)
    small, large = rows[0], rows[-1]
    if len(rows) > 1:
        growth = (large["fit_s"] / small["fit_s"]) / (large["rows"] / small["rows"])
        print(f"time per row, largest vs smallest: {growth:.2f}x (<= 1: at most linear); driver peak RSS "
              f"{large['driver_peak_rss'] / 2**20:.0f} MiB vs {small['driver_peak_rss'] / 2**20:.0f} MiB: "
              f"{large['driver_peak_rss'] / small['driver_peak_rss']:.2f}x (goal <= 1.2x)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fruitpipe-bench-train"))
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    report: dict = {"cpu": os.cpu_count()}
    if not args.skip_reference:
        report["reference"] = reference(args.out)
        r = report["reference"]
        print(f"fruitpipe train {r['fruitpipe_train_s']} s (warm {r['fruitpipe_train_warm_s']} s), top-1 "
              f"{r['fruitpipe_top1']}; scikit-learn {r['sklearn_fits']} fits {r['sklearn_s']} s, top-1 "
              f"{r['sklearn_top1']}; ratio {r['ratio_cold']}x (warm {r['ratio_warm']}x; goal <= 2x)", flush=True)
    report["scale"] = scale(args.out, [int(s) for s in args.sizes.split(",")], args.workdir)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
