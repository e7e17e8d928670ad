"""Linear classifiers solved on the driver from summed statistics (numpy, one d x d eigendecomposition per fit,
whatever the number of photos): shrinkage LDA and regularised least squares on one-hot targets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The two families and their regularisation grids, chosen between by cross-validation on Training only.
#: lda: shrinkage of the pooled within-class covariance toward its mean eigenvalue, lambda in [0, 1].
#: ridge: an L2 penalty of alpha times the mean eigenvalue of the centred Gramian.
GRIDS: dict[str, tuple[float, ...]] = {"lda": (1e-4, 1e-3, 1e-2, 0.1, 0.3), "ridge": (1e-3, 1e-2, 1e-1)}
#: Temperatures tried for calibration (softmax(logits / T)), log-spaced over a range wide enough for both families:
#: ridge scores are on a 0..1 scale (T well below 1), LDA log-likelihood ratios are often over-confident (T > 1).
TEMPERATURES = tuple(float(t) for t in np.logspace(-3, 2, 51))
#: The logit of a class with no Training row in a fit: never predicted, and finite (strict JSON, ONNX constants).
ABSENT = -1e4


@dataclass(frozen=True)
class Candidate:
    """One point of the grids: the family and its regularisation."""

    family: str
    reg: float

    @property
    def name(self) -> str:
        return f"{self.family}({self.reg:g})"


CANDIDATES = tuple(Candidate(f, r) for f, grid in GRIDS.items() for r in grid)


@dataclass(frozen=True)
class Linear:
    """logits = z @ w + b, z the transformed features (d), w d x classes."""

    w: np.ndarray
    b: np.ndarray

    def logits(self, z: np.ndarray) -> np.ndarray:
        return z @ self.w + self.b

    def scaled(self, temperature: float) -> Linear:
        """The same model with its logits divided by `temperature` (what the exported file computes)."""
        return Linear(self.w / temperature, self.b / temperature)


def _eigh(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e, v = np.linalg.eigh((m + m.T) / 2)
    return np.clip(e, 0.0, None), v


def _lda(n: np.ndarray, s: np.ndarray, g: np.ndarray, regs: list[float]) -> list[Linear]:
    present = n > 0
    mu = np.zeros_like(s)
    mu[present] = s[present] / n[present, None]
    scatter = g - s[present].T @ (s[present] / n[present, None])  # g - sum_c n_c mu_c mu_c^T
    dof = max(n.sum() - present.sum(), 1.0)
    e, v = _eigh(scatter / dof)
    target = e.mean() if e.mean() > 0 else 1.0
    vt_mu = v.T @ mu.T
    out = []
    for lam in regs:
        w = v @ (vt_mu / ((1 - lam) * e + lam * target)[:, None])
        # Equal priors: a phone user's fruit is not more likely because Fruits-360 filmed it longer.
        b = -0.5 * np.einsum("dc,cd->c", w, mu)
        out.append(_mask(Linear(w, b), present))
    return out


def _ridge(n: np.ndarray, s: np.ndarray, g: np.ndarray, regs: list[float]) -> list[Linear]:
    present = n > 0
    total = n.sum()
    m = s.sum(0) / total
    centred = g - total * np.outer(m, m)
    xty = s.T - np.outer(m, n)  # centred X^T Y for one-hot Y
    e, v = _eigh(centred)
    scale = e.mean() if e.mean() > 0 else 1.0
    vt_xty = v.T @ xty
    out = []
    for alpha in regs:
        w = v @ (vt_xty / (e + alpha * scale)[:, None])
        out.append(_mask(Linear(w, n / total - m @ w), present))
    return out


def _mask(model: Linear, present: np.ndarray) -> Linear:
    w, b = model.w.copy(), model.b.copy()
    w[:, ~present] = 0.0
    b[~present] = ABSENT
    return Linear(w, b)


def solve(family: str, n: np.ndarray, s: np.ndarray, g: np.ndarray, regs: list[float],
          basis: np.ndarray | None = None) -> list[Linear]:
    """The models of `family` for each regularisation in `regs`, from class counts n, class sums s (classes x d)
    and the Gramian g; with `basis` (d x k), fitted on the projections z @ basis and mapped back to d inputs."""
    if basis is not None:
        s, g = s @ basis, basis.T @ g @ basis
    models = (_lda if family == "lda" else _ridge)(n, s, g, regs)
    if basis is not None:
        models = [Linear(basis @ m.w, m.b) for m in models]
    return models


def solve_all(n: np.ndarray, s: np.ndarray, g: np.ndarray) -> list[Linear]:
    """Every candidate of CANDIDATES, in order: one eigendecomposition per family."""
    out: list[Linear] = []
    for family, grid in GRIDS.items():
        out += solve(family, n, s, g, list(grid))
    return out


def pca_basis(n: np.ndarray, s: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(components d x d by decreasing variance, explained shares) of the features' total covariance, from the
    same statistics: the PCA comparison needs no pass of its own."""
    total = n.sum()
    m = s.sum(0) / total
    e, v = _eigh((g - total * np.outer(m, m)) / max(total - 1, 1.0))
    order = np.argsort(e)[::-1]
    e = e[order]
    return v[:, order], e / e.sum()


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log softmax, stable."""
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(z))
