"""What lets many workers share one study safely: storages, a study lock, retries.

- :func:`make_storage` opens the Optuna storage behind a URL: an RDB storage (a sqlite
  file, or PostgreSQL for a cluster) with heartbeats and :class:`RetryTrial` as the
  stale-trial callback, or a journal file (``journal:PATH``).
- :func:`study_lock` is a mutex across processes and machines built on the storage
  itself: a PostgreSQL advisory lock, or elsewhere a lock study (creating a study is
  atomic in every Optuna storage, so the worker that creates it holds the lock).
  Enqueueing a grid, creating the MLflow parent run and claiming the next trial happen
  under it, so any number of workers may start at once and every (grid point,
  replicate) is enqueued, and run, exactly once.
- :class:`RetryTrial` re-enqueues a trial whose worker died (found by heartbeat, or by
  its pid on this host) as a WAITING copy that knows the attempt's MLflow run and
  checkpoint, so the next worker resumes it from that checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import sqlite3
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

# A RUNNING trial without a heartbeat for GRACE_SECONDS is stale: its worker is gone.
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90
# A trial is retried at most this many times (a trial that kills its worker every time
# must not keep the cluster busy forever).
MAX_RETRIES = 3
LOCK_SUFFIX = "~masklab-lock"
# A lock older than this is taken to belong to a dead worker (the work done under the
# lock takes well under a second).
LOCK_STALE_SECONDS = 120.0

ATTR = "masklab."
# Attributes of one attempt that a retry must not inherit.
ATTEMPT_ATTRS = ("masklab.host", "masklab.pid", "masklab.failure", "masklab.mlflow_run_id", "masklab.checkpoint")


def is_journal(url: str) -> bool:
    return url.startswith("journal:") or url.endswith((".log", ".journal", ".jsonl"))


def journal_path(url: str) -> Path:
    return Path(url.removeprefix("journal:").removeprefix("//"))


class RetryTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's stale-trial retry, with masklab's links between attempts.

    The WAITING copy keeps the params, the intermediate values and the masklab
    attributes that describe *what* to run (grid point, replicate), drops those of the
    dead attempt (host, pid, failure, run id) and records where to resume:
    ``masklab.retry_of_trial`` (the first attempt's number), ``masklab.retry_of_run``
    (the dead attempt's MLflow run) and ``masklab.resume_checkpoint``.
    """

    def __init__(self, max_retry: int | None = MAX_RETRIES):
        super().__init__(max_retry=max_retry, inherit_intermediate_values=True)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if self._max_retry is not None and len(history) > self._max_retry:
            return
        attrs = {k: v for k, v in trial.user_attrs.items() if k not in ATTEMPT_ATTRS}
        attrs["masklab.retry_of_trial"] = history[0]
        if trial.user_attrs.get("masklab.mlflow_run_id"):
            attrs["masklab.retry_of_run"] = trial.user_attrs["masklab.mlflow_run_id"]
        checkpoint = trial.user_attrs.get("masklab.checkpoint")
        if checkpoint and Path(checkpoint).is_file():
            attrs["masklab.resume_checkpoint"] = checkpoint
        elif "masklab.resume_checkpoint" in attrs and not Path(attrs["masklab.resume_checkpoint"]).is_file():
            del attrs["masklab.resume_checkpoint"]
        study.add_trial(optuna.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs=attrs, system_attrs={"failed_trial": history[0], "retry_history": history},
            intermediate_values=trial.intermediate_values,
        ))


def make_storage(url: str, heartbeat: int = HEARTBEAT_SECONDS, grace: int = GRACE_SECONDS) -> optuna.storages.BaseStorage:
    """The storage behind ``url``; RDB storages get heartbeats and :class:`RetryTrial`."""
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        _sqlite_wal(Path(url.removeprefix("sqlite:///").split("?", 1)[0]))
        # Several processes on one file: wait for the write lock instead of failing.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    elif url.startswith("postgresql"):
        # Long trials leave pooled connections idle; the server may have dropped them.
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    # Workers starting together on a new database race to create Optuna's tables (the
    # loser sees "already exists"); on a second try the tables are there.
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats and retries are "experimental" in Optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace,
                                                  heartbeat_stale_trial_callback=RetryTrial(), **kwargs)
        except Exception as e:  # noqa: BLE001 - sqlalchemy's errors differ by database
            if attempt == 4 or not _schema_race(e):
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def _schema_race(error: BaseException) -> bool:
    text = " ".join(str(e) for e in (error, error.__cause__) if e is not None).lower()
    return any(s in text for s in ("already exists", "duplicate key", "unique constraint", "database is locked"))


def _sqlite_wal(path: Path) -> None:
    """Put a sqlite store in write-ahead-log mode (persistent in the file): readers no
    longer block the writer, which is what lets local workers share the file."""
    if str(path) in ("", ":memory:"):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=120)
    try:
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def retry_callback(storage: optuna.storages.BaseStorage) -> RetryTrial:
    """The storage's stale-trial callback (journal storages have none: a default one)."""
    get = getattr(storage, "get_heartbeat_stale_trial_callback", None)
    callback = get() if get is not None else None
    if isinstance(callback, RetryTrial):
        return callback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryTrial()


@contextmanager
def study_lock(storage: optuna.storages.BaseStorage, name: str, timeout: float = 600.0) -> Iterator[None]:
    """Hold the lock of study ``name`` across every process using ``storage``.

    On PostgreSQL this is a session advisory lock (the server queues the waiters, and
    releases the lock by itself if the holder's connection dies); on other storages, a
    lock study (created atomically; broken after ``LOCK_STALE_SECONDS``).
    """
    engine = _postgres_engine(storage)
    if engine is not None:
        with _advisory_lock(engine, name + LOCK_SUFFIX, timeout):
            yield
        return
    lock = name + LOCK_SUFFIX
    owner = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + timeout
    first_seen: dict[int, float] = {}
    while True:
        try:
            lock_id = storage.create_new_study([StudyDirection.MINIMIZE], lock)
            break
        except DuplicatedStudyError:
            _break_if_stale(storage, lock, first_seen)
            if time.monotonic() > deadline:
                raise TimeoutError(f"study lock {lock!r} held for over {timeout:.0f} s") from None
            time.sleep(0.05 + random.random() * 0.15)
    try:
        storage.set_study_user_attr(lock_id, "owner", owner)
        storage.set_study_user_attr(lock_id, "since", time.time())
        yield
    finally:
        try:
            storage.delete_study(lock_id)
        except KeyError:  # broken as stale by another worker
            pass


def _postgres_engine(storage: optuna.storages.BaseStorage):
    rdb = getattr(storage, "_backend", storage)  # optuna wraps RDB storages in a cache
    engine = getattr(rdb, "engine", None)
    return engine if engine is not None and engine.dialect.name == "postgresql" else None


@contextmanager
def _advisory_lock(engine, name: str, timeout: float) -> Iterator[None]:
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    with engine.connect() as conn:
        # LOCAL: the timeout ends with this transaction; the (session) lock does not, and
        # the pooled connection goes back to Optuna with its usual settings.
        conn.execute(text(f"SET LOCAL lock_timeout = {int(timeout * 1000)}"))
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            conn.commit()


def _break_if_stale(storage: optuna.storages.BaseStorage, lock: str, first_seen: dict[int, float]) -> None:
    try:
        lock_id = storage.get_study_id_from_name(lock)
        since = storage.get_study_user_attrs(lock_id).get("since")
    except KeyError:
        return  # released meanwhile
    # A lock without its timestamp yet is judged by when this worker first saw it.
    since = since if since is not None else first_seen.setdefault(lock_id, time.time())
    if time.time() - since > LOCK_STALE_SECONDS:
        try:
            storage.delete_study(lock_id)
        except KeyError:
            pass


def is_lock_study(name: str) -> bool:
    return name.endswith(LOCK_SUFFIX)
