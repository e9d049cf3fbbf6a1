"""``masklab dashboard --serve``: the dashboard on a loopback HTTP server, rebuilt from
the stores every ``refresh`` seconds while studies run.

The server answers ``/`` (also ``/dashboard.html``) with the page and ``/version.json``
with its version stamp; the page polls the stamp and reloads itself when it changes, so
an open browser follows a running study. Each new version is also written to the page
file, so what the browser shows and what is on disk agree. Only 127.0.0.1 is bound:
the page shows store paths and run ids, which stay on this machine.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from stores.urls import scrub

from .build import write_page
from .content import Dashboard
from .page import VERSION_FILE, render_page

HOST = "127.0.0.1"


class DashboardServer(ThreadingHTTPServer):
    """Serves the latest page; :meth:`rebuild` replaces it when the stores changed."""

    daemon_threads = True  # a browser holding a connection open never blocks shutdown
    block_on_close = False  # ... nor does server_close wait for the handlers still running

    def __init__(self, build: Callable[[], Dashboard], out: Path, port: int, refresh: float, host: str = HOST):
        super().__init__((host, port), _Handler)
        self.host = host
        self.build, self.out, self.refresh = build, Path(out), refresh
        self.page, self.version = b"", ""
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.server_address[1]}/"

    def rebuild(self) -> bool:
        """Read the stores and render the page; swap it in if its version is new (True)."""
        text, version = render_page(self.build(), self.refresh)
        if version == self.version:
            return False
        write_page(self.out, text)
        with self._lock:
            self.page, self.version = text.encode("utf-8"), version
        return True

    def current(self) -> tuple[bytes, str]:
        with self._lock:
            return self.page, self.version

    def run(self, log: Callable[[str], None]) -> None:
        """Serve until :meth:`stop` (or Ctrl-C), rebuilding every ``refresh`` seconds."""
        refresher = threading.Thread(target=self._refresh_loop, args=(log,), daemon=True)
        refresher.start()
        try:
            self.serve_forever(poll_interval=0.2)
        finally:
            self._stop.set()
            refresher.join(timeout=5)
            self.server_close()

    def stop(self) -> None:
        self._stop.set()
        self.shutdown()

    def _refresh_loop(self, log: Callable[[str], None]) -> None:
        while not self._stop.wait(self.refresh):
            try:
                if self.rebuild():
                    log(f"dashboard: new results, page {self.version} written to {self.out}")
            except Exception as e:  # a store busy or mid-write: keep serving the last good page, retry later
                log(f"dashboard: rebuild failed, still serving the last page: {type(e).__name__}: {scrub(str(e))}")


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        page, version = self.server.current()
        if path in ("/", "/index.html", f"/{self.server.out.name}"):
            self._send(200, "text/html; charset=utf-8", page)
        elif path == f"/{VERSION_FILE}":
            self._send(200, "application/json", json.dumps({"version": version}).encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: the dashboard is at /\n")

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        """Quiet: a poll every few seconds would drown the rebuild messages."""


def serve(build: Callable[[], Dashboard], out: Path, port: int, refresh: float, host: str = "127.0.0.1") -> int:
    """Build the page, serve it on ``host``:``port`` (0: a free port) and keep it fresh
    until Ctrl-C. Returns the exit status."""
    server = DashboardServer(build, out, port, refresh, host)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        server.rebuild()
        print(f"dashboard: serving {server.url} (page {server.out}, rebuilt from the stores every {refresh:g} s; "
              "Ctrl-C stops)", flush=True)
        server.run(log)
    except KeyboardInterrupt:
        print("dashboard: stopped", flush=True)
    finally:
        server.server_close()
    return 0
