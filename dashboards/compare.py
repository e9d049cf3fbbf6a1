"""Cross-study comparison: what several studies share, as tidy frames.

The layer-removal curves of different studies are compared as *changes* from the
intact model (blocks removed = 0), per trial, so that models of different size and
loss level line up: ``delta`` is the change in the metric, ``relative`` the change as
a percentage of the intact value. A study's cost of removing blocks is summarised as
the least-squares slope of ``delta`` on blocks removed, through the origin (the change
is zero by definition when nothing is removed): "loss per block removed".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd

from reports.loader import StudyData

OBJECTIVE = "objective"  # comparison key: each study's own objective metric, relative change
REMOVAL_COLUMNS = ["study", "model", "number", "setting", "metric", "removed", "value", "delta", "relative"]


def model_name(data: StudyData) -> str:
    """The study's model family from its spec (``gpt``, ``mae`` ...), ``?`` if unrecorded."""
    model = data.spec.get("model")
    if isinstance(model, dict):
        model = model.get("name")
    return str(model) if model else "?"


def objective_key(data: StudyData) -> str:
    """The objective as a metric key: ``val/fw_loss`` -> ``fw_loss``."""
    return data.objective.removeprefix("val/")


def removal_table(studies: Sequence[StudyData]) -> pd.DataFrame:
    """One row per study x complete trial x truncate metric x blocks removed, with the
    change from the trial's intact value (columns ``REMOVAL_COLUMNS``)."""
    frames = []
    for data in studies:
        a = data.ablation
        done = set(data.complete["number"])
        t = a[(a["variant"] == "truncate") & a["number"].isin(done) & a["removed"].notna()]
        if t.empty:
            continue
        t = t[["number", "setting", "metric", "removed", "value"]].astype({"removed": "int64"})
        base = t[t["removed"] == 0].set_index(["number", "metric"])["value"]
        key = pd.MultiIndex.from_frame(t[["number", "metric"]])
        intact = base.reindex(key).to_numpy()
        t = t.assign(study=data.name, model=model_name(data), delta=t["value"].to_numpy() - intact,
                     relative=100.0 * (t["value"].to_numpy() / intact - 1.0))
        frames.append(t[t["delta"].notna()])
    if not frames:
        return pd.DataFrame(columns=REMOVAL_COLUMNS)
    return pd.concat(frames, ignore_index=True)[REMOVAL_COLUMNS]


def comparison_keys(studies: Sequence[StudyData], removal: pd.DataFrame) -> list[str]:
    """Comparison keys: ``objective`` when two or more studies have layer-removal results
    for their objective, then every metric (short name) two or more studies share, in
    the ablation or as a final ``val/`` metric."""
    have_objective = {d.name for d in studies
                      if ((removal["study"] == d.name) & (removal["metric"] == objective_key(d))).any()}
    shared = Counter()
    for data in studies:
        names = set(removal.loc[removal["study"] == data.name, "metric"])
        names |= {c.removeprefix("val/") for c in data.final_metrics}
        shared.update(names)
    keys = [OBJECTIVE] if len(have_objective) >= 2 else []
    metrics = sorted((m for m, n in shared.items() if n >= 2), key=lambda m: (not m.endswith("loss"), m))
    return keys + metrics


def removal_curves(removal: pd.DataFrame, studies: Sequence[StudyData], key: str) -> pd.DataFrame:
    """Per study and blocks removed: mean, min and max over complete trials of the change
    (``delta`` for a shared metric, ``relative`` in % of each objective for ``objective``),
    and the number of trials. Columns: study, model, metric, removed, mean, min, max, n."""
    part = _rows_for(removal, studies, key)
    column = "relative" if key == OBJECTIVE else "delta"
    if part.empty:
        return pd.DataFrame(columns=["study", "model", "metric", "removed", "mean", "min", "max", "n"])
    stats = part.groupby(["study", "model", "metric", "removed"], sort=False)[column]
    return stats.agg(mean="mean", min="min", max="max", n="count").reset_index()


def per_block_cost(removal: pd.DataFrame, studies: Sequence[StudyData], key: str) -> pd.DataFrame:
    """Per study: the change per block removed (slope through the origin, one per
    complete trial), mean and sample std over trials. Columns: study, model, metric,
    mean, std, n."""
    part = _rows_for(removal, studies, key)
    column = "relative" if key == OBJECTIVE else "delta"
    rows = []
    for (study, model, metric, _), g in part.groupby(["study", "model", "metric", "number"], sort=False):
        k = g["removed"].to_numpy(dtype=float)
        if (k > 0).any():
            rows.append((study, model, metric, float(np.dot(k, g[column]) / np.dot(k, k))))
    slopes = pd.DataFrame(rows, columns=["study", "model", "metric", "slope"])
    if slopes.empty:
        return pd.DataFrame(columns=["study", "model", "metric", "mean", "std", "n"])
    stats = slopes.groupby(["study", "model", "metric"], sort=False)["slope"]
    return stats.agg(mean="mean", std="std", n="count").reset_index()


def final_values(studies: Sequence[StudyData], key: str) -> pd.DataFrame:
    """The final ``val/<key>`` of every complete trial of every study that records it.
    Columns: study, model, number, setting, value."""
    frames = []
    for data in studies:
        col = f"val/{key}"
        done = data.complete
        if col in done and done[col].notna().any():
            part = done.loc[done[col].notna(), ["number", "setting", col]].rename(columns={col: "value"})
            frames.append(part.assign(study=data.name, model=model_name(data)))
    if not frames:
        return pd.DataFrame(columns=["study", "model", "number", "setting", "value"])
    return pd.concat(frames, ignore_index=True)[["study", "model", "number", "setting", "value"]]


def _rows_for(removal: pd.DataFrame, studies: Sequence[StudyData], key: str) -> pd.DataFrame:
    """The removal rows of ``key``: one metric for all studies, or each study's objective."""
    if key != OBJECTIVE:
        return removal[removal["metric"] == key]
    wanted = {d.name: objective_key(d) for d in studies}
    return removal[removal["metric"] == removal["study"].map(wanted)]
