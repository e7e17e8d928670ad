"""GPU benchmark: onnxruntime's CUDA provider through fruitpipe's own embed code, against the CPU on the same machine.

    python bench/gpu.py --require-gpu --json results.json

Spark is not needed: the per-task work (`fruitpipe.pipeline.embed.embed_rows`: read, decode, resize, batch,
`runner.make_predict_fn`) is run in P processes, each with its own onnxruntime session, which is what `local[P]`
with `--device cuda` does on one GPU node. Every figure comes from the same images on the same machine:

1. CPU ceiling: raw onnxruntime, one process, all cores (bench/run.py's `ceiling`);
2. CPU pipeline-shaped: P = all cores processes x 1 thread, `embed_rows` on the CPU provider;
3. GPU model only: pre-decoded batches, per batch size (what the GPU could do if decoding were free);
4. agreement: the CUDA features against the CPU features of the same images;
5. GPU pipeline-shaped: `embed_rows` with the CUDA provider in P processes, inference inline or overlapped with
   decoding (the task's default on a GPU);
6. where the time goes: decoding alone and inference alone, in the same process layouts.

Results of a run on an H200: bench/results/gpu-h200-2026-11-25.json and docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench_run  # noqa: E402  (bench/run.py: prepare_images, ceiling, the shared model path)

MODEL = bench_run.MODEL


def _settings(device: str, batch_size: int) -> object:
    import hashlib

    from fruitpipe.pipeline.embed import EmbedSettings
    from fruitpipe.storage import StorageOptions

    return EmbedSettings(
        model_sha256=hashlib.sha256(MODEL.read_bytes()).hexdigest(), input_size=224, input_name="input",
        output_name="features", dim=1280, batch_size=batch_size, max_pixels=64_000_000, staging_uri="",
        storage=StorageOptions(), device=device,
    )


def _worker(paths: list[str], device: str, batch_size: int, overlap: bool, mode: str, barrier: object,
            queue: object) -> None:
    """One 'task': build the session and warm it up, wait for the others, then process its share: `embed`
    (embed_rows, the real task), `decode` (read + decode + resize only) or `model` (inference on a pre-decoded
    batch only, as many images)."""
    import pyarrow as pa

    from fruitpipe.images import model_input
    from fruitpipe.models import runner
    from fruitpipe.pipeline.embed import embed_rows, prepared

    settings = _settings(device, batch_size)
    model_bytes = MODEL.read_bytes()
    predict = runner.make_predict_fn(settings.model_sha256, lambda: model_bytes, 1, device=device)
    predict(np.zeros((batch_size, 224, 224, 3), np.float32))  # session built and warm, as on a reused worker
    session = runner.get_session(settings.model_sha256, 1, lambda: model_bytes, device)
    rows = pa.table({"uri": paths, "label": ["x"] * len(paths), "split": ["Training"] * len(paths)})
    batch = np.stack([model_input(Path(u).read_bytes(), 224, 64_000_000) for u in paths[:batch_size]])
    barrier.wait()  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    if mode == "embed":
        emb, rej = embed_rows(rows, predict, settings, overlap)
        done, rejected = emb.num_rows, rej.num_rows
    elif mode == "decode":
        done = rejected = 0
        for _, x in prepared(paths, settings):  # counted, not kept: holding 5,280 inputs would cost 3 GB
            done += isinstance(x, np.ndarray)
            rejected += not isinstance(x, np.ndarray)
    else:
        for _ in range(0, len(paths), batch_size):
            predict(batch)
        done, rejected = len(paths), 0
    queue.put({"embedded": done, "rejected": rejected, "seconds": time.perf_counter() - t0,  # type: ignore[attr-defined]
               "provider": session.get_providers()[0]})  # type: ignore[attr-defined]


def pipeline_shaped(paths: list[Path], procs: int, device: str, batch_size: int, overlap: bool = False,
                    mode: str = "embed") -> dict[str, object]:
    """img/s of `procs` processes, each processing an equal share of `paths` (see _worker's modes) with its own
    session, inference inline or `overlap`ped with decoding."""
    ctx = mp.get_context("spawn")  # never fork a process that may hold a CUDA context
    barrier, queue = ctx.Barrier(procs + 1), ctx.Queue()
    shares = [[str(p) for p in paths[i::procs]] for i in range(procs)]
    workers = [ctx.Process(target=_worker, args=(s, device, batch_size, overlap, mode, barrier, queue)) for s in shares]
    for w in workers:
        w.start()
    barrier.wait(timeout=300)
    t0 = time.perf_counter()
    results = [queue.get(timeout=600) for _ in workers]
    wall = time.perf_counter() - t0
    for w in workers:
        w.join()
    embedded = sum(int(r["embedded"]) for r in results)
    assert embedded + sum(int(r["rejected"]) for r in results) == len(paths)
    assert mode == "model" or sum(int(r["rejected"]) for r in results) == 0
    providers = sorted({str(r["provider"]) for r in results})
    return {"mode": mode, "procs": procs, "overlap": overlap, "device": device, "batch_size": batch_size,
            "images": embedded, "wall_s": wall,
            "img_s": embedded / wall, "providers": providers}


def model_only(session: object, batch: np.ndarray, seconds: float = 3.0) -> float:
    """img/s of session.run on one pre-decoded batch, repeated for about `seconds` after a warm-up."""
    session.run(["features"], {"input": batch})  # type: ignore[attr-defined]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(["features"], {"input": batch})  # type: ignore[attr-defined]
        n += len(batch)
    return n / (time.perf_counter() - t0)


def gpu_name() -> str:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "unknown"
    out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5280, help="number of images (default: the 5,280 of the sample)")
    parser.add_argument("--batch-sizes", default="32,64,128,256,512", help="GPU model-only sweep")
    parser.add_argument("--procs", default="", help="GPU process counts, e.g. 1,4,16 (default: 1, 4 and the cores)")
    parser.add_argument("--embed-batch", type=int, default=0, help="embed_rows batch on the GPU (default: best of "
                        "the sweep up to 256)")
    parser.add_argument("--require-gpu", action="store_true", help="exit 1 if onnxruntime has no CUDA provider")
    parser.add_argument("--workdir", type=Path, default=bench_run.ROOT / "bench" / ".work")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import onnxruntime as ort

    from fruitpipe.images import model_input
    from fruitpipe.models import runner

    cores = os.cpu_count() or 1
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    print(f"onnxruntime {ort.__version__}, providers {available}, GPU: {gpu_name()}, {cores} cores", flush=True)
    if not has_cuda and args.require_gpu:
        sys.exit("no CUDAExecutionProvider: install onnxruntime-gpu (with CUDA 13 and cuDNN 9) on a GPU machine")

    images = bench_run.prepare_images(args.images, args.workdir)
    paths = sorted(images.rglob("*.jpg"))
    results: dict[str, object] = {"images": len(paths), "cores": cores, "onnxruntime": ort.__version__,
                                  "gpu": gpu_name(), "date": time.strftime("%Y-%m-%d")}

    cpu_ceiling = bench_run.ceiling(paths, 64, cores)
    results["cpu_ceiling_img_s"] = cpu_ceiling
    print(f"CPU ceiling (1 process, {cores} threads, batch 64): {cpu_ceiling:.1f} img/s", flush=True)
    cpu_pipe = pipeline_shaped(paths, cores, "cpu", 32)
    results["cpu_pipeline_shaped"] = cpu_pipe
    print(f"CPU pipeline-shaped ({cores} processes x 1 thread): {cpu_pipe['img_s']:.1f} img/s", flush=True)

    if has_cuda:
        model_bytes = MODEL.read_bytes()
        sha = _settings("cuda", 1).model_sha256  # type: ignore[attr-defined]
        gpu = runner.get_session(sha, 1, lambda: model_bytes, "cuda")
        cpu = runner.get_session(sha, cores, lambda: model_bytes, "cpu")
        assert gpu.get_providers()[0] == "CUDAExecutionProvider", gpu.get_providers()  # type: ignore[attr-defined]
        decoded = np.stack([model_input(p.read_bytes(), 224, 64_000_000) for p in paths[:512]])
        (f_gpu,) = gpu.run(["features"], {"input": decoded[:256]})  # type: ignore[attr-defined]
        (f_cpu,) = cpu.run(["features"], {"input": decoded[:256]})  # type: ignore[attr-defined]
        cos = (f_gpu * f_cpu).sum(1) / (np.linalg.norm(f_gpu, axis=1) * np.linalg.norm(f_cpu, axis=1))
        results["agreement"] = {"images": 256, "max_abs_diff": float(np.abs(f_gpu - f_cpu).max()),
                                "min_cosine": float(cos.min())}
        print(f"CUDA vs CPU features: {results['agreement']}", flush=True)
        sweep = {}
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            batch = np.ascontiguousarray(np.resize(decoded, (bs, 224, 224, 3)))
            sweep[bs] = model_only(gpu, batch)
            print(f"GPU model only, batch {bs}: {sweep[bs]:.1f} img/s", flush=True)
        results["gpu_model_only_img_s"] = sweep
        embed_batch = args.embed_batch or max((b for b in sweep if b <= 256), key=sweep.__getitem__)
        counts = [int(c) for c in args.procs.split(",")] if args.procs else sorted({1, min(4, cores), cores})
        shaped = []
        for procs in counts:
            for overlap in (False, True):
                r = pipeline_shaped(paths, procs, "cuda", embed_batch, overlap)
                shaped.append(r)
                print(f"GPU pipeline-shaped, {procs} processes, inference {'overlapped' if overlap else 'inline'}, "
                      f"batch {embed_batch}: {r['img_s']:.1f} img/s ({r['providers']})", flush=True)
        results["gpu_pipeline_shaped"] = shaped
        # Where the time goes: decoding alone (no model) and inference alone (pre-decoded), in the same layouts.
        diag = []
        for mode, device in (("decode", "cpu"), ("model", "cuda")):
            for procs in counts:
                r = pipeline_shaped(paths, procs, device, embed_batch, False, mode)
                diag.append(r)
                print(f"{mode} only, {procs} processes: {r['img_s']:.1f} img/s", flush=True)
        results["where_the_time_goes"] = diag
        best = max(shaped, key=lambda r: float(r["img_s"]))  # type: ignore[arg-type]
        results["ratios"] = {
            "gpu_model_only_best_vs_cpu_ceiling": max(sweep.values()) / cpu_ceiling,
            "gpu_pipeline_shaped_best_vs_cpu_ceiling": float(best["img_s"]) / cpu_ceiling,  # type: ignore[arg-type]
            "gpu_pipeline_shaped_best_vs_cpu_pipeline_shaped": float(best["img_s"]) / float(cpu_pipe["img_s"]),  # type: ignore[arg-type]
        }
        print(json.dumps(results["ratios"], indent=2))
    bench_run.write_results(args.json or args.workdir / f"gpu-{len(paths)}.json", results)


if __name__ == "__main__":
    main()
