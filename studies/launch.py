"""Many workers on one study: local worker processes (``masklab launch``) and SLURM
array scripts (``masklab slurm``).

A worker is ``masklab worker SPEC``: it joins the study and claims trials until none are
left (``runner.run_study``). ``launch`` starts N of them on this machine, each pinned to
one GPU (``CUDA_VISIBLE_DEVICES``) or, without GPUs, to an equal share of the CPU
threads, with its output in its own log file, and prints one combined progress line.
``slurm`` writes an sbatch array script whose every task is one worker.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lit_modules.config_errors import ConfigError
from stores.urls import has_secret, is_sqlite, redact

PROGRESS_SECONDS = 2.0


@dataclass
class WorkerProcess:
    index: int
    proc: subprocess.Popen
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # what pins it (devices, threads)

    @property
    def label(self) -> str:
        pin = ", ".join(f"{k}={v}" for k, v in self.env.items())
        return f"worker {self.index} (pid {self.proc.pid}{', ' + pin if pin else ''})"


def parse_devices(text: str | None) -> list[str] | None:
    """``"0,1,3"`` -> ["0", "1", "3"]; None when not given."""
    if text is None:
        return None
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices or not all(d.isdigit() for d in devices):
        raise ConfigError("--devices", text, "a comma-separated list of GPU indices, e.g. 0,1,2,3")
    return devices


def worker_env(index: int, workers: int, devices: list[str] | None, cpus: int) -> dict[str, str]:
    """What pins worker ``index``: one GPU (round-robin over ``devices``) and its share
    of the cores for DataLoader workers (``MASKLAB_CORES``, read by ``data.num_workers:
    auto``), or else ``cpus // workers`` CPU threads."""
    if devices:
        return {"CUDA_VISIBLE_DEVICES": devices[index % len(devices)], "MASKLAB_CORES": str(max(1, cpus // workers))}
    threads = str(max(1, cpus // workers))
    return {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def start_workers(worker_args: list[str], workers: int, devices: list[str] | None, log_dir: Path,
                  cpus: int | None = None, env: dict[str, str] | None = None) -> list[WorkerProcess]:
    """Start ``workers`` processes of ``masklab worker <worker_args>``, logs in ``log_dir``.
    ``env``: more of their environment; the stores go there (``MASKLAB_STORAGE``,
    ``MASKLAB_TRACKING_URI``), not on their command line, which any user can read (``ps``)."""
    if workers < 1:
        raise ConfigError("--workers", workers, "must be an integer >= 1")
    log_dir.mkdir(parents=True, exist_ok=True)
    cpus = cpus or os.cpu_count() or 1
    started = []
    for i in range(workers):
        pin = worker_env(i, workers, devices, cpus)
        log = log_dir / f"worker-{i}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "studies.cli", "worker", *worker_args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {}), **pin, "MASKLAB_WORKER": str(i), "PYTHONUNBUFFERED": "1"},
            )
        started.append(WorkerProcess(i, proc, log, pin))
    return started


class ProgressLine:
    """``study: 5 complete, 2 running, 1 waiting, 0 pruned, 0 fail | 2/2 workers running``,
    read from the storage (opened once it exists: the first worker creates it)."""

    def __init__(self, name: str, storage_url: str, workers: list[WorkerProcess]):
        self.name, self.storage_url, self.workers = name, storage_url, workers
        self._study = None

    def __call__(self) -> str:
        import optuna

        counts: dict[str, int] = {}
        try:
            if self._study is None:
                from stores.storage import open_storage

                optuna.logging.set_verbosity(optuna.logging.WARNING)
                self._study = optuna.load_study(study_name=self.name, storage=open_storage(self.storage_url))
            for t in self._study.get_trials(deepcopy=False):
                counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        except Exception:  # noqa: BLE001 - not created yet, or a store busy for a moment
            pass
        alive = sum(w.proc.poll() is None for w in self.workers)
        states = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("complete", "running", "waiting", "pruned", "fail"))
        return f"{self.name}: {states} | {alive}/{len(self.workers)} workers running"


def supervise(workers: list[WorkerProcess], line, out=sys.stderr) -> list[int]:
    """Print the combined progress line until every worker exits; Ctrl-C is passed on
    to the workers (each marks its trial FAIL and exits). Returns the exit codes."""
    tty = out.isatty()
    last = ""
    try:
        while any(w.proc.poll() is None for w in workers):
            text = line()
            if tty:
                out.write("\r\033[K" + text)
                out.flush()
            elif text != last:
                print(f"[{datetime.now():%H:%M:%S}] {text}", file=out, flush=True)
            last = text
            time.sleep(PROGRESS_SECONDS)
    except KeyboardInterrupt:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGINT)
        for w in workers:
            w.proc.wait()
        raise
    finally:
        if tty:
            out.write("\n")
    final = line()
    print(final if tty else f"[{datetime.now():%H:%M:%S}] {final}", file=out, flush=True)
    return [w.proc.wait() for w in workers]


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------- SLURM


@dataclass
class SlurmOptions:
    array: int
    gpus_per_task: int = 1
    cpus_per_task: int = 8
    mem: str = "64G"
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    setup: list[str] = field(default_factory=list)  # shell lines run before the worker
    log_dir: str = "slurm-logs"

    def check(self) -> None:
        if self.array < 1:
            raise ConfigError("--array", self.array, "must be an integer >= 1 (the number of workers)")
        if self.gpus_per_task < 0:
            raise ConfigError("--gpus-per-task", self.gpus_per_task, "must be an integer >= 0")
        if self.cpus_per_task < 1:
            raise ConfigError("--cpus-per-task", self.cpus_per_task, "must be an integer >= 1")


def check_shared_store(flag: str, url: str | None, env: str) -> None:
    """Workers on several machines need a server-backed store; a sqlite file on a shared
    filesystem locks badly (and an embedded file is not reachable from other nodes). A
    URL with a password is not written into a script: it comes from the environment."""
    if url and has_secret(url):
        raise ConfigError(flag, redact(url), f"a password would be written into the script; export {env} instead "
                                             f"(sbatch passes it on) and leave {flag} out")
    if url and is_sqlite(url):
        raise ConfigError(flag, url, "workers on a cluster need a server: postgresql://... for Optuna, "
                                     "http://... (mlflow server) for MLflow")


def sbatch_script(study: str, worker_args: list[str], opts: SlurmOptions, workdir: Path,
                  storage: str | None, tracking_uri: str | None, command: str) -> str:
    """An sbatch array script: task i of ``opts.array`` runs one ``masklab worker``.

    The stores come from ``MASKLAB_STORAGE`` / ``MASKLAB_TRACKING_URI`` in the
    submitting environment (sbatch passes it on; keeps passwords out of the file and off
    the workers' command lines), with the URLs given to ``masklab slurm`` as defaults: a
    URL with a password is refused there.
    """
    opts.check()
    check_shared_store("--storage", storage, "MASKLAB_STORAGE")
    check_shared_store("--tracking-uri", tracking_uri, "MASKLAB_TRACKING_URI")
    q = shlex.quote
    directives = [
        f"--job-name=masklab-{study}",
        f"--array=0-{opts.array - 1}",
        "--ntasks=1",
        f"--cpus-per-task={opts.cpus_per_task}",
        f"--mem={opts.mem}",
        f"--time={opts.time}",
        f"--output={opts.log_dir}/%x-%A_%a.out",
    ]
    if opts.gpus_per_task:
        directives.insert(3, f"--gpus-per-task={opts.gpus_per_task}")
    if opts.partition:
        directives.append(f"--partition={opts.partition}")
    if opts.account:
        directives.append(f"--account={opts.account}")

    def default(url: str | None) -> str:
        return f":-{url}" if url else ""

    masklab = Path(sys.executable).parent / "masklab"
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {d}" for d in directives),
        "#",
        f"# Written by: {command}",
        f"# Submit with: sbatch {{this file}}   ({opts.array} workers, one per array task; all share study {study})",
        "set -euo pipefail",
        f"cd {q(str(workdir))}",
        f"mkdir -p {q(opts.log_dir)}",
        *opts.setup,
        f'export MASKLAB_STORAGE="${{MASKLAB_STORAGE{default(storage)}}}"',
        f'export MASKLAB_TRACKING_URI="${{MASKLAB_TRACKING_URI{default(tracking_uri)}}}"',
        ': "${MASKLAB_STORAGE:?set MASKLAB_STORAGE to the Optuna storage URL (postgresql://user:pass@host/db)}"',
        ': "${MASKLAB_TRACKING_URI:?set MASKLAB_TRACKING_URI to the MLflow server URL (http://host:5000)}"',
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        'export MASKLAB_WORKER="${SLURM_ARRAY_TASK_ID:-0}"',
        "# Each task is one worker: it joins the study and claims trials until none are left.",
        "# It reads the stores from MASKLAB_STORAGE and MASKLAB_TRACKING_URI (not its command line: ps shows that).",
        f'exec {q(str(masklab))} worker {" ".join(q(a) for a in worker_args)}',
    ]
    return "\n".join(lines) + "\n"
