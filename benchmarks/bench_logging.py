"""Cost of MLflow metric logging on LitGPT training step time, side by side in one process.

Requirement: metric logging to a remote tracking server is batched or asynchronous, so
that a slow server does not slow training; the overhead, measured against logging to a
local file store, is at most 3% of the step time.

One small real GPT (depth 4, width 128, 4 heads, block 128, batch 16, wikitext-2 with the
project's BPE 512 tokenizer, ``causal-lm`` with p_bw = 0.5 so fw and bw losses are both
logged), built exactly as ``studies.train.train_run`` builds it
(``lit_modules.run.build_datamodule / build_model / build_trainer``), trained by one real
``lightning.Trainer.fit`` per variant. The variants differ only in the Lightning logger:

  none            no logger (``logger=False``): the floor.
  sqlite          ``studies.tracking.BufferedMLflowLogger`` (the defaults ``train_run``
                  uses: flush_every 500, flush_seconds 15, background sender) writing to a
                  ``sqlite:///`` store in a temporary folder: MLflow's local store, the
                  reference of the requirement.
  file            the same to a plain ``file://`` FileStore (``MLFLOW_ALLOW_FILE_STORE=true``);
                  left out with a note if this MLflow refuses it.
  server          the same to an ``mlflow server`` (sqlite backend, 1 worker) on 127.0.0.1
                  (``tests.servers.mlflow_server``).
  slow_bg         the same to that server through a loopback HTTP proxy, started by this
                  script in its own process, that holds every request for ``--latency-ms``
                  (default 200 ms) before forwarding it: a slow or distant server.
  slow_sync       ``BufferedMLflowLogger(background=False)`` to the slow server: batches
                  sent in the training thread. Contrast.
  lightning_slow  Lightning's own ``lightning.pytorch.loggers.MLFlowLogger`` (one synchronous
                  ``log_batch`` per ``log_metrics`` call) to the slow server. Contrast.

Each variant runs twice: with ``trainer.log_every = 1`` (every step logs train/loss,
train/fw_loss, train/bw_loss, train/bw_steps: the worst case), suffix ``@1``, and with the
default ``log_every = 10``, suffix ``@10`` (``file`` and ``slow_sync`` only at 1, to keep
the default run under ~5 minutes; ``--kinds`` picks a subset).

How it measures (the conventions of harness.py and bench_gpt.py): every fit runs in its own
worker thread and is paused inside ``on_train_batch_end`` until the main thread hands it
the turn; only one fit works at a time. A turn is a block of consecutive training steps
(``--steps-per-turn``, default 5 at log_every 1; 10 at log_every 10, so every turn holds
exactly one logging step), timed from the handover to the block's last
``on_train_batch_end``: the batch fetch, every Lightning hook, forward, backward, AdamW,
and Lightning's logging (``log_metrics`` + ``save`` of the previous step, which Lightning
calls after ``on_train_batch_end``). The background sender works while its own fit runs;
after a turn the main thread waits, untimed, until that logger's queue is empty
(the time is reported as ``drain``), so a variant's sends never land in another variant's
turn. A round gives every variant one turn, variants of one log_every group back to back,
the order inside a group rotating from round to round; an unmeasured warm-up round of 2
steps per variant comes first (each fit's first step, its setup, is never timed). Per
variant and round the figure is the mean step time of its turn (the mean, not the median:
a slow logging step is the cost being measured). Each ratio is the median of the paired
per-round ratios; cross-checks: best/best, cpu (the paired median on this process's CPU
time, which includes the sender threads and excludes the server), quiet (rounds in which
other processes used < 10% of the machine during both sides).

A paused fit's wall clock keeps running while the others take their turns, so the logger's
``flush_seconds`` (15 s) has always expired when a turn starts: the first logging step of
every turn hands the buffer to the sender. The benchmark therefore sends a batch every 5-10
steps where a continuous run would send one every 15 s (~40 steps at log_every 1 here):
it overstates the sending cost, never understates it.

Beside the times it counts, per measured step, the calls the training thread makes into the
logger and how long it spends in them, and every ``log_batch`` that carries metrics (in
which thread, with how many metrics), and reads the CPU time of the mlflow server and proxy
processes from /proc (on this 2-core machine a local server competes with training for the
cores; a remote one would not).

Usage:  python benchmarks/bench_logging.py [--quick] [--json PATH] [--latency-ms 200]
                                           [--kinds none,sqlite,...] [--log-every 1,10] [--rounds N]
"""

from __future__ import annotations

import http.client
import os
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# ---------------------------------------------------------------- the slow proxy (own process)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length"}


class SlowProxyHandler(BaseHTTPRequestHandler):
    """Holds every request for ``server.latency_s``, then forwards it to ``server.upstream``
    over one kept-alive connection per client connection."""

    protocol_version = "HTTP/1.1"
    conn: http.client.HTTPConnection | None = None

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        time.sleep(self.server.latency_s)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        for attempt in (0, 1):  # the upstream may have closed an idle kept-alive connection
            if self.conn is None:
                self.conn = http.client.HTTPConnection(*self.server.upstream, timeout=120)
            try:
                self.conn.request(self.command, self.path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                break
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    self.send_error(502, "upstream unreachable")
                    return
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass


def serve_proxy(upstream: str, port: int, latency_s: float) -> int:
    url = urllib.parse.urlsplit(upstream)
    server = ThreadingHTTPServer(("127.0.0.1", port), SlowProxyHandler)
    server.daemon_threads = True
    server.upstream, server.latency_s = (url.hostname, url.port), latency_s
    server.serve_forever()
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--serve-proxy"]:
    raise SystemExit(serve_proxy(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))

# ---------------------------------------------------------------- the benchmark
import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import urllib.request  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # only the ``file`` variant's store needs it
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere in the repo

import harness  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402

from lit_modules.config import load_run_config  # noqa: E402
from lit_modules.paths import Workspace  # noqa: E402
from lit_modules.run import build_datamodule, build_model, build_trainer  # noqa: E402

DEPTH, WIDTH, HEADS, T, BATCH, P_BW = 4, 128, 4, 128, 16, 0.5
FIT_STEPS = 1_000_000  # a fit runs until the benchmark stops it (no epoch end, no validation)
EXPERIMENT = "bench-logging"
WARM_STEPS = 2

KINDS = {  # kind: what
    "none": "no logger (logger=False)",
    "sqlite": "BufferedMLflowLogger -> sqlite:/// local store (background sender)",
    "file": "BufferedMLflowLogger -> file:// FileStore (background sender)",
    "server": "BufferedMLflowLogger -> mlflow server on 127.0.0.1 (background sender)",
    "slow_bg": "BufferedMLflowLogger -> slow server via proxy (background sender)",
    "slow_sync": "BufferedMLflowLogger(background=False) -> slow server",
    "lightning_slow": "lightning MLFlowLogger (sync log_batch per call) -> slow server",
}
KINDS_AT = {1: list(KINDS), 10: [k for k in KINDS if k not in ("file", "slow_sync")]}


def ratio_specs(log_everys) -> tuple[dict, dict]:
    """TARGETS and INFO_RATIOS as in bench_gpt: label -> (numerator, denominator[, kind, bound]);
    ratio = step time(numerator) / step time(denominator)."""
    targets, info = {}, {}
    for e in log_everys:
        targets[f"server / sqlite @{e}"] = (f"server@{e}", f"sqlite@{e}", "<=", 1.03)
        targets[f"slow_bg / sqlite @{e}"] = (f"slow_bg@{e}", f"sqlite@{e}", "<=", 1.03)
    for e in log_everys:
        for kind in KINDS_AT[e]:
            if kind not in ("none", "server", "slow_bg", "sqlite"):
                info[f"{kind} / sqlite @{e}"] = (f"{kind}@{e}", f"sqlite@{e}")
        for kind in KINDS_AT[e]:
            if kind != "none":
                info[f"{kind} / none @{e}"] = (f"{kind}@{e}", f"none@{e}")
    return targets, info


def run_config(log_every: int):
    return load_run_config({
        "seed": 0,
        "data": {"name": "wikitext-2", "batch_size": BATCH},
        "model": {"name": "gpt", "depth": DEPTH, "width": WIDTH, "heads": HEADS, "block_size": T},
        "masking": {"name": "causal-lm", "p_bw": P_BW},
        "trainer": {"max_steps": FIT_STEPS, "val_every": FIT_STEPS, "log_every": log_every,
                    "accelerator": "cpu", "progress_bar": False, "checkpoint": False},
    }, [])


# ---------------------------------------------------------------- processes and servers
def _session_cpu_s(sid: int) -> float:
    """CPU seconds (user + system) of the live processes of session ``sid`` (Linux /proc)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6, session
            total += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return total / harness._TICK


def _pid_listening(port: int) -> int | None:
    """The pid whose command line has ``--port PORT`` (the mlflow server this script started)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in args and str(port).encode() in args and any(b"mlflow" in a for a in args):
            return int(entry.name)
    return None


class Servers:
    """CPU time of the mlflow server's and the proxy's process sessions."""

    def __init__(self):
        self.sids: list[int] = []

    def cpu_s(self) -> float:
        return sum(_session_cpu_s(s) for s in self.sids)


@contextlib.contextmanager
def slow_proxy(upstream: str, latency_s: float, servers: Servers):
    """This script, in its own process, as a proxy that delays every request by ``latency_s``."""
    from tests.servers import free_port, stop_group, wait_healthy

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-proxy", upstream, str(port),
                             str(latency_s)], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, f"{url}/health", 30, "the slow proxy")
        servers.sids.append(proc.pid)
        yield url
    finally:
        stop_group(proc, timeout=10)


def round_trip_ms(uri: str, run_id: str, n: int = 5) -> float:
    """Median wall time of one 4-metric ``log_batch`` to ``uri`` (outside the training runs)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client, out = MlflowClient(tracking_uri=uri), []
    for i in range(n):
        t0 = time.perf_counter()
        client.log_batch(run_id, metrics=[Metric(f"probe/{k}", 1.0, 0, i) for k in range(4)])
        out.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(out)


# ---------------------------------------------------------------- instrumentation
class Calls:
    """Counts and times calls into a logger and its client: per (call, thread) where thread
    is ``train`` (the variant's fit thread) or ``other`` (the background sender)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.count: Counter = Counter()
        self.seconds: Counter = Counter()
        self.cpu: Counter = Counter()  # the calling thread's CPU time (time.thread_time)
        self.train_thread: threading.Thread | None = None

    def wrap(self, obj, attr: str, only_metrics: bool = False) -> None:
        fn = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                # log_batch(run_id, metrics=...); logger.log_metrics(metrics, step)
                metrics = kwargs.get("metrics", args[0] if args and attr == "log_metrics" else None) or ()
                if not only_metrics or metrics:
                    where = "train" if threading.current_thread() is self.train_thread else "other"
                    with self.lock:
                        self.count[(attr, where)] += 1
                        if attr == "log_metrics" and "train/loss" in metrics:
                            self.count[("train/loss logged", where)] += 1
                        self.seconds[(attr, where)] += dt
                        self.cpu[(attr, where)] += dc
                        if only_metrics:
                            self.count[("metrics sent", where)] += len(metrics)

        setattr(obj, attr, wrapped)

    def snapshot(self) -> tuple[Counter, Counter, Counter]:
        with self.lock:
            return Counter(self.count), Counter(self.seconds), Counter(self.cpu)


# ---------------------------------------------------------------- the variants
class BlockTurnTaker(L.Callback):
    """harness.TurnTaker for a block of ``variant.calls`` steps per turn: pauses the fit
    after the block's last step until the next turn; records each step's wall time."""

    def __init__(self, variant: LoggingVariant):
        self.v, self.start, self.done, self.last = variant, None, 0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self.start is not None:
            self.v.step_ms[-1].append(round(1e3 * (now - self.last), 2))
            self.last, self.done = now, self.done + 1
            if self.done < self.v.calls:
                return
            self.v.baton.seconds = harness.elapsed(self.start)
        self.v.baton.hand_back()  # the first time: ready (the fit's first step is never timed)
        if not self.v.baton.wait_turn():
            trainer.should_stop = True
            return
        self.v.step_ms.append([])
        self.start, self.done = harness.snapshot(), 0
        self.last = self.start[0]


class LoggingVariant(harness.Variant):
    """One fit of the GPT with one logger, ``calls`` steps per turn; after a turn, waits
    (untimed) for its background sender's queue to empty."""

    def __init__(self, name: str, kind: str, log_every: int, steps: int, make_logger, workspace: Workspace,
                 servers: Servers):
        super().__init__(name, KINDS[kind], calls=steps, rows=BATCH)
        self.kind, self.log_every, self.steps = kind, log_every, steps
        self.workspace, self.servers = workspace, servers
        self.cfg = run_config(log_every)
        self.calls_log = Calls()
        self.calls_log.train_thread = self.thread
        self.logger, self.run_id = make_logger(name, self.calls_log) if make_logger else (None, None)
        self.step_ms: list[list[float]] = []
        self.extras: list[dict] = []  # per turn: queue left, drain s, server CPU s

    def _sender_queue(self):
        sender = getattr(self.logger, "_sender", None)
        return None if sender is None else sender._queue

    def turn(self) -> tuple[float, float, float]:
        cpu0 = self.servers.cpu_s()
        out = super().turn()
        cpu1 = self.servers.cpu_s()
        q = self._sender_queue()
        left = q.qsize() if q is not None else 0
        t0 = time.perf_counter()
        if q is not None:
            q.join()  # the sends of this turn's steps finish before the next variant runs
        drain = time.perf_counter() - t0
        self.extras.append({"queued_at_turn_end": left, "drain_s": round(drain, 4),
                            "server_cpu_s_during_steps": round(cpu1 - cpu0, 3),
                            "server_cpu_s_during_drain": round(self.servers.cpu_s() - cpu1, 3),
                            "steps": self.calls})
        return out

    def work(self) -> None:
        dm = build_datamodule(self.cfg, self.workspace)
        model = build_model(self.cfg)
        trainer = build_trainer(self.cfg, self.logger, [BlockTurnTaker(self)], checkpoint_dir=None)
        trainer.fit(model, datamodule=dm)


def logger_factories(stores: dict[str, str]) -> dict:
    """kind -> make(name, calls) -> (logger, run_id), for every kind whose store is in ``stores``."""
    from mlflow.tracking import MlflowClient

    from studies.tracking import BufferedMLflowLogger, get_or_create_experiment

    def buffered(uri: str, background: bool):
        def make(name: str, calls: Calls):
            client = MlflowClient(tracking_uri=uri)
            exp = get_or_create_experiment(client, EXPERIMENT, None)
            run_id = client.create_run(exp, run_name=name).info.run_id
            calls.wrap(client, "log_batch", only_metrics=True)
            logger = BufferedMLflowLogger(client, run_id, background=background)
            for attr in ("log_metrics", "save", "flush"):
                calls.wrap(logger, attr)
            return logger, run_id
        return make

    def lightning_logger(uri: str):
        def make(name: str, calls: Calls):
            from lightning.pytorch.loggers import MLFlowLogger

            logger = MLFlowLogger(experiment_name=EXPERIMENT, tracking_uri=uri, run_name=name)
            calls.wrap(logger.experiment, "log_batch", only_metrics=True)  # creates the run
            for attr in ("log_metrics", "save"):
                calls.wrap(logger, attr)
            return logger, logger.run_id
        return make

    out = {"none": None}
    for kind, key, bg in (("sqlite", "sqlite", True), ("file", "file", True), ("server", "server", True),
                          ("slow_bg", "slow", True), ("slow_sync", "slow", False)):
        if key in stores:
            out[kind] = buffered(stores[key], bg)
    if "slow" in stores:
        out["lightning_slow"] = lightning_logger(stores["slow"])
    return out


# ---------------------------------------------------------------- report
def call_stats(v: LoggingVariant, start: tuple[Counter, Counter, Counter], steps: int) -> dict:
    """Per measured step: calls into the logger and seconds spent in them, by thread."""
    count, sec, cpu = (b - a for a, b in zip(start, v.calls_log.snapshot()))
    per = {f"{a} [{w}]": round(n / steps, 3) for (a, w), n in sorted(count.items())}
    blocked = sum(sec[(a, "train")] for a in ("log_metrics", "save"))
    batches = count[("log_batch", "train")] + count[("log_batch", "other")]
    sent = count[("metrics sent", "train")] + count[("metrics sent", "other")]
    return {"calls_per_step": per, "train_thread_ms_in_logger_per_step": 1e3 * blocked / steps,
            "log_batch_ms_mean": 1e3 * (sec[("log_batch", "train")] + sec[("log_batch", "other")]) / batches
            if batches else None,
            "log_batch_cpu_ms_per_step": 1e3 * (cpu[("log_batch", "train")] + cpu[("log_batch", "other")]) / steps,
            "metrics_per_log_batch": sent / batches if batches else None}


def report(variants: list[LoggingVariant], times, starts: dict, targets: dict, info: dict) -> dict:
    wall = {v.name: harness.per_round(times[v.name], False, 0) for v in variants}
    cpu = {v.name: harness.per_round(times[v.name], False, 1) for v in variants}
    others = {v.name: harness.per_round(times[v.name], False, 2) for v in variants}
    rows = {}
    print(f"\n{'variant':<18}{'ms/step':>9}{'best':>8}{'cpu ms':>8}{'others':>7}{'srv ms':>8}{'drain ms':>9}"
          f"{'in logger':>10}{'send cpu':>9}{'batches':>8}{'pts/batch':>10}  what")
    for v in variants:
        sec, best = statistics.median(wall[v.name]), min(wall[v.name])
        measured = v.extras[-len(times[v.name]):]
        steps = sum(e["steps"] for e in measured)
        stats = call_stats(v, starts[v.name], steps)
        server_ms = 1e3 * sum(e["server_cpu_s_during_steps"] for e in measured) / steps
        drain_ms = 1e3 * statistics.median(e["drain_s"] for e in measured)
        batches = sum(n for k, n in stats["calls_per_step"].items() if k.startswith("log_batch"))
        rows[v.name] = {"what": v.what, "kind": v.kind, "log_every": v.log_every, "steps_per_turn": v.steps,
                        "ms_per_step": 1e3 * sec, "best_ms": 1e3 * best,
                        "cpu_ms_per_step": 1e3 * statistics.median(cpu[v.name]),
                        "others_share": harness.median_others(times[v.name]),
                        "server_proxy_cpu_ms_per_step": server_ms, "drain_ms_median": drain_ms,
                        "log_batch_per_step": batches, **stats,
                        "per_round_ms": [1e3 * s for s in wall[v.name]],
                        "raw_turns_wall_ms_cpu_ms_others": harness.raw_turns(times[v.name], 1),
                        "raw_step_ms_per_turn": v.step_ms[-len(times[v.name]):], "turn_extras": measured}
        pts = stats["metrics_per_log_batch"]
        print(f"{v.name:<18}{1e3 * sec:>9.1f}{1e3 * best:>8.1f}{rows[v.name]['cpu_ms_per_step']:>8.1f}"
              f"{rows[v.name]['others_share']:>7.0%}{server_ms:>8.1f}{drain_ms:>9.0f}"
              f"{stats['train_thread_ms_in_logger_per_step']:>10.2f}{stats['log_batch_cpu_ms_per_step']:>9.2f}"
              f"{batches:>8.2f}"
              f"{'-' if pts is None else f'{pts:.1f}':>10}  {v.what}")
    print("  ms/step, best: median and fastest per-round mean step time; others: share of the machine other"
          "\n  processes used; srv ms: mlflow server + proxy CPU per step; drain ms: median untimed wait for"
          "\n  the sender queue after a turn; in logger: training-thread ms per step inside log_metrics + save;"
          "\n  send cpu: CPU ms per step of this process's threads inside log_batch (sender or training thread);"
          "\n  batches: metric log_batch requests per step; pts/batch: metrics per request")

    # Cost accounting, independent of other processes' load: what logging adds per step, in ms
    # and as a share of the same log_every group's no-logger step (median of its rounds).
    print(f"\n{'cost accounting':<18}{'blocked ms':>11}{'send cpu ms':>12}{'in-process':>11}{'srv cpu ms':>11}"
          f"{'+ local srv':>12}")
    for v in variants:
        ref = rows.get(f"none@{v.log_every}")
        if v.logger is None or ref is None:
            continue
        r = rows[v.name]
        blocked, send = r["train_thread_ms_in_logger_per_step"], r["log_batch_cpu_ms_per_step"]
        # Sync loggers send in the training thread: their send CPU is inside "blocked".
        own = blocked + (0.0 if v.kind in ("slow_sync", "lightning_slow") else send)
        srv = r["server_proxy_cpu_ms_per_step"] - ref["server_proxy_cpu_ms_per_step"]
        r["accounting"] = {"in_process_ms_per_step": own, "in_process_share": own / ref["ms_per_step"],
                           "local_server_ms_per_step": srv,
                           "with_local_server_share": (own + srv) / ref["ms_per_step"]}
        print(f"{v.name:<18}{blocked:>11.2f}{send:>12.2f}{own / ref['ms_per_step']:>11.1%}{srv:>11.1f}"
              f"{(own + srv) / ref['ms_per_step']:>12.1%}")
    print("  blocked: training-thread ms per step in log_metrics + save; send cpu: CPU ms per step in"
          "\n  log_batch (the sender thread's, or the training thread's for the sync loggers); in-process:"
          "\n  blocked + the sender's CPU, over the no-logger step time; srv cpu: mlflow server + proxy CPU per"
          "\n  step beyond the no-logger variant's (a remote server's would not compete for these 2 cores)")

    out, missed = {}, []
    print(f"\n{'ratio: step time (overhead)':<28}{'median':>8}{'overhead':>9}{'range':>14}{'best/best':>10}"
          f"{'cpu':>7}{'quiet (n)':>12}  target")
    for label, num, den, kind, bound in harness.ratio_rows(targets, info):
        if num not in wall or den not in wall:
            continue
        r = harness.paired(wall, num, den, others)
        r.update(num=num, den=den, cpu_time_median=harness.paired(cpu, num, den)["median"],
                 overhead=r["median"] - 1)
        line = (f"{label:<28}{r['median']:>8.3f}{r['median'] - 1:>+9.1%}{r['min']:>7.3f}-{r['max']:<6.3f}"
                f"{r['best_vs_best']:>10.3f}{r['cpu_time_median']:>7.3f}{harness.quiet_cell(r):>12}")
        line += harness.judge(r, kind, bound)
        if kind is not None and not r["met"]:
            missed.append(label)
        out[label] = r
        print(line)
    return {"variants": rows, "ratios": out, "missed": missed}


def check_stored(variants: list[LoggingVariant], uris: dict[str, str]) -> dict:
    """After the fits: the number of train/loss points stored in each run against the number
    of log_metrics calls that carried one (nothing lost in a buffer or queue)."""
    from mlflow.tracking import MlflowClient

    out = {}
    for v in variants:
        if v.logger is None:
            continue
        uri = uris[v.kind]
        stored = len(MlflowClient(tracking_uri=uri).get_metric_history(v.run_id, "train/loss"))
        logged = sum(n for (a, w), n in v.calls_log.count.items() if a == "train/loss logged")
        out[v.name] = {"train/loss points stored": stored, "train/loss points logged": logged}
    bad = {k: x for k, x in out.items() if x["train/loss points stored"] != x["train/loss points logged"]}
    counts = ", ".join(f"{k} {x['train/loss points stored']}" for k, x in out.items())
    print(f"\nstored points check: {'ok' if not bad else f'MISSING POINTS {bad}'} ({counts})")
    return out


# ---------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds of 3-step turns, log_every 1 and 10: a smoke run")
    p.add_argument("--rounds", type=int, help="measured rounds (default 4, quick 2)")
    p.add_argument("--steps-per-turn", type=int, help="steps per turn at log_every 1 (default 5, quick 3); "
                   "at log_every 10 a turn is 10 steps")
    p.add_argument("--log-every", default="1,10", help="trainer.log_every values to run (default 1,10)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"the logger kinds to run (default all: {','.join(KINDS)}; 'none' and 'sqlite' are the references)")
    p.add_argument("--latency-ms", type=float, default=200.0, help="delay the slow proxy adds to every request")
    p.add_argument("--data-dir", type=Path,
                   default=Path(os.environ.get("MASKLAB_DATA_DIR") or REPO.parent / "shared" / "data"))
    p.add_argument("--keep", action="store_true", help="keep the temporary MLflow stores (path printed)")
    harness.add_output_args(p, "step")
    a = p.parse_args(argv)
    a.rounds = a.rounds or (2 if a.quick else 4)
    a.steps_per_turn = a.steps_per_turn or (3 if a.quick else 5)
    a.log_everys = [int(x) for x in a.log_every.split(",") if x.strip()]
    if any(e not in KINDS_AT for e in a.log_everys):
        raise SystemExit(f"--log-every: allowed values {sorted(KINDS_AT)}")
    a.kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    if any(k not in KINDS for k in a.kinds):
        raise SystemExit(f"--kinds: allowed values {', '.join(KINDS)}")
    return a


def environment(args) -> dict:
    import mlflow

    return {**harness.machine(), "lightning": L.__version__, "mlflow": mlflow.__version__,
            "shape": {"depth": DEPTH, "width": WIDTH, "heads": HEADS, "seq": T, "batch": BATCH, "p_bw": P_BW,
                      "data": "wikitext-2, bpe 512"},
            "rounds": args.rounds, "steps_per_turn": args.steps_per_turn, "latency_ms": args.latency_ms,
            "log_every": args.log_everys, "kinds": args.kinds, **harness.invocation()}


def make_stores(tmp: Path, stack: contextlib.ExitStack, args, servers: Servers, env: dict) -> dict[str, str]:
    """The tracking URIs: local sqlite and file stores, the mlflow server, the slow proxy."""
    from mlflow.tracking import MlflowClient

    from studies.tracking import get_or_create_experiment
    from tests.servers import mlflow_server

    stores = {"sqlite": f"sqlite:///{tmp / 'local.db'}"}
    try:
        client = MlflowClient(tracking_uri=(tmp / "mlruns").as_uri())
        client.create_experiment("probe")
        stores["file"] = (tmp / "mlruns").as_uri()
    except Exception as e:  # noqa: BLE001 - reported; the other variants still run
        env["file_store_refused"] = f"{type(e).__name__}: {e}"
        print(f"file store left out: {env['file_store_refused']}")
    t0 = time.perf_counter()
    server = stack.enter_context(mlflow_server(f"sqlite:///{tmp / 'server.db'}", tmp / "server-artifacts"))
    pid = _pid_listening(urllib.parse.urlsplit(server).port)
    if pid is not None:
        servers.sids.append(os.getsid(pid))
    stores["server"] = server
    stores["slow"] = stack.enter_context(slow_proxy(server, args.latency_ms / 1e3, servers))
    env["server_start_s"] = time.perf_counter() - t0
    # One 4-metric log_batch, outside training: what one request costs on each path.
    probe = MlflowClient(tracking_uri=server)
    run_id = probe.create_run(get_or_create_experiment(probe, "probe", None)).info.run_id
    env["log_batch_round_trip_ms"] = {"server": round_trip_ms(server, run_id),
                                      "slow": round_trip_ms(stores["slow"], run_id)}
    local = MlflowClient(tracking_uri=stores["sqlite"])
    local_run = local.create_run(get_or_create_experiment(local, "probe", None)).info.run_id
    env["log_batch_round_trip_ms"]["sqlite"] = round_trip_ms(stores["sqlite"], local_run)
    print(f"mlflow server {server} (started in {env['server_start_s']:.0f} s), slow proxy {stores['slow']}; "
          f"one 4-metric log_batch: " + ", ".join(f"{k} {v:.1f} ms" for k, v in env["log_batch_round_trip_ms"].items()),
          flush=True)
    return stores


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    harness.quiet_lightning()
    import logging

    for name in ("mlflow", "alembic", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    start = time.perf_counter()
    env = environment(args)
    print(f"bench_logging: {env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}, "
          f"lightning {env['lightning']}, mlflow {env['mlflow']}, load {env['load_avg_start'][0]:.2f}")
    print(f"shape {env['shape']}; {args.rounds} rounds, turns of {args.steps_per_turn} steps (10 at log_every 10), "
          f"slow proxy +{args.latency_ms:.0f} ms per request", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="masklab-bench-logging-"))
    workspace = Workspace(tmp / "workspace", args.data_dir.resolve())
    servers, variants, result = Servers(), [], None
    with contextlib.ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        else:
            print(f"stores kept in {tmp}")
        try:
            stores = make_stores(tmp, stack, args, servers, env)
            uris = {"sqlite": stores["sqlite"], "file": stores.get("file"), "server": stores["server"],
                    # read back the slow runs directly from the server, not through the proxy
                    "slow_bg": stores["server"], "slow_sync": stores["server"], "lightning_slow": stores["server"]}
            factories = logger_factories(stores)
            build_datamodule(run_config(1), workspace)  # trains and caches the tokenizer once
            groups = []
            for e in args.log_everys:
                steps = args.steps_per_turn if e == 1 else max(e, e * round(args.steps_per_turn / e))
                group = []
                for kind in KINDS_AT[e]:
                    if kind not in factories or kind not in args.kinds:
                        continue
                    variants.append(LoggingVariant(f"{kind}@{e}", kind, e, steps, factories[kind], workspace, servers))
                    group.append(f"{kind}@{e}")
                groups.append(tuple(group))
            by_name = {v.name: v for v in variants}
            t0 = time.perf_counter()
            for v in variants:  # each fit runs its first (setup) step here
                v.start()
            print(f"{len(variants)} fits started in {time.perf_counter() - t0:.0f} s", flush=True)
            for v in variants:
                v.calls = WARM_STEPS
            harness.measure(by_name, groups, 1, 1, label=f"warm-up round, {WARM_STEPS} steps each (not measured)")
            for v in variants:
                v.calls = v.steps
            starts = {v.name: v.calls_log.snapshot() for v in variants}
            times, loads = harness.measure(by_name, groups, args.rounds, 1)
            assert torch.get_num_threads() == args.threads, "something changed the thread count"
            targets, info = ratio_specs(args.log_everys)
            result = report(variants, times, starts, targets, info)
            result["load_avg_per_round"] = loads
            if args.profile:
                missed = [n for label in result["missed"] for n in targets[label][:2]]
                result["profiles"] = harness.profile(by_name, harness.profile_names(args.profile, missed, by_name),
                                                     "one turn, {ms:.0f} ms per step", "step_ms_under_profiler",
                                                     all_threads=True)
        finally:
            with contextlib.redirect_stdout(io.StringIO()):  # mlflow prints "View run ..." links
                harness.close_all(variants)  # stops the fits (their loggers' finalize flushes and waits)
            closing = threading.Thread(target=lambda: [v.logger.close() for v in variants
                                                       if hasattr(v.logger, "close")], daemon=True)
            closing.start()
            closing.join(timeout=120)
        result["stored"] = check_stored(variants, uris)
    return harness.finish(args, env, result, start)


if __name__ == "__main__":
    raise SystemExit(main())
