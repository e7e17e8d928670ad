"""OUT/report.html: counts and rejects, stage timings, the scree curve, a 2-D PCA scatter by class and, when a
classifier exists, its metrics and confusion matrix; one file, images inlined as data: URIs, no script, no network."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fruitpipe import storage
from fruitpipe.output import CLASSIFIER, REPORT, RunDir
from fruitpipe.plots import scree_png
from fruitpipe.report.parts import STYLE as _STYLE
from fruitpipe.report.parts import escape as _e
from fruitpipe.report.parts import png_img as _png
from fruitpipe.report.parts import table as _table

log = logging.getLogger(__name__)

#: The scatter shows the most frequent classes only (a readable legend) and at most this many points per class.
SCATTER_CLASSES = 12
SCATTER_POINTS_PER_CLASS = 200
#: Example rejects shown per reason.
REJECT_EXAMPLES = 3

def _reject_examples(rundir: RunDir, reasons: set[str]) -> list[list[Any]]:
    """Up to REJECT_EXAMPLES rejects per reason, reading the rejects' part files a batch at a time until each reason
    has its examples (never the whole dataset, nor a whole part, at once)."""
    found: dict[str, list[list[Any]]] = {reason: [] for reason in reasons}

    def complete() -> bool:
        return all(len(v) >= REJECT_EXAMPLES for v in found.values())

    for uri in rundir.files("rejects"):
        fs, path = storage.resolve(uri, rundir.opts)
        with fs.open_input_file(path) as fh:  # a batch at a time: a part holds up to --partition-size rows
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=4096, columns=["uri", "reason", "detail"]):
                table = pa.Table.from_batches([batch])
                for reason, got in found.items():
                    if len(got) < REJECT_EXAMPLES:
                        rows = table.filter(pc.equal(table.column("reason"), reason)).slice(
                            0, REJECT_EXAMPLES - len(got))
                        got += [[reason, r["uri"], (r["detail"] or "")[:160]] for r in rows.to_pylist()]
                if complete():
                    break
        if complete():
            break
    return [row for reason in sorted(found) for row in found[reason]]


def _json(rundir: RunDir, *parts: str) -> dict[str, Any] | None:
    uri = rundir.join(*parts)
    if not storage.exists(uri, rundir.opts):
        return None
    return json.loads(storage.read_bytes(uri, rundir.opts))


def scatter_sample(rundir: RunDir, per_class: int = SCATTER_POINTS_PER_CLASS,
                   seed: int = 0) -> tuple[dict[str, int], dict[str, np.ndarray]] | None:
    """(images per class, up to `per_class` uniformly drawn (PC 1, PC 2) points per class) of the reduced vectors,
    read one part file at a time: each row gets a seeded random key and each class keeps its smallest keys, so the
    driver holds one file and the kept points whatever the number of rows. None without reduced vectors."""
    files = rundir.reduced_files()
    if not files:
        return None
    rng = np.random.default_rng(seed)
    codes: dict[str, int] = {}
    counts: dict[str, int] = {}
    kept_c, kept_k, kept_xy = np.empty(0, np.int64), np.empty(0), np.empty((0, 2), np.float32)
    for uri in files:
        table = storage.read_parquet(uri, rundir.opts, columns=["label", "pca"])
        if table.num_rows == 0:
            continue
        vectors = table.column("pca").combine_chunks()
        dim = len(vectors[0].as_py())
        if dim < 2:
            return None
        names, inverse, n = np.unique(np.asarray(table.column("label").to_pylist(), dtype=object),
                                      return_inverse=True, return_counts=True)
        for name, c in zip(names, n):
            counts[str(name)] = counts.get(str(name), 0) + int(c)
        local = np.array([codes.setdefault(str(name), len(codes)) for name in names], np.int64)
        xy = np.asarray(vectors.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)[:, :2]
        cls = np.concatenate([kept_c, local[inverse]])
        key = np.concatenate([kept_k, rng.random(len(xy))])
        pts = np.concatenate([kept_xy, xy])
        order = np.lexsort((key, cls))
        sorted_c = cls[order]
        first = np.r_[True, sorted_c[1:] != sorted_c[:-1]]
        start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
        keep = order[np.arange(len(order)) - start < per_class]
        kept_c, kept_k, kept_xy = cls[keep], key[keep], pts[keep]
    names_of = {v: k for k, v in codes.items()}
    return counts, {names_of[c]: kept_xy[kept_c == c] for c in np.unique(kept_c)}


def _scatter_png(rundir: RunDir) -> bytes | None:
    """The first two PCA components of the reduced vectors, coloured by class (the most frequent classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sample = scatter_sample(rundir)  # the committed files only
    if sample is None:
        return None
    counts, points = sample
    shown = sorted(counts, key=lambda name: (-counts[name], name))[:SCATTER_CLASSES]
    fig, ax = plt.subplots(figsize=(8, 6), dpi=100)
    for name in sorted(shown):
        ax.scatter(points[name][:, 0], points[name][:, 1], s=8, alpha=0.7, label=str(name))
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"first two principal components, {len(shown)} of {len(counts)} classes")
    for text in ax.legend(fontsize=7, markerscale=2, loc="best").get_texts():
        text.set_parse_math(False)  # class names drawn literally, "$" and all
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _evaluations(rundir: RunDir) -> list[dict[str, Any]]:
    """The `fruitpipe evaluate` results kept under classifier/evaluations/, by name."""
    folder = rundir.join(CLASSIFIER, "evaluations")
    if not storage.is_dir(folder, rundir.opts):
        return []
    out = []
    for uri, _ in sorted(storage.list_files(folder, rundir.opts)):
        if uri.endswith(".json"):
            try:
                out.append(json.loads(storage.read_bytes(uri, rundir.opts)))
            except ValueError:
                log.warning("report: %s is not JSON, left out", uri)
    return out


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.2%}"


def _real_photos(metrics: dict[str, Any]) -> list[str]:
    """The real-photo figures of a train with --also / --also-val: photos taken apart first (the honest figure),
    then the other sources' cross-validation in folds of near-copy groups, and the held-out coverage table."""
    held = {k: v for k, v in (metrics.get("held_out") or {}).items() if v.get("photos")}
    cv = (metrics.get("sources") or {}).get("cross_validation") or {}
    if not held and not cv:
        return []
    folds = (metrics.get("sources") or {}).get("folds") or {}
    rows = [[root, r["photos"], "taken apart, never fitted (--also-val)", _pct(r["species_top1"])]
            for root, r in held.items()]
    rows += [[root, r["photos"], f"{folds.get('folds', '?')}-fold cross-validation, near-copies on one side "
              f"({folds.get('groups', '?')} groups)", _pct(r["cross_validated_species_top1"])]
             for root, r in cv.items()]
    out = ["<h3>Real photos</h3>", _table(rows, ["photos of", "photos", "measured on", "species top-1"])]
    for root, r in held.items():
        out.append(f"<p>Answering only when sure, on {_e(root)} (share of photos answered, species top-1 of the "
                   "answers):</p>")
        out.append(_table([[c["threshold"], _pct(c["answered"]), _pct(c["species_top1_of_answered"])]
                           for c in r["coverage"]], ["threshold", "answered", "right of answered"]))
        if r.get("not_sure"):
            ns = r["not_sure"]
            out.append(f"<p>At the exported file's \"not sure\" threshold ({ns['threshold']:.3f}): "
                       f"{_pct(ns['answered'])} answered, {_pct(ns['species_top1_of_answered'])} of them right.</p>")
    return out


def build_report(rundir: RunDir) -> bytes:
    """The report of the output as it stands (run.json, rejects, pca/, reduced/, classifier/)."""
    run = rundir.previous_report()
    counts = run.get("counts", {})
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>fruitpipe report: "
             f"{_e(rundir.uri)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>fruitpipe report</h1><p><code>{_e(rundir.uri)}</code>, run {_e(run.get('run_id', '?'))} started "
             f"{_e(run.get('started_at', '?'))}; model {_e(run.get('model', {}).get('name', '?'))} "
             f"(sha256 {_e(str(run.get('model', {}).get('sha256', '?'))[:16])}...), fruitpipe "
             f"{_e(run.get('fruitpipe_version', '?'))}</p>"]
    rows = [[k, counts.get(k)] for k in ("listed", "embedded", "rejected", "accounted", "embedded_this_run",
                                         "skipped_already_done", "not_listed_anymore") if k in counts]
    rows += [[f"ignored: {k}", v] for k, v in (counts.get("ignored") or {}).items()]
    parts.append("<section id='counts'><h2>Counts</h2>" + _table(rows, ["what", "images"]))
    by_reason = counts.get("rejects_by_reason") or {}
    if by_reason:
        examples = _reject_examples(rundir, set(by_reason))
        parts.append(_table([[k, v] for k, v in sorted(by_reason.items())], ["reject reason", "images"]))
        parts.append("<h3>Example rejects</h3>" + _table(examples, ["reason", "uri", "detail"]))
    else:
        parts.append("<p>No rejects.</p>")
    parts.append("</section>")
    timings = run.get("timings_s") or {}
    parts.append("<section id='timings'><h2>Stage timings</h2>" + _table([[k, v] for k, v in timings.items()],
                                                                           ["stage", "seconds"]))
    throughput = run.get("throughput_img_s")
    if isinstance(throughput, dict) and throughput:
        parts.append("<p>Throughput: " + ", ".join(f"{_e(k)} {_e(v)} images/s" for k, v in throughput.items())
                     + ".</p>")
    parts.append("</section>")
    ev = _json(rundir, "pca", "explained_variance.json")
    parts.append("<section id='pca'><h2>PCA: explained variance</h2>")
    if ev:
        k = int(ev["k"])
        parts.append(f"<p>k = {k} ({_e(ev['selected_by'])}), {float(ev['explained_at_k']):.1%} of the variance, "
                     f"{ev['n_samples']} embeddings.</p>")
        parts.append(_png(scree_png(np.asarray(ev["per_component"]), int(ev["n_samples"]), k),
                          f"scree curve, k = {k} marked"))
    else:
        parts.append("<p>No PCA in this output.</p>")
    parts.append("</section><section id='scatter'><h2>PCA scatter by class</h2>")
    scatter = _scatter_png(rundir) if ev else None
    parts.append(_png(scatter, "first two principal components by class") if scatter else
                 "<p>No reduced vectors to plot.</p>")
    parts.append("</section>")
    metrics = _json(rundir, CLASSIFIER, "metrics.json")
    if metrics:
        parts.append("<section id='classifier'><h2>Classifier</h2>")
        parts.append(_table([[metrics["settings"]["classifier"], metrics["settings"]["features"],
                              f"{metrics['top1']:.2%}",
                              f"{metrics['species_top1']:.2%}" if "species_top1" in metrics else "-",
                              f"{metrics['top5']:.2%}", f"{metrics['macro_f1']:.4f}",
                              metrics["n_train"], metrics["n_test"], metrics["test_source"]]],
                            ["classifier", "features", "top-1", "species top-1", "top-5", "macro-F1", "train",
                             "test", "test set"]))
        aug = metrics.get("augmentation")
        if aug:
            parts.append(f"<p>Also fitted on {aug['rows_in_fit']} phone-like variants ({aug['variants_per_photo']} "
                         f"per Training photo, weight {aug['weight']}, seed {aug['seed']}; not counted as photos)."
                         "</p>")
        parts += _real_photos(metrics)
        if metrics.get("pca_table"):
            parts.append(_table([[r["features"], r["k"], r.get("explained_variance", 1.0), f"{r['top1']:.2%}"]
                                 for r in metrics["pca_table"]], ["features", "k", "explained variance", "top-1"]))
        worst = sorted(metrics["per_class"].items(), key=lambda kv: (kv[1]["recall"], kv[0]))[:10]
        parts.append("<h3>Lowest recall</h3>" + _table(
            [[c, v["recall"], v["precision"], v["support"]] for c, v in worst],
            ["class", "recall", "precision", "support"]))
        confusion = rundir.join(CLASSIFIER, "confusion.png")
        if storage.exists(confusion, rundir.opts):
            parts.append(_png(storage.read_bytes(confusion, rundir.opts), "confusion matrix"))
        parts.append("</section>")
    evaluations = _evaluations(rundir)
    if evaluations:
        def pct(x: Any) -> str:
            return "-" if x is None else f"{x:.2%}"

        parts.append("<section id='evaluations'><h2>Evaluations on other photos</h2>")
        parts.append(_table([[e["name"], e["photos"], e["crop"], e["photos_scored"], pct(e["top1"]),
                              pct(e["species_top1"]), pct(e["top5"]), sum(e["rejected"].values())]
                             for e in evaluations],
                            ["name", "photos", "crop", "scored", "top-1", "species top-1", "top-5", "rejected"]))
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "".join(parts).encode()


def write_report(rundir: RunDir) -> str | None:
    """Write OUT/report.html; a report that cannot be made is a warning, never a failed run."""
    try:
        data = build_report(rundir)
    except Exception as exc:  # a plot or a missing file must not fail the run that already published
        log.warning("report.html not written: %s: %s", type(exc).__name__, exc)
        return None
    uri = rundir.join(REPORT)
    storage.write_bytes(uri, data, rundir.opts)
    return uri
