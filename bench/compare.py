"""Backbones compared on evidence: the same photos embedded by each model, side by side.

For each model: the pipeline's embed throughput (`fruitpipe run`, same cores), raw onnxruntime's on the same
photos (one process, all cores, batch 32: the ceiling), explained variance at k = 20 and 50, and `fruitpipe
train`'s Test top-1 on full embeddings and on PCA-20 (logistic regression, regParam by cross-validation on
Training).

    FRUITPIPE_MODELS=../shared/models .venv/bin/python bench/compare.py ../shared/data/fruits360-sample \\
        /tmp/compare --models mobilenet_v2,efficientnet_lite0
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import fruitpipe
from fruitpipe import images
from fruitpipe.classify import TrainSettings, train
from fruitpipe.models import get_spec, resolve_model
from fruitpipe.spark import spark_session
from fruitpipe.storage import StorageOptions


def raw_onnxruntime(model: str, files: list[Path], threads: int) -> float:
    """img/s of decode + preprocess + onnxruntime on `files`, one process, `threads` intra-op threads."""
    import onnxruntime as ort

    spec = get_spec(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(resolve_model(spec, None, StorageOptions()).path, opts,
                                   providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    for i in range(0, len(files), 32):
        batch = np.stack([images.model_input(f.read_bytes(), spec.input_size, 64_000_000) for f in files[i:i + 32]])
        session.run([spec.output_name], {spec.input_name: batch})
    return len(files) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("out_dir")
    parser.add_argument("--models", default="mobilenet_v2,efficientnet_lite0")
    parser.add_argument("--master", default="local[*]")
    parser.add_argument("--raw-images", type=int, default=1024, help="photos for the raw onnxruntime ceiling")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()
    files = sorted(Path(args.input).rglob("*.jpg"))[: args.raw_images]
    rows = []
    with spark_session(args.master, "fruitpipe-compare") as spark:
        cores = spark.sparkContext.defaultParallelism
        # Speeds first, one model after the other with nothing else running; then the (long) classifier fits.
        for model in args.models.split(","):
            out = str(Path(args.out_dir) / model)
            t0 = time.perf_counter()
            result = fruitpipe.run(fruitpipe.Config(input=args.input, output=out, model=model, k=20, quiet=True),
                                   spark=spark)
            variance = json.loads((Path(out) / "pca" / "explained_variance.json").read_text())
            rows.append({
                "model": model, "out": out,
                "embed_img_s": (result.report.get("throughput_img_s") or {}).get("embed"),
                "raw_onnxruntime_img_s": round(raw_onnxruntime(model, files, cores), 1),
                "explained_k20": variance["cumulative"][19], "explained_k50": variance["cumulative"][49],
                "run_s": round(time.perf_counter() - t0, 1),
            })
            print(json.dumps(rows[-1]), flush=True)
        for row in rows:
            t1 = time.perf_counter()
            metrics = train(TrainSettings(output=row["out"], folds=args.folds, master=args.master), spark=spark)
            row.update(top1_full=metrics["top1"], train_s=round(time.perf_counter() - t1, 1),
                       top1_pca20=next(r["top1"] for r in metrics["pca_table"] if r["features"] == "PCA-20"))
            print(json.dumps(row), flush=True)
    print(f"\n{'model':<20} {'embed img/s':>11} {'raw img/s':>9} {'ratio':>6} {'var@20':>7} {'var@50':>7} "
          f"{'top-1':>7} {'top-1 PCA-20':>12}")
    for r in rows:
        ratio = r["embed_img_s"] / r["raw_onnxruntime_img_s"] if r["embed_img_s"] else float("nan")
        print(f"{r['model']:<20} {r['embed_img_s'] or 0:>11.1f} {r['raw_onnxruntime_img_s']:>9.1f} {ratio:>6.2f} "
              f"{r['explained_k20']:>7.1%} {r['explained_k50']:>7.1%} {r['top1_full']:>7.2%} {r['top1_pca20']:>12.2%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": cores, "cpu": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
