"""Tracking that survives its server: retries through an outage, a spool when the
server does not come back, and ``masklab sync`` to send what was spooled.

- :class:`ResilientClient` wraps an ``MlflowClient``: a call that fails because the
  tracking server (or its database) cannot be reached is tried again, with back-off,
  for up to ``max_outage`` seconds (``MASKLAB_MAX_OUTAGE``, default 300). Past that,
  the call raises :class:`TrackingOutage` and the client counts the server as down:
  later calls are tried once, not waited out again. A refused request (a bad value,
  a missing run) is never retried.
- The run's metric points that could not be sent go to a spool file in the output dir
  (``spool/<run id>.jsonl``, one JSON record per line: metric batches, then the
  failure tags and status of the run), and the trial ends with a one-line reason
  naming the server, the time waited, the points spooled and the command to send them.
- :func:`sync` (``masklab sync``) sends every spool file's records in order, recording
  its progress beside the file (``.sent``) so a sync cut short resumes where it
  stopped and sends nothing twice; a file fully sent is removed.

MLflow's own HTTP retries (7, with back-off up to two minutes) would hide an outage
inside one call for minutes; masklab processes shorten them (an environment variable
set by the user wins) so the bound above is the one that holds.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stores.resilient import max_outage_default
from stores.urls import redact, scrub

# Each MLflow call gives up quickly; ResilientClient waits an outage out instead.
for _key, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                     ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
    os.environ.setdefault(_key, _value)

SPOOL_DIR = "spool"
# MLflow error codes of a request the server understood and refused: retrying cannot help.
REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
           "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND", "ENDPOINT_NOT_FOUND",
           "FEATURE_DISABLED", "MALFORMED_REQUEST", "RESOURCE_CONFLICT"}


class TrackingOutage(RuntimeError):
    """The tracking server stayed unreachable past ``max_outage``; the message is one line."""


def refused(error: BaseException) -> bool:
    """Whether MLflow answered and refused the request (not an outage)."""
    code = getattr(error, "error_code", None)
    return isinstance(code, str) and code in REFUSED


class ResilientClient:
    """An ``MlflowClient`` whose calls wait out a tracking-server outage (see module doc).

    ``down`` is set once a call has waited ``max_outage`` in vain; from then on calls are
    tried once (the server may be back) and raise :class:`TrackingOutage` at once.
    """

    def __init__(self, client, max_outage: float | None = None):
        self._client = client
        self.tracking_uri = client.tracking_uri if hasattr(client, "tracking_uri") else ""
        self.max_outage = max_outage_default() if max_outage is None else float(max_outage)
        self.down = False
        self.outages = 0  # calls that went through after waiting out an outage

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            return self.call(name, lambda: attr(*args, **kwargs))

        return call

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        first: float | None = None
        delay = 0.5
        while True:
            try:
                result = fn()
            except Exception as e:
                if refused(e):
                    raise
                now = time.monotonic()
                first = now if first is None else first
                if self.down or now - first > self.max_outage:
                    self.down = True
                    raise TrackingOutage(
                        f"tracking server {redact(str(self.tracking_uri))} unreachable for {now - first:.0f} s "
                        f"(max outage {self.max_outage:.0f} s, MASKLAB_MAX_OUTAGE) at {what}: {_reason(e)}") from e
                time.sleep(min(delay, max(0.0, self.max_outage - (now - first))) * (0.5 + random.random() / 2))
                delay = min(delay * 2, 5.0)
                continue
            if first is not None:
                self.outages += 1
            self.down = False
            return result


def _reason(e: BaseException) -> str:
    text = scrub(str(e)).strip().splitlines()  # MLflow's message quotes the URL it was given
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


# ------------------------------------------------------------------ the spool


class Spool:
    """The spool file of one run: ``<output dir>/spool/<run id>.jsonl``."""

    def __init__(self, output_dir: Path, run_id: str, tracking_uri: str):
        self.path = Path(output_dir) / SPOOL_DIR / f"{run_id}.jsonl"
        self.run_id = run_id
        self.tracking_uri = redact(tracking_uri)  # sync takes the real one from the environment when redacted
        self.points = 0
        self._lock = threading.Lock()

    def add(self, record: dict) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri, **record}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def metrics(self, metrics: Iterable) -> None:
        points = [[m.key, m.value, m.timestamp, m.step] for m in metrics]
        if points:
            self.add({"kind": "metrics", "points": points})
            self.points += len(points)

    def tags(self, tags: dict[str, str]) -> None:
        self.add({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def terminated(self, status: str) -> None:
        self.add({"kind": "terminated", "status": status})


@dataclass
class SyncResult:
    files: int = 0
    records: int = 0
    points: int = 0
    left: int = 0


def sync(output_dir: Path, tracking_uri: str | None = None, log: Callable[[str], None] = print) -> SyncResult:
    """Send every spool file under ``output_dir`` (see module doc). ``tracking_uri``
    (else ``MASKLAB_TRACKING_URI``) replaces a spooled URI whose password was redacted."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    from .tracking import MAX_METRICS_PER_BATCH

    result = SyncResult()
    folder = Path(output_dir) / SPOOL_DIR
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        result.files += 1
        done_path = path.with_suffix(".sent")
        done = int(done_path.read_text() or 0) if done_path.exists() else 0
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        try:
            for i, line in enumerate(lines[done:], start=done):
                record = json.loads(line)
                uri = record["tracking_uri"]
                if "***" in uri:
                    uri = tracking_uri or os.environ.get("MASKLAB_TRACKING_URI") or uri
                client = ResilientClient(MlflowClient(tracking_uri=uri), max_outage=30.0)
                run_id = record["run_id"]
                if record["kind"] == "metrics":
                    metrics = [Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in record["points"]]
                    for j in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                        client.log_batch(run_id, metrics=metrics[j : j + MAX_METRICS_PER_BATCH])
                    result.points += len(metrics)
                elif record["kind"] == "tags":
                    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
                elif record["kind"] == "terminated":
                    client.set_terminated(run_id, record["status"])
                result.records += 1
                done_path.write_text(str(i + 1))
        except Exception as e:  # noqa: BLE001 - this file stays for the next sync
            result.left += 1
            log(f"sync: {path}: stopped at record {done_path.read_text() if done_path.exists() else 0} "
                f"of {len(lines)}: {_reason(e)}")
            continue
        path.unlink()
        done_path.unlink(missing_ok=True)
        log(f"sync: {path.name}: {len(lines)} record(s) sent")
    return result
