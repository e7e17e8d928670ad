""""I am not sure": the confidence under which `serve` answers "not sure", chosen by cross-validation with whole
species held out of the fit (their statistics subtracted, no new pass), and how it does on Test."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from fruitpipe.classify.fruits import species_key, species_name

#: Species groups: each held-out fit is solved without every class of one group (a quarter of the species, on
#: average), so that its rows are photos of fruits the fit never saw. A species' group comes from a hash of its
#: name, so that it never changes when classes are added (the kept statistics stay valid).
GROUPS = 4
#: The confidence histograms summed on the executors bin -log10(1 - p), p the top species' probability, in
#: steps of 1/100 decade up to 12 decades: calibrated answers on Fruits-360 crowd between 0.99 and 1 - 1e-9, where
#: bins even in p would put them all in one. The threshold is one of the bins' edges.
DECADES, STEPS = 12, 100
BINS = DECADES * STEPS
#: The largest share of known-fruit photos (cross-validated) the threshold may send to "not sure". A shopper's
#: fruit is usually one the model knows: a "not sure" on it costs an answer. A product choice, fixed before any
#: measurement, not fitted to the sample.
MAX_KNOWN_UNSURE = 0.05
#: The highest threshold allowed: "not sure" must mean a probability a person reads as not sure. Above 0.99 the
#: calibrated probabilities differ by less than their calibration error (Test ECE ~0.01 on the sample), and there
#: Fruits-360's cross-validation is optimistic: its folds split the frames of one turntable video, so a known
#: photo's near-twin is in the fit. Measured on the sample, the unbounded rule chose 1 - 2e-8, which sent 3.3 % of
#: the cross-validated known photos to "not sure" but 11.8 % of the Test ones.
MAX_THRESHOLD = 0.99
#: The thresholds reported beside the chosen one (0.9, 0.99, ... 0.99999; bin edges), so that an app may choose
#: its own from the cross-validated shares.
TABLE_EDGES = tuple(range(STEPS, 6 * STEPS, STEPS))
#: Thresholds of the coverage tables on labelled photos (`evaluate`, train --also): the share of photos answered
#: (top species at or above it) and the accuracy of those answers; an app chooses its threshold from them.
COVERAGE_THRESHOLDS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def species_of(classes: list[str]) -> tuple[np.ndarray, list[str]]:
    """(index of each class's species, the species' readable names, sorted)."""
    keys = [species_key(c) for c in classes]
    order = sorted(set(keys))
    names = {k: species_name(c) for k, c in zip(keys, classes)}
    return np.array([order.index(k) for k in keys], dtype=np.int64), [names[k] for k in order]


def groups_of(classes: list[str], groups: int = GROUPS) -> np.ndarray:
    """Each class's group: that of its species (every variety of a fruit is held out together)."""
    return np.array([int(hashlib.sha256(species_key(c).encode()).hexdigest()[:8], 16) % groups for c in classes],
                    dtype=np.int64)


def species_proba(proba: np.ndarray, species: np.ndarray, n_species: int) -> np.ndarray:
    """Class probabilities summed over each species' classes (rows x species)."""
    out = np.zeros((proba.shape[0], n_species))
    np.add.at(out.T, species, proba.T)
    return out


def confidence(proba: np.ndarray, species: np.ndarray, n_species: int) -> np.ndarray:
    """The probability of the top species: what the threshold is compared with (an apple photo the model puts
    between two apple varieties is still a sure apple)."""
    if not len(proba):
        return np.zeros(0)
    return species_proba(proba, species, n_species).max(axis=1)


def _decades(conf: np.ndarray) -> np.ndarray:
    return -np.log10(np.clip(1.0 - conf, 10.0 ** -DECADES, 1.0))


def edge(j: int) -> float:
    """The probability at the lower edge of bin j."""
    return float(1.0 - 10.0 ** (-j / STEPS))


def histogram(conf: np.ndarray) -> np.ndarray:
    """Counts of confidences per bin of -log10(1 - p) (width 1 / STEPS; the last also holds every p closer to 1)."""
    j = np.floor(_decades(conf) * STEPS + 1e-9).astype(np.int64)
    return np.bincount(np.clip(j, 0, BINS - 1), minlength=BINS).astype(np.float64)


def choose(known: np.ndarray, unknown: np.ndarray) -> dict[str, Any]:
    """The threshold (a bin edge) that best separates known-species photos (above) from held-out-species photos
    (under) by Youden's J, among those that send at most MAX_KNOWN_UNSURE of the known ones to "not sure"."""
    n_known, n_unknown = float(known.sum()), float(unknown.sum())
    if n_known == 0 or n_unknown == 0:
        why = "no species could be held out (one species, or every held-out fit had fewer than two classes)" \
            if n_unknown == 0 else "no known-class row was scored"
        return {"threshold": None, "why": why}
    under_known = np.concatenate([[0.0], np.cumsum(known)]) / n_known  # share under edge j / BINS
    under_unknown = np.concatenate([[0.0], np.cumsum(unknown)]) / n_unknown
    table = [{"threshold": edge(j), "known_under": round(float(under_known[j]), 5),
              "unknown_above": round(float(1 - under_unknown[j]), 5)} for j in TABLE_EDGES]
    youden = under_unknown - under_known
    edges = np.array([edge(j) for j in range(BINS + 1)])
    allowed = (under_known <= MAX_KNOWN_UNSURE) & (edges <= MAX_THRESHOLD + 1e-12)
    j = int(np.argmax(np.where(allowed, youden, -np.inf)))  # the lowest edge among ties
    if youden[j] <= 0:
        return {"threshold": None,
                "why": "photos of held-out species were as confident as those of known ones: no threshold within "
                       f"the limits ({MAX_KNOWN_UNSURE:.0%} of known photos, {MAX_THRESHOLD}) separates them "
                       "(too few species to hold out?)",
                "cross_validation": {"known_rows": int(n_known), "unknown_rows": int(n_unknown)},
                "by_threshold": table}
    return {"threshold": edge(j), "measure": "the top species' probability (calibrated)",
            "chosen_by": f"cross-validation: known species from the fold fits, unknown ones from {GROUPS} fits "
                         f"each without a group of species; Youden's J with at most {MAX_KNOWN_UNSURE:.0%} of "
                         "known-species photos under it, "
                         f"at most {MAX_THRESHOLD}",
            "cross_validation": {"known_rows": int(n_known), "known_under": round(float(under_known[j]), 5),
                                 "unknown_rows": int(n_unknown),
                                 "unknown_above": round(float(1 - under_unknown[j]), 5)},
            "by_threshold": table}


def test_rates(threshold: float | None, known_conf: np.ndarray, right: np.ndarray,
               unseen_conf: np.ndarray) -> dict[str, Any]:
    """How the threshold does on the test rows: known-class photos under it, top-1 of those above it, and photos
    of classes absent from Training (when the Test split has some) above it."""
    if threshold is None:
        return {}
    sure = known_conf >= threshold
    out: dict[str, Any] = {"known_photos": int(len(known_conf)),
                           "known_under": round(float(np.mean(~sure)), 5) if len(sure) else None,
                           "top1_when_sure": round(float(np.mean(right[sure])), 5) if sure.any() else None}
    if len(unseen_conf):
        out.update({"unseen_class_photos": int(len(unseen_conf)),
                    "unseen_above": round(float(np.mean(unseen_conf >= threshold)), 5)})
    return out


#: The fine-tuned model's "not sure" threshold is chosen for the share of its answers that must be right on real
#: photos it never saw (a grouped fold held out of a first fine-tuning, classify.tuning): 97 %, issue 34's goal
#: for the app, fixed before any measurement. Its open-set threshold (species held out) would cost one more
#: fine-tuning per species group.
TARGET_RIGHT = 0.97
#: The first answers (surest first) whose share right is not judged: one wrong photo among the first few would
#: otherwise put the threshold near 1.
MIN_JUDGED = 20


def coverage(conf: np.ndarray, right: np.ndarray, thresholds: tuple[float, ...] = COVERAGE_THRESHOLDS
             ) -> list[dict[str, Any]]:
    """The coverage table of labelled photos: per threshold on the top species' probability `conf`, the share of
    photos answered (at or above it) and the share of those whose species answer was `right`."""
    conf, right = np.asarray(conf, np.float64), np.asarray(right, bool)
    return [{"threshold": float(t), "answered": round(float((conf >= t).mean()), 5) if len(conf) else None,
             "species_top1_of_answered": round(float(right[conf >= t].mean()), 5) if (conf >= t).any() else None}
            for t in thresholds]


def choose_by_precision(conf: np.ndarray, right: np.ndarray, target: float | None = None,
                        min_judged: int | None = None) -> dict[str, Any]:
    """The lowest top-species probability at which the answers given (photos at or above it) are at least `target`
    right, and stay so at every higher one: photos are taken from the surest down until the share right first
    falls under `target` (the first `min_judged` are not judged). `conf`, `right`: the held-out photos' top-species
    probability and whether the species answer was right. Defaults: TARGET_RIGHT and MIN_JUDGED."""
    target = TARGET_RIGHT if target is None else target
    min_judged = MIN_JUDGED if min_judged is None else min_judged
    conf, right = np.asarray(conf, np.float64), np.asarray(right, bool)
    n = len(conf)
    table = coverage(conf, right)
    if n < min_judged:
        return {"threshold": None, "why": f"{n} held-out real photos: fewer than {min_judged} to judge a share "
                                          "of right answers", "held_out": {"photos": n, "coverage": table}}
    order = np.argsort(-conf, kind="stable")
    share = np.cumsum(right[order]) / np.arange(1, n + 1)
    under = np.flatnonzero(share[min_judged - 1:] < target)
    answered = n if not len(under) else int(under[0]) + min_judged - 1
    if answered < min_judged:
        return {"threshold": None, "why": f"even the {min_judged} surest held-out real photos were under "
                                          f"{target:.0%} right", "held_out": {"photos": n, "coverage": table}}
    # between the last photo answered and the first one not (all answered: the least sure one's probability)
    low = conf[order[answered - 1]]
    threshold = low if answered == n else (low + conf[order[answered]]) / 2
    return {"threshold": round(float(threshold), 5), "measure": "the top species' probability",
            "chosen_by": f"the lowest at which at least {target:.0%} of the answers are right (and at every higher "
                         "one), on real photos held out of a first fine-tuning: a fold of near-copy groups",
            "held_out": {"photos": n, "answered": round(answered / n, 5),
                         "species_top1_of_answered": round(float(share[answered - 1]), 5), "coverage": table}}
