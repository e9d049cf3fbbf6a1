"""``masklab ui``: the MLflow UI on a study's tracking store, opened on its runs table.

MLflow 3's UI opens an experiment on its GenAI overview unless the browser has been
switched to "Model training" (a per-browser setting). The address parameter
``workflowType=machine_learning`` opens the runs table instead, so every link to an
experiment that masklab prints carries it: ``http://127.0.0.1:PORT/#/experiments/ID?workflowType=machine_learning``.
Experiments are also tagged ``mlflow.experimentKind = custom_model_development``
(:func:`studies.tracking.get_or_create_experiment`), which the UI reads when its workflow
switch is off.

Nothing heavy is imported here (no torch, Lightning or MLflow): the UI runs as an
``mlflow ui`` child process bound to 127.0.0.1, and the experiment is looked up in the
sqlite file directly (a fast error before a server starts) and then over the server's
REST API.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from lit_modules.config_errors import ConfigError
from stores.urls import is_server_uri, redact, sqlite_path

HOST = "127.0.0.1"
# The address parameter that opens an experiment on its runs table (MLflow 3.x).
RUNS_VIEW = "workflowType=machine_learning"
# `mlflow ui` with one worker and no job runner was healthy in ~12 s on a 2-core machine;
# the margin covers a busy one (the first start also migrates the store's schema).
HEALTH_TIMEOUT = 180.0


def runs_view_url(base: str, experiment_id: str | None = None) -> str:
    """The UI's runs table of one experiment (or its list of experiments); a user and
    password in ``base`` are left out (the browser asks for them)."""
    base = _without_userinfo(base)[0].rstrip("/")
    where = f"experiments/{experiment_id}" if experiment_id is not None else "experiments"
    return f"{base}/#/{where}?{RUNS_VIEW}"


def experiments_in_sqlite(path: Path) -> dict[str, str]:
    """name -> experiment id of the active experiments in an MLflow sqlite store (read-only)."""
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT name, experiment_id FROM experiments WHERE lifecycle_stage = 'active'")
            return {name: str(exp_id) for name, exp_id in rows}
    except sqlite3.Error:
        return {}  # not an MLflow store yet (or another schema): the server will say


def _without_userinfo(url: str) -> tuple[str, dict[str, str]]:
    """``http://user:pass@host:5000`` -> (``http://host:5000``, its basic-auth header)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, {}
    import base64

    userinfo, host = parts.netloc.rsplit("@", 1)
    token = base64.b64encode(urllib.parse.unquote(userinfo).encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), {"Authorization": f"Basic {token}"}


def _api(base: str, path: str, body: dict | None = None, **query) -> dict:
    base, auth = _without_userinfo(base.rstrip("/"))
    url = f"{base}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **auth})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def experiment_id(base: str, name: str) -> str | None:
    """The id of the experiment ``name`` on the tracking server at ``base`` (None if absent)."""
    try:
        return str(_api(base, "experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"])
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def experiments(base: str) -> dict[str, str]:
    """name -> id of the active experiments on the tracking server at ``base``."""
    found = _api(base, "experiments/search", {"max_results": 1000})
    return {e["name"]: str(e["experiment_id"]) for e in found.get("experiments", [])}


def _links(base: str, study: str | None, where: str) -> list[str]:
    """The lines to print: the study's runs table; without a study, the list of
    experiments and then each experiment's runs table (the list's own links open an
    experiment on the GenAI overview: the address parameter does not carry over)."""
    present = experiments(base)
    if study is not None:
        if study not in present:
            raise _no_experiment(study, where, sorted(present))
        return [f"mlflow ui: {runs_view_url(base, present[study])}"]
    width = max((len(n) for n in present), default=0)
    return [f"mlflow ui: {runs_view_url(base)}",
            *(f"  {n:<{width}}  {runs_view_url(base, present[n])}" for n in sorted(present))]


def study_link(tracking_uri: str, name: str) -> str | None:
    """The runs table of study ``name`` when ``tracking_uri`` is a tracking server (its
    UI is at the same address); None for local stores (``masklab ui`` serves those)."""
    if not is_server_uri(tracking_uri):
        return None
    try:
        exp = experiment_id(tracking_uri, name)
    except OSError:
        return None
    return runs_view_url(tracking_uri, exp) if exp is not None else None


def _no_experiment(name: str, where: str, present: list[str]) -> ConfigError:
    return ConfigError("SPEC", name, f"no MLflow experiment of that name in {redact(where)} "
                                     f"(experiments there: {', '.join(present) or 'none'}); run the study first")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _check_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise ConfigError("--port", port, f"cannot listen on {HOST}: {e.strerror}; "
                                              "pick another port, or leave --port out for a free one") from None


def _mlflow_binary() -> str:
    beside = Path(sys.executable).parent / "mlflow"  # the venv's, even when it is not activated
    found = str(beside) if beside.exists() else shutil.which("mlflow")
    if not found:
        raise ConfigError("mlflow", "not found", "install the full mlflow package (mlflow-skinny has no UI)")
    return found


def _wait_healthy(proc: subprocess.Popen, base: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
            raise ConfigError("mlflow ui", f"exit {proc.returncode}", f"{tail[0][:300]} (log: {log})")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ConfigError("mlflow ui", base, f"not answering after {timeout:.0f} s (log: {log})")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop the server by its PID (it stops its worker), killing it if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _on_sigterm(handler):
    """Install a SIGTERM handler (main thread only); returns the previous one."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, TypeError):  # not the main thread, or no previous Python handler
        return None


def serve_ui(tracking_uri: str, study: str | None, port: int | None, artifact_dir: Path, log_path: Path,
             say: Callable[[str], None] = lambda m: print(m, flush=True)) -> int:
    """Start ``mlflow ui`` on ``tracking_uri`` (127.0.0.1, ``port`` or a free one), print
    the link to ``study``'s runs table (or to the list of experiments), and serve until
    interrupted. A tracking server URI needs no UI started: its link is printed."""
    if is_server_uri(tracking_uri):
        for line in _links(tracking_uri.rstrip("/"), study, tracking_uri):
            say(line)
        return 0
    db = sqlite_path(tracking_uri)
    if db is not None:
        if not db.is_file():  # `mlflow ui` would create an empty store there
            raise ConfigError("--tracking-uri", redact(tracking_uri), "no such store; run a study first "
                                                                      "(masklab run SPEC)")
        present = experiments_in_sqlite(db)
        if study is not None and present and study not in present:
            raise _no_experiment(study, tracking_uri, sorted(present))
    if port is None:
        port = _free_port()
    else:
        _check_port(port)
    base = f"http://{HOST}:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The store goes in the environment, not on the command line (which ps shows to everyone).
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": tracking_uri}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # no job runner: 2 processes, not ~15
    cmd = [_mlflow_binary(), "ui", "--host", HOST, "--port", str(port),
           "--workers", "1", "--artifacts-destination", Path(artifact_dir).resolve().as_uri()]
    previous = _on_sigterm(_raise_interrupt)  # `kill PID` of masklab stops the server too
    try:
        with open(log_path, "w") as log:
            # Its own session: a Ctrl-C in the terminal reaches masklab alone, which then
            # stops the server by its PID (otherwise the server could exit first and look
            # like a crash).
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        try:
            _wait_healthy(proc, base, log_path, HEALTH_TIMEOUT)
            for line in _links(base, study, tracking_uri):
                say(line)
            say(f"  ({redact(tracking_uri)}; server log {log_path}; Ctrl-C stops the server)")
            proc.wait()
            raise ConfigError("mlflow ui", f"exit {proc.returncode}", f"the server stopped (log: {log_path})")
        except KeyboardInterrupt:
            say("mlflow ui: stopped")
            return 0
        finally:
            _stop(proc)
    finally:
        _on_sigterm(previous if previous is not None else signal.SIG_DFL)
