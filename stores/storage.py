"""Optuna storages: opening them, the studies in them, trial ids and heartbeats.

Two ways to open a storage URL (``stores.urls`` says which URLs there are):
:func:`open_storage` for readers (reports, dashboards, ``masklab status``), which
creates nothing, and :func:`connect_storage` for workers, which creates the file or
tables, puts a sqlite file in WAL mode, and turns on heartbeats.

Optuna's public API serves almost everything here. Where it does not, the private
access is made in this module only, with the reason beside it: a Study's storage
(:func:`study_storage`), the RDB storage inside Optuna's cache (:func:`postgres_engine`)
and the stale trials of a study (:func:`stale_trial_ids`).
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage

from .resilient import ResilientStorage
from .urls import (
    describe,
    is_grpc,
    is_in_memory,
    is_journal,
    is_url,
    journal_path,
    redact,
    scrub,
    sqlite_path,
)

# A lock study is named after the study it guards (see studies.coordination.study_lock).
LOCK_SUFFIX = "~masklab-lock"


class StudyNotFoundError(LookupError):
    """The study (or its storage) does not exist; the message is one line."""


# ------------------------------------------------------------------ opening
def open_storage(url: str | BaseStorage) -> BaseStorage:
    """An Optuna storage from a URL, without creating anything that does not exist.

    ``sqlite:///path`` and other SQLAlchemy URLs give an RDBStorage; a journal URL gives
    a JournalStorage on that file. A missing sqlite or journal file is a
    :class:`StudyNotFoundError`. A storage object is returned as it is.
    """
    if not isinstance(url, str):
        return url
    if is_grpc(url):
        from .proxy import connect

        return connect(url)
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = journal_path(url)
        _require_file(path, url)
        return JournalStorage(JournalFileBackend(str(path)))
    path = sqlite_path(url)
    if path is not None and not is_in_memory(path):
        _require_file(path, url)
    elif not is_url(url):
        raise StudyNotFoundError(f"not an Optuna storage URL: {redact(url)!r} (expected e.g. sqlite:///path/optuna.db, "
                                 "postgresql://..., or journal:path.log)")
    return optuna.storages.RDBStorage(url)


def _require_file(path: Path, url: str) -> None:
    if not path.is_file():
        raise StudyNotFoundError(f"no Optuna storage at {redact(url)}: {path} does not exist")


def connect_storage(url: str, heartbeat: int, grace: int,
                    stale_callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
                    max_outage: float | None = None) -> BaseStorage:
    """The storage behind ``url`` for a worker, created if absent: a journal file, or
    an RDB storage with heartbeats every ``heartbeat`` seconds, stale after ``grace``,
    and ``stale_callback`` called for each stale trial that is failed. An RDB storage
    comes wrapped in :class:`~stores.resilient.ResilientStorage`: a database outage of
    up to ``max_outage`` seconds (default ``MASKLAB_MAX_OUTAGE`` or 300) is waited out."""
    if is_grpc(url):
        from .proxy import connect

        return ResilientStorage(connect(url, stale_callback), redact(url), max_outage)
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {}
    path = sqlite_path(url)
    if path is not None:
        _sqlite_wal(path)
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
                rdb = optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace,
                                                 heartbeat_stale_trial_callback=stale_callback, **kwargs)
            return ResilientStorage(rdb, redact(url), max_outage)
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
    if is_in_memory(path):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=120)
    try:
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


# ------------------------------------------------------------------ studies
def lock_study_name(study: str) -> str:
    """The name of the short-lived study that holds ``study``'s lock."""
    return study + LOCK_SUFFIX


def is_lock_study(name: str) -> bool:
    return name.endswith(LOCK_SUFFIX)


def list_studies(storage: str | BaseStorage) -> list[str]:
    """Names of the studies in an Optuna storage (sorted), without the short-lived
    lock studies that workers sharing a study hold for a moment."""
    return sorted(n for n in optuna.get_all_study_names(open_storage(storage)) if not is_lock_study(n))


def load_study(name: str, storage: str | BaseStorage, where: str | BaseStorage | None = None) -> optuna.Study:
    """Study ``name``; a :class:`StudyNotFoundError` naming the studies there if absent
    (the storage named as ``where``, when given: the URL an opened storage came from)."""
    opened = open_storage(storage)
    try:
        return optuna.load_study(study_name=name, storage=opened)
    except KeyError:
        names = sorted(optuna.get_all_study_names(opened))
        there = ", ".join(names) if names else "none"
        shown = describe(storage if where is None else where)
        raise StudyNotFoundError(f"study {name!r} not found in {shown}; studies there: {there}") from None


def study_storage(study: optuna.Study) -> BaseStorage:
    """The storage a Study reads and writes through.

    Optuna keeps it private (``Study._storage``) and offers no accessor. The runner
    passes along the storage it opened; this serves callers that hold only a Study.
    """
    return study._storage


def postgres_engine(storage: BaseStorage):
    """The SQLAlchemy engine of a PostgreSQL storage (None for other storages).

    ``RDBStorage.engine`` is public; but a Study wraps its RDBStorage in Optuna's
    private ``_CachedStorage``, whose only way to the RDBStorage is ``_backend``.
    """
    from .queue import rdb_engine

    engine = rdb_engine(storage)
    return engine if engine is not None and engine.dialect.name == "postgresql" else None


# ------------------------------------------------------------------ trials
def trial_id(storage: BaseStorage, study_name: str, number: int) -> int:
    """The storage's id of trial ``number`` of study ``study_name``."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def trial_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The trial's params; for a queued (WAITING) trial, which has none yet, the
    values it was enqueued with."""
    return dict(trial.params or trial.system_attrs.get("fixed_params") or {})


def trial_seconds(trial: optuna.trial.FrozenTrial) -> float | None:
    """How long a finished trial ran (None while it runs or waits)."""
    start, end = trial.datetime_start, trial.datetime_complete
    return (end - start).total_seconds() if start and end else None


# ------------------------------------------------------------------ heartbeats
def heartbeat_interval(storage: BaseStorage) -> int | None:
    """Seconds between heartbeats, or None where the storage keeps none (journal files)."""
    get = getattr(storage, "get_heartbeat_interval", None)
    return get() if get is not None else None


@contextmanager
def keep_alive(storage: BaseStorage, study_name: str, number: int) -> Iterator[None]:
    """Record the heartbeat of trial ``number`` while the block runs, where the storage
    keeps heartbeats (Optuna records them only inside ``Study.optimize``; a worker that
    asks and tells records them here)."""
    interval = heartbeat_interval(storage)
    if interval is None:
        yield
        return
    trial = trial_id(storage, study_name, number)
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial)
            except Exception as e:  # noqa: BLE001 - an outage longer than the storage waits: beat again later
                warnings.warn(f"heartbeat of trial {number} not recorded: {type(e).__name__}: {scrub(str(e))}",
                              stacklevel=1)
            if stop.wait(timeout=interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def stale_trial_ids(storage: BaseStorage, study_name: str) -> list[int]:
    """Ids of the RUNNING trials of the study whose heartbeat is older than the grace
    period, while they still run (``optuna.storages.fail_stale_trials`` fails them but
    does not say which; the reason must be written before they are failed, as a
    finished trial takes no attribute). Optuna exposes this only as the private
    ``_get_stale_trial_ids`` of its storages."""
    if heartbeat_interval(storage) is None:
        return []
    return storage._get_stale_trial_ids(storage.get_study_id_from_name(study_name))
