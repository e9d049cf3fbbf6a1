"""Scale-out: crash-safe trials (checkpoint resume), many workers on one study, the
launcher and the SLURM script. Tests that need PostgreSQL or an MLflow server start
them on 127.0.0.1 (tests/servers.py) and stop them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from studies.train import Resume, Tracking, train_run


class _DieAt(Callback):
    """Stands in for a worker killed mid-trial: raises at a given global step."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"worker lost at step {self.step}")


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny_config, workspace):
    """A run cut off after its step-4 checkpoint and resumed from it ends with the same
    weights and validation loss as the run that was never interrupted, and its MLflow run
    links to the attempt and carries the attempt's curves up to the checkpoint."""
    from mlflow.tracking import MlflowClient

    cfg = tiny_config("gpt", {"trainer.max_steps": 8, "trainer.val_every": 2, "masking.p_bw": 0.5})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    straight = train_run(cfg, workspace, Tracking(uri, "resume"))

    with pytest.raises(RuntimeError, match="worker lost at step 5"):
        train_run(cfg, workspace, Tracking(uri, "resume"), callbacks=[_DieAt(5)])
    client = MlflowClient(uri)
    failed = [r for r in client.search_runs(client.get_experiment_by_name("resume").experiment_id)
              if r.info.status == "FAILED"]
    assert len(failed) == 1
    attempt = failed[0].info.run_id
    ckpt = workspace.checkpoint_dir / attempt / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 4

    resumed = train_run(cfg, workspace, Tracking(uri, "resume"), resume=Resume(attempt, ckpt))
    assert resumed.metrics["val/fw_loss"] == pytest.approx(straight.metrics["val/fw_loss"], abs=1e-6)
    assert resumed.metrics["val/bw_loss"] == pytest.approx(straight.metrics["val/bw_loss"], abs=1e-6)
    a, b = _weights(straight.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)

    run = client.get_run(resumed.run_id)
    assert run.data.tags["masklab.retry_of_run"] == attempt
    assert run.data.tags["masklab.resumed_at_step"] == "4"
    for key in ("val/fw_loss", "train/fw_loss"):
        # Points up to the checkpoint are copied from the attempt, the rest trained here:
        # together the same series as the uninterrupted run's.
        want = sorted((m.step, round(m.value, 5)) for m in client.get_metric_history(straight.run_id, key))
        got = sorted((m.step, round(m.value, 5)) for m in client.get_metric_history(resumed.run_id, key))
        assert got == want, key


# ---------------------------------------------------------------- shared helpers

import copy  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import optuna  # noqa: E402
import yaml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from lit_modules.paths import Workspace  # noqa: E402

from .conftest import REPO, TINY  # noqa: E402
from .servers import create_database, gated, mlflow_server, postgres_cluster  # noqa: E402


def _spec_file(tmp_path: Path, name: str, grid: dict, replicates: int = 1, **trainer) -> Path:
    fixed = copy.deepcopy(TINY["gpt"])
    fixed["trainer"].update({"max_steps": 4, "val_every": 2, **trainer})
    spec = {"name": name, "model": "gpt", "data": "wikitext-2", "fixed": fixed, "grid": grid,
            "replicates": replicates, "objective": {"metric": "val/fw_loss", "direction": "minimize"},
            "ablation": {"drop_one": False}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def out_ws(tmp_path, data_dir, session_cache) -> Workspace:
    """An output dir sharing the session's tokenizer cache (trained once per session)."""
    ws = Workspace.resolve(tmp_path / "out", data_dir)
    ws.output_dir.mkdir(parents=True)
    (session_cache / "cache").mkdir(exist_ok=True)
    (ws.output_dir / "cache").symlink_to(session_cache / "cache", target_is_directory=True)
    return ws


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONUNBUFFERED": "1"}


def _masklab(*args: str, ws: Workspace, log: Path | None = None, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "studies.cli", *args, "--output-dir", str(ws.output_dir),
           "--data-dir", str(ws.data_dir)]
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True, **popen)


def _load(name: str, storage: str) -> optuna.Study:
    from studies.coordination import make_storage

    return optuna.load_study(study_name=name, storage=make_storage(storage))


def _grid_keys(trials) -> list[tuple[str, int]]:
    return sorted((t.user_attrs["masklab.grid_key"], t.user_attrs["masklab.replicate"]) for t in trials)


# ---------------------------------------------------------------- real servers


@pytest.fixture(scope="module")
def pg_cluster():
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def postgres(pg_cluster) -> str:
    return pg_cluster.url


@pytest.fixture(scope="module")
def mlflow_db(postgres) -> str:
    """The MLflow server's backend store: a PostgreSQL database, as in the cluster recipe."""
    return create_database(postgres, "mlflow")


@pytest.fixture(scope="module")
def mlflow_http(tmp_path_factory, mlflow_db):
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(mlflow_db, root / "artifacts") as url:
        yield url


def test_three_workers_on_postgres_run_every_grid_trial_exactly_once_through_a_database_restart(
        tmp_path, out_ws, pg_cluster, postgres, mlflow_http, mlflow_db):
    """Three workers started at the same moment on one grid study (PostgreSQL + an MLflow
    server on PostgreSQL), and PostgreSQL restarted (down 3 s: every connection of the
    workers and of the MLflow server drops) while they run trials: the workers wait for it
    and reconnect, and every (point, replicate) is COMPLETE exactly once, with exactly one
    child run each, and one parent run; at least two workers ran trials, at the same time."""
    from mlflow.tracking import MlflowClient

    storage = create_database(postgres, "three_workers")
    spec = _spec_file(tmp_path, "three_workers", {"masking.p_bw": [0.0, 0.25, 0.5]}, replicates=2)
    # Heartbeats every second: a running trial talks to the database during the outage.
    procs = [_masklab("worker", str(spec), "--storage", storage, "--tracking-uri", mlflow_http,
                      "--heartbeat", "1", "--grace", "60", ws=out_ws, log=tmp_path / f"worker-{i}.log")
             for i in range(3)]
    running = _wait_for_trial(storage, "three_workers", procs[0], tmp_path / "worker-0.log")
    pg_cluster.restart(down_seconds=3)
    codes = [p.wait(timeout=600) for p in procs]
    logs = "\n".join((tmp_path / f"worker-{i}.log").read_text() for i in range(3))
    assert codes == [0, 0, 0], logs
    assert running is not None
    assert "unreachable" in logs and "is back after" in logs, logs  # the restart reached the workers

    trials = _load("three_workers", storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6, logs
    assert len(set(_grid_keys(trials))) == 6
    assert sorted((t.params["masking.p_bw"], t.params["seed"]) for t in trials) == \
        [(p, s) for p in (0.0, 0.25, 0.5) for s in (0, 1)]
    ran = [int(line.split("ran ")[1].split(" ")[0]) for line in logs.splitlines() if "this worker ran" in line]
    assert sum(ran) == 6
    assert logs.count("report: ") == 1  # one worker writes it, not all three

    # The work was shared and concurrent: two workers' trials ran at the same time.
    by_pid: dict[int, list] = {}
    for t in trials:
        by_pid.setdefault(t.user_attrs["masklab.pid"], []).append(t)
    assert len(by_pid) >= 2 and sum(n > 0 for n in ran) >= 2, logs
    assert {p.pid for p in procs} >= set(by_pid)
    overlaps = [(a.number, b.number) for a in trials for b in trials
                if a.user_attrs["masklab.pid"] < b.user_attrs["masklab.pid"]
                and a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete]
    spans = sorted((t.user_attrs["masklab.pid"], str(t.datetime_start), str(t.datetime_complete)) for t in trials)
    assert overlaps, f"no two workers' trials overlapped: {spans}"

    client = MlflowClient(mlflow_http)
    exp = client.get_experiment_by_name("three_workers")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("masklab.role") == "study"]
    children = [r for r in runs if r.data.tags.get("masklab.role") == "trial"]
    assert len(parents) == 1
    assert sorted(int(r.data.tags["masklab.trial"]) for r in children) == sorted(t.number for t in trials)
    assert {r.info.run_id for r in children} == {t.user_attrs["masklab.mlflow_run_id"] for t in trials}
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    import psycopg

    with psycopg.connect(mlflow_db) as conn:  # the server keeps its runs in PostgreSQL
        stored = {row[0] for row in conn.execute("SELECT run_uuid FROM runs WHERE experiment_id = %s",
                                                 (int(exp.experiment_id),))}
    assert stored == {r.info.run_id for r in runs}


def test_killed_worker_trial_is_retried_from_its_checkpoint(tmp_path, out_ws, postgres, mlflow_http):
    """SIGKILL a worker mid-trial, after the trial's first checkpoint: a second worker
    retries the trial, resuming from that checkpoint in a run linked to the dead one;
    the trial that had finished is untouched and the final counts are exact."""
    from mlflow.tracking import MlflowClient

    storage = create_database(postgres, "killed_worker")
    spec = _spec_file(tmp_path, "killed_worker", {"trainer.max_steps": [50, 250]}, val_every=25)
    first = _masklab("worker", str(spec), "--storage", storage, "--tracking-uri", mlflow_http, "--no-report",
                     ws=out_ws, log=tmp_path / "first.log")
    try:
        victim = _wait_for_checkpoint(storage, "killed_worker", first, tmp_path / "first.log", max_steps=250)
        finished = {t.number: (t.state, t.value, t.datetime_complete, t.user_attrs)
                    for t in _load("killed_worker", storage).get_trials() if t.state.is_finished()}
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
    assert len(finished) == 1 and next(iter(finished.values()))[0] == TrialState.COMPLETE

    second = _masklab("worker", str(spec), "--storage", storage, "--tracking-uri", mlflow_http, "--no-report",
                      ws=out_ws, log=tmp_path / "second.log")
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()

    trials = _load("killed_worker", storage).get_trials()
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    assert len(trials) == 3 and len(by_state[TrialState.COMPLETE]) == 2 and len(by_state[TrialState.FAIL]) == 1
    dead = by_state[TrialState.FAIL][0]
    assert dead.number == victim.number and "died" in dead.user_attrs["masklab.failure"]
    assert sorted(t.params["trainer.max_steps"] for t in by_state[TrialState.COMPLETE]) == [50, 250]
    for number, before in finished.items():  # untouched
        t = trials[number]
        assert (t.state, t.value, t.datetime_complete, t.user_attrs) == before
    retry = next(t for t in by_state[TrialState.COMPLETE] if t.number not in finished)
    assert retry.user_attrs["masklab.retry_of_trial"] == victim.number
    assert retry.user_attrs["masklab.retry_of_run"] == victim.user_attrs["masklab.mlflow_run_id"]
    assert "masklab.failure" not in retry.user_attrs  # the attempt's failure is not inherited
    assert set(dead.intermediate_values) <= set(retry.intermediate_values)
    from studies.status import study_status

    assert f"retry of trial {victim.number}" in study_status("killed_worker", storage)

    client = MlflowClient(mlflow_http)
    dead_run = client.get_run(dead.user_attrs["masklab.mlflow_run_id"])
    assert dead_run.info.status == "FAILED"
    run = client.get_run(retry.user_attrs["masklab.mlflow_run_id"])
    resumed_at = int(run.data.tags["masklab.resumed_at_step"])
    assert resumed_at >= 25 and resumed_at % 25 == 0
    assert run.data.tags["masklab.retry_of_run"] == dead_run.info.run_id
    assert run.data.tags["masklab.retry_of_trial"] == str(victim.number)
    val_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/fw_loss"))
    assert val_steps == [25 * k - 1 for k in range(1, 11)]  # the whole curve: copied, then trained
    exp = client.get_experiment_by_name("killed_worker")
    children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("masklab.role") == "trial"]
    assert len(children) == 3  # one per trial: the finished one, the dead attempt, its retry


def test_live_worker_heartbeat_keeps_a_long_trial_alive(tmp_path, out_ws, postgres, mlflow_http):
    """A worker whose trial runs far longer than the grace period (here: held up by a
    tracking server that does not answer) keeps it alive with its heartbeat: reaped every
    quarter second all the while, as another worker would, the trial stays RUNNING, and it
    ends COMPLETE once the server answers again."""
    import psycopg

    from studies.coordination import make_storage, study_lock
    from studies.runner import reap_dead_trials

    heartbeat, grace = 1, 3
    storage = create_database(postgres, "heartbeat")
    spec = _spec_file(tmp_path, "heartbeat", {"masking.p_bw": [0.5]})
    log = tmp_path / "worker.log"
    with gated(mlflow_http) as gate:
        worker = _masklab("worker", str(spec), "--storage", storage, "--tracking-uri", gate.url, "--no-report",
                          "--heartbeat", str(heartbeat), "--grace", str(grace), ws=out_ws, log=log)
        try:
            trial = _wait_for_trial(storage, "heartbeat", worker, log)
            gate.close()  # the trial cannot finish until the test opens the gate
            reaper = optuna.load_study(study_name="heartbeat",
                                       storage=make_storage(storage, heartbeat=heartbeat, grace=grace))
            beats, reaped_at, held_since = set(), [], None
            while held_since is None or time.monotonic() - held_since < 3 * grace:
                assert worker.poll() is None, log.read_text()
                with study_lock(reaper._storage, "heartbeat"):
                    assert reap_dead_trials(reaper) == [], log.read_text()
                reaped_at.append(time.monotonic())
                assert reaper.trials[trial.number].state == TrialState.RUNNING
                with psycopg.connect(storage) as conn:
                    beat, age = conn.execute("SELECT heartbeat, EXTRACT(EPOCH FROM now() - heartbeat) "
                                             "FROM trial_heartbeats WHERE trial_id = %s",
                                             (trial._trial_id,)).fetchone()
                assert float(age) < grace
                beats.add(beat)
                if held_since is None and gate.waiting:
                    held_since = time.monotonic()  # the worker is stuck on the server from here
                time.sleep(0.25)
            gate.open()
            assert worker.wait(timeout=300) == 0, log.read_text()
        finally:
            worker.kill()
    # Reaped all along (a trial stale for its grace period would have been caught), and
    # the heartbeat moved on all along.
    assert max(b - a for a, b in zip(reaped_at, reaped_at[1:])) < grace
    assert reaped_at[-1] - held_since > 3 * grace - 1 and len(beats) >= 1.5 * grace / heartbeat
    [done] = _load("heartbeat", storage).get_trials()
    assert done.number == trial.number and done.state == TrialState.COMPLETE
    assert "masklab.failure" not in done.user_attrs and "masklab.retry_of_trial" not in done.user_attrs
    assert (done.datetime_complete - done.datetime_start).total_seconds() > 3 * grace


def _wait_for_trial(storage: str, name: str, proc: subprocess.Popen, log: Path, timeout: float = 300):
    """The study's first RUNNING trial."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"worker exited early:\n{log.read_text()}")
        try:
            running = _load(name, storage).get_trials(states=(TrialState.RUNNING,))
        except KeyError:
            running = []
        if running:
            return running[0]
        time.sleep(0.05)
    pytest.fail(f"no trial started within {timeout} s:\n{log.read_text()}")


def _wait_for_checkpoint(storage: str, name: str, proc: subprocess.Popen, log: Path, max_steps: int,
                         timeout: float = 300):
    """The RUNNING trial of ``max_steps`` steps, once its first checkpoint is on disk."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"worker exited early:\n{log.read_text()}")
        try:
            for t in _load(name, storage).get_trials(states=(TrialState.RUNNING,)):
                ckpt = t.user_attrs.get("masklab.checkpoint")
                if t.params.get("trainer.max_steps") == max_steps and ckpt and Path(ckpt).is_file():
                    return t
        except KeyError:
            pass
        time.sleep(0.1)
    pytest.fail(f"no checkpoint within {timeout} s:\n{log.read_text()}")


# ---------------------------------------------------------------- local workers, default storage


def test_launch_two_workers_on_the_default_sqlite_store(tmp_path, out_ws):
    """``masklab launch --workers 2`` on the default single-file stores (sqlite in WAL
    mode): no 'database is locked', every trial COMPLETE once, logs per worker."""
    spec = _spec_file(tmp_path, "two_local", {"masking.p_bw": [0.0, 0.5]}, replicates=2)
    proc = _masklab("launch", str(spec), "--workers", "2", "--cpu", ws=out_ws)
    out, _ = proc.communicate(timeout=600)
    logs = out + "".join(p.read_text() for p in (out_ws.output_dir / "logs" / "two_local").glob("worker-*.log"))
    assert proc.returncode == 0, logs
    assert "locked" not in logs.lower()
    assert len(list((out_ws.output_dir / "logs" / "two_local").glob("worker-*.log"))) == 2
    assert "2/2 workers running" in out and "4 complete" in out
    trials = _load("two_local", f"sqlite:///{out_ws.output_dir / 'optuna.db'}").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len(set(_grid_keys(trials))) == 4
    assert (out_ws.output_dir / "reports" / "two_local" / "report.html").is_file()


# ---------------------------------------------------------------- retries without servers


def test_stale_trial_is_failed_and_retried_with_its_checkpoint(tmp_path):
    """A RUNNING trial whose heartbeat stopped (a worker on another machine) is FAILed
    and re-enqueued with the links a retry needs; a COMPLETE trial is never touched;
    retries stop after MAX_RETRIES."""
    from studies.coordination import MAX_RETRIES, make_storage
    from studies.runner import reap_dead_trials

    storage = make_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat=1, grace=1)
    study = optuna.create_study(study_name="stale", storage=storage)
    done = study.ask()
    study.tell(done, 1.0)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"checkpoint")
    study.enqueue_trial({"x": 0.5}, user_attrs={"masklab.grid_key": "x=0.5", "masklab.replicate": 0})
    numbers = []
    for attempt in range(MAX_RETRIES + 1):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        numbers.append(trial.number)
        for key, value in {"masklab.host": "elsewhere", "masklab.pid": 1, "masklab.checkpoint": str(ckpt),
                           "masklab.mlflow_run_id": f"run{attempt}"}.items():
            trial.set_user_attr(key, value)
        trial.report(0.9 - attempt / 10, step=attempt)
        storage.record_heartbeat(trial._trial_id)
        time.sleep(2.5)  # > grace, also at the store clock's one-second resolution
        assert reap_dead_trials(study) == [trial.number]
        t = study.trials[trial.number]
        assert t.state == TrialState.FAIL and "heartbeat" in t.user_attrs["masklab.failure"]
        waiting = study.get_trials(states=(TrialState.WAITING,))
        if attempt == MAX_RETRIES:
            assert waiting == []  # retried often enough
            break
        [retry] = waiting
        assert retry.params == {"x": 0.5}
        a = retry.user_attrs
        assert a["masklab.retry_of_trial"] == numbers[0] and a["masklab.retry_of_run"] == f"run{attempt}"
        assert a["masklab.resume_checkpoint"] == str(ckpt) and a["masklab.grid_key"] == "x=0.5"
        assert not {"masklab.host", "masklab.pid", "masklab.failure", "masklab.mlflow_run_id"} & set(a)
        assert retry.intermediate_values == t.intermediate_values
    assert study.trials[done.number].state == TrialState.COMPLETE


def test_study_lock_excludes_and_stale_locks_are_broken(tmp_path):
    import threading

    from stores.storage import LOCK_SUFFIX
    from studies import coordination
    from studies.coordination import make_storage, study_lock

    storage = make_storage(f"sqlite:///{tmp_path / 'o.db'}")
    inside, order = threading.Event(), []

    def holder():
        with study_lock(storage, "s"):
            inside.set()
            time.sleep(0.5)
            order.append("holder out")

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(10)
    with study_lock(storage, "s"):
        order.append("second in")
    t.join()
    assert order == ["holder out", "second in"]
    assert "s" + LOCK_SUFFIX not in optuna.get_all_study_names(storage)

    # A lock left by a dead worker is broken once it is older than LOCK_STALE_SECONDS.
    from optuna.study import StudyDirection

    dead = storage.create_new_study([StudyDirection.MINIMIZE], "s" + LOCK_SUFFIX)
    storage.set_study_user_attr(dead, "since", time.time() - coordination.LOCK_STALE_SECONDS - 1)
    with study_lock(storage, "s", timeout=10):
        pass


# ---------------------------------------------------------------- SLURM


def test_slurm_script_is_valid_bash_and_runs_the_worker(tmp_path, out_ws):
    script = tmp_path / "study.sbatch"
    proc = _masklab("slurm", "gpt_pbw", "--array", "16", "--gpus-per-task", "1", "--partition", "gpu",
                    "--storage", "postgresql://masklab@db.cluster/masklab",
                    "--tracking-uri", "http://mlflow.cluster:5000", "--setup", "source .venv/bin/activate",
                    "--out", str(script), ws=out_ws)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "#SBATCH --array=0-15" in text and "#SBATCH --gpus-per-task=1" in text
    assert "#SBATCH --partition=gpu" in text
    worker = [line for line in text.splitlines() if line.startswith("exec ")]
    assert len(worker) == 1 and " worker " in worker[0] and "gpt_pbw.yaml" in worker[0]
    # The worker reads the stores from the environment, not its (public) command line.
    assert "--storage" not in worker[0] and "--tracking-uri" not in worker[0]
    assert 'export MASKLAB_STORAGE="${MASKLAB_STORAGE:-postgresql://masklab@db.cluster/masklab}"' in text
    assert text.index("source .venv/bin/activate") < text.index("exec ")

    # A password is never written into the script: it comes from the environment.
    secret = _masklab("slurm", "gpt_pbw", "--array", "4", "--storage", "postgresql://masklab:s3cret@db.cluster/m",
                      "--out", str(tmp_path / "secret.sbatch"), ws=out_ws)
    out, _ = secret.communicate(timeout=120)
    assert secret.returncode == 2 and "--storage = 'postgresql://masklab:***@db.cluster/m'" in out, out
    assert "export MASKLAB_STORAGE instead" in out and "s3cret" not in out
    assert not (tmp_path / "secret.sbatch").exists()

    bad = _masklab("slurm", "gpt_pbw", "--array", "4", "--storage", "sqlite:///optuna.db", "--out",
                   str(tmp_path / "bad.sbatch"), ws=out_ws)
    out, _ = bad.communicate(timeout=120)
    assert bad.returncode == 2 and "--storage" in out and "postgresql" in out
    assert not (tmp_path / "bad.sbatch").exists()


def test_concurrent_claims_respect_the_search_budget_and_the_grid_queue(tmp_path):
    """Threads claiming at once (no training: claim, then tell) take exactly n_trials
    search trials, and exactly the enqueued grid trials, each once."""
    import threading

    from studies.runner import claim_trial, enqueue_grid, open_study
    from studies.spec import load_spec

    fixed = copy.deepcopy(TINY["gpt"])
    common = {"model": "gpt", "data": "wikitext-2", "fixed": fixed, "objective": "val/fw_loss"}
    search = load_spec({**common, "name": "budget", "n_trials": 7, "sampler": "random",
                        "search": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}})
    grid = load_spec({**common, "name": "queue", "grid": {"masking.p_bw": [0.0, 0.1, 0.2]}, "replicates": 3})
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    for spec in (search, grid):
        study = open_study(spec, storage, "unused")
        claimed: list[int] = []

        def work(spec=spec, study=study, claimed=claimed):
            from studies.runner import suggest

            while (trial := claim_trial(study, spec)) is not None:
                suggest(trial, spec)
                claimed.append(trial.number)
                study.tell(trial, 1.0)

        if spec.kind == "grid":
            enqueue_grid(study, spec)
        threads = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        trials = study.get_trials()
        want = 7 if spec.kind == "search" else 9
        assert sorted(claimed) == list(range(want)), spec.name
        assert [t.state for t in trials] == [TrialState.COMPLETE] * want
        if spec.kind == "grid":
            assert len(set(_grid_keys(trials))) == 9


def test_checkpoint_is_published_only_after_its_metrics_are_stored(tmp_path, tiny_config, workspace, mlflow_http):
    """A real run with LastCheckpoint and the buffered logger, against an MLflow server
    that answers only when the test lets it: training runs to its end without waiting on
    the server; each validation's checkpoint stays a partial file until the points logged
    before it are stored, and only then becomes last.ckpt."""
    import threading

    from mlflow.tracking import MlflowClient

    from lit_modules.run import LastCheckpoint, build_datamodule, build_model, build_trainer
    from studies.tracking import BufferedMLflowLogger, get_or_create_experiment
    from studies.train import checkpoint_step

    cfg = tiny_config("gpt", {"trainer.max_steps": 4, "trainer.val_every": 2, "trainer.log_every": 1})
    direct = MlflowClient(mlflow_http)
    run_id = direct.create_run(get_or_create_experiment(direct, "publish_after_stored", None)).info.run_id
    ckpt_dir = tmp_path / "ckpt"
    last = ckpt_dir / "last.ckpt"

    def partials() -> list[int]:
        return sorted(int(p.name.split(".")[-2]) for p in ckpt_dir.glob(".last.ckpt.*.partial"))

    def stored_steps(key: str) -> list[int]:
        return sorted(m.step for m in direct.get_metric_history(run_id, key))

    def published(step: int, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if last.is_file() and checkpoint_step(last) == step:
                return True
            time.sleep(0.02)
        return False

    with gated(mlflow_http) as gate:
        ended, errors = threading.Event(), []

        class HoldTheServer(Callback):
            def on_train_start(self, trainer, pl_module):
                gate.close()  # from the first training step on, the server answers nothing

            def on_train_end(self, trainer, pl_module):
                ended.set()  # the logger's final flush (which does wait) comes after this

        logger = BufferedMLflowLogger(MlflowClient(gate.url), run_id, flush_every=10_000)
        trainer = build_trainer(cfg, logger, [HoldTheServer()], ckpt_dir)
        assert any(isinstance(c, LastCheckpoint) for c in trainer.callbacks)
        model, dm = build_model(cfg), build_datamodule(cfg, workspace)

        def fit():
            try:
                trainer.fit(model, dm)
            except BaseException as e:  # noqa: BLE001 - raised in the test below
                errors.append(e)

        thread = threading.Thread(target=fit)
        thread.start()
        try:
            assert ended.wait(60), "training waited on the tracking server"
            # Both validations' checkpoints are written, neither is published: the server
            # has stored none of the points logged before them.
            assert gate.wait_held(1, 30)
            assert partials() == [2, 4] and not last.exists()
            assert stored_steps("train/fw_loss") == [] and stored_steps("val/fw_loss") == []

            gate.let_through(1)  # the points logged up to the first validation
            assert published(2), "the step-2 checkpoint was not published once its points were stored"
            assert stored_steps("train/fw_loss") == [0, 1] and len(stored_steps("val/fw_loss")) == 1
            assert partials() == [4]
            time.sleep(0.5)
            assert checkpoint_step(last) == 2  # the step-4 one waits for its own points

            gate.let_through(1)  # the points logged up to the second validation
            assert published(4)
            assert stored_steps("train/fw_loss") == [0, 1, 2, 3] and len(stored_steps("val/fw_loss")) == 2
            assert partials() == []
        finally:
            gate.open()
            thread.join(120)
        assert not thread.is_alive() and not errors, errors
        logger.close()
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4


def test_launch_pins_each_worker_to_a_gpu_or_a_share_of_the_cpu():
    from lit_modules.config_errors import ConfigError
    from studies.launch import parse_devices, worker_env

    devices = parse_devices("0, 1,3")
    assert devices == ["0", "1", "3"]
    assert [worker_env(i, 4, devices, 16)["CUDA_VISIBLE_DEVICES"] for i in range(4)] == ["0", "1", "3", "0"]
    assert {worker_env(i, 4, devices, 16)["MASKLAB_CORES"] for i in range(4)} == {"4"}  # each its share of the cores
    cpu = [worker_env(i, 3, None, 16) for i in range(3)]
    assert all(e == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "5", "MKL_NUM_THREADS": "5"} for e in cpu)
    assert worker_env(0, 4, None, 2)["OMP_NUM_THREADS"] == "1"
    for bad in ("", "0,gpu1", "-1"):
        with pytest.raises(ConfigError, match="--devices"):
            parse_devices(bad)


def test_postgres_study_lock_is_released_when_its_holder_dies(postgres):
    """On PostgreSQL the study lock is an advisory lock: a worker killed while holding it
    does not block the others (the server drops it with the connection)."""
    from studies.coordination import make_storage, study_lock

    url = create_database(postgres, "lock_holder")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from studies.coordination import make_storage, study_lock\n"
         f"with study_lock(make_storage({url!r}), 's'):\n"
         "    print('held', flush=True)\n"
         "    time.sleep(600)\n"],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        storage = make_storage(url)
        with pytest.raises(Exception, match="lock timeout"):
            with study_lock(storage, "s", timeout=1):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with study_lock(storage, "s", timeout=30):  # the dead holder's lock is gone
            pass
    finally:
        holder.kill()
