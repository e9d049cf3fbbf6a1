"""Real servers for tests: PostgreSQL, an MLflow tracking server, headless Chromium, and
a gate (an in-process HTTP proxy) that holds a server's answers until the test lets them
through.

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


# ---------------------------------------------------------------- a gate in front of a server

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "host", "content-length"}


class Gate:
    """An HTTP proxy on 127.0.0.1 in front of one server that answers only when the test
    lets it: while the gate is closed every request waits (its client with it) until the
    test opens the gate or lets requests through one at a time, in arrival order.

    ``url`` is the proxy's; ``waiting`` counts the requests held now; ``answered`` lists
    ``(method, path)`` of every request answered so far.
    """

    def __init__(self, upstream: str):
        import http.client
        import threading
        import urllib.parse
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        target = urllib.parse.urlsplit(upstream)
        gate = self
        self._cond = threading.Condition()
        self._open, self._permits, self._next, self._turn = True, 0, 0, 0
        self.waiting = 0
        self.answered: list[tuple[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                gate._pass()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with gate._cond:
                    gate.answered.append((self.command, self.path))
                    gate._cond.notify_all()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="gate", daemon=True)
        self._thread.start()

    def _pass(self) -> None:
        """Called by each request: wait for an open gate, or for a permit and its turn."""
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            self.waiting += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._open or (self._permits > 0 and self._turn == ticket))
            if not self._open:
                self._permits -= 1
            self._turn = max(self._turn, ticket + 1)
            self.waiting -= 1
            self._cond.notify_all()

    def close(self) -> None:
        """Hold every request from now on."""
        with self._cond:
            self._open = False
            self._turn = self._next  # requests let through before now are not waited for

    def open(self) -> None:
        """Let everything through, held requests first."""
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def let_through(self, n: int = 1, timeout: float = 60.0) -> None:
        """Let the next ``n`` held requests through and wait until they are answered."""
        with self._cond:
            goal = len(self.answered) + n
            self._permits += n
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: len(self.answered) >= goal, timeout):
                raise TimeoutError(f"{n} request(s) let through, {goal - len(self.answered)} not answered")

    def wait_held(self, n: int = 1, timeout: float = 60.0) -> bool:
        """Wait until at least ``n`` requests are held; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.waiting >= n, timeout)

    def stop(self) -> None:
        self.open()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=30)


@contextmanager
def gated(upstream: str) -> Iterator[Gate]:
    """A :class:`Gate` in front of ``upstream`` (open at first), stopped on exit."""
    gate = Gate(upstream)
    try:
        yield gate
    finally:
        gate.stop()


# ---------------------------------------------------------------- Chromium


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None
