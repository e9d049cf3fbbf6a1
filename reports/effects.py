"""Effects of a study's swept factors, with their uncertainty and the power to see them.

For every swept factor and every metric, each level is compared with the factor's
baseline level (the first grid value, or ``baseline:`` in the spec) with the other
factors held fixed:

- **Paired by seed** where the two settings share seeds (grid replicates do): the
  differences d_s = m(level, s) - m(baseline, s) over the n shared seeds; mean, 95%
  t-interval mean ± t(0.975, n-1) · sd/√n, two-sided t-test p.
- **Unpaired** otherwise (no seed in common): Welch's difference of means, its
  Welch-Satterthwaite degrees of freedom, interval and p.
- **Pooled** over the other factors (``held = "pooled"``): per seed, the mean of that
  seed's paired differences over every combination of the other factors, then the
  t-interval over seeds; the seed stays the unit of replication.
- **Interaction** of two factors A and B (``factor = "A:B"``): whether the effect of
  A's level depends on B's level. Per seed, (effect of A at B = b) - (effect of A at
  B's baseline); t-interval over seeds, pooled over any third factor.

An effect is *resolved* when its 95% interval excludes 0. ``p_holm`` is Holm's
step-down correction over every comparison of the table. ``rel_diff`` (and the relative
interval) divides by the baseline's mean over the same seeds. Power, at α = 0.05
two-sided and 80% power: ``mde`` is the smallest true effect the comparison detects
with 80% probability at its n and observed spread (exact, from the noncentral t), and
``n_needed`` the number of seeds (per group, for unpaired) at which an effect of the
observed size would be detected with 80% power (NaN when the effect is 0 or cannot be
estimated). Where n >= 5 a percentile bootstrap over seeds cross-checks the interval.

Pure pandas/numpy/scipy; ``findings_frame(data)`` takes the loader's ``StudyData``,
``compare(frame, ...)`` any tidy frame (one row per trial).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, stats

ALPHA = 0.05
POWER = 0.8
BOOTSTRAP_MIN_N = 5
BOOTSTRAP_SAMPLES = 4000
MAX_N_NEEDED = 100_000
POOLED = "pooled"
COLUMNS = ["metric", "factor", "level", "baseline", "held", "n", "mean_diff", "rel_diff", "ci_low", "ci_high",
           "p", "p_holm", "resolved", "mde", "n_needed"]


# ------------------------------------------------------------------ one comparison
@dataclass(frozen=True)
class Estimate:
    """One difference with its interval: ``paired`` (one sample of differences) or
    Welch (two independent samples)."""

    n: int  # pairs (paired) or the smaller group (Welch)
    mean_diff: float
    base_mean: float
    se: float  # standard error of mean_diff (NaN when n is too small)
    df: float
    unit_sd: float  # spread of one unit: sd of the differences, or sqrt((s1² + s2²)/2)
    paired: bool
    boot: tuple[float, float] = (math.nan, math.nan)

    @property
    def ci(self) -> tuple[float, float]:
        if not self.se >= 0 or not self.df > 0:
            return math.nan, math.nan
        half = stats.t.ppf(1 - ALPHA / 2, self.df) * self.se
        return self.mean_diff - half, self.mean_diff + half

    @property
    def p(self) -> float:
        if not self.df > 0 or not self.se >= 0:
            return math.nan
        if self.se == 0:
            return 0.0 if self.mean_diff != 0 else 1.0
        return float(2 * stats.t.sf(abs(self.mean_diff) / self.se, self.df))

    @property
    def mde(self) -> float:
        """The smallest |effect| detected with 80% power at this n and spread."""
        return detectable(self.se, self.df)

    @property
    def n_needed(self) -> float:
        """Seeds (per group when unpaired) at which the observed effect would be
        detected with 80% power."""
        if not self.unit_sd >= 0 or self.mean_diff == 0 or math.isnan(self.mean_diff) or self.n < 2:
            return math.nan
        if self.unit_sd == 0:
            return 2.0
        effect = abs(self.mean_diff)
        found = lambda n: detectable(*self._se_df_at(n)) <= effect  # noqa: E731 (monotone in n)
        if not found(MAX_N_NEEDED):
            return math.inf
        lo, hi = 1, MAX_N_NEEDED  # found(hi), not found(lo) (n = 1 has no spread)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if found(mid) else (mid, hi)
        return float(hi)

    def _se_df_at(self, n: int) -> tuple[float, float]:
        if self.paired:
            return self.unit_sd / math.sqrt(n), n - 1.0
        return self.unit_sd * math.sqrt(2.0 / n), 2.0 * n - 2.0

    def row(self) -> dict:
        lo, hi = self.ci
        base = abs(self.base_mean) if self.base_mean else math.nan
        return {"n": self.n, "mean_diff": self.mean_diff, "rel_diff": self.mean_diff / base,
                "ci_low": lo, "ci_high": hi, "p": self.p,
                "resolved": bool(lo > 0 or hi < 0) if not math.isnan(lo) else False,
                "mde": self.mde, "n_needed": self.n_needed,
                "rel_ci_low": lo / base, "rel_ci_high": hi / base,
                "boot_low": self.boot[0], "boot_high": self.boot[1], "paired": self.paired,
                "base_mean": self.base_mean}


def mean_ci(values) -> tuple[int, float, float, float]:
    """(n, mean, low, high): the 95% t-interval of the mean of ``values`` (NaNs dropped;
    NaN bounds when n < 2)."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    n = len(v)
    if n == 0:
        return 0, math.nan, math.nan, math.nan
    mean = float(v.mean())
    if n < 2:
        return n, mean, math.nan, math.nan
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return n, mean, mean - half, mean + half


def detectable(se: float, df: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The true effect δ at which a two-sided t-test (standard error ``se``, ``df``
    degrees of freedom) rejects with probability ``power``: solves
    P(|T| > t_crit) = power for T ~ noncentral t(df, δ/se)."""
    if not (se > 0 and df > 0) or math.isnan(se):
        return 0.0 if se == 0 and df > 0 else math.nan
    crit = stats.t.ppf(1 - alpha / 2, df)

    def gap(nc: float) -> float:
        upper = stats.nct.sf(crit, df, nc)
        lower = stats.nct.cdf(-crit, df, nc)  # the wrong-sign rejections: tiny, NaN when negligible
        if math.isnan(upper):
            upper = stats.norm.sf(crit - nc)
        return upper + (0.0 if math.isnan(lower) else lower) - power

    hi = crit + stats.norm.ppf(power) + 1.0
    while gap(hi) < 0:
        hi *= 2
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-7) * se)


def paired(diffs: np.ndarray, base: np.ndarray, rng: np.random.Generator | None = None) -> Estimate:
    """Paired comparison from the per-seed differences and the baseline's values."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    sd = float(d.std(ddof=1)) if n >= 2 else math.nan
    boot = bootstrap(d, rng) if n >= BOOTSTRAP_MIN_N else (math.nan, math.nan)
    return Estimate(n=n, mean_diff=float(d.mean()) if n else math.nan, base_mean=float(np.mean(base)) if n else math.nan,
                    se=sd / math.sqrt(n) if n >= 2 else math.nan, df=n - 1.0, unit_sd=sd, paired=True, boot=boot)


def welch(level: np.ndarray, base: np.ndarray) -> Estimate:
    """Unpaired comparison of two independent samples (Welch)."""
    a, b = np.asarray(level, dtype=float), np.asarray(base, dtype=float)
    n1, n2 = len(a), len(b)
    diff = float(a.mean() - b.mean()) if n1 and n2 else math.nan
    if n1 < 2 or n2 < 2:
        return Estimate(min(n1, n2), diff, float(b.mean()) if n2 else math.nan, math.nan, math.nan, math.nan, False)
    v1, v2 = a.var(ddof=1) / n1, b.var(ddof=1) / n2
    se = math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1)) if se > 0 else n1 + n2 - 2.0
    unit = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    return Estimate(min(n1, n2), diff, float(b.mean()), se, float(df), unit, False)


def bootstrap(d: np.ndarray, rng: np.random.Generator | None = None) -> tuple[float, float]:
    """95% percentile interval of the mean of ``d``, resampling seeds."""
    rng = rng or np.random.default_rng(0)
    idx = rng.integers(0, len(d), size=(BOOTSTRAP_SAMPLES, len(d)))
    means = d[idx].mean(axis=1)
    return float(np.quantile(means, ALPHA / 2)), float(np.quantile(means, 1 - ALPHA / 2))


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN stays NaN and is not counted)."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


# ------------------------------------------------------------------ a table of comparisons
def compare(frame: pd.DataFrame, factors: Sequence[str], metrics: Sequence[str],
            baselines: Mapping[str, object] | None = None, seed: str = "seed",
            interactions: bool = True) -> pd.DataFrame:
    """Every comparison of a factorial study, one row each (``COLUMNS`` first, then
    helper columns: relative interval, bootstrap interval, paired, base_mean).

    ``frame``: one row per completed trial with the ``factors`` columns, ``seed`` and
    the ``metrics`` columns. ``baselines``: factor -> baseline level (default: the
    smallest level present, which is a grid's first value when it is sorted).
    """
    rows = []
    rng = np.random.default_rng(0)
    base_of = {f: _baseline(frame, f, baselines) for f in factors}
    for metric in metrics:
        have = frame[frame[metric].notna()] if metric in frame else frame.iloc[0:0]
        if have.empty:
            continue
        for f in factors:
            others = [o for o in factors if o != f]
            for level in _levels(have, f):
                if _same(level, base_of[f]):
                    continue
                rows += _simple_rows(have, metric, f, level, base_of[f], others, seed, rng)
        if interactions:
            for a, b in itertools.combinations(factors, 2):
                rows += _interaction_rows(have, metric, a, b, base_of, [o for o in factors if o not in (a, b)],
                                          seed, rng)
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=COLUMNS)
    out["p_holm"] = holm(out["p"].to_numpy())
    extra = [c for c in out.columns if c not in COLUMNS]
    return out[COLUMNS + extra]


def _simple_rows(have, metric, f, level, base, others, seed, rng) -> list[dict]:
    """The effect of f=level vs f=base at each combination of the others, and pooled."""
    rows, per_held = [], []
    groups = have.groupby(others, dropna=False, sort=True) if others else [((), have)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        lv, bv = _values(part, f, level, seed, metric), _values(part, f, base, seed, metric)
        if lv.empty or bv.empty:
            continue
        est = _estimate(lv, bv, rng)
        rows.append(_row(metric, f, level, base, _held(others, key), est))
        per_held.append((lv, bv))
    if len(per_held) > 1:  # pooled over the other factors: per-seed mean of the paired differences
        pooled = _pooled(per_held, rng)
        if pooled is not None:
            rows.append(_row(metric, f, level, base, POOLED, pooled))
    return rows


def _interaction_rows(have, metric, a, b, base_of, rest, seed, rng) -> list[dict]:
    """Does the effect of a (each level vs its baseline) depend on b (each level vs
    its baseline)? Per seed: effect at b=level minus effect at b=baseline."""
    rows = []
    a0, b0 = base_of[a], base_of[b]
    for la in _levels(have, a):
        for lb in _levels(have, b):
            if _same(la, a0) or _same(lb, b0):
                continue
            cells = {(x, y): _values(have[_is(have, b, y)], a, x, seed, metric, rest)
                     for x in (la, a0) for y in (lb, b0)}
            seeds = set.intersection(*(set(c.index) for c in cells.values()))
            if not seeds:
                continue
            s = sorted(seeds)
            contrast = (cells[(la, lb)][s] - cells[(a0, lb)][s]) - (cells[(la, b0)][s] - cells[(a0, b0)][s])
            est = paired(contrast.to_numpy(), cells[(a0, b0)][s].to_numpy(), rng)
            rows.append(_row(metric, f"{a}:{b}", f"{_fmt(la)}:{_fmt(lb)}", f"{_fmt(a0)}:{_fmt(b0)}",
                             POOLED if rest else "", est))
    return rows


def _values(part: pd.DataFrame, f: str, level, seed: str, metric: str, rest: Sequence[str] = ()) -> pd.Series:
    """The metric at f=level, one value per seed (averaged over ``rest`` factors and over
    repeated trials of one seed, e.g. a retried trial)."""
    sel = part[_is(part, f, level)]
    return sel.groupby(seed)[metric].mean()


def _estimate(lv: pd.Series, bv: pd.Series, rng) -> Estimate:
    shared = sorted(set(lv.index) & set(bv.index))
    if shared:
        return paired((lv[shared] - bv[shared]).to_numpy(), bv[shared].to_numpy(), rng)
    return welch(lv.to_numpy(), bv.to_numpy())


def _pooled(per_held: list[tuple[pd.Series, pd.Series]], rng) -> Estimate | None:
    diffs = pd.concat([lv - bv for lv, bv in per_held], axis=1)  # seeds x held, NaN where unpaired
    bases = pd.concat([bv for _, bv in per_held], axis=1)
    complete = diffs.dropna()
    if complete.empty:
        return None
    return paired(complete.mean(axis=1).to_numpy(), bases.loc[complete.index].mean(axis=1).to_numpy(), rng)


def _row(metric, f, level, base, held, est: Estimate) -> dict:
    return {"metric": metric, "factor": f, "level": _fmt(level), "baseline": _fmt(base), "held": held, **est.row()}


def _held(others: Sequence[str], key: tuple) -> str:
    return ";".join(f"{o}={_fmt(k)}" for o, k in zip(others, key))


def _levels(frame: pd.DataFrame, f: str) -> list:
    return sorted(frame[f].dropna().unique().tolist(), key=_sort_key)


def _baseline(frame: pd.DataFrame, f: str, baselines: Mapping[str, object] | None):
    if baselines and f in baselines:
        return baselines[f]
    levels = _levels(frame, f)
    return levels[0] if levels else None


def _is(frame: pd.DataFrame, f: str, level) -> pd.Series:
    return frame[f].map(lambda v: _same(v, level))


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-15)
    return a == b


def _sort_key(v):
    return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).lower() if isinstance(v, bool) else str(v)
