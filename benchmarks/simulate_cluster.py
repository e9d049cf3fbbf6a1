"""A simulated cluster: N workers sharing one grid study, with crashes injected.

Each simulated worker is a process that does what ``masklab worker`` does around a
trial, without the training: it opens the storage (heartbeat ``--heartbeat`` s, stale
after ``--grace`` s), enqueues the grid and reaps dead trials under the study lock,
then claims a trial, records itself as its host (a fake one, ``sim-node-<i>``, so that,
as on a real cluster, only missing heartbeats reveal a dead worker) and pid, and "runs"
it inside ``keep_alive``: it sleeps ``--trial-seconds`` (0: no work at all) and tells
the trial COMPLETE. With probability ``--crash-rate`` per trial it dies instead, half
way through (``os._exit``: no goodbye to the storage). With nothing to claim while
trials still run or wait, it polls every ``--poll`` s: under the study lock it reaps
stale trials (which queues their retries, ``RetryTrial``), then claims again; between
trials, every ``--grace`` s, it looks for stale trials (without the lock) and reaps them
under the lock when there are some, as ``masklab worker`` does; it leaves when the
study has nothing running or waiting.

The parent plays the cluster scheduler: it starts N workers (forked, after importing
masklab and Optuna, so even 128 start in seconds), lets them claim once all N have
started (so N workers really claim at once; their start is measured on its own),
restarts every worker that crashed (N stay alive until the study is done), and samples
the database's client connections every 0.5 s. Each (mode, N) runs on a fresh database
of one throwaway PostgreSQL server (``tests/servers.py``). Modes: ``direct`` (workers connect to PostgreSQL) and
``proxy`` (workers use ``grpc://`` through one ``masklab storage-proxy`` process).

    python benchmarks/simulate_cluster.py                 # direct and proxy, 8/32/128 workers
    python benchmarks/simulate_cluster.py --workers 8 --trials 200 --trial-seconds 0.1 --crash-rate 0.05
    python benchmarks/simulate_cluster.py --modes proxy --workers 128 --trial-seconds 0 --json sim.json

``--workdir DIR`` keeps each run's worker events, the proxy's log and, for a run that
times out (``--timeout``), every worker's stack at that moment.

One row per run:

- ``wall s``: the whole run, from starting the workers to the last one leaving.
- ``start s``: until all N first workers had opened the storage and the study, and
  (under the study lock, one at a time) reaped and enqueued the grid; the JSON has
  each phase's p50 and max (``startup_phases_p50_max_s``; ``lock_wait`` is the wait for
  the study lock).
- ``trials/s``: COMPLETE trials per second, from the end of the start to the last
  trial's end.
- ``claim p50/p99``: the time of a successful ``claim_trial`` (ms), as workers see it.
- ``conns mean/max``: client connections open on the PostgreSQL server, sampled while
  the workers claim (direct: the workers' pools; proxy: the proxy's pool); the JSON
  also has the most during the start (``conns_max_startup``).
- ``lost`` / ``dup``: grid (point, replicate) pairs with no COMPLETE trial, or with
  more than one. Both must be 0 (a trial FAILed after ``MAX_RETRIES`` retries and never
  run again is lost).
- ``crashes``: injected crashes; ``detect p50/max``: crash to its trial being marked
  FAIL (s: the grace period plus the time until a worker next looks, at most another
  grace period after its current trial);
  ``retry p50/max``: crash to the start of its retry (s: detection plus the retry's
  wait in the queue behind the trials enqueued before it).
- ``errors``: worker exceptions (tracebacks are printed), workers ending otherwise
  than by an injected crash or a clean exit, tracebacks in the proxy's log, runs
  that time out, the study lock held by two workers at once (by the times each
  worker entered and left it), the grid enqueued more than once.
- ``false reaps``: trials marked FAIL while their (live) worker still ran them (their
  ``tell`` is refused and the retry runs them again; not an error, but a sign that
  heartbeats were late).

Exit status 1 if any run lost or duplicated a trial, or had an error.
Needs Debian's ``postgresql`` package (as the tests do).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Imported here, in the parent, so forked workers share them (and start fast). Nothing
# here opens a database connection or a gRPC channel: only the workers do.
import alembic.command  # noqa: E402,F401 - what an RDBStorage loads to check the schema version
import alembic.config  # noqa: E402,F401
import alembic.migration  # noqa: E402,F401
import alembic.script  # noqa: E402,F401
import grpc  # noqa: E402,F401
import optuna  # noqa: E402
import optuna.storages._grpc.client  # noqa: E402,F401
import optuna.storages._rdb.storage  # noqa: E402,F401
import psycopg  # noqa: E402,F401
import sqlalchemy  # noqa: E402,F401
import sqlalchemy.dialects.postgresql.psycopg  # noqa: E402,F401
from optuna.exceptions import UpdateFinishedTrialError  # noqa: E402

import stores.proxy  # noqa: E402,F401
from stores import keys  # noqa: E402
from stores.grid import grid_key  # noqa: E402
from stores.storage import keep_alive  # noqa: E402
from studies.coordination import make_storage, study_lock  # noqa: E402
from studies.runner import (  # noqa: E402
    _busy,
    _dead_trials_seen,
    claim_trial,
    enqueue_grid,
    open_study,
    reap_dead_trials,
    suggest,
)

STUDY = "sim"
CRASH_EXIT = 17  # an injected crash
ERROR_EXIT = 18  # an exception in the worker (its traceback is in the events)
SAMPLE_SECONDS = 0.5


@dataclass(frozen=True)
class Config:
    mode: str
    workers: int
    points: int
    replicates: int
    trial_seconds: float
    crash_rate: float
    heartbeat: int
    grace: int
    poll: float
    seed: int


def _spec(points: int, replicates: int):
    from studies.spec import load_spec
    from tests.conftest import TINY

    return load_spec({"name": STUDY, "model": "gpt", "data": "wikitext-2", "fixed": TINY["gpt"],
                      "grid": {"masking.p_bw": [round(i / points, 6) for i in range(points)]},
                      "replicates": replicates, "objective": "val/fw_loss"})


# ------------------------------------------------------------------ a worker


class _Events:
    """One JSON line per event, appended with a single write (it survives ``os._exit``)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, kind: str, **fields) -> None:
        os.write(self.fd, (json.dumps({"kind": kind, "pid": os.getpid(), **fields}) + "\n").encode())


def _worker(cfg: Config, spec, slot: int, generation: int, storage_url: str, events_dir: str, ready, go) -> None:
    """One simulated worker (see the module docstring); ends with os._exit: 0 when the
    study is done, CRASH_EXIT for an injected crash, ERROR_EXIT on an exception. Once
    started (storage, study, grid, reaped) it counts itself in ``ready`` and waits for
    ``go`` (set when all N first workers are ready; already set for a restarted one)."""
    ev = _Events(Path(events_dir) / f"w{slot:03d}-g{generation:03d}-{os.getpid()}.jsonl")
    rng = random.Random(f"{cfg.seed}:{slot}:{generation}")
    host = f"sim-node-{slot}"

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, optuna.exceptions.ExperimentalWarning):  # "GrpcStorageProxy is experimental"
            ev("warning", text=f"{category.__name__}: {message}")

    warnings.showwarning = show
    import logging

    class ToEvents(logging.Handler):
        def emit(self, record):
            ev("log", level=record.levelname, logger=record.name, text=record.getMessage())

    logging.getLogger().addHandler(ToEvents(logging.WARNING))
    # SIGUSR1 (sent by the supervisor when a run times out) dumps every thread's stack.
    stacks = open(Path(events_dir) / f"stacks-w{slot:03d}-{os.getpid()}.txt", "w")  # noqa: SIM115
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    code = 0
    phases = {"forked": time.time()}

    def phase(name: str) -> None:
        phases[name] = time.time()
        ev("phase", name=name, t=phases[name])

    try:
        storage = make_storage(storage_url, cfg.heartbeat, cfg.grace)
        phase("storage")
        study = open_study(spec, storage_url, "unused", cfg.heartbeat, cfg.grace, storage=storage)
        phase("open_study")
        with study_lock(storage, spec.name):
            phase("lock_wait")
            reaped = reap_dead_trials(study, None, storage)
            phase("reap")
            added = enqueue_grid(study, spec, storage)
            phase("enqueue")
        ev("held", start=phases["lock_wait"], end=phases["enqueue"])
        if added:
            ev("enqueued", added=added)
        if reaped:
            ev("reaped", numbers=reaped, t=time.time())
        ev("ready", t=time.time(), generation=generation, phases=phases)
        with ready.get_lock():
            ready.value += 1
        go.wait()
        last_look = time.monotonic()
        while True:
            if time.monotonic() - last_look >= cfg.grace:  # as masklab's worker does between trials
                last_look = time.monotonic()
                if _dead_trials_seen(study, storage):
                    with study_lock(storage, spec.name):
                        held = time.time()
                        reaped = reap_dead_trials(study, None, storage)
                        ev("held", start=held, end=time.time())
                    if reaped:
                        ev("reaped", numbers=reaped, t=time.time())
            t0 = time.perf_counter()
            trial = claim_trial(study, spec, storage)
            took = time.perf_counter() - t0
            if trial is None:
                ev("empty", s=took)
                if not _busy(study, storage):
                    break
                time.sleep(cfg.poll)
                with study_lock(storage, spec.name):
                    held = time.time()
                    reaped = reap_dead_trials(study, None, storage)
                    ev("held", start=held, end=time.time())
                if reaped:
                    ev("reaped", numbers=reaped, t=time.time())
                continue
            ev("claim", n=trial.number, s=took, t=time.time())
            crash = rng.random() < cfg.crash_rate
            with keep_alive(storage, spec.name, trial.number):
                trial.set_user_attr(keys.HOST, host)
                trial.set_user_attr(keys.PID, os.getpid())
                suggest(trial, spec)
                if crash:
                    time.sleep(cfg.trial_seconds / 2)
                    ev("crash", n=trial.number, t=time.time())
                    os._exit(CRASH_EXIT)
                if cfg.trial_seconds:
                    time.sleep(cfg.trial_seconds)
            try:
                study.tell(trial, 1.0)
                ev("done", n=trial.number, t=time.time())
            except UpdateFinishedTrialError as e:
                ev("reaped_alive", n=trial.number, t=time.time(), text=str(e))
    except BaseException:  # noqa: BLE001 - reported by the supervisor; fails the run
        ev("error", text=traceback.format_exc())
        code = ERROR_EXIT
    os._exit(code)


# ------------------------------------------------------------------ the supervisor


def _start_proxy(db_url: str, cfg: Config, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    from tests.servers import free_port

    port = free_port()
    out = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "studies.cli", "storage-proxy", "--port", str(port), "--heartbeat",
         str(cfg.heartbeat), "--grace", str(cfg.grace), "--threads", str(threads)],
        env={**os.environ, "MASKLAB_STORAGE": db_url}, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    out.close()
    deadline = time.monotonic() + 60
    while "storage-proxy: serving" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"storage-proxy did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return proc, f"grpc://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def _dump_trials(db_url: str, out: str) -> None:
    """In a child process (the parent keeps no connection across forks): every trial of
    the study, as plain JSON."""
    try:
        storage = optuna.storages.RDBStorage(db_url)
        study = optuna.load_study(study_name=STUDY, storage=storage)
        rows = [{"number": t.number, "state": t.state.name,
                 "key": t.user_attrs.get(keys.GRID_KEY), "replicate": t.user_attrs.get(keys.REPLICATE),
                 "start": t.datetime_start.timestamp() if t.datetime_start else None,  # naive local time
                 "end": t.datetime_complete.timestamp() if t.datetime_complete else None,
                 "retry_history": t.system_attrs.get("retry_history"), "failure": t.user_attrs.get(keys.FAILURE)}
                for t in study.get_trials(deepcopy=False)]
        Path(out).write_text(json.dumps(rows))
        storage.engine.dispose()
    except BaseException:  # noqa: BLE001
        Path(out).write_text(json.dumps({"error": traceback.format_exc()}))
    os._exit(0)


def simulate(cluster, cfg: Config, proxy_threads: int, timeout: float, tmp: Path) -> dict:
    from tests.servers import create_database

    ctx = mp.get_context("fork")
    spec = _spec(cfg.points, cfg.replicates)  # built once; the forked workers inherit it
    run_dir = tmp / f"{cfg.mode}-{cfg.workers}-{time.strftime('%H%M%S')}"
    events_dir = run_dir / "events"
    events_dir.mkdir(parents=True)
    db_url = create_database(cluster.url, f"sim_{cfg.mode}_{cfg.workers}")
    proxy, proxy_log = None, run_dir / "proxy.log"
    if cfg.mode == "proxy":
        proxy, storage_url = _start_proxy(db_url, cfg, proxy_threads, proxy_log)
    else:
        storage_url = db_url
    errors: list[str] = []
    conns: list[tuple[float, int]] = []  # (time, connections)
    ready, go = ctx.Value("i", 0), ctx.Event()
    t_go = None
    exits: dict[int, int] = {}
    generation = [0]
    timed_out = False

    def start(slot: int):
        generation[0] += 1
        p = ctx.Process(target=_worker, args=(cfg, spec, slot, generation[0], storage_url, str(events_dir),
                                                   ready, go), daemon=True)
        p.start()
        return p

    t_start = time.time()
    procs: dict[int, mp.Process] = {}
    try:
        for slot in range(cfg.workers):
            procs[slot] = start(slot)
        next_sample = 0.0
        while procs:
            if time.monotonic() >= next_sample:
                next_sample = time.monotonic() + SAMPLE_SECONDS
                try:
                    conns.append((time.time(), cluster.connections()))
                except Exception as e:  # noqa: BLE001 - max_connections reached: itself a finding
                    errors.append(f"sampling connections: {type(e).__name__}: {e}")
            if time.time() - t_start > timeout:
                timed_out = True
                errors.append(f"timed out after {timeout:.0f} s with {len(procs)} workers left")
                for p in procs.values():
                    os.kill(p.pid, signal.SIGUSR1)  # their stacks, for the report
                time.sleep(2)
                for p in procs.values():
                    p.kill()
                for p in procs.values():
                    p.join()
                break
            if t_go is None and ready.value + exits.get(ERROR_EXIT, 0) >= cfg.workers:
                go.set()  # every first worker has started (or failed to): all claim from now on
                t_go = time.time()
            mp.connection.wait([p.sentinel for p in procs.values()], timeout=0.1)
            for slot, p in list(procs.items()):
                if p.exitcode is None:
                    continue
                p.join()
                exits[p.exitcode] = exits.get(p.exitcode, 0) + 1
                if p.exitcode == CRASH_EXIT:
                    procs[slot] = start(slot)  # the scheduler starts the worker again
                else:
                    del procs[slot]
                    if p.exitcode not in (0, ERROR_EXIT):
                        errors.append(f"worker {slot} (pid {p.pid}) ended with exit code {p.exitcode}")
        wall = time.time() - t_start
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
        if proxy is not None:
            _stop(proxy)

    dump = run_dir / "trials.json"
    p = ctx.Process(target=_dump_trials, args=(db_url, str(dump)))
    p.start()
    p.join()
    trials = json.loads(dump.read_text())
    if isinstance(trials, dict):
        errors.append(f"reading the study: {trials['error']}")
        trials = []

    events = []
    for f in sorted(events_dir.glob("w*.jsonl")):
        events += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    errors += [f"worker pid {e['pid']}: {e['text']}" for e in events if e["kind"] == "error"]
    if proxy is not None:
        # (less the line Optuna logs for every lock study created: one per study_lock)
        text = "".join(line for line in proxy_log.read_text().splitlines(keepends=True)
                       if "~masklab-lock" not in line)
        if "Traceback" in text or timed_out:
            errors.append(f"storage-proxy log:\n{text[-6000:]}")
    if timed_out:  # where the workers were: a few stacks
        for f in sorted(events_dir.glob("stacks-*.txt"))[:4]:  # the main thread, up to the worker's function
            main = f.read_text().partition("Current thread")[2].split("multiprocessing/process.py")[0]
            errors.append(f"main thread of {f.name}:\n" + "\n".join(main.splitlines()[1:-1]))
        last = {}
        for e in events:
            if e["kind"] == "phase":
                last[e["pid"]] = e["name"]
        where = {}
        for pid_phase in last.values():
            where[pid_phase] = where.get(pid_phase, 0) + 1
        errors.append(f"last phase reached by the workers that started: {where}")
    return _figures(cfg, spec, trials, events, conns, errors, exits, t_start, t_go, wall, timed_out, proxy_threads)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))]


def _figures(cfg: Config, spec, trials: list[dict], events: list[dict], conns: list[tuple[float, int]],
             errors: list[str], exits: dict[int, int], t_start: float, t_go: float | None, wall: float,
             timed_out: bool, proxy_threads: int) -> dict:
    expected = {(grid_key(point), seed) for point, seed in spec.grid_points()}
    complete: dict[tuple, int] = dict.fromkeys(expected, 0)
    strays = 0
    states: dict[str, int] = {}
    for t in trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
        if t["state"] == "COMPLETE":
            key = (t["key"], t["replicate"])
            if key in complete:
                complete[key] += 1
            else:
                strays += 1
    lost = sorted(k for k, n in complete.items() if n == 0)
    dup = sorted(k for k, n in complete.items() if n > 1)
    by_number = {t["number"]: t for t in trials}
    retry_of = {t["retry_history"][-1]: t for t in trials if t["retry_history"]}

    done = [t for t in trials if t["state"] == "COMPLETE" and t["start"] and t["end"]]
    span = (max(t["end"] for t in done) - (t_go or t_start)) if done else 0.0
    running = [n for t, n in conns if t_go is not None and t >= t_go]  # while the workers claim
    r1 = lambda v, n=1: None if v is None else round(v, n)  # noqa: E731
    claims = [e["s"] * 1000 for e in events if e["kind"] == "claim"]
    first = [e for e in events if e["kind"] == "ready" and e["generation"] <= cfg.workers]
    ready = [e["t"] - t_start for e in first]
    startup = {}  # seconds each phase of a first worker's start took: p50 / max
    for name in ("forked", "storage", "open_study", "lock_wait", "reap", "enqueue"):
        took = []
        for e in first:
            ph = list(e["phases"].items())
            i = [k for k, _ in ph].index(name)
            took.append(ph[i][1] - (ph[i - 1][1] if i else t_start))
        startup[name] = [r1(_pct(took, 0.5), 2), r1(max(took) if took else None, 2)]
    claim_times = sorted(e["t"] - (t_go or t_start) for e in events if e["kind"] == "claim")
    crashes = [e for e in events if e["kind"] == "crash"]
    detect, retry, no_retry, not_failed = [], [], [], []
    for c in crashes:
        t = by_number.get(c["n"])
        if t is None or t["state"] != "FAIL":
            not_failed.append(c["n"])
            continue
        if t["end"]:
            detect.append(t["end"] - c["t"])
        r = retry_of.get(c["n"])
        if r is None or r["start"] is None:
            no_retry.append(c["n"])
        else:
            retry.append(r["start"] - c["t"])
    false_reaps = [e["n"] for e in events if e["kind"] == "reaped_alive"]
    enqueued = sum(e["added"] for e in events if e["kind"] == "enqueued")
    if enqueued > len(expected):
        errors.append(f"the grid of {len(expected)} trials was enqueued {enqueued} times "
                      f"(by {sum(e['kind'] == 'enqueued' for e in events)} workers)")
    holds = sorted((e["start"], e["end"], e["pid"]) for e in events if e["kind"] == "held")
    overlaps, latest = [], None  # (hold, a later-starting hold that began before it ended)
    for h in holds:
        if latest is not None and h[0] < latest[1]:
            overlaps.append((latest, h))
        if latest is None or h[1] > latest[1]:
            latest = h
    if overlaps:
        held = lambda h: f"pid {h[2]} {h[0] - t_start:.1f}-{h[1] - t_start:.1f} s"  # noqa: E731
        errors.append(f"the study lock was held by two workers at once {len(overlaps)} times, e.g. "
                      + "; ".join(f"{held(a)} and {held(b)}" for a, b in overlaps[:3]))
    notes = [e["text"] for e in events if e["kind"] in ("warning", "log")]
    if not_failed:
        errors.append(f"crashed trials not FAIL at the end: {not_failed[:20]}")
    if strays:
        errors.append(f"{strays} COMPLETE trials outside the grid")
    return {
        **asdict(cfg), "trials": len(expected), "proxy_threads": proxy_threads if cfg.mode == "proxy" else None,
        "wall_s": round(wall, 1), "span_s": round(span, 1),
        "ready_p50_s": r1(_pct(ready, 0.5)), "ready_max_s": r1(max(ready) if ready else None),
        "go_s": r1(t_go - t_start if t_go else None),
        "startup_phases_p50_max_s": startup,
        "first_claim_s": r1(claim_times[0] if claim_times else None),
        "last_claim_s": r1(claim_times[-1] if claim_times else None),
        "trials_per_s": round(len(done) / span, 1) if span else None,
        "claims": len(claims), "claim_p50_ms": r1(_pct(claims, 0.5)), "claim_p99_ms": r1(_pct(claims, 0.99)),
        "claim_max_ms": r1(max(claims) if claims else None),
        "conns_mean": r1(statistics.fmean(running) if running else None),
        "conns_max": max(running) if running else None,
        "conns_max_startup": max((n for t, n in conns if t_go is None or t < t_go), default=None),
        "conn_samples": len(running),
        "lost": len(lost), "duplicated": len(dup), "lost_keys": lost[:20], "duplicated_keys": dup[:20],
        "states": states, "crashes": len(crashes), "crashes_without_retry": no_retry,
        "detect_p50_s": r1(_pct(detect, 0.5)), "detect_max_s": r1(max(detect) if detect else None),
        "retry_p50_s": r1(_pct(retry, 0.5)), "retry_max_s": r1(max(retry) if retry else None),
        "false_reaps": false_reaps, "enqueued": enqueued, "lock_overlaps": len(overlaps),
        "exit_codes": exits, "warnings": len(notes), "warning_samples": notes[:10],
        "errors": errors, "timed_out": timed_out,
        "ok": not lost and not dup and not errors,
    }


HEADER = (f"{'mode':<6} {'N':>4} {'trials':>6} {'wall s':>7} {'start s':>7} {'trials/s':>8} "
          f"{'claim p50/p99 ms':>17} {'conns mean/max':>15} {'lost':>4} {'dup':>4} {'crashes':>7} "
          f"{'detect p50/max s':>16} {'retry p50/max s':>16} {'false reaps':>11} {'errors':>6}")


def _row(r: dict) -> str:
    f = lambda a, b: f"{a}/{b}"  # noqa: E731
    return (f"{r['mode']:<6} {r['workers']:>4} {r['trials']:>6} {r['wall_s']:>7} {str(r['go_s']):>7} "
            f"{str(r['trials_per_s']):>8} "
            f"{f(r['claim_p50_ms'], r['claim_p99_ms']):>17} {f(r['conns_mean'], r['conns_max']):>15} "
            f"{r['lost']:>4} {r['duplicated']:>4} {r['crashes']:>7} {f(r['detect_p50_s'], r['detect_max_s']):>16} "
            f"{f(r['retry_p50_s'], r['retry_max_s']):>16} {len(r['false_reaps']):>11} {len(r['errors']):>6}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="direct,proxy", help="comma-separated: direct, proxy")
    parser.add_argument("--workers", default="8,32,128", help="comma-separated worker counts (one run each)")
    parser.add_argument("--trials", type=int, default=1000, help="grid trials (points x replicates; default 1000)")
    parser.add_argument("--replicates", type=int, default=4, help="replicates per grid point (default 4)")
    parser.add_argument("--trial-seconds", type=float, default=0.5, help="work per trial (0: none; default 0.5)")
    parser.add_argument("--crash-rate", type=float, default=0.02, help="chance a trial kills its worker (0.02)")
    parser.add_argument("--heartbeat", type=int, default=1, help="heartbeat interval, s (default 1)")
    parser.add_argument("--grace", type=int, default=3, help="stale after, s (default 3)")
    parser.add_argument("--poll", type=float, default=1.0, help="an idle worker's poll interval, s (default 1)")
    parser.add_argument("--proxy-threads", type=int, default=32, help="storage-proxy --threads (default 32)")
    parser.add_argument("--timeout", type=float, default=600, help="a run's time limit, s (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the crashes")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--workdir", help="keep each run's events, stacks and proxy log here (default: a temporary "
                                          "folder, deleted)")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if set(modes) - {"direct", "proxy"}:
        parser.error(f"--modes: {args.modes!r} (allowed: direct, proxy)")
    counts = [int(n) for n in args.workers.split(",")]
    points = max(1, args.trials // args.replicates)

    from tests.servers import postgres_cluster

    rows = []
    with ExitStack() as stack:
        if args.workdir:
            tmp = args.workdir
            Path(tmp).mkdir(parents=True, exist_ok=True)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="masklab-sim-"))
        cluster = stack.enter_context(postgres_cluster())
        print(HEADER, flush=True)
        for workers in counts:
            for mode in modes:
                cfg = Config(mode, workers, points, args.replicates, args.trial_seconds, args.crash_rate,
                             args.heartbeat, args.grace, args.poll, args.seed)
                row = simulate(cluster, cfg, args.proxy_threads, args.timeout, Path(tmp))
                rows.append(row)
                print(_row(row), flush=True)
                if row["states"] != {"COMPLETE": row["trials"]}:
                    print(f"    states {row['states']}", flush=True)
                for label, field in (("lost", "lost_keys"), ("duplicated", "duplicated_keys")):
                    if row[field]:
                        print(f"    {label} ({row[label[:4] if label == 'lost' else label]}), e.g.: "
                              f"{row[field][:5]}", flush=True)
                if row["crashes_without_retry"]:
                    print(f"    crashes without a started retry: {row['crashes_without_retry']}", flush=True)
                if row["warnings"]:
                    print(f"    {row['warnings']} warnings, e.g. {row['warning_samples'][:3]}", flush=True)
                for e in row["errors"][:5]:
                    print("    error: " + e.replace("\n", "\n    "), flush=True)
                if args.json:  # after every run: a later one may take long, or fail
                    Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
