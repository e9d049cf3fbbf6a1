"""The store layer: what masklab writes into its stores and how it finds them again.

``studies`` writes the stores (Optuna storage, MLflow tracking store) and ``reports`` and
``dashboards`` read them; both go through this package, so the two sides agree on one
set of names and nothing that reads imports what runs:

- ``stores.keys``: every ``masklab.*`` Optuna user attribute and MLflow tag, by name;
- ``stores.urls``: storage and tracking URLs (sqlite files, PostgreSQL, journal files,
  tracking servers), parsed without importing Optuna or MLflow;
- ``stores.storage``: opening Optuna storages (to read, or to share among workers),
  listing studies, lock-study names, trial ids and heartbeats through Optuna's API;
- ``stores.grid``: grid expansion and the identity of a grid point.

Nothing here imports torch, Lightning or MLflow; ``stores.storage`` imports Optuna.
Import the submodules directly (this package imports nothing on its own).
"""
