"""Study reports: stores (Optuna + MLflow) -> tidy DataFrames -> Markdown and HTML.

- ``reports.loader``: ``load_study`` / ``list_studies``, the one reader of the stores;
- ``reports.tables``: per-setting summaries, p_bw ratios, trial tables (pandas);
- ``reports.checks``: the warnings a reviewer needs (bw < fw, unresolved differences,
  failed / pruned / missing trials, short replicates);
- ``reports.figures``: plotly figures from the DataFrames;
- ``reports.study_report``: ``write_report`` -> ``report.md`` + self-contained ``report.html``.

Nothing here imports torch, Lightning or lit_modules; MLflow only when a tracking store
is read. Import the submodules directly (this package imports nothing on its own).
"""
