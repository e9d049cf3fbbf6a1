"""Plotly figures of a study, built from the loader's tidy DataFrames.

Every function returns a ``plotly.graph_objects.Figure`` or None when the study has
nothing to show for it (the report then leaves the section out or says why).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from . import transfer
from .loader import StudyData, format_value
from .tables import ablation_metrics, table_metrics

PALETTE = qualitative.Plotly + qualitative.Dark24
# Search studies can have hundreds of trials; curves and heatmaps show the best few.
TOP_SEARCH_TRIALS = 8
# A positive parameter spanning this factor or more (learning rates) gets a log10 axis.
LOG_AXIS_RATIO = 100
PRUNED_COLOR, OTHER_COLOR = "#d62728", "rgba(120,120,120,0.45)"


def shown_settings(data: StudyData) -> list[str]:
    """Settings to draw: all of a grid; for a search, the best complete trials."""
    if data.kind != "search":
        return data.settings
    done = data.complete.sort_values("value", ascending=data.direction != "maximize", kind="stable")
    return list(dict.fromkeys(done["setting"].head(TOP_SEARCH_TRIALS)))


def _rgba(color: str, alpha: float) -> str:
    c = color.lstrip("#")
    r, g, b = (int(c[i: i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


# ------------------------------------------------------------------ reference levels and colours
# One sequential scale per factor: lines coloured by a factor's levels use that factor's
# scale, so two factors never share a colour in one legend.
FACTOR_SCALES = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")
CHANCE_LINE = {"dash": "dot", "color": "#7f7f7f", "width": 1.5}
BASELINE_LINE = {"dash": "dash", "color": "#444", "width": 1}
# The transfer baselines' reference lines: majority class, TF-IDF / raw pixels, random init.
TRANSFER_LINES = {"majority": {"dash": "dash", "color": "#8c564b", "width": 1.5},
                  "tfidf": {"dash": "dashdot", "color": "#2ca02c", "width": 1.5},
                  "pixels": {"dash": "dashdot", "color": "#2ca02c", "width": 1.5},
                  "random_init": {"dash": "longdash", "color": "#444", "width": 1.5}}


def factor_colors(data: StudyData, factors: list[str]) -> dict[tuple, str]:
    """Colour of each combination of ``factors``' levels, from the first factor's own
    scale (darker = later level)."""
    from plotly.colors import sample_colorscale

    scale = FACTOR_SCALES[data.swept.index(factors[0]) % len(FACTOR_SCALES)] if factors else "Greys"
    combos = sorted({tuple(r) for r in data.complete[factors].itertuples(index=False, name=None)},
                    key=lambda t: tuple(_sort_key(v) for v in t)) if factors else [()]
    points = [0.45 + 0.5 * i / max(1, len(combos) - 1) for i in range(len(combos))]
    return dict(zip(combos, sample_colorscale(scale, points)))


def _sort_key(v):
    return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))


def add_chance(fig: go.Figure, data: StudyData, metric: str, row: int | None = None, col: int | None = None) -> None:
    """A dotted horizontal line at ``metric``'s chance level, where it has one."""
    from .findings import chance_levels

    chance = chance_levels(data, [metric]).get(metric)
    if chance is not None:
        fig.add_hline(y=chance.value, line=CHANCE_LINE, annotation_text=f"chance ({chance.label})",
                      annotation_position="top left", annotation_font_size=10, row=row, col=col)


def category_labels(data: StudyData, param: str, values) -> list[str]:
    """Tick labels of a swept parameter as categories; the baseline level says so."""
    from .findings import baselines

    base = baselines(data).get(param)
    return [f"{format_value(v)} (baseline)" if base is not None and _same_level(v, base) else format_value(v)
            for v in values]


def _same_level(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-15)
    except (TypeError, ValueError):
        return a == b


# ------------------------------------------------------------------ metric vs parameter
def metric_vs_params(data: StudyData) -> go.Figure | None:
    """Final validation metrics against each swept parameter of a grid: one panel per
    (metric, parameter), the parameter's levels as categories (in grid order, the
    baseline marked), one line per combination of the other swept parameters in that
    factor's own colour scale, mean over seeds with error bars of one sample std, and
    the metric's chance level."""
    if data.kind == "search" or not data.swept:
        return None
    done = data.complete
    metrics = [m for m in table_metrics(data) if m in done.columns and done[m].notna().any()]
    if done.empty or not metrics:
        return None
    params = [p for p in data.swept if p in done.columns]
    fig = make_subplots(rows=len(metrics), cols=len(params), shared_xaxes="columns",
                        subplot_titles=[f"{m} vs {p}" for m in metrics for p in params])
    for c, param in enumerate(params, start=1):
        others = [p for p in params if p != param]
        colors = factor_colors(data, others)
        levels = sorted(done[param].dropna().unique().tolist(), key=_sort_key)
        ticks = dict(zip(map(format_value, levels), category_labels(data, param, levels)))
        groups = done.groupby(others, dropna=False, sort=True) if others else [((), done)]
        for key, part in groups:
            key = key if isinstance(key, tuple) else (key,)
            label = " ".join(f"{o.split('.')[-1]}={format_value(k)}" for o, k in zip(others, key)) or "all"
            color = colors.get(key, OTHER_COLOR)
            for r, metric in enumerate(metrics, start=1):
                stats = part.groupby(param)[metric].agg(["mean", "std", "count"]).reset_index()
                stats = stats.iloc[sorted(range(len(stats)), key=lambda i: _sort_key(stats[param].iloc[i]))]
                x = [ticks[format_value(v)] for v in stats[param]]
                fig.add_trace(go.Scatter(
                    x=x, y=stats["mean"], error_y={"type": "data", "array": stats["std"].fillna(0)},
                    mode="lines+markers", name=label, legendgroup=f"{param}-{label}", line={"color": color},
                    showlegend=r == 1, customdata=stats["count"], legendgrouptitle_text=f"lines: {', '.join(others)}"
                    if others else None,
                    hovertemplate=f"{label}<br>{param} %{{x}}<br>{metric} %{{y:.4f}} (n=%{{customdata}})<extra></extra>",
                ), row=r, col=c)
        fig.update_xaxes(type="category", categoryorder="array", categoryarray=list(ticks.values()), col=c)
        fig.update_xaxes(title_text=param, row=len(metrics), col=c)
    for r, metric in enumerate(metrics, start=1):
        fig.update_yaxes(title_text=metric, row=r, col=1)
        for c in range(1, len(params) + 1):
            add_chance(fig, data, metric, row=r, col=c)
    fig.update_layout(title="Final validation metrics against each swept parameter (mean ± std over seeds)",
                      height=300 * len(metrics) + 80, legend={"groupclick": "toggleitem"})
    return fig


# ------------------------------------------------------------------ effects
def forest(effects: pd.DataFrame, metrics: list[str] | None = None) -> go.Figure | None:
    """Forest plot: every comparison's relative difference (%) against the baseline
    level with its 95% interval, one panel per metric; a line at 0 (the baseline); one
    colour per factor; filled markers for resolved effects (interval excludes 0),
    hollow for unresolved ones."""
    if effects is None or effects.empty:
        return None
    metrics = [m for m in (metrics or list(dict.fromkeys(effects["metric"]))) if m in set(effects["metric"])]
    if not metrics:
        return None
    factors = list(dict.fromkeys(effects["factor"]))
    colors = {f: PALETTE[i % len(PALETTE)] for i, f in enumerate(factors)}
    rows_per = [len(effects[effects["metric"] == m]) for m in metrics]
    fig = make_subplots(rows=len(metrics), cols=1, subplot_titles=metrics, row_heights=rows_per,
                        vertical_spacing=min(0.3 / max(1, len(metrics) - 1), 60 / (sum(rows_per) * 22 + 80)))
    shown = set()
    for r, metric in enumerate(metrics, start=1):
        part = effects[effects["metric"] == metric]
        for factor in factors:
            sub = part[part["factor"] == factor]
            if sub.empty:
                continue
            labels = [_effect_label(e) for e in sub.to_dict("records")]
            rel = sub["rel_diff"] * 100
            fig.add_trace(go.Scatter(
                x=rel, y=labels, mode="markers", name=factor, legendgroup=factor, showlegend=factor not in shown,
                marker={"color": colors[factor], "size": 9, "symbol": ["circle" if x else "circle-open"
                                                                       for x in sub["resolved"]]},
                error_x={"type": "data", "symmetric": False, "array": (sub["rel_ci_high"] * 100 - rel).fillna(0),
                         "arrayminus": (rel - sub["rel_ci_low"] * 100).fillna(0)},
                customdata=np.stack([sub["n"], sub["p_holm"].fillna(np.nan), sub["mean_diff"]], axis=1),
                hovertemplate="%{y}<br>%{x:+.2f}% (diff %{customdata[2]:+.4g}), n=%{customdata[0]}, "
                              "Holm p=%{customdata[1]:.3g}<extra></extra>"), row=r, col=1)
            shown.add(factor)
        fig.add_vline(x=0, line=BASELINE_LINE, row=r, col=1)
        fig.update_yaxes(autorange="reversed", type="category", row=r, col=1)
    fig.update_xaxes(title_text="difference from the baseline level, % of the baseline (95% CI)", row=len(metrics), col=1)
    fig.update_layout(title="Effects against each factor's baseline level (filled: 95% CI excludes 0)",
                      height=120 + 22 * sum(rows_per) + 40 * len(metrics), legend_title_text="factor")
    return fig


def _effect_label(e: dict) -> str:
    held = "" if not e["held"] else (" (pooled)" if e["held"] == "pooled" else f" @ {e['held'].replace(';', ' ')}")
    return f"{e['factor']}: {e['level']} vs {e['baseline']}{held}"


# ------------------------------------------------------------------ layer removal
def layer_removal(data: StudyData) -> go.Figure | None:
    """Val metric against blocks removed from the back: one line per setting (mean over
    seeds), a band from the min to the max over seeds."""
    t = data.ablation[data.ablation["variant"] == "truncate"]
    metrics = [m for m in ablation_metrics(data) if m in set(t["metric"])]
    settings = [s for s in shown_settings(data) if s in set(t["setting"])]
    if not metrics or not settings:
        return None
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics, shared_xaxes=True)
    for col, metric in enumerate(metrics, start=1):
        stats = (t[t["metric"] == metric].groupby(["setting", "removed"])["value"]
                 .agg(["mean", "min", "max", "count"]).reset_index())
        for i, setting in enumerate(settings):
            s = stats[stats["setting"] == setting].sort_values("removed")
            if s.empty:
                continue
            color = PALETTE[i % len(PALETTE)]
            x = s["removed"].astype(int).tolist()
            if (s["count"] > 1).any():
                fig.add_trace(go.Scatter(
                    x=x + x[::-1], y=s["max"].tolist() + s["min"].tolist()[::-1], fill="toself", mode="lines",
                    fillcolor=_rgba(color, 0.15), line={"width": 0}, hoverinfo="skip", showlegend=False,
                    legendgroup=setting), row=1, col=col)
            fig.add_trace(go.Scatter(
                x=x, y=s["mean"], mode="lines+markers", name=setting, legendgroup=setting,
                line={"color": color}, showlegend=col == 1, customdata=s["count"],
                hovertemplate=f"{setting}<br>removed %{{x}}<br>{metric} %{{y:.4f}} (n=%{{customdata}})<extra></extra>",
            ), row=1, col=col)
        fig.update_xaxes(title_text="blocks removed from the back", dtick=1, row=1, col=col)
        fig.update_yaxes(title_text=metric, row=1, col=col)
        add_chance(fig, data, f"val/{metric}", row=1, col=col)
    fig.update_layout(title="Layer removal: validation metrics (mean over seeds; band = min-max)",
                      height=420, legend_title_text="setting")
    return fig


def block_heatmaps(data: StudyData) -> go.Figure | None:
    """Per-block panels, blocks (x) by setting (y), mean over seeds: Block Influence,
    angular distance to the next block's input, and for each plotted metric the change
    when one block is dropped alone (drop-one minus the intact model)."""
    settings = shown_settings(data)
    panels = [(t, z.reindex(index=[s for s in settings if s in z.index])) for t, z in _block_panels(data)]
    panels = [(t, z) for t, z in panels if not z.empty]
    if not panels:
        return None
    n_set = max(len(z) for _, z in panels)
    panel_px = 90 + 26 * n_set  # title + axis + one row of cells per setting
    height = panel_px * len(panels)
    gap = 60 / height if len(panels) == 1 else min(60 / height, 0.5 / (len(panels) - 1))  # px -> fraction
    fig = make_subplots(rows=len(panels), cols=1, subplot_titles=[t for t, _ in panels], vertical_spacing=gap)
    for row, (title, z) in enumerate(panels, start=1):
        axis = "yaxis" if row == 1 else f"yaxis{row}"
        lo, hi = fig.layout[axis].domain
        fig.add_trace(go.Heatmap(
            z=z.to_numpy(dtype=float), x=[int(b) for b in z.columns], y=list(z.index), colorscale="Viridis",
            colorbar={"y": (lo + hi) / 2, "len": hi - lo, "thickness": 12}, name=title,
            hovertemplate="%{y}<br>block %{x}<br>%{z:.4f}<extra></extra>"), row=row, col=1)
        fig.update_yaxes(autorange="reversed", row=row, col=1)
        fig.update_xaxes(dtick=1, row=row, col=1)
    fig.update_xaxes(title_text="block", row=len(panels), col=1)
    fig.update_layout(title="Per-block ablation (mean over seeds)", height=height + 80)
    return fig


def _block_panels(data: StudyData) -> list[tuple[str, pd.DataFrame]]:
    a = data.ablation
    panels = []
    bi = a[a["variant"] == "block_influence"]
    ang = a[(a["variant"] == "angular_distance") & (a["removed"] == 1)]
    for title, part in (("Block Influence, 1 - cos(x_i, x_i+1)", bi),
                        ("angular distance between the inputs of blocks i and i+1", ang)):
        if not part.empty:
            panels.append((title, _by_setting_and_block(part)))
    for metric in ablation_metrics(data):
        drop = a[(a["variant"] == "drop_one") & (a["metric"] == metric)]
        if drop.empty:
            continue
        full = a[(a["variant"] == "truncate") & (a["removed"] == 0) & (a["metric"] == metric)]
        full = full.set_index("number")["value"]
        if drop["number"].isin(full.index).all():
            drop = drop.assign(value=drop["value"] - drop["number"].map(full).to_numpy())
            panels.append((f"drop-one: change in {metric} when block i alone is removed", _by_setting_and_block(drop)))
        else:
            panels.append((f"drop-one: {metric} with block i alone removed", _by_setting_and_block(drop)))
    return panels


def _by_setting_and_block(part: pd.DataFrame) -> pd.DataFrame:
    return part.groupby(["setting", "block"])["value"].mean().unstack("block")


def metric_vs_flops(data: StudyData) -> go.Figure | None:
    """Each final metric (validation and transfer) against the run's training FLOPs (log
    axis): one point per complete trial, one colour per setting, the metric's chance
    level. Settings that cost different compute (depth, a generator) meet here."""
    from . import transfer

    done = data.complete
    if done.empty or "train/flops" not in done.columns or not done["train/flops"].notna().any():
        return None
    metrics = list(dict.fromkeys([*table_metrics(data), *transfer.findings_metrics(data)]))
    metrics = [m for m in metrics if m in done.columns and done[m].notna().any()]
    if not metrics:
        return None
    settings = list(dict.fromkeys(done["setting"]))
    colors = setting_colors(data, settings)
    fig = make_subplots(rows=len(metrics), cols=1, subplot_titles=[f"{m} vs training FLOPs" for m in metrics])
    for r, metric in enumerate(metrics, start=1):
        for setting in settings:
            part = done[done["setting"] == setting]
            fig.add_trace(go.Scatter(
                x=part["train/flops"], y=part[metric], mode="markers", name=setting, legendgroup=setting,
                marker={"color": colors.get(setting, OTHER_COLOR), "size": 9}, showlegend=r == 1,
                hovertemplate=f"{setting}<br>%{{x:.3g}} FLOPs<br>{metric} %{{y:.4f}}<extra></extra>",
            ), row=r, col=1)
        fig.update_yaxes(title_text=metric, row=r, col=1)
        fig.update_xaxes(type="log", title_text="training FLOPs (train/flops)", row=r, col=1)
        add_chance(fig, data, metric, row=r, col=1)
    fig.update_layout(title="Final metrics against training compute (one point per trial)",
                      height=300 * len(metrics) + 80)
    return fig


# ------------------------------------------------------------------ transfer
def setting_colors(data: StudyData, settings: list[str]) -> dict[str, str]:
    """One colour per setting: for a grid, from the first swept factor's own scale
    (``factor_colors``); for a search, the palette in rank order."""
    swept = [s for s in data.swept if s in data.complete]
    if data.kind == "search" or not swept:
        return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(settings)}
    combos = factor_colors(data, swept)
    first = data.complete.drop_duplicates("setting").set_index("setting")
    return {s: combos.get(tuple(first.loc[s, swept]), OTHER_COLOR) if s in first.index else OTHER_COLOR
            for s in settings}


def transfer_layers(data: StudyData, task: str) -> go.Figure | None:
    """The linear probes of ``task`` by layer: one panel per feature kind (the primary
    first), layers as categories (0 = embeddings), one line per setting (mean over seeds,
    error bars the 95% t-interval), and reference lines for the majority-class,
    TF-IDF / raw-pixel and random-init baselines (the latter measured with the primary
    feature at the top layer: drawn on its panel, one per setting where they differ) and
    for chance."""
    metrics = [m for m in transfer.task_metrics(data, task, ("probe",))
               if m in set(data.transfer_layers["metric"])]
    settings = shown_settings(data)
    curves = {m: transfer.layer_summary(data, m) for m in metrics}
    settings = [s for s in settings if any(s in set(c["setting"]) for c in curves.values())]
    if not metrics or not settings:
        return None
    layers = sorted({int(x) for c in curves.values() for x in c["layer"]})
    cats = [str(k) for k in layers]
    colors = setting_colors(data, settings)
    fig = make_subplots(rows=1, cols=len(metrics), shared_yaxes=True,
                        subplot_titles=[transfer.score_label(m, data) for m in metrics])
    for col, metric in enumerate(metrics, start=1):
        c = curves[metric]
        for setting in settings:
            s = c[c["setting"] == setting].sort_values("layer")
            if s.empty:
                continue
            half = (s["ci_high"] - s["mean"]).fillna(0)
            fig.add_trace(go.Scatter(
                x=[str(k) for k in s["layer"]], y=s["mean"], mode="lines+markers", name=setting,
                legendgroup=setting, showlegend=col == 1, line={"color": colors[setting]},
                error_y={"type": "data", "array": half.tolist(), "visible": bool((s["n"] > 1).any())},
                customdata=np.stack([s["n"], s["ci_low"], s["ci_high"]], axis=1), meta="setting",
                hovertemplate=f"{setting}<br>layer %{{x}}<br>{metric} %{{y:.4f}} [%{{customdata[1]:.4f}}, "
                              "%{customdata[2]:.4f}] (n=%{customdata[0]})<extra></extra>"), row=1, col=col)
        _transfer_references(fig, data, task, metric, cats, settings, colors, col, primary=col == 1)
        fig.update_xaxes(type="category", categoryorder="array", categoryarray=cats,
                         title_text="layer (0 = embeddings)", row=1, col=col)
    score = transfer.parse(metrics[0]).score
    fig.update_yaxes(title_text="probe R²" if score == "r2" else "probe accuracy", row=1, col=1)
    fig.update_layout(title=f"{transfer.task_title(task)}: linear probe on frozen features by layer "
                            "(mean over seeds, 95% CI)", height=440, legend_title_text="setting",
                      legend={"groupclick": "toggleitem"})
    return fig


def _transfer_references(fig: go.Figure, data: StudyData, task: str, metric: str, cats: list[str],
                         settings: list[str], colors: dict[str, str], col: int, primary: bool) -> None:
    """The baselines and chance as horizontal lines across every layer (legend entries,
    shown once); random init only on the primary feature's panel."""
    done = data.complete[data.complete["setting"].isin(settings)]
    refs = []
    for name, column in transfer.baseline_metrics(data, task).items():
        if name == "random_init" and not primary:
            continue
        per = done.groupby("setting")[column].mean().dropna()
        if per.empty:
            continue
        label = transfer.BASELINE_LABELS.get(name, name)
        style = TRANSFER_LINES.get(name, BASELINE_LINE)
        if name == "random_init" and per.max() - per.min() > transfer.RANDOM_INIT_SPREAD:
            refs += [(f"{label}: {s}", v, {**style, "color": colors.get(s, OTHER_COLOR)}) for s, v in per.items()]
        else:
            refs.append((label, float(done[column].mean()), style))
    level = transfer.chance(metric)
    if level is not None:
        refs.append((f"chance ({level[1]})", level[0], CHANCE_LINE))
    for label, value, style in refs:
        name = label if label.startswith("chance") else f"{label} ({value:.4f})"
        fig.add_trace(go.Scatter(
            x=[cats[0], cats[-1]], y=[value, value], mode="lines", name=name, line=style,
            legendgroup=f"reference: {label}", showlegend=col == 1, meta="reference",
            hovertemplate=f"{label}: {value:.4f}<extra></extra>"), row=1, col=col)


# ------------------------------------------------------------------ training curves
def validation_curves(data: StudyData) -> go.Figure | None:
    """The objective's validation history, one line per trial, coloured by setting."""
    c = data.curves[data.curves["metric"] == data.objective]
    settings = shown_settings(data)
    if c.empty or not settings:
        return None
    info = data.trials.set_index("number")[["setting", "seed"]]
    fig = go.Figure()
    for i, setting in enumerate(settings):
        numbers = info.index[info["setting"] == setting]
        for j, number in enumerate(numbers):
            s = c[c["number"] == number].sort_values("step")
            if s.empty:
                continue
            fig.add_trace(go.Scatter(
                x=s["step"], y=s["value"], mode="lines+markers", name=setting, legendgroup=setting,
                showlegend=j == 0, line={"color": PALETTE[i % len(PALETTE)], "width": 1.5},
                hovertemplate=f"trial {number} ({setting}, seed {info.at[number, 'seed']})<br>"
                              "step %{x}<br>%{y:.4f}<extra></extra>"))
    add_chance(fig, data, data.objective)
    fig.update_layout(title=f"{data.objective} during training (one line per trial)", xaxis_title="global step",
                      yaxis_title=data.objective, height=420, legend_title_text="setting")
    return fig


# ------------------------------------------------------------------ search studies
def optimization_history(data: StudyData) -> go.Figure | None:
    done = data.complete.sort_values("number")
    if done.empty:
        return None
    best = done["value"].cummin() if data.direction != "maximize" else done["value"].cummax()
    fig = go.Figure([
        go.Scatter(x=done["number"], y=done["value"], mode="markers", name="trial", text=done["setting"],
                   hovertemplate="trial %{x}<br>%{text}<br>%{y:.4f}<extra></extra>"),
        go.Scatter(x=done["number"], y=best, mode="lines", name="best so far", line={"shape": "hv"}),
    ])
    fig.update_layout(title="Optimization history", xaxis_title="trial", yaxis_title=data.objective, height=400,
                      xaxis={"dtick": _integer_dtick(done["number"].max())})
    return fig


def importances(values: dict[str, float]) -> go.Figure:
    names = sorted(values, key=values.get)
    fig = go.Figure(go.Bar(x=[values[n] for n in names], y=names, orientation="h",
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(title="Parameter importances (fANOVA)", xaxis_title="importance",
                      height=max(260, 80 + 40 * len(names)))
    return fig


def parallel_coordinates(data: StudyData) -> go.Figure | None:
    done = data.complete
    params = [s for s in data.swept if s in done]
    if done.empty or not params:
        return None
    dims = []
    for p in params:
        col = done[p]
        numeric = pd.to_numeric(col, errors="coerce")
        if numeric.notna().all() and (numeric > 0).all() and numeric.max() / numeric.min() >= LOG_AXIS_RATIO:
            dims.append({"label": f"log10 {p}", "values": np.log10(numeric).tolist()})
        elif numeric.notna().all():
            dims.append({"label": p, "values": numeric.tolist()})
        else:  # categorical: codes on the axis, the category names as ticks
            cats = sorted(col.astype(str).unique())
            dims.append({"label": p, "values": [cats.index(v) for v in col.astype(str)],
                         "tickvals": list(range(len(cats))), "ticktext": cats})
    dims.append({"label": data.objective, "values": done["value"].tolist()})
    reverse = data.direction != "maximize"
    fig = go.Figure(go.Parcoords(dimensions=dims, line={
        "color": done["value"], "colorscale": "Viridis", "reversescale": reverse, "showscale": True}))
    fig.update_layout(title="Parallel coordinates (complete trials)", height=420)
    return fig


def intermediate_values(data: StudyData) -> go.Figure | None:
    """The objective as reported at each validation; pruned trials highlighted."""
    iv = data.intermediate
    if iv.empty:
        return None
    state = data.trials.set_index("number")["state"]
    fig = go.Figure()
    shown = set()
    for number, s in iv.groupby("number"):
        st = state.get(number, "?")
        pruned = st == "PRUNED"
        group = "pruned" if pruned else "other trials"
        fig.add_trace(go.Scatter(
            x=s["step"], y=s["value"], mode="lines+markers", name=group, legendgroup=group,
            showlegend=group not in shown, line={"color": PRUNED_COLOR if pruned else OTHER_COLOR,
                                                 "width": 2 if pruned else 1},
            hovertemplate=f"trial {number} ({st})<br>validation %{{x}}<br>%{{y:.4f}}<extra></extra>"))
        shown.add(group)
    fig.update_layout(title="Intermediate values (pruned trials in red)", xaxis_title="validation index",
                      yaxis_title=data.objective, height=400,
                      xaxis={"dtick": _integer_dtick(iv["step"].max())})
    return fig


def _integer_dtick(largest: int) -> int:
    """Whole-number ticks on an index axis, about ten of them at most."""
    return max(1, math.ceil((int(largest) + 1) / 10))
