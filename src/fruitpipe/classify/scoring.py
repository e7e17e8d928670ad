"""The executor passes around the statistics: the labels an output holds, the held-out folds scored by every
candidate model at once (accuracy, and log-loss at every temperature), and the test rows' logits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from fruitpipe.classify import openset
from fruitpipe.classify.linear import TEMPERATURES, Linear, log_softmax, softmax
from fruitpipe.classify.sources import Relabel
from fruitpipe.classify.stats import FeatureMap, Holdout, holdout_order, training_rows
from fruitpipe.pipeline.frames import file_tasks, output_errors, over_files, part_batches
from fruitpipe.pipeline.sums import sum_over_parts
from fruitpipe.vectors import to_matrix


@dataclass(frozen=True)
class Survey:
    """What one pass over the parts' label columns tells: the distinct (label, split) pairs, each label's Training
    photo count and its Training photo that a hold-out takes last (stats.Holdout)."""

    pairs: set[tuple[str, str | None]]
    training: dict[str, int]
    last_held: dict[str, str]


def survey(spark: Any, files: list[str], relabel: Relabel | None = None) -> Survey:
    """The Survey of the parts, read on the executors (the id, label and split columns only)."""

    rl = relabel or Relabel()

    def read(items: Iterator[tuple[int, str]]) -> Iterator[pa.RecordBatch]:
        seen: set[tuple[str, str | None]] = set()
        count: dict[str, int] = {}
        top: dict[str, str] = {}
        for _pos, uri in items:
            for batch in rl.batches(uri, ["id", "label", "split"]):
                ids, lbs, sps = (batch.column(i).to_pylist() for i in range(3))
                seen.update(zip(lbs, sps))
                for i, lb, sp in zip(ids, lbs, sps):
                    if sp == "Training" and lb is not None:
                        count[lb] = count.get(lb, 0) + 1
                        if lb not in top or holdout_order(i) > holdout_order(top[lb]):
                            top[lb] = i
        yield pa.RecordBatch.from_pydict({"label": [p[0] for p in seen], "split": [p[1] for p in seen],
                                          "n": [count.get(p[0], 0) if p[1] == "Training" else 0 for p in seen],
                                          "top": [top.get(p[0]) if p[1] == "Training" else None for p in seen]})

    with output_errors():  # a few rows per task: deduplicated here rather than by a shuffle
        rows = over_files(spark, files, file_tasks(spark, len(files)), read,
                          "label string, split string, n long, top string").collect()
    training: dict[str, int] = {}
    last: dict[str, str] = {}
    for lb, sp, n, top in rows:
        if sp == "Training" and lb is not None and top is not None:
            training[lb] = training.get(lb, 0) + int(n)
            if lb not in last or holdout_order(top) > holdout_order(last[lb]):
                last[lb] = top
    return Survey({(r[0], r[1]) for r in rows}, training, last)


def content_ids(spark: Any, files: list[str], split: str | None = None) -> set[str]:
    """The content ids of the parts' rows (of one split only, when given), read on the executors."""

    def read(items: Iterator[tuple[int, str]]) -> Iterator[pa.RecordBatch]:
        for _pos, uri in items:
            for batch in part_batches(uri, ["id", "split"]):
                ids, sps = batch.column(0).to_pylist(), batch.column(1).to_pylist()
                yield pa.RecordBatch.from_pydict({"id": [i for i, sp in zip(ids, sps)
                                                         if split is None or sp == split]})

    with output_errors():
        return {r[0] for r in over_files(spark, files, file_tasks(spark, len(files)), read, "id string").collect()}


def labels(spark: Any, files: list[str], relabel: Relabel | None = None
           ) -> set[tuple[str, str | None]]:
    """The distinct (label, split) pairs of the parts."""
    return survey(spark, files, relabel).pairs


@dataclass(frozen=True)
class Rows:
    """Which rows a pass takes: Training rows (minus a hold-out) or the test rows (the Test split, or the
    hold-out of Training when there is none)."""

    classes: list[str]
    fmap: FeatureMap
    holdout: Holdout | None
    relabel: Relabel = field(default_factory=Relabel)


def _test_mask(ids: list[str], splits: list[str], rows: Rows) -> np.ndarray:
    if rows.holdout is None:
        return np.array([sp == "Test" for sp in splits], dtype=bool)
    return np.array([sp == "Training" for sp in splits], dtype=bool) & rows.holdout.mask(ids)


def cv_scores(spark: Any, files: list[str], rows: Rows, folds: int,
              models: list[list[Linear]], present: np.ndarray) -> dict[str, np.ndarray]:
    """Score every Training row with the models fitted without its fold (models[fold][m]): per candidate m the
    rows right and, per temperature, the summed negative log-likelihood. Rows of a class absent from their
    fold's fit (all its photos in one fold) are counted apart. One pass, whatever the number of candidates."""
    m_count, t_count = len(models[0]), len(TEMPERATURES)
    w = spark.sparkContext.broadcast(np.stack([np.stack([m.w for m in fm]) for fm in models]).astype(np.float32))
    b = spark.sparkContext.broadcast(np.stack([np.stack([m.b for m in fm]) for fm in models]))
    temps = np.asarray(TEMPERATURES)
    index = {c: i for i, c in enumerate(rows.classes)}

    def partial(_pos: int, uri: str) -> np.ndarray:
        wv, bv = w.value, b.value
        counts, skipped = np.zeros(folds), 0.0
        right, nll = np.zeros(m_count), np.zeros((m_count, t_count))
        for batch in rows.relabel.batches(uri, ["id", "label", "split", "features"]):
            ids, lbs = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            keep = training_rows(ids, lbs, batch.column(2).to_pylist(), index, rows.holdout)
            if not keep.any():
                continue
            z = rows.fmap.apply(to_matrix(batch.column(3))[keep])
            y = np.array([index[lb] for lb, k in zip(lbs, keep) if k])
            f = rows.relabel.fold_of([i for i, k in zip(ids, keep) if k], folds)
            for fold in np.unique(f):
                sel = (f == fold) & present[fold][y]
                skipped += float(np.sum((f == fold) & ~present[fold][y]))
                if not sel.any():
                    continue
                zf, yf = z[sel].astype(np.float32), y[sel]
                counts[fold] += len(yf)
                for m in range(m_count):
                    logits = (zf @ wv[fold, m]).astype(np.float64) + bv[fold, m]
                    right[m] += np.sum(np.argmax(logits, axis=1) == yf)
                    for t, temp in enumerate(temps):
                        nll[m, t] -= log_softmax(logits / temp)[np.arange(len(yf)), yf].sum()
        return np.concatenate([counts, [skipped], right, nll.ravel()])

    total = sum_over_parts(spark, files, folds + 1 + m_count + m_count * t_count, partial)
    w.unpersist()
    b.unpersist()
    return {"counts": total[:folds], "skipped": total[folds:folds + 1],
            "right": total[folds + 1:folds + 1 + m_count],
            "nll": total[folds + 1 + m_count:].reshape(m_count, t_count)}


def openset_scores(spark: Any, files: list[str], rows: Rows, fold_models: list[Linear],
                   group_models: list[Linear | None], present: np.ndarray, group_of_class: np.ndarray,
                   species: np.ndarray, n_species: int) -> tuple[np.ndarray, np.ndarray]:
    """Histograms (openset.BINS) of the top-species confidence of every Training row (a) scored by the fit
    without its fold, when its class is in that fit: known fruits, and (b) scored by the fit without its
    species' group: fruits that fit never saw. The models are the chosen one, calibrated. One pass."""
    folds = len(fold_models)
    usable = [m for m in group_models if m is not None]
    w = spark.sparkContext.broadcast(np.stack([m.w for m in [*fold_models, *usable]]).astype(np.float32))
    b = spark.sparkContext.broadcast(np.stack([m.b for m in [*fold_models, *usable]]))
    slot = {k: folds + i for i, k in enumerate(k for k, m in enumerate(group_models) if m is not None)}
    index = {c: i for i, c in enumerate(rows.classes)}

    def conf(z: np.ndarray, i: int, wv: np.ndarray, bv: np.ndarray) -> np.ndarray:
        p = softmax((z @ wv[i]).astype(np.float64) + bv[i])
        return openset.confidence(p, species, n_species)

    def partial(_pos: int, uri: str) -> np.ndarray:
        wv, bv = w.value, b.value
        known, unknown = np.zeros(openset.BINS), np.zeros(openset.BINS)
        for batch in rows.relabel.batches(uri, ["id", "label", "split", "features"]):
            ids, lbs = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            keep = training_rows(ids, lbs, batch.column(2).to_pylist(), index, rows.holdout)
            if not keep.any():
                continue
            z = rows.fmap.apply(to_matrix(batch.column(3))[keep]).astype(np.float32)
            y = np.array([index[lb] for lb, k in zip(lbs, keep) if k])
            f = rows.relabel.fold_of([i for i, k in zip(ids, keep) if k], folds)
            for fold in np.unique(f):
                sel = (f == fold) & present[fold][y]
                if sel.any():
                    known += openset.histogram(conf(z[sel], int(fold), wv, bv))
            k = group_of_class[y]
            for group in np.unique(k):
                if int(group) in slot:
                    unknown += openset.histogram(conf(z[k == group], slot[int(group)], wv, bv))
        return np.concatenate([known, unknown])

    total = sum_over_parts(spark, files, 2 * openset.BINS, partial)
    w.unpersist()
    b.unpersist()
    return total[:openset.BINS], total[openset.BINS:]


def test_scores(spark: Any, files: list[str], rows: Rows, final: Linear,
                extra: list[Linear]) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(uris, labels, logits of `final`, top-1 class of each `extra` model) of the test rows, on the executors;
    rows of classes absent from Training included (the caller counts them apart)."""
    models = [final, *extra]
    w = spark.sparkContext.broadcast(np.stack([m.w for m in models]).astype(np.float32))
    b = spark.sparkContext.broadcast(np.stack([m.b for m in models]))
    n_classes = len(rows.classes)

    def read(items: Iterator[tuple[int, str]]) -> Iterator[pa.RecordBatch]:
        wv, bv = w.value, b.value
        for _pos, uri in items:
            for batch in rows.relabel.batches(uri, ["id", "uri", "label", "split", "features"]):
                keep = _test_mask(batch.column(0).to_pylist(), batch.column(3).to_pylist(), rows)
                if not keep.any():
                    continue
                z = rows.fmap.apply(to_matrix(batch.column(4))[keep]).astype(np.float32)
                logits = (z @ wv[0]).astype(np.float64) + bv[0]
                picks = np.stack([np.argmax(z @ wv[i] + bv[i], axis=1) for i in range(1, len(wv))], axis=1) \
                    if len(wv) > 1 else np.zeros((len(z), 0), np.int32)
                idx = np.nonzero(keep)[0]
                yield pa.RecordBatch.from_pydict({
                    "uri": [batch.column(1)[int(i)].as_py() for i in idx],
                    "label": [batch.column(2)[int(i)].as_py() for i in idx],
                    "logits": [r.tobytes() for r in logits.astype(np.float64)],
                    "picks": [r.tobytes() for r in picks.astype(np.int32)]})

    with output_errors():
        out = over_files(spark, files, len(files), read,
                         "uri string, label string, logits binary, picks binary").collect()
    w.unpersist()
    b.unpersist()
    out.sort(key=lambda r: r[0])
    logits = np.array([np.frombuffer(r[2], np.float64) for r in out]).reshape(len(out), n_classes)
    picks = np.array([np.frombuffer(r[3], np.int32) for r in out]).reshape(len(out), len(extra))
    return [r[0] for r in out], [r[1] for r in out], logits, picks


def source_scores(spark: Any, files: list[str], relabel: Relabel, classes: list[str],
                  fmap: FeatureMap, folds: int, fold_models: list[Linear]) -> dict[str, Any]:
    """Each other source's photos scored by the fit without their fold (cross-validation: no photo is scored by
    a model that saw it; `fold_models` calibrated): per label the photos and the share whose top-1 is the label's
    class or a class it stands for; the app's species answer right (one of its classes stands for the label);
    and, per threshold on the top species' probability, the photos answered and those answered right (the
    coverage table to choose the app's "not sure" threshold). One pass over the other sources' parts only."""
    thresholds = np.array(openset.COVERAGE_THRESHOLDS)

    index = {c: i for i, c in enumerate(classes)}
    # the labels' classes the fit can answer right: its own class of photos, or a class it stands for (a held-out
    # output's labels may have no class of their own in the fit)
    added = sorted(c for c in relabel.maps_to if c in index or any(t in index for t in relabel.maps_to[c]))
    if not added or not files:
        return {}
    right = np.zeros((len(added), len(classes)), bool)
    for a, c in enumerate(added):
        for target in (c, *relabel.maps_to[c]):
            if target in index:
                right[a, index[target]] = True
    species, species_names = openset.species_of(classes)
    # right_species[a, s]: species s has a class that stands for added class a's label
    right_species = np.zeros((len(added), len(species_names)), bool)
    for a in range(len(added)):
        np.logical_or.at(right_species[a], species, right[a])
    width = 3 + 2 * len(thresholds)
    w = spark.sparkContext.broadcast(np.stack([m.w for m in fold_models]).astype(np.float32))
    b = spark.sparkContext.broadcast(np.stack([m.b for m in fold_models]))
    slot = {c: a for a, c in enumerate(added)}

    def partial(_pos: int, uri: str) -> np.ndarray:
        out = np.zeros((len(added), width))  # photos, right, species right, answered[t], answered right[t]
        for batch in relabel.batches(uri, ["id", "label", "features"]):
            lbs = batch.column(1).to_pylist()
            keep = np.array([lb in slot for lb in lbs], bool)
            if not keep.any():
                continue
            z = fmap.apply(to_matrix(batch.column(2))[keep]).astype(np.float32)
            a = np.array([slot[lb] for lb, k in zip(lbs, keep) if k])
            f = relabel.fold_of([i for i, k in zip(batch.column(0).to_pylist(), keep) if k], folds)
            for fold in np.unique(f):
                sel = f == fold
                p = softmax((z[sel] @ w.value[fold]).astype(np.float64) + b.value[fold])
                pred = np.argmax(p, axis=1)
                sp = openset.species_proba(p, species, len(species_names))
                rows = a[sel]
                ok = right_species[rows, np.argmax(sp, axis=1)]
                answered = sp.max(axis=1)[:, None] >= thresholds[None, :]
                np.add.at(out[:, 0], rows, 1)
                np.add.at(out[:, 1], rows, right[rows, pred])
                np.add.at(out[:, 2], rows, ok)
                np.add.at(out[:, 3:3 + len(thresholds)], rows, answered)
                np.add.at(out[:, 3 + len(thresholds):], rows, answered & ok[:, None])
        return out.ravel()

    total = sum_over_parts(spark, files, len(added) * width, partial).reshape(len(added), width)
    w.unpersist()
    b.unpersist()
    report: dict[str, Any] = {}
    for s in relabel.sources:
        names = sorted(set(s.classes.values()) & set(added))
        t = total[[slot[c] for c in names]]
        n = float(t[:, 0].sum())
        answered, answered_right = t[:, 3:3 + len(thresholds)].sum(0), t[:, 3 + len(thresholds):].sum(0)
        report[s.root] = {
            "photos": int(n), "cross_validated_top1": round(float(t[:, 1].sum() / n), 5) if n else None,
            "cross_validated_species_top1": round(float(t[:, 2].sum() / n), 5) if n else None,
            "coverage": [{"threshold": float(th), "answered": round(float(answered[i] / n), 5) if n else None,
                          "species_top1_of_answered": round(float(answered_right[i] / answered[i]), 5)
                          if answered[i] else None} for i, th in enumerate(thresholds)],
            "per_label": {lb: {"class": c, "stands_for": relabel.maps_to[c], "photos": int(total[slot[c], 0]),
                               "top1": round(float(total[slot[c], 1] / total[slot[c], 0]), 5)
                               if total[slot[c], 0] else None}
                          for lb, c in sorted(s.classes.items()) if c in slot}}
    return report
