"""Transfer results of a study: what the representations are worth on labelled tasks.

Every run with a transfer stage logs, per task (``lit_modules/transfer``):

- ``transfer/<task>/probe_acc`` (``probe_r2`` for a regression task): a linear probe on
  frozen features of the run's primary feature kind, as a history with step = layer
  (0 = embeddings, L = last block); the run's latest value is the top layer;
- ``transfer/<task>/probe_acc_<feature>``: the same for the other feature kinds;
- ``transfer/<task>/finetune_acc`` (optional): the whole encoder fine-tuned;
- ``transfer/<task>/baseline_majority``, ``baseline_tfidf`` (text) or ``baseline_pixels``
  (images, clips), ``baseline_random_init`` (the same architecture at random init, same
  probe, primary feature, top layer): references, not findings metrics.

The loader keeps each run's latest values as ``trials`` columns and the per-layer
histories of the probes in ``StudyData.transfer_layers``. This module says which of
those columns are findings metrics, their chance level and direction, and summarises
them per task and setting (pandas in, pandas out; the report formats them).
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd

from lit_modules.transfer.names import TASK_CLASSES, TASK_INPUT_KIND, TASK_TARGET, chance_level

from .effects import mean_ci
from .loader import StudyData

PREFIX = "transfer/"
TASKS_PARAM, FEATURES_PARAM = "transfer.tasks", "transfer.features"
ALPHA = 0.05  # 95% intervals, as in reports.effects
# A probe "is at chance" when its accuracy (or R²) is less than two points above chance:
# the evaluation sets hold ~1000 rows, so one standard error of an accuracy is ~1.5 points.
AT_CHANCE_MARGIN = 0.02
# Settings whose random-init baselines differ by more than this get one reference line
# each in the layer-wise figure (a swept depth or width changes the random model).
RANDOM_INIT_SPREAD = 0.005
LAYER_COLUMNS = ["number", "setting", "seed", "task", "metric", "layer", "value"]

_SCORE = re.compile(r"^(probe|finetune)_(acc|r2)(?:_(.+))?$")


# ------------------------------------------------------------------ tasks and metric names
@dataclass(frozen=True)
class Task:
    """A labelled task: its classes (None for a regression), the inputs it reads, and its
    chance level (1/classes for an accuracy, 0 for R²)."""

    classes: int | None
    inputs: str  # text | image | clip
    chance: float
    chance_label: str
    what: str

    @property
    def classic(self) -> str:
        """The name of the classic baseline logged for the task's inputs."""
        return "tfidf" if self.inputs == "text" else "pixels"


def _classes(n: int, inputs: str) -> Task:
    return Task(n, inputs, 1 / n, f"1/{n} = {1 / n:.3f}", f"{n} classes")


def _task(name: str) -> Task:
    kind, target = TASK_INPUT_KIND[name], TASK_TARGET[name]
    if target == "class":
        return _classes(TASK_CLASSES[name], kind)
    if target == "multilabel":  # set accuracy of the digits of a clip
        pairs = round(1 / chance_level(name))
        return Task(pairs, kind, 1 / pairs, f"1/{pairs} = {1 / pairs:.3f}", f"the pair of digits ({pairs} pairs)")
    return Task(None, kind, 0.0, "R² = 0", "regression (R²)")


# The tasks of lit_modules/transfer, from its torch-free names module.
TASKS: dict[str, Task] = {name: _task(name) for name in TASK_INPUT_KIND}
BASELINE_LABELS = {
    "majority": "majority class",
    "tfidf": "TF-IDF + logistic regression",
    "pixels": "raw pixels + logistic regression",
    "random_init": "same architecture at random init",
}
BASELINE_SHORT = {"majority": "majority", "tfidf": "TF-IDF", "pixels": "pixels", "random_init": "random init"}


@dataclass(frozen=True)
class Name:
    """A parsed ``transfer/<task>/<name>``: ``kind`` probe | finetune | baseline | other;
    ``score`` acc | r2 (probe and finetune); ``feature`` "" for the primary feature kind;
    ``baseline``: majority | tfidf | pixels | random_init | ..."""

    task: str
    name: str
    kind: str
    score: str = ""
    feature: str = ""
    baseline: str = ""


def parse(metric: str) -> Name | None:
    """The parts of a transfer metric name, or None if ``metric`` is not one."""
    if not metric.startswith(PREFIX):
        return None
    task, sep, name = metric.removeprefix(PREFIX).partition("/")
    if not sep or not task or not name or "/" in name:
        return None
    if name.startswith("baseline_"):
        return Name(task, name, "baseline", baseline=name.removeprefix("baseline_"))
    m = _SCORE.match(name)
    if m:
        return Name(task, name, m.group(1), m.group(2), m.group(3) or "")
    return Name(task, name, "other")


def is_baseline(metric: str) -> bool:
    p = parse(metric)
    return p is not None and p.kind == "baseline"


def higher_is_better(metric: str) -> bool | None:
    """Accuracies and R² of probes and fine-tunes: higher is better; None when unknown."""
    p = parse(metric)
    if p is not None and (p.kind == "baseline" or (p.kind in ("probe", "finetune") and p.score in ("acc", "r2"))):
        return True
    return None


def chance(metric: str) -> tuple[float, str] | None:
    """(value, label) of a probe's or fine-tune's chance level: 1/classes for an
    accuracy (1/45 for the digit pair of moving-mnist), 0 for an R²."""
    p = parse(metric)
    if p is None or p.kind not in ("probe", "finetune"):
        return None
    if p.score == "r2":
        return 0.0, "R² = 0"
    task = TASKS.get(p.task)
    if task is None or task.classes is None:
        return None
    return task.chance, task.chance_label


def at_chance(value: float, level: float) -> bool:
    return value < level + AT_CHANCE_MARGIN


def score_label(metric: str, data: StudyData | None = None) -> str:
    """``probe_acc (fw)`` for the primary feature when its name is known, else the name."""
    p = parse(metric)
    if p is None:
        return metric
    primary = primary_feature(data) if data is not None else None
    return f"{p.name} ({primary})" if p.kind == "probe" and not p.feature and primary else p.name


# ------------------------------------------------------------------ what a study has
def columns(data: StudyData) -> list[str]:
    """Every ``transfer/*`` column of ``trials`` with a value for a complete trial."""
    done = data.complete
    return [c for c in data.trials.columns if c.startswith(PREFIX) and c in done and done[c].notna().any()]


def tasks(data: StudyData) -> list[str]:
    """The study's tasks: in the order the runs list them (``transfer.tasks``), then any
    other task with metrics, by name."""
    seen = {parse(c).task for c in columns(data) if parse(c) is not None}
    listed = []
    if TASKS_PARAM in data.trials:
        for value in data.trials[TASKS_PARAM].dropna():
            listed += [t for t in param_list(value) if t not in listed]
    return [t for t in listed if t in seen] + sorted(seen - set(listed))


def findings_metrics(data: StudyData) -> list[str]:
    """The transfer metrics findings compare (top layer): probes, then fine-tunes, the
    primary feature first, per task in the study's order; never the baselines."""
    order = {t: i for i, t in enumerate(tasks(data))}
    kind = {"probe": 0, "finetune": 1, "other": 2}
    found = [(parse(c), c) for c in columns(data)]
    found = [(p, c) for p, c in found if p is not None and p.kind != "baseline"]
    found.sort(key=lambda pc: (order.get(pc[0].task, len(order)), kind[pc[0].kind], pc[0].feature != "", pc[1]))
    return [c for _, c in found]


def task_metrics(data: StudyData, task: str, kinds: Iterable[str] = ("probe", "finetune")) -> list[str]:
    kinds = set(kinds)
    return [m for m in findings_metrics(data) if parse(m).task == task and parse(m).kind in kinds]


def baseline_metrics(data: StudyData, task: str) -> dict[str, str]:
    """baseline name -> column, majority first, the classic one, then random init."""
    rank = {"majority": 0, "tfidf": 1, "pixels": 1, "random_init": 2}
    found = {parse(c).baseline: c for c in columns(data) if parse(c) and parse(c).task == task
             and parse(c).kind == "baseline"}
    return {b: found[b] for b in sorted(found, key=lambda b: (rank.get(b, 3), b))}


def primary_feature(data: StudyData) -> str | None:
    """The primary feature kind of the runs: named in their ``transfer.csv`` (the
    loader's ``feature`` column), else the first of the ``transfer.features`` param when
    the runs agree; None when neither says (the param is ``[]`` for the family default)."""
    lay = data.transfer_layers
    if "feature" in lay:
        pairs = lay[["metric", "feature"]].drop_duplicates()
        named = {f for m, f in zip(pairs["metric"], pairs["feature"]) if f and parse(m) and parse(m).kind == "probe"
                 and not parse(m).feature}
        if len(named) == 1:
            return named.pop()
    if FEATURES_PARAM not in data.trials:
        return None
    firsts = {param_list(v)[0] for v in data.complete[FEATURES_PARAM].dropna() if param_list(v)}
    return firsts.pop() if len(firsts) == 1 else None


def param_list(value) -> list[str]:
    """A list param as MLflow holds it: ``str()`` of the flattened config's list
    (``"['sst2', 'agnews']"``); a comma-separated string is read too."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        parsed = [p.strip() for p in text.strip("[]()").split(",")]
    if isinstance(parsed, str):
        parsed = [parsed]
    return [str(v).strip().strip("'\"") for v in parsed if str(v).strip()] if isinstance(parsed, (list, tuple)) else []


# ------------------------------------------------------------------ summaries
def summary(data: StudyData, task: str, settings: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per setting with transfer results on ``task`` (complete trials, top layer):
    ``setting``, ``n``; per score metric ``<m> n|mean|ci_low|ci_high``; per baseline
    ``<baseline> mean`` (mean over the setting's runs); ``gain n|mean|ci_low|ci_high``:
    the primary probe minus the run's own random-init baseline, paired by run;
    ``best layer`` and ``best layer mean`` of the primary probe (from the histories)."""
    metrics = task_metrics(data, task)
    bases = baseline_metrics(data, task)
    done = data.complete
    have = done[done[[*metrics, *bases.values()]].notna().any(axis=1)] if metrics or bases else done.iloc[0:0]
    order = [s for s in (settings if settings is not None else data.settings) if s in set(have["setting"])]
    curves = layer_summary(data, metrics[0]) if metrics else pd.DataFrame()
    rows = []
    for setting in order:
        part = have[have["setting"] == setting]
        row: dict = {"setting": setting, "n": len(part)}
        for m in metrics:
            row[f"{m} n"], row[f"{m} mean"], row[f"{m} ci_low"], row[f"{m} ci_high"] = mean_ci(part[m].tolist())
        for b, col in bases.items():
            row[f"{b} mean"] = float(part[col].mean())
        if metrics and "random_init" in bases:
            gain = (part[metrics[0]] - part[bases["random_init"]]).dropna().tolist()
            row["gain n"], row["gain mean"], row["gain ci_low"], row["gain ci_high"] = mean_ci(gain)
        c = curves[curves["setting"] == setting] if not curves.empty else curves
        if not c.empty and c["mean"].notna().any():
            best = c.loc[c["mean"].idxmax()]
            row["best layer"], row["best layer mean"], row["top layer"] = int(best["layer"]), best["mean"], \
                int(c["layer"].max())
        rows.append(row)
    return pd.DataFrame(rows)


def layer_summary(data: StudyData, metric: str) -> pd.DataFrame:
    """Per setting and layer, ``metric``'s mean over the complete trials' histories with
    its 95% t-interval: columns setting, layer, n, mean, ci_low, ci_high."""
    cols = ["setting", "layer", "n", "mean", "ci_low", "ci_high"]
    lay = data.transfer_layers
    if lay.empty:
        return pd.DataFrame(columns=cols)
    part = lay[(lay["metric"] == metric) & lay["number"].isin(data.complete["number"])]
    rows = [(setting, int(layer), *mean_ci(g["value"].tolist()))
            for (setting, layer), g in part.groupby(["setting", "layer"], sort=False)]
    out = pd.DataFrame(rows, columns=cols)
    order = {s: i for i, s in enumerate(data.settings)}
    return out.sort_values(["setting", "layer"], key=lambda c: c.map(order) if c.name == "setting" else c,
                           ignore_index=True)


# ------------------------------------------------------------------ text
def task_title(task: str) -> str:
    t = TASKS.get(task)
    return f"{task} ({t.what}; chance {t.chance_label})" if t else task


def display(data: StudyData, task: str, table: pd.DataFrame) -> pd.DataFrame:
    """The summary of ``task`` as text: each score ``mean [95% CI]``, the baselines, the
    primary probe's gain over random init and its best layer."""
    if table.empty:
        return pd.DataFrame()
    metrics = task_metrics(data, task)
    bases = baseline_metrics(data, task)
    out = pd.DataFrame({"setting": table["setting"], "n": table["n"].astype(int)})
    for m in metrics:
        out[f"{score_label(m, data)} [95% CI]"] = [
            _interval(*x) for x in zip(table[f"{m} mean"], table[f"{m} ci_low"], table[f"{m} ci_high"])]
    for b in bases:
        out[f"baseline: {BASELINE_SHORT.get(b, b)}"] = [_number(v) for v in table[f"{b} mean"]]
    if "gain mean" in table and metrics:
        out[f"{parse(metrics[0]).name} − random init [95% CI]"] = [
            _interval(*x, signed=True) for x in zip(table["gain mean"], table["gain ci_low"], table["gain ci_high"])]
    if "best layer" in table and metrics:
        out[f"best layer of {parse(metrics[0]).name}"] = [
            "—" if pd.isna(k) else f"{int(k)} of {int(top)}: {v:.4f}"
            for k, v, top in zip(table["best layer"], table["best layer mean"], table["top layer"])]
    return out


def sentences(data: StudyData, task: str, table: pd.DataFrame) -> list[str]:
    """The task in words: the best setting at the top layer against the three baselines,
    settings that do not beat a baseline, settings whose probe peaks below the top."""
    metrics = task_metrics(data, task, ("probe",))
    if table.empty or not metrics:
        return []
    m = metrics[0]
    name, col = parse(m).name, f"{m} mean"
    scored = table[table[col].notna()]
    if scored.empty:
        return []
    bases = [b for b in baseline_metrics(data, task) if f"{b} mean" in table]
    best = scored.loc[scored[col].idxmax()]  # accuracies and R²: higher is better
    where = (f"{best['setting']} (whether it is resolved from the others: Findings)" if len(scored) > 1
             else f"{best['setting']} (the only setting)")
    ci = "" if pd.isna(best[f"{m} ci_low"]) else f" [{best[f'{m} ci_low']:.4f}, {best[f'{m} ci_high']:.4f}]"
    text = (f"{task}: the best {name} at the top layer (higher is better) is {best[col]:.4f}{ci} at {where} "
            f"(n = {int(best[f'{m} n'])} seeds)")
    refs = [f"{best[f'{b} mean']:.4f} ({BASELINE_LABELS.get(b, b)})" for b in bases if pd.notna(best[f"{b} mean"])]
    if refs:
        text += f", against {_join(refs)}"
    if pd.notna(best.get("gain mean", math.nan)):
        gain_ci = "" if pd.isna(best["gain ci_low"]) else f" [{best['gain ci_low']:+.4f}, {best['gain ci_high']:+.4f}]"
        text += f"; training added {best['gain mean']:+.4f}{gain_ci} over the same model at random init"
    out = [text + "."]
    for b in bases:
        below = scored[scored[col] <= scored[f"{b} mean"]]
        if not below.empty:
            listed = ", ".join(f"{r['setting']} ({r[col]:.4f} vs {r[f'{b} mean']:.4f})" for _, r in below.iterrows())
            out.append(f"{task}: the mean {name} does not beat the {BASELINE_LABELS.get(b, b)} baseline at {listed}.")
    if "best layer" in scored:
        peaks = scored[scored["best layer"].notna() & (scored["best layer"] < scored["top layer"])]
        if not peaks.empty:
            listed = ", ".join(f"{r['setting']} (layer {int(r['best layer'])}: {r['best layer mean']:.4f})"
                               for _, r in peaks.iterrows())
            out.append(f"{task}: the {name} peaks below the top layer at {listed}.")
    return out


def _interval(mean: float, lo: float, hi: float, signed: bool = False) -> str:
    if pd.isna(mean):
        return "—"
    f = "+.4f" if signed else ".4f"
    return f"{mean:{f}}" + ("" if pd.isna(lo) else f" [{lo:{f}}, {hi:{f}}]")


def _number(v: float) -> str:
    return "—" if pd.isna(v) else f"{v:.4f}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
