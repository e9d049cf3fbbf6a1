"""Dashboards: stores (Optuna + MLflow) -> one interactive, self-contained HTML page.

- ``dashboards.build``: ``load_dashboard`` (the studies, through ``reports.loader``) and
  ``write_dashboard`` -> ``dashboard.html``;
- ``dashboards.content``: what the page shows: an overview view and one view per study,
  each figure with a variant per metric;
- ``dashboards.compare``: the cross-study comparison (change per block removed);
- ``dashboards.figures``: the figures the dashboard adds to ``reports.figures``;
- ``dashboards.page``: the HTML, the embedded data and the page's script (the controls);
- ``dashboards.serve``: ``masklab dashboard --serve``, kept fresh while studies run.

Like ``reports``, nothing here imports torch or Lightning, nor ``studies`` (the stores are
read through ``reports.loader`` and ``stores``). Import the submodules directly (this
package imports nothing on its own).
"""
