"""The measurement harness shared by the benchmark scripts (bench_gpt, bench_bert, bench_mae,
bench_video, bench_ablation): /proc/stat clocks, turn taking between worker threads,
round-robin interleaved rounds, per-round figures, paired ratio statistics, the settings
both sides of a comparison share (device, precision, attention kernel, AdamW
implementation), FLOP counting, profiling, argument and environment helpers.

The scripts run as ``python benchmarks/bench_X.py``, which puts this folder on sys.path, so
they import it as ``from harness import ...``.
"""

from __future__ import annotations

import argparse
import contextlib
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


def sync() -> None:
    """Wait for queued CUDA work, where a CUDA device is in use (a no-op on CPU), so that a
    step's time is the step's and not the next one's."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def snapshot() -> tuple[float, float, float]:
    sync()
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
        if self.start is not None:  # elapsed() waits for the step's CUDA work first
            self.baton.seconds = elapsed(self.start)
        self.baton.hand_back()  # the first time: ready (the fit's first step is never timed)
        if not self.baton.wait_turn():
            trainer.should_stop = True
            return
        self.start = snapshot()


def start_all(variants: list) -> tuple[list, dict[str, str]]:
    """Start every variant (the Lightning fits run their first, untimed step here). A
    variant that fails to start is left out and reported, so the others are still
    measured: (the started variants, {name: the error})."""
    started, failed = [], {}
    for v in variants:
        try:
            v.start()
        except RuntimeError as e:
            cause = e.__cause__ or e
            failed[v.name] = f"{type(cause).__name__}: {cause}"
            print(f"variant {v.name} failed to start, left out: {failed[v.name]}", flush=True)
            continue
        started.append(v)
    return started, failed


def probe_all(variants: list, probe) -> tuple[list, dict[str, str]]:
    """``probe(v)`` for every variant (e.g. its first loss); one that raises is left out and
    reported, so the others are still measured: (the kept variants, {name: the error})."""
    kept, failed = [], {}
    for v in variants:
        try:
            probe(v)
        except Exception as e:  # noqa: BLE001 - reported and re-raised as the run's exit status
            failed[v.name] = f"{type(e).__name__}: {e}"
            print(f"variant {v.name} failed, left out: {failed[v.name]}", flush=True)
            continue
        kept.append(v)
    return kept, failed


def report_failures(failed: dict[str, str]) -> int:
    """Repeat the variants' failures at the end of the run; 1 if there were any, else 0."""
    for name, error in failed.items():
        print(f"FAILED: {name}: {error}")
    return 1 if failed else 0


def not_measured(label: str, num: str, den: str, kind: str | None, bound: float | None, width: int) -> dict:
    """The ratio entry (and printed line) of a comparison one of whose sides did not start."""
    target = None if kind is None else f"{kind} {bound}"
    print(f"{label:<{width}}  not measured: {num} or {den} was not run (left out, or failed to start)"
          + (f"  (target {target})" if target else ""))
    return {"num": num, "den": den, "target": target, "measured": False}


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


# ---------------------------------------------------------------- settings both sides share
PRECISIONS = ("32-true", "bf16-mixed")
# --sdpa-kernel: the torch.nn.attention.SDPBackend each name enables (None: PyTorch picks per call).
SDPA_KERNELS = {"default": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device, --precision and --sdpa-kernel: one setting for every variant of a run."""
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every variant runs (default cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="32-true",
                   help="32-true (default), or bf16-mixed: every forward and loss under bfloat16 autocast "
                        "(Lightning fits: the Trainer's bf16-mixed)")
    p.add_argument("--sdpa-kernel", choices=tuple(SDPA_KERNELS), default="default",
                   help="allow F.scaled_dot_product_attention only this kernel, in every variant "
                        "(default: PyTorch's choice per call; flash takes no attention mask)")


def check_device(args) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(args.device)


def autocast(args):
    """The forward + loss context of a plain loop: bfloat16 autocast for bf16-mixed."""
    if args.precision == "bf16-mixed":
        return torch.autocast(args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sdpa_kernel(args):
    """The whole run's attention-kernel restriction (PyTorch's flags are process-wide, so
    it holds in the worker threads too)."""
    name = SDPA_KERNELS[args.sdpa_kernel]
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel as restrict

    return restrict(getattr(SDPBackend, name))


def trainer_settings(args) -> dict:
    """The run config's trainer keys for a Lightning fit on ``args``' device and precision."""
    return {"accelerator": args.device, "precision": args.precision}


def settings(args) -> dict:
    """The environment record's device part."""
    out = {"device": args.device, "precision": args.precision, "sdpa_kernel": args.sdpa_kernel}
    if args.device == "cuda":
        out["device_name"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    return out


def adamw_impl(opt: torch.optim.Optimizer) -> str:
    d = opt.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"


def module_adamw_impl(lit) -> str:
    """The AdamW implementation a LightningModule's ``configure_optimizers`` picks."""
    return adamw_impl(lit.configure_optimizers()["optimizer"])


def adamw(module: torch.nn.Module, optim, max_steps: int, impl: str):
    """AdamW + LR schedule as ``MaskedModelBase.configure_optimizers`` builds them (decay on
    matrices and embeddings only, warm-up + cosine), over the trainable parameters, with
    the implementation ``impl`` (fused / foreach / for-loop) named explicitly, so every
    side of a comparison runs the same optimizer code."""
    from lit_modules.base import lr_factor

    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, max_steps, optim))
    return opt, sched


def same_impl(impls: dict[str, str]) -> str:
    """The one AdamW implementation of a comparison's variants; an error if they differ."""
    if len(set(impls.values())) != 1:
        raise RuntimeError(f"AdamW implementations differ within a comparison: {impls}")
    return next(iter(impls.values()))


def sdpa_calls(fn) -> str:
    """What ``fn()`` hands F.scaled_dot_product_attention, counted: mask or not, is_causal,
    dropout_p (the check that both sides of a comparison run the same attention)."""
    from collections import Counter

    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    seen = Counter()

    def arg(args, kwargs, name, i, default):
        return kwargs[name] if name in kwargs else args[i] if len(args) > i else default

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                mask = arg(args, kwargs, "attn_mask", 3, None)
                seen[("mask" if mask is not None else "no mask",
                      f"is_causal={bool(arg(args, kwargs, 'is_causal', 5, False))}",
                      f"dropout {float(arg(args, kwargs, 'dropout_p', 4, 0.0)):g}")] += 1
            return func(*args, **kwargs)

    with Spy():
        fn()
    return "; ".join(f"{n} x ({', '.join(k)})" for k, n in seen.items()) or "no SDPA call"


# ---------------------------------------------------------------- FLOPs
# The CPU flash-attention kernels have no formula in torch.utils.flop_counter: count them as
# the CUDA kernels are counted (the counter hands these functions shapes, not tensors).
def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    from torch.utils import flop_counter

    return flop_counter.sdpa_flop_count(q, k, v)


def _sdpa_cpu_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    from torch.utils import flop_counter

    return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)


SDPA_CPU_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}


def flop_counter_mode():
    """A FlopCounterMode that also counts the CPU flash-attention kernels (matmuls,
    convolutions and attention; elementwise ops, norms and optimizers are not counted)."""
    from torch.utils import flop_counter

    return flop_counter.FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS)


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
