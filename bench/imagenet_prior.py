"""Does the backbone's own ImageNet head help a studio-trained classifier on real photos? Heads on the same
MobileNetV2 embeddings, fitted on Fruits-360 Training only, scored on Fruits-360 Test and on real photos by family:

- logistic regression (scikit-learn) on sqrt+L2 features (train's transform), on the ImageNet logits
  (features @ W + b of mobilenet_v2_classifier.onnx, the same backbone) and on the ImageNet probabilities;
- nearest class mean (cosine) on sqrt+L2 features and on the square roots of the ImageNet probabilities.

A real photo counts right when the top class is one of its family's classes (families.json).

    python bench/imagenet_prior.py SAMPLE_OUT REAL_OUT FAMILIES_JSON [--json bench/results/imagenet-prior.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("FRUITPIPE_SHARED", ROOT.parent / "shared")) / "models"


def _load(out: Path) -> tuple[np.ndarray, list[str], list[str | None]]:
    from fruitpipe.vectors import to_matrix

    t = pq.read_table(out / "embeddings", columns=["label", "split", "features"])
    return (np.asarray(to_matrix(t.column("features")), np.float64), t.column("label").to_pylist(),
            t.column("split").to_pylist())


def _imagenet_head() -> tuple[np.ndarray, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(MODELS / "mobilenet_v2_classifier.onnx"))
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    w = next(v for v in weights.values() if v.shape == (1280, 1000))
    b = next(v for v in weights.values() if v.shape == (1000,))
    return w, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sample", type=Path)
    parser.add_argument("real", type=Path)
    parser.add_argument("families", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression

    x, labels, splits = _load(args.sample)
    r, real_labels, _ = _load(args.real)
    families = json.loads(args.families.read_text())
    w, b = _imagenet_head()
    classes = sorted(set(labels))
    y = np.array([classes.index(c) for c in labels])
    train = np.array([s == "Training" for s in splits])

    def sqrt_l2(a: np.ndarray) -> np.ndarray:
        a = np.sqrt(np.maximum(a, 0))
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    def log_proba(a: np.ndarray) -> np.ndarray:
        z = a @ w + b
        z -= z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    def hellinger(a: np.ndarray) -> np.ndarray:
        p = np.sqrt(np.exp(log_proba(a)))
        return p / np.linalg.norm(p, axis=1, keepdims=True)

    def scores(pred_test: np.ndarray, pred_real: np.ndarray) -> dict[str, float]:
        real = np.mean([classes[p] in families[f] for p, f in zip(pred_real, real_labels)])
        return {"test_top1": round(float(np.mean(pred_test == y[~train])), 4), "real_family_top1": round(float(real), 4)}

    rows = []
    for name, f in (("sqrt+L2 features", sqrt_l2), ("ImageNet logits", lambda a: a @ w + b),
                    ("ImageNet probabilities", lambda a: np.exp(log_proba(a)))):
        clf = LogisticRegression(C=1.0, max_iter=300).fit(f(x[train]), y[train])
        rows.append({"head": f"logistic regression, C=1, on {name}",
                     **scores(clf.predict(f(x[~train])), clf.predict(f(r)))})
    for name, f in (("sqrt+L2 features", sqrt_l2), ("sqrt ImageNet probabilities", hellinger)):
        ftr = f(x[train])
        means = np.stack([ftr[y[train] == k].mean(0) for k in range(len(classes))])
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        rows.append({"head": f"nearest class mean on {name}",
                     **scores(np.argmax(f(x[~train]) @ means.T, 1), np.argmax(f(r) @ means.T, 1))})
    print(f"{'head':<62} {'Test':>7} {'real':>7}")
    for row in rows:
        print(f"{row['head']:<62} {row['test_top1']:>7.2%} {row['real_family_top1']:>7.2%}")
    if args.json:
        args.json.write_text(json.dumps({"classes": len(classes), "real_photos": len(real_labels), "rows": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
