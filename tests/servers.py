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


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (see :func:`postgres_cluster`)."""

    def __init__(self, bin_dir: Path, root: Path, port: int, password: str | None):
        self.bin_dir, self.root, self.port, self.password = bin_dir, root, port, password
        self.data = root / "data"
        auth = f"masklab:{password}" if password else "masklab"
        self.url = f"postgresql://{auth}@127.0.0.1:{self.port}"

    def _ctl(self, *args: str) -> None:
        subprocess.run(_as_postgres([str(self.bin_dir / "pg_ctl"), "-D", str(self.data), *args]), check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                "-c max_connections=600")
        self._ctl("-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: as a crash would; ``fast``: cleanly)."""
        self._ctl("-m", mode, "-w", "stop")

    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def restart(self, down_seconds: float = 0.0, mode: str = "fast") -> None:
        """Stop the server (every connection drops), stay down, start it again on the same port."""
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()

    def connections(self) -> int:
        """Client connections open now (every database; this query's own not counted)."""
        import psycopg

        with psycopg.connect(f"{self.url}/postgres", autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                               "AND pid <> pg_backend_pid()").fetchone()
        return int(row[0])


@contextmanager
def postgres_cluster(password: str | None = None) -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster on 127.0.0.1, superuser ``masklab`` (trust auth; with
    ``password``, password auth on TCP), stopped and deleted on exit."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        unavailable("PostgreSQL", "apt-get install postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg", "pip install 'psycopg[binary]'")
    root = Path(tempfile.mkdtemp(prefix="masklab-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    init = [str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "masklab", "--no-sync", "-E", "UTF8"]
    if password:
        pwfile = root / "pw"
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        init += ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
    else:
        init += ["--auth=trust"]
    subprocess.run(_as_postgres(init), check=True, capture_output=True, timeout=120)
    cluster = PostgresCluster(bin_dir, root, free_port(), password)
    cluster.start()
    try:
        yield cluster
    finally:
        try:
            cluster.stop("immediate")
        except subprocess.SubprocessError:
            pass
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields ``postgresql://masklab@127.0.0.1:PORT``
    (trust auth, superuser ``masklab``). Make databases with :func:`create_database`."""
    with postgres_cluster() as cluster:
        yield cluster.url


def create_database(server_url: str, name: str) -> str:
    """A new empty database on the server; returns its URL."""
    import psycopg

    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"


# ---------------------------------------------------------------- MLflow server


class MlflowServer:
    """``mlflow server`` over a backend store on 127.0.0.1 (see :func:`mlflow_server`);
    :meth:`stop` and :meth:`start` take it away and bring it back on the same port."""

    def __init__(self, backend_uri: str, artifact_root: Path, timeout: float = 90.0):
        self.mlflow_bin = Path(sys.executable).parent / "mlflow"
        if not self.mlflow_bin.exists():
            unavailable("mlflow server", "pip install mlflow (the full package, not mlflow-skinny)")
        self.backend_uri, self.artifact_root, self.timeout = backend_uri, Path(artifact_root), timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = open(Path(tempfile.mkdtemp(prefix="masklab-mlflow-")) / "server.log", "w+")

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.proc = subprocess.Popen(
            [str(self.mlflow_bin), "server", "--backend-store-uri", self.backend_uri,
             "--artifacts-destination", self.artifact_root.resolve().as_uri(), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        wait_healthy(self.proc, f"{self.url}/health", self.timeout, "mlflow server", self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None


@contextmanager
def mlflow_server(backend_uri: str, artifact_root: Path, timeout: float = 90.0,
                  handle: list | None = None) -> Iterator[str]:
    """``mlflow server`` over ``backend_uri`` on 127.0.0.1, serving artifacts from
    ``artifact_root``; yields its URL (and appends the :class:`MlflowServer` to
    ``handle``, for a test that stops and restarts it). One worker and no job runner
    keep it to two processes (~0.5 GB) instead of ~15."""
    server = MlflowServer(backend_uri, artifact_root, timeout)
    if handle is not None:
        handle.append(server)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()
        server.log.close()


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
