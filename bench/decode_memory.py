"""Peak memory of one decode for the model, per accepted format, mode and shape at --max-pixels (64 Mpx), against
the estimate `serve` admits it by (images.decode_cost): the table behind images.PEAK_BYTES_PER_PIXEL. Each decode
runs in its own process (peak RSS, VmHWM, above the process after reading the file); the ratio measured /
estimate must stay under 1 for the README's decode bound to hold.

    python bench/decode_memory.py [--json bench/results/decode-memory.json]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

#: VmHWM (this process's own high-water mark: ru_maxrss survives exec, so it would carry this script's peak).
MEASURE = """
import sys
from fruitpipe import images
def hwm():
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1]) * 1024
data = open(sys.argv[1], "rb").read()
base = hwm()
images.model_views(data, 224, 64_000_000)
print(hwm() - base)
"""

SIDE = 7999  # 63.98 Mpx: the largest square under the default --max-pixels
CASES: list[tuple[str, str, tuple[int, int], str, dict]] = [
    ("rgb.jpg", "RGB", (SIDE, SIDE), "JPEG", {}), ("cmyk.jpg", "CMYK", (SIDE, SIDE), "JPEG", {}),
    ("long.jpg", "RGB", (65000, 984), "JPEG", {}),
    ("rgb.png", "RGB", (SIDE, SIDE), "PNG", {}), ("rgba.png", "RGBA", (SIDE, SIDE), "PNG", {}),
    ("l.png", "L", (SIDE, SIDE), "PNG", {}), ("la.png", "LA", (SIDE, SIDE), "PNG", {}),
    ("one.png", "1", (SIDE, SIDE), "PNG", {}), ("i16.png", "I;16", (SIDE, SIDE), "PNG", {}),
    ("pa.png", "P", (SIDE, SIDE), "PNG", {"transparency": 3}),
    ("long-rgba.png", "RGBA", (1_999_999, 32), "PNG", {}), ("long-rgb.png", "RGB", (1_999_999, 32), "PNG", {}),
    ("rgba.tif", "RGBA", (SIDE, SIDE), "TIFF", {"compression": "tiff_deflate"}),
    ("i16.tif", "I;16", (SIDE, SIDE), "TIFF", {"compression": "tiff_deflate"}),
    ("f.tif", "F", (SIDE, SIDE), "TIFF", {"compression": "tiff_deflate"}),
    ("cmyk.tif", "CMYK", (SIDE, SIDE), "TIFF", {"compression": "tiff_deflate"}),
    ("p.gif", "P", (SIDE, SIDE), "GIF", {}), ("rgb.bmp", "RGB", (SIDE, SIDE), "BMP", {}),
    ("rgb.webp", "RGB", (SIDE, SIDE), "WEBP", {"lossless": True}),
    ("rgba.webp", "RGBA", (SIDE, SIDE), "WEBP", {"lossless": True}),
    ("long-rgba.webp", "RGBA", (16383, 3900), "WEBP", {"lossless": True}),
    ("rgba.avif", "RGBA", (SIDE, SIDE), "AVIF", {}),
]


def _make(path: Path, mode: str, size: tuple[int, int], fmt: str, kw: dict) -> None:
    fill: int | float | tuple = {"1": 1, "L": 10, "P": 3, "I;16": 3000, "F": 0.5}.get(mode, 0)
    if not fill:
        fill = (10, 200, 30, 128)[:len(mode)] if mode != "CMYK" else (10, 200, 30, 4)
    buf = io.BytesIO()
    Image.new(mode, size, fill).save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    from fruitpipe import images

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, mode, size, fmt, kw in CASES:
            path = Path(tmp) / name
            _make(path, mode, size, fmt, kw)
            peak = int(subprocess.run([sys.executable, "-c", MEASURE, str(path)], check=True, capture_output=True,
                                      text=True).stdout)
            estimate = images.decode_cost(path.read_bytes(), 64_000_000, 224)
            rows.append({"file": name, "mode": mode, "size": list(size), "bytes": path.stat().st_size,
                         "peak_mib": round(peak / 2**20, 1), "estimate_mib": round(estimate / 2**20, 1),
                         "ratio": round(peak / estimate, 3)})
            r = rows[-1]
            print(f"{name:16s} {mode:5s} {size[0]:>9}x{size[1]:<5} peak {r['peak_mib']:7.1f} MiB  "
                  f"estimate {r['estimate_mib']:7.1f} MiB  ratio {r['ratio']:.3f}", flush=True)
    worst = max(rows, key=lambda r: r["ratio"])
    print(f"worst ratio measured/estimate: {worst['ratio']:.3f} ({worst['file']}); largest peak "
          f"{max(r['peak_mib'] for r in rows):.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
