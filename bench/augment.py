"""Benchmark: what phone-like augmentation of the studio photos (fruitpipe.augment) gives on real photos.

    FRUITPIPE_MODELS=../shared/models .venv/bin/python bench/augment.py OUT REAL_OUT FAMILIES [--variants 0,2,4]
        [--weights 1,0.3,0.1]

OUT: an output of `fruitpipe run` on Fruits-360 photos (Training + Test); REAL_OUT: one on labelled real photos
in family folders (e.g. ../shared/data/real-photos-dev), FAMILIES its families.json. For each number of variants
N, each Training photo of OUT is also embedded as N variants (fruitpipe.augment.phone_like, seed 7, by content
id), the one-pass classifier's candidates are fitted on the Training rows plus the variants (numpy, the same
solvers and features as `train`), and the candidate `train` would choose (lowest 3-fold cross-validated
log-loss, the folds by the source photo's id so that a photo and its variants share one; each variant counted at
each of --weights, as `train --augment-weight` does) is scored on OUT's Test rows and on every REAL_OUT photo
(a family counts right when the top class is one of its classes). The real photos are never used to choose
anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fruitpipe import augment, images, storage  # noqa: E402
from fruitpipe.classify import linear, stats  # noqa: E402
from fruitpipe.classify.augmented import AUGMENT_VERSION  # noqa: E402
from fruitpipe.storage import StorageOptions  # noqa: E402


def _embed_variants(df: pd.DataFrame, n: int, session, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(features, row index of the source photo) of n variants of each row; cached by n in `cache`."""
    path = cache / f"variants-{n}.npz"
    if path.exists():
        got = np.load(path)
        return got["x"], got["src"]
    xs, srcs, batch, idx = [], [], [], []
    for i, (uri, cid) in enumerate(zip(df.uri, df.id)):
        rgb = images.decode_rgb(storage.read_bytes(uri, StorageOptions()), 10**8)
        for k in range(n):
            made = augment.phone_like(rgb, augment.variant_rng(7, cid, k))
            batch.append(images.preprocess(images.square_views(made, 224, "center")[0]))
            idx.append(i)
        if len(batch) >= 64 or (i == len(df) - 1 and batch):
            xs.append(session.run(["features"], {"input": np.stack(batch)})[0])
            srcs += idx
            batch, idx = [], []
    x, src = np.concatenate(xs), np.array(srcs)
    np.savez(path, x=x, src=src)
    return x, src


def _fit_and_choose(z: np.ndarray, y: np.ndarray, fold: np.ndarray, n_classes: int, wt: np.ndarray
                    ) -> tuple[str, linear.Linear, float]:
    """train's choice: every candidate by 3-fold cross-validated log-loss at its best temperature, then the final
    fit on everything; row i counted wt[i] times in both."""
    def sums(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        onehot = np.eye(n_classes)[y[sel]] * wt[sel][:, None]
        return onehot.sum(0), onehot.T @ z[sel], (z[sel] * wt[sel][:, None]).T @ z[sel]

    nll = np.zeros((len(linear.CANDIDATES), len(linear.TEMPERATURES)))
    for f in range(3):
        models = linear.solve_all(*sums(fold != f))
        sel = fold == f
        for m, model in enumerate(models):
            logits = model.logits(z[sel])
            for t, temp in enumerate(linear.TEMPERATURES):
                nll[m, t] -= (wt[sel] * linear.log_softmax(logits / temp)[np.arange(sel.sum()), y[sel]]).sum()
    m, t = np.unravel_index(np.argmin(nll), nll.shape)
    cand = linear.CANDIDATES[int(m)]
    final = linear.solve(cand.family, *sums(np.ones(len(y), bool)), [cand.reg])[0]
    return cand.name, final, linear.TEMPERATURES[int(t)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("real_out", type=Path)
    parser.add_argument("families", type=Path)
    parser.add_argument("--variants", default="0,2,4")
    parser.add_argument("--weights", default="1", help="weights of a variant against 1 for a photo, e.g. 1,0.3,0.1")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import onnxruntime as ort

    model = Path(os.environ.get("FRUITPIPE_MODELS", ROOT.parent / "shared" / "models")) / "mobilenet_v2_features.onnx"
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    df = pd.read_parquet(args.out / "embeddings", columns=["id", "uri", "label", "split", "features"])
    tr, te = df[df.split == "Training"].reset_index(drop=True), df[df.split == "Test"].reset_index(drop=True)
    classes = sorted(tr.label.unique())
    real = pd.read_parquet(args.real_out / "embeddings", columns=["label", "features"])
    families = json.loads(args.families.read_text())
    right = np.array([[c in families[lb] for c in classes] for lb in real.label])
    cache = Path(f"/tmp/fruitpipe-bench-augment-v{AUGMENT_VERSION}")
    cache.mkdir(exist_ok=True)
    x_tr, y_tr = np.stack(tr.features.to_numpy()), np.array([classes.index(c) for c in tr.label])
    fold_tr = stats.fold_of(list(tr.id), 3)
    z_te = stats.transform(np.stack(te.features.to_numpy()), "sqrt_l2")
    y_te = np.array([classes.index(c) for c in te.label])
    z_real = stats.transform(np.stack(real.features.to_numpy()), "sqrt_l2")
    rows = []
    for n in (int(v) for v in args.variants.split(",")):
        t0 = time.perf_counter()
        if n:
            xv, src = _embed_variants(tr, n, session, cache)
            x, y, fold = np.concatenate([x_tr, xv]), np.concatenate([y_tr, y_tr[src]]), np.concatenate(
                [fold_tr, fold_tr[src]])
        else:
            x, y, fold = x_tr, y_tr, fold_tr
        embed_s = time.perf_counter() - t0
        is_variant = np.arange(len(y)) >= len(y_tr)
        for weight in ([1.0] if not n else [float(w) for w in args.weights.split(",")]):
            wt = np.where(is_variant, weight, 1.0)
            chosen, final, temp = _fit_and_choose(stats.transform(x, "sqrt_l2"), y, fold, len(classes), wt)
            test_top1 = float(np.mean(np.argmax(final.logits(z_te), 1) == y_te))
            pred = np.argmax(final.logits(z_real), 1)
            real_top1 = float(np.mean(right[np.arange(len(pred)), pred]))
            per = {fam: round(float(np.mean(right[(real.label == fam).to_numpy(), :][
                np.arange(int((real.label == fam).sum())), pred[(real.label == fam).to_numpy()]])), 3)
                   for fam in sorted(real.label.unique())}
            row = {"variants": n, "weight": weight if n else None, "training_rows": int(len(y)),
                   "embed_s": round(embed_s, 1), "chosen": chosen, "temperature": round(temp, 4),
                   "test_top1": round(test_top1, 5), "real_family_top1": round(real_top1, 5), "real_per_family": per}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": os.cpu_count(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
