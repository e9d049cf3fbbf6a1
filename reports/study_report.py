"""The report of one study: ``report.md`` (tables and warnings) and a single
self-contained ``report.html`` (the same plus interactive figures; plotly.js embedded
once, so the page opens offline).

    data = load_study("gpt_pbw", "sqlite:///masklab-runs/optuna.db")
    md_path, html_path = write_report(data, "masklab-runs/reports/gpt_pbw")
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd

from stores.urls import redact

from . import figures, transfer
from .checks import Finding, review
from .effects import POOLED
from .findings import findings_frame, removal_increments, sentences, write_findings
from .loader import StudyData
from .tables import (
    PERF_NOTE,
    display_frame,
    display_summary,
    markdown_table,
    perf_metrics,
    ranked,
    setting_summary,
    state_counts,
    table_metrics,
    top_trials,
    trial_problems,
)

REPORT_MD, REPORT_HTML = "report.md", "report.html"
__all__ = ["REPORT_HTML", "REPORT_MD", "summary_table", "write_report"]


@dataclass
class Table:
    anchor: str
    title: str
    frame: pd.DataFrame  # already formatted as text
    note: str = ""


@dataclass
class Figure:
    anchor: str
    title: str
    figure: object | None  # a plotly Figure, or None with a note saying why there is none
    note: str = ""


@dataclass
class TransferTask:
    """One task of the Transfer section: sentences, the per-setting table, the layer-wise figure."""

    task: str
    title: str
    statements: list[str]
    table: Table
    figure: Figure


@dataclass
class Report:
    title: str
    header: list[tuple[str, str]]
    findings: list[Finding]
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    empty: str = ""  # set when no trial has completed
    spec: str = ""
    gallery: list = field(default_factory=list)  # GalleryImage, for image and video models
    statements: list[str] = field(default_factory=list)  # what the study found, in sentences
    effects: pd.DataFrame = field(default_factory=pd.DataFrame)  # effects.COLUMNS, one row per comparison
    transfer: list[TransferTask] = field(default_factory=list)  # empty: no run has transfer metrics

    @property
    def all_figures(self) -> list[Figure]:
        return [t.figure for t in self.transfer] + self.figures


# ------------------------------------------------------------------ public API
def summary_table(data: StudyData) -> pd.DataFrame:
    """The numeric per-setting summary (see ``tables.setting_summary``)."""
    return setting_summary(data)


def write_report(data: StudyData, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(data)
    md_path, html_path = out / REPORT_MD, out / REPORT_HTML
    md_path.write_text(render_markdown(report), encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    write_findings(report.effects, out)
    return md_path, html_path


def build_report(data: StudyData) -> Report:
    summary = setting_summary(data)
    report = Report(title=f"Study report: {data.name}", header=_header(data),
                    findings=review(data, summary), spec=_spec_text(data.spec))
    if data.complete.empty:
        counts = ", ".join(f"{n} {s}" for s, n in state_counts(data).items()) or "no trials at all"
        report.empty = f"No trial has completed yet ({counts}): there are no results to summarise."
    else:
        importance = param_importances(data) if data.kind == "search" else (None, "")
        report.effects = findings_frame(data)
        report.statements = sentences(data, report.effects) or _no_statements(data)
        report.transfer = transfer_sections(data)
        report.tables += _result_tables(data, summary, importance, report.effects)
        report.figures += _figures(data, importance, report.effects)
        from .gallery import reconstruction_gallery

        report.gallery = reconstruction_gallery(data)
    problems = trial_problems(data)
    if not problems.empty:
        report.tables.append(Table("problem-trials", "Trials that did not complete", display_frame(problems)))
    return report


# ------------------------------------------------------------------ content
def _header(data: StudyData) -> list[tuple[str, str]]:
    counts = state_counts(data)
    trials = ", ".join(f"{n} {s}" for s, n in counts.items()) or "none"
    parent = f" (parent run {data.parent_run_id})" if data.parent_run_id else ""
    spec = data.spec
    what = ", ".join(f"{k} {_name_of(spec.get(k))}" for k in ("model", "data") if spec.get(k))
    rows = [
        ("study", data.name),
        ("kind", data.kind),
        ("objective", f"{data.objective} ({data.direction})"),
        ("trials", f"{trials} ({len(data.trials)} in all)"),
        ("swept", ", ".join(data.swept) or "nothing"),
    ]
    if what:
        rows.append(("runs", what))
    for line in data.data_summary:
        rows.append(("data", line))
    best = _best_setting(data)
    if best:
        rows.append(("best setting", best))
    if data.expected_replicates:
        rows.append(("replicates per setting", str(data.expected_replicates)))
    rows += [
        ("Optuna storage", redact(data.storage_url)),  # never a password (stores.urls.redact)
        ("MLflow tracking", f"{redact(data.tracking_uri) if data.tracking_uri else 'none'}{parent}"),
        ("read at", data.loaded_at.isoformat(timespec="seconds")),
        ("generated", datetime.now().astimezone().isoformat(timespec="seconds")),
    ]
    return rows


def _best_setting(data: StudyData) -> str:
    """The best setting of a grid by its mean objective over seeds (never one seed)."""
    if data.kind != "grid" or data.complete.empty:
        return ""
    top = ranked(setting_summary(data, [data.objective]), data.objective, data.direction)
    if top.empty:
        return ""
    r = top.iloc[0]
    return (f"{r['setting']}: mean {data.objective} {r[f'{data.objective} mean']:.4f} over {r['n']} seed(s); "
            "see Findings for whether it is resolved from the others")


def _no_statements(data: StudyData) -> list[str]:
    if data.kind != "grid":
        return ["A search samples settings rather than crossing factors, so it has no factor effects to "
                "report; see the best complete trials and parameter importances below."]
    return ["No comparison could be made: no two levels of a swept factor have complete trials."]


def effects_display(effects: pd.DataFrame) -> pd.DataFrame:
    """The comparisons as text: difference and relative difference with their 95%
    intervals, Holm p, resolved, the minimum detectable effect and the seeds needed."""
    if effects.empty:
        return pd.DataFrame()

    def interval(v, lo, hi, pct=False) -> str:
        if pd.isna(v):
            return "—"
        k, f = (100, "+.1f") if pct else (1, "+.4g")
        ci = "no CI" if pd.isna(lo) else f"[{lo * k:{f}}, {hi * k:{f}}]"
        return f"{v * k:{f}}{'%' if pct else ''} {ci}"

    e = effects
    return pd.DataFrame({
        "metric": e["metric"],
        "comparison": [f"{f} = {lv} vs {b}" for f, lv, b in zip(e["factor"], e["level"], e["baseline"])],
        "held": [h.replace(";", " ") if h else "—" for h in e["held"]],
        "n": e["n"].astype(int),
        "difference [95% CI]": [interval(*x) for x in zip(e["mean_diff"], e["ci_low"], e["ci_high"])],
        "relative": [interval(*x, pct=True) for x in zip(e["rel_diff"], e["rel_ci_low"], e["rel_ci_high"])],
        "Holm p": [f"{p:.3g}" if pd.notna(p) else "—" for p in e["p_holm"]],
        "resolved": ["yes" if r else "no" for r in e["resolved"]],
        "MDE (80%)": [f"{m:.4g}" if pd.notna(m) else "—" for m in e["mde"]],
        "seeds needed": ["—" if pd.isna(n) else (">100,000" if n == float("inf") else f"{int(n)}")
                         for n in e["n_needed"]],
    })


def removal_display(data: StudyData) -> pd.DataFrame:
    """Loss added by removing each block from the back, per setting: mean [95% CI]."""
    inc = removal_increments(data)
    if inc.empty:
        return pd.DataFrame()
    inc = inc.assign(cell=[f"{m:+.3f}" + ("" if pd.isna(lo) else f" [{lo:+.3f}, {hi:+.3f}]")
                           for m, lo, hi in zip(inc["mean"], inc["ci_low"], inc["ci_high"])])
    wide = inc.pivot_table(index=["metric", "setting"], columns="k", values="cell", aggfunc="first", sort=False)
    wide.columns = [f"block {k} removed" for k in wide.columns]
    n = inc.groupby(["metric", "setting"], sort=False)["n"].max()
    return wide.assign(n=n).reset_index().fillna("—")


TRANSFER_NOTE = ("Linear probes on frozen features (a fine-tune where logged), scored on held-out rows of each "
                 "task; the top layer unless said otherwise; mean over complete seeds with a 95% t-interval. "
                 "Baselines (mean over the setting's runs): the majority class, logistic regression on TF-IDF "
                 "(text) or raw pixels (images, clips), and the same architecture at random init with the same "
                 "probe on the primary feature; '− random init' pairs each run with its own random-init model. "
                 "Effects of the swept factors on these scores, with their intervals, are in Findings.")


def transfer_sections(data: StudyData) -> list[TransferTask]:
    """One entry per transfer task with results (none when no run has transfer metrics)."""
    settings = figures.shown_settings(data)
    out = []
    for task in transfer.tasks(data):
        table = transfer.summary(data, task, settings)
        if table.empty:
            continue
        slug = "".join(c if c.isalnum() else "-" for c in task.lower())
        title = transfer.task_title(task)
        out.append(TransferTask(
            task, title, transfer.sentences(data, task, table),
            Table(f"transfer-{slug}", title, transfer.display(data, task, table)),
            Figure(f"transfer-{slug}-layers", f"{task}: linear probe by layer", figures.transfer_layers(data, task),
                   "no per-layer probe history in MLflow")))
    return out


def _result_tables(data: StudyData, summary: pd.DataFrame, importance, effects: pd.DataFrame) -> list[Table]:
    metrics = table_metrics(data)
    tables = []
    if not effects.empty:
        tables.append(Table("effects", "Effects: each level against its factor's baseline", effects_display(effects),
                            note="paired by seed (Welch where no seed is shared); 95% t-intervals; Holm-corrected p "
                                 "over every comparison; resolved = the interval excludes 0; MDE = the smallest "
                                 "effect detected with 80% power at this n and spread; seeds needed = to detect an "
                                 f"effect of the observed size with 80% power; held '{POOLED}' averages each seed's "
                                 "differences over the other factors; A:B rows are interactions (findings.csv)"))
    if data.kind == "search":
        tables.append(Table("best-trials", "Best complete trials", display_frame(top_trials(data), raw=data.swept),
                            note="sorted by the objective"))
        imp, why = importance
        if imp:
            frame = pd.DataFrame({"parameter": list(imp), "importance": list(imp.values())})
            tables.append(Table("importances", "Parameter importances (fANOVA)", display_frame(frame, 3)))
        else:
            tables.append(Table("importances", "Parameter importances", pd.DataFrame(), note=why))
    else:
        perf = perf_metrics(data)
        shown = setting_summary(data, [*metrics, *perf]) if perf else summary
        tables.append(Table("summary", "Final validation metrics per setting" + (" and throughput" if perf else ""),
                            display_summary(shown, [*metrics, *perf]),
                            note="mean ± sample std over complete replicates (n); parameters = model.parameters"
                                 + (f"; {PERF_NOTE}" if perf else "")))
    removal = removal_display(data)
    if not removal.empty:
        tables.append(Table("layer-removal-table", "Layer removal: loss added by removing each block from the back",
                            removal, note="value with k blocks removed minus value with k - 1 removed; mean over "
                                          "seeds [95% t-interval] (n seeds)"))
    return tables


def param_importances(data: StudyData) -> tuple[dict[str, float] | None, str]:
    """fANOVA importances of the swept params, or None and the reason there are none."""
    if data.study is None:
        return None, "the Optuna study object was not loaded"
    if len(data.complete) < 2:
        return None, f"needs at least 2 complete trials (have {len(data.complete)})"
    import optuna

    try:
        return optuna.importance.get_param_importances(data.study), ""
    except (ImportError, ValueError, RuntimeError, ZeroDivisionError) as e:
        return None, f"could not be computed: {e}"


def _figures(data: StudyData, importance, effects: pd.DataFrame) -> list[Figure]:
    out = [
        Figure("forest", "Effects with 95% intervals", figures.forest(effects),
               "no factor effects (a search, or a single level per factor)"),
        Figure("metric-vs-params", "Metrics against the swept parameters", figures.metric_vs_params(data),
               "not a grid study, or no complete trials"),
        Figure("metric-vs-flops", "Metrics against training compute", figures.metric_vs_flops(data),
               "no train/flops recorded (runs from before compute accounting)"),
        Figure("layer-removal", "Layer-removal curves", figures.layer_removal(data),
               "no ablation recorded for the complete trials"),
        Figure("block-heatmaps", "Per-block ablation", figures.block_heatmaps(data),
               "no per-block ablation recorded"),
        Figure("validation-curves", f"{data.objective} during training", figures.validation_curves(data),
               f"{data.objective} is measured after training (see Transfer)" if transfer.parse(data.objective)
               else f"no {data.objective} history in MLflow"),
    ]
    if data.kind == "search":
        imp, why = importance
        out += [
            Figure("optimization-history", "Optimization history", figures.optimization_history(data)),
            Figure("importance-plot", "Parameter importances", figures.importances(imp) if imp else None, why),
            Figure("parallel-coordinates", "Parallel coordinates", figures.parallel_coordinates(data),
                   "no swept parameters"),
            Figure("intermediate-values", "Intermediate values", figures.intermediate_values(data),
                   "no intermediate values reported"),
        ]
    return out


def _spec_text(spec: dict) -> str:
    if not spec:
        return ""
    try:
        import yaml

        return yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=100).rstrip()
    except (ImportError, yaml.YAMLError):
        return json.dumps(spec, indent=2, default=str)


def _name_of(v) -> str:
    return str(v.get("name", "?")) if isinstance(v, dict) else str(v)


# ------------------------------------------------------------------ Markdown
def render_markdown(report: Report) -> str:
    lines = [f"# {report.title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in report.header]
    figs = [f for f in report.all_figures if f.figure is not None]
    if figs:
        links = " · ".join(f"[{f.title}]({REPORT_HTML}#{f.anchor})" for f in figs)
        lines += ["", f"Figures are in [{REPORT_HTML}]({REPORT_HTML}): {links}"]
    if report.gallery:
        lines += ["", f"Reconstructions of {len(report.gallery)} setting(s): [{REPORT_HTML}]({REPORT_HTML}#gallery)"]
    if report.statements:
        lines += ["", "## Findings", ""]
        lines += [f"- {t}" for t in report.statements]
        if not report.effects.empty:
            lines += ["", "Every comparison, with its interval, power and the seeds it would need: the Effects table "
                          "below and `findings.csv` / `findings.json` beside this report."]
    lines += _markdown_transfer(report.transfer)
    lines += ["", "## Warnings", ""]
    lines += [f"- **{f.kind}**: {f.message}" for f in report.findings] or ["None."]
    if report.empty:
        lines += ["", "## Results", "", report.empty]
    for t in report.tables:
        lines += ["", f"## {t.title}", ""]
        if t.note:
            lines += [f"_{t.note}_", ""]
        if not t.frame.empty:
            lines.append(markdown_table(t.frame))
    if report.spec:
        lines += ["", "## Spec", "", "```yaml", report.spec, "```"]
    return "\n".join(lines) + "\n"


def _markdown_transfer(tasks: list[TransferTask]) -> list[str]:
    if not tasks:
        return []
    lines = ["", "## Transfer", "", f"_{TRANSFER_NOTE}_"]
    for t in tasks:
        lines += ["", f"### {t.title}", ""]
        lines += [f"- {s}" for s in t.statements]
        if t.statements:
            lines.append("")
        lines.append(markdown_table(t.table.frame))
        if t.figure.figure is not None:
            lines += ["", f"Layer-wise figure: [{t.figure.title}]({REPORT_HTML}#{t.figure.anchor})"]
    return lines


# ------------------------------------------------------------------ HTML
# Tables, headers and warnings: shared with the dashboard's page.
TABLE_CSS = """
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
dl.header { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.header dt { font-weight: 600; } dl.header dd { margin: 0; font-family: monospace; }
.warnings li { margin: 0.2em 0; } .kind { font-weight: 600; color: #a33; }
.note { color: #555; font-style: italic; }
"""
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; padding: 0 1em; color: #222; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
""" + TABLE_CSS


def render_html(report: Report) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(report.title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{e(report.title)}</h1>", "<dl class='header'>"]
    parts += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in report.header]
    parts.append("</dl>")
    if report.statements:
        parts.append("<h2 id='findings'>Findings</h2><ul class='findings'>"
                     + "".join(f"<li>{e(t)}</li>" for t in report.statements) + "</ul>")
    embedded = [False]  # plotly.js goes inline with the first figure drawn
    if report.transfer:
        parts.append(f"<h2 id='transfer'>Transfer</h2><p class='note'>{e(TRANSFER_NOTE)}</p>")
        for t in report.transfer:
            parts.append(f"<h3 id='{t.table.anchor}'>{e(t.title)}</h3>")
            if t.statements:
                parts.append("<ul class='transfer'>" + "".join(f"<li>{e(s)}</li>" for s in t.statements) + "</ul>")
            parts.append(t.table.frame.to_html(index=False, border=0, escape=True))
            parts += _html_figures([t.figure], embedded, level=3)
    parts.append("<h2 id='warnings'>Warnings</h2>")
    if report.findings:
        parts.append("<ul class='warnings'>" + "".join(
            f"<li><span class='kind'>{e(f.kind)}</span>: {e(f.message)}</li>" for f in report.findings) + "</ul>")
    else:
        parts.append("<p>None.</p>")
    if report.empty:
        parts.append(f"<h2 id='results'>Results</h2><p>{e(report.empty)}</p>")
    for t in report.tables:
        parts.append(f"<h2 id='{t.anchor}'>{e(t.title)}</h2>")
        if t.note:
            parts.append(f"<p class='note'>{e(t.note)}</p>")
        if not t.frame.empty:
            parts.append(t.frame.to_html(index=False, border=0, escape=True))
    parts += _html_figures(report.figures, embedded)
    if report.gallery:
        parts.append("<h2 id='gallery'>Reconstructions</h2><p class='note'>best complete trial of each setting, "
                     "last validation; rows: original | masked | reconstruction | reconstruction with the "
                     "visible patches pasted back</p>")
        for g in report.gallery:
            parts.append(f"<figure><img alt='{e(g.setting)}' src='{g.data_uri()}'/>"
                         f"<figcaption>{e(g.setting)}: trial {g.number}, seed {e(str(g.seed))}, "
                         f"{e(g.artifact)}</figcaption></figure>")
    if report.spec:
        parts.append(f"<h2 id='spec'>Spec</h2><pre>{e(report.spec)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_figures(figs: list[Figure], embedded: list[bool], level: int = 2) -> list[str]:
    """Each figure as a div; the first one of the page (``embedded[0]`` still False)
    carries plotly.js inline, the rest reuse it."""
    parts = []
    for f in figs:
        parts.append(f"<h{level} id='{f.anchor}'>{html.escape(f.title)}</h{level}>")
        if f.figure is None:
            if f.note:
                parts.append(f"<p class='note'>{html.escape(f.note)}</p>")
            continue
        parts.append(f.figure.to_html(full_html=False, include_plotlyjs=not embedded[0],
                                      config={"displaylogo": False, "responsive": True}))
        embedded[0] = True
    return parts
