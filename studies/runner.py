"""Run a study: an Optuna study whose trials are tracked, ablated Lightning runs.

Stores and the links between them (the contract ``reports/loader.py`` reads):

- Optuna study ``spec.name``; user attrs ``masklab.spec``, ``masklab.kind``,
  ``masklab.objective``, ``masklab.direction``, ``masklab.swept``,
  ``masklab.fixed_hash``, ``masklab.overrides``, ``masklab.mlflow_parent_run_id``,
  ``masklab.tracking_uri``. Trial params are dotted config paths (plus ``seed`` for the
  replicate of a grid study); trial user attrs ``masklab.mlflow_run_id``,
  ``masklab.grid_key``, ``masklab.replicate``, ``masklab.failure``,
  ``masklab.config_hash``, ``masklab.host``, ``masklab.pid``. Intermediate values: the
  objective at every validation (step = validation index).
- MLflow experiment ``spec.name``: one parent run (tags ``masklab.role=study``,
  ``masklab.study``) and one nested child run per trial (``masklab.role=trial``,
  ``masklab.study``, ``masklab.trial``).

Grid studies enqueue exactly one trial per (grid point, replicate) that has no COMPLETE
trial and no trial waiting or running; running the command again resumes the study.
Optuna's GridSampler is not used: it hands the same point to parallel workers.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

from lit_modules.config_errors import ConfigError
from lit_modules.paths import Workspace

from .spec import StudySpec, grid_key

# Heartbeats let a later run (or another worker) find trials whose process died:
# a RUNNING trial without a heartbeat for GRACE_SECONDS is marked FAIL.
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90


@dataclass
class StudyResult:
    name: str
    counts: dict[str, int]
    ran: int
    report_md: Path | None = None
    report_html: Path | None = None
    parent_run_id: str = ""
    failures: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- stores


def default_storage(workspace: Workspace) -> str:
    return f"sqlite:///{workspace.output_dir / 'optuna.db'}"


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats (sqlite file or PostgreSQL URL)."""
    kwargs = {}
    if url.startswith("sqlite"):
        # Several processes on one file: wait for the lock instead of failing at once.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    return optuna.storages.RDBStorage(
        url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS, **kwargs
    )


def _sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    if spec.kind == "grid":
        return optuna.samplers.RandomSampler(seed=spec.seed)  # never used: every trial is enqueued
    return {
        "tpe": lambda: optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(5, spec.n_trials)),
        "random": lambda: optuna.samplers.RandomSampler(seed=spec.seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=spec.seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=spec.seed),
    }[spec.sampler]()


def _pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def open_study(spec: StudySpec, storage_url: str, tracking_uri: str) -> optuna.Study:
    """Create the study, or load it and check it was made from the same spec."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = optuna.create_study(
        study_name=spec.name, storage=make_storage(storage_url), direction=spec.objective.direction,
        sampler=_sampler(spec), pruner=_pruner(spec), load_if_exists=True,
    )
    attrs = study.user_attrs
    if "masklab.fixed_hash" in attrs and attrs["masklab.fixed_hash"] != spec.fixed_hash():
        raise ConfigError(
            "fixed", f"hash {spec.fixed_hash()}",
            f"study {spec.name!r} in {storage_url} was started with a different fixed config "
            f"(hash {attrs['masklab.fixed_hash']}, --set {' '.join(attrs.get('masklab.overrides', [])) or 'none'}); "
            "use the same spec and --set values to resume, or --study-name / --output-dir for a new study",
        )
    if "masklab.kind" in attrs and attrs["masklab.kind"] != spec.kind:
        raise ConfigError("grid/search", spec.kind, f"study {spec.name!r} is a {attrs['masklab.kind']} study")
    if "masklab.fixed_hash" not in attrs:
        for key, value in {
            "masklab.spec": spec.to_dict(), "masklab.kind": spec.kind, "masklab.swept": spec.swept,
            "masklab.objective": spec.objective.metric, "masklab.direction": spec.objective.direction,
            "masklab.fixed_hash": spec.fixed_hash(), "masklab.overrides": list(spec.overrides),
            "masklab.tracking_uri": tracking_uri,
        }.items():
            study.set_user_attr(key, value)
    return study


def parent_run(study: optuna.Study, spec: StudySpec, tracking_uri: str, workspace: Workspace) -> str:
    """The study's MLflow parent run: found through the study, or created once."""
    from mlflow.tracking import MlflowClient

    from .tracking import get_or_create_experiment, provenance_tags
    from .train import _artifact_root

    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = study.user_attrs.get("masklab.mlflow_parent_run_id")
    if run_id:
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return run_id
        except Exception:  # the tracking store was reset: start a new parent run
            pass
    exp_id = get_or_create_experiment(client, spec.name, _artifact_root(tracking_uri, workspace))
    tags = {**provenance_tags(), "masklab.role": "study", "masklab.study": spec.name, "masklab.kind": spec.kind,
            "masklab.overrides": " ".join(spec.overrides)}
    if spec.source:
        tags["masklab.source"] = str(Path(spec.source).resolve())
    run = client.create_run(exp_id, run_name=spec.name, tags=tags)
    run_id = run.info.run_id
    from .tracking import log_params

    log_params(client, run_id, {
        "study.kind": spec.kind, "study.objective": spec.objective.metric,
        "study.direction": spec.objective.direction, "study.swept": ",".join(spec.swept),
        **({"study.replicates": str(spec.replicates)} if spec.kind == "grid" else
           {"study.n_trials": str(spec.n_trials), "study.sampler": spec.sampler, "study.pruner": spec.pruner.name}),
        **({f"grid.{k}": json.dumps(list(v)) for k, v in spec.grid.items()} if spec.grid else {}),
    })
    if spec.source:
        client.log_artifact(run_id, spec.source)
    study.set_user_attr("masklab.mlflow_parent_run_id", run_id)
    return run_id


# ---------------------------------------------------------------- dead trials and the queue


def reap_dead_trials(study: optuna.Study, tracking_uri: str | None = None) -> list[int]:
    """Mark FAIL the RUNNING trials whose process is gone: on this host, a pid that no
    longer runs; anywhere, a heartbeat older than the grace period."""
    storage = study._storage
    reaped = []
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        a = t.user_attrs
        if a.get("masklab.host") == host and a.get("masklab.pid") and not _alive(a["masklab.pid"]):
            reason = f"worker process {a['masklab.pid']} on {host} died while the trial ran"
            storage.set_trial_user_attr(t._trial_id, "masklab.failure", reason)
            if storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                reaped.append(t.number)
    if isinstance(storage, optuna.storages.RDBStorage) or hasattr(storage, "get_heartbeat_interval"):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        optuna.storages.fail_stale_trials(study)
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if t.number not in before:
                storage.set_trial_user_attr(t._trial_id, "masklab.failure", "no heartbeat: the worker was lost")
                reaped.append(t.number)
    if reaped and tracking_uri:
        _fail_runs(study, reaped, tracking_uri)
    return reaped


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail_runs(study: optuna.Study, numbers: list[int], tracking_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for t in study.get_trials(deepcopy=False):
        run_id = t.user_attrs.get("masklab.mlflow_run_id")
        if t.number in numbers and run_id:
            client.set_tag(run_id, "masklab.failure", t.user_attrs.get("masklab.failure", "worker lost"))
            client.set_terminated(run_id, "FAILED")


def enqueue_grid(study: optuna.Study, spec: StudySpec) -> int:
    """Enqueue every (grid point, replicate) with no COMPLETE, WAITING or RUNNING trial."""
    have = set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)):
        if "masklab.grid_key" in t.user_attrs:
            have.add((t.user_attrs["masklab.grid_key"], t.user_attrs["masklab.replicate"]))
    added = 0
    for point, seed in spec.grid_points():
        key = grid_key(point)
        if (key, seed) in have:
            continue
        study.enqueue_trial({**point, "seed": seed},
                            user_attrs={"masklab.grid_key": key, "masklab.replicate": seed},
                            skip_if_exists=False)
        added += 1
    return added


def _waiting(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


# ---------------------------------------------------------------- one trial


def suggest(trial: optuna.Trial, spec: StudySpec) -> tuple[dict, int | None]:
    """The trial's swept values (fixed by the queue for a grid; sampled for a search)."""
    if spec.kind == "grid":
        params = {p: trial.suggest_categorical(p, list(v)) for p, v in spec.grid.items()}
        return params, trial.suggest_categorical("seed", list(range(spec.replicates)))
    params = {}
    for p in spec.search:
        if p.type == "categorical":
            params[p.path] = trial.suggest_categorical(p.path, list(p.choices))
        elif p.type == "int":
            params[p.path] = trial.suggest_int(p.path, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            params[p.path] = trial.suggest_float(p.path, p.low, p.high, log=p.log, step=p.step)
    return params, None


def run_trial(trial: optuna.Trial, spec: StudySpec, workspace: Workspace, tracking_uri: str, parent_id: str,
              progress_bar: bool) -> tuple[TrialState, float | None, str]:
    """Train, validate and ablate one trial; returns its final state, value and a note."""
    from optuna_integration import PyTorchLightningPruningCallback

    from lit_modules.ablation import AblationOptions
    from lit_modules.config import run_config_from_dict

    from .train import Tracking, train_run

    trial.set_user_attr("masklab.host", socket.gethostname())
    trial.set_user_attr("masklab.pid", os.getpid())
    params, seed = suggest(trial, spec)
    cfg = run_config_from_dict(spec.run_config_dict(params, seed))
    trial.set_user_attr("masklab.config_hash", cfg.hash())
    tracking = Tracking(
        tracking_uri=tracking_uri, experiment=spec.name, run_name=f"{spec.name}-{trial.number:03d}",
        parent_run_id=parent_id,
        tags={"masklab.role": "trial", "masklab.study": spec.name, "masklab.trial": str(trial.number),
              "masklab.overrides": " ".join(spec.overrides)},
        artifacts=(Path(spec.source),) if spec.source else (),
    )
    callbacks = [PyTorchLightningPruningCallback(trial, monitor=spec.objective.metric)]
    if progress_bar and cfg.trainer.progress_bar and sys.stderr.isatty():
        from lightning.pytorch.callbacks import TQDMProgressBar

        callbacks.append(TQDMProgressBar(process_position=1, leave=False))
    ablation = AblationOptions(**asdict(spec.ablation))
    try:
        result = train_run(cfg, workspace, tracking, ablation, callbacks,
                           on_run=lambda run_id: trial.set_user_attr("masklab.mlflow_run_id", run_id))
    except optuna.TrialPruned as e:
        trial.set_user_attr("masklab.failure", f"pruned: {e}")
        return TrialState.PRUNED, None, "pruned"
    except KeyboardInterrupt:
        trial.set_user_attr("masklab.failure", "interrupted (Ctrl-C)")
        raise
    except Exception as e:  # the trial fails; the study goes on
        reason = _one_line(e)
        trial.set_user_attr("masklab.failure", reason)
        return TrialState.FAIL, None, reason
    value = result.metrics.get(spec.objective.metric)
    if value is None or not math.isfinite(value):
        reason = f"objective {spec.objective.metric} = {value} (available: {', '.join(sorted(result.metrics))})"
        trial.set_user_attr("masklab.failure", reason)
        return TrialState.FAIL, None, reason
    return TrialState.COMPLETE, value, f"{spec.objective.metric}={value:.4f}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}"[:2000] if text else type(e).__name__


# ---------------------------------------------------------------- the study loop


def run_study(
    spec: StudySpec,
    workspace: Workspace,
    storage_url: str | None = None,
    tracking_uri: str | None = None,
    *,
    progress: bool = True,
    report: bool = True,
    max_trials: int | None = None,
    log: Callable[[str], None] | None = None,
) -> StudyResult:
    """Run every trial the study still needs, then write its report."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    storage_url = storage_url or default_storage(workspace)
    tracking_uri = tracking_uri or workspace.tracking_uri
    study = open_study(spec, storage_url, tracking_uri)
    parent_id = parent_run(study, spec, tracking_uri, workspace)
    reaped = reap_dead_trials(study, tracking_uri)
    if reaped:
        log(f"marked FAIL: trials {reaped} (their worker died); their grid points run again")
    if spec.kind == "grid":
        enqueue_grid(study, spec)
        todo = _waiting(study)
    else:
        finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))
        todo = max(0, spec.n_trials - finished)
    if max_trials is not None:
        todo = min(todo, max_trials)
    bar = _bar(todo, spec.name, progress)
    ran, failures = 0, []
    status = "FINISHED"
    try:
        while ran < todo:
            if spec.kind == "grid" and not _waiting(study):
                break  # another worker took the rest
            trial = study.ask()
            if spec.kind == "grid" and "masklab.grid_key" not in trial.user_attrs:
                # Another worker emptied the queue between the check and ask().
                trial.set_user_attr("masklab.failure", "no grid point left for this worker")
                study.tell(trial, state=TrialState.FAIL)
                break
            try:
                # Optuna records heartbeats only inside Study.optimize; ask/tell runs them here.
                with get_heartbeat_thread(trial._trial_id, study._storage):
                    state, value, note = run_trial(trial, spec, workspace, tracking_uri, parent_id, progress)
            except KeyboardInterrupt:
                study.tell(trial, state=TrialState.FAIL)
                status = "KILLED"
                log(f"interrupted: trial {trial.number} marked FAIL; finished trials are kept")
                raise
            study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
            if state == TrialState.FAIL:
                failures.append(f"trial {trial.number}: {note}")
            ran += 1
            _bar_step(bar, f"trial {trial.number} {state.name.lower()} {note}"[:120], log)
    finally:
        if bar is not None:
            bar.close()
        _close_parent(tracking_uri, parent_id, study, spec, status)
    counts = _counts(study)
    result = StudyResult(spec.name, counts, ran, parent_run_id=parent_id, failures=failures)
    if report:
        result.report_md, result.report_html = write_study_report(spec.name, storage_url, tracking_uri, workspace,
                                                                  parent_id)
    return result


def _counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _close_parent(tracking_uri: str, parent_id: str, study: optuna.Study, spec: StudySpec, status: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for state, n in _counts(study).items():
        client.log_metric(parent_id, f"study/{state.lower()}_trials", n)
    if status == "FINISHED" and spec.kind == "grid" and _waiting(study):
        status = "RUNNING"  # other workers are still on it
    if status != "RUNNING":
        client.set_terminated(parent_id, status)


def write_study_report(name: str, storage_url: str, tracking_uri: str, workspace: Workspace,
                       parent_id: str | None = None) -> tuple[Path, Path]:
    """Regenerate the report from the stores; attach it to the parent run."""
    from reports.loader import StudyNotFoundError, load_study
    from reports.study_report import write_report

    try:
        data = load_study(name, storage_url, tracking_uri)
    except StudyNotFoundError as e:
        raise ConfigError("study", name, str(e)) from None
    out = workspace.output_dir / "reports" / name
    md, html = write_report(data, out)
    if parent_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        for path in (md, html):
            client.log_artifact(parent_id, str(path), artifact_path="report")
    return md, html


def _bar(total: int, name: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{name} trials", position=0, leave=True, dynamic_ncols=True)


def _bar_step(bar, note: str, log: Callable[[str], None]) -> None:
    if bar is None:
        log(note)
        return
    bar.write(note)
    bar.update(1)

