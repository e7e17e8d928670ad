"""Benchmark: decoding and resizing the sample's JPEGs with Pillow (fruitpipe's `images.model_pixels`) against
OpenCV (`cv2.imdecode` + `cv2.cvtColor` + `cv2.resize`, bilinear), and what the difference does to the features.

    pip install -e ".[bench]"   # OpenCV: not a fruitpipe dependency, measured here and not adopted (docs/performance.md)
    python bench/decode.py [--images N] [--repeat R] [--json FILE]

Prints, for each decoder, images/s of bytes -> 224x224x3 uint8 on one core (the bytes are read beforehand), and,
on 256 photos run through MobileNetV2 (the uint8-wrapped model the pipeline uses), the largest pixel difference and
the features' largest absolute difference and smallest cosine between the two decoders.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FRUITPIPE_SHARED", ROOT.parent / "shared"))
SAMPLE = SHARED / "data" / "fruits360-sample"
MODEL = SHARED / "models" / "mobilenet_v2_features.onnx"
SIZE = 224


def opencv_pixels(data: bytes, size: int) -> np.ndarray:
    """bytes -> size x size x 3 uint8 RGB with OpenCV (bilinear, as Pillow's resize in fruitpipe)."""
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not an image")
    return cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_LINEAR)


def pillow_pixels(data: bytes, size: int) -> np.ndarray:
    """fruitpipe's own decode + resize."""
    from fruitpipe.images import model_pixels

    return model_pixels(data, size, 64_000_000)


def rate(fn, blobs: list[bytes], repeat: int) -> float:
    """Best images/s over `repeat` passes."""
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for b in blobs:
            fn(b, SIZE)
        best = max(best, len(blobs) / (time.perf_counter() - t0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import cv2
    import onnxruntime as ort

    from fruitpipe.models.registry import get_spec
    from fruitpipe.models.wrap import wrap_uint8

    cv2.setNumThreads(1)  # one core each: a Spark task decodes on its own core
    files = sorted(SAMPLE.glob("*/*/*.jpg"))
    step = max(1, len(files) // args.images)
    blobs = [f.read_bytes() for f in files[::step][: args.images]]
    results: dict = {"images": len(blobs), "opencv": cv2.__version__}
    results["pillow_img_s"] = rate(pillow_pixels, blobs, args.repeat)
    results["opencv_img_s"] = rate(opencv_pixels, blobs, args.repeat)

    wrapped = wrap_uint8(MODEL.read_bytes(), get_spec("mobilenet_v2"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(wrapped.data, sess_options=opts, providers=["CPUExecutionProvider"])
    check = blobs[:: max(1, len(blobs) // 256)][:256]
    a = np.stack([pillow_pixels(b, SIZE) for b in check])
    c = np.stack([opencv_pixels(b, SIZE) for b in check])
    fa = session.run(None, {wrapped.input_name: a})[0]
    fc = session.run(None, {wrapped.input_name: c})[0]
    cos = (fa * fc).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fc, axis=1))
    results.update(
        checked=len(check),
        pixel_max_abs_diff=int(np.abs(a.astype(int) - c.astype(int)).max()),
        pixel_mean_abs_diff=float(np.abs(a.astype(int) - c.astype(int)).mean()),
        feature_max_abs_diff=float(np.abs(fa - fc).max()),
        feature_min_cosine=float(cos.min()),
    )
    print(f"{len(blobs)} JPEGs, bytes -> {SIZE}x{SIZE}x3 uint8, one core:")
    print(f"  Pillow {results['pillow_img_s']:8.1f} img/s   OpenCV {cv2.__version__} {results['opencv_img_s']:8.1f} "
          f"img/s   ratio {results['opencv_img_s'] / results['pillow_img_s']:.2f}x")
    print(f"  on {len(check)} photos: pixels differ by up to {results['pixel_max_abs_diff']} (mean "
          f"{results['pixel_mean_abs_diff']:.2f}); features by up to {results['feature_max_abs_diff']:.4f}, "
          f"smallest cosine {results['feature_min_cosine']:.5f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
