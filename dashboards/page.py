"""The dashboard as one self-contained HTML page.

Layout: a bar with two controls (the view: all studies or one study; the metric), then
one ``<section>`` per view, only the selected one shown. Every figure is embedded as
plotly JSON in a single ``<script type="application/json">`` block (one spec per
distinct figure, the plotly template once) and drawn by the page's own script when its
view is shown or the metric changes: nothing is regenerated, nothing is fetched, and
plotly.js is inlined once, so the file opens offline.

The page carries a version stamp, a hash of everything it shows except the time it was
generated. Served by ``masklab dashboard --serve``, it polls ``version.json`` and
reloads itself when the stamp changes (the selected view and metric are kept in the URL
fragment, so a reload keeps them).
"""

from __future__ import annotations

import hashlib
import html
from urllib.parse import quote

import plotly.io as pio
from plotly.io.json import to_json_plotly
from plotly.offline import get_plotlyjs

from reports.study_report import TABLE_CSS

from .content import (
    OVERVIEW,
    Dashboard,
    Gallery,
    Header,
    Note,
    Plot,
    Statements,
    Table,
    View,
    Warnings,
)

VERSION_FILE = "version.json"


def render_page(dash: Dashboard, refresh: float | None = None) -> tuple[str, str]:
    """The page's HTML and its version stamp. ``refresh`` (seconds) makes a served page
    poll for a new version that often; a page opened from a file never polls."""
    head, specs = _payload(dash, refresh)
    sections = "\n".join(_section(v, i == 0) for i, v in enumerate(dash.views))
    stamp = hashlib.sha256()
    for text in (to_json_plotly(head), *specs, sections):
        stamp.update(text.encode())
    version = stamp.hexdigest()[:16]
    data = to_json_plotly({**head, "version": version})[:-1] + ',"specs":[' + ",".join(specs) + "]}"
    e = html.escape
    options = "".join(f"<option value='{v.id}'>{e(v.label)}</option>" for v in dash.views)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(dash.title)}</title><link rel='icon' href='data:,'><style>{CSS}</style></head><body>",
        "<header class='bar'><strong>masklab dashboard</strong>",
        f"<label>view <select id='view-select'>{options}</select></label>",
        "<label>metric <select id='metric-select'></select></label>",
        f"<span class='stamp'>generated {e(dash.generated.isoformat(timespec='seconds'))} from "
        f"{e(dash.storage)}{e(f' and {dash.tracking}' if dash.tracking else '')} <span id='live'></span></span>"
        "</header>",
        f"<main>\n{sections}\n</main>",
        f"<script type='application/json' id='masklab-data'>{_script_safe(data)}</script>",
    ]
    if specs:
        parts.append(f"<script>{get_plotlyjs()}</script>")
    parts += [f"<script>{SCRIPT}</script>", "</body></html>"]
    return "\n".join(parts), version


# ------------------------------------------------------------------ embedded data
def _payload(dash: Dashboard, refresh: float | None) -> tuple[dict, list[str]]:
    """The page's data without its figures, and the figures as JSON texts (the data's
    ``plots`` index into them). Identical figures (a metric whose curve is its partner's
    too) are stored once; the plotly template is stored once for all of them."""
    specs: list[str] = []
    index: dict[str, int] = {}
    plots = {}
    for plot in dash.plots:
        variants = {}
        for key, fig in plot.variants.items():
            spec = fig.to_plotly_json()
            spec["layout"].pop("template", None)
            text = to_json_plotly(spec)
            if text not in index:
                index[text] = len(specs)
                specs.append(text)
            variants[key] = index[text]
        plots[plot.id] = {"variants": variants, "missing": plot.missing}
    views = [{"id": v.id, "label": v.label, "default": v.default,
              "metrics": [{"key": k, "label": label} for k, label in v.metrics]} for v in dash.views]
    template = pio.templates[pio.templates.default].to_plotly_json() if specs else None
    head = {"refresh": refresh, "overview": OVERVIEW, "views": views, "plots": plots, "template": template}
    return head, specs


def _script_safe(text: str) -> str:
    """JSON inside a <script> element: no ``</script>`` or ``<!--`` can end it early."""
    return text.replace("<", "\\u003c")


# ------------------------------------------------------------------ sections
def _section(view: View, shown: bool) -> str:
    parts = [f"<section class='view' data-view='{view.id}'{'' if shown else ' hidden'}>",
             f"<h1>{html.escape(view.title)}</h1>"]
    for block in view.blocks:
        parts.append(_block(block))
    parts.append("</section>")
    return "\n".join(parts)


def _block(block) -> str:
    e = html.escape
    if isinstance(block, Header):
        rows = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in block.rows)
        return f"<dl class='header'>{rows}</dl>"
    if isinstance(block, Warnings):
        if not block.findings:
            return "<h2>Warnings</h2><p>None.</p>"
        items = "".join(f"<li><span class='kind'>{e(f.kind)}</span>: {e(f.message)}</li>" for f in block.findings)
        return f"<h2>Warnings</h2><ul class='warnings'>{items}</ul>"
    if isinstance(block, Note):
        return f"<h2>{e(block.title)}</h2><p class='note'>{e(block.text)}</p>"
    if isinstance(block, Statements):
        items = "".join(f"<li>{e(t)}</li>" for t in block.items) or "<li>No comparison could be made.</li>"
        return f"<h2>{e(block.title)}</h2><ul class='findings'>{items}</ul>"
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Plot):
        return (f"<h2>{e(block.title)}</h2><div class='plot' id='{block.id}'></div>"
                "<p class='note missing' hidden></p>")
    if isinstance(block, Gallery):
        figs = "".join(f"<figure><img alt='{e(g.setting)}' src='{g.data_uri()}'/><figcaption>{e(g.setting)}: "
                       f"trial {g.number}, seed {e(str(g.seed))}, {e(g.artifact)}</figcaption></figure>"
                       for g in block.images)
        return ("<h2>Reconstructions</h2><p class='note'>best complete trial of each setting, last validation"
                f"</p><div class='gallery'>{figs}</div>")
    raise TypeError(f"not a dashboard block: {type(block).__name__}")


def _table(t: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(c))}</th>" for c in t.frame.columns)
    rows = []
    for rec in t.frame.to_dict("records"):
        cells = []
        for col, value in rec.items():
            text = e(str(value))
            if col == t.link:
                text = f"<a href='#study={quote(str(value), safe='')}'>{text}</a>"
            cells.append(f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = f"<p class='note'>{e(t.note)}</p>" if t.note else ""
    body = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>" if rows else ""
    return f"<h2 id='{t.anchor}'>{e(t.title)}</h2>{note}{body}"


CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
main { max-width: 1300px; margin: 0 auto; padding: 0 1em 3em; }
header.bar { position: sticky; top: 0; z-index: 10; display: flex; gap: 1.2em; align-items: center;
  flex-wrap: wrap; padding: 0.5em 1em; background: #f3f5f8; border-bottom: 1px solid #ccd; }
header.bar select { font-size: 1em; margin-left: 0.3em; }
.stamp { color: #555; font-size: 0.85em; margin-left: auto; }
.plot { min-height: 200px; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; } .gallery img { width: min(100%, 480px); image-rendering: pixelated; }
""" + TABLE_CSS

# The page's behaviour: the two controls, drawing the visible figures, the URL fragment
# (#study=NAME&metric=KEY) and, when served, polling for a new version.
SCRIPT = r"""
(() => {
  "use strict";
  const D = JSON.parse(document.getElementById("masklab-data").textContent);
  const viewSelect = document.getElementById("view-select");
  const metricSelect = document.getElementById("metric-select");
  const CONFIG = {displaylogo: false, responsive: true};
  const chosen = {};  // view id -> the metric picked there
  const drawn = {};   // plot id -> the spec it shows

  const viewOf = (id) => D.views.find((v) => v.id === id) || D.views[0];

  function fillMetrics(view) {
    metricSelect.textContent = "";
    for (const m of view.metrics) metricSelect.add(new Option(m.label, m.key));
    metricSelect.disabled = view.metrics.length === 0;
    if (view.metrics.length) metricSelect.value = chosen[view.id] || view.default;
  }

  function drawPlot(div, metric, label) {
    const plot = D.plots[div.id];
    const index = metric in plot.variants ? plot.variants[metric] : plot.variants["*"];
    const missing = div.nextElementSibling;
    if (index === undefined) {
      div.hidden = true;
      missing.hidden = false;
      missing.textContent = plot.missing.split("{metric}").join(label || "this metric");
      return;
    }
    div.hidden = false;
    missing.hidden = true;
    if (drawn[div.id] === index) {
      Plotly.Plots.resize(div);
      return;
    }
    const spec = JSON.parse(JSON.stringify(D.specs[index]));  // plotly annotates what it draws
    Plotly.react(div, spec.data, Object.assign(spec.layout, {template: D.template}), CONFIG);
    drawn[div.id] = index;
  }

  function show() {
    const view = viewOf(viewSelect.value);
    const metric = metricSelect.value;
    const label = metricSelect.selectedIndex >= 0 ? metricSelect.options[metricSelect.selectedIndex].text : "";
    if (metric) chosen[view.id] = metric;
    for (const section of document.querySelectorAll("section.view")) {
      section.hidden = section.dataset.view !== view.id;
    }
    const section = document.querySelector(`section.view[data-view="${view.id}"]`);
    for (const div of section.querySelectorAll("div.plot")) drawPlot(div, metric, label);
    const parts = [];
    if (view.id !== D.overview) parts.push("study=" + encodeURIComponent(view.label));
    if (metric) parts.push("metric=" + encodeURIComponent(metric));
    history.replaceState(null, "", "#" + parts.join("&"));
  }

  function fromFragment() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    const study = params.get("study");
    const view = D.views.find((v) => v.id !== D.overview && v.label === study) || viewOf(D.overview);
    const metric = params.get("metric");
    if (metric && view.metrics.some((m) => m.key === metric)) chosen[view.id] = metric;
    viewSelect.value = view.id;
    fillMetrics(view);
    show();
  }

  viewSelect.addEventListener("change", () => { fillMetrics(viewOf(viewSelect.value)); show(); });
  metricSelect.addEventListener("change", show);
  window.addEventListener("hashchange", fromFragment);
  fromFragment();

  if (D.refresh && location.protocol.startsWith("http")) {
    const live = document.getElementById("live");
    live.textContent = `· live, checks every ${D.refresh} s`;
    setInterval(() => {
      fetch("VERSION_FILE", {cache: "no-store"})
        .then((r) => (r.ok ? r.json() : null))
        .then((v) => { if (v && v.version !== D.version) location.reload(); })
        .catch(() => { live.textContent = "· live, server not reachable"; });
    }, D.refresh * 1000);
  }
})();
""".replace("VERSION_FILE", VERSION_FILE)
