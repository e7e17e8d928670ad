"""Benchmark: raw onnxruntime ceiling vs fruitpipe on Spark vs a naive Spark UDF, same images, same cores.

    python bench/run.py [--images N] [--memory-scale K] [--skip-naive] [--json FILE]

Prints a table and writes it as JSON. Images come from the shared Fruits-360 sample; beyond its 5,280 files they
are repeated with one pixel changed and re-encoded, so every id stays distinct.
"""

from __future__ import annotations

import argparse
import json
import shlex
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FRUITPIPE_SHARED", ROOT.parent / "shared"))
SAMPLE = SHARED / "data" / "fruits360-sample"
MODEL = SHARED / "models" / "mobilenet_v2_features.onnx"


def prepare_images(n: int, workdir: Path) -> Path:
    """A Fruits-360-layout folder of n distinct JPEGs (cached in workdir between runs)."""
    from PIL import Image

    dest = workdir / f"images-{n}"
    if (dest / ".complete").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    files = sorted(SAMPLE.glob("*/*/*.jpg"))
    for i in range(n):
        src = files[i % len(files)]
        rep = i // len(files)
        rel = src.relative_to(SAMPLE)
        target = dest / rel.parent / f"{rep}-{rel.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if rep == 0:
            shutil.copyfile(src, target)
        else:
            img = Image.open(src).convert("RGB")
            px = img.getpixel((rep % 100, rep // 100 % 100))
            img.putpixel((rep % 100, rep // 100 % 100), ((px[0] + 1 + rep % 7) % 256, px[1], px[2]))
            img.save(target, format="JPEG", quality=95)
    (dest / ".complete").write_text(str(n))
    return dest


def ceiling(paths: list[Path], batch_size: int, threads: int) -> float:
    """img/s of one process: read JPEG bytes, decode and resize as the pipeline does, onnxruntime with `threads`."""
    import onnxruntime as ort

    from fruitpipe.images import model_input

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(MODEL), sess_options=opts, providers=["CPUExecutionProvider"])
    session.run(["features"], {"input": np.zeros((batch_size, 224, 224, 3), np.float32)})  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        batch = np.stack([model_input(p.read_bytes(), 224, 64_000_000) for p in paths[start:start + batch_size]])
        session.run(["features"], {"input": batch})
    return len(paths) / (time.perf_counter() - t0)


def write_results(out: Path, results: object) -> None:
    """Write a benchmark's results as indented JSON and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {out}")


class RssSampler:
    """Peak resident memory of a process tree: the Python driver, the JVM, and the Python workers."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = {"driver_python_mb": 0.0, "jvm_mb": 0.0, "workers_total_mb": 0.0, "worker_max_mb": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _children() -> dict[int, list[int]]:
        tree: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                tree.setdefault(ppid, []).append(int(entry))
        return tree

    @staticmethod
    def _rss_mb(pid: int) -> tuple[float, float, str]:
        """(current RSS, the process's own peak RSS so far (VmHWM: exact, not sampled), command line)."""
        try:
            with open(f"/proc/{pid}/status") as fh:
                status = fh.read()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return 0.0, 0.0, ""
        values = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status.splitlines()
                  if line.startswith(("VmRSS:", "VmHWM:"))}
        return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0), cmd

    def _sample(self) -> None:
        tree = self._children()
        stack, seen = [self.pid], []
        while stack:
            p = stack.pop()
            seen.append(p)
            stack.extend(tree.get(p, []))
        workers = []
        for p in seen:
            rss, hwm, cmd = self._rss_mb(p)
            # One process's peak is its VmHWM, which misses no spike between samples; a sum over processes
            # can only be sampled (their peaks need not coincide).
            if p == self.pid:
                self.peak["driver_python_mb"] = max(self.peak["driver_python_mb"], hwm)
            elif "java" in cmd.split(" ")[0]:
                self.peak["jvm_mb"] = max(self.peak["jvm_mb"], hwm)
            elif "pyspark" in cmd or "daemon" in cmd or "worker" in cmd:
                workers.append(rss)
                self.peak["worker_max_mb"] = max(self.peak["worker_max_mb"], hwm)
        if workers:
            self.peak["workers_total_mb"] = max(self.peak["workers_total_mb"], sum(workers))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_fruitpipe(images: Path, out: Path, extra: list[str]) -> dict[str, object]:
    """The real CLI in its own process (JVM start included in wall time); returns its run.json and RSS peaks."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "FRUITPIPE_MODELS": str(MODEL.parent)}
    cmd = [sys.executable, "-m", "fruitpipe.cli", "run", str(images), str(out), "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with RssSampler(proc.pid) as sampler:
        _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"fruitpipe failed ({proc.returncode}): {err[-2000:]}")
    report = json.loads((out / "run.json").read_text())
    return {"wall_s": wall, "report": report, "rss": sampler.peak}


def run_naive(images: Path, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "naive_spark.py"), str(images), str(out), str(MODEL)],
                          capture_output=True, text=True, env={**os.environ, "PYSPARK_PYTHON": sys.executable})
    if proc.returncode:
        raise SystemExit(f"naive baseline failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5280, help="number of images (default: the 5,280 of the sample)")
    parser.add_argument("--batch-sizes", default="16,32,64", help="ceiling sweep (default 16,32,64)")
    parser.add_argument("--ceiling-sweep-images", type=int, default=1000, help="images per sweep point")
    parser.add_argument("--ceiling-max-images", type=int, default=10560,
                        help="measure the ceiling on at most this many of the images (same per-image work)")
    parser.add_argument("--memory-scale", type=int, default=0, help="also run fruitpipe on K x images for RSS")
    parser.add_argument("--skip-naive", action="store_true", help="skip the naive Spark baseline")
    parser.add_argument("--fruitpipe-args", default="", help="extra flags for `fruitpipe run`, quoted")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / ".work")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default workdir)")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    images = prepare_images(args.images, args.workdir)
    paths = sorted(p for p in images.rglob("*.jpg"))
    results: dict[str, object] = {"images": len(paths), "cores": cores, "date": time.strftime("%Y-%m-%d")}

    sweep = {}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        sweep[bs] = ceiling(paths[: args.ceiling_sweep_images], bs, cores)
    best = max(sweep, key=sweep.__getitem__)
    ceiling_ips = ceiling(paths[: args.ceiling_max_images], best, cores)
    results["ceiling"] = {"batch_sweep_img_s": sweep, "batch_size": best, "img_s": ceiling_ips}

    fp = run_fruitpipe(images, args.workdir / "out-fruitpipe", shlex.split(args.fruitpipe_args))
    rep = fp["report"]
    t = rep["timings_s"]
    n = rep["counts"]["listed"]
    results["fruitpipe"] = {
        "embed_img_s": n / t["embed"],
        "end_to_end_img_s_without_jvm": n / (t["total"] - t["spark_start"]),
        "end_to_end_img_s_with_jvm": n / fp["wall_s"],
        "timings_s": t, "wall_s": fp["wall_s"], "rss_mb": fp["rss"],
        "inference": rep["counts"]["inference"], "explained_at_k": rep["pca"]["explained_at_k"],
    }
    if args.memory_scale:
        big = prepare_images(args.images * args.memory_scale, args.workdir)
        fp_big = run_fruitpipe(big, args.workdir / "out-fruitpipe-big", shlex.split(args.fruitpipe_args))
        tb = fp_big["report"]["timings_s"]
        nb = fp_big["report"]["counts"]["listed"]
        results["fruitpipe_scaled"] = {
            "images": nb, "scale": args.memory_scale, "embed_img_s": nb / tb["embed"], "wall_s": fp_big["wall_s"],
            "timings_s": tb, "rss_mb": fp_big["rss"],
            "rss_ratio": {k: (fp_big["rss"][k] / v if v else None) for k, v in fp["rss"].items()},
        }
    if not args.skip_naive:
        nv = run_naive(images, args.workdir / "out-naive")
        results["naive"] = {"img_s": nv["images"] / nv["seconds"], **nv}
    f = results["fruitpipe"]
    results["ratios"] = {
        "embed_vs_ceiling": f["embed_img_s"] / ceiling_ips,
        "end_to_end_without_jvm_vs_ceiling": f["end_to_end_img_s_without_jvm"] / ceiling_ips,
        "embed_vs_naive": f["embed_img_s"] / results["naive"]["img_s"] if "naive" in results else None,
    }

    rows = [("ceiling: raw onnxruntime, 1 process, %d threads, batch %d" % (cores, best), ceiling_ips, 1.0),
            ("fruitpipe embed stage", f["embed_img_s"], f["embed_img_s"] / ceiling_ips),
            ("fruitpipe end to end, without JVM start", f["end_to_end_img_s_without_jvm"],
             f["end_to_end_img_s_without_jvm"] / ceiling_ips),
            ("fruitpipe end to end, with JVM start", f["end_to_end_img_s_with_jvm"],
             f["end_to_end_img_s_with_jvm"] / ceiling_ips)]
    if "naive" in results:
        rows.append(("naive Spark (binaryFile + pandas UDF, model per batch)", results["naive"]["img_s"],
                     results["naive"]["img_s"] / ceiling_ips))
    print(f"\n{len(paths)} images, {cores} cores\n")
    print(f"| {'what':<62} | {'img/s':>7} | {'x ceiling':>9} |")
    print(f"| {'-' * 62} | {'-' * 7} | {'-' * 9} |")
    for name, ips, ratio in rows:
        print(f"| {name:<62} | {ips:7.1f} | {ratio:9.2f} |")
    print(f"\nbatch sweep (img/s): {', '.join(f'{b}: {v:.1f}' for b, v in sweep.items())}")
    print(f"fruitpipe peak RSS (MB): {json.dumps({k: round(v) for k, v in f['rss_mb'].items()})}")
    if "naive" in results:
        print(f"fruitpipe embed / naive: {results['ratios']['embed_vs_naive']:.2f}x")
    if "fruitpipe_scaled" in results:
        s = results["fruitpipe_scaled"]
        print(f"at {s['images']} images: embed {s['embed_img_s']:.1f} img/s, wall {s['wall_s']:.0f} s, "
              f"peak RSS (MB) {json.dumps({k: round(v) for k, v in s['rss_mb'].items()})}, "
              f"ratio to 1x {json.dumps({k: round(v, 2) if v else None for k, v in s['rss_ratio'].items()})}")
    write_results(args.json or args.workdir / f"results-{len(paths)}.json", results)


if __name__ == "__main__":
    main()
