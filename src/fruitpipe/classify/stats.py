"""The classifier's sufficient statistics, summed on the executors in one pass over the committed embeddings parts:
per fold, per class counts and feature sums, and one Gramian XᵀX per fold and one per class group (float64), of the
transformed features."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from fruitpipe import storage
from fruitpipe.classify.groups import fold_of as fold_of  # where the rest of the code looks for it
from fruitpipe.classify.sources import Relabel
from fruitpipe.pipeline.sums import sum_per_task
from fruitpipe.vectors import to_matrix

log = logging.getLogger(__name__)

#: Feature transforms the linear classifiers can read (the exported graph applies the same one).
TRANSFORMS = ("sqrt_l2", "l2", "none")


def transform(x: np.ndarray, kind: str) -> np.ndarray:
    """The features as the classifier sees them, in float64. sqrt_l2: element-wise square root (the features are
    ReLU6 outputs, >= 0: a Hellinger-style map that tames the few large activations), then unit L2 norm; l2: unit
    norm only; none: as embedded. A zero vector stays zero."""
    z = np.asarray(x, np.float64)
    if kind == "none":
        return z
    if kind == "sqrt_l2":
        z = np.sqrt(np.clip(z, 0.0, None))
    elif kind != "l2":
        raise ValueError(f"unknown transform {kind!r}")
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    return z / np.where(norm > 0, norm, 1.0)


@dataclass(frozen=True)
class FeatureMap:
    """What the classifier reads from an embedding: the transform, then an optional projection (d x k: OUTPUT's
    PCA, for --features reduced)."""

    kind: str
    projection: np.ndarray | None = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        z = transform(x, self.kind)
        return z if self.projection is None else z @ self.projection


def holdout_order(content_id: str) -> float:
    """A row's place in the hold-out, in [0, 1): its id read as a fraction (another 8 hex digits than the fold's,
    so folds and hold-out are independent)."""
    return int(content_id[8:16], 16) / 16**8


def heldout_of(ids: list[str], share: float) -> np.ndarray:
    """True for the rows whose hold-out order falls under `share`."""
    return np.fromiter((holdout_order(i) < share for i in ids), dtype=bool, count=len(ids))


@dataclass(frozen=True)
class Holdout:
    """The test rows of an output without a Test split, by a deterministic rule per class: the Training rows whose
    hold-out order falls under `share`, except each class's last photo in that order when every photo of the class
    would go (so each class keeps at least one Training photo and stays learnable)."""

    share: float
    kept: frozenset[str] = frozenset()

    @classmethod
    def of(cls, share: float, last_held: dict[str, str]) -> Holdout:
        """The rule for the classes whose last photo (scoring.Survey.last_held) is given."""
        return cls(share, frozenset(i for i in last_held.values() if holdout_order(i) < share))

    def mask(self, ids: list[str]) -> np.ndarray:
        """True for the held-out rows among `ids` (Training rows)."""
        out = heldout_of(ids, self.share)
        if self.kept and out.any():
            out &= np.fromiter((i not in self.kept for i in ids), dtype=bool, count=len(ids))
        return out

    def key(self) -> dict[str, Any]:
        """What the kept statistics' fingerprint records of the rule."""
        return {"share": self.share, "kept": sorted(self.kept)}


def training_rows(ids: list[str], labels: list[str], splits: list[str], classes: set[str] | dict[str, int],
                  holdout: Holdout | None) -> np.ndarray:
    """The rows a fit learns from: Training rows of a known class, minus the hold-out when there is one."""
    keep = np.array([sp == "Training" and lb in classes for sp, lb in zip(splits, labels)], dtype=bool)
    if holdout is not None and len(ids):
        keep &= ~holdout.mask(ids)
    return keep


@dataclass
class Stats:
    """Counts n[f, c], sums s[f, c, :] and Gramians g[f, :, :] of the transformed Training features per fold, and
    Gramians h[k, :, :] per class group (classify.openset: every class of a species in one group), so that a fit
    without a fold, or without a group's classes, is a subtraction."""

    n: np.ndarray
    s: np.ndarray
    g: np.ndarray
    h: np.ndarray

    @property
    def folds(self) -> int:
        return int(self.n.shape[0])

    @property
    def groups(self) -> int:
        return int(self.h.shape[0])

    @property
    def dim(self) -> int:
        return int(self.g.shape[1])

    @staticmethod
    def zeros(folds: int, classes: int, dim: int, groups: int) -> Stats:
        return Stats(np.zeros((folds, classes)), np.zeros((folds, classes, dim)), np.zeros((folds, dim, dim)),
                     np.zeros((groups, dim, dim)))

    def __add__(self, other: Stats) -> Stats:
        return Stats(self.n + other.n, self.s + other.s, self.g + other.g, self.h + other.h)

    def scaled(self, weight: float) -> Stats:
        """Every row counted `weight` times (augmented rows, classify.augmented)."""
        return Stats(self.n * weight, self.s * weight, self.g * weight, self.h * weight)

    def classes(self, keep: list[int]) -> Stats:
        """The statistics of the classes `keep` only (their rows are the only ones the Gramians hold)."""
        return Stats(self.n[:, keep], self.s[:, keep], self.g, self.h)

    def totals(self, without: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n[c], s[c, :], g) summed over the folds, leaving fold `without` out (by subtraction, no new pass)."""
        n, s, g = self.n.sum(0), self.s.sum(0), self.g.sum(0)
        if without is not None:
            n, s, g = n - self.n[without], s - self.s[without], g - self.g[without]
        return n, s, g

    def without_group(self, group: int, group_of_class: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n[c], s[c, :], g) of every row but those of the classes of `group`: a fit that never saw them."""
        n, s, g = self.totals()
        out = group_of_class == group
        n, s = n.copy(), s.copy()
        n[out], s[out] = 0.0, 0.0
        return n, s, g - self.h[group]


def reindex(stats: Stats, old: list[str], new: list[str]) -> Stats:
    """`stats` over the class list `new` (a superset of `old`, both sorted): classes new to it get zeros."""
    out = Stats.zeros(stats.folds, len(new), stats.dim, stats.groups)
    where = [new.index(c) for c in old]
    out.n[:, where], out.s[:, where], out.g[:], out.h[:] = stats.n, stats.s, stats.g, stats.h
    return out


def add_part(acc: Stats, uri: str, index: dict[str, int], fmap: FeatureMap,
             holdout: Holdout | None, group_of_class: np.ndarray, relabel: Relabel | None = None) -> None:
    """Add one part file's Training rows to `acc` in place (read a batch at a time, on an executor). Each (fold,
    group) cell's Gramian is computed once and added to both its fold's and its group's."""
    for batch in (relabel or Relabel()).batches(uri, ["id", "label", "split", "features"]):
        ids = batch.column(0).to_pylist()
        labels, splits = batch.column(1).to_pylist(), batch.column(2).to_pylist()
        keep = training_rows(ids, labels, splits, index, holdout)
        if not keep.any():
            continue
        x = fmap.apply(to_matrix(batch.column(3))[keep])
        y = np.array([index[lb] for lb, k in zip(labels, keep) if k])
        f = (relabel or Relabel()).fold_of([i for i, k in zip(ids, keep) if k], acc.folds)
        k = group_of_class[y]
        for fold in np.unique(f):
            rows = f == fold
            acc.n[fold] += np.bincount(y[rows], minlength=acc.n.shape[1])
            np.add.at(acc.s[fold], y[rows], x[rows])
            for group in np.unique(k[rows]):
                xc = x[rows & (k == group)]
                cell = xc.T @ xc
                acc.g[fold] += cell
                acc.h[group] += cell


def _packed_size(folds: int, classes: int, dim: int, groups: int) -> int:
    return folds * classes * (1 + dim) + (folds + groups) * dim * (dim + 1) // 2


def _pack(st: Stats) -> np.ndarray:
    """Counts, sums and the Gramians' upper triangles (they are symmetric: half the bytes to ship and add)."""
    iu = np.triu_indices(st.dim)
    return np.concatenate([st.n.ravel(), st.s.ravel(), *(g[iu] for g in st.g), *(h[iu] for h in st.h)])


def _unpack(v: np.ndarray, folds: int, classes: int, dim: int, groups: int) -> Stats:
    a, b = folds * classes, folds * classes * (1 + dim)
    tri = dim * (dim + 1) // 2
    grams = np.zeros((folds + groups, dim, dim))
    iu = np.triu_indices(dim)
    for i in range(folds + groups):
        grams[i][iu] = v[b + i * tri:b + (i + 1) * tri]
        grams[i] += np.triu(grams[i], 1).T
    return Stats(v[:a].reshape(folds, classes).copy(), v[a:b].reshape(folds, classes, dim).copy(), grams[:folds],
                 grams[folds:])


def sum_stats(spark: Any, files: list[str], classes: list[str], folds: int,
              fmap: FeatureMap, dim: int, holdout: Holdout | None, group_of_class: np.ndarray, groups: int,
              relabel: Relabel | None = None) -> Stats:
    """One pass over `files` on the executors: each task adds its parts into one Stats in place and ships it
    packed; the driver (or a tree, when many tasks) adds them (pipeline.sums.sum_per_task)."""
    index = {c: i for i, c in enumerate(classes)}

    def task(items: Any) -> np.ndarray:
        acc = Stats.zeros(folds, len(classes), dim, groups)
        for _pos, uri in items:
            add_part(acc, uri, index, fmap, holdout, group_of_class, relabel)
        return _pack(acc)

    if not files:
        return Stats.zeros(folds, len(classes), dim, groups)
    size = _packed_size(folds, len(classes), dim, groups)
    return _unpack(sum_per_task(spark, files, size, task), folds, len(classes), dim, groups)


# ---- kept under OUT/classifier/, so that the next train adds only the new parts --------------------------------

STATS_FILE = "stats.npz"


def fingerprint(settings: dict[str, Any]) -> str:
    """What the statistics depend on besides the rows: transform, folds, hold-out, embedding model."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def save(uri: str, stats: Stats, classes: list[str], parts: list[str], key: str) -> None:
    """Write the statistics with the class list, the parts they sum and their settings' fingerprint (one file,
    replaced whole)."""
    buf = io.BytesIO()
    meta = json.dumps({"classes": classes, "parts": parts, "fingerprint": key}, allow_nan=False)
    np.savez(buf, n=stats.n, s=stats.s, g=stats.g, h=stats.h, meta=np.frombuffer(meta.encode(), dtype=np.uint8))
    storage.write_bytes(uri, buf.getvalue())


def load(uri: str) -> tuple[Stats, list[str], list[str], str] | None:
    """(stats, classes, parts, fingerprint) of an earlier train, or None when there are none (or unreadable)."""
    try:
        data = storage.read_bytes(uri)
    except OSError:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            st = Stats(z["n"], z["s"], z["g"], z["h"] if "h" in z else np.zeros((0, *z["g"].shape[1:])))
            return st, meta["classes"], meta["parts"], meta["fingerprint"]
    except (ValueError, KeyError, OSError) as exc:
        log.warning("the statistics of the last train (%s) cannot be read (%s): computing them again", uri, exc)
        return None
