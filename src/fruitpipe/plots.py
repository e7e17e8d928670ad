"""Plots drawn by more than one floor: matplotlib on its file-only backend, the PCA scree plot (written by `run`
under OUT/pca/, drawn again by the report)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def load_plotting() -> Any:
    """matplotlib.pyplot on its file-only backend (Agg: no display needed); the first call imports it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scree_png(explained: np.ndarray, n_samples: int, k: int, show: int = 100) -> bytes:
    """Scree plot: per-component share (bars) and cumulative share (line), the chosen k marked."""
    plt = load_plotting()

    explained = np.asarray(explained, dtype=np.float64)
    cumulative = np.cumsum(explained)
    m = min(show, len(explained))
    xs = np.arange(1, m + 1)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.bar(xs, explained[:m] * 100, color="#4c72b0", label="per component")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance (%)")
    ax2 = ax.twinx()
    ax2.plot(xs, cumulative[:m] * 100, color="#dd8452", label="cumulative")
    ax2.set_ylabel("cumulative (%)")
    ax2.set_ylim(0, 100)
    ax2.axvline(k, color="gray", linestyle="--")
    ax2.annotate(f"k={k}: {cumulative[k - 1] * 100:.1f} %", (k, cumulative[k - 1] * 100),
                 textcoords="offset points", xytext=(6, -14))
    ax.set_title(f"PCA explained variance ({n_samples} embeddings, first {m} of {len(explained)} components)")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
