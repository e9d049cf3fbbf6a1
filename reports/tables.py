"""Tables of a study: pandas in, pandas out (formatting to text is the report's job).

Which metrics a table shows is discovered from the data, so other model families
(``val/mlm_loss``, ``val/recon_loss``, ...) get the same tables; forward/backward pairs
(``fw_*`` next to ``bw_*``) are treated specially only when both are present.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

from .loader import StudyData, format_value


# ------------------------------------------------------------------ which metrics
def table_metrics(data: StudyData) -> list[str]:
    """Final metrics for the summary: the objective, then losses, then the rest."""
    found = data.final_metrics
    if data.objective not in found and data.objective in data.trials.columns:
        found = [data.objective, *found]
    return sorted(found, key=lambda m: (m != data.objective, not m.endswith("loss"), m))


# The throughput columns of the per-setting table, in this order (lit_modules/perf.py).
PERF_METRICS = ("perf/samples_per_s", "perf/tokens_per_s", "perf/mfu", "perf/data_wait")
RATES = ("perf/samples_per_s", "perf/tokens_per_s")
PERF_NOTE = ("perf/*: each run's throughput over its steps after the first logging window (warm-up): samples and "
             "input tokens per second, MFU = model FLOPs per second over the device's peak (the run's "
             "perf.peak_source), data_wait = fraction of step time spent waiting for the next batch")


def perf_metrics(data: StudyData) -> list[str]:
    """The throughput columns recorded for the complete trials (none for runs from before
    throughput was logged)."""
    done = data.complete
    return [m for m in PERF_METRICS if m in done.columns and done[m].notna().any()]


def direction_pairs(metrics: Iterable[str]) -> list[tuple[str, str]]:
    """(forward, backward) metric pairs: ``val/fw_loss`` with ``val/bw_loss`` and the like."""
    metrics = list(metrics)
    pairs = []
    for m in metrics:
        stage, _, name = m.rpartition("/")
        if name.startswith("fw_"):
            bw = f"{stage}/bw_{name[3:]}" if stage else f"bw_{name[3:]}"
            if bw in metrics:
                pairs.append((m, bw))
    return pairs


def ablation_metrics(data: StudyData) -> list[str]:
    """The truncate-curve metrics worth plotting: fw/bw losses when present, else the
    objective's own metric and other losses, else whatever was recorded."""
    found = sorted(set(data.ablation.loc[data.ablation["variant"] == "truncate", "metric"]))
    losses = [m for pair in direction_pairs(found) for m in pair if m.endswith("loss")]
    if losses:
        return losses
    short = data.objective.rpartition("/")[2]
    chosen = [short] if short in found else []
    chosen += [m for m in found if m.endswith("loss") and m not in chosen]
    return chosen or found


# ------------------------------------------------------------------ per-setting summary
def setting_summary(data: StudyData, metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per setting (in swept order): the swept params, ``n`` complete replicates,
    ``expected``, ``{metric} mean`` / ``{metric} std`` (sample std, ddof 1) over the
    complete replicates, ``{metric} min`` / ``max``, and ``model.parameters``."""
    metrics = table_metrics(data) if metrics is None else metrics
    swept = [s for s in data.swept if s in data.trials.columns]
    order = data.settings
    first = data.trials.drop_duplicates("setting").set_index("setting")
    out = pd.DataFrame({"setting": order})
    for s in swept:
        out[s] = [first.at[label, s] for label in order]
    done = data.complete.groupby("setting")
    out["n"] = out["setting"].map(done.size()).fillna(0).astype(int)
    out["expected"] = data.expected_replicates
    for m in metrics:
        stats = done[m].agg(["mean", "std", "min", "max"]) if m in data.complete else None
        for stat in ("mean", "std", "min", "max"):
            out[f"{m} {stat}"] = out["setting"].map(stats[stat]) if stats is not None else math.nan
    params = data.trials.groupby("setting")["model.parameters"].agg(lambda c: c.dropna().max())
    out["model.parameters"] = out["setting"].map(params).astype("Int64")
    return out


def ranked(summary: pd.DataFrame, metric: str, direction: str) -> pd.DataFrame:
    """The settings with a value for ``metric``, best first."""
    col = f"{metric} mean"
    if col not in summary:
        return summary.iloc[0:0]
    have = summary[summary[col].notna()]
    return have.sort_values(col, ascending=direction != "maximize", kind="stable")


# ------------------------------------------------------------------ trials
def trial_problems(data: StudyData) -> pd.DataFrame:
    """Trials that are not COMPLETE, or COMPLETE without a finished run: number, state,
    setting, seed, run_status, failure."""
    t = data.trials
    bad = t["state"] != "COMPLETE"
    if data.tracking_uri and "run_status" in t:
        bad |= (t["state"] == "COMPLETE") & (t["run_status"] != "FINISHED")
    cols = [c for c in ["number", "state", "setting", "seed", "run_status", "failure"] if c in t]
    return t.loc[bad, cols].reset_index(drop=True)


def top_trials(data: StudyData, k: int = 10) -> pd.DataFrame:
    """The ``k`` best complete trials of a search: number, value, swept params, metrics."""
    done = data.complete.sort_values("value", ascending=data.direction != "maximize", kind="stable")
    cols = ["number", "value", *[s for s in data.swept if s in done], "duration_s"]
    cols += [m for m in table_metrics(data) if m != data.objective and m in done]
    return done[cols].head(k).reset_index(drop=True)


def state_counts(data: StudyData) -> dict[str, int]:
    order = ["COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"]
    counts = data.trials["state"].value_counts().to_dict()
    return {s: int(counts[s]) for s in [*order, *sorted(set(counts) - set(order))] if s in counts}


# ------------------------------------------------------------------ text formatting
def mean_std(mean: float, std: float, n: int, digits: int = 4) -> str:
    """``3.1000 ± 0.1414 (n=2)``; one replicate has no spread; none is a dash."""
    if not n or pd.isna(mean):
        return "—"
    if n < 2 or pd.isna(std):
        return f"{mean:.{digits}f} (n={n})"
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})"


def display_summary(summary: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The summary as strings: one ``mean ± std (n)`` column per metric."""
    out = pd.DataFrame({"setting": summary["setting"]})
    for m in metrics:
        digits = 1 if m in RATES else 4  # samples and tokens per second: thousands, a decimal is enough
        out[m] = [mean_std(a, s, n, digits) for a, s, n in zip(summary[f"{m} mean"], summary[f"{m} std"], summary["n"])]
    exp = summary["expected"]
    out["replicates"] = [f"{n}/{e}" if pd.notna(e) else str(n) for n, e in zip(summary["n"], exp)]
    out["parameters"] = [f"{int(p):,}" if pd.notna(p) else "—" for p in summary["model.parameters"]]
    return out


def display_frame(df: pd.DataFrame, digits: int = 4, raw: Iterable[str] = ()) -> pd.DataFrame:
    """Every cell as text: floats to ``digits`` decimals (``duration_s`` to 1), the
    ``raw`` columns (parameter values) as written, missing as a dash."""
    raw = set(raw)

    def column(col: pd.Series) -> pd.Series:
        places = 1 if col.name == "duration_s" else digits
        return col.map(lambda v: _cell(v, places, col.name in raw))

    return df.apply(column) if not df.empty else df.astype(str)


def _cell(v, digits: int, raw: bool) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if raw or not isinstance(v, float):
        return format_value(v)
    return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (``|`` in cells escaped)."""
    text = display_frame(df)
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in text.itertuples(index=False)]
    head = [str(c).replace("|", "\\|") for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    return "\n".join(lines)
