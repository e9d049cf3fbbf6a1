"""A worker's storage that rides out a database outage: every call that fails because
the server cannot be reached (a PostgreSQL restart, a dropped connection, a gRPC proxy
that is down) is tried again, with back-off, for up to ``max_outage`` seconds, then
raises :class:`StorageOutage` naming the storage and how long it was gone.

Retrying is safe only where a call that may already have taken effect can be repeated
or recognised; so, beyond plain retries:

- ``create_new_trial`` carries a token in the new trial's system attrs; after an
  outage it first looks for a trial with that token (the insert may have committed
  before the connection dropped), so an enqueued grid point is never stored twice.
- ``set_trial_state_values`` to a finished state that raises "already finished" after
  an outage is the first attempt's write: it succeeded.
- ``delete_study`` that finds no study after an outage had deleted it.
- A claim (:func:`stores.queue.pop_waiting_sql`) that committed before the connection
  dropped leaves a RUNNING trial no worker runs; its first heartbeat is written in the
  same transaction, so it is found stale and retried like a lost worker's trial.

The wrapper is not an ``RDBStorage``, so Optuna does not put its in-process cache in
front of it: claims made in SQL (``stores.queue``) are seen at once by the trial that
reads them.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from . import queue
from .urls import scrub

_log = logging.getLogger("masklab.storage")

# Seconds a worker waits for its database (or proxy) to come back before its call fails.
DEFAULT_MAX_OUTAGE = 300.0
TOKEN = "masklab.create_token"


class StorageOutage(RuntimeError):
    """The storage stayed unreachable for longer than ``max_outage``; one line."""


def max_outage_default() -> float:
    """``MASKLAB_MAX_OUTAGE`` (seconds) or 300."""
    value = os.environ.get("MASKLAB_MAX_OUTAGE")
    return float(value) if value else DEFAULT_MAX_OUTAGE


# PostgreSQL error classes of a server that is going away or not there yet: the
# connection class (08...), shutdown and start-up (57P01-57P03), too many connections.
TRANSIENT_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")


def transient(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) says the server could not be
    reached or dropped the connection, as opposed to a refused or invalid request (a
    lock timeout, a constraint, a bad statement: those are raised at once)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        name = type(e).__name__
        module = type(e).__module__ or ""
        if module.startswith("sqlalchemy") and getattr(e, "connection_invalidated", False):
            return True
        if module.startswith(("psycopg", "sqlalchemy", "sqlite3")) and name in ("OperationalError",
                                                                               "InterfaceError"):
            orig = getattr(e, "orig", None) or e
            if type(orig).__module__.startswith("sqlite3"):
                return "locked" in str(orig)  # another process holds the write lock
            state = getattr(orig, "sqlstate", None)
            # No SQLSTATE: no answer from a server at all (refused, reset, timed out).
            return state is None or state.startswith(TRANSIENT_SQLSTATES)
        if module.startswith("grpc") and hasattr(e, "code"):
            try:
                if e.code().name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    return True
            except Exception:  # noqa: BLE001 - not an RPC error after all
                pass
        stack += [e.__cause__, e.__context__]
    return False


class ResilientStorage(BaseStorage, BaseHeartbeat):
    """``backend`` (an RDBStorage, or masklab's gRPC client) with outages ridden out.

    ``describe``: how the storage is named in messages (a URL without its password).
    """

    def __init__(self, backend: BaseStorage, describe: str, max_outage: float | None = None):
        self._backend = backend
        self.describe = describe
        self.max_outage = max_outage_default() if max_outage is None else float(max_outage)
        self.outages = 0  # calls that met an outage and went through after it (for tests and logs)
        engine = queue.rdb_engine(backend)
        self._engine = engine

    # ------------------------------------------------------------ the retry loop
    def _call(self, what: str, fn: Callable[[], Any], after_outage: Callable[[BaseException], Any] | None = None):
        first: float | None = None
        delay = 0.25
        last: BaseException | None = None
        while True:
            try:
                # After an outage, a call that may have taken effect is settled its own way.
                result = after_outage(last) if last is not None and after_outage is not None else fn()
                if first is not None:
                    self.outages += 1
                    _log.warning("storage %s is back after %.1f s; %s went through", self.describe,
                                 time.monotonic() - first, what)
                return result
            except Exception as e:
                if not transient(e):
                    raise
                now = time.monotonic()
                if first is None:
                    first = now
                    _log.warning("storage %s unreachable (%s); retrying for up to %.0f s", self.describe,
                                 _reason(e), self.max_outage)
                if now - first > self.max_outage:
                    raise StorageOutage(f"storage {self.describe} unreachable for {now - first:.0f} s "
                                        f"(max outage {self.max_outage:.0f} s, MASKLAB_MAX_OUTAGE): "
                                        f"{_reason(e)}") from e
                last = e if after_outage is not None else None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)

    def retry(self, what: str, fn: Callable[[], Any]):
        """Call ``fn`` (something else that talks to this storage's server), riding out
        an outage as the storage's own calls do."""
        return self._call(what, fn)

    def _forward(self, name: str, *args, **kwargs):
        method = getattr(self._backend, name)
        return self._call(name, lambda: method(*args, **kwargs))

    def __getattr__(self, name: str):
        # Optional extras of the backend (masklab's gRPC client: masklab_* calls).
        if name.startswith("masklab_") and name not in ("masklab_pop_waiting", "masklab_state_counts",
                                                          "masklab_running"):
            return getattr(self._backend, name)
        raise AttributeError(name)

    # ------------------------------------------------------------ the queue (stores.queue)
    def masklab_pop_waiting(self, study_id: int) -> int | None:
        if self._engine is not None:
            return self._call("claim", lambda: queue.pop_waiting_sql(self._engine, study_id))
        return self._forward("masklab_pop_waiting", study_id)

    def masklab_state_counts(self, study_id: int) -> dict[str, int]:
        if self._engine is not None:
            return self._call("count", lambda: queue.state_counts_sql(self._engine, study_id))
        return self._forward("masklab_state_counts", study_id)

    def masklab_running(self, study_id: int) -> list[dict]:
        if self._engine is not None:
            return self._call("running", lambda: queue.running_sql(self._engine, study_id))
        if hasattr(self._backend, "masklab_running") and self.has_queue:
            return self._forward("masklab_running", study_id)
        return self._call("running", lambda: queue.running(self._backend, study_id))

    @property
    def has_queue(self) -> bool:
        if self._engine is not None:
            return True
        return bool(self._call("hello", lambda: getattr(self._backend, "has_queue", False)))

    # ------------------------------------------------------------ calls with an outcome to recognise
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        token = uuid.uuid4().hex
        template = _with_token(template_trial, token)

        def find(_: BaseException) -> int:
            for t in self._backend.get_all_trials(study_id, deepcopy=False):
                if t.system_attrs.get(TOKEN) == token:
                    return t._trial_id
            return self._backend.create_new_trial(study_id, template)

        return self._call("create_new_trial", lambda: self._backend.create_new_trial(study_id, template), find)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        def settled(_: BaseException) -> bool:
            try:
                return self._backend.set_trial_state_values(trial_id, state, values)
            except UpdateFinishedTrialError:
                if state.is_finished() and self._backend.get_trial(trial_id).state == state:
                    return True  # the first attempt's write had committed
                raise

        return self._call("set_trial_state_values",
                          lambda: self._backend.set_trial_state_values(trial_id, state, values), settled)

    def delete_study(self, study_id: int) -> None:
        def gone(_: BaseException) -> None:
            try:
                self._backend.delete_study(study_id)
            except KeyError:
                pass

        return self._call("delete_study", lambda: self._backend.delete_study(study_id), gone)

    # ------------------------------------------------------------ heartbeats
    def get_heartbeat_interval(self) -> int | None:
        get = getattr(self._backend, "get_heartbeat_interval", None)
        return self._call("hello", get) if get is not None else None

    def get_heartbeat_stale_trial_callback(self):
        get = getattr(self._backend, "get_heartbeat_stale_trial_callback", None)
        return get() if get is not None else None

    def get_failed_trial_callback(self):
        get = getattr(self._backend, "get_failed_trial_callback", None)
        return get() if get is not None else None

    def record_heartbeat(self, trial_id: int) -> None:
        return self._forward("record_heartbeat", trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self._forward("_get_stale_trial_ids", study_id)

    def remove_session(self) -> None:
        remove = getattr(self._backend, "remove_session", None)
        if remove is not None:
            remove()


def _plain(name: str):
    def method(self, *args, **kwargs):
        return self._forward(name, *args, **kwargs)

    method.__name__ = name
    return method


for _name in ("check_trial_is_updatable", "create_new_study", "get_all_studies", "get_all_trials", "get_best_trial",
              "get_n_trials", "get_study_directions", "get_study_id_from_name", "get_study_name_from_id",
              "get_study_system_attrs", "get_study_user_attrs", "get_trial", "get_trial_id_from_study_id_trial_number",
              "get_trial_number_from_id", "get_trial_param", "get_trial_params", "get_trial_system_attrs",
              "get_trial_user_attrs", "set_study_system_attr", "set_study_user_attr", "set_trial_intermediate_value",
              "set_trial_param", "set_trial_system_attr", "set_trial_user_attr"):
    if _name not in ResilientStorage.__dict__:
        setattr(ResilientStorage, _name, _plain(_name))
ResilientStorage.__abstractmethods__ = frozenset()


def _with_token(template: FrozenTrial | None, token: str) -> FrozenTrial:
    """The template with the creation token added (a new RUNNING trial, as Optuna makes
    one without a template, when there is none)."""
    if template is None:
        return FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, values=None,
                           datetime_start=datetime.datetime.now(), datetime_complete=None, params={},
                           distributions={}, user_attrs={}, system_attrs={TOKEN: token}, intermediate_values={},
                           trial_id=-1)
    return FrozenTrial(number=template.number, state=template.state, value=None, values=template.values,
                       datetime_start=template.datetime_start, datetime_complete=template.datetime_complete,
                       params=template.params, distributions=template.distributions,
                       user_attrs=template.user_attrs, system_attrs={**template.system_attrs, TOKEN: token},
                       intermediate_values=template.intermediate_values, trial_id=template._trial_id)


def _reason(e: BaseException) -> str:
    text = scrub(str(e)).strip().splitlines()  # a driver's message may quote the URL
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
