"""``masklab status``: a table of a study's trials, read from the Optuna store alone.

Imports optuna and pandas only (no torch, Lightning or MLflow), so it answers in about
a second.
"""

from __future__ import annotations

import optuna
import pandas as pd

from lit_modules.config_errors import ConfigError
from stores import keys
from stores.storage import (
    StudyNotFoundError,
    list_studies,
    open_storage,
    trial_params,
    trial_seconds,
)
from stores.urls import redact


def load_trials(name: str, storage_url: str) -> tuple[optuna.Study, pd.DataFrame]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = open_storage(storage_url)  # sqlite, PostgreSQL or journal file
    except StudyNotFoundError:
        raise ConfigError("--storage", redact(storage_url), "no such store; run the study first (masklab run SPEC)") from None
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = list_studies(storage)
        raise ConfigError("study", name, f"not in {redact(storage_url)} (studies there: {', '.join(known) or 'none'})") from None
    swept = study.user_attrs.get(keys.SWEPT, [])
    rows = []
    for t in study.get_trials(deepcopy=False):
        params = trial_params(t)  # a queued (WAITING) grid trial: the values it was enqueued with
        row = {"trial": t.number, **{p.split(".")[-1]: params.get(p) for p in swept}}
        if "seed" in params:
            row["seed"] = params["seed"]
        note = t.user_attrs.get(keys.FAILURE, "")
        if keys.RETRY_OF_TRIAL in t.user_attrs:  # a trial whose worker died, run again
            note = f"retry of trial {t.user_attrs[keys.RETRY_OF_TRIAL]}" + (f"; {note}" if note else "")
        row.update(state=t.state.name, value=t.value, seconds=trial_seconds(t), note=note)
        rows.append(row)
    return study, pd.DataFrame(rows)


def study_status(name: str, storage_url: str) -> str:
    study, df = load_trials(name, storage_url)
    objective = study.user_attrs.get(keys.OBJECTIVE, "value")
    head = f"study {name} ({study.user_attrs.get(keys.KIND, '?')}, {study.direction.name.lower()} {objective})"
    if df.empty:
        return head + ": no trials yet"
    counts = df["state"].value_counts().to_dict()
    head += ": " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    df = df.rename(columns={"value": objective})
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
        return head + "\n" + df.to_string(index=False, na_rep="", float_format=lambda v: f"{v:.4g}")
