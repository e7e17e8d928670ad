"""`fruitpipe drift REFERENCE_OUT CURRENT_OUT`: compare two outputs in the reference's PCA basis, write
drift.json and drift.html, and say whether drift passed the thresholds (a distinct exit code for schedulers)."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fruitpipe import jsonio, lease, storage
from fruitpipe.classify.export import read_head
from fruitpipe.classify.published import read_classifier
from fruitpipe.drift.html import drift_html
from fruitpipe.drift.stats import DriftSettings, detect
from fruitpipe.errors import FruitpipeError
from fruitpipe.output import CLASSIFIER, DRIFT, SUCCESS, RunDir, index_columns, read_part_index
from fruitpipe.pipeline.pca_files import load_basis
from fruitpipe.schemas import EMBEDDINGS_SCHEMA
from fruitpipe.vectors import to_matrix

log = logging.getLogger(__name__)

#: Exit code of `fruitpipe drift` when drift passed the thresholds (0: none; 2: an error; 130: interrupted).
DRIFT_EXIT_CODE = 3


class DriftError(FruitpipeError):
    """The current output cannot be compared (incomplete, too few embeddings)."""


@dataclass
class Side:
    """One output's sample: its embeddings, the same rows in the reference basis, classifier probabilities, and
    run.json's counts."""

    uri: str
    features: np.ndarray
    projected: np.ndarray
    n_rows: int
    counts: dict[str, Any]
    probabilities: np.ndarray | None = None


def _complete(uri: str, what: str) -> RunDir:
    rundir = RunDir(storage.normalize(uri))
    if not storage.exists(rundir.join(SUCCESS)):
        raise DriftError(f"{what} {uri} has no {SUCCESS}: run `fruitpipe run INPUT {uri}` to the end first")
    return rundir


def sample_rows(rundir: RunDir, n: int) -> tuple[np.ndarray, int]:
    """(features, rows in the output) of at most `n` embeddings, chosen by the smallest content ids: ids
    are sha256 of the bytes, so this is a uniform sample that is the same on every call. The ids are read one part
    file at a time and only the `n` smallest so far are kept, so the driver holds the sample and one part whatever
    the size of the output; then only the chosen rows' features are read."""
    best = index_columns(["id"], EMBEDDINGS_SCHEMA).empty_table()
    total = 0
    for uri in rundir.files("embeddings"):
        part = read_part_index(uri, ["id"], EMBEDDINGS_SCHEMA)
        total += part.num_rows
        best = pa.concat_tables([best, part])
        if best.num_rows > n:
            best = best.take(pc.select_k_unstable(best, n, [("id", "ascending")]))
    index = best.take(pc.sort_indices(best, [("id", "ascending")]))
    feats: list[np.ndarray] = []
    for name in sorted(set(index.column("_file").to_pylist())):
        rows = index.filter(pc.equal(index.column("_file"), name)).column("_row")
        table = storage.read_parquet_columns(rundir.join("embeddings", name), ["features"])
        feats.append(to_matrix(table.take(rows.combine_chunks()).column("features")).astype(np.float64))
    x = np.vstack(feats) if feats else np.zeros((0, 0))
    return x, total


def _classifier(rundir: RunDir) -> tuple[Any, list[str]] | None:
    uri = rundir.join(CLASSIFIER, "fruit_classifier.onnx")
    if not storage.exists(uri):
        return None
    return read_head(read_classifier(rundir.uri))


def compare(reference: str, current: str, settings: DriftSettings) -> dict[str, Any]:
    """Every drift test between two complete outputs made with the same embedding model; returns drift.json."""
    settings.validate()
    cur_dir = _complete(current, "CURRENT_OUT")
    cur_report = cur_dir.previous_report()
    # The reference's committed PCA, refused unless the output is complete, has one, and was embedded with the
    # current output's model; its fingerprint is the one run.json's pca.basis and --pca-from record.
    basis = load_basis(reference, str((cur_report.get("model") or {}).get("sha256")), None,
                       what="REFERENCE_OUT")
    components = basis.components
    ref_dir = RunDir(basis.source)
    ref_report = ref_dir.previous_report()
    sides = []
    non_finite = []
    for rundir, report in ((ref_dir, ref_report), (cur_dir, cur_report)):
        x, total = sample_rows(rundir, settings.sample)
        finite = np.isfinite(x).all(axis=1) if x.size else np.ones(len(x), bool)
        non_finite.append(int((~finite).sum()))  # broken data is a finding, not a SciPy traceback
        x = x[finite]
        if len(x) < 10:
            raise DriftError(f"{rundir.uri} has {len(x)} embeddings: drift needs at least 10 on each side")
        sides.append(Side(rundir.uri, x, x @ components, total, dict(report.get("counts") or {})))
    ref, cur = sides
    head = _classifier(ref_dir)
    classes: list[str] | None = None
    if head is not None:
        model, classes = head
        for side in sides:
            side.probabilities = model.probabilities(side.features)
    result = detect(ref.projected, cur.projected, settings, ref.counts, cur.counts, ref.probabilities,
                    cur.probabilities, classes)
    return {
        # Non-finite features in CURRENT (a model that overflows) are an alert by themselves.
        "drift": bool(result["drift"] or non_finite[1]),
        "non_finite_rows": {"reference": non_finite[0], "current": non_finite[1],
                            "note": "sampled rows with NaN or infinite features, left out of every test"},
        "reference": {"output": ref.uri, "rows": ref.n_rows, "sampled": len(ref.projected),
                      "run_id": ref_report.get("run_id")},
        "current": {"output": cur.uri, "rows": cur.n_rows, "sampled": len(cur.projected),
                    "run_id": cur_report.get("run_id")},
        "basis": {"k": int(components.shape[1]), "fingerprint": basis.fingerprint},
        "classifier": None if classes is None else {"classes": len(classes)},
        "settings": asdict(settings),
        "alpha_per_test": result["alpha_per_test"],
        "tests": result["tests"],
        "drifted_tests": [name for name, t in result["tests"].items() if t["drift"]],
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "_plot": {"reference": ref.projected[:, :2], "current": cur.projected[:, :2],
                  "ref_confidence": None if ref.probabilities is None else ref.probabilities.max(axis=1),
                  "cur_confidence": None if cur.probabilities is None else cur.probabilities.max(axis=1)},
    }


def summary(result: dict[str, Any]) -> str:
    """The one-screen summary printed by the command."""
    lines = [f"drift: {'YES' if result['drift'] else 'no'}  (reference {result['reference']['output']}, "
             f"{result['reference']['sampled']} of {result['reference']['rows']} rows; current "
             f"{result['current']['output']}, {result['current']['sampled']} of {result['current']['rows']} rows; "
             f"PCA k={result['basis']['k']}; each test at alpha {result['alpha_per_test']:.4g})"]
    bad = result.get("non_finite_rows") or {}
    if bad.get("reference") or bad.get("current"):
        lines.append(f"  non-finite    {'DRIFT' if bad.get('current') else 'ok':<6} {bad['reference']} reference and "
                     f"{bad['current']} current sampled rows hold NaN or infinite features (left out of the tests)")
    for name, test in result["tests"].items():
        extra = ""
        if name == "components":
            extra = f", drifted components: {test['drifted_components'][:10] or 'none'}"
        elif name == "rejects":
            extra = f", reject rate {test['rate_reference']:.2%} -> {test['rate_current']:.2%}"
        elif name == "confidence":
            extra = f", mean top-1 {test['mean_reference']:.3f} -> {test['mean_current']:.3f}"
        elif name == "predictions":
            extra = f", total variation {test['total_variation']:.3f}"
        lines.append(f"  {name:<13} {'DRIFT' if test['drift'] else 'ok':<6} p={test['p_value']:.3g} "
                     f"statistic={test['statistic']:.4g}{extra}")
    return "\n".join(lines)


def _check_writable(target: str) -> None:
    """Write and delete a probe file in `target`: a report directory that cannot take the report is one line."""
    probe = storage.join(target, f".fruitpipe-write-check-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except OSError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DriftError(f"--report-dir {target} cannot be written ({detail}): pass a folder you may write to") \
            from None


def run_drift(reference: str, current: str, settings: DriftSettings,
              report_dir: str | None = None) -> dict[str, Any]:
    """compare(), then drift.json and drift.html under `report_dir` (default CURRENT_OUT/drift/, written under
    CURRENT_OUT's lease); returns drift.json's content plus the URIs written."""
    target = storage.normalize(report_dir) if report_dir else storage.join(storage.normalize(current), DRIFT)
    if report_dir:
        _check_writable(target)  # before the comparison, not after it
    result = compare(reference, current, settings)
    plot = result.pop("_plot")
    body = jsonio.dumps(result, indent=2).encode()
    page = drift_html(result, plot).encode()

    def write() -> None:
        storage.write_bytes(storage.join(target, "drift.json"), body)
        storage.write_bytes(storage.join(target, "drift.html"), page)

    if report_dir:
        write()
    else:
        with lease.hold(storage.normalize(current), f"drift-{uuid.uuid4().hex[:8]}"):
            write()
    result["written"] = [storage.join(target, "drift.json"), storage.join(target, "drift.html")]
    return result


__all__ = ["DRIFT_EXIT_CODE", "DriftError", "DriftSettings", "compare", "run_drift", "sample_rows", "summary"]
