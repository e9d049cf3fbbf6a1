"""What a study found: its effects (``effects.compare``) on its metrics, in numbers and in
plain sentences, plus layer removal in words and the metrics that sit at chance.

The metrics compared are every final validation metric (``val/*``), every transfer score
at the top layer (``transfer/<task>/probe_*`` and ``finetune_*``; never the baselines,
which are references: ``reports.transfer``) and two layer-removal summaries per
truncation loss, computed per trial from the ablation table:
``ablation_delta/<metric>_last_block``, the loss added by removing the last block, and
``ablation_delta/<metric>_per_block``, the loss added per block when every block is removed
((value with all L blocks removed - intact value) / L), so models of different depth
compare. ``findings.csv`` / ``findings.json`` hold ``effects.COLUMNS``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import transfer
from .effects import COLUMNS, POOLED, compare, mean_ci
from .loader import StudyData, format_value
from .tables import ablation_metrics, table_metrics

FINDINGS_CSV, FINDINGS_JSON = "findings.csv", "findings.json"
REMOVAL = "ablation_delta/"  # prefix of the layer-removal summaries
# A loss within this fraction of ln V, or an accuracy below this multiple of chance, "is
# at chance": a randomly initialised model scores about ln V and 1/V.
CHANCE_LOSS_FRACTION = 0.02
CHANCE_ACC_MULTIPLE = 1.5


# ------------------------------------------------------------------ the data compared
def removal_summaries(data: StudyData) -> pd.DataFrame:
    """Per trial (``number``) the layer-removal summaries as columns
    ``ablation_delta/<m>_last_block`` and ``ablation_delta/<m>_per_block`` (the names
    of the scalar metrics each run logs to MLflow)."""
    ab = data.ablation
    trunc = ab[(ab["variant"] == "truncate") & ab["metric"].isin(ablation_metrics(data))] if not ab.empty else ab
    rows: dict[int, dict[str, float]] = {}
    for (number, metric), part in trunc.groupby(["number", "metric"]):
        curve = part.dropna(subset=["removed"]).set_index("removed")["value"].sort_index()
        if 0 not in curve.index or len(curve) < 2:
            continue
        depth = int(curve.index.max())
        row = rows.setdefault(int(number), {})
        row[f"{REMOVAL}{metric}_last_block"] = float(curve.get(1, math.nan) - curve[0])
        row[f"{REMOVAL}{metric}_per_block"] = float((curve[depth] - curve[0]) / depth)
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("number").reset_index()


def compared_metrics(data: StudyData) -> list[str]:
    """The final metrics findings compare, in the order sentences state them: the
    summary table's (the objective first, then losses, then the rest), then the transfer
    scores at the top layer (not the baselines)."""
    done = data.complete
    metrics = [m for m in table_metrics(data) if m in done and done[m].notna().any()]
    return metrics + [m for m in transfer.findings_metrics(data) if m not in metrics]


def observations(data: StudyData) -> tuple[pd.DataFrame, list[str]]:
    """One row per complete trial (swept params, seed, metrics) and the metric names."""
    done = data.complete.copy()
    metrics = compared_metrics(data)
    removal = removal_summaries(data)
    if not removal.empty:
        done = done.merge(removal, on="number", how="left")
        metrics += [c for c in removal.columns if c != "number"]
    return done, metrics


def baselines(data: StudyData) -> dict:
    """The baseline level of each swept factor: ``baseline:`` in the spec, else the
    first value of the factor's grid list."""
    spec = data.spec or {}
    out = {}
    grid = spec.get("grid") if isinstance(spec.get("grid"), dict) else {}
    for f in data.swept:
        if isinstance(spec.get("baseline"), dict) and f in spec["baseline"]:
            out[f] = spec["baseline"][f]
        elif isinstance(grid.get(f), list) and grid[f]:
            out[f] = grid[f][0]
    return out


def findings_frame(data: StudyData) -> pd.DataFrame:
    """Every comparison of a grid study (``effects.COLUMNS`` plus helper columns); empty
    for a search (its settings are not a factorial design) or with nothing complete."""
    factors = [f for f in data.swept if f in data.complete]
    if data.kind != "grid" or not factors or data.complete.empty:
        return pd.DataFrame(columns=COLUMNS)
    frame, metrics = observations(data)
    return compare(frame, factors, metrics, baselines(data))


def write_findings(table: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    """``findings.csv`` and ``findings.json``: one row per comparison, ``COLUMNS``."""
    rows = table[COLUMNS] if not table.empty else pd.DataFrame(columns=COLUMNS)
    csv, js = Path(out_dir) / FINDINGS_CSV, Path(out_dir) / FINDINGS_JSON
    rows.to_csv(csv, index=False)
    records = [{k: _json_value(v) for k, v in r.items()} for r in rows.to_dict("records")]
    js.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return csv, js


def _json_value(v):
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else ("inf" if math.isinf(v) else float(v))
    return v


# ------------------------------------------------------------------ chance levels
@dataclass(frozen=True)
class Chance:
    value: float
    label: str  # "ln 2048 = 7.62"


def chance_levels(data: StudyData, metrics: list[str]) -> dict[str, Chance]:
    """The chance level of each metric that has one: ln V for token cross-entropies and
    1/V for token accuracies (text models), 1/classes for probe accuracies; for the
    transfer scores 1/classes of the task (1/45 for the digit pair of moving-mnist), 0
    for an R²."""
    fixed = (data.spec or {}).get("fixed") or {}
    vocab = (fixed.get("data") or {}).get("vocab_size") if isinstance(fixed.get("data"), dict) else None
    is_text = (data.spec or {}).get("model") in ("gpt", "bert", "electra")
    classes = _num_classes(data)
    out = {}
    for m in metrics:
        name = m.rsplit("/", 1)[-1]
        if m.startswith(REMOVAL):
            continue
        if transfer.parse(m) is not None:
            level = transfer.chance(m)
            if level is not None:
                out[m] = Chance(*level)
            continue
        if name.startswith("rtd_"):  # ELECTRA's replaced-token detection: a binary task per token
            level = _rtd_chance(data, name)
            if level is not None:
                out[m] = level
            continue
        if is_text and vocab and "data.vocab_size" not in data.swept:
            if name.endswith("_loss"):
                out[m] = Chance(math.log(vocab), f"ln {vocab} = {math.log(vocab):.2f}")
            elif name.endswith("_acc") and "probe" not in name:
                out[m] = Chance(1 / vocab, f"1/{vocab}")
        if "probe" in name and name.endswith("acc") and classes:
            out[m] = Chance(1 / classes, f"1/{classes} = {1 / classes:.3f}")
    return out


def _rtd_chance(data: StudyData, name: str) -> Chance | None:
    """Guessing "original" for every token: accuracy 1 - p and the binary entropy of p
    (p = the replaced fraction, mean over the trials); AUC 0.5."""
    if name == "rtd_auc":
        return Chance(0.5, "0.5")
    col = data.trials.get("val/replaced_frac")
    if col is None or not col.notna().any():
        return None
    p = float(col.dropna().mean())
    if not 0 < p < 1:
        return None
    if name == "rtd_acc":
        return Chance(1 - p, f"1 - replaced fraction = {1 - p:.3f}")
    if name == "rtd_loss":
        h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
        return Chance(h, f"H(replaced fraction {p:.3f}) = {h:.3f}")
    return None


def _num_classes(data: StudyData) -> int | None:
    col = data.trials.get("data.num_classes")
    if col is not None and col.notna().any():
        return int(col.dropna().iloc[0])
    return None


def at_chance(value: float, chance: Chance, metric: str) -> bool:
    if transfer.parse(metric) is not None:
        return transfer.at_chance(value, chance.value)
    if metric.rsplit("/", 1)[-1] in ("rtd_acc", "rtd_auc"):  # a base rate near 1: within a point of it
        return value <= chance.value + 0.01
    if metric.endswith("loss"):
        return value >= chance.value * (1 - CHANCE_LOSS_FRACTION)
    return value <= chance.value * CHANCE_ACC_MULTIPLE


# ------------------------------------------------------------------ sentences
def sentences(data: StudyData, table: pd.DataFrame) -> list[str]:
    """Plain sentences generated from the numbers: resolved effects first (largest
    first), then unresolved ones with the replicates they would need, interactions,
    layer removal, and the metrics at chance."""
    if table.empty:
        return []
    simple = table[~table["factor"].str.contains(":") & (table["held"] != POOLED)]
    metric_rank = {m: i for i, m in enumerate(compared_metrics(data))}
    factor_rank = {f: i for i, f in enumerate(data.swept)}
    resolved, unresolved = [], []
    for (metric, factor, level), part in simple.groupby(["metric", "factor", "level"], sort=False):
        if metric.startswith(REMOVAL):
            continue
        # The study's objective first, then losses, then the rest; within a metric, the
        # factors in the spec's order (for gpt_pbw_demo: the p_bw effects lead).
        rank = (metric_rank.get(metric, len(metric_rank)), factor_rank.get(factor, len(factor_rank)))
        good, bad = part[part["resolved"]], part[~part["resolved"]]
        if not good.empty:
            resolved.append((rank, _resolved_sentence(metric, factor, level, good)))
        if not bad.empty:
            unresolved.append((rank, _unresolved_sentence(metric, factor, level, bad)))
    out = [s for _, s in sorted(resolved, key=lambda x: x[0])]
    out += [s for _, s in sorted(unresolved, key=lambda x: x[0])]
    out += _interaction_sentences(table)
    out += removal_sentences(data, table)
    out += chance_sentences(data)
    return out


def _resolved_sentence(metric: str, factor: str, level: str, rows: pd.DataFrame) -> str:
    """``masking.p_bw = 0.1 instead of 0 lowers val/bw_loss by 19.6% [17.0, 22.2] at
    model.depth=2 and by 20.3% [18.1, 22.5] at model.depth=4 (paired over n = 2 seeds).``"""
    base = rows["baseline"].iloc[0]
    recs = rows.to_dict("records")
    verbs = {_verb(r) for r in recs}
    if len(verbs) == 1:
        parts = [f"{_by(r)} {_where(r)}" for r in recs]
        said = f"{verbs.pop()} {metric} {_join(parts)}"
    else:
        said = _join([f"{_verb(r)} {metric} {_by(r)} {_where(r)}" for r in recs])
    better = "; higher is better" if transfer.higher_is_better(metric) else ""
    return f"{factor} = {level} instead of {base} {said} ({_pairing(rows)}{better})."


def _unresolved_sentence(metric: str, factor: str, level: str, rows: pd.DataFrame) -> str:
    base = rows["baseline"].iloc[0]
    parts = []
    for r in rows.to_dict("records"):
        parts.append(f"{_signed(r)} {_where(r)}".rstrip())
    need = _needed(rows)
    n = _n_text(rows)
    return (f"The effect of {factor} = {level} (vs {base}) on {metric}, {_join(parts)}, is not "
            f"resolved at {n}{need}.")


def _verb(r: dict) -> str:
    return "raises" if r["mean_diff"] > 0 else "lowers"


def _by(r: dict) -> str:
    """``by 19.6% [17.0, 22.2]``: the size of a resolved change and its interval; a
    transfer accuracy in points (``by 10.0 points [8.1, 11.9]``), an R² as a difference."""
    score = transfer.parse(r["metric"])
    if score is not None and score.score in ("acc", "r2"):
        k, unit = (100, " points") if score.score == "acc" else (1, "")
        lo, hi = sorted((abs(r["ci_low"]) * k, abs(r["ci_high"]) * k))
        f = ".1f" if unit else ".4f"
        return f"by {abs(r['mean_diff']) * k:{f}}{unit} [{lo:{f}}, {hi:{f}}]"
    if math.isnan(r["rel_diff"]):
        lo, hi = sorted((abs(r["ci_low"]), abs(r["ci_high"])))
        return f"by {abs(r['mean_diff']):.4g} [{lo:.4g}, {hi:.4g}]"
    lo, hi = sorted((abs(r["rel_ci_low"]) * 100, abs(r["rel_ci_high"]) * 100))
    return f"by {abs(r['rel_diff']) * 100:.1f}% [{lo:.1f}, {hi:.1f}]"


def _signed(r: dict) -> str:
    score = transfer.parse(r["metric"])
    if score is not None and score.score in ("acc", "r2"):
        k, unit, f = (100, " points", "+.1f") if score.score == "acc" else (1, "", "+.4f")
        if math.isnan(r["ci_low"]):
            return f"{r['mean_diff'] * k:{f}}{unit} (no interval at n = {r['n']})"
        return f"{r['mean_diff'] * k:{f}}{unit} [{r['ci_low'] * k:{f}}, {r['ci_high'] * k:{f}}]"
    if math.isnan(r["rel_diff"]):
        return f"{r['mean_diff']:+.4g} [{_ci_abs(r)}]"
    if math.isnan(r["rel_ci_low"]):
        return f"{r['rel_diff'] * 100:+.1f}% (no interval at n = {r['n']})"
    return f"{r['rel_diff'] * 100:+.1f}% [{r['rel_ci_low'] * 100:+.1f}, {r['rel_ci_high'] * 100:+.1f}]"


def _ci_abs(r: dict) -> str:
    return f"{r['ci_low']:+.4g}, {r['ci_high']:+.4g}"


def _where(r: dict) -> str:
    held = r["held"]
    return f"at {held.replace(';', ' ')}" if held and held != POOLED else ""


def _pairing(rows: pd.DataFrame) -> str:
    n = _n_text(rows)
    return f"paired over {n}" if rows["paired"].all() else f"unpaired, {n}"


def _n_text(rows: pd.DataFrame) -> str:
    ns = sorted(set(int(x) for x in rows["n"]))
    what = "seeds" if rows["paired"].all() else "seeds per setting"
    return f"n = {ns[0]} {what}" if len(ns) == 1 else f"n = {ns[0]}-{ns[-1]} {what}"


def _needed(rows: pd.DataFrame) -> str:
    needed = [x for x in rows["n_needed"] if not (isinstance(x, float) and math.isnan(x))]
    if not needed:
        return ""
    worst = max(needed)
    if math.isinf(worst):
        return "; an effect this small would need more than 100,000 seeds"
    best = min(needed)
    span = f"{int(best)}" if best == worst else f"{int(best)}-{int(worst)}"
    return f"; about {span} seeds would resolve an effect of this size (80% power)"


def _join(parts: list[str]) -> str:
    parts = [p.strip() for p in parts]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _interaction_sentences(table: pd.DataFrame) -> list[str]:
    inter = table[table["factor"].str.contains(":") & ~table["metric"].str.startswith(REMOVAL)]
    out = []
    for r in inter.to_dict("records"):
        a, b = r["factor"].split(":")
        la, lb = r["level"].split(":")
        a0, b0 = r["baseline"].split(":")
        status = "resolved" if r["resolved"] else f"not resolved at n = {r['n']}"
        out.append(f"Interaction: the effect of {a} = {la} (vs {a0}) on {r['metric']} at {b} = {lb} differs from "
                   f"that at {b} = {b0} by {_signed(r)} ({status}).")
    resolved = [s for s in out if "(resolved)" in s]
    return resolved + ([f"{len(out) - len(resolved)} interaction(s) between the swept factors are not resolved "
                        "(findings.csv, factor A:B)."] if len(out) > len(resolved) else [])


# ------------------------------------------------------------------ layer removal in words
def removal_increments(data: StudyData) -> pd.DataFrame:
    """Per setting, truncation metric and k: the loss added by removing block k from the
    back (value with k removed - value with k-1 removed), mean over seeds with a 95%
    t-interval: columns setting, metric, k, n, mean, ci_low, ci_high."""
    ab = data.ablation
    if ab.empty:
        return pd.DataFrame(columns=["setting", "metric", "k", "n", "mean", "ci_low", "ci_high"])
    trunc = ab[(ab["variant"] == "truncate") & ab["metric"].isin(ablation_metrics(data))]
    trunc = trunc[trunc["number"].isin(data.complete["number"])]
    rows = []
    for (setting, metric), part in trunc.groupby(["setting", "metric"], sort=False):
        wide = part.pivot_table(index="number", columns="removed", values="value")
        for k in [c for c in wide.columns if c >= 1]:
            if k - 1 not in wide.columns:
                continue
            n, mean, low, high = mean_ci((wide[k] - wide[k - 1]).to_numpy())
            rows.append({"setting": setting, "metric": metric, "k": int(k), "n": n, "mean": mean,
                         "ci_low": low, "ci_high": high})
    out = pd.DataFrame(rows)
    order = {s: i for i, s in enumerate(data.settings)}
    return out.sort_values(["metric", "setting", "k"], key=lambda c: c.map(order) if c.name == "setting" else c,
                           ignore_index=True) if not out.empty else out


def removal_sentences(data: StudyData, table: pd.DataFrame) -> list[str]:
    """For each truncation metric: what removing the last block costs, where it costs
    most and least, and which settings' curves differ (resolved effects on the
    per-block summary)."""
    inc = removal_increments(data)
    out = []
    for metric, part in inc[inc["k"] == 1].groupby("metric", sort=False) if not inc.empty else []:
        part = part.dropna(subset=["mean"])
        if part.empty:
            continue
        hi, lo = part.loc[part["mean"].idxmax()], part.loc[part["mean"].idxmin()]
        if len(part) == 1 or hi["setting"] == lo["setting"]:
            text = f"Removing the last block adds {_inc(hi)} to the validation {metric} at {hi['setting']}"
        else:
            text = (f"Removing the last block adds {_inc(hi)} to the validation {metric} at {hi['setting']} "
                    f"(the most) and {_inc(lo)} at {lo['setting']} (the least)")
        diffs = table[(table["metric"] == f"{REMOVAL}{metric}_per_block") & table["resolved"]
                      & ~table["factor"].str.contains(":") & (table["held"] != POOLED)]
        if not diffs.empty:
            said = [f"{r['factor']} = {r['level']} vs {r['baseline']} {_where(r)} ({r['mean_diff']:+.3f} per block "
                    f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}])".replace("  ", " ") for r in diffs.to_dict("records")]
            text += "; the curves differ (loss added per block removed) for " + _join(said)
        else:
            text += "; no difference between settings in the loss added per block removed is resolved"
        out.append(text + ".")
    return out


def _inc(r) -> str:
    if math.isnan(r["ci_low"]):
        return f"{r['mean']:+.3f} (n = {r['n']})"
    return f"{r['mean']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] (n = {r['n']})"


def chance_sentences(data: StudyData) -> list[str]:
    """Settings whose mean of a metric is at its chance level."""
    done = data.complete
    metrics = [m for m in compared_metrics(data) if m in done]
    chance = chance_levels(data, metrics)
    out = []
    for m, c in chance.items():
        means = done.groupby("setting")[m].mean().dropna()
        hits = [(s, v) for s, v in means.items() if at_chance(v, c, m)]
        if hits:
            listed = ", ".join(f"{s} ({format_value(round(v, 4))})" for s, v in hits)
            out.append(f"{m} is at chance ({c.label}) at {listed}: no comparison of those numbers says more than "
                       "that the model did not learn that task.")
    return out
