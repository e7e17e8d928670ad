"""Two-sample drift statistics (pure numpy/SciPy): per-component KS, MMD with a permutation p-value, rates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fruitpipe.errors import ConfigError
from fruitpipe.options import option


@dataclass(frozen=True)
class DriftSettings:
    """Thresholds of `fruitpipe drift`. Each test family gets alpha / (number of families) (Bonferroni), the KS
    family alpha / families / components, so the chance of a false alarm on identical distributions is <= alpha.
    A significant test counts as drift only when its effect size also passes its floor: with thousands of photos,
    differences too small to matter are significant (docs/drift.md measures both rates)."""

    alpha: float = option(0.01, help="false-alarm budget of the whole check, split over its tests (default "
                                     "%(default)s)")
    #: KS statistic (largest gap between the two CDFs) a component needs to count as drifted.
    ks_min: float = option(0.1, help="KS statistic a component needs to count as drifted (default %(default)s)")
    #: MMD^2 (RBF kernel, median bandwidth) needed for the multivariate test to count.
    mmd_min: float = option(0.01, help="MMD^2 floor (default %(default)s)")
    #: Change of the reject rate (share of listed inputs) needed to count.
    reject_rate_min: float = option(0.01, help="reject-rate change floor (default %(default)s)")
    #: Total-variation distance between predicted class frequencies needed to count.
    class_shift_min: float = option(0.1, help="total-variation floor of predicted class frequencies (default "
                                              "%(default)s)")
    #: Change of the mean top-1 probability needed to count.
    confidence_min: float = option(0.05, help="change of mean top-1 probability floor (default %(default)s)")
    #: Rows per side read from each output (chosen by content id: a deterministic, uniform sample).
    sample: int = option(2000, help="rows read per output (default %(default)s)")
    #: Rows per side of the MMD's kernel matrix, and its permutations.
    mmd_sample: int = option(500, help="rows per side in the MMD (default %(default)s)")
    permutations: int = option(1000, help="permutations of the MMD p-value (default %(default)s)")
    seed: int = option(7, help="seed of the permutations (default %(default)s)")

    def validate(self) -> DriftSettings:
        """One-line errors naming the flag."""
        if not 0 < self.alpha < 1:
            raise ConfigError(f"--alpha {self.alpha} must be between 0 and 1, e.g. 0.01")
        for name in ("sample", "mmd_sample", "permutations"):
            if getattr(self, name) < 10:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 10")
        return self


def components_test(ref: np.ndarray, cur: np.ndarray, alpha: float, ks_min: float) -> dict[str, Any]:
    """Kolmogorov-Smirnov per component (columns), p-values Bonferroni- and Benjamini-Hochberg-adjusted; drifted =
    adjusted p < alpha and statistic >= ks_min."""
    from scipy import stats

    k = ref.shape[1]
    result = stats.ks_2samp(ref, cur, axis=0)
    statistic = np.atleast_1d(result.statistic).astype(float)
    p = np.atleast_1d(result.pvalue).astype(float)
    bonferroni = np.minimum(p * k, 1.0)
    bh = stats.false_discovery_control(p) if k > 1 else p
    drifted = (bonferroni < alpha) & (statistic >= ks_min)
    return {
        "test": "Kolmogorov-Smirnov per PCA component, Bonferroni-adjusted",
        "p_value": float(bonferroni.min()),
        "statistic": float(statistic.max()),
        "drifted_components": [int(i) + 1 for i in np.flatnonzero(drifted)],
        "per_component": [{"component": i + 1, "ks": float(statistic[i]), "p_value": float(p[i]),
                           "p_bonferroni": float(bonferroni[i]), "p_bh": float(bh[i])} for i in range(k)],
        "drift": bool(drifted.any()),
    }


def _rbf_kernel(z: np.ndarray) -> tuple[np.ndarray, float]:
    """RBF kernel matrix of the pooled rows, bandwidth = median pairwise distance (the usual heuristic)."""
    sq = np.einsum("ij,ij->i", z, z)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)
    upper = d2[np.triu_indices_from(d2, k=1)]
    median = float(np.median(upper)) if upper.size else 1.0
    bandwidth2 = median if median > 0 else 1.0
    return np.exp(-d2 / bandwidth2), float(np.sqrt(bandwidth2))


def mmd_test(ref: np.ndarray, cur: np.ndarray, permutations: int, seed: int, alpha: float,
             mmd_min: float) -> dict[str, Any]:
    """Maximum mean discrepancy (biased V-statistic, RBF kernel) with a permutation p-value: the pooled rows are
    relabelled at random `permutations` times; p = (1 + #{MMD_perm >= MMD}) / (1 + permutations)."""
    rng = np.random.default_rng(seed)
    z = np.vstack([ref, cur]).astype(np.float64)
    m, n = len(ref), len(cur)
    kernel, bandwidth = _rbf_kernel(z)

    observed = np.r_[np.ones(m, bool), np.zeros(n, bool)]
    a = np.where(observed, 1.0 / m, -1.0 / n)
    stat = float(a @ kernel @ a)
    perms = np.empty((m + n, permutations), bool)
    for j in range(permutations):
        perms[:, j] = rng.permutation(observed)
    weights = np.where(perms, 1.0 / m, -1.0 / n)
    null = np.einsum("ij,ij->j", weights, kernel @ weights)  # every permutation in one matrix product
    p = float((1 + np.sum(null >= stat - 1e-12)) / (1 + permutations))
    return {
        "test": "MMD (RBF kernel, median bandwidth), permutation p-value",
        "p_value": p,
        "statistic": stat,
        "bandwidth": bandwidth,
        "rows_per_side": [m, n],
        "permutations": permutations,
        "null_quantile_95": float(np.quantile(null, 0.95)),
        "drift": bool(p < alpha and stat >= mmd_min),
    }


def rejects_test(ref: dict[str, Any], cur: dict[str, Any], alpha: float, rate_min: float) -> dict[str, Any]:
    """The reject rate of each output (rejected / listed), by reason; chi-square test of rejected vs embedded."""
    from scipy import stats

    def rates(counts: dict[str, Any]) -> tuple[int, int, dict[str, float]]:
        listed = int(counts.get("listed") or 0)
        rejected = int(counts.get("rejected") or 0)
        by_reason = {r: n / listed for r, n in (counts.get("rejects_by_reason") or {}).items()} if listed else {}
        return listed, rejected, by_reason

    (n_ref, r_ref, by_ref), (n_cur, r_cur, by_cur) = rates(ref), rates(cur)
    rate_ref = r_ref / n_ref if n_ref else 0.0
    rate_cur = r_cur / n_cur if n_cur else 0.0
    table = np.array([[r_ref, n_ref - r_ref], [r_cur, n_cur - r_cur]])
    if table[:, 0].sum() == 0 or table[:, 1].sum() == 0 or 0 in table.sum(axis=1):
        p = 1.0
    else:
        p = float(stats.chi2_contingency(table)[1])
    reasons = sorted(set(by_ref) | set(by_cur))
    return {
        "test": "chi-square, rejected vs embedded",
        "p_value": p,
        "statistic": rate_cur - rate_ref,
        "rate_reference": rate_ref,
        "rate_current": rate_cur,
        "by_reason": {r: {"reference": by_ref.get(r, 0.0), "current": by_cur.get(r, 0.0),
                          "change": by_cur.get(r, 0.0) - by_ref.get(r, 0.0)} for r in reasons},
        "drift": bool(p < alpha and abs(rate_cur - rate_ref) >= rate_min),
    }


def predictions_test(ref_p: np.ndarray, cur_p: np.ndarray, classes: list[str], alpha: float,
                     shift_min: float) -> dict[str, Any]:
    """Predicted class frequencies (top-1): chi-square test over the classes either side predicts, and their
    total-variation distance."""
    from scipy import stats

    ref_top = np.bincount(ref_p.argmax(axis=1), minlength=len(classes))
    cur_top = np.bincount(cur_p.argmax(axis=1), minlength=len(classes))
    used = (ref_top + cur_top) > 0
    table = np.vstack([ref_top[used], cur_top[used]])
    p = float(stats.chi2_contingency(table)[1]) if table.shape[1] > 1 else 1.0
    f_ref, f_cur = ref_top / max(1, ref_top.sum()), cur_top / max(1, cur_top.sum())
    tv = float(0.5 * np.abs(f_ref - f_cur).sum())
    order = np.argsort(-np.abs(f_cur - f_ref))[:10]
    return {
        "test": "chi-square on predicted class counts",
        "p_value": p,
        "statistic": tv,
        "total_variation": tv,
        "largest_changes": [{"class": classes[i], "reference": float(f_ref[i]), "current": float(f_cur[i])}
                            for i in order if f_ref[i] != f_cur[i]],
        "drift": bool(p < alpha and tv >= shift_min),
    }


def confidence_test(ref_p: np.ndarray, cur_p: np.ndarray, alpha: float, change_min: float) -> dict[str, Any]:
    """Mean top-1 probability of each side; KS test of their distributions."""
    from scipy import stats

    ref_c, cur_c = ref_p.max(axis=1), cur_p.max(axis=1)
    result = stats.ks_2samp(ref_c, cur_c)
    change = float(cur_c.mean() - ref_c.mean())
    return {
        "test": "Kolmogorov-Smirnov on top-1 probability",
        "p_value": float(result.pvalue),
        "statistic": change,
        "mean_reference": float(ref_c.mean()),
        "mean_current": float(cur_c.mean()),
        "drift": bool(result.pvalue < alpha and abs(change) >= change_min),
    }


def detect(ref: np.ndarray, cur: np.ndarray, settings: DriftSettings, ref_counts: dict[str, Any] | None = None,
           cur_counts: dict[str, Any] | None = None, ref_proba: np.ndarray | None = None,
           cur_proba: np.ndarray | None = None, classes: list[str] | None = None) -> dict[str, Any]:
    """Every test that the inputs allow, each at alpha / (number of tests run); drift = any of them drifted.
    `ref`/`cur` are rows in the reference's PCA basis."""
    planned = ["components", "multivariate"]
    if ref_counts is not None and cur_counts is not None:
        planned.append("rejects")
    if ref_proba is not None and cur_proba is not None and classes:
        planned += ["predictions", "confidence"]
    alpha = settings.alpha / len(planned)
    rng = np.random.default_rng(settings.seed)

    def sub(x: np.ndarray) -> np.ndarray:
        return x if len(x) <= settings.mmd_sample else x[np.sort(rng.choice(len(x), settings.mmd_sample, False))]

    tests: dict[str, Any] = {
        "components": components_test(ref, cur, alpha, settings.ks_min),
        "multivariate": mmd_test(sub(ref), sub(cur), settings.permutations, settings.seed, alpha, settings.mmd_min),
    }
    if "rejects" in planned:
        tests["rejects"] = rejects_test(ref_counts or {}, cur_counts or {}, alpha, settings.reject_rate_min)
    if "predictions" in planned:
        assert ref_proba is not None and cur_proba is not None and classes
        tests["predictions"] = predictions_test(ref_proba, cur_proba, classes, alpha, settings.class_shift_min)
        tests["confidence"] = confidence_test(ref_proba, cur_proba, alpha, settings.confidence_min)
    return {"drift": any(t["drift"] for t in tests.values()), "alpha": settings.alpha,
            "alpha_per_test": alpha, "tests": tests}
