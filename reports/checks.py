"""What a reviewer should be warned about before trusting a study's numbers.

Each check returns :class:`Finding` s; the report lists them under "Warnings".
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .loader import StudyData, grid_points, setting_label
from .tables import direction_pairs, table_metrics, trial_problems

# Trials listed one per line before the rest are only counted.
MAX_TRIAL_LINES = 40


@dataclass(frozen=True)
class Finding:
    kind: str  # leakage | trials | replicates | missing | store
    message: str


def review(data: StudyData, summary: pd.DataFrame) -> list[Finding]:
    """All the checks, most serious first."""
    return [
        *backward_below_forward(data, summary),
        *short_replicates(data, summary),
        *missing_trials(data),
        *problem_trials(data),
        *(Finding("store", note) for note in data.notes),
    ]


def backward_below_forward(data: StudyData, summary: pd.DataFrame) -> list[Finding]:
    """A backward loss below its forward loss. Work on the arrow of time in language
    models finds the backward loss slightly *above* the forward one; below suggests
    the backward task can see its targets (a leaky backward mask: docs/architecture.md, "No leakage")."""
    out = []
    for fw, bw in direction_pairs(table_metrics(data)):
        if not fw.endswith("loss"):
            continue
        for _, row in summary.iterrows():
            f, b = row[f"{fw} mean"], row[f"{bw} mean"]
            if pd.notna(f) and pd.notna(b) and b < f:
                out.append(Finding("leakage", (
                    f"{row['setting']}: {bw} {b:.4f} < {fw} {f:.4f} (mean of {row['n']}): backward loss below "
                    "forward suggests leakage; published arrow-of-time results find backward slightly above forward")))
    return out


def short_replicates(data: StudyData, summary: pd.DataFrame) -> list[Finding]:
    expected = data.expected_replicates
    if data.kind == "search" or not expected:
        return []
    short = summary[summary["n"] < expected]
    return [Finding("replicates", f"{r['setting']}: {r['n']} of {expected} replicates complete")
            for r in short.to_dict("records")]


def missing_trials(data: StudyData) -> list[Finding]:
    """Grid points x replicates the spec asks for that have no trial at all in the study
    (a failed trial that is re-run counts once)."""
    points = grid_points(data.spec) if data.kind == "grid" else None
    reps = data.expected_replicates
    if not points or not reps:
        return []
    t = data.trials
    rep = t["replicate"].combine_first(t["seed"]) if "replicate" in t else t["seed"]
    present = set(zip(t["setting"], rep))
    expected = [(setting_label(p, data.swept), r) for p in points for r in range(reps)]
    missing = [(s, r) for s, r in expected if (s, r) not in present]
    if not missing:
        return []
    by_setting: dict[str, list[int]] = {}
    for s, r in missing:
        by_setting.setdefault(s, []).append(r)
    detail = "; ".join(f"{s} replicate(s) {', '.join(map(str, rs))}" for s, rs in by_setting.items())
    return [Finding("missing", f"{len(missing)} of {len(expected)} grid trials ({len(points)} settings x {reps} "
                               f"replicates) are not in the study: {detail}")]


def problem_trials(data: StudyData) -> list[Finding]:
    """Every trial that did not complete, with its reason; complete trials whose run did
    not finish."""
    bad = trial_problems(data)
    done = data.complete
    rerun = {} if data.kind == "search" else dict(zip(zip(done["setting"], done["seed"]), done["number"]))
    out = []
    for r in bad.head(MAX_TRIAL_LINES).to_dict("records"):
        seed = f", seed {r['seed']}" if "seed" in r and pd.notna(r["seed"]) else ""
        what = r["state"]
        if r["state"] == "COMPLETE":
            status = r.get("run_status")
            what = f"COMPLETE but its MLflow run is {status if isinstance(status, str) else 'missing'}"
        reason = r.get("failure")
        reason = f": {reason}" if isinstance(reason, str) and reason else ""
        again = rerun.get((r["setting"], r.get("seed")))
        again = f" (re-run as trial {again}, COMPLETE)" if again is not None and again != r["number"] else ""
        out.append(Finding("trials", f"trial {r['number']} ({r['setting']}{seed}) {what}{reason}{again}"))
    if len(bad) > MAX_TRIAL_LINES:
        out.append(Finding("trials", f"... and {len(bad) - MAX_TRIAL_LINES} more trials not complete"))
    return out
