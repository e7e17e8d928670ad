"""Benchmark: do folds of near-copy groups give a real-photo figure close to photos taken apart (issue 34)?

    python bench/grouping.py SAMPLE_OUT REAL_TRAIN_OUT REAL_VAL_OUT FAMILIES [--folds 3] [--json FILE]

SAMPLE_OUT: `fruitpipe run` of Fruits-360 photos; REAL_TRAIN_OUT / REAL_VAL_OUT: `fruitpipe run` of `fruitpipe sample
DIR --real`'s train/ and val/ (the Grocery Store Dataset's own splits, val photographed apart); FAMILIES: its
families.json. The classifier is train's (square root + L2 features, shrinkage LDA at each of its grid's values)
on the Fruits-360 Training photos plus the real train photos, each family one class; a real photo is right when
its top class is its family's or a Fruits-360 class of its family. Printed per cosine threshold of the near-copy
groups: the groups, the largest, the grouped cross-validated figure on the train photos, next to random folds
(by content id, as train made them before) and to the val split scored by the fit on all train photos.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fruitpipe.classify import groups, linear, stats  # noqa: E402


def _load(out: str) -> tuple[list[str], list[str], list[str], np.ndarray]:
    t = pq.read_table(str(Path(out) / "embeddings"), columns=["id", "label", "split", "features"])
    x = np.array(t.column("features").to_pylist(), np.float64)
    return (t.column("id").to_pylist(), t.column("label").to_pylist(), t.column("split").to_pylist(),
            stats.transform(x, "sqrt_l2"))


def _sums(z: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = np.bincount(y, minlength=k).astype(np.float64)
    s = np.zeros((k, z.shape[1]))
    np.add.at(s, y, z)
    return n, s, z.T @ z


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sample")
    ap.add_argument("real")
    ap.add_argument("val")
    ap.add_argument("families")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--thresholds", default="0.6,0.65,0.7,0.75,0.8,0.85,0.9,0.95")
    ap.add_argument("--reg", type=float, default=0.1, help="LDA shrinkage (train chose 0.1 with real photos)")
    ap.add_argument("--json")
    a = ap.parse_args()
    fam = json.loads(Path(a.families).read_text())
    _, sl, ss, sz = _load(a.sample)
    keep = np.array([s == "Training" for s in ss])
    sl, sz = [lb for lb, k in zip(sl, keep) if k], sz[keep]
    rid, rl, _, rz = _load(a.real)
    _, vl, _, vz = _load(a.val)
    classes = sorted(set(sl)) + [f"{f} (photos)" for f in sorted(set(rl))]
    index = {c: i for i, c in enumerate(classes)}
    right_of = {f: {index[f"{f} (photos)"], *(index[c] for c in fam.get(f, []) if c in index)} for f in fam}
    ys = np.array([index[lb] for lb in sl])
    yr = np.array([index[f"{lb} (photos)"] for lb in rl])
    k = len(classes)
    base = _sums(sz, ys, k)

    def fit(zr: np.ndarray, y: np.ndarray) -> linear.Linear:
        n, s, g = _sums(zr, y, k)
        return linear.solve("lda", base[0] + n, base[1] + s, base[2] + g, [a.reg])[0]

    def acc(model: linear.Linear, z: np.ndarray, labels: list[str]) -> float:
        pred = np.argmax(model.logits(z), axis=1)
        return float(np.mean([p in right_of[lb] for p, lb in zip(pred, labels)]))

    def cv(fold: np.ndarray) -> float:
        ok = 0.0
        for f in range(a.folds):
            test = fold == f
            m = fit(rz[~test], yr[~test])
            ok += acc(m, rz[test], [lb for lb, t in zip(rl, test) if t]) * test.sum()
        return ok / len(rl)

    val = acc(fit(rz, yr), vz, vl)
    random = cv(stats.fold_of(rid, a.folds))
    print(f"val split (fit on all {len(rl)} train photos): {val:.2%}; random {a.folds}-fold CV: {random:.2%}")
    rows = []
    for th in (float(t) for t in a.thresholds.split(",")):
        g = groups.grouped_folds(rid, rl, rz, a.folds, th)
        fold = np.array([g.fold_by_id[i] for i in rid])
        single = sum(len({f for f, lb in zip(fold, rl) if lb == c}) == 1 for c in set(rl))
        got = cv(fold)
        rows.append({"threshold": th, "groups": g.groups, "largest": g.largest, "classes_in_one_fold": single,
                     "grouped_cv": round(got, 4), "val": round(val, 4), "random_cv": round(random, 4)})
        print(f"cosine >= {th:.2f}: {g.groups:5d} groups, largest {g.largest:4d}, classes in one fold {single:2d}: "
              f"grouped CV {got:.2%} (val {val:.2%}, gap {100 * (got - val):+.1f} points)")
    if a.json:
        Path(a.json).write_text(json.dumps({"val": val, "random_cv": random, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
