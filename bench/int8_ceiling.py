"""--precision int8 against its own ceiling: the pipeline's embed stage vs a raw onnxruntime loop running the same
int8 model (the one the run quantized, from OUT/model/) on the same JPEGs, in one run on the same cores.

    FRUITPIPE_MODELS=../shared/models .venv/bin/python bench/int8_ceiling.py [--images N] [--input DIR] [--json FILE]

`--input` takes a folder in the dataset's layout, e.g. the 52,800 images `bench/run.py --images 52800` writes to
bench/.work/images-52800, where the run's fixed seconds (plan, duplicate check, commit) weigh less.

The raw loop reads each JPEG, decodes and resizes it as the pipeline does (`fruitpipe.images.model_pixels`), and
runs the uint8-wrapped int8 model (the graph the tasks run) in one process with all cores as onnxruntime threads,
batch 32; it also times its parts (read, decode + resize, sha256, inference) so the gap can be attributed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("FRUITPIPE_SHARED", ROOT.parent / "shared")) / "data" / "fruits360-sample"


def raw_loop(model_path: Path, files: list[Path], threads: int, batch: int = 32) -> dict[str, float]:
    import onnxruntime as ort

    from fruitpipe import images
    from fruitpipe.models import get_spec
    from fruitpipe.models.wrap import UINT8_INPUT, wrap_uint8

    wrapped = wrap_uint8(model_path.read_bytes(), get_spec("mobilenet_v2"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(wrapped.data, opts, providers=["CPUExecutionProvider"])
    session.run(["features"], {UINT8_INPUT: np.zeros((batch, 224, 224, 3), np.uint8)})  # warm
    parts = {"read": 0.0, "hash": 0.0, "decode_resize": 0.0, "inference": 0.0}
    t0 = time.perf_counter()
    for i in range(0, len(files), batch):
        t = time.perf_counter()
        blobs = [f.read_bytes() for f in files[i:i + batch]]
        parts["read"] += time.perf_counter() - t
        t = time.perf_counter()
        for b in blobs:
            hashlib.sha256(b).hexdigest()
        parts["hash"] += time.perf_counter() - t
        t = time.perf_counter()
        x = np.stack([images.model_pixels(b, 224, 64_000_000) for b in blobs])
        parts["decode_resize"] += time.perf_counter() - t
        t = time.perf_counter()
        session.run(["features"], {UINT8_INPUT: x})
        parts["inference"] += time.perf_counter() - t
    total = time.perf_counter() - t0
    return {"img_s": len(files) / total, "seconds": total, **{f"{k}_s": v for k, v in parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=0, help="use the first N photos of the sample (default all)")
    parser.add_argument("--input", type=Path, default=SAMPLE, help="the JPEGs (default: the shared sample)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        data = args.input
        out = Path(tmp) / "out"
        proc = subprocess.run([sys.executable, "-m", "fruitpipe.cli", "embed", str(data), str(out), "--precision",
                               "int8", "-q"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        report = json.loads((out / "run.json").read_text())
        int8_model = next((out / "model").glob("*.int8.onnx"))
        files = sorted(data.glob("*/*/*.jpg"))  # the layout Training|Test/<class>/<photo>.jpg
        files = files[: args.images] if args.images else files
        raw = raw_loop(int8_model, files, cores)
    embed = report["throughput_img_s"]["embed"]
    timings = report["timings_s"]
    n = report["counts"]["embedded_this_run"] + report["counts"]["rejected_this_run"]
    job_img_s = n / timings["embed_job"]  # the job alone, without the plan, the duplicate check and the commit
    result = {"images": report["counts"]["embedded_this_run"], "cores": cores,
              "scheme": report["model"].get("int8", {}).get("scheme"),
              "pipeline_embed_img_s": embed,
              "pipeline_embed_job_img_s": round(job_img_s, 1),
              "pipeline_timings_s": timings,
              "raw_int8": raw, "ratio": embed / raw["img_s"], "job_ratio": job_img_s / raw["img_s"]}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
