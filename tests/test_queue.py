"""The trial queue (stores/queue.py) and the outage-tolerant storage (stores/resilient.py),
on sqlite files: claims whose work does not grow with the study, exactly once under
concurrency, a lost claim retried, and retries that never store a trial twice."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from stores import queue
from stores.resilient import ResilientStorage, StorageOutage, transient
from studies.coordination import make_storage, study_lock
from studies.runner import claim_trial, enqueue_grid, open_study, reap_dead_trials, suggest

from .conftest import TINY

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _spec(points: int, replicates: int = 1, name: str = "q"):
    from studies.spec import load_spec

    return load_spec({"name": name, "model": "gpt", "data": "wikitext-2", "fixed": TINY["gpt"],
                      "grid": {"masking.p_bw": [round(i / points, 8) for i in range(points)]},
                      "replicates": replicates, "objective": "val/fw_loss"})


def _grid_study(url: str, points: int, replicates: int = 1, **storage_kwargs):
    spec = _spec(points, replicates)
    storage = make_storage(url, **storage_kwargs)
    study = open_study(spec, url, "unused", storage=storage)
    with study_lock(storage, spec.name):
        enqueue_grid(study, spec, storage)
    return spec, storage, study


def _statements(engine, fn) -> list[str]:
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement.split()[0].upper() + " " + statement.split("FROM")[-1].split()[0]
                    if "FROM" in statement else statement.split()[0].upper())

    sqlalchemy.event.listen(engine, "before_cursor_execute", record)
    try:
        fn()
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", record)
    return seen


def test_a_claim_runs_the_same_statements_in_a_study_of_10_or_400_trials(tmp_path):
    """The claim's SQL does not depend on the study's size (nothing reads the other
    trials): the same statements, in the same order, at 10 and at 400 enqueued trials."""
    shapes = []
    for n in (10, 400):
        spec, storage, study = _grid_study(f"sqlite:///{tmp_path}/q{n}.db", n)
        claim_trial(study, spec, storage)  # the index exists from here on
        engine = queue.rdb_engine(storage)
        shapes.append(_statements(engine, lambda s=study, sp=spec, st=storage: claim_trial(s, sp, st)))
        assert queue.state_counts(storage, storage.get_study_id_from_name("q"))["RUNNING"] == 2
    assert shapes[0] == shapes[1] and len(shapes[0]) <= 12, shapes


def test_concurrent_pops_take_each_waiting_trial_once(tmp_path):
    spec, storage, study = _grid_study(f"sqlite:///{tmp_path}/q.db", 60)
    study_id = storage.get_study_id_from_name("q")
    got: list[int] = []
    lock = threading.Lock()

    def pop_all():
        mine = make_storage(f"sqlite:///{tmp_path}/q.db")
        while (tid := queue.pop_waiting(mine, study_id)) is not None:
            with lock:
                got.append(tid)

    threads = [threading.Thread(target=pop_all) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(set(got)) and len(got) == 60
    assert queue.state_counts(storage, study_id) == {"RUNNING": 60, "COMPLETE": 0, "PRUNED": 0, "FAIL": 0,
                                                     "WAITING": 0}


def test_a_claim_whose_worker_never_heard_back_is_retried(tmp_path):
    """The claim records the trial's first heartbeat in its own transaction: a trial
    claimed by a worker that then vanished (or never got the answer) goes stale after
    the grace period and is queued again with its grid point."""
    url = f"sqlite:///{tmp_path}/q.db"
    spec, storage, study = _grid_study(url, 2, heartbeat=1, grace=1)
    lost = queue.pop_waiting(storage, storage.get_study_id_from_name("q"))
    time.sleep(2.5)
    with study_lock(storage, spec.name):
        reaped = reap_dead_trials(study, None, storage)
    trials = study.get_trials()
    assert [t._trial_id for t in trials if t.state == TrialState.FAIL] == [lost] and len(reaped) == 1
    retry = [t for t in trials if t.system_attrs.get("failed_trial") is not None]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    first = next(t for t in trials if t._trial_id == lost)
    assert retry[0].user_attrs["masklab.grid_key"] == first.user_attrs["masklab.grid_key"]


def test_grid_enqueue_skips_reading_the_study_when_every_point_is_there(tmp_path):
    url = f"sqlite:///{tmp_path}/q.db"
    spec, storage, study = _grid_study(url, 30, replicates=2)
    engine = queue.rdb_engine(storage)
    with study_lock(storage, spec.name):
        statements = _statements(engine, lambda: enqueue_grid(study, spec, storage))
    assert len(statements) == 2, statements  # the study's id, and one count by state
    trial = claim_trial(study, spec, storage)
    suggest(trial, spec)
    study.tell(trial, state=TrialState.FAIL)  # a failed point is enqueued again on the next run
    with study_lock(storage, spec.name):
        assert enqueue_grid(study, spec, storage) == 1


class _Flaky:
    """Makes a storage method commit and then raise a dropped-connection error, once."""

    def __init__(self, storage: ResilientStorage, name: str):
        self.original = getattr(storage._backend, name)
        self.calls = 0
        setattr(storage._backend, name, self)

    def __call__(self, *args, **kwargs):
        result = self.original(*args, **kwargs)
        self.calls += 1
        if self.calls == 1:
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, ConnectionResetError("server closed the connection"))
        return result


def test_retried_create_after_a_lost_answer_stores_the_trial_once(tmp_path):
    spec, storage, study = _grid_study(f"sqlite:///{tmp_path}/q.db", 1)
    flaky = _Flaky(storage, "create_new_trial")
    study.enqueue_trial({"masking.p_bw": 0.5, "seed": 0})
    assert flaky.calls == 1  # committed once, its answer lost; the retry found it by its token
    assert len(study.get_trials()) == 2 and storage.outages == 1


def test_retried_tell_after_a_lost_answer_counts_as_told(tmp_path):
    spec, storage, study = _grid_study(f"sqlite:///{tmp_path}/q.db", 1)
    trial = claim_trial(study, spec, storage)
    suggest(trial, spec)
    _Flaky(storage, "set_trial_state_values")
    study.tell(trial, 1.0)
    assert study.get_trials()[0].state == TrialState.COMPLETE and storage.outages == 1


def test_an_outage_longer_than_the_limit_fails_in_one_line(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path}/q.db", max_outage=0.5)

    def down(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))

    storage._backend.get_all_studies = down
    with pytest.raises(StorageOutage, match=r"^storage sqlite:///.* unreachable for \d+ s \(max outage 0 s"):
        storage.get_all_studies()


def test_transient_errors_are_connection_errors_only():
    class PgError(Exception):
        __module__ = "psycopg.errors"

        def __init__(self, sqlstate):
            self.sqlstate = sqlstate

    def wrapped(orig):
        e = sqlalchemy.exc.OperationalError("SELECT 1", {}, orig)
        return e

    assert transient(wrapped(PgError("57P01")))  # admin shutdown: a restart
    assert transient(wrapped(PgError("08006")))  # connection failure
    assert transient(wrapped(ConnectionRefusedError("refused")))  # no server answered
    assert not transient(wrapped(PgError("55P03")))  # lock timeout: the lock is busy, not the server
    assert not transient(wrapped(PgError("23505")))  # unique violation
    assert not transient(ValueError("bad value"))
    assert not transient(KeyError("no such study"))
