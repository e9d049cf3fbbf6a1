"""The trial queue of a study: claiming the next WAITING trial in time independent of
the study's size, and counting trials by state without reading them.

Optuna's own claim (``Study.ask``) reads every WAITING trial of the study, with all its
attributes, and then tries them one by one: O(trials) per claim, ~0.1 s at 200 trials
and seconds at 10,000. Here a claim is one statement on an RDB storage (sqlite or
PostgreSQL), served by a partial index on the WAITING trials::

    UPDATE trials SET state = 'RUNNING', datetime_start = :now
    WHERE trial_id = (SELECT trial_id FROM trials
                      WHERE study_id = :study AND state = 'WAITING'
                      ORDER BY trial_id LIMIT 1 FOR UPDATE SKIP LOCKED)  -- PostgreSQL
    RETURNING trial_id

Exactly-once: on PostgreSQL each claimer locks the row it takes and skips rows another
claimer holds (a row changed by a committed claim no longer matches ``state =
'WAITING'`` when it is re-checked); sqlite serializes writers. The same transaction
records the trial's first heartbeat, so a trial whose claimer is lost before it hears
back (a database restart at that moment) is found stale and retried like any other.

Other storages (journal files, a gRPC proxy without masklab's queue service) return
``None`` from :func:`pop_waiting`'s ``supported`` check and keep Optuna's claim.

This module reads and writes Optuna's tables (``trials``, ``trial_heartbeats``) by
name: the schema Optuna 4 and 5 share. The partial index it adds
(``masklab_waiting_trials``) is the only change to the schema.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Iterable
from typing import Any

from optuna.storages import BaseStorage

INDEX = "masklab_waiting_trials"
STATES = ("RUNNING", "COMPLETE", "PRUNED", "FAIL", "WAITING")

_indexed: set[str] = set()
_indexed_lock = threading.Lock()


def rdb_engine(storage: Any):
    """The SQLAlchemy engine under an RDB storage (a Study wraps it in Optuna's
    private ``_CachedStorage``, whose only way to the RDBStorage is ``_backend``; a
    :class:`~stores.resilient.ResilientStorage` offers the same), or None."""
    rdb = getattr(storage, "_backend", storage)
    rdb = getattr(rdb, "_backend", rdb)
    return getattr(rdb, "engine", None)


def supported(storage: BaseStorage) -> bool:
    """Whether claims on this storage can be made by :func:`pop_waiting`."""
    has = getattr(storage, "has_queue", None)
    if has is not None:  # stores.resilient.ResilientStorage, masklab's gRPC client
        return bool(has)
    return rdb_engine(storage) is not None


def ensure_index(engine) -> None:
    """Create the partial index on WAITING trials once per database (idempotent; workers
    creating it at the same moment may race, the loser finds it made)."""
    from sqlalchemy import text

    key = str(engine.url)
    with _indexed_lock:
        if key in _indexed:
            return
        try:
            with engine.begin() as conn:
                conn.execute(text(f"CREATE INDEX IF NOT EXISTS {INDEX} ON trials (study_id, trial_id) "
                                  "WHERE state = 'WAITING'"))
        except Exception as e:  # noqa: BLE001 - a concurrent CREATE INDEX; anything else is re-raised
            if "already exists" not in str(e) and "duplicate key" not in str(e):
                raise
        _indexed.add(key)


def pop_waiting(storage: BaseStorage, study_id: int) -> int | None:
    """Set the study's first WAITING trial (lowest id) to RUNNING and return its id;
    None when no trial waits. Only on storages where :func:`supported` holds."""
    pop = getattr(storage, "masklab_pop_waiting", None)
    if pop is not None:  # retried through outages; or a gRPC proxy whose server runs the SQL below
        return pop(study_id)
    engine = rdb_engine(storage)
    if engine is None:
        raise TypeError(f"{type(storage).__name__} has no SQL queue (supported() is False)")
    return pop_waiting_sql(engine, study_id)


def pop_waiting_sql(engine, study_id: int) -> int | None:
    from sqlalchemy import text

    ensure_index(engine)
    postgres = engine.dialect.name == "postgresql"
    lock = " FOR UPDATE SKIP LOCKED" if postgres else ""
    claim = text(
        "UPDATE trials SET state = 'RUNNING', datetime_start = :now "
        "WHERE trial_id = (SELECT trial_id FROM trials WHERE study_id = :study AND state = 'WAITING' "
        f"ORDER BY trial_id LIMIT 1{lock}) AND state = 'WAITING' RETURNING trial_id")
    beat = text(
        "INSERT INTO trial_heartbeats (trial_id, heartbeat) VALUES (:trial, CURRENT_TIMESTAMP) "
        "ON CONFLICT (trial_id) DO UPDATE SET heartbeat = CURRENT_TIMESTAMP")
    # Optuna stores datetime_start as local time (datetime.now()); so does this.
    with engine.begin() as conn:
        row = conn.execute(claim, {"now": datetime.datetime.now(), "study": study_id}).first()
        if row is None:
            return None
        conn.execute(beat, {"trial": row[0]})
    return int(row[0])


def state_counts(storage: BaseStorage, study_id: int) -> dict[str, int]:
    """Trials of the study per state name (every state present, 0 where none), counted
    by the database where there is one."""
    counts = dict.fromkeys(STATES, 0)
    count = getattr(storage, "masklab_state_counts", None)
    if count is not None:
        counts.update(count(study_id))
        return counts
    engine = rdb_engine(storage)
    if engine is not None:
        counts.update(state_counts_sql(engine, study_id))
        return counts
    for t in storage.get_all_trials(study_id, deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def state_counts_sql(engine, study_id: int) -> dict[str, int]:
    from sqlalchemy import text

    with engine.connect() as conn:
        rows = conn.execute(text("SELECT state, COUNT(*) FROM trials WHERE study_id = :study GROUP BY state"),
                            {"study": study_id}).all()
    return {_name(state): int(n) for state, n in rows}


def _name(state: Any) -> str:
    return state if isinstance(state, str) else getattr(state, "name", str(state))


def count(storage: BaseStorage, study_id: int, states: Iterable[str]) -> int:
    counts = state_counts(storage, study_id)
    return sum(counts.get(s, 0) for s in states)


def running(storage: BaseStorage, study_id: int) -> list[dict]:
    """The study's RUNNING trials as ``{"trial_id", "number", "host", "pid"}`` (host and
    pid: the user attrs ``masklab.host`` / ``masklab.pid`` its worker set, None before),
    read without the other trials (a worker looks for dead workers' trials with this)."""
    ask = getattr(storage, "masklab_running", None)
    if ask is not None:
        return ask(study_id)
    engine = rdb_engine(storage)
    if engine is not None:
        return running_sql(engine, study_id)
    out = []
    for t in storage.get_all_trials(study_id, deepcopy=False):
        if t.state.name == "RUNNING":
            out.append({"trial_id": t._trial_id, "number": t.number, "host": t.user_attrs.get("masklab.host"),
                        "pid": t.user_attrs.get("masklab.pid")})
    return out


def running_sql(engine, study_id: int) -> list[dict]:
    import json

    from sqlalchemy import text

    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT t.trial_id, t.number, a.key, a.value_json FROM trials t "
            "LEFT JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
            "AND a.key IN ('masklab.host', 'masklab.pid') "
            "WHERE t.study_id = :study AND t.state = 'RUNNING' ORDER BY t.trial_id"), {"study": study_id}).all()
    out: dict[int, dict] = {}
    for trial_id, number, key, value in rows:
        entry = out.setdefault(trial_id, {"trial_id": trial_id, "number": number, "host": None, "pid": None})
        if key is not None:
            entry[key.split(".", 1)[1]] = json.loads(value)
    return list(out.values())
