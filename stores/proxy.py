"""Optuna's gRPC storage proxy, with masklab's trial queue beside it.

Thousands of workers each holding their own pool of PostgreSQL connections exhaust the
server (``max_connections`` is 100 by default); Optuna's answer is its gRPC storage
proxy (``optuna.storages.run_grpc_proxy_server``, Optuna >= 4.2): a few proxy processes
hold the connections and the workers talk to them. ``masklab storage-proxy`` runs that
proxy and, on the same port, a small service of its own (``masklab.Queue``) that keeps
what Optuna's proxy protocol cannot carry:

- ``Pop``: claim the next WAITING trial in one indexed statement on the server
  (:func:`stores.queue.pop_waiting_sql`); through Optuna's protocol alone a claim reads
  every unfinished trial of the study;
- ``Counts``: trials per state, counted by the database; ``Running``: the RUNNING
  trials' workers (host, pid), read without the rest of the study;
- ``Heartbeat`` / ``Stale`` / ``Hello``: trial heartbeats, which Optuna's proxy does not
  forward, so a worker lost behind a proxy is still found and its trial retried.

Messages are JSON. A worker pointed at a plain Optuna proxy (``Hello`` unimplemented)
falls back to Optuna's claim and keeps no heartbeats (a lost worker's trial is then
retried only when a worker on its host sees its pid gone).

The server's storage is the uncached :class:`~stores.resilient.ResilientStorage` (a
claim made in SQL must be seen by the next call at once; Optuna's cache would not know
the trial), riding out a database restart like a worker does.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from optuna.storages import BaseStorage, GrpcStorageProxy

from . import queue

SERVICE = "masklab.Queue"
DEFAULT_PORT = 13000
_log = logging.getLogger("masklab.proxy")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _loads(data: bytes) -> Any:
    return json.loads(data.decode()) if data else None


# ------------------------------------------------------------------ server


def make_proxy_server(storage: BaseStorage, host: str, port: int, threads: int = 32):
    """An unstarted ``grpc.Server``: Optuna's storage service over ``storage`` and
    masklab's queue service, on ``host:port``."""
    import grpc
    import optuna

    # Optuna's public entry point (run_grpc_proxy_server) starts and blocks; its
    # make_server, used here, returns the server unstarted so a second service can join.
    from optuna.storages._grpc.server import make_server

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study (lock) created
    server = make_server(storage, host, port, ThreadPoolExecutor(max_workers=threads))
    engine = queue.rdb_engine(storage)
    if engine is None:
        raise ValueError("the proxy serves an RDB storage (PostgreSQL, or sqlite for a test)")
    call = getattr(storage, "retry", lambda what, fn: fn())
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    grace = getattr(getattr(storage, "_backend", storage), "grace_period", None)

    def handler(fn: Callable[[Any], Any]):
        def unary(request: bytes, context) -> bytes:
            return _dumps(fn(_loads(request)))

        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=None, response_serializer=None)

    methods = {
        "Hello": handler(lambda _: {"heartbeat": interval, "grace": grace}),
        "Pop": handler(lambda r: call("claim", lambda: queue.pop_waiting_sql(engine, int(r["study_id"])))),
        "Counts": handler(lambda r: call("count", lambda: queue.state_counts_sql(engine, int(r["study_id"])))),
        "Running": handler(lambda r: call("running", lambda: queue.running_sql(engine, int(r["study_id"])))),
        "Heartbeat": handler(lambda r: storage.record_heartbeat(int(r["trial_id"]))),
        "Stale": handler(lambda r: storage._get_stale_trial_ids(int(r["study_id"]))),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    return server


def serve(storage: BaseStorage, host: str, port: int, threads: int = 32,
          ready: Callable[[int], None] | None = None, stop: threading.Event | None = None) -> None:
    """Run the proxy until interrupted (or ``stop`` is set); ``ready(port)`` once it listens."""
    server = make_proxy_server(storage, host, port, threads)
    server.start()
    if ready is not None:
        ready(port)
    try:
        if stop is None:
            server.wait_for_termination()
        else:
            stop.wait()
    finally:
        server.stop(grace=2).wait()


# ------------------------------------------------------------------ client


class MasklabGrpcStorage(GrpcStorageProxy):
    """Optuna's gRPC storage client, plus masklab's queue and heartbeats where the
    server offers them (``masklab storage-proxy``)."""

    def __init__(self, *, host: str, port: int, stale_callback=None, timeout: float = 30.0):
        super().__init__(host=host, port=port)
        self.describe = f"grpc://{host}:{port}"
        self._stale_callback = stale_callback
        self._timeout = timeout
        self._hello: dict | None = None
        self._extra_lock = threading.Lock()

    def _setup(self) -> None:
        import grpc

        super()._setup()
        self._masklab = {name: self._channel.unary_unary(f"/{SERVICE}/{name}", request_serializer=None,
                                                         response_deserializer=None)
                         for name in ("Hello", "Pop", "Counts", "Running", "Heartbeat", "Stale")}
        self._grpc = grpc

    def _rpc(self, name: str, request: Any = None) -> Any:
        return _loads(self._masklab[name](_dumps(request), timeout=self._timeout))

    def _server_info(self) -> dict:
        with self._extra_lock:
            if self._hello is None:
                try:
                    self._hello = {"queue": True, **self._rpc("Hello")}
                except self._grpc.RpcError as e:
                    if e.code() != self._grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    self._hello = {"queue": False, "heartbeat": None}  # a plain Optuna proxy
            return self._hello

    @property
    def has_queue(self) -> bool:
        return bool(self._server_info()["queue"])

    def masklab_pop_waiting(self, study_id: int) -> int | None:
        return self._rpc("Pop", {"study_id": study_id})

    def masklab_state_counts(self, study_id: int) -> dict[str, int]:
        return self._rpc("Counts", {"study_id": study_id})

    def masklab_running(self, study_id: int) -> list[dict]:
        return self._rpc("Running", {"study_id": study_id})

    # heartbeats (stores.resilient.ResilientStorage presents them to Optuna)
    def get_heartbeat_interval(self) -> int | None:
        return self._server_info().get("heartbeat")

    def record_heartbeat(self, trial_id: int) -> None:
        self._rpc("Heartbeat", {"trial_id": trial_id})

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return list(self._rpc("Stale", {"study_id": study_id}) or [])

    def get_heartbeat_stale_trial_callback(self):
        return self._stale_callback

    def get_failed_trial_callback(self):
        return self._stale_callback

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        for key in ("_masklab", "_grpc", "_extra_lock"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        self._extra_lock = threading.Lock()
        super().__setstate__(state)


def grpc_address(url: str) -> tuple[str, int]:
    """``grpc://host:port`` -> (host, port)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORT


def connect(url: str, stale_callback=None, wait: float = 30.0) -> MasklabGrpcStorage:
    """A client of the proxy at ``grpc://host:port``, once it answers (ConnectionError
    after ``wait`` seconds)."""
    import warnings

    import optuna

    host, port = grpc_address(url)
    with warnings.catch_warnings():  # the proxy client is "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        client = MasklabGrpcStorage(host=host, port=port, stale_callback=stale_callback)
    try:
        client.wait_server_ready(timeout=wait)
    except ConnectionError:
        raise ConnectionError(f"no storage proxy answers at {url} (waited {wait:.0f} s); "
                              "start one with: masklab storage-proxy --storage URL --port "
                              f"{port}") from None
    return client
