"""The measurement harness shared by the benchmark scripts (bench_gpt, bench_bert, bench_mae,
bench_video): /proc/stat clocks, turn taking between worker threads, round-robin interleaved
rounds, per-round figures, paired ratio statistics, profiling, argument and environment helpers.

The scripts run as ``python benchmarks/bench_X.py``, which puts this folder on sys.path, so
they import it as ``from harness import ...``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import lightning as L
import torch

# A round counts as quiet for a ratio when other processes used under this share of the
# machine during both sides' steps (10%: a background process's occasional work).
QUIET = 0.10


# ---------------------------------------------------------------- clocks
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_s() -> float:
    """CPU seconds all processes on this machine have been busy (Linux /proc/stat), or nan."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _TICK


def snapshot() -> tuple[float, float, float]:
    return time.perf_counter(), time.process_time(), machine_busy_s()


def elapsed(start: tuple[float, float, float]) -> tuple[float, float, float]:
    """(wall s, this process's CPU s, share of the machine other processes used meanwhile)."""
    wall, cpu, busy = (b - a for a, b in zip(start, snapshot()))
    others = max(0.0, busy - cpu) / (wall * (os.cpu_count() or 1))
    return wall, cpu, min(1.0, others)


# ---------------------------------------------------------------- turn taking
class Baton:
    """Hands the turn between the main thread and one variant's worker thread."""

    def __init__(self):
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self.stopping = False
        self.seconds: tuple[float, float, float] | None = None  # elapsed() of the last step
        self.error: BaseException | None = None

    # main-thread side
    def turn(self) -> tuple[float, float, float]:
        self.seconds = None
        self._go.release()
        self._back.acquire()
        if self.error is not None:
            raise RuntimeError("a benchmark variant failed") from self.error
        return self.seconds

    def stop(self) -> None:
        self.stopping = True
        self._go.release()

    def wait_ready(self) -> None:
        self._back.acquire()
        if self.error is not None:
            raise RuntimeError("a benchmark variant failed to start") from self.error

    # worker side
    def hand_back(self) -> None:
        self._back.release()

    def wait_turn(self) -> bool:
        """Block until the next turn; False when the benchmark is over."""
        self._go.acquire()
        return not self.stopping


class Variant:
    """One measured configuration, run in its own thread, one step per ``turn()``.

    ``calls``: how many calls one turn makes (the figures are per call); ``rows``: the
    rows (sequences) one call processes, for the throughput columns."""

    def __init__(self, name: str, what: str, calls: int = 1, rows: int | None = None):
        self.name, self.what, self.calls, self.rows = name, what, calls, rows
        self.baton = Baton()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.baton.wait_ready()

    def turn(self) -> tuple[float, float, float]:
        """One turn: (wall s, process CPU s, others' share), wall and CPU per call."""
        wall, cpu, others = self.baton.turn()
        return wall / self.calls, cpu / self.calls, others

    def close(self) -> None:
        self.baton.stop()
        self.thread.join(timeout=60)

    def _main(self) -> None:
        try:
            self.work()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, re-raised there
            self.baton.error = e
            self.baton.hand_back()

    def work(self) -> None:
        raise NotImplementedError


class LoopVariant(Variant):
    """A hand-written step function, timed around ``calls`` calls."""

    def __init__(self, name: str, what: str, step, calls: int = 1, rows: int | None = None):
        super().__init__(name, what, calls, rows)
        self.step = step

    def work(self) -> None:
        self.baton.hand_back()  # ready
        while self.baton.wait_turn():
            start = snapshot()
            for _ in range(self.calls):
                self.step()
            self.baton.seconds = elapsed(start)
            self.baton.hand_back()


class TurnTaker(L.Callback):
    """Pauses a Lightning fit after every step until its next turn and times the step
    from the handover to the next ``on_train_batch_end``."""

    def __init__(self, baton: Baton):
        self.baton, self.start = baton, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.baton.seconds = elapsed(self.start)
        self.baton.hand_back()  # the first time: ready (the fit's first step is never timed)
        if not self.baton.wait_turn():
            trainer.should_stop = True
            return
        self.start = snapshot()


def close_all(variants) -> None:
    """Stop the worker threads still alive."""
    for v in variants:
        if v.thread.is_alive():
            v.close()


# ---------------------------------------------------------------- measurement
def measure(by_name: dict, groups, rounds: int, steps: int, micro_reps: int = 0,
            is_micro=lambda group: False, label: str = "round"):
    """Round-robin over the groups: ``steps`` turns per variant per round (``micro_reps``
    for the groups ``is_micro`` picks), the order inside a group rotating from round to
    round. Returns ({variant: [[elapsed() of each turn of round 0], ...]}, the 1-minute load
    average after each round)."""
    times = {name: [] for name in by_name}
    loads = []
    for r in range(rounds):
        t0 = time.perf_counter()
        for group in groups:
            k = r % len(group)
            order = group[k:] + group[:k]  # rotate who goes first
            reps = micro_reps if is_micro(group) else steps
            got = {name: [] for name in group}
            for _ in range(reps):  # A B C A B C ...: neighbours in time
                for name in order:
                    got[name].append(by_name[name].turn())
            for name in group:
                times[name].append(got[name])
        loads.append(os.getloadavg()[0])
        print(f"  {label} {r + 1}/{rounds}: {time.perf_counter() - t0:.0f} s, load {loads[-1]:.2f}", flush=True)
    return times, loads


def per_round(turns_by_round: list[list[tuple]], micro: bool, clock: int) -> list[float]:
    """One figure per round (clock 0 = wall, 1 = process CPU, 2 = others' share): the mean
    of a round's steps, the median of its calls for microbenchmarks (many, and short)."""
    reduce = statistics.median if micro else statistics.fmean
    return [reduce([s[clock] for s in turns]) for turns in turns_by_round]


def paired(by_round: dict[str, list[float]], num: str, den: str, others=None) -> dict:
    """time(num) / time(den) per round, its median and range, the ratio of the best rounds,
    and (given each round's share used by other processes) the median over quiet rounds."""
    vals = [a / b for a, b in zip(by_round[num], by_round[den])]
    out = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "per_round": vals,
           "best_vs_best": min(by_round[num]) / min(by_round[den])}
    if others is not None:
        quiet = [v for v, a, b in zip(vals, others[num], others[den]) if max(a, b) < QUIET]
        out.update(quiet_rounds=len(quiet), quiet_median=statistics.median(quiet) if quiet else None)
    return out


def median_others(turns_by_round: list[list[tuple]]) -> float:
    """The median share of the machine other processes used over all of a variant's turns."""
    return statistics.median(s[2] for turns in turns_by_round for s in turns)


def raw_turns(turns_by_round: list[list[tuple]], digits: int = 1) -> list:
    """The raw turns as [[wall ms, cpu ms, others' share], ...] per round, rounded."""
    return [[[round(1e3 * w, digits), round(1e3 * c, digits), round(o, 3)] for w, c, o in turns]
            for turns in turns_by_round]


def ratio_rows(targets: dict, info: dict) -> list[tuple]:
    """(label, num, den, kind, bound) for the targets, then (label, num, den, None, None)."""
    return [*((k, *v) for k, v in targets.items()), *((k, *v, None, None) for k, v in info.items())]


def quiet_cell(r: dict, fmt: str = ".3f") -> str:
    return f"{r['quiet_median']:{fmt}} ({r['quiet_rounds']})" if r["quiet_rounds"] else "- (0)"


def judge(r: dict, kind: str | None, bound: float | None) -> str:
    """Record the target (and whether it is met) in the ratio ``r``; the line's tail."""
    if kind is None:
        r["target"] = None
        return "  (info)"
    r["target"] = f"{kind} {bound}"
    r["met"] = r["median"] >= bound if kind == ">=" else r["median"] <= bound
    return f"  {kind} {bound}: {'met' if r['met'] else 'MISSED'}"


# ---------------------------------------------------------------- profiling
def profile_table(prof, rows: int = 15, ms_digits: int = 1) -> tuple[str, list[dict]]:
    """Top ops by self CPU time: the printable table and a JSON-able list."""
    avg = prof.key_averages()
    table = avg.table(sort_by="self_cpu_time_total", row_limit=rows)
    total = sum(e.self_cpu_time_total for e in avg) or 1.0
    top = sorted(avg, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return table, [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, ms_digits),
                    "self_cpu_pct": round(100 * e.self_cpu_time_total / total, 1)} for e in top]


def profile(by_name: dict, names: list[str], note: str, key: str, warm: bool = False,
            all_threads: bool = False, ms_digits: int = 1) -> dict:
    """One turn of each named variant under torch.profiler (CPU; all threads when the turn
    runs in a worker thread), after one unprofiled turn if ``warm``: top ops by self CPU
    time. ``note`` (formatted with ``ms``) heads the printed table, ``key`` names the ms."""
    from torch.profiler import ProfilerActivity, _ExperimentalConfig
    from torch.profiler import profile as torch_profile

    kwargs = {"experimental_config": _ExperimentalConfig(profile_all_threads=True)} if all_threads else {}
    out = {}
    for name in names:
        if warm:
            by_name[name].turn()
        with torch_profile(activities=[ProfilerActivity.CPU], **kwargs) as prof:
            ms = 1e3 * by_name[name].turn()[0]
        table, top = profile_table(prof, ms_digits=ms_digits)
        print(f"\n=== profile: {name} ({note.format(ms=ms)} under the profiler) ===\n{table}")
        out[name] = {key: ms, "top_ops_by_self_cpu": top}
    return out


def profile_names(arg: str, missed: list[str], known) -> list[str]:
    """The variants --profile names: those behind the missed targets ('missed') or a list."""
    names = missed if arg == "missed" else [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--profile: unknown variant {unknown[0]!r}; allowed: missed, {', '.join(known)}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------- arguments, environment, output
def add_output_args(p: argparse.ArgumentParser, unit: str = "step", profile_extra: str = "") -> None:
    """--threads, --json and --profile (``unit``: what one turn is called, step or call)."""
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--json", type=Path, help=f"write all figures, ratios and raw {unit} times here")
    p.add_argument("--profile", nargs="?", const="missed", default=None,
                   help=f"after timing, profile one {unit} of the variants behind each missed target "
                        f"('missed', the default) or of a comma-separated list of variants{profile_extra}")


def quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for msg in (".*does not have many workers.*", ".*validation_step.*", ".*val_dataloader.*",
                ".*treespec.*"):
        warnings.filterwarnings("ignore", message=msg)


def machine() -> dict:
    """The head of the environment record: date, CPU, cores, threads, Python and torch."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
              if ln.startswith("model name")] if cpuinfo.exists() else []
    return {"date": datetime.date.today().isoformat(), "cpu": models[0] if models else platform.processor(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}


def invocation() -> dict:
    """The tail of the environment record: the command, the load and the allocator/OpenMP env."""
    return {"command": " ".join(["python", *sys.argv]), "load_avg_start": os.getloadavg(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_", "MKL_", "KMP_"))}}


def finish(args, env: dict, result: dict, start: float) -> int:
    """Record the wall time and load, print the total and write --json."""
    env["wall_s"] = time.perf_counter() - start
    env["load_avg_end"] = os.getloadavg()
    print(f"\ntotal {env['wall_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, **result}, indent=2))
        print(f"wrote {args.json}")
    return 0
