"""drift.html: the verdict, each test with its p-value and threshold, and self-contained plots (no network)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fruitpipe.report.parts import STYLE, escape, figure_png, png_img, table


def _plots(result: dict[str, Any], plot: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    per = result["tests"]["components"]["per_component"]
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    ks = [c["ks"] for c in per]
    drifted = set(result["tests"]["components"]["drifted_components"])
    ax.bar(range(1, len(ks) + 1), ks, color=["#c0392b" if i + 1 in drifted else "#4c72b0" for i in range(len(ks))])
    ax.axhline(result["settings"]["ks_min"], color="gray", linestyle="--", label="KS floor")
    ax.set_xlabel("PCA component (reference basis)")
    ax.set_ylabel("KS statistic")
    ax.legend()
    out.append(png_img(figure_png(fig), "KS statistic per component"))
    ref, cur = np.asarray(plot["reference"]), np.asarray(plot["current"])
    if ref.shape[1] >= 2:
        fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
        ax.scatter(ref[:, 0], ref[:, 1], s=6, alpha=0.5, label="reference", color="#4c72b0")
        ax.scatter(cur[:, 0], cur[:, 1], s=6, alpha=0.5, label="current", color="#dd8452")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend()
        out.append(png_img(figure_png(fig), "reference and current on the first two components"))
    if plot.get("ref_confidence") is not None:
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        bins = [i / 20 for i in range(21)]
        ax.hist(plot["ref_confidence"], bins=bins, alpha=0.6, density=True, label="reference", color="#4c72b0")
        ax.hist(plot["cur_confidence"], bins=bins, alpha=0.6, density=True, label="current", color="#dd8452")
        ax.set_xlabel("top-1 probability")
        ax.legend()
        out.append(png_img(figure_png(fig), "top-1 probability"))
    return out


def drift_html(result: dict[str, Any], plot: dict[str, Any]) -> str:
    """The page for one drift.json (`plot` holds the sampled 2-D points and confidences)."""
    verdict = "Drift detected" if result["drift"] else "No drift"
    rows = [[name, "DRIFT" if t["drift"] else "ok", f"{t['p_value']:.3g}", f"{t['statistic']:.4g}", t["test"]]
            for name, t in result["tests"].items()]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>fruitpipe drift: {verdict}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{escape(verdict)}</h1>",
             f"<p class='{'alert' if result['drift'] else ''}'>reference <code>{escape(result['reference']['output'])}"
             f"</code> ({result['reference']['sampled']} of {result['reference']['rows']} rows) against current "
             f"<code>{escape(result['current']['output'])}</code> ({result['current']['sampled']} of "
             f"{result['current']['rows']} rows), in the reference's PCA basis (k = {result['basis']['k']}); each "
             f"test at alpha {result['alpha_per_test']:.4g}, checked {escape(result['checked_at'])}</p>",
             "<section><h2>Tests</h2>", table(rows, ["test", "verdict", "p-value", "statistic", "method"]),
             "</section>"]
    rejects = result["tests"].get("rejects")
    if rejects and rejects["by_reason"]:
        parts += ["<section><h2>Reject rate by reason</h2>",
                  table([[r, f"{v['reference']:.2%}", f"{v['current']:.2%}", f"{v['change']:+.2%}"]
                         for r, v in rejects["by_reason"].items()], ["reason", "reference", "current", "change"]),
                  "</section>"]
    predictions = result["tests"].get("predictions")
    if predictions and predictions["largest_changes"]:
        parts += ["<section><h2>Predicted classes: largest changes</h2>",
                  table([[c["class"], f"{c['reference']:.2%}", f"{c['current']:.2%}"]
                         for c in predictions["largest_changes"]], ["class", "reference", "current"]), "</section>"]
    parts += ["<section><h2>Plots</h2>", *_plots(result, plot), "</section></body></html>"]
    return "\n".join(parts)
