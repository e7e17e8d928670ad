"""Classification metrics from predicted probabilities (top-k, macro-F1, per class) and the confusion plot."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from fruitpipe.classify.openset import species_of, species_proba


def top_k(proba: np.ndarray, y: np.ndarray, k: int, answers: np.ndarray | None = None) -> float:
    """Share of rows whose true class is among the k most probable (`answers`: answers[t, p] when predicting p is
    right for true class t; default p == t)."""
    if len(y) == 0:
        return float("nan")
    k = min(k, proba.shape[1])
    best = np.argpartition(-proba, k - 1, axis=1)[:, :k]
    if answers is None:
        return float(np.mean(np.any(best == y[:, None], axis=1)))
    return float(np.mean(np.any(answers[y[:, None], best], axis=1)))


def answers_for(classes: list[str], maps_to: dict[str, list[str]] | None) -> np.ndarray | None:
    """answers[t, p]: predicting class p is right for a photo of class t. A class learned from other photos (train
    --also) answers for the Fruits-360 classes it stands for, as `evaluate` counts it. None without such classes."""
    if not maps_to:
        return None
    index = {c: i for i, c in enumerate(classes)}
    got = np.eye(len(classes), dtype=bool)
    for c, stands_for in maps_to.items():
        for t in stands_for:
            if c in index and t in index:
                got[index[t], index[c]] = True
    return got


def confusion(y: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """n x n counts: rows the true class, columns the predicted one."""
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (y, pred), 1)
    return m


def report(proba: np.ndarray, y: np.ndarray, classes: list[str],
           maps_to: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """top-1, top-5, macro-F1 and per-class precision/recall/F1/support (classes with no test row are left out of
    the macro average and say so). A prediction of a `maps_to` class is right for the classes it stands for."""
    answers = answers_for(classes, maps_to)
    pred = np.argmax(proba, axis=1)
    if answers is not None and len(y):
        pred = np.where(answers[y, pred], y, pred)  # counted as the true class it answers for
    m = confusion(y, pred, len(classes))
    tp = np.diag(m).astype(np.float64)
    support = m.sum(axis=1)
    predicted = m.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    present = support > 0
    # The species answer (probabilities summed over a species' classes: what serve and the page say first) is
    # right when it is the true class's species: "Apple Red 2" for an "Apple Red 1" photo is a right apple.
    species, names = species_of(classes)
    species_top1 = (float(np.mean(species_proba(proba, species, len(names)).argmax(axis=1) == species[y]))
                    if len(y) else float("nan"))
    return {
        "top1": round(top_k(proba, y, 1, answers), 5),
        "species_top1": round(species_top1, 5),
        "species": len(names),
        "top5": round(top_k(proba, y, 5, answers), 5),
        "macro_f1": round(float(f1[present].mean()), 5) if present.any() else float("nan"),
        "classes_without_test_rows": [c for c, p in zip(classes, present) if not p],
        "per_class": {c: {"precision": round(float(precision[i]), 4), "recall": round(float(recall[i]), 4),
                          "f1": round(float(f1[i]), 4), "support": int(support[i])}
                      for i, c in enumerate(classes)},
    }


#: Equal-width confidence bins of the expected calibration error (the usual 15).
ECE_BINS = 15


def calibration(proba: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Expected calibration error (top-1 confidence against accuracy, ECE_BINS equal-width bins, weighted by rows),
    log-loss (natural log) and the mean top-1 confidence of right and wrong answers."""
    if len(y) == 0:
        return {"ece": None, "log_loss": None, "bins": ECE_BINS, "rows": 0}
    conf = proba.max(axis=1)
    right = np.argmax(proba, axis=1) == y
    bins = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1)
    ece = 0.0
    for b in range(ECE_BINS):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(right[sel].mean() - conf[sel].mean())
    p_true = np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0)
    return {"ece": round(float(ece), 5), "log_loss": round(float(-np.log(p_true).mean()), 5), "bins": ECE_BINS,
            "rows": int(len(y)),
            "mean_confidence_right": round(float(conf[right].mean()), 5) if right.any() else None,
            "mean_confidence_wrong": round(float(conf[~right].mean()), 5) if (~right).any() else None}


def confusion_png(y: np.ndarray, pred: np.ndarray, classes: list[str], title: str) -> bytes:
    """The confusion matrix as a PNG, readable with 200+ classes: classes sorted by name, colour on a log scale,
    and only the off-diagonal cells (the mistakes) labelled with their counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    order = np.argsort(np.asarray(classes, dtype=object))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    m = confusion(rank[y], rank[pred], len(classes))
    names = [classes[i] for i in order]
    n = len(classes)
    side = min(40.0, max(6.0, 0.16 * n))
    font = max(2.5, min(9.0, 500.0 / max(n, 1)))
    fig, ax = plt.subplots(figsize=(side, side), dpi=150)
    shown = np.where(m > 0, m, np.nan)
    ax.imshow(shown, cmap="viridis", norm=LogNorm(vmin=1, vmax=max(1, int(m.max()))), interpolation="nearest")
    # parse_math=False: labels are folder names, drawn literally ("Kiwi $\\frac$ 1" once crashed the plot)
    ax.set_xticks(range(n), names, rotation=90, fontsize=font, parse_math=False)
    ax.set_yticks(range(n), names, fontsize=font, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, j in zip(*np.nonzero(m)):
        if i != j:
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="red", fontsize=font * 1.2,
                    fontweight="bold")
    ax.set_title(f"{title}\n{int(np.trace(m))} of {int(m.sum())} right, {int(m.sum() - np.trace(m))} mistakes "
                 "(labelled in red)", fontsize=9, parse_math=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
