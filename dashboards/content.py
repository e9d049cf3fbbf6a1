"""What the dashboard shows, built from the loader's :class:`StudyData`: an overview
view (all studies, and their comparison) and one view per study. Each view is a list
of blocks (header, warnings, tables, figures, gallery); a figure holds one variant per
metric the view offers, so the page can switch metric without being regenerated.

Nothing here renders HTML (``dashboards.page`` does) or reads the stores
(``dashboards.build`` does): :func:`assemble` takes studies already loaded, so tests can
hand it frames made in memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import pandas as pd
import plotly.graph_objects as go

from reports import figures as report_figures
from reports import transfer
from reports.checks import Finding, review
from reports.findings import findings_frame, sentences
from reports.gallery import GalleryImage, reconstruction_gallery
from reports.loader import StudyData
from reports.study_report import TRANSFER_NOTE, param_importances, transfer_sections
from reports.tables import (
    PERF_NOTE,
    direction_pairs,
    display_frame,
    display_summary,
    perf_metrics,
    setting_summary,
    state_counts,
    table_metrics,
    top_trials,
    trial_problems,
)
from stores.urls import redact

from . import compare
from . import figures as dash_figures

ALL = "*"  # the variant key of a figure that is the same whatever metric is selected
OVERVIEW = "overview"


@dataclass
class Header:
    rows: list[tuple[str, str]]


@dataclass
class Warnings:
    findings: list[Finding]


@dataclass
class Table:
    """A table of text cells; ``link`` names a column of study names that link to their views."""

    anchor: str
    title: str
    frame: pd.DataFrame
    note: str = ""
    link: str | None = None


@dataclass
class Plot:
    """One figure slot. ``variants`` maps a metric key (or ``ALL``) to its figure; when the
    selected metric has none, the page shows ``missing`` (``{metric}`` is filled in)."""

    id: str
    title: str
    variants: dict[str, go.Figure]
    missing: str = "no {metric} recorded for this figure"


@dataclass
class Gallery:
    images: list[GalleryImage]


@dataclass
class Note:
    title: str
    text: str


@dataclass
class Statements:
    """What a study found, as sentences (``reports.findings.sentences``; the transfer
    tasks' sentences under their own title)."""

    items: list[str]
    title: str = "Findings"


Block = Header | Warnings | Table | Plot | Gallery | Note | Statements


@dataclass
class View:
    """One page view: the overview, or one study. ``metrics`` are (key, label) pairs
    offered by the metric control; ``default`` is selected first."""

    id: str
    label: str
    title: str
    metrics: list[tuple[str, str]]
    default: str | None
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Dashboard:
    title: str
    storage: str
    tracking: str | None
    views: list[View]
    empty: str = ""  # why there is no study to show, when there is none
    generated: datetime = field(default_factory=lambda: datetime.now().astimezone())

    @property
    def plots(self) -> list[Plot]:
        return [b for v in self.views for b in v.blocks if isinstance(b, Plot)]


# ------------------------------------------------------------------ the whole dashboard
def assemble(studies: Sequence[StudyData], storage: str, tracking: str | None,
             not_found: Sequence[str] = (), empty: str = "") -> Dashboard:
    """The dashboard of ``studies``; ``not_found`` lists studies asked for but absent
    (one line each), ``empty`` says why there are no studies when there are none."""
    findings = [review(d, setting_summary(d)) for d in studies]
    views = [overview(studies, findings, not_found, empty)]
    views += [study_view(f"s{i}", data, found) for i, (data, found) in enumerate(zip(studies, findings))]
    title = "masklab dashboard: " + (", ".join(d.name for d in studies) if studies else "no studies")
    return Dashboard(title=title, storage=redact(storage), tracking=redact(tracking) if tracking else None,
                     views=views, empty=empty)


# ------------------------------------------------------------------ overview
def overview(studies: Sequence[StudyData], findings: Sequence[list[Finding]], not_found: Sequence[str],
             empty: str) -> View:
    """All studies in one table and their trial states, then the cross-study comparison;
    ``findings`` are the studies' warnings (counted in the table)."""
    removal = compare.removal_table(studies)
    keys = compare.comparison_keys(studies, removal)
    labels = [(k, "each study's objective, % change" if k == compare.OBJECTIVE else k) for k in keys]
    view = View(OVERVIEW, "all studies", "All studies", labels, keys[0] if keys else None)
    if empty:
        view.blocks.append(Note("No studies", empty))
    for line in not_found:
        view.blocks.append(Note("Study not found", line))
    if not studies:
        return view
    rows = [_overview_row(d, len(found)) for d, found in zip(studies, findings)]
    view.blocks.append(Table("studies", "Studies", pd.DataFrame(rows), link="study",
                             note="pick a study in the menu above, or click its name"))
    counts = pd.DataFrame([state_counts(d) for d in studies], index=[d.name for d in studies]).fillna(0)
    view.blocks.append(Plot(f"{OVERVIEW}-states", "Trials by state",
                            _single(dash_figures.trial_states(counts.astype(int))), "no trials yet"))
    view.blocks += _comparison(studies, removal, keys)
    return view


def _overview_row(data: StudyData, warnings: int) -> dict[str, str]:
    counts = state_counts(data)
    return {
        "study": data.name,
        "model": compare.model_name(data),
        "kind": data.kind,
        "objective": f"{data.objective} ({data.direction})",
        "trials": ", ".join(f"{n} {s}" for s, n in counts.items()) or "none",
        "best": _best(data),
        "duration": _duration(data.trials),
        "warnings": str(warnings),
    }


def _comparison(studies: Sequence[StudyData], removal: pd.DataFrame, keys: list[str]) -> list[Block]:
    if len(studies) < 2 or not keys:
        why = "needs two or more studies" if len(studies) < 2 else "the studies share no metric"
        return [Note("Comparison across studies", f"Nothing to compare: {why}.")]

    def removal_curves(key: str) -> go.Figure | None:
        return dash_figures.removal_comparison(compare.removal_curves(removal, studies, key), key)

    def per_block(key: str) -> go.Figure | None:
        return dash_figures.per_block_comparison(compare.per_block_cost(removal, studies, key), key)

    def finals(key: str) -> go.Figure | None:
        return dash_figures.final_comparison(compare.final_values(studies, key), key)

    return [
        Note("Comparison across studies", "Layer-removal changes are measured from each trial's intact model "
             "(blocks removed = 0); the metric menu picks a metric the studies share, or each study's own "
             "objective as a percentage change."),
        Plot(f"{OVERVIEW}-removal", "Layer removal across studies", _variants(keys, removal_curves),
             "no layer-removal results for {metric} in two or more studies"),
        Plot(f"{OVERVIEW}-per-block", "Cost per block removed", _variants(keys, per_block),
             "no layer-removal results for {metric} in two or more studies"),
        Plot(f"{OVERVIEW}-finals", "Final metric across studies", _variants(keys, finals),
             "{metric}: not a final validation metric of two or more studies (pick a shared metric)"),
    ]


# ------------------------------------------------------------------ one study
def metric_keys(data: StudyData) -> list[str]:
    """The metrics a study view offers, as short names (``fw_loss`` stands for the final
    ``val/fw_loss``, the ``fw_loss`` layer-removal curve and the ``train/`` and ``val/``
    curves), and the transfer scores at the top layer by their full names
    (``transfer/sst2/probe_acc``): the objective first, then losses, then the rest."""
    a = data.ablation
    found = {c.removeprefix("val/") for c in data.final_metrics}
    found |= set(transfer.findings_metrics(data))
    found |= set(a.loc[a["variant"] == "truncate", "metric"])
    obj = compare.objective_key(data)
    if _final_column(data, obj):
        found.add(obj)
    return sorted(found, key=lambda k: (k != obj, not k.endswith("loss"), k))


def study_view(view_id: str, data: StudyData, findings: list[Finding]) -> View:
    """One study: its header and warnings (``findings``), its results table, figures
    with a variant per metric, reconstructions (image and video models), problem trials."""
    keys = metric_keys(data)
    obj = compare.objective_key(data)
    labels = [(k, f"{k} (objective)" if k == obj else k) for k in keys]
    view = View(view_id, data.name, f"Study {data.name}", labels, obj if obj in keys else (keys[0] if keys else None))
    effects = findings_frame(data)
    view.blocks.append(Header(_study_header(data)))
    if not data.complete.empty:
        view.blocks.append(Statements(sentences(data, effects)))
        view.blocks += _transfer_blocks(view_id, data)
    view.blocks.append(Warnings(findings))
    if data.complete.empty:
        counts = ", ".join(f"{n} {s}" for s, n in state_counts(data).items()) or "no trials at all"
        view.blocks.append(Note("Results", f"No trial has completed yet ({counts}): there are no results to "
                                           "summarise."))
    elif data.kind == "search":
        view.blocks.append(Table("best", "Best complete trials", display_frame(top_trials(data), raw=data.swept),
                                 "sorted by the objective"))
    else:
        perf = perf_metrics(data)
        shown = [*table_metrics(data), *perf]
        view.blocks.append(Table("summary", "Final validation metrics per setting" + (" and throughput" if perf else ""),
                                 display_summary(setting_summary(data, shown), shown),
                                 "mean ± sample std over complete replicates (n)" + (f"; {PERF_NOTE}" if perf else "")))
    view.blocks += _study_plots(view_id, data, keys, effects)
    # Only where the loader found the runs: asking MLflow for artifacts of a store that
    # does not exist would create an empty one.
    ran = "run_status" in data.complete and data.complete["run_status"].notna().any()
    gallery = reconstruction_gallery(data) if ran else []
    if gallery:
        view.blocks.append(Gallery(gallery))
    problems = trial_problems(data)
    if not problems.empty:
        view.blocks.append(Table("problems", "Trials that did not complete", display_frame(problems)))
    return view


def _transfer_blocks(view_id: str, data: StudyData) -> list[Block]:
    """The report's Transfer section: per task its sentences, the per-setting table
    against the three baselines, and the probe by layer (none without transfer metrics)."""
    tasks = transfer_sections(data)
    if not tasks:
        return []
    blocks: list[Block] = [Note("Transfer", TRANSFER_NOTE)]
    for t in tasks:
        if t.statements:
            blocks.append(Statements(t.statements, title=t.title))
        blocks.append(Table(f"{view_id}-{t.table.anchor}", f"{t.task}: scores per setting against the baselines",
                            t.table.frame))
        blocks.append(Plot(f"{view_id}-{t.figure.anchor}", f"{t.task}: linear probe by layer (mean over seeds, "
                           "95% CI; baselines and chance as lines)", _single(t.figure.figure),
                           f"No per-layer probe history of {t.task} in MLflow."))
    return blocks


def _study_plots(view_id: str, data: StudyData, keys: list[str], effects: pd.DataFrame) -> list[Plot]:
    def pid(name: str) -> str:
        return f"{view_id}-{name}"

    def forest(key: str) -> go.Figure | None:
        mine = [m for m in dict.fromkeys(effects["metric"])
                if m in (key, f"val/{key}") or m.startswith(f"ablation_delta/{key}_")]
        return report_figures.forest(effects, mine) if mine else None

    imp, why = param_importances(data)
    n_done = len(data.complete)
    plots = [
        Plot(pid("forest"), "Effects against each factor's baseline level, with 95% intervals",
             _variants(keys, forest), "no factor effect on {metric} (a search, or one level per factor)"),
        Plot(pid("layer-removal"), "Layer-removal curves (band: min-max over seeds)",
             _variants(keys, lambda k: report_figures.layer_removal(_only_ablation(data, k))),
             "no layer-removal result for {metric}"),
        Plot(pid("metric-vs-params"), "The metric against each swept parameter",
             _variants(keys, lambda k: _metric_vs_params(data, k)), "no final {metric} of a complete trial"),
        Plot(pid("parallel"), "Parallel coordinates",
             _variants(keys, lambda k: report_figures.parallel_coordinates(_as_objective(data, k))),
             "no complete trial with a final {metric}, or nothing swept"),
        Plot(pid("importances"), f"Parameter importances for {data.objective} (fANOVA; computed from {n_done} "
             "trials, no uncertainty: read the effects above for what is resolved)",
             _single(report_figures.importances(imp) if imp else None), f"No importances: {why}."),
        Plot(pid("curves"), "Training curves (MLflow)", _variants(keys, lambda k: dash_figures.training_curves(data, k)),
             "no train/{metric} or val/{metric} history in MLflow"),
        Plot(pid("intermediate"), "Values reported to Optuna at each validation",
             _single(report_figures.intermediate_values(data)), "No intermediate values reported."),
        Plot(pid("blocks"), "Per-block ablation", _single(report_figures.block_heatmaps(data)),
             "No per-block ablation recorded."),
    ]
    if data.kind == "search":
        plots.insert(4, Plot(pid("history"), "Optimization history", _single(report_figures.optimization_history(data)),
                             "No complete trial yet."))
    return plots


def _metric_vs_params(data: StudyData, key: str) -> go.Figure | None:
    """Final ``key`` against each swept parameter: the report's mean ± std lines for a
    grid (given only that metric's column), a scatter of the trials for a search."""
    column = _final_column(data, key)
    if column is None:
        return None
    if data.kind == "search":
        return dash_figures.metric_vs_search_params(data, column)
    keep = [c for c in data.trials.columns if not c.startswith("val/") or c == column]
    return report_figures.metric_vs_params(dataclasses.replace(data, trials=data.trials[keep], objective=column))


def _only_ablation(data: StudyData, key: str) -> StudyData:
    """The study with only the layer-removal curves of ``key`` (and of its forward or
    backward partner, so GPT studies show both directions side by side)."""
    a = data.ablation
    truncate = a[a["variant"] == "truncate"]
    names = {key}
    for fw, bw in direction_pairs(sorted(set(truncate["metric"]))):
        if key in (fw, bw):
            names = {fw, bw}
    return dataclasses.replace(data, ablation=truncate[truncate["metric"].isin(names)])


def _as_objective(data: StudyData, key: str) -> StudyData:
    """The study with ``val/<key>`` in the objective's place (the trials' ``value``).
    Its direction is the study's for the objective; for another metric it is guessed from
    the name: accuracies (``*_acc``) and transfer scores (accuracy, R²) are maximised,
    everything else minimised."""
    column = _final_column(data, key)
    if column is None:
        return dataclasses.replace(data, trials=data.trials.iloc[0:0])
    t = data.trials
    t = t[(t["state"] != "COMPLETE") | t[column].notna()].assign(value=lambda f: f[column])
    higher = key.endswith("acc") or transfer.higher_is_better(column)
    direction = data.direction if column == data.objective else ("maximize" if higher else "minimize")
    return dataclasses.replace(data, trials=t, objective=column, direction=direction)


def _final_column(data: StudyData, key: str) -> str | None:
    """The trials column holding the final value of metric ``key``, if there is one."""
    candidates = [f"val/{key}"] + ([data.objective] if key == compare.objective_key(data) else [])
    candidates += [key] if transfer.parse(key) is not None else []
    return next((c for c in candidates if c in data.trials), None)


def _study_header(data: StudyData) -> list[tuple[str, str]]:
    counts = state_counts(data)
    parent = f" (parent run {data.parent_run_id})" if data.parent_run_id else ""
    rows = [
        ("study", data.name),
        ("model", compare.model_name(data)),
        ("kind", data.kind),
        ("objective", f"{data.objective} ({data.direction})"),
        ("trials", f"{', '.join(f'{n} {s}' for s, n in counts.items()) or 'none'} ({len(data.trials)} in all)"),
        ("best", _best(data)),
        ("duration", _duration(data.trials)),
        ("swept", ", ".join(data.swept) or "nothing"),
    ]
    if data.spec.get("description"):
        rows.append(("description", str(data.spec["description"])))
    rows += [
        ("Optuna storage", redact(data.storage_url)),  # never a password (stores.urls.redact)
        ("MLflow tracking", f"{redact(data.tracking_uri) if data.tracking_uri else 'none'}{parent}"),
    ]
    return rows


# ------------------------------------------------------------------ small helpers
def _variants(keys: Sequence[str], make: Callable[[str], go.Figure | None]) -> dict[str, go.Figure]:
    """One figure per metric key, leaving out the keys with nothing to draw."""
    out = {}
    for k in keys:
        fig = make(k)
        if fig is not None:
            out[k] = fig
    return out


def _single(fig: go.Figure | None) -> dict[str, go.Figure]:
    """The variants of a figure that is the same for every metric (none if it is None)."""
    return {ALL: fig} if fig is not None else {}


def _best(data: StudyData) -> str:
    """The best setting by its mean objective over seeds (a grid: ``6.0768, mean of 2
    seeds (depth=4 p_bw=0)``), or the best trial of a search (``6.0768 (trial 0,
    lr=0.003)``)."""
    done = data.complete[data.complete["value"].notna()]
    if done.empty:
        return "—"
    if data.kind == "grid":
        means = done.groupby("setting")["value"].agg(["mean", "size"])
        best = means["mean"].idxmin() if data.direction != "maximize" else means["mean"].idxmax()
        return f"{means.at[best, 'mean']:.4f}, mean of {means.at[best, 'size']} seed(s) ({best})"
    row = done.sort_values("value", ascending=data.direction != "maximize", kind="stable").iloc[0]
    return f"{row['value']:.4f} (trial {row['number']}, {row['setting']})"


def _duration(trials: pd.DataFrame) -> str:
    """Wall time from the first trial's start to the last trial's end (or latest start,
    for a study still running): a stamp that does not change while nothing happens."""
    starts, ends = trials["start"].dropna(), trials["end"].dropna()
    if starts.empty:
        return "—"
    last = max([*ends, *starts])
    return format_seconds((last - starts.min()).total_seconds())


def format_seconds(s: float) -> str:
    """``42.0 s``, ``3 min 05 s``, ``2 h 04 min``."""
    if math.isnan(s):
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"
