"""Real servers for tests: PostgreSQL, an MLflow tracking server, headless Chromium.

Every server binds to 127.0.0.1 on a free port and is stopped by the context manager
that started it. Where a server cannot be had, :func:`unavailable` skips the test with
a message saying how to get it; with ``MASKLAB_REQUIRE_SERVERS=1`` (set by ``.ci/run``)
it fails instead, so CI never passes by skipping.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REQUIRED = os.environ.get("MASKLAB_REQUIRE_SERVERS") == "1"


def unavailable(what: str, how: str) -> None:
    """Skip (locally) or fail (in CI) a test whose server cannot be started."""
    message = f"{what} is not available: {how}"
    if REQUIRED:
        pytest.fail(f"{message} (MASKLAB_REQUIRE_SERVERS=1: these tests must run here)")
    pytest.skip(f"{message}; `bash .ci/run` installs it and runs these tests")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, what: str, log=None) -> None:
    """Poll ``url`` until it answers 200; fail if ``proc`` exits or ``timeout`` passes
    (with the tail of ``log``, an open file, in the message)."""
    def tail() -> str:
        if log is None:
            return ""
        log.seek(0)
        return ":\n" + log.read()[-3000:]

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not healthy after {timeout} s{tail()}")
        time.sleep(0.2)


def stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)


# ---------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    """The directory of Debian's PostgreSQL server binaries (newest version)."""
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    return None


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: run them as the postgres user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields ``postgresql://masklab@127.0.0.1:PORT``
    (trust auth, superuser ``masklab``). Make databases with :func:`create_database`."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        unavailable("PostgreSQL", "apt-get install postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg", "pip install 'psycopg[binary]'")
    root = Path(tempfile.mkdtemp(prefix="masklab-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "masklab", "--auth=trust",
                                 "--no-sync", "-E", "UTF8"]), check=True, capture_output=True, timeout=120)
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200"
    subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"),
                                 "-w", "-t", "60", "start"]), check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql://masklab@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """A new empty database on the server; returns its URL."""
    import psycopg

    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"


# ---------------------------------------------------------------- MLflow server


@contextmanager
def mlflow_server(backend_uri: str, artifact_root: Path, timeout: float = 90.0) -> Iterator[str]:
    """``mlflow server`` over ``backend_uri`` on 127.0.0.1, serving artifacts from
    ``artifact_root``; yields its URL. One worker and no job runner keep it to two
    processes (~0.5 GB) instead of ~15."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    if not mlflow_bin.exists():
        unavailable("mlflow server", "pip install mlflow (the full package, not mlflow-skinny)")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(Path(tempfile.mkdtemp(prefix="masklab-mlflow-")) / "server.log", "w+")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", backend_uri,
         "--artifacts-destination", Path(artifact_root).resolve().as_uri(), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, f"{url}/health", timeout, "mlflow server", log)
        yield url
    finally:
        stop_group(proc)
        log.close()


# ---------------------------------------------------------------- Chromium


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None
