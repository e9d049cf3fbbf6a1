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
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from stores import keys
from stores.resilient import transient
from stores.storage import connect_storage, lock_study_name, postgres_engine

# A RUNNING trial without a heartbeat for GRACE_SECONDS is stale: its worker is gone.
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90
# A trial is retried at most this many times (a trial that kills its worker every time
# must not keep the cluster busy forever).
MAX_RETRIES = 3
# A lock older than this is taken to belong to a dead worker (the work done under the
# lock takes well under a second).
LOCK_STALE_SECONDS = 120.0
# Waiters for a lock study poll with back-off up to this many seconds.
LOCK_POLL_MAX_SECONDS = 2.0


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
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if self.max_retry is not None and len(history) > self.max_retry:
            return
        attrs = {k: v for k, v in trial.user_attrs.items() if k not in keys.ATTEMPT_ATTRS}
        attrs[keys.RETRY_OF_TRIAL] = history[0]
        if trial.user_attrs.get(keys.RUN_ID):
            attrs[keys.RETRY_OF_RUN] = trial.user_attrs[keys.RUN_ID]
        checkpoint = trial.user_attrs.get(keys.CHECKPOINT)
        if checkpoint and Path(checkpoint).is_file():
            attrs[keys.RESUME_CHECKPOINT] = checkpoint
        elif keys.RESUME_CHECKPOINT in attrs and not Path(attrs[keys.RESUME_CHECKPOINT]).is_file():
            del attrs[keys.RESUME_CHECKPOINT]
        study.add_trial(optuna.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs=attrs, system_attrs={"failed_trial": history[0], "retry_history": history},
            intermediate_values=trial.intermediate_values,
        ))


def make_storage(url: str, heartbeat: int = HEARTBEAT_SECONDS, grace: int = GRACE_SECONDS,
                 max_outage: float | None = None) -> optuna.storages.BaseStorage:
    """The storage behind ``url``, created if absent; RDB storages get heartbeats,
    :class:`RetryTrial` and outage retries (see :func:`stores.storage.connect_storage`)."""
    with warnings.catch_warnings():  # retries are "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryTrial()
    return connect_storage(url, heartbeat, grace, retry, max_outage)


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
    lock study (created atomically; its holder refreshes its timestamp while it holds
    it, and a lock not refreshed for ``LOCK_STALE_SECONDS`` is broken as a dead holder's).
    """
    lock = lock_study_name(name)
    engine = postgres_engine(storage)
    if engine is not None:
        retry = getattr(storage, "retry", lambda what, fn: fn())  # rides out a database restart
        with _advisory_lock(engine, lock, timeout, retry):
            yield
        return
    owner = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + timeout
    first_seen: dict[int, float] = {}
    wait = 0.05
    while True:
        try:
            lock_id = storage.create_new_study([StudyDirection.MINIMIZE], lock)
            break
        except DuplicatedStudyError:
            _break_if_stale(storage, lock, first_seen)
            if time.monotonic() > deadline:
                raise TimeoutError(f"study lock {lock!r} held for over {timeout:.0f} s") from None
            # Back off: many waiters polling fast would slow the holder (through a proxy, all
            # of them share its threads) and the lock would be held longer still.
            time.sleep(wait * (0.5 + random.random()))
            wait = min(wait * 1.5, LOCK_POLL_MAX_SECONDS)
    stop = threading.Event()

    def refresh() -> None:  # a holder that is alive is never taken for a dead one
        while not stop.wait(LOCK_STALE_SECONDS / 4):
            try:
                storage.set_study_user_attr(lock_id, "since", time.time())
            except Exception:  # noqa: BLE001 - broken meanwhile, or the storage is away: the next beat tries
                pass

    refresher = threading.Thread(target=refresh, name=f"lock-{name}", daemon=True)
    try:
        storage.set_study_user_attr(lock_id, "owner", owner)
        storage.set_study_user_attr(lock_id, "since", time.time())
        refresher.start()
        yield
    finally:
        stop.set()
        if refresher.is_alive():
            refresher.join()
        try:
            storage.delete_study(lock_id)
        except KeyError:  # broken as stale by another worker
            pass


@contextmanager
def _advisory_lock(engine, name: str, timeout: float, retry) -> Iterator[None]:
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)

    def acquire():
        conn = engine.connect()
        try:
            # LOCAL: the timeout ends with this transaction; the (session) lock does not,
            # and the pooled connection goes back to Optuna with its usual settings.
            conn.execute(text(f"SET LOCAL lock_timeout = {int(timeout * 1000)}"))
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    conn = retry("study lock", acquire)
    try:
        yield
    finally:
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            conn.commit()
        except Exception as e:  # noqa: BLE001 - a lost connection: the server released its locks with it
            if not transient(e):
                raise
        finally:
            conn.close()


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
