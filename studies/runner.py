"""Run a study: an Optuna study whose trials are tracked, ablated Lightning runs.

Stores and the links between them (the contract ``reports/loader.py`` reads):

- Optuna study ``spec.name``; user attrs ``masklab.spec``, ``masklab.kind``,
  ``masklab.objective``, ``masklab.direction``, ``masklab.swept``,
  ``masklab.fixed_hash``, ``masklab.overrides``, ``masklab.mlflow_parent_run_id``,
  ``masklab.tracking_uri``. Trial params are dotted config paths (plus ``seed`` for the
  replicate of a grid study); trial user attrs ``masklab.mlflow_run_id``,
  ``masklab.name`` (its run's name), ``masklab.grid_key``, ``masklab.replicate``,
  ``masklab.failure``, ``masklab.config_hash``, ``masklab.host``, ``masklab.pid``.
  Intermediate values: the objective at every validation (step = validation index).
  The study's metric name (``study.metric_names``) is the objective, e.g. ``val/fw_loss``.
- MLflow experiment ``spec.name`` (tagged ``mlflow.experimentKind=custom_model_development``):
  one parent run named ``spec.name`` (tags ``masklab.role=study``, ``masklab.study``)
  and one nested child run per trial, named by its setting and seed
  (``depth=4 p_bw=0.05 seed=1``, as the reports label settings; tags
  ``masklab.role=trial``, ``masklab.study``, ``masklab.trial``).

Grid studies enqueue exactly one trial per (grid point, replicate) that has no COMPLETE
trial and no trial waiting or running; running the command again resumes the study.
Optuna's GridSampler is not used: it hands the same point to parallel workers.

Any number of workers (``masklab run`` / ``worker`` processes, here or on other
machines) may share one study: enqueueing, the parent run and claiming a trial happen
under the study lock (``coordination.py``). A trial whose worker died is marked FAIL
and retried by :class:`~studies.coordination.RetryTrial`; the retry resumes from the
dead attempt's last checkpoint (``masklab.resume_checkpoint``) in a new MLflow run
linked to the attempt's (``masklab.retry_of_run``). COMPLETE trials are never re-run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from lit_modules.config_errors import ConfigError
from lit_modules.paths import Workspace
from stores import keys, queue
from stores.grid import grid_key
from stores.storage import (
    StudyNotFoundError,
    heartbeat_interval,
    keep_alive,
    stale_trial_ids,
    study_storage,
)
from stores.urls import default_storage_url, redact, scrub

from .coordination import GRACE_SECONDS, HEARTBEAT_SECONDS, make_storage, retry_callback, study_lock
from .spec import StudySpec

# How often a worker with nothing to claim looks again while other workers' trials run
# (one of them may die, and its trial come back to the queue).
POLL_SECONDS = 5.0


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
    return default_storage_url(workspace.output_dir)


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


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_study(spec: StudySpec, storage_url: str, tracking_uri: str, heartbeat: int = HEARTBEAT_SECONDS,
               grace: int = GRACE_SECONDS, *, storage: BaseStorage | None = None) -> optuna.Study:
    """Create the study, or load it and check it was made from the same spec. ``storage``:
    the storage already opened on ``storage_url`` (else it is opened here)."""
    _quiet_optuna()
    storage = storage if storage is not None else make_storage(storage_url, heartbeat, grace)
    try:  # the study is there (every worker but the first): no lock needed to load it
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=_sampler(spec),
                                  pruner=_pruner(spec))
    except KeyError:
        with study_lock(storage, spec.name):
            study = optuna.create_study(
                study_name=spec.name, storage=storage, direction=spec.objective.direction,
                sampler=_sampler(spec), pruner=_pruner(spec), load_if_exists=True,
            )
    attrs = study.user_attrs
    _check_same_spec(attrs, spec, storage_url)
    if study.metric_names != [spec.objective.metric]:  # optuna-dashboard shows it, not "Objective 0"
        study.set_metric_names([spec.objective.metric])
    if keys.FIXED_HASH not in attrs:
        for key, value in {
            keys.SPEC: spec.to_dict(), keys.KIND: spec.kind, keys.SWEPT: spec.swept,
            keys.OBJECTIVE: spec.objective.metric, keys.DIRECTION: spec.objective.direction,
            keys.FIXED_HASH: spec.fixed_hash(), keys.OVERRIDES: list(spec.overrides),
            keys.TRACKING_URI: redact(tracking_uri),  # no password: readers take the real one from the caller
        }.items():
            study.set_user_attr(key, value)
    return study


def _check_same_spec(attrs: dict, spec: StudySpec, storage_url: str) -> None:
    """A study resumes only with the fixed config and kind it was started with."""
    if keys.FIXED_HASH in attrs and attrs[keys.FIXED_HASH] != spec.fixed_hash():
        before = (attrs.get(keys.SPEC) or {}).get("fixed") or {}
        raise ConfigError(
            "fixed", fixed_changes(before, spec.fixed),
            f"study {spec.name!r} in {redact(storage_url)} was started with a different fixed config "
            f"(then --set {' '.join(attrs.get(keys.OVERRIDES, [])) or 'none'}); "
            "use the same spec and --set values to resume, or --study-name / --output-dir for a new study",
        )
    if keys.KIND in attrs and attrs[keys.KIND] != spec.kind:
        raise ConfigError("grid/search", spec.kind, f"study {spec.name!r} is a {attrs[keys.KIND]} study")


def fixed_changes(before: dict, after: dict) -> str:
    """What changed between two fixed configs, key by key: ``model.width 128 -> 64``."""
    from lit_modules.config import flatten

    old, new = flatten(before), flatten(after)
    unset = object()
    changed = [(k, old.get(k, unset), new.get(k, unset)) for k in sorted(set(old) | set(new))
               if old.get(k, unset) != new.get(k, unset)]
    show = lambda v: "(unset)" if v is unset else json.dumps(v)  # noqa: E731
    return ", ".join(f"{k} {show(a)} -> {show(b)}" for k, a, b in changed) or "(same values, other hash)"


def parent_run(study: optuna.Study, storage: BaseStorage, spec: StudySpec, tracking_uri: str,
               workspace: Workspace) -> str:
    """The study's MLflow parent run: found through the study (no lock), or created once
    (under the study lock, so workers starting together share one)."""
    found = _existing_parent(study, tracking_uri)
    if found:
        return found
    with study_lock(storage, spec.name):
        return _parent_run(study, spec, tracking_uri, workspace)


def _existing_parent(study: optuna.Study, tracking_uri: str) -> str | None:
    from mlflow.tracking import MlflowClient

    run_id = study.user_attrs.get(keys.PARENT_RUN_ID)  # read from the storage: another worker may have just made it
    if not run_id:
        return None
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
        client.update_run(run_id, status="RUNNING")
        return run_id
    except Exception:  # the tracking store was reset: start a new parent run
        return None


def _parent_run(study: optuna.Study, spec: StudySpec, tracking_uri: str, workspace: Workspace) -> str:
    from mlflow.tracking import MlflowClient

    from .tracking import artifact_root, get_or_create_experiment, log_params, provenance_tags

    client = MlflowClient(tracking_uri=tracking_uri)
    found = _existing_parent(study, tracking_uri)
    if found:
        return found
    exp_id = get_or_create_experiment(client, spec.name, artifact_root(tracking_uri, workspace))
    tags = {**provenance_tags(), keys.ROLE: keys.ROLE_STUDY, keys.STUDY: spec.name, keys.KIND: spec.kind,
            keys.OVERRIDES: " ".join(spec.overrides)}
    if spec.source:
        tags[keys.SOURCE] = str(Path(spec.source).resolve())
    run_id = client.create_run(exp_id, run_name=spec.name, tags=tags).info.run_id
    log_params(client, run_id, _study_params(spec))
    if spec.source:
        client.log_artifact(run_id, spec.source)
    study.set_user_attr(keys.PARENT_RUN_ID, run_id)
    return run_id


def _study_params(spec: StudySpec) -> dict[str, str]:
    """The parent run's params: what the study sweeps and how."""
    return {
        "study.kind": spec.kind, "study.objective": spec.objective.metric,
        "study.direction": spec.objective.direction, "study.swept": ",".join(spec.swept),
        **({"study.replicates": str(spec.replicates)} if spec.kind == "grid" else
           {"study.n_trials": str(spec.n_trials), "study.sampler": spec.sampler, "study.pruner": spec.pruner.name}),
        **({f"grid.{k}": json.dumps(list(v)) for k, v in spec.grid.items()} if spec.grid else {}),
    }


# ---------------------------------------------------------------- dead trials and the queue


def reap_dead_trials(study: optuna.Study, tracking_uri: str | None = None,
                     storage: BaseStorage | None = None) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker is gone, and queue their retries.

    On this host a trial whose worker pid no longer runs is caught at once; on any host,
    a trial without a heartbeat for the grace period (RDB storages). Each reaped trial is
    re-enqueued by :class:`~studies.coordination.RetryTrial` (at most ``MAX_RETRIES``
    times), to resume from its last checkpoint. ``storage``: the study's storage, as
    opened (found through the study when not given).
    """
    storage = storage if storage is not None else study_storage(study)
    reaped = _reap_dead_workers(study, storage) + _reap_stale(study, storage)
    if reaped and tracking_uri:
        _fail_runs(study, reaped, tracking_uri)
    return reaped


def _dead_trials_seen(study: optuna.Study, storage: BaseStorage) -> bool:
    """Whether a RUNNING trial is stale or its worker's pid is gone on this host (a look,
    without the lock: :func:`reap_dead_trials` acts on it)."""
    return bool(stale_trial_ids(storage, study.study_name) or _dead_here(study, storage))


def _dead_here(study: optuna.Study, storage: BaseStorage) -> list[dict]:
    """The RUNNING trials whose worker ran on this host and no longer does."""
    host = socket.gethostname()
    study_id = storage.get_study_id_from_name(study.study_name)
    return [t for t in queue.running(storage, study_id) if t["host"] == host and t["pid"] and not _alive(t["pid"])]


def _reap_dead_workers(study: optuna.Study, storage: BaseStorage) -> list[int]:
    """FAIL (and retry) the RUNNING trials of workers on this host that no longer run."""
    reaped = []
    retry = retry_callback(storage)
    for t in _dead_here(study, storage):
        reason = f"worker process {t['pid']} on {t['host']} died while the trial ran"
        if _fail(storage, t["trial_id"], reason):
            retry(study, storage.get_trial(t["trial_id"]))
            reaped.append(t["number"])
    return reaped


def _reap_stale(study: optuna.Study, storage: BaseStorage) -> list[int]:
    """FAIL (and retry) the RUNNING trials without a heartbeat for the grace period
    (what ``optuna.storages.fail_stale_trials`` does, reading only those trials)."""
    if heartbeat_interval(storage) is None:
        return []
    reaped = []
    retry = retry_callback(storage)
    for tid in stale_trial_ids(storage, study.study_name):
        if _fail(storage, tid, "no heartbeat: the worker was lost"):  # the reason, while still RUNNING
            failed = storage.get_trial(tid)
            retry(study, failed)
            reaped.append(failed.number)
    return reaped


def _fail(storage: BaseStorage, tid: int, reason: str) -> bool:
    """FAIL a RUNNING trial; False when another worker got there first."""
    try:
        storage.set_trial_user_attr(tid, keys.FAILURE, reason)
        return bool(storage.set_trial_state_values(tid, TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


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
        run_id = t.user_attrs.get(keys.RUN_ID)
        if t.number in numbers and run_id:
            try:
                client.set_tag(run_id, keys.FAILURE, t.user_attrs.get(keys.FAILURE, "worker lost"))
                client.set_terminated(run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the run may not have reached the store
                pass


def enqueue_grid(study: optuna.Study, spec: StudySpec, storage: BaseStorage | None = None) -> int:
    """Enqueue every (grid point, replicate) with no COMPLETE, WAITING or RUNNING trial.
    Call it under :func:`~studies.coordination.study_lock` when workers share the study.

    Each (grid point, replicate) has at most one trial in those states (enqueueing is
    exactly-once; a retry is queued only when its attempt has FAILed), so when they
    count the grid's size there is nothing to enqueue, and the trials are not read: a
    worker joining a 10,000-trial study pays one count query, not a read of the study.
    """
    storage = storage if storage is not None else study_storage(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    size = math.prod(len(v) for v in spec.grid.values()) * spec.replicates
    if queue.count(storage, study_id, ("COMPLETE", "WAITING", "RUNNING")) == size:
        return 0
    have = set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)):
        if keys.GRID_KEY in t.user_attrs:
            have.add((t.user_attrs[keys.GRID_KEY], t.user_attrs[keys.REPLICATE]))
    added = 0
    for point, seed in spec.grid_points():
        key = grid_key(point)
        if (key, seed) in have:
            continue
        study.enqueue_trial({**point, "seed": seed},
                            user_attrs={keys.GRID_KEY: key, keys.REPLICATE: seed},
                            skip_if_exists=False)
        added += 1
    return added


def _counts_of(study: optuna.Study, storage: BaseStorage | None = None) -> dict[str, int]:
    storage = storage if storage is not None else study_storage(study)
    return queue.state_counts(storage, storage.get_study_id_from_name(study.study_name))


def _waiting(study: optuna.Study, storage: BaseStorage | None = None) -> int:
    return _counts_of(study, storage)["WAITING"]


def _retried(trials: list) -> set[int]:
    """Numbers of the failed attempts that have a retry."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def search_budget_used(study: optuna.Study) -> int:
    """Trials that count against a search's ``n_trials``: every trial but the failed
    attempts that were retried (their retry counts instead)."""
    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    return sum(1 for t in trials if t.number not in retried)


def claim_trial(study: optuna.Study, spec: StudySpec, storage: BaseStorage | None = None) -> optuna.Trial | None:
    """The next trial for this worker, or None when there is none to claim now.

    A grid claims a WAITING trial (never samples a new one): on an RDB storage or
    through masklab's proxy with one indexed statement and no lock
    (:func:`stores.queue.pop_waiting`, exactly-once by itself), elsewhere under the
    study lock with Optuna's ``ask``. A search claims a WAITING retry first, else,
    under the lock, samples a new trial while the budget lasts (its sampler reads the
    study's trials anyway). ``storage``: the study's storage, as opened (found through
    the study when not given).
    """
    storage = storage if storage is not None else study_storage(study)
    if queue.supported(storage):
        trial = _pop(study, storage)
        if trial is not None or spec.kind == "grid":
            return trial
    with study_lock(storage, spec.name):
        if spec.kind == "grid":
            if not _waiting(study, storage):
                return None
        elif not _waiting(study, storage) and search_budget_used(study) >= spec.n_trials:
            return None
        return study.ask()


def _pop(study: optuna.Study, storage: BaseStorage) -> optuna.Trial | None:
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = queue.pop_waiting(storage, study_id)
    if trial_id is None:
        return None
    # What Study.ask does with the id it pops: a Trial on it (its enqueued values are
    # its fixed params, given back by the suggest calls).
    return optuna.Trial(study, trial_id)


def _busy(study: optuna.Study, storage: BaseStorage | None = None) -> bool:
    counts = _counts_of(study, storage)
    return bool(counts["RUNNING"] + counts["WAITING"])


def remaining(study: optuna.Study, spec: StudySpec, storage: BaseStorage | None = None) -> int:
    """Trials still to run: WAITING ones (grid, retries), plus the search budget left."""
    if spec.kind == "grid":
        return _waiting(study, storage)
    return _waiting(study, storage) + max(0, spec.n_trials - search_budget_used(study))


# ---------------------------------------------------------------- one trial


def trial_name(spec: StudySpec, params: dict, seed: int) -> str:
    """``depth=4 p_bw=0.05 seed=1``: the trial's swept values by their short names (the
    report's setting label) and its seed; the name of its MLflow run."""
    from reports.loader import setting_label

    label = setting_label(params, spec.swept)
    return f"seed={seed}" if label == "all" else f"{label} seed={seed}"


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
    from lit_modules.config import run_config_from_dict

    from .train import train_run

    trial.set_user_attr(keys.HOST, socket.gethostname())
    trial.set_user_attr(keys.PID, os.getpid())
    params, seed = suggest(trial, spec)
    cfg = run_config_from_dict(spec.run_config_dict(params, seed))
    trial.set_user_attr(keys.CONFIG_HASH, cfg.hash())
    name = trial_name(spec, params, cfg.seed)
    trial.set_user_attr(keys.NAME, name)

    def on_run(run_id: str) -> None:
        trial.set_user_attr(keys.RUN_ID, run_id)
        if cfg.trainer.checkpoint:
            trial.set_user_attr(keys.CHECKPOINT, str(workspace.checkpoint_dir / run_id / "last.ckpt"))

    try:
        result = train_run(cfg, workspace, _trial_tracking(trial, spec, tracking_uri, parent_id, name),
                           spec.ablation, _trial_callbacks(trial, spec, progress_bar and cfg.trainer.progress_bar),
                           on_run=on_run, resume=_resume_of(trial))
    except optuna.TrialPruned as e:
        trial.set_user_attr(keys.FAILURE, f"pruned: {e}")
        return TrialState.PRUNED, None, "pruned"
    except KeyboardInterrupt:
        trial.set_user_attr(keys.FAILURE, "interrupted (Ctrl-C)")
        raise
    except Exception as e:  # the trial fails; the study goes on
        reason = _one_line(e)
        trial.set_user_attr(keys.FAILURE, reason)
        return TrialState.FAIL, None, reason
    return _outcome(trial, spec, result.metrics)


def _trial_tracking(trial: optuna.Trial, spec: StudySpec, tracking_uri: str, parent_id: str, name: str):
    """Where the trial's run is recorded: a child of the study's parent run, named ``name``."""
    from .train import Tracking

    return Tracking(
        tracking_uri=tracking_uri, experiment=spec.name, run_name=name,
        parent_run_id=parent_id,
        tags={keys.ROLE: keys.ROLE_TRIAL, keys.STUDY: spec.name, keys.TRIAL: str(trial.number),
              keys.OVERRIDES: " ".join(spec.overrides)},
        artifacts=(Path(spec.source),) if spec.source else (),
    )


def _trial_callbacks(trial: optuna.Trial, spec: StudySpec, progress_bar: bool) -> list:
    """The pruner's callback, and a progress bar for the trial's steps on a terminal."""
    from optuna_integration import PyTorchLightningPruningCallback

    # A transfer objective exists only after training: nothing to prune on (the spec
    # refuses a pruner with one).
    pruning = not spec.objective.metric.startswith("transfer/")
    callbacks = [PyTorchLightningPruningCallback(trial, monitor=spec.objective.metric)] if pruning else []
    if progress_bar and sys.stderr.isatty():
        from lightning.pytorch.callbacks import TQDMProgressBar

        callbacks.append(TQDMProgressBar(process_position=1, leave=False))
    return callbacks


def _resume_of(trial: optuna.Trial):
    """For a retry, the dead attempt's run and checkpoint to resume from; else None."""
    from .train import Resume

    attrs = trial.user_attrs
    if keys.RETRY_OF_TRIAL not in attrs:
        return None
    ckpt = attrs.get(keys.RESUME_CHECKPOINT)
    return Resume(attrs.get(keys.RETRY_OF_RUN), Path(ckpt) if ckpt else None,
                  tags={keys.RETRY_OF_TRIAL: str(attrs[keys.RETRY_OF_TRIAL])})


def _outcome(trial: optuna.Trial, spec: StudySpec, metrics: dict[str, float]) -> tuple[TrialState, float | None, str]:
    """COMPLETE with the objective's final value; FAIL when it is missing or not finite."""
    value = metrics.get(spec.objective.metric)
    if value is None or not math.isfinite(value):
        reason = f"objective {spec.objective.metric} = {value} (available: {', '.join(sorted(metrics))})"
        trial.set_user_attr(keys.FAILURE, reason)
        return TrialState.FAIL, None, reason
    return TrialState.COMPLETE, value, f"{spec.objective.metric}={value:.4f}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return scrub(f"{type(e).__name__}: {text[0]}"[:2000]) if text else type(e).__name__


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
    wait: bool = False,
    report_once: bool = False,
    heartbeat: int = HEARTBEAT_SECONDS,
    grace: int = GRACE_SECONDS,
) -> StudyResult:
    """Claim and run trials until the study needs none, then write its report.

    Any number of processes may run this on one study at once (``masklab worker``). With
    ``wait``, a worker that finds nothing to claim while other workers' trials run keeps
    looking (every ``POLL_SECONDS``): if one of those workers dies its trial is retried
    here. ``report`` writes the report when the study has nothing left to run; with
    ``report_once`` only if no report covers the study's current trials (so of several
    workers finishing together, one writes it).
    """
    storage_url = storage_url or default_storage(workspace)
    tracking_uri = tracking_uri or workspace.tracking_uri
    _quiet_optuna()
    storage = make_storage(storage_url, heartbeat, grace)
    study = open_study(spec, storage_url, tracking_uri, storage=storage)
    parent_id = parent_run(study, storage, spec, tracking_uri, workspace)
    worker = _Worker(study, storage, spec, workspace, tracking_uri, parent_id,
                     log or (lambda msg: print(msg, file=sys.stderr, flush=True)), progress, reap_every=grace)
    worker.prepare()
    todo = remaining(study, spec, storage) if max_trials is None else min(remaining(study, spec, storage), max_trials)
    bar = _bar(todo, spec.name, progress)
    try:
        worker.work(max_trials, wait, bar)
    finally:
        if bar is not None:
            bar.close()
        _close_parent(tracking_uri, parent_id, study, worker.status)
    result = StudyResult(spec.name, _counts(study), worker.ran, parent_run_id=parent_id, failures=worker.failures)
    if report and (_claim_report(study, storage, spec) if report_once else not _busy(study, storage)):
        result.report_md, result.report_html = write_study_report(spec.name, storage_url, tracking_uri, workspace,
                                                                  parent_id)
    return result


@dataclass
class _Worker:
    """This process's share of a study: it claims trials and runs them one at a time."""

    study: optuna.Study
    storage: BaseStorage  # the study's storage, as opened
    spec: StudySpec
    workspace: Workspace
    tracking_uri: str
    parent_id: str
    log: Callable[[str], None]
    progress: bool
    ran: int = 0
    failures: list[str] = field(default_factory=list)
    status: str = "FINISHED"  # what the parent run is closed with when this worker stops
    reap_every: float = GRACE_SECONDS  # how often a busy worker looks for dead workers' trials
    _last_look: float = 0.0

    def prepare(self) -> None:
        """Under the lock: retry the trials of dead workers, and (grid) enqueue every point."""
        with study_lock(self.storage, self.spec.name):
            reaped = reap_dead_trials(self.study, self.tracking_uri, self.storage)
            if self.spec.kind == "grid":
                enqueue_grid(self.study, self.spec, self.storage)
        self._last_look = time.monotonic()
        if reaped:
            self.log(f"marked FAIL: trials {reaped} (their worker died); retries are queued")

    def work(self, max_trials: int | None, wait: bool, bar) -> None:
        """Claim and run trials until there is none to claim (with ``wait``: until no
        other worker's trial is left either) or ``max_trials`` have run."""
        while max_trials is None or self.ran < max_trials:
            self._look_for_the_dead()
            trial = claim_trial(self.study, self.spec, self.storage)
            if trial is None:
                if not (wait and _busy(self.study, self.storage)):
                    return
                self._poll()
                continue
            state, note = self._run(trial)
            _bar_step(bar, trial_line(trial, state, note), self.log)

    def _poll(self) -> None:
        time.sleep(POLL_SECONDS)
        self._reap()

    def _reap(self) -> None:
        # Under the lock: a retry must be queued before anyone enqueues the grid.
        with study_lock(self.storage, self.spec.name):
            if reap_dead_trials(self.study, self.tracking_uri, self.storage):
                self.log("a worker died: its trial is queued again")
        self._last_look = time.monotonic()

    def _look_for_the_dead(self) -> None:
        """Between trials, at most every ``reap_every`` seconds: a dead worker's trial is
        retried while the queue still holds work (not only once it has drained). The
        look takes no lock; the lock is taken only when there is a trial to reap."""
        if time.monotonic() - self._last_look < self.reap_every:
            return
        self._last_look = time.monotonic()
        if _dead_trials_seen(self.study, self.storage):
            self._reap()

    def _run(self, trial: optuna.Trial) -> tuple[TrialState, str]:
        try:
            with keep_alive(self.storage, self.study.study_name, trial.number):
                state, value, note = run_trial(trial, self.spec, self.workspace, self.tracking_uri, self.parent_id,
                                               self.progress)
        except KeyboardInterrupt:
            self.study.tell(trial, state=TrialState.FAIL)
            self.status = "KILLED"
            self.log(f"interrupted: trial {trial.number} marked FAIL; finished trials are kept")
            raise
        try:
            self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Reaped while it ran (its heartbeats could not be stored for the grace period):
            # its retry runs it again; this attempt's run is kept in MLflow.
            self.log(f"trial {trial.number} was marked FAIL while it ran (no heartbeat for the grace period); "
                     "its retry runs it again")
            state, note = TrialState.FAIL, "reaped while running"
        if state == TrialState.FAIL:
            self.failures.append(f"trial {trial.number}: {note}")
        self.ran += 1
        return state, note


def trial_line(trial: optuna.Trial, state: TrialState, note: str) -> str:
    """The terminal's line for a finished trial: ``trial 3 depth=4 p_bw=0.05 seed=1:
    complete val/fw_loss=5.1234`` (the reason, cut short, for a failed one)."""
    attrs = trial.user_attrs
    name = attrs.get(keys.NAME) or " ".join(f"{k}={v}" for k, v in trial.params.items())
    retry = f" (retry of trial {attrs[keys.RETRY_OF_TRIAL]})" if keys.RETRY_OF_TRIAL in attrs else ""
    head = f"trial {trial.number} {name}{retry}: {state.name.lower()}"
    return f"{head} {note}"[: max(160, len(head) + 60)]


def _claim_report(study: optuna.Study, storage: BaseStorage, spec: StudySpec) -> bool:
    """True for the one worker that should write the report now: the study has nothing
    left to run and no report covers its current trials yet."""
    with study_lock(storage, spec.name):
        if _busy(study, storage):
            return False
        done = len(study.get_trials(deepcopy=False))
        # Read from the storage: another worker may have just claimed it.
        if study.user_attrs.get(keys.REPORTED_TRIALS) == done:
            return False
        study.set_user_attr(keys.REPORTED_TRIALS, done)
        return True


def _counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _close_parent(tracking_uri: str, parent_id: str, study: optuna.Study, status: str) -> None:
    from mlflow.tracking import MlflowClient

    from .tracking import log_metric_series

    client = MlflowClient(tracking_uri=tracking_uri)
    log_metric_series(client, parent_id, [(f"study/{state.lower()}_trials", n, 0)
                                          for state, n in _counts(study).items()])
    if status == "FINISHED" and _busy(study):
        status = "RUNNING"  # other workers are still on it
    if status != "RUNNING":
        client.set_terminated(parent_id, status)


def write_study_report(name: str, storage_url: str, tracking_uri: str, workspace: Workspace,
                       parent_id: str | None = None) -> tuple[Path, Path]:
    """Regenerate the report from the stores; attach it to the parent run."""
    from reports.loader import load_study
    from reports.study_report import write_report

    try:
        data = load_study(name, storage_url, tracking_uri)
    except StudyNotFoundError as e:
        raise ConfigError("study", name, scrub(str(e), storage_url)) from None
    out = workspace.output_dir / "reports" / name
    md, html = write_report(data, out)
    if parent_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        for path in (md, html, *sorted(out.glob("findings.*"))):
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
