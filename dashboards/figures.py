"""Figures the dashboard adds to the report's (``reports.figures``): a metric against
each parameter of a search, train and validation curves of any metric, trial states
per study, and the cross-study comparison. Each returns a plotly Figure, or None when
there is nothing to draw.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import hex_to_rgb
from plotly.subplots import make_subplots

from reports.figures import LOG_AXIS_RATIO, OTHER_COLOR, PALETTE, shown_settings
from reports.loader import StudyData

from .compare import OBJECTIVE

STATE_COLORS = {"COMPLETE": "#2ca02c", "PRUNED": "#ff7f0e", "FAIL": "#d62728", "RUNNING": "#1f77b4",
                "WAITING": "#9467bd"}
# A curve with this few points or fewer gets markers: a single validation is otherwise invisible.
SPARSE = 20


# ------------------------------------------------------------------ one study
def metric_vs_search_params(data: StudyData, column: str) -> go.Figure | None:
    """A search's complete trials: ``column`` against each swept parameter (one panel
    each, log axis for a positive parameter spanning ``LOG_AXIS_RATIO`` or more),
    coloured by trial number so the sampler's drift shows."""
    done = data.complete
    params = [p for p in data.swept if p in done]
    if column not in done or not params:
        return None
    done = done[done[column].notna()]
    if done.empty:
        return None
    fig = make_subplots(rows=1, cols=len(params), shared_yaxes=True, subplot_titles=params)
    for c, param in enumerate(params, start=1):
        x = done[param]
        numeric = pd.to_numeric(x, errors="coerce")
        log = bool(numeric.notna().all() and (numeric > 0).all() and numeric.max() / numeric.min() >= LOG_AXIS_RATIO)
        fig.add_trace(go.Scatter(
            x=x if numeric.notna().all() else x.astype(str), y=done[column], mode="markers", showlegend=False,
            marker={"color": done["number"], "colorscale": "Viridis", "size": 9, "showscale": c == len(params),
                    "colorbar": {"title": {"text": "trial"}}},
            customdata=done["number"],
            hovertemplate=f"trial %{{customdata}}<br>{param} %{{x}}<br>{column} %{{y:.4f}}<extra></extra>"),
            row=1, col=c)
        fig.update_xaxes(title_text=param, type="log" if log else None, row=1, col=c)
    fig.update_yaxes(title_text=column, row=1, col=1)
    fig.update_layout(title=f"{column} against each searched parameter (complete trials)", height=400)
    return fig


def training_curves(data: StudyData, key: str) -> go.Figure | None:
    """``train/<key>`` and ``val/<key>`` during training, one line per trial, coloured
    by setting (a search: its best settings coloured, the other trials grey)."""
    metrics = [m for m in (f"train/{key}", f"val/{key}") if m in set(data.curves["metric"])]
    if not metrics:
        return None
    colored = shown_settings(data)
    info = data.trials.set_index("number")[["setting", "seed", "state"]]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics)
    shown: set[str] = set()
    for col, metric in enumerate(metrics, start=1):
        c = data.curves[data.curves["metric"] == metric]
        for number, s in c.groupby("number", sort=True):
            setting, seed, state = info.loc[number] if number in info.index else ("?", None, "?")
            known = setting in colored
            group = setting if known else "other trials"
            color = PALETTE[colored.index(setting) % len(PALETTE)] if known else OTHER_COLOR
            fig.add_trace(go.Scatter(
                x=s["step"], y=s["value"], mode="lines" if len(s) > SPARSE else "lines+markers",
                name=group, legendgroup=group,
                showlegend=group not in shown, line={"color": color, "width": 1.5 if known else 1},
                hovertemplate=f"trial {number} ({setting}, seed {seed}, {state})<br>step %{{x}}<br>"
                              f"{metric} %{{y:.4f}}<extra></extra>"), row=1, col=col)
            shown.add(group)
        fig.update_xaxes(title_text="global step", row=1, col=col)
    fig.update_layout(title=f"{key} during training (one line per trial)", height=420,
                      legend_title_text="setting")
    return fig


# ------------------------------------------------------------------ all studies
def trial_states(counts: pd.DataFrame) -> go.Figure | None:
    """Trials by state per study: one horizontal stacked bar per study. ``counts`` has
    one row per study and one column per state."""
    if counts.empty:
        return None
    fig = go.Figure()
    for state in counts.columns:
        fig.add_trace(go.Bar(y=counts.index, x=counts[state], name=state, orientation="h",
                             marker={"color": STATE_COLORS.get(state, OTHER_COLOR)},
                             hovertemplate=f"%{{y}}: %{{x}} {state}<extra></extra>"))
    fig.update_layout(title="Trials by state", barmode="stack", xaxis_title="trials",
                      yaxis={"autorange": "reversed", "type": "category", "dtick": 1},
                      legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"},
                      height=160 + 40 * len(counts))
    return fig


def removal_comparison(curves: pd.DataFrame, key: str) -> go.Figure | None:
    """The change from the intact model against blocks removed, one line per study
    (mean over complete trials, band from min to max); None unless two studies have one."""
    if curves["study"].nunique() < 2:
        return None
    what = "% change of each study's objective" if key == OBJECTIVE else f"change in {key}"
    fig = go.Figure()
    for i, (study, s) in enumerate(curves.groupby("study", sort=False)):
        s = s.sort_values("removed")
        color = PALETTE[i % len(PALETTE)]
        x = s["removed"].astype(int).tolist()
        label = f"{study} ({s['model'].iloc[0]}, {s['metric'].iloc[0]})"
        if (s["n"] > 1).any():
            fig.add_trace(go.Scatter(x=x + x[::-1], y=s["max"].tolist() + s["min"].tolist()[::-1], fill="toself",
                                     mode="lines", fillcolor=_translucent(color), line={"width": 0},
                                     hoverinfo="skip", showlegend=False, legendgroup=study))
        fig.add_trace(go.Scatter(x=x, y=s["mean"], mode="lines+markers", name=label, legendgroup=study,
                                 line={"color": color}, customdata=s["n"],
                                 hovertemplate=f"{label}<br>removed %{{x}}<br>{what} %{{y:.4f}} "
                                               "(n=%{customdata})<extra></extra>"))
    fig.update_layout(title=f"Layer removal across studies: {what} (mean over complete trials; band = min-max)",
                      xaxis={"title": {"text": "blocks removed from the back"}, "dtick": 1},
                      yaxis_title=what, height=440, legend_title_text="study (model, metric)")
    return fig


def per_block_comparison(cost: pd.DataFrame, key: str) -> go.Figure | None:
    """Change per block removed, one bar per study, coloured by model family, error bar
    one sample std over trials; None unless two studies have one."""
    if cost["study"].nunique() < 2:
        return None
    what = "% of the objective per block" if key == OBJECTIVE else f"{key} change per block"
    fig = go.Figure()
    for i, (model, s) in enumerate(cost.groupby("model", sort=True)):
        fig.add_trace(go.Bar(
            x=s["study"], y=s["mean"], name=model, marker={"color": PALETTE[i % len(PALETTE)]},
            error_y={"type": "data", "array": s["std"].fillna(0).to_numpy()},
            customdata=np.stack([s["n"], s["metric"]], axis=-1),
            hovertemplate="%{x} (%{customdata[1]})<br>%{y:.4f} per block (n=%{customdata[0]})<extra></extra>"))
    fig.update_layout(title=f"Cost of removing blocks: {what} (slope through the origin; mean ± std over trials)",
                      yaxis_title=what, height=400, legend_title_text="model family")
    return fig


def final_comparison(values: pd.DataFrame, key: str) -> go.Figure | None:
    """The final ``val/<key>`` of every complete trial, one box per study."""
    if values["study"].nunique() < 2:
        return None
    fig = go.Figure()
    for i, (study, s) in enumerate(values.groupby("study", sort=False)):
        fig.add_trace(go.Box(y=s["value"], name=study, boxpoints="all", jitter=0.3, pointpos=0,
                             marker={"color": PALETTE[i % len(PALETTE)]}, text=s["setting"],
                             hovertemplate=f"{study}<br>%{{text}}<br>val/{key} %{{y:.4f}}<extra></extra>"))
    fig.update_layout(title=f"Final val/{key} across studies (complete trials)", yaxis_title=f"val/{key}",
                      showlegend=False, height=400)
    return fig


def _translucent(color: str) -> str:
    """A light fill of a ``#rrggbb`` line colour, for min-max bands."""
    r, g, b = hex_to_rgb(color)
    return f"rgba({r},{g},{b},0.15)"
