"""Sweep fruitpipe's embed-stage levers on the same images; prints one markdown row per setting.

    python bench/sweep.py [--images N] SETTING [SETTING ...]

A SETTING is a quoted list of `fruitpipe embed` flags, e.g. "--master local[1] --task-cpus 2".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import MODEL, ROOT, prepare_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5280)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / ".work")
    parser.add_argument("settings", nargs="+")
    args = parser.parse_args()
    images = prepare_images(args.images, args.workdir)
    out = args.workdir / "out-sweep"
    print("| flags | embed img/s | embed s | tasks | workers |\n| --- | --- | --- | --- | --- |")
    for setting in args.settings:
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "fruitpipe.cli", "embed", str(images), str(out), "--quiet", *setting.split()]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "FRUITPIPE_MODELS": str(MODEL.parent)})
        if proc.returncode:
            print(f"| `{setting}` | failed: {proc.stderr.strip().splitlines()[-1]} | | | |")
            continue
        rep = json.loads((out / "run.json").read_text())
        t = rep["timings_s"]["embed"]
        inf = rep["counts"]["inference"]
        print(f"| `{setting or '(defaults)'}` | {rep['counts']['listed'] / t:.1f} | {t:.1f} | {inf['tasks']} | {inf['workers']} |",
              flush=True)


if __name__ == "__main__":
    main()
