"""Faults that lose nothing: a tracking server that goes away for 30 s or for good, an
output dir that cannot be written at a checkpoint, and workers claiming through the gRPC
storage proxy. (A PostgreSQL restart under three workers is in tests/test_scaleout.py.)
Servers run on 127.0.0.1 and are stopped by the test that started them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from studies.train import Tracking, train_run

from .servers import create_database, free_port, mlflow_server, postgres_cluster
from .test_scaleout import _env, _load, _masklab, _spec_file, out_ws  # noqa: F401 - out_ws is a fixture

REPO = Path(__file__).resolve().parents[1]


class _Steps(Callback):
    """Counts steps for the test thread; sleeps ``pace`` seconds per step while ``slow``
    is set (training goes on through an outage without running far ahead of it)."""

    def __init__(self, pace: float = 0.0):
        self.step, self.pace = 0, pace
        self.slow = threading.Event()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step = trainer.global_step
        if self.slow.is_set():
            time.sleep(self.pace)


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _history(url: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(url).get_metric_history(run_id, key))


def _in_thread(fn):
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_tracking_server_away_for_30_s_mid_trial_loses_no_point(tmp_path, tiny_config, workspace):
    """The MLflow server is stopped for 30 s while a run trains, then started again on the
    same port: training goes on through the outage, every metric point logged meanwhile
    arrives (one train/loss point per step), no checkpoint is published while its points
    wait, and the run ends FINISHED."""
    handle: list = []
    with mlflow_server(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts", handle=handle) as url:
        server = handle[0]
        steps = 150
        cfg = tiny_config("gpt", {"trainer.max_steps": steps, "trainer.log_every": 1, "trainer.val_every": 25})
        counter = _Steps(pace=0.3)  # 30 s of outage = ~100 of the 150 steps
        run_ids: list[str] = []
        thread, box = _in_thread(lambda: train_run(cfg, workspace, Tracking(url, "outage"), callbacks=[counter],
                                                   on_run=run_ids.append))
        _wait(lambda: run_ids or "error" in box, 120, "the run")
        ckpt = workspace.checkpoint_dir / run_ids[0] / "last.ckpt"
        _wait(lambda: counter.step >= 27 and ckpt.exists() or "error" in box, 120, "the first checkpoint")
        assert "error" not in box, box.get("error")
        published: list[tuple[float, int]] = []
        watching = threading.Event()

        def watch() -> None:  # when last.ckpt is replaced (a publication), and at which step
            inode = ckpt.stat().st_ino
            while not watching.is_set():
                now = ckpt.stat().st_ino
                if now != inode:
                    published.append((time.monotonic(), counter.step))
                    inode = now
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        counter.slow.set()
        server.stop()
        down_at, step_down = time.monotonic(), counter.step
        assert not _reachable(url)
        time.sleep(30)
        step_up = counter.step
        server.start()
        up_at = time.monotonic()
        counter.slow.clear()
        thread.join(timeout=300)
        watching.set()
        assert "error" not in box, box.get("error")
        result = box["result"]
        # Every step's point arrived, those logged during the outage included, once each.
        logged = _history(url, result.run_id, "train/loss")
        from mlflow.tracking import MlflowClient

        status = MlflowClient(url).get_run(result.run_id).info.status

    # Training went on while the server was away (at least 60 steps of ~120 paced ones).
    assert step_up - step_down >= 60, (step_down, step_up)
    assert logged == sorted(set(logged)) and len(logged) == steps, logged
    assert logged[0] <= step_down and logged[-1] >= step_up - 1
    assert status == "FINISHED"
    # No publication while the points before it waited (the checkpoints of steps 50-125
    # were written during the outage and published once the server was back).
    assert not [t for t, _ in published if down_at + 1.0 < t < up_at], (published, down_at, up_at)
    assert [t for t, _ in published if t >= up_at], published
    assert not (workspace.output_dir / "spool" / f"{result.run_id}.jsonl").exists()


def test_tracking_server_that_never_returns_ends_the_trial_and_spools_for_sync(
        tmp_path, tiny_config, workspace, monkeypatch, capsys):
    """With the server gone for good, the run ends within the outage limit (+ a step) with
    a one-line reason naming the server, the spool file and `masklab sync`; the unsent
    points and the run's failure are in the spool, and `masklab sync` sends them once the
    server is back: the run's history is whole and its status FAILED, the spool gone."""
    from mlflow.tracking import MlflowClient

    from studies.cli import main
    from studies.spool import TrackingOutage

    monkeypatch.setenv("MASKLAB_MAX_OUTAGE", "3")
    handle: list = []
    with mlflow_server(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "artifacts", handle=handle) as url:
        server = handle[0]
        cfg = tiny_config("gpt", {"trainer.max_steps": 400, "trainer.log_every": 1, "trainer.val_every": 10})
        counter = _Steps(pace=0.05)
        counter.slow.set()
        thread, box = _in_thread(lambda: train_run(cfg, workspace, Tracking(url, "gone"), callbacks=[counter]))
        _wait(lambda: counter.step >= 12 or "error" in box, 120, "training")
        server.stop()
        down_at = time.monotonic()
        thread.join(timeout=120)
        ended = time.monotonic() - down_at
        error = box.get("error")
        assert isinstance(error, TrackingOutage), box
        message = str(error)
        assert "\n" not in message and url in message and "unreachable" in message, message
        spool_files = list((workspace.output_dir / "spool").glob("*.jsonl"))
        run_id = next(p.stem for p in spool_files if p.stem in message)
        assert f"spooled to {workspace.output_dir / 'spool' / run_id}.jsonl" in message
        assert "masklab sync" in message
        assert ended < 3 + 15, ended  # bounded: the limit, then the next logging step
        last_step = counter.step

        server.start()
        before = _history(url, run_id, "train/loss")
        assert len(before) < last_step  # points are missing until sync
        assert main(["sync", "--output-dir", str(workspace.output_dir)]) == 0
        out = capsys.readouterr().out
        assert "metric point(s) sent" in out and "0 file(s) left" in out, out
        after = _history(url, run_id, "train/loss")
        assert after == sorted(set(after)) and after[0] == 0 and after == list(range(after[-1] + 1)), after
        assert after[-1] >= last_step - 1
        run = MlflowClient(url).get_run(run_id)
        assert run.info.status == "FAILED"
        assert "unreachable" in run.data.tags["masklab.failure"]
        assert not (workspace.output_dir / "spool" / f"{run_id}.jsonl").exists()
        # Sending again sends nothing twice.
        assert main(["sync", "--output-dir", str(workspace.output_dir)]) == 0
        assert _history(url, run_id, "train/loss") == after


def _immutable(path: Path, on: bool) -> None:
    """Make a directory unwritable, even for root (chattr +i), or writable again."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("chattr is not available to make a directory unwritable for root")
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True, capture_output=True)
    else:
        path.chmod(0o555 if on else 0o755)


class _LockDirAfterFirstCheckpoint(Callback):
    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir, self.locked = ckpt_dir, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 12 and not self.locked:
            _wait(lambda: any(self.ckpt_dir.glob("*/last.ckpt")), 30, "the first checkpoint")
            self.dir = next(self.ckpt_dir.glob("*/last.ckpt")).parent
            _immutable(self.dir, True)
            self.locked = True


def test_unwritable_output_dir_at_a_checkpoint_fails_in_one_line_and_keeps_the_last(
        tmp_path, tiny_config, out_ws):  # noqa: F811
    """The checkpoint dir becomes unwritable after the first checkpoint (step 10): the next
    checkpoint (step 20) fails the run with one line naming the path, the checkpoint of
    step 10 is intact (loads, step 10), and the MLflow run is FAILED with that reason."""
    from mlflow.tracking import MlflowClient

    from lit_modules.checkpoints import load_checkpoint
    from lit_modules.run import CheckpointWriteError

    ws = out_ws
    cfg = tiny_config("gpt", {"trainer.max_steps": 30, "trainer.val_every": 10})
    lock = _LockDirAfterFirstCheckpoint(ws.checkpoint_dir)
    tracking = Tracking(f"sqlite:///{tmp_path}/mlflow.db", "unwritable")
    try:
        with pytest.raises(CheckpointWriteError) as info:
            train_run(cfg, ws, tracking, callbacks=[lock])
    finally:
        if lock.locked:
            _immutable(lock.dir, False)
    message = str(info.value)
    assert lock.locked and "\n" not in message, message
    assert str(lock.dir) in message and "step 20" in message and "is kept" in message, message
    kept = load_checkpoint(lock.dir / "last.ckpt", "checkpoint")
    assert kept["global_step"] == 10
    assert not list(lock.dir.glob(".*.partial"))
    run = MlflowClient(tracking.tracking_uri).get_run(lock.dir.name)
    assert run.info.status == "FAILED" and str(lock.dir) in run.data.tags["masklab.failure"]


def test_three_workers_through_the_grpc_storage_proxy_claim_each_trial_once(tmp_path, out_ws):  # noqa: F811
    """`masklab storage-proxy` in front of PostgreSQL on 127.0.0.1, three workers on
    `--storage grpc://...`: every (point, replicate) COMPLETE exactly once, heartbeats
    recorded through the proxy, and `masklab status` reads the study through it."""
    with postgres_cluster() as pg:
        db = create_database(pg.url, "proxied")
        port = free_port()
        proxy = subprocess.Popen([sys.executable, "-m", "studies.cli", "storage-proxy", "--port", str(port),
                                  "--heartbeat", "1"], cwd=REPO, env={**_env(), "MASKLAB_STORAGE": db},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            line = proxy.stdout.readline()
            assert f"on grpc://127.0.0.1:{port}" in line and "masklab:***" not in line, line
            url = f"grpc://127.0.0.1:{port}"
            spec = _spec_file(tmp_path, "proxied", {"masking.p_bw": [0.0, 0.5]}, replicates=3, max_steps=2)
            tracking = f"sqlite:///{out_ws.output_dir}/mlflow.db"
            procs = [_masklab("worker", str(spec), "--storage", url, "--tracking-uri", tracking, "--no-report",
                              ws=out_ws, log=tmp_path / f"worker-{i}.log") for i in range(3)]
            codes = [p.wait(timeout=600) for p in procs]
            logs = "\n".join((tmp_path / f"worker-{i}.log").read_text() for i in range(3))
            assert codes == [0, 0, 0], logs
            status = subprocess.run([sys.executable, "-m", "studies.cli", "status", str(spec), "--storage", url,
                                     "--output-dir", str(out_ws.output_dir)], cwd=REPO, env=_env(),
                                    capture_output=True, text=True, timeout=120)
            assert status.returncode == 0 and status.stdout.count("COMPLETE") >= 6, status.stdout + status.stderr
        finally:
            os.killpg(proxy.pid, signal.SIGINT)
            proxy.wait(timeout=30)
        trials = _load("proxied", db).get_trials()
        assert [t.state.name for t in trials] == ["COMPLETE"] * 6, logs
        keys = sorted((t.user_attrs["masklab.grid_key"], t.user_attrs["masklab.replicate"]) for t in trials)
        assert len(set(keys)) == 6
        ran = [int(ln.split("ran ")[1].split(" ")[0]) for ln in logs.splitlines() if "this worker ran" in ln]
        assert sum(ran) == 6, logs
        import psycopg

        with psycopg.connect(db) as conn:  # heartbeats went through the proxy to the database
            beats = conn.execute("SELECT count(*) FROM trial_heartbeats").fetchone()[0]
        assert beats == 6
