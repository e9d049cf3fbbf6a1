"""Study reports: stores (Optuna + MLflow) -> tidy DataFrames -> findings, Markdown and HTML.

- ``reports.loader``: ``load_study`` / ``list_studies``, the one reader of the stores
  (through ``stores``);
- ``reports.effects``: effects of a factorial study with confidence intervals, Holm's
  correction and power (pure pandas/numpy/scipy);
- ``reports.findings``: the comparisons of a study, the sentences that state them,
  layer removal in words, chance levels, ``findings.csv`` / ``findings.json``;
- ``reports.transfer``: the transfer stage's scores (linear probes by layer, fine-tunes,
  baselines): which are findings metrics, chance levels and direction, per-task tables;
- ``reports.tables``: per-setting summaries and trial tables (pandas);
- ``reports.checks``: the warnings a reviewer needs (bw < fw, failed / pruned / missing
  trials, short replicates, store problems);
- ``reports.figures``: plotly figures from the DataFrames (forest plot, layer removal,
  metrics against the swept parameters, ...);
- ``reports.study_report``: ``write_report`` -> ``report.md`` + self-contained
  ``report.html`` + the findings files.

Nothing here imports torch, Lightning or ``studies``; of ``lit_modules`` only the
torch-free config helpers; MLflow only when a tracking store is read. Import the
submodules directly (this package imports nothing on its own).
"""
