"""MLflow tracking: a buffered Lightning logger and the provenance of every run.

Per-call MLflow logging is expensive (1000 x ``log_metric`` ~ 6.7 s against sqlite, far
more against a server, vs ~0.3 s for one ``log_batch``), so metrics are buffered and sent
in batches: when the buffer holds ``flush_every`` points, after ``flush_seconds``, and at
the end of the run. The batches are sent by a background thread, so a slow or distant
tracking server never stalls a training step; the run waits for them only at its end.

The sender waits out a tracking-server outage (``studies.spool.ResilientClient``):
training goes on, the points logged meanwhile are sent when the server is back, and a
checkpoint waiting behind them is published only then. When the server stays away past
the outage limit, the unsent points go to the run's spool file and the next logging
step ends the run with that reason (``masklab sync`` sends the spool later).
"""

from __future__ import annotations

import importlib.metadata
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from lit_modules.config import flatten
from stores import keys
from stores.urls import is_server_uri

from .spool import ResilientClient, Spool, TrackingOutage

# MLflow's log_batch accepts at most 1000 metrics, 100 params and 100 tags per call.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
# MLflow param values are limited to 6000 characters.
MAX_PARAM_LENGTH = 6000

PACKAGES = ("masklab", "torch", "lightning", "optuna", "mlflow", "sentencepiece", "numpy", "pandas")


class BufferedMLflowLogger(Logger):
    """Lightning logger writing to one existing MLflow run, in batches."""

    def __init__(self, client: MlflowClient, run_id: str, flush_every: int = 500, flush_seconds: float = 15.0,
                 background: bool = True, spool: Spool | None = None):
        super().__init__()
        self.client = client if isinstance(client, ResilientClient) else ResilientClient(client)
        self.run_id = run_id
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()
        self._params: dict[str, str] = {}
        self.spool = spool
        self._sender = _BatchSender(self.client, run_id, spool) if background else None

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.run_id

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args, **kwargs) -> None:
        """Flattened dotted params; the module's ``config`` wrapper is dropped, and params
        already logged with the same value are skipped (MLflow params are immutable)."""
        if not isinstance(params, Mapping):
            params = vars(params)
        params = dict(params)
        if set(params) == {"config"} and isinstance(params["config"], Mapping):
            params = params["config"]
        log_params(self.client, self.run_id, flat_params(params), self._params)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._sender is not None and self._sender.down:  # the server stayed away: end the run
            self._buffer.extend(Metric(k, float(v), int(time.time() * 1000), int(step or 0))
                                for k, v in metrics.items() if k != "epoch")
            self._sender.raise_outage()
        ts = int(time.time() * 1000)
        for key, value in metrics.items():
            if key == "epoch":
                continue
            self._buffer.append(Metric(key, float(value), ts, int(step or 0)))
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush(wait=False)

    @rank_zero_only
    def log_image(self, artifact_file: str, image, step: int | None = None) -> None:
        """An image (C, H, W) float tensor in [0, 1] or (H, W, C) uint8 array, saved as a
        PNG artifact of the run."""
        import numpy as np

        arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
            if arr.ndim == 3 and arr.shape[0] in (1, 3):
                arr = arr.transpose(1, 2, 0)
        self.client.log_image(self.run_id, arr, artifact_file=artifact_file)

    def flush(self, wait: bool = True) -> None:
        """Send the buffered points; with ``wait`` (the default) return once every point
        logged so far is stored, else hand them to the background sender and return."""
        batch, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        if self._sender is None:
            send_metrics(self.client, self.run_id, batch)
            return
        if batch:
            self._sender.put(batch)
        if wait:
            self._sender.wait()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.flush()

    def save(self) -> None:
        """Nothing: Lightning calls this after every ``log_metrics``; sending there would
        make every logged step a request. The buffer is sent by size and age (above), at
        each checkpoint and at the end."""

    def when_stored(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once every point logged so far is stored (at once when sending is
        synchronous; else on the sender thread, after the batches before it). The
        checkpoint callback publishes a checkpoint this way: never before its curves."""
        self.flush(wait=False)
        if self._sender is None:
            fn()
        else:
            self._sender.put(fn)

    def close(self) -> None:
        """Send what is left and stop the background sender."""
        self.flush()
        if self._sender is not None:
            self._sender.stop()


def send_metrics(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    """Metric points in as few ``log_batch`` calls as MLflow allows."""
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])


class _BatchSender:
    """One daemon thread sending metric batches in order, and running the callables put
    between them once the batches before them are sent. The client waits out an outage
    (``ResilientClient``); a batch refused by the server is an error raised by the next
    :meth:`wait` (a callable still runs: a checkpoint is worth more than curve points the
    server would not take). When the server stays away past the outage limit the sender
    is ``down``: this batch and every later one go to the spool, and callables (the
    checkpoint publications waiting for their curves) are skipped."""

    def __init__(self, client: ResilientClient, run_id: str, spool: Spool | None = None):
        self.client, self.run_id, self.spool = client, run_id, spool
        self.down: TrackingOutage | None = None
        self._queue: queue.Queue[list[Metric] | Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-batches-{run_id[:8]}", daemon=True)
        self._thread.start()

    def put(self, item: list[Metric] | Callable[[], None]) -> None:
        self._queue.put(item)

    def wait(self) -> None:
        self._queue.join()
        if self.down is not None:
            self.raise_outage()
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, OSError):  # a callable's (a checkpoint publication): its own one-line reason
                raise error
            raise RuntimeError(f"MLflow metric logging failed for run {self.run_id}: {error}") from error

    def raise_outage(self) -> None:
        where = (f"; {self.spool.points} metric points spooled to {self.spool.path}: send them with `masklab sync`"
                 if self.spool is not None else "; the unsent metric points are lost (no spool)")
        raise TrackingOutage(f"{self.down}{where}") from self.down

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if callable(item):
                    if self.down is None:
                        item()
                    continue
                if self.down is not None:
                    self._spool(item)
                    continue
                try:
                    send_metrics(self.client, self.run_id, item)
                except TrackingOutage as e:
                    self.down = e
                    self._spool(item)
                except Exception as e:  # noqa: BLE001 - refused by the server: kept and raised by wait()
                    self._error = e
            except Exception as e:  # noqa: BLE001 - a callable failed: kept and raised by wait()
                self._error = e
            finally:
                self._queue.task_done()

    def _spool(self, batch: list[Metric]) -> None:
        if self.spool is not None:
            self.spool.metrics(batch)


def flat_params(params: Mapping) -> dict[str, str]:
    """Dotted MLflow params, as strings no longer than MLflow takes."""
    return {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(params).items()}


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str], logged: dict[str, str] | None = None) -> None:
    """log_batch in chunks of 100; skips keys already logged (tracked in ``logged``)."""
    logged = {} if logged is None else logged
    todo = [Param(k, str(v)) for k, v in params.items() if k not in logged]
    for i in range(0, len(todo), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=todo[i : i + MAX_PARAMS_PER_BATCH])
    logged.update({p.key: p.value for p in todo})


def log_metric_series(client: MlflowClient, run_id: str, points: list[tuple[str, float, int]]) -> None:
    """Many (key, value, step) points in as few calls as MLflow allows."""
    ts = int(time.time() * 1000)
    send_metrics(client, run_id, [Metric(k, float(v), ts, int(s)) for k, v, s in points])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def artifact_root(tracking_uri: str, workspace) -> Path | None:
    """Stores without a server of their own (a sqlite file, a path, a database URL) keep
    artifacts in the output dir (a ``Workspace``; MLflow would otherwise put them in
    ``./mlruns`` under whatever directory the worker started in); a server chooses its own."""
    return None if is_server_uri(tracking_uri) else workspace.artifact_dir


def get_or_create_experiment(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    """The experiment ``name``, created if absent, tagged as model training
    (``mlflow.experimentKind``: the UI opens it on its runs, not the GenAI overview, when
    its workflow switch is off; links carry ``?workflowType=machine_learning`` for the rest)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = (artifact_root / name).as_uri() if artifact_root is not None else None
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags={keys.EXPERIMENT_KIND_TAG: keys.EXPERIMENT_KIND})
        except Exception:
            # Another worker created it between our lookup and our create.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if keys.EXPERIMENT_KIND_TAG not in exp.tags:  # made before masklab tagged experiments
        client.set_experiment_tag(exp.experiment_id, keys.EXPERIMENT_KIND_TAG, keys.EXPERIMENT_KIND)
    return exp.experiment_id


def provenance_tags() -> dict[str, str]:
    """Git commit (and whether the tree was dirty) and the versions of the stack."""
    tags = {keys.GIT_COMMIT: "unknown", keys.GIT_DIRTY: "unknown"}
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            tags[keys.GIT_COMMIT] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                                   capture_output=True, text=True, timeout=10)
            tags[keys.GIT_DIRTY] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            tags[f"version.{pkg}"] = "not installed"
    return tags
