"""The default classifier of `fruitpipe train`: statistics summed on the executors (kept, and extended with new
parts only), a linear model solved by numpy on the driver, chosen and calibrated by cross-validation over folds
obtained by subtraction, the PCA comparison from the same statistics, and the test rows scored on the executors."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fruitpipe.classify import groups, linear, metrics, openset, scoring, stats
from fruitpipe.classify.export import Head
from fruitpipe.classify.metrics import top_k
from fruitpipe.classify.sources import Relabel
from fruitpipe.errors import FruitpipeError
from fruitpipe.pipeline.reduce import choose_k
from fruitpipe.vectors import to_matrix

log = logging.getLogger(__name__)

#: The default feature transform: chosen on the shared sample (docs/performance.md, "train"): square root then L2
#: norm gave the best or equal Test top-1 of the four tried and the best real-photo family accuracy at every
#: regularisation; never chosen on Test alone.
DEFAULT_TRANSFORM = "sqrt_l2"
#: The statistics' format: bumped when what they sum changes, so kept statistics of another version are redone.
STATS_VERSION = 2  # 2: Gramians per species group (open-set threshold)


@dataclass
class OnePass:
    """What the fit produced: the head to export, the test rows and their probabilities, metrics pieces."""

    head: Head
    classes: list[str]
    uris: list[str]
    y: np.ndarray
    proba: np.ndarray
    unseen: int
    n_train: int
    test_source: str
    cross_validation: dict[str, Any]
    calibration: dict[str, Any]
    pca_table: list[dict[str, Any]]
    statistics: dict[str, Any]
    timings: dict[str, float]
    #: Each class's species name (aligned with `classes`) and the "not sure" threshold with its measurements.
    species: list[str]
    open_set: dict[str, Any]
    #: With --also: the other sources, their label maps and their photos' cross-validated top-1.
    sources: dict[str, Any]
    #: With --also-val: each held-out output's photos scored by the final classifier (never in any fit).
    held_out: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: With --also: the label maps with the other sources' near-copy folds (what --finetune holds a fold of out).
    relabel: Relabel | None = None


class OnePassError(FruitpipeError):
    """The one-pass classifier cannot be fitted on this output; the message says why."""


def _statistics(spark: Any, files: list[str], classes: list[str], folds: int,
                fmap: stats.FeatureMap, dim: int, holdout: stats.Holdout | None, stats_uri: str, key: str,
                relabel: Relabel) -> tuple[stats.Stats, dict[str, Any]]:
    """The statistics of `files`: the kept ones plus the new parts' when the kept ones still apply, else one full
    pass (and why)."""
    groups = openset.groups_of(classes)
    kept = stats.load(stats_uri)
    reason = "no statistics kept from an earlier train"
    if kept is not None:
        old, old_classes, old_parts, old_key = kept
        dropped = sorted(set(old_parts) - set(files))
        if old_key != key:
            reason = "the kept statistics were made with other settings (transform, folds, hold-out or model)"
        elif dropped:
            reason = (f"{len(dropped)} part(s) the kept statistics sum are gone from the output (photos deleted or "
                      "changed)")
        elif not set(old_classes) <= set(classes):
            reason = "a class of the kept statistics is gone"
        elif old.dim != dim or old.folds != folds or old.groups != openset.GROUPS:
            reason = "the kept statistics have another shape"
        else:
            new = [f for f in files if f not in set(old_parts)]
            total = stats.reindex(old, old_classes, classes)
            if new:
                total = total + stats.sum_stats(spark, new, classes, folds, fmap, dim, holdout,
                                                groups, openset.GROUPS, relabel)
            log.info("statistics: %d kept part(s) reused, %d new part(s) read", len(old_parts), len(new))
            return total, {"mode": "incremental", "parts_reused": len(old_parts), "parts_read": len(new)}
    log.info("statistics: one pass over %d part(s) (%s)", len(files), reason)
    return (stats.sum_stats(spark, files, classes, folds, fmap, dim, holdout, groups, openset.GROUPS,
                            relabel),
            {"mode": "full", "parts_read": len(files), "why": reason})


def _choose(cv: dict[str, np.ndarray]) -> tuple[int, int, dict[str, Any]]:
    """The candidate with the lowest cross-validated log-loss at its best temperature (a proper score: it still
    separates candidates where accuracy saturates near 100 % on Fruits-360), and that temperature."""
    n = float(cv["counts"].sum())
    if n == 0:
        raise OnePassError("no Training row could be scored by cross-validation: every class has all its photos in "
                           "one fold; add photos or lower --folds")
    nll = cv["nll"] / n
    best_t = np.argmin(nll, axis=1)
    m = int(np.argmin(nll[np.arange(len(best_t)), best_t]))
    tried = {c.name: {"accuracy": round(float(cv["right"][i] / n), 5),
                      "log_loss": round(float(nll[i, best_t[i]]), 5),
                      "temperature": round(linear.TEMPERATURES[int(best_t[i])], 4)}
             for i, c in enumerate(linear.CANDIDATES)}
    return m, int(best_t[m]), {"param": "model", "tried": tried, "chosen": linear.CANDIDATES[m].name,
                               "rows": int(n), "rows_of_classes_absent_from_their_fold_fit": int(cv["skipped"][0])}


def _grouped(relabel: Relabel, files: list[str], fmap: stats.FeatureMap,
             folds: int) -> Relabel:
    """`relabel` with the other sources' photos in folds of near-copy groups (classify.groups): their features are
    read on the driver (real photos: thousands, not the main output's hundreds of thousands)."""
    ids: list[str] = []
    labels: list[str] = []
    feats: list[np.ndarray] = []
    for uri in files:
        for batch in relabel.batches(uri, ["id", "label", "features"]):
            lbs = batch.column(1).to_pylist()
            keep = np.array([lb is not None for lb in lbs], bool)
            if keep.any():
                ids += [i for i, k in zip(batch.column(0).to_pylist(), keep) if k]
                labels += [lb for lb, k in zip(lbs, keep) if k]
                feats.append(fmap.apply(to_matrix(batch.column(2))[keep]))
    if not ids:
        return relabel
    got = groups.grouped_folds(ids, labels, np.concatenate(feats), folds)
    log.info("other sources: %d photos in %d near-copy groups (largest %d), dealt whole to %d folds", len(ids),
             got.groups, got.largest, folds)
    return dataclasses.replace(relabel, grouping=got)


def cap_folds(folds: int, training: dict[str, int]) -> int:
    """--folds, lowered (with a warning) to the smallest class's Training photo count, 2 at least: more folds
    than photos leave folds without the class, whose scores are then undefined."""
    if not training:
        return folds
    smallest = min(training, key=lambda c: training[c])
    if training[smallest] >= folds:
        return folds
    capped = max(2, training[smallest])
    log.warning("--folds %d: class %r has %d Training photo(s); cross-validating with %d folds", folds, smallest,
                training[smallest], capped)
    return capped


@dataclass(frozen=True)
class FitData:
    """What one fit reads: embeddings part files, and how the other sources' labels map."""

    #: The embeddings parts: the output's own, then (with `relabel`) other sources' parts, read with their labels
    #: mapped (classify.sources).
    files: list[str]
    relabel: Relabel | None = None
    #: Parts of variants of the Training photos (classify.augmented), added to the statistics and the
    #: cross-validation at FitPlan.augment_weight per row, never scored as test rows nor in the open-set threshold.
    augmented: list[str] | None = None
    #: The label map and parts of outputs whose photos the fit never sees (photos taken apart: `--also-val`),
    #: scored by the final, calibrated model.
    held_out: tuple[Relabel, list[str]] | None = None


@dataclass(frozen=True)
class FitPlan:
    """How one fit runs: folds, held-out share, the features' map, where its statistics are kept."""

    folds: int
    holdout: float
    dim: int
    fmap: stats.FeatureMap
    compare_pca: bool
    #: The kept statistics (a re-run adds only the new parts' sums): OUTPUT/classifier/stats.npz.
    stats_uri: str
    model_sha256: str
    augment_weight: float = 0.0


def fit(spark: Any, data: FitData, plan: FitPlan, guard: Callable[[], None] | None = None) -> OnePass:
    """Fit, choose, calibrate and score the one-pass classifier on `data`'s embeddings. `guard` is called before
    the kept statistics are written (the lease check: a writer that lost it leaves no file)."""
    files, relabel, augmented, held_out = data.files, data.relabel or Relabel(), data.augmented, data.held_out
    folds, holdout, dim, fmap, stats_uri = plan.folds, plan.holdout, plan.dim, plan.fmap, plan.stats_uri
    model_sha256, augment_weight = plan.model_sha256, plan.augment_weight
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    seen = scoring.survey(spark, files, relabel)
    has_test = any(sp == "Test" for _, sp in seen.pairs)
    held = None if has_test else stats.Holdout.of(holdout, seen.last_held)
    labels = sorted({lb for lb, sp in seen.pairs if sp == "Training" and lb is not None})
    folds = cap_folds(folds, seen.training)
    if relabel.sources:
        relabel = _grouped(relabel, [f for f in files if relabel.source_of(f) is not None], fmap, folds)
    key = stats.fingerprint({"version": STATS_VERSION, "transform": fmap.kind, "folds": folds,
                             "holdout": held and held.key(),
                             "groups": openset.GROUPS, **({"sources": relabel.key()} if relabel.sources else {}),
                             "model": model_sha256, "projection": None if fmap.projection is None else
                             hashlib.sha256(np.ascontiguousarray(fmap.projection, np.float64).tobytes()).hexdigest()})
    st, how = _statistics(spark, files, labels, folds, fmap, dim, held, stats_uri, key, relabel)
    aug_uri = stats_uri.rsplit(".", 1)[0] + "-augmented.npz"
    aug_key = stats.fingerprint({"of": key, "augmented": sorted({f.rsplit("/", 2)[-2] for f in augmented or []})})
    st_aug, how_aug = _statistics(spark, augmented, labels, folds, fmap, dim, held, aug_uri, aug_key,
                                  relabel) if augmented else (None, {})
    timings["statistics"] = time.perf_counter() - t0
    n_all = st.n.sum(0)
    classes = [c for c, n in zip(labels, n_all) if n > 0]
    if len(classes) < 2:
        raise OnePassError(f"the output has {len(classes)} class with Training photos: a classifier needs two or more")
    if len(classes) < len(labels):  # every photo of a class held out: it cannot be learned
        keep = [labels.index(c) for c in classes]
        st = st.classes(keep)
        st_aug = st_aug.classes(keep) if st_aug is not None else None
    if guard is not None:
        guard()
    stats.save(stats_uri, st, classes, files, key)
    photos = st
    if st_aug is not None and augmented:
        stats.save(aug_uri, st_aug, classes, augmented, aug_key)
        st = st + st_aug.scaled(augment_weight)
        how = {**how, "augmented": {**how_aug, "rows": int(st_aug.n.sum()), "weight": augment_weight}}
    t1 = time.perf_counter()
    fold_models = [linear.solve_all(*st.totals(without=f)) for f in range(folds)]
    present = np.stack([st.totals(without=f)[0] > 0 for f in range(folds)])
    rows = scoring.Rows(classes, fmap, held, relabel)
    cv = scoring.cv_scores(spark, files, rows, folds, fold_models, present)
    if st_aug is not None and augmented:  # the variants count in the choice as in the fit: at their weight
        cv_aug = scoring.cv_scores(spark, augmented, rows, folds, fold_models, present)
        cv = {k: v + augment_weight * cv_aug[k] for k, v in cv.items()}
    m, t, cv_report = _choose(cv)
    temperature = linear.TEMPERATURES[t]
    chosen = linear.CANDIDATES[m]
    n, s, g = st.totals()
    final = linear.solve(chosen.family, n, s, g, [chosen.reg])[0]
    timings["cross_validate"] = time.perf_counter() - t1
    calibrated = [fm[m].scaled(temperature) for fm in fold_models]  # the chosen candidate of each fold fit
    other = [f for f in files if relabel.source_of(f) is not None]
    per_source = scoring.source_scores(spark, other, relabel, classes, fmap, folds, calibrated)
    held_scores = scoring.source_scores(spark, held_out[1], held_out[0], classes, fmap, 1,
                                        [final.scaled(temperature)]) if held_out and held_out[1] else {}
    t3 = time.perf_counter()
    species, species_names = openset.species_of(classes)
    group_of_class = openset.groups_of(classes)
    group_models: list[linear.Linear | None] = []
    for k in range(openset.GROUPS):
        nk, sk, gk = st.without_group(k, group_of_class)
        usable = (nk > 0).sum() >= 2 and (n[group_of_class == k] > 0).any()
        group_models.append(linear.solve(chosen.family, nk, sk, gk, [chosen.reg])[0].scaled(temperature)
                            if usable else None)
    known_hist, unknown_hist = scoring.openset_scores(
        spark, files, rows, calibrated, group_models, present, group_of_class, species, len(species_names))
    open_set = {**openset.choose(known_hist, unknown_hist),
                "species_groups_held_out": sum(m is not None for m in group_models)}
    timings["open_set"] = time.perf_counter() - t3
    t2 = time.perf_counter()
    basis, explained = linear.pca_basis(n, s, g)
    ks: list[tuple[int, str]] = []
    if plan.compare_pca:
        k95 = choose_k(explained, len(explained), 0.95)
        ks = [*((k, f"PCA-{k}") for k in (20, 50) if k < st.dim), (k95, "PCA variance 0.95")]
    extra = [linear.solve(chosen.family, n, s, g, [chosen.reg], basis[:, :k])[0] for k, _ in ks]
    uris, test_labels, logits, picks = scoring.test_scores(spark, files, rows, final, extra)
    timings["test"] = time.perf_counter() - t2
    index = {c: i for i, c in enumerate(classes)}
    y_all = np.array([index.get(lb, -1) for lb in test_labels], dtype=np.int64)
    known = y_all >= 0
    y = y_all[known]
    raw = linear.softmax(logits[known])
    proba = linear.softmax(logits[known] / temperature)
    table = []
    if plan.compare_pca:
        table.append({"features": "embeddings", "k": st.dim, "top1": round(top_k(proba, y, 1), 5)})
        for j, (k, why) in enumerate(ks):
            table.append({"features": why, "k": k, "explained_variance": round(float(explained[:k].sum()), 4),
                          "top1": round(float(np.mean(picks[known, j] == y)), 5) if len(y) else None})
    source = "the Test split" if has_test else (f"no Test split: {holdout:.0%} of Training held out by content id, "
                                                "each class keeping at least one Training photo (the same photos "
                                                "on every train)")
    unseen_conf = openset.confidence(linear.softmax(logits[~known] / temperature), species, len(species_names))
    open_set["test"] = openset.test_rates(open_set["threshold"],
                                          openset.confidence(proba, species, len(species_names)),
                                          np.argmax(proba, axis=1) == y if len(y) else np.zeros(0, bool), unseen_conf)
    calib = {"temperature": round(temperature, 4), "chosen_by": f"{folds}-fold cross-validated log-loss on Training",
             "test_before": metrics.calibration(raw, y), "test_after": metrics.calibration(proba, y)}
    head = Head(fmap.projection, [(final.w / temperature, final.b / temperature)], transform=fmap.kind)
    return OnePass(head=head, classes=classes, uris=[u for u, k in zip(uris, known) if k], y=y, proba=proba,
                   unseen=int((~known).sum()), n_train=int(photos.n.sum()), test_source=source,
                   cross_validation=cv_report, calibration=calib, pca_table=table,
                   statistics={**how, "classes": len(classes), "folds": folds, "transform": fmap.kind},
                   timings=timings, species=[species_names[i] for i in species], open_set=open_set,
                   sources={"also": relabel.describe(), "cross_validation": per_source,
                            **({"folds": relabel.grouping.describe()} if relabel.grouping else {})}
                   if relabel.sources else {},
                   held_out={root: {k.replace("cross_validated_", ""): v for k, v in r.items()}
                             for root, r in held_scores.items()},
                   relabel=relabel if relabel.sources else None)
