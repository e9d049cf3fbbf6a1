"""One loader from the stores (Optuna + MLflow) to tidy pandas DataFrames.

Reports and dashboards read a study only through :func:`load_study`; nothing here
touches a live trainer, and nothing here imports torch, Lightning or ``studies``
(``masklab report`` and ``status`` must answer in about a second). The keys it reads are
the ``stores.keys`` constants the runner writes. MLflow (~2 s to import) is imported
only when a tracking store is actually read.

Frames of a :class:`StudyData` (see the dataclass for the columns):
- ``trials``: one row per Optuna trial, joined to its MLflow child run;
- ``ablation``: one row per trial x variant x removed x block x metric (the
  ``ablation.csv`` artifact of each run, or its ``ablation/*`` metrics when the artifact
  is missing);
- ``curves``: the ``train/*`` and ``val/*`` histories, one row per trial x metric x step;
- ``intermediate``: the values the objective reported to Optuna at each validation;
- ``transfer_layers``: the linear probes of the transfer stage by layer (the
  ``transfer/<task>/probe_*`` histories, step = layer), one row per trial x metric x layer.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import optuna
import pandas as pd

from lit_modules.config import flatten
from stores import keys
from stores.grid import expand_grid
from stores.storage import StudyNotFoundError as StudyNotFoundError  # readers catch it from here
from stores.storage import list_studies as list_studies  # readers list the studies from here
from stores.storage import load_study as load_optuna_study
from stores.storage import open_storage, trial_params, trial_seconds
from stores.urls import describe, redact, sqlite_path

ABLATION_COLUMNS = ["variant", "removed", "block", "metric", "value"]
CURVE_STAGES = ("train/", "val/")
COMPUTE = ("train/flops", "train/tokens")  # a run's training compute (cumulative; its last value)
PERF = "perf/"  # a run's throughput (lit_modules/perf.py): its last value, the run's figure
TRANSFER = "transfer/"  # transfer metrics: latest value (top layer) in ``trials``, probes by layer
TRANSFER_PARAMS = ("transfer.tasks", "transfer.features")  # list params, as str() of the list
TRANSFER_LAYER_COLUMNS = ["task", "feature", "metric", "layer", "value"]
TRANSFER_CSV = "transfer.csv"  # the tidy table of a run's transfer stage: task, feature, layer, metric, value
# MLflow caps one search_runs page at 1000 runs (larger pages are refused).
RUNS_PAGE = 1000
# Run ids per bulk metric-history query: keeps the SQL ``IN (...)`` list small.
BULK_CHUNK = 200


@dataclass
class StudyData:
    """Everything a report needs about one study, read from the stores.

    ``trials`` columns: number, state, value, duration_s, start, end, one column per
    Optuna parameter (dotted path, e.g. ``model.depth``; ``seed`` is not one of them),
    setting, seed, replicate, grid_key, config_hash, run_id, run_status, failure,
    model.parameters, the final value of every ``val/*`` metric of the runs, and where
    runs have a transfer stage the latest value (top layer) of every ``transfer/*``
    metric and the ``transfer.tasks`` / ``transfer.features`` params (text, as logged).
    ``ablation`` columns: number, setting, seed, <swept params>, variant, removed, block,
    metric, value, source ("artifact" or "metrics"); ``removed`` and ``block`` are Int64.
    ``curves`` columns: number, metric, step, value. ``intermediate``: number, step, value.
    ``transfer_layers`` columns: number, setting, seed, <swept params>, task, feature (the
    feature kind: from the runs' ``transfer.csv``, else the metric's suffix, "" for an
    unnamed primary feature), metric (the full ``transfer/<task>/probe_*`` name), layer
    (0 = embeddings), value.
    """

    name: str
    kind: str  # "grid", "search", or "unknown" when the study has no masklab attributes
    objective: str
    direction: str  # "minimize" | "maximize"
    spec: dict[str, Any]
    swept: list[str]
    storage_url: str
    tracking_uri: str | None
    parent_run_id: str | None
    trials: pd.DataFrame
    ablation: pd.DataFrame
    curves: pd.DataFrame
    intermediate: pd.DataFrame
    transfer_layers: pd.DataFrame = field(default_factory=lambda: _empty_transfer([]))
    notes: list[str] = field(default_factory=list)  # problems met while reading the stores
    data_summary: list[str] = field(default_factory=list)  # what the runs trained and were scored on
    loaded_at: datetime = field(default_factory=lambda: datetime.now().astimezone())
    study: optuna.Study | None = field(default=None, repr=False)  # for optuna.importance

    @property
    def settings(self) -> list[str]:
        """Setting labels in the order of their swept values."""
        return setting_order(self.trials, self.swept)

    @property
    def complete(self) -> pd.DataFrame:
        return self.trials[self.trials["state"] == "COMPLETE"]

    @property
    def final_metrics(self) -> list[str]:
        """The final-metric columns of ``trials`` (``val/*``), objective first."""
        found = [c for c in self.trials.columns if c.startswith("val/")]
        return sorted(found, key=lambda c: (c != self.objective, c))

    @property
    def expected_replicates(self) -> int | None:
        return expected_replicates(self.spec)


# ------------------------------------------------------------------ public entry points
def load_study(name: str, storage_url: str | optuna.storages.BaseStorage,
               tracking_uri: str | None = None, *, with_mlflow: bool = True) -> StudyData:
    """Read study ``name`` from Optuna (``storage_url``) and its runs from MLflow.

    ``tracking_uri`` defaults to the one the runner recorded on the study (recorded
    without its password: then ``MASKLAB_TRACKING_URI`` is used in its place). A missing
    tracking store, experiment, run or artifact is not an error: what can be read is
    read, and ``notes`` says what was not. ``with_mlflow=False`` reads Optuna only
    (no MLflow import, ~1 s less: enough for a status line); the run columns are then
    empty and ``ablation`` and ``curves`` have no rows.
    """
    study = load_optuna_study(name, open_storage(storage_url), where=storage_url)
    attrs = study.user_attrs
    spec = dict(attrs.get(keys.SPEC) or {})
    trials_list = study.get_trials(deepcopy=False)
    swept = list(attrs.get(keys.SWEPT) or _params_seen(trials_list))
    notes: list[str] = []
    tracking_uri = tracking_uri or _recorded_tracking_uri(attrs.get(keys.TRACKING_URI), notes)
    parent = attrs.get(keys.PARENT_RUN_ID)
    objective = attrs.get(keys.OBJECTIVE) or (spec.get("objective") or {}).get("metric") or "value"
    direction = attrs.get(keys.DIRECTION) or (spec.get("objective") or {}).get("direction") \
        or study.direction.name.lower()

    trials = _trials_frame(trials_list, swept)
    intermediate = _intermediate_frame(trials_list)
    runs = _read_mlflow(name, tracking_uri, parent, notes) if tracking_uri and with_mlflow else None
    if tracking_uri is None and with_mlflow and not notes:
        notes.append("no MLflow tracking URI given or recorded on the study: trial metrics come from Optuna only")
    trials, ablation, curves, layers = _join_runs(trials, runs, swept, notes)
    trials = _objective_column(trials, objective)
    return StudyData(
        name=name, kind=attrs.get(keys.KIND) or "unknown", objective=objective, direction=direction,
        spec=spec, swept=swept, storage_url=describe(storage_url), tracking_uri=tracking_uri,
        parent_run_id=parent, trials=trials, ablation=ablation, curves=curves,
        intermediate=intermediate, transfer_layers=layers, notes=notes, study=study,
        data_summary=_data_summaries(runs),
    )


def _recorded_tracking_uri(recorded: str | None, notes: list[str]) -> str | None:
    """The tracking URI the runner recorded on the study. One with a password is recorded
    redacted (``postgresql://user:***@host/db``): the real one comes from
    ``MASKLAB_TRACKING_URI``, or there is none to read the runs from (said in ``notes``)."""
    if not recorded or "***" not in recorded:
        return recorded
    real = os.environ.get("MASKLAB_TRACKING_URI")
    if real:
        return real
    notes.append(f"the study's runs are tracked in {recorded}, recorded without its password: set "
                 "MASKLAB_TRACKING_URI (or pass the tracking URI) to read them; trial metrics come from Optuna only")
    return None


def _data_summaries(runs: _Runs | None) -> list[str]:
    """The distinct ``data.summary`` params of the study's runs: what was trained on and
    what was scored (one line per data config the study used)."""
    if runs is None:
        return []
    return sorted({r["params"]["data.summary"] for r in runs.records if r["params"].get("data.summary")})


# ------------------------------------------------------------------ helpers used by reports
def setting_label(params: Mapping[str, Any], swept: Iterable[str]) -> str:
    """``depth=2 p_bw=0.05``: the swept params (seed excluded), by their short names
    unless two share one, in which case by their dotted paths."""
    swept = [s for s in swept if s != "seed"]
    if not swept:
        return "all"
    short = [s.rsplit(".", 1)[-1] for s in swept]
    names = short if len(set(short)) == len(short) else swept
    return " ".join(f"{n}={format_value(params.get(s))}" for n, s in zip(names, swept))


def format_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NA"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def setting_order(trials: pd.DataFrame, swept: Iterable[str]) -> list[str]:
    """Setting labels sorted by their swept values (numbers numerically)."""
    if trials.empty:
        return []
    cols = [s for s in swept if s in trials.columns and s != "seed"]
    first = trials.drop_duplicates("setting")
    order = {row["setting"]: tuple(_sort_key(row[c]) for c in cols) for _, row in first.iterrows()}
    return sorted(order, key=lambda s: (order[s], s))


def expected_replicates(spec: Mapping[str, Any]) -> int | None:
    """Replicates per setting the spec asks for: an int, or a list of seeds."""
    rep = spec.get("replicates")
    if isinstance(rep, bool):
        return None
    if isinstance(rep, int):
        return rep
    if isinstance(rep, (list, tuple)):
        return len(rep)
    if isinstance(rep, Mapping) and isinstance(rep.get("seeds"), (list, tuple)):
        return len(rep["seeds"])
    return None


def grid_points(spec: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The grid of a grid spec as a list of {dotted param: value}, or None if unknown.

    Accepts a mapping of dotted names to value lists, the same nested by section
    (``{model: {depth: [2, 4]}}``), or an explicit list of points.
    """
    grid = spec.get("grid")
    if isinstance(grid, list) and all(isinstance(p, Mapping) for p in grid):
        return [flatten(p) for p in grid]
    if not isinstance(grid, Mapping):
        return None
    flat = flatten(grid)
    if not flat or not all(isinstance(v, (list, tuple)) for v in flat.values()):
        return None
    return expand_grid({k: v for k, v in flat.items() if k != "seed"})


# ------------------------------------------------------------------ Optuna
def _trials_frame(trials: list[optuna.trial.FrozenTrial], swept: list[str]) -> pd.DataFrame:
    rows = []
    for t in trials:
        ua = t.user_attrs
        params = trial_params(t)  # a queued (WAITING) grid trial: the values it was enqueued with
        seconds = trial_seconds(t)
        row = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value if t.state == optuna.trial.TrialState.COMPLETE and t.values and len(t.values) == 1
            else math.nan,
            "duration_s": math.nan if seconds is None else seconds,
            "start": t.datetime_start,
            "end": t.datetime_complete,
            **{k: v for k, v in params.items() if k != "seed"},
            "setting": setting_label(params, swept),
            "seed": params.get("seed", math.nan),
            "replicate": ua.get(keys.REPLICATE, math.nan),
            "grid_key": ua.get(keys.GRID_KEY),
            "config_hash": ua.get(keys.CONFIG_HASH),
            "run_id": ua.get(keys.RUN_ID),
            "failure": ua.get(keys.FAILURE),
        }
        rows.append(row)
    base = ["number", "state", "value", "duration_s", "start", "end", "setting", "seed", "replicate",
            "grid_key", "config_hash", "run_id", "failure"]
    df = pd.DataFrame(rows, columns=_ordered_columns(rows, base))
    for col in ("start", "end"):
        df[col] = pd.to_datetime(df[col])
    for col in ("seed", "replicate"):
        df[col] = _integers(df[col])
    return df.sort_values("number", ignore_index=True)


def _ordered_columns(rows: list[dict], base: list[str]) -> list[str]:
    params = sorted({k for r in rows for k in r} - set(base))
    return base[:6] + params + base[6:]


def _objective_column(trials: pd.DataFrame, objective: str) -> pd.DataFrame:
    """The objective's column holds the run's final metric; where the run (or the whole
    tracking store) is missing, a COMPLETE trial's Optuna value stands in: it is the same
    number, as the runner reports it."""
    value = trials["value"].where(trials["state"] == "COMPLETE")
    if objective in trials.columns:
        trials[objective] = trials[objective].combine_first(value)
    elif not trials.empty:
        trials[objective] = value
    return trials


def _intermediate_frame(trials: list[optuna.trial.FrozenTrial]) -> pd.DataFrame:
    rows = [(t.number, int(step), float(v)) for t in trials for step, v in sorted(t.intermediate_values.items())]
    return pd.DataFrame(rows, columns=["number", "step", "value"])


def _params_seen(trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    return sorted({k for t in trials for k in t.params} - {"seed"})


# ------------------------------------------------------------------ MLflow
@dataclass
class _Runs:
    """The MLflow side of a study: one record per child run, plus the client to read more."""

    client: Any
    records: list[dict[str, Any]]


def _read_mlflow(name: str, tracking_uri: str, parent: str | None, notes: list[str]) -> _Runs | None:
    path = sqlite_path(tracking_uri)
    if path is not None and not path.exists():
        notes.append(f"MLflow store {redact(tracking_uri)} does not exist: no run metrics, curves or ablations")
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        notes.append(f"no MLflow experiment {name!r} in {redact(tracking_uri)}: no run metrics, curves or ablations")
        return None
    filt = keys.child_runs_filter(parent) if parent else keys.trial_runs_filter(name)
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=filt, max_results=RUNS_PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return _Runs(client, [_run_record(r) for r in runs])


def _run_record(run) -> dict[str, Any]:
    tags, params = run.data.tags, run.data.params
    trial = tags.get(keys.TRIAL)
    return {
        "run_id": run.info.run_id,
        "run_status": run.info.status,
        "start_time": run.info.start_time or 0,
        "artifact_uri": run.info.artifact_uri,
        "trial": int(trial) if trial and trial.lstrip("-").isdigit() else None,
        "run_failure": tags.get(keys.FAILURE),
        "params": dict(params),
        "metrics": dict(run.data.metrics),  # the latest value of each key
    }


def _join_runs(trials: pd.DataFrame, runs: _Runs | None, swept: list[str], notes: list[str]):
    curves = pd.DataFrame(columns=["number", "metric", "step", "value"])
    if runs is None or trials.empty:
        trials = trials.assign(run_status=None, **{"model.parameters": pd.array([pd.NA] * len(trials), "Int64")})
        return trials, _empty_ablation(swept), curves, _empty_transfer(swept)
    by_id = {r["run_id"]: r for r in runs.records}
    by_trial: dict[int, dict] = {}
    for r in sorted(runs.records, key=lambda r: r["start_time"]):
        if r["trial"] is not None:
            by_trial[r["trial"]] = r  # the latest run of a trial number wins
    matched: dict[int, dict] = {}
    for number, run_id in zip(trials["number"], trials["run_id"]):
        rec = by_id.get(run_id) if isinstance(run_id, str) else None
        rec = rec or by_trial.get(int(number))
        if rec is not None:
            matched[int(number)] = rec
    trials = _add_run_columns(trials, matched, notes)
    curves = _curves(runs.client, matched)
    ablation = _ablation(runs.client, matched, trials, swept, notes)
    layers = _transfer_layers(runs.client, matched, trials, swept)
    return trials, ablation, curves, layers


def _add_run_columns(trials: pd.DataFrame, matched: dict[int, dict], notes: list[str]) -> pd.DataFrame:
    trials = trials.copy()
    rows = []
    for number in trials["number"]:
        rec = matched.get(int(number))
        if rec is None:
            rows.append({})
            continue
        row = {"run_id": rec["run_id"], "run_status": rec["run_status"], "run_failure": rec["run_failure"],
               "model.parameters": _to_number(rec["params"].get("model.parameters")),
               "run_seed": _to_number(rec["params"].get("seed"))}
        row.update({k: v for k, v in rec["metrics"].items() if k.startswith(("val/", TRANSFER, PERF)) or k in COMPUTE})
        row.update({k: rec["params"][k] for k in TRANSFER_PARAMS if k in rec["params"] and k not in trials})
        rows.append(row)
    extra = pd.DataFrame(rows, index=trials.index)
    for col in ("run_status", "run_failure", "model.parameters", "run_seed"):
        if col not in extra:
            extra[col] = None if col in ("run_status", "run_failure") else math.nan
    trials["run_id"] = extra["run_id"].combine_first(trials["run_id"]) if "run_id" in extra else trials["run_id"]
    trials["run_status"] = extra["run_status"]
    # The Optuna reason is the one the runner chose; the run's tag is the fallback.
    trials["failure"] = trials["failure"].combine_first(extra["run_failure"])
    trials["seed"] = trials["seed"].combine_first(extra["run_seed"])
    trials["model.parameters"] = extra["model.parameters"]
    vals = sorted(c for c in extra.columns if c.startswith(("val/", TRANSFER, PERF)) or c in COMPUTE)
    vals += [c for c in TRANSFER_PARAMS if c in extra.columns]
    trials = pd.concat([trials, extra[vals]], axis=1)
    for col in ("seed", "replicate", "model.parameters"):
        trials[col] = _integers(trials[col])
    missing = [int(n) for n, s in zip(trials["number"], trials["state"])
               if int(n) not in matched and s in ("COMPLETE", "FAIL", "PRUNED")]
    if missing:
        notes.append(f"no MLflow run found for trial(s) {_numbers(missing)}")
    return trials


def _curves(client, matched: dict[int, dict]) -> pd.DataFrame:
    wanted = {rec["run_id"]: [k for k in rec["metrics"] if k.startswith(CURVE_STAGES)] for rec in matched.values()}
    hist = _histories(client, wanted)
    number = {rec["run_id"]: n for n, rec in matched.items()}
    hist["number"] = hist["run_id"].map(number)
    out = hist[["number", "metric", "step", "value"]]
    return out.sort_values(["number", "metric", "step"], ignore_index=True)


def _histories(client, wanted: Mapping[str, list[str]]) -> pd.DataFrame:
    """(run_id, metric, step, value) for the given keys of the given runs; one row per
    step (the last value logged at a step wins).

    On a SQL store one query per metric key serves all runs (``get_metric_history_bulk``,
    which MlflowClient does not expose); elsewhere one ``get_metric_history`` per run and key.
    """
    by_key: dict[str, list[str]] = {}
    for run_id, metrics in wanted.items():
        for k in metrics:
            by_key.setdefault(k, []).append(run_id)
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    bulk = getattr(store, "get_metric_history_bulk", None)
    rows = []
    for key, run_ids in by_key.items():
        if bulk is not None:
            for i in range(0, len(run_ids), BULK_CHUNK):
                chunk = run_ids[i: i + BULK_CHUNK]
                for m in bulk(chunk, key, max_results=2**62):
                    rows.append((m.run_id, key, m.step, m.timestamp, m.value))
        else:
            for run_id in run_ids:
                for m in client.get_metric_history(run_id, key):
                    rows.append((run_id, key, m.step, m.timestamp, m.value))
    df = pd.DataFrame(rows, columns=["run_id", "metric", "step", "timestamp", "value"])
    df = df.sort_values(["run_id", "metric", "step", "timestamp"], kind="stable")
    df = df.drop_duplicates(["run_id", "metric", "step"], keep="last")
    df["step"] = df["step"].astype("int64")
    df["value"] = df["value"].astype("float64")
    return df.drop(columns="timestamp").reset_index(drop=True)


# ------------------------------------------------------------------ transfer
def _transfer_layers(client, matched: dict[int, dict], trials: pd.DataFrame, swept: list[str]) -> pd.DataFrame:
    """The ``transfer/<task>/probe_*`` histories (step = layer) of the matched runs."""
    wanted = {rec["run_id"]: [k for k in rec["metrics"] if _is_probe(k)] for rec in matched.values()}
    wanted = {run_id: ks for run_id, ks in wanted.items() if ks}
    if not wanted:
        return _empty_transfer(swept)
    hist = _histories(client, wanted)
    number = {rec["run_id"]: n for n, rec in matched.items()}
    named = _transfer_features(client, [rec for rec in matched.values() if rec["run_id"] in wanted])
    suffix = hist["metric"].str.extract(r"/probe_[a-z0-9]+_(.+)$", expand=False).fillna("")
    df = pd.DataFrame({"number": hist["run_id"].map(number), "task": hist["metric"].str.split("/").str[1],
                       "feature": hist["metric"].map(named).fillna(suffix).astype(str),
                       "metric": hist["metric"], "layer": hist["step"], "value": hist["value"]})
    join = [c for c in ["number", "setting", "seed", *swept] if c in trials.columns]
    df = df.merge(trials[join], on="number", how="left")
    return df[[*join, *TRANSFER_LAYER_COLUMNS]].sort_values(["number", "metric", "layer"], ignore_index=True)


def _transfer_features(client, recs: list[dict]) -> dict[str, str]:
    """Probe metric -> feature kind, from the ``transfer.csv`` of the first run with probes
    (one artifact read: the metric names leave the primary feature unnamed, and every
    run of a study names its features alike); empty when that run has none."""
    if not recs:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        table = _read_csv_artifact(client, recs[0], TRANSFER_CSV, ["feature", "metric"], Path(tmp))
    if table is None:
        return {}
    probes = table.dropna(subset=["feature"]).drop_duplicates("metric")
    return {m: str(f) for m, f in zip(probes["metric"], probes["feature"]) if _is_probe(str(m))}


def _is_probe(key: str) -> bool:
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == TRANSFER.rstrip("/") and parts[2].startswith("probe_")


def _empty_transfer(swept: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(columns=["number", "setting", "seed", *swept, *TRANSFER_LAYER_COLUMNS])
    return df.astype({"layer": "int64", "value": "float64"})


# ------------------------------------------------------------------ ablation
def _ablation(client, matched: dict[int, dict], trials: pd.DataFrame, swept: list[str],
              notes: list[str]) -> pd.DataFrame:
    frames, from_metrics, absent = [], [], []
    need_history: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for number, rec in matched.items():
            table = _read_ablation_csv(client, rec, Path(tmp))
            if table is not None:
                frames.append(table.assign(number=number, source="artifact"))
                continue
            series = [k for k in rec["metrics"] if k.startswith("ablation/")]
            if series:
                need_history[rec["run_id"]] = series
                from_metrics.append(number)
            elif rec["run_status"] == "FINISHED":
                absent.append(number)
    if need_history:
        number_of = {rec["run_id"]: n for n, rec in matched.items()}
        hist = _histories(client, need_history)
        for run_id, part in hist.groupby("run_id", sort=False):
            frames.append(_ablation_from_metrics(part).assign(number=number_of[run_id], source="metrics"))
    if from_metrics:
        notes.append(f"ablation.csv missing for trial(s) {_numbers(from_metrics)}: read from ablation/* metrics "
                     "(angular distance only for consecutive blocks)")
    if absent:
        notes.append(f"no ablation recorded for finished trial(s) {_numbers(absent)}")
    if not frames:
        return _empty_ablation(swept)
    df = pd.concat(frames, ignore_index=True)
    return _tidy_ablation(df, trials, swept)


def _read_ablation_csv(client, rec: dict, tmp: Path) -> pd.DataFrame | None:
    return _read_csv_artifact(client, rec, "ablation.csv", ABLATION_COLUMNS, tmp)


def _read_csv_artifact(client, rec: dict, name: str, columns: list[str], tmp: Path) -> pd.DataFrame | None:
    """The run's CSV artifact ``name`` when it exists and has ``columns``, else None."""
    from mlflow.exceptions import MlflowException  # mlflow is loaded by now: the client exists

    uri = rec["artifact_uri"] or ""
    try:
        if uri.startswith("file:") or "://" not in uri:
            path = Path(unquote(urlparse(uri).path) if uri.startswith("file:") else uri) / name
            if not path.is_file():
                return None
        else:
            path = Path(client.download_artifacts(rec["run_id"], name, str(tmp)))
        df = pd.read_csv(path)
    except (OSError, ValueError, MlflowException):  # absent, unreadable or not a CSV: fall back
        return None
    return df if set(columns) <= set(df.columns) else None


def _ablation_from_metrics(hist: pd.DataFrame) -> pd.DataFrame:
    """Rebuild the tidy table from the ``ablation/*`` metric series of one run."""
    rows = []
    for key, step, value in zip(hist["metric"], hist["step"], hist["value"]):
        name = key.removeprefix("ablation/")
        if name.startswith("drop_one/"):
            rows.append(("drop_one", 1, step, name.removeprefix("drop_one/"), value))
        elif name == "block_influence":
            rows.append(("block_influence", None, step, name, value))
        elif name == "angular_distance":
            rows.append(("angular_distance", 1, step, name, value))
        else:
            rows.append(("truncate", step, None, name, value))
    return pd.DataFrame(rows, columns=ABLATION_COLUMNS)


def _tidy_ablation(df: pd.DataFrame, trials: pd.DataFrame, swept: list[str]) -> pd.DataFrame:
    df["removed"] = pd.to_numeric(df["removed"], errors="coerce").astype("Int64")
    df["block"] = pd.to_numeric(df["block"], errors="coerce").astype("Int64")
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype("float64")
    join = [c for c in ["number", "setting", "seed", *swept] if c in trials.columns]
    df = df.merge(trials[join], on="number", how="left")
    cols = [*join, *ABLATION_COLUMNS, "source"]
    return df[cols].sort_values(["number", "variant", "metric", "removed", "block"], ignore_index=True)


def _empty_ablation(swept: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(columns=["number", "setting", "seed", *swept, *ABLATION_COLUMNS, "source"])
    return df.astype({"removed": "Int64", "block": "Int64", "value": "float64"})


# ------------------------------------------------------------------ small utilities
def _sort_key(v: Any) -> tuple:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return (2, 0.0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def _integers(col: pd.Series) -> pd.Series:
    """Int64 (nullable) when every present value is a whole number, else unchanged."""
    num = pd.to_numeric(col, errors="coerce")
    present = num.dropna()
    if present.size < col.notna().sum() or not (present == present.round()).all():
        return col
    return num.round().astype("Int64")


def _to_number(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _numbers(nums: list[int]) -> str:
    return ", ".join(str(n) for n in sorted(nums))
