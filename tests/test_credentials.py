"""Credentials stay private: a store URL with a password comes from the environment and
never lands in a param, tag, artifact, report, dashboard or log line; the servers masklab
starts (``dashboard --serve``, ``storage-proxy``) bind to 127.0.0.1 unless told otherwise,
and warn when told otherwise."""

from __future__ import annotations

import copy
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from uuid import uuid4

import pytest
import yaml

from lit_modules.config_errors import ConfigError
from lit_modules.paths import Workspace
from stores.urls import has_secret, redact

from .conftest import REPO, TINY
from .servers import create_database, free_port, postgres_bin, postgres_cluster

SECRET = f"pw-{uuid4().hex}"


# ---------------------------------------------------------------- redact / has_secret


@pytest.mark.parametrize("url, shown", [
    ("postgresql://masklab:s3cret@db.cluster/optuna", "postgresql://masklab:***@db.cluster/optuna"),
    ("postgresql://masklab:s3cret@10.1.2.3:5432/optuna", "postgresql://masklab:***@10.1.2.3:5432/optuna"),
    ("postgresql+psycopg://masklab:p%40ss%3Aw@db:5432/optuna", "postgresql+psycopg://masklab:***@db:5432/optuna"),
    ("postgresql://db.cluster/optuna?user=masklab&password=s3cret",
     "postgresql://db.cluster/optuna?user=masklab&password=***"),
    ("http://alice:tok3n@mlflow.cluster:5000", "http://alice:***@mlflow.cluster:5000"),
])
def test_redact_hides_the_password(url, shown):
    assert redact(url) == shown
    assert has_secret(url)
    assert redact(shown) == shown  # redacting twice changes nothing


@pytest.mark.parametrize("url", [
    "postgresql://masklab@db.cluster/optuna", "postgresql://10.1.2.3:5432/optuna", "sqlite:////abs/path/optuna.db",
    "sqlite:///rel/optuna.db", "journal:/shared/optuna.log", "grpc://10.0.0.7:13000", "http://127.0.0.1:5000",
    "/no/scheme/mlruns",
])
def test_redact_leaves_urls_without_a_password_as_they_are(url):
    assert redact(url) == url
    assert not has_secret(url)


def test_a_redacted_tracking_uri_recorded_on_a_study_is_replaced_from_the_environment(tmp_path, monkeypatch):
    """The runner records the tracking URI without its password; a reader given no
    tracking URI takes the real one from MASKLAB_TRACKING_URI, or says how to give it
    (and does not try to log in with ``***``)."""
    import optuna

    from reports.loader import load_study
    from stores import keys

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    study.set_user_attr(keys.TRACKING_URI, "postgresql://masklab:***@127.0.0.1:1/mlflow")
    monkeypatch.delenv("MASKLAB_TRACKING_URI", raising=False)
    data = load_study("s", storage)
    assert data.tracking_uri is None
    assert any("MASKLAB_TRACKING_URI" in n and "masklab:***@127.0.0.1:1/mlflow" in n for n in data.notes), data.notes
    real = f"sqlite:///{tmp_path / 'mlflow.db'}"  # absent: read no further than its name
    monkeypatch.setenv("MASKLAB_TRACKING_URI", real)
    data = load_study("s", storage)
    assert data.tracking_uri == real
    assert any("mlflow.db does not exist" in n for n in data.notes), data.notes


def test_scrub_takes_passwords_out_of_free_text(monkeypatch):
    from stores.urls import scrub

    monkeypatch.setenv("MASKLAB_STORAGE", f"postgresql://masklab:{SECRET}@db/optuna")
    monkeypatch.delenv("MASKLAB_TRACKING_URI", raising=False)
    text = scrub(f"API request to http://alice:tok3n@mlflow:5000/api failed; conninfo password={SECRET}; "
                 "sqlite:////tmp/optuna.db")
    assert text == ("API request to http://alice:***@mlflow:5000/api failed; conninfo password=***; "
                    "sqlite:////tmp/optuna.db")
    assert scrub("no URL here: a:b@c", "postgresql://u:abc@h/d") == "no URL here: a:b@c"  # short or absent: kept


# ---------------------------------------------------------------- helpers


def _spec_file(tmp_path: Path, name: str, grid: dict) -> Path:
    fixed = copy.deepcopy(TINY["gpt"])
    fixed["trainer"].update({"max_steps": 4, "val_every": 2})
    spec = {"name": name, "model": "gpt", "data": "wikitext-2", "fixed": fixed, "grid": grid, "replicates": 1,
            "objective": {"metric": "val/fw_loss", "direction": "minimize"}, "ablation": {"drop_one": False}}
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


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASKLAB_STORAGE", "MASKLAB_TRACKING_URI")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


def _files_with(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` (symlinks not followed) whose bytes hold ``secret``."""
    found = []
    needle = secret.encode()
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                continue
            if needle in path.read_bytes():
                found.append(str(path.relative_to(root)))
    return found


def _pg_dump(cluster, db: str) -> str:
    dump = subprocess.run([str(postgres_bin() / "pg_dump"), "-h", "127.0.0.1", "-p", str(cluster.port),
                           "-U", "masklab", "--no-password", db], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PGPASSWORD": SECRET})
    assert dump.returncode == 0, dump.stderr
    return dump.stdout


def _listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp* gives them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::1, ::ffff:127.0.0.1
ANY = {"00000000", "00000000000000000000000000000000"}  # 0.0.0.0, ::


@contextmanager
def _server(*args: str, env: dict[str, str], cwd: Path):
    """A long-running masklab command; yields (proc, lines): ``lines`` gets every line it
    prints, as ("out"|"err", text). Stopped by its PID (SIGINT, then SIGKILL) on exit."""
    proc = subprocess.Popen([sys.executable, "-m", "studies.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    lines: queue.Queue[tuple[str, str]] = queue.Queue()

    def pump(stream, tag):
        for line in stream:
            lines.put((tag, line.rstrip("\n")))

    pumps = [threading.Thread(target=pump, args=(s, t), daemon=True) for s, t in ((proc.stdout, "out"),
                                                                                   (proc.stderr, "err"))]
    for t in pumps:
        t.start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        for t in pumps:
            t.join(timeout=5)


def _until(lines: queue.Queue, proc: subprocess.Popen, match, timeout: float = 60) -> tuple[str, list[str]]:
    """Read printed lines until one satisfies ``match``; returns it and every line read."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            tag, line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None and lines.empty():
                break
            continue
        seen.append(f"{tag}: {line}")
        if match(tag, line):
            return line, seen
    pytest.fail(f"no such line within {timeout} s (exit {proc.poll()}):\n" + "\n".join(seen))


def _drain(lines: queue.Queue) -> list[str]:
    out = []
    while not lines.empty():
        tag, line = lines.get_nowait()
        out.append(f"{tag}: {line}")
    return out


# ---------------------------------------------------------------- a study on a password-protected PostgreSQL


def test_password_of_the_stores_appears_in_no_store_output_or_log(tmp_path, out_ws):
    """A grid study on PostgreSQL (Optuna) and PostgreSQL (MLflow's tracking store), both
    password-protected, the URLs in ``MASKLAB_STORAGE`` / ``MASKLAB_TRACKING_URI``: run,
    status, report and dashboard work, and the password is nowhere: not in what they
    print (errors included), not in any file they write, not in either database."""
    import psycopg

    with postgres_cluster(password=SECRET) as cluster:
        assert SECRET in cluster.url
        optuna_url = create_database(cluster.url, "optuna_creds")
        mlflow_url = create_database(cluster.url, "mlflow_creds")
        env = _env(MASKLAB_STORAGE=optuna_url, MASKLAB_TRACKING_URI=mlflow_url)
        spec = _spec_file(tmp_path, "creds", {"masking.p_bw": [0.0, 0.5]})
        dirs = ("--output-dir", str(out_ws.output_dir))
        cwd = tmp_path / "cwd"  # where MLflow puts what it puts beside the caller (searched too)
        cwd.mkdir()

        def start(*args: str, env: dict[str, str] = env) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "studies.cli", *args, *dirs], cwd=cwd, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        wrong = f"wrong-{SECRET}"  # a password the server refuses: the error must not show it either
        procs = {"run": start("run", str(spec), "--no-progress", "--data-dir", str(out_ws.data_dir)),
                 "status with a wrong password": start("status", str(spec), env={
                     **env, "MASKLAB_STORAGE": optuna_url.replace(SECRET, wrong)})}
        printed = {"run": procs["run"].communicate(timeout=300)[0]}
        assert procs["run"].returncode == 0, printed["run"]
        procs.update({  # at once: they only read the stores
            "status": start("status", str(spec)),
            "report": start("report", str(spec)),
            "dashboard": start("dashboard", str(spec)),
            "status of a study not there": start("status", str(spec), "--study-name", "absent"),
        })
        for name, proc in procs.items():
            printed[name] = proc.communicate(timeout=300)[0]
        codes = {name: proc.returncode for name, proc in procs.items()}
        assert codes == {"run": 0, "status with a wrong password": 1, "status": 0, "report": 0, "dashboard": 0,
                         "status of a study not there": 2}, printed
        assert "password authentication failed" in printed["status with a wrong password"]
        assert wrong not in printed["status with a wrong password"]
        assert "'absent': not in postgresql://masklab:***@127.0.0.1" in printed["status of a study not there"]

        with psycopg.connect(optuna_url) as conn:
            states = [r[0] for r in conn.execute("SELECT t.state FROM trials t JOIN studies s USING (study_id) "
                                                 "WHERE s.study_name = 'creds'")]
            recorded = conn.execute("SELECT value_json FROM study_user_attributes "
                                    "WHERE key = 'masklab.tracking_uri'").fetchone()[0]
        with psycopg.connect(mlflow_url) as conn:
            run_ids = [r[0] for r in conn.execute("SELECT run_uuid FROM runs r JOIN experiments e "
                                                  "USING (experiment_id) WHERE e.name = 'creds'")]
        assert states == ["COMPLETE", "COMPLETE"], printed["run"]  # the stores were used: not vacuous
        assert len(run_ids) == 3  # the study's parent run and one run per trial
        # The study records where its runs are tracked, without the password.
        assert recorded == f'"{redact(mlflow_url)}"'
        dumps = {db: _pg_dump(cluster, db) for db in ("optuna_creds", "mlflow_creds")}
        assert "creds" in dumps["optuna_creds"] and run_ids[0] in dumps["mlflow_creds"]  # real dumps

    # The stores are named, without their password, where masklab says what it used.
    assert "optuna: postgresql://masklab:***@127.0.0.1" in printed["run"]
    assert "mlflow: postgresql://masklab:***@127.0.0.1" in printed["run"]
    assert "2 COMPLETE" in printed["status"]
    report = (out_ws.output_dir / "reports" / "creds" / "report.md").read_text()
    assert "masklab:***@127.0.0.1" in report
    assert "masklab:***@127.0.0.1" in (out_ws.output_dir / "dashboard.html").read_text()

    leaks = {f"printed by masklab {name}": text for name, text in printed.items() if SECRET in text}
    leaks.update({f"file {path}": "" for path in _files_with(tmp_path, SECRET)})
    leaks.update({f"database {db}": "" for db, text in dumps.items() if SECRET in text})
    assert not leaks, f"the password leaked: {sorted(leaks)}"
    assert (out_ws.output_dir / "reports" / "creds" / "report.html").is_file()


def test_launch_passes_the_stores_to_workers_in_their_environment(tmp_path, data_dir, monkeypatch, capsys):
    """``masklab launch`` hands the worker processes the stores through MASKLAB_STORAGE /
    MASKLAB_TRACKING_URI, not their argv (which any user sees in ``ps`` and the worker log
    repeats), even when they were given as flags."""
    from studies import cli, launch

    started: list[tuple[list[str], dict[str, str]]] = []

    class FakeProc:
        pid, returncode = 4242, 0

        def __init__(self, args, env=None, **_):
            started.append((list(args), dict(env or {})))

        def poll(self):
            return 0

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(launch, "ProgressLine", lambda *a, **k: (lambda: "creds: done"))
    monkeypatch.delenv("MASKLAB_STORAGE", raising=False)
    monkeypatch.delenv("MASKLAB_TRACKING_URI", raising=False)
    spec = _spec_file(tmp_path, "creds_launch", {"masking.p_bw": [0.0]})
    storage = f"postgresql://masklab:{SECRET}@127.0.0.1:1/optuna"
    tracking = f"postgresql://masklab:{SECRET}@127.0.0.1:1/mlflow"
    code = cli.main(["launch", str(spec), "--workers", "2", "--cpu", "--no-report", "--storage", storage,
                     "--tracking-uri", tracking, "--output-dir", str(tmp_path / "out"), "--data-dir", str(data_dir)])
    out = capsys.readouterr()
    assert code == 0, out
    assert len(started) == 2
    for argv, env in started:
        assert not any(SECRET in a for a in argv), argv
        assert "--storage" not in argv and "--tracking-uri" not in argv
        assert env["MASKLAB_STORAGE"] == storage and env["MASKLAB_TRACKING_URI"] == tracking
    assert "carries a password on the command line" in out.err  # the launcher's own argv is warned about
    assert SECRET not in out.out + out.err
    assert "optuna: postgresql://masklab:***@127.0.0.1:1/optuna" in out.out


def test_slurm_refuses_to_write_a_password_into_the_script(tmp_path):
    from studies.launch import SlurmOptions, sbatch_script

    opts = SlurmOptions(array=2)
    for flag, storage, tracking in (
        ("--storage", f"postgresql://masklab:{SECRET}@db.cluster/optuna", "http://mlflow.cluster:5000"),
        ("--tracking-uri", "postgresql://masklab@db.cluster/optuna", f"http://alice:{SECRET}@mlflow.cluster:5000"),
    ):
        with pytest.raises(ConfigError) as e:
            sbatch_script("s", ["spec.yaml"], opts, tmp_path, storage, tracking, "masklab slurm")
        text = str(e.value)
        assert text.startswith(f"{flag} = ") and "***" in text and SECRET not in text
        assert "MASKLAB_" in text and "\n" not in text
    script = sbatch_script("s", ["spec.yaml"], opts, tmp_path, "postgresql://masklab@db.cluster/optuna",
                           "http://mlflow.cluster:5000", "masklab slurm")
    assert "postgresql://masklab@db.cluster/optuna" in script  # a URL without a password is the default
    exec_line = next(line for line in script.splitlines() if line.startswith("exec "))
    assert "--storage" not in exec_line and "--tracking-uri" not in exec_line  # the worker reads the environment


def test_ui_passes_the_tracking_store_in_the_environment(tmp_path, monkeypatch):
    """``masklab ui`` starts ``mlflow ui`` with the store in MLFLOW_BACKEND_STORE_URI (not
    on its argv) and prints it without the password."""
    from studies import ui

    started = []

    class FakeProc:
        pid, returncode = 4242, 0

        def __init__(self, args, env=None, **_):
            started.append((list(args), dict(env or {})))

        def poll(self):
            return 0

        def wait(self, timeout=None):
            return 0

    def healthy(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(ui.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(ui, "_wait_healthy", healthy)
    said: list[str] = []
    uri = f"postgresql://masklab:{SECRET}@127.0.0.1:1/mlflow"
    assert ui.serve_ui(uri, None, free_port(), tmp_path / "art", tmp_path / "ui.log", say=said.append) == 0
    (argv, env), = started
    assert not any(SECRET in a for a in argv) and "--backend-store-uri" not in argv
    assert env["MLFLOW_BACKEND_STORE_URI"] == uri
    assert SECRET not in "\n".join(said)


# ---------------------------------------------------------------- servers bind to 127.0.0.1


@pytest.mark.parametrize("public", [False, True])
def test_dashboard_serve_binds_loopback_unless_told_and_warns(tmp_path, public):
    args = ["dashboard", "--serve", "--port", "0", "--refresh", "30", "--output-dir", str(tmp_path / "out")]
    if public:
        args += ["--host", "0.0.0.0"]
    with _server(*args, env=_env(), cwd=tmp_path) as (proc, lines):
        line, seen = _until(lines, proc, lambda tag, text: tag == "out" and "dashboard: serving" in text)
        url = line.split("serving ", 1)[1].split()[0]
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        assert url == f"http://{'0.0.0.0' if public else '127.0.0.1'}:{port}/"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200 and b"masklab dashboard" in r.read()
        bound = _listening(port)
        assert bound and bound <= (ANY if public else LOOPBACK), bound
        time.sleep(0.3)
        seen += _drain(lines)
    warnings = [s for s in seen if s.startswith("err: ") and "warning" in s]
    if public:
        assert any("dashboard --serve listens on 0.0.0.0" in w for w in warnings), seen
    else:
        assert not warnings, seen


@pytest.mark.parametrize("public", [False, True])
def test_storage_proxy_binds_loopback_unless_told_and_warns(tmp_path, public):
    port = free_port()
    args = ["storage-proxy", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--port", str(port),
            "--threads", "2"]
    if public:
        args += ["--host", "0.0.0.0"]
    with _server(*args, env=_env(), cwd=tmp_path) as (proc, lines):
        line, seen = _until(lines, proc, lambda tag, text: tag == "out" and "storage-proxy: serving" in text)
        assert f"grpc://{'0.0.0.0' if public else '127.0.0.1'}:{port}" in line
        bound = _listening(port)
        assert bound and bound <= (ANY if public else LOOPBACK), bound
        time.sleep(0.3)
        seen += _drain(lines)
    warnings = [s for s in seen if s.startswith("err: ") and "warning" in s]
    if public:
        assert any("storage-proxy listens on 0.0.0.0" in w for w in warnings), seen
    else:
        assert not warnings, seen
