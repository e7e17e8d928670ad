"""The files of a fitted PCA under OUT/pca/: explained_variance.json, scree.png, components.npy, and another
output's basis read back for --pca-from."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from fruitpipe import jsonio, storage
from fruitpipe.errors import FruitpipeError
from fruitpipe.output import SUCCESS, RunDir
from fruitpipe.pipeline.reduce import PcaFit
from fruitpipe.plots import load_plotting as load_plotting
from fruitpipe.plots import scree_png


def variance_report(fit: PcaFit, k: int, variance: float | None) -> dict[str, object]:
    """The content of explained_variance.json."""
    return {
        "k": k,
        "selected_by": "variance" if variance is not None else "k",
        "target_variance": variance,
        "explained_at_k": float(fit.cumulative[k - 1]),
        "n_samples": fit.n_samples,
        "dim": int(fit.components.shape[0]),
        "per_component": [float(v) for v in fit.explained],
        "cumulative": [float(v) for v in fit.cumulative],
    }


def components_npy(components: np.ndarray) -> bytes:
    """The kept components (dim x k, float64) as .npy bytes; load with numpy.load."""
    buf = io.BytesIO()
    np.save(buf, components)
    return buf.getvalue()


def write_pca_artifacts(pca_uri: str, fit: PcaFit, k: int, variance: float | None,
                        fingerprint: dict[str, object]) -> dict[str, object]:
    """explained_variance.json, scree.png and components.npy under `pca_uri`; returns the report."""
    report = variance_report(fit, k, variance)
    report["fingerprint"] = fingerprint
    raw = components_npy(fit.components[:, :k])
    # The basis's fingerprint is the sha256 of components.npy: what --pca-from of a later run records.
    report["basis"] = {"from": "fitted on this output", "fingerprint": hashlib.sha256(raw).hexdigest()}
    storage.write_bytes(storage.join(pca_uri, "explained_variance.json"),
                        jsonio.dumps(report, indent=2).encode())
    storage.write_bytes(storage.join(pca_uri, "scree.png"), scree_png(fit.explained, fit.n_samples, k))
    storage.write_bytes(storage.join(pca_uri, "components.npy"), raw)
    return report


@dataclass(frozen=True)
class Basis:
    """A PCA fitted by another output (--pca-from): its components, its explained_variance.json, where it came
    from and its fingerprint (sha256 of components.npy's bytes)."""

    components: np.ndarray
    report: dict[str, Any]
    source: str
    fingerprint: str


def load_basis(other: str, model_sha256: str, dim: int | None,
               what: str = "--pca-from") -> Basis:
    """The committed PCA of output `other` (named `what` in messages), checked to come from the same embedding model
    and, when `dim` is given, to have that many rows; FruitpipeError with the fix otherwise."""
    other = storage.normalize(other)
    rundir = RunDir(other)
    if rundir.read_marker() is None or not storage.exists(rundir.join(SUCCESS)) \
            or rundir.reduce_entry() is None:
        raise FruitpipeError(f"{what} {other} is not a complete output with a PCA: point it at an OUTPUT "
                             "that `fruitpipe run` or `fruitpipe reduce` finished")
    theirs = (rundir.read_marker() or {}).get("model_sha256")
    if theirs != model_sha256:
        raise FruitpipeError(f"{what} {other} was fitted on embeddings of another model ({str(theirs)[:12]}... "
                             f"instead of {model_sha256[:12]}...): its basis does not apply; use an output of the "
                             "same model")
    raw = storage.read_bytes(storage.join(other, "pca", "components.npy"))
    components = np.load(io.BytesIO(raw))
    if components.ndim != 2 or (dim is not None and components.shape[0] != dim):
        raise FruitpipeError(f"{what} {other}: pca/components.npy has shape {components.shape}, expected "
                             f"({dim or 'dim'}, k): re-run `fruitpipe reduce {other}`")
    report = json.loads(storage.read_bytes(storage.join(other, "pca", "explained_variance.json")))
    return Basis(components, report, other, hashlib.sha256(raw).hexdigest())


def write_basis_artifacts(pca_uri: str, basis: Basis, n_samples: int, measured: np.ndarray,
                          fingerprint: dict[str, object]) -> dict[str, object]:
    """pca/ of an output projected with another output's basis: the same components.npy and scree.png, and an
    explained_variance.json that keeps the basis's curve and adds the variance shares measured on this output's
    embeddings (`measured_on_this_output`)."""
    k = int(basis.components.shape[1])
    report = dict(basis.report)
    report.update({
        "k": k, "selected_by": "pca_from",
        "basis": {"from": basis.source, "fingerprint": basis.fingerprint, "n_samples": basis.report.get("n_samples")},
        "n_samples": n_samples,
        "measured_on_this_output": {"per_component": [float(v) for v in measured],
                                    "explained_at_k": float(np.sum(measured))},
        "fingerprint": fingerprint,
    })
    storage.write_bytes(storage.join(pca_uri, "explained_variance.json"), jsonio.dumps(report, indent=2).encode())
    explained = np.asarray(basis.report.get("per_component") or measured, dtype=np.float64)
    storage.write_bytes(storage.join(pca_uri, "scree.png"),
                        scree_png(explained, int(basis.report.get("n_samples") or n_samples), k))
    storage.write_bytes(storage.join(pca_uri, "components.npy"), components_npy(basis.components))
    return report


def load_components(pca_uri: str) -> np.ndarray:
    """The fitted model's components (dim x k) written by a run, for projecting new embeddings."""
    return np.load(io.BytesIO(storage.read_bytes(storage.join(pca_uri, "components.npy"))))
