"""False-alarm and detection rates of `fruitpipe drift`'s tests on real photos (docs/drift.md).

Embeds the shared sample and perturbed copies of its Test photos (darkened, blurred, rotated; re-encoded as JPEG
quality 95) with the pipeline's own decode and preprocessing and the registered MobileNetV2, then calls the same
`detect()` the command uses, many times on random draws:

- false alarms: reference = all Training photos, current = random draws of unperturbed Test photos of the same
  classes; and random halves of Training against each other;
- detection per perturbation and strength: current = random draws of perturbed Test photos;
- unseen classes: reference = Training of the first 50 classes, current = draws mixing Test photos of the other
  16 classes at a given share.
With a classifier head fitted on the reference (logistic regression by a few hundred steps of gradient descent in
numpy, as the Spark model would be) for the perturbation rows, so the prediction and confidence tests run too.

    FRUITPIPE_MODELS=../shared/models .venv/bin/python bench/drift.py --draws 50
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from fruitpipe import images
from fruitpipe.classify.export import Head
from fruitpipe.models import get_spec, resolve_model
from fruitpipe.drift.stats import DriftSettings, detect
from fruitpipe.storage import StorageOptions

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("FRUITPIPE_SHARED", ROOT.parent / "shared")) / "data" / "fruits360-sample"
PERTURBATIONS = {
    "darken": [0.85, 0.7, 0.5],  # brightness factor
    "blur": [1.0, 2.0, 4.0],  # Gaussian radius, pixels of the 100x100 photo
    "rotate": [10.0, 30.0, 90.0],  # degrees, white fill (the dataset's background)
}


def perturb(data: bytes, kind: str, strength: float) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if kind == "darken":
        img = ImageEnhance.Brightness(img).enhance(strength)
    elif kind == "blur":
        img = img.filter(ImageFilter.GaussianBlur(strength))
    else:
        img = img.rotate(strength, resample=Image.Resampling.BILINEAR, fillcolor=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def embed(blobs: list[bytes], session: object) -> np.ndarray:
    out = []
    for i in range(0, len(blobs), 32):
        batch = np.stack([images.model_input(b, 224, 64_000_000) for b in blobs[i:i + 32]])
        out.append(session.run(["features"], {"input": batch})[0])  # type: ignore[attr-defined]
    return np.vstack(out).astype(np.float64)


def pca_basis(x: np.ndarray, k: int) -> np.ndarray:
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    return vectors[:, np.argsort(values)[::-1][:k]]


def fit_head(x: np.ndarray, y: np.ndarray, classes: int, steps: int = 300, lr: float = 0.5) -> Head:
    """Multinomial logistic regression by full-batch gradient descent on standardised features (bench only)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = np.zeros((z.shape[1], classes))
    b = np.zeros(classes)
    onehot = np.eye(classes)[y]
    for _ in range(steps):
        logits = z @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(z)
        w -= lr * (z.T @ g + 1e-4 * w)
        b -= lr * g.sum(0)
    # fold the standardisation into the layer: (x - mu) / sd @ w + b = x @ (w / sd) + (b - mu / sd @ w)
    return Head(None, [(w / sd[:, None], b - (mu / sd) @ w)])


def load(cache: Path) -> dict[str, np.ndarray]:
    if cache.exists():
        return dict(np.load(cache, allow_pickle=False))
    import onnxruntime as ort

    model = resolve_model(get_spec("mobilenet_v2"), None, StorageOptions())
    session = ort.InferenceSession(model.path, providers=["CPUExecutionProvider"])
    data: dict[str, np.ndarray] = {}
    for split in ("Training", "Test"):
        files = sorted(SAMPLE.glob(f"{split}/*/*.jpg"))
        blobs = [f.read_bytes() for f in files]
        data[f"{split}_x"] = embed(blobs, session)
        data[f"{split}_label"] = np.array([f.parent.name for f in files])
        if split == "Test":
            for kind, strengths in PERTURBATIONS.items():
                for s in strengths:
                    t0 = time.perf_counter()
                    data[f"{kind}_{s}"] = embed([perturb(b, kind, s) for b in blobs], session)
                    print(f"embedded {kind} {s}: {len(blobs)} photos in {time.perf_counter() - t0:.1f} s", flush=True)
    np.savez(cache, **data)
    return data


def rate(ref: np.ndarray, pool: np.ndarray, n: int, draws: int, settings: DriftSettings, rng: np.random.Generator,
         basis: np.ndarray, head: Head | None = None, classes: list[str] | None = None) -> tuple[float, dict]:
    alarms = 0
    by_test: dict[str, int] = {}
    ref_p = head.probabilities(ref) if head else None
    for _ in range(draws):
        cur = pool[rng.choice(len(pool), min(n, len(pool)), replace=False)]
        result = detect(ref @ basis, cur @ basis, settings, ref_proba=ref_p,
                        cur_proba=head.probabilities(cur) if head else None, classes=classes)
        alarms += result["drift"]
        for name, t in result["tests"].items():
            by_test[name] = by_test.get(name, 0) + int(t["drift"])
    return alarms / draws, {k: v / draws for k, v in by_test.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=50, help="random draws per condition")
    parser.add_argument("--n", type=int, default=300, help="photos per current draw")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--cache", default="/tmp/fruitpipe-drift-bench.npz")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    data = load(Path(args.cache))
    settings = DriftSettings()
    rng = np.random.default_rng(11)
    tr_x, te_x = data["Training_x"], data["Test_x"]
    classes = sorted(set(data["Training_label"].tolist()))
    y = np.array([classes.index(c) for c in data["Training_label"]])
    basis = pca_basis(tr_x, args.k)
    head = fit_head(tr_x, y, len(classes))
    figures: dict[str, object] = {"settings": settings.__dict__, "n": args.n, "draws": args.draws, "k": args.k}
    t0 = time.perf_counter()
    fa, by = rate(tr_x, te_x, args.n, args.draws, settings, rng, basis, head, classes)
    figures["false_alarm_training_vs_test"] = {"rate": fa, "by_test": by}
    print(f"false alarms, Training vs draws of Test: {fa:.1%} {by}", flush=True)
    halves = 0
    for _ in range(args.draws):
        idx = rng.permutation(len(tr_x))
        a, b = tr_x[idx[: len(idx) // 2]], tr_x[idx[len(idx) // 2:]]
        halves += detect(a @ basis, b[: args.n] @ basis, settings)["drift"]
    figures["false_alarm_random_halves"] = halves / args.draws
    print(f"false alarms, random halves of Training: {halves / args.draws:.1%}", flush=True)
    detection: dict[str, dict[str, object]] = {}
    for kind, strengths in PERTURBATIONS.items():
        for s in strengths:
            det, by = rate(tr_x, data[f"{kind}_{s}"], args.n, args.draws, settings, rng, basis, head, classes)
            detection[f"{kind} {s}"] = {"rate": det, "by_test": by}
            print(f"detection, {kind} {s}: {det:.1%} {by}", flush=True)
    seen = set(classes[:50])
    ref_mask = np.isin(data["Training_label"], list(seen))
    seen_test = te_x[np.isin(data["Test_label"], list(seen))]
    unseen_test = te_x[~np.isin(data["Test_label"], list(seen))]
    ref_seen = tr_x[ref_mask]
    basis_seen = pca_basis(ref_seen, args.k)
    for share in (0.1, 0.25, 0.5, 1.0):
        hits = 0
        for _ in range(args.draws):
            m = int(round(args.n * share))
            m = min(m, len(unseen_test))
            cur = np.vstack([unseen_test[rng.choice(len(unseen_test), m, replace=False)],
                             seen_test[rng.choice(len(seen_test), args.n - m, replace=False)]])
            hits += detect(ref_seen @ basis_seen, cur @ basis_seen, settings)["drift"]
        detection[f"unseen classes {share:.0%}"] = {"rate": hits / args.draws}
        print(f"detection, unseen classes at {share:.0%}: {hits / args.draws:.1%}", flush=True)
    figures["detection"] = detection
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
