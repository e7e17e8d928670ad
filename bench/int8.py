"""--precision int8 against fp32 on the shared sample: model speed, feature similarity, linear-classifier accuracy,
and the whole pipeline's embed throughput.

    python bench/int8.py              # everything (about 4 minutes on 2 vCPUs)
    python bench/int8.py --no-pipeline

The classifier is a ridge-regression (one-hot targets, standardised features) fitted on the sample's Training
split and scored on its Test split: a deterministic linear probe of what the embeddings keep.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FRUITPIPE_SHARED", ROOT.parent / "shared"))
SAMPLE = SHARED / "data" / "fruits360-sample"
FP32 = SHARED / "models" / "mobilenet_v2_features.onnx"


def load(split: str) -> tuple[np.ndarray, list[str], list[str]]:
    from fruitpipe.images import model_input

    files = sorted((SAMPLE / split).glob("*/*.jpg"))
    return (np.stack([model_input(f.read_bytes(), 224, 64_000_000) for f in files]), [f.parent.name for f in files],
            [str(f) for f in files])


def session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def features(sess: ort.InferenceSession, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([sess.run(["features"], {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def img_s(path: str, x: np.ndarray, threads: int) -> float:
    sess = session(path, threads)
    features(sess, x[:64])  # warm-up
    t = time.perf_counter()
    features(sess, x)
    return len(x) / (time.perf_counter() - t)


def ridge_accuracy(f_train: np.ndarray, y_train: list[str], f_test: np.ndarray, y_test: list[str],
                   lam: float = 10.0) -> float:
    classes = sorted(set(y_train))
    index = {c: i for i, c in enumerate(classes)}
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a = np.hstack([(f_train - mu) / sd, np.ones((len(f_train), 1))])
    b = np.hstack([(f_test - mu) / sd, np.ones((len(f_test), 1))])
    y = np.eye(len(classes))[[index[c] for c in y_train]]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y)
    return float(np.mean(np.argmax(b @ w, 1) == np.array([index[c] for c in y_test])))


def pipeline(precision: str, workdir: Path) -> dict:
    out = workdir / f"out-{precision}"
    env = {**os.environ, "FRUITPIPE_MODELS": str(FP32.parent)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fruitpipe.cli", "run", str(SAMPLE), str(out), "--precision", precision,
                    "--quiet"], env=env, check=True)
    wall = time.perf_counter() - t
    report = json.loads((out / "run.json").read_text())
    return {"wall_s": round(wall, 1), "embed_img_s": report["throughput_img_s"]["embed"],
            "timings_s": report["timings_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-pipeline", action="store_true", help="skip the two end-to-end runs")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / ".work" / "int8.json")
    args = ap.parse_args()
    from fruitpipe.models.quantize import CALIBRATION_IMAGES, calibration_uris, quantize_int8

    x_train, y_train, train_files = load("Training")
    x_test, y_test, _ = load("Test")
    picked = set(calibration_uris(pa.table({"uri": train_files, "split": ["Training"] * len(train_files)}),
                                  CALIBRATION_IMAGES))
    calib = x_train[[i for i, f in enumerate(train_files) if f in picked]]
    result: dict = {"images": {"train": len(x_train), "test": len(x_test), "calibration": len(calib)}}
    with tempfile.TemporaryDirectory() as tmp:
        int8 = os.path.join(tmp, "int8.onnx")
        t = time.perf_counter()
        quantize_int8(str(FP32), calib, "input", int8)
        result["quantize_s"] = round(time.perf_counter() - t, 1)
        feats = {}
        for name, path in (("fp32", str(FP32)), ("int8", int8)):
            result[name] = {f"model_img_s_{n}_threads": round(img_s(path, x_test, n), 1) for n in (1, 2)}
            sess = session(path, 2)
            feats[name] = (features(sess, x_train), features(sess, x_test))
            result[name]["ridge_test_accuracy"] = round(ridge_accuracy(feats[name][0], y_train, feats[name][1],
                                                                       y_test), 4)
        a, b = feats["fp32"][1], feats["int8"][1]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        result["cosine_int8_vs_fp32"] = {"mean": round(float(cos.mean()), 4), "median": round(float(np.median(cos)), 4),
                                         "min": round(float(cos.min()), 4)}
        result["model_speedup_2_threads"] = round(result["int8"]["model_img_s_2_threads"]
                                                  / result["fp32"]["model_img_s_2_threads"], 2)
        if not args.no_pipeline:
            work = Path(tmp)
            result["pipeline"] = {p: pipeline(p, work) for p in ("fp32", "int8")}
            result["pipeline"]["embed_speedup"] = round(result["pipeline"]["int8"]["embed_img_s"]
                                                        / result["pipeline"]["fp32"]["embed_img_s"], 2)
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
