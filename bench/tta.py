"""Benchmark: test-time views (issue 34): one view against its horizontal flip averaged in, and the three squares
along a photo's long side (`--crop three`), on labelled real photos the classifier never saw.

    python bench/tta.py OUT PHOTOS FAMILIES

OUT: an output with a classifier (`fruitpipe train`); PHOTOS: <family>/ folders (e.g. `sample --real`'s val/);
FAMILIES: their families.json. Printed per way of viewing: the app's species answer's family top-1 and the
milliseconds per photo on this machine (one onnxruntime session, its default threads).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fruitpipe import images  # noqa: E402
from fruitpipe.classify.export import FruitClassifier  # noqa: E402
from fruitpipe.classify.openset import species_proba  # noqa: E402


def main() -> None:
    out, photos, families = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
    data = (out / "classifier" / "fruit_classifier.onnx").read_bytes()
    files = sorted(p for p in photos.glob("*/*") if p.is_file())
    result = {}
    for crop in ("center", "three"):
        clf = FruitClassifier(data, crop=crop)
        for flip in (False, True):
            right, t0 = [], time.perf_counter()
            for path in files:
                views = images.model_views(path.read_bytes(), clf.input_size, 64_000_000, clf.preprocess,
                                           clf.layout, crop)
                if flip:  # NHWC: the width is axis 2
                    views = np.concatenate([views, views[:, :, ::-1, :]])
                p = clf.probabilities(np.ascontiguousarray(views)).mean(axis=0)
                sp = species_proba(p[None], clf.species, len(clf.species_names))[0]
                family = path.parent.name
                stands = {*families.get(family, [])}
                ok = any(c in stands or set(clf.maps_to.get(c, [])) & stands
                         for c, s in zip(clf.classes, clf.species) if s == int(np.argmax(sp)))
                right.append(ok)
            ms = 1000 * (time.perf_counter() - t0) / len(files)
            name = f"{crop}{' + flip' if flip else ''}"
            result[name] = {"top1": float(np.mean(right)), "ms_per_photo": round(ms, 1)}
            print(f"{name:<14} family top-1 {np.mean(right):.2%} on {len(files)} photos, {ms:.0f} ms per photo")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
