"""Sparse attention patterns: time and peak memory of a training step against sequence
length, each kind beside full attention, and the fitted exponent of cost in T.

The model is masklab's own blocks (``lit_modules.blocks.make_blocks``: the block every
token family trains), depth 2, width 128, 4 heads, dropout 0, one sequence of T random
inputs (B = 1), loss = mean square of the output, backward, one AdamW step (the same
torch implementation, foreach, on every side). Only the ``attention:`` section differs:

  full            bidirectional, SDPA without a mask (the fused kernel)
  sliding         |q - k| <= window                          block-sparse kernel
  longformer      sliding + 1 global token                    block-sparse kernel + 1 global row
  bigbird         longformer + 2 random blocks per query tile block-sparse kernel + 1 global row
  full-causal     SDPA with is_causal (GPT's kernel)
  sliding-causal  causal AND |q - k| <= window               block-sparse kernel
  prefix          prefix-LM, prefix = T/2                     SDPA with the cached boolean mask

The tile (``attention.block_size``) is the window, so a sliding query tile reads 3 key
tiles. Rounds interleave every (kind, T) with the order rotating between rounds; the
table gives the median step time over rounds, its ratio to full attention (causal kinds
to full-causal) at the same T, and the peak memory of one step above what was held
before it (CPU: glibc's live malloc bytes, sampled every 0.2 ms during the step, the
median of 3 steps; CUDA: the allocator's peak).
A second table times the attention alone (forward and backward of q, k, v of
(1, 4, T, 32) through one layer's kernel), where full attention's T² is not hidden by
the projections and the MLP (24 T D² FLOPs a block against 4 T² D: equal at T = 6 D = 768).

The exponent is the least-squares slope of log(time) against log(T) over every length,
and the local slope between the two longest.

Usage:  python benchmarks/bench_attention.py [--quick] [--lengths 256,512,1024,2048,4096]
            [--window 64] [--rounds 3] [--threads N] [--json PATH] [--device cuda]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import elapsed, snapshot, sync  # noqa: E402

from lit_modules.blocks import make_blocks, run_blocks  # noqa: E402
from lit_modules.config import AttentionConfig  # noqa: E402
from lit_modules.masking.attention import Attention  # noqa: E402

WIDTH, HEADS, DEPTH = 128, 4, 2
CAUSAL = {"full-causal", "sliding-causal", "prefix"}


def attention_config(kind: str, t: int, window: int) -> AttentionConfig:
    if kind in ("full", "full-causal"):
        return AttentionConfig()
    if kind in ("sliding", "sliding-causal"):
        return AttentionConfig(kind="sliding", window=window, block_size=window)
    if kind == "longformer":
        return AttentionConfig(kind="longformer", window=window, global_tokens=1, block_size=window)
    if kind == "bigbird":
        return AttentionConfig(kind="bigbird", window=window, global_tokens=1, random_blocks=2, block_size=window)
    if kind == "prefix":
        return AttentionConfig(kind="prefix", prefix=t // 2)
    raise ValueError(kind)


class Case:
    """One (kind, T): the blocks, an input, an optimizer; ``step()`` is one training step
    (``what`` = "model") or one forward and backward of the attention alone (``what`` =
    "attention": q, k, v of (1, 4, T, 32) through the first block's attention)."""

    def __init__(self, kind: str, t: int, window: int, device: torch.device, what: str = "model"):
        torch.manual_seed(0)
        self.kind, self.t, self.what = kind, t, what
        self.blocks = make_blocks(DEPTH, WIDTH, HEADS, 0.0, attention_config(kind, t, window), seed=0).to(device)
        self.x = torch.randn(1, t, WIDTH, device=device)
        self.qkv = [torch.randn(1, HEADS, t, WIDTH // HEADS, device=device, requires_grad=True) for _ in range(3)]
        self.attention = Attention(causal=kind in CAUSAL)
        self.opt = torch.optim.AdamW(self.blocks.parameters(), lr=1e-4, foreach=True)
        pattern = self.blocks[0].attn.pattern
        self.kernel = ("sdpa is_causal" if kind in CAUSAL else "sdpa") if pattern is None else \
            pattern.layout(t, kind in CAUSAL, device).kernel
        self.keys = (t + 1) / 2 if kind == "full-causal" else t if pattern is None else \
            float(pattern.pattern.dense(t, kind in CAUSAL, device).sum(1).float().mean())

    def step(self) -> None:
        if self.what == "attention":
            q, k, v = self.qkv
            pattern = self.blocks[0].attn.pattern
            if pattern is None:
                y = F.scaled_dot_product_attention(q, k, v, **self.attention.sdpa_args(self.t, self.t))
            else:
                y = pattern(q, k, v, self.attention)
            y.sum().backward()
            return
        y = run_blocks(self.blocks, self.x, self.attention)
        loss = y.pow(2).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_live() -> int:
    """Bytes glibc's malloc has handed out and not taken back (heap chunks in use plus
    mmapped blocks): what torch's CPU tensors hold, without the freed pages RSS keeps."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def peak_memory(case: Case) -> float:
    """MiB: the peak of one step above what was held before it. CUDA: the allocator's
    peak. CPU (torch keeps no CPU allocator statistics): glibc's live bytes, sampled every
    0.2 ms by a thread while the step runs (torch's kernels release the GIL)."""
    if case.x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        case.step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _malloc_live()
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _malloc_live())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample)
    thread.start()
    case.step()
    done.set()
    thread.join()
    return (max(peak[0], _malloc_live()) - before) / 2**20


def slope(ts: list[int], ys: list[float]) -> float:
    lx, ly = [math.log(t) for t in ts], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="256,512,1024,2048,4096")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per (kind, T) per round")
    p.add_argument("--kinds", default="full,sliding,longformer,bigbird,full-causal,sliding-causal,prefix")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="lengths 256..1024, 1 round")
    p.add_argument("--json", type=Path)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.rounds = "256,512,1024", 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lengths = [int(x) for x in args.lengths.split(",")]
    kinds = args.kinds.split(",")

    print(f"# bench_attention: depth {DEPTH}, width {WIDTH}, {HEADS} heads, B = 1, window {args.window}, "
          f"{args.rounds} rounds x {args.steps} steps, {args.threads} threads, {device}, torch {torch.__version__}")
    for what in ("model", "attention"):
        run_table(what, kinds, lengths, args, device)
    return 0


def run_table(what: str, kinds: list[str], lengths: list[int], args, device: torch.device) -> None:
    cases = {(k, t): Case(k, t, args.window, device, what) for k in kinds for t in lengths}
    for c in cases.values():
        c.step()  # warm-up: layouts built, optimizer state allocated
    memory = {key: float("nan") if args.no_memory else statistics.median(peak_memory(c) for _ in range(3))
              for key, c in cases.items()}
    times: dict[tuple, list[float]] = {key: [] for key in cases}
    others: list[float] = []
    order = list(cases)
    for r in range(args.rounds):
        shift = r * len(order) // max(args.rounds, 1)
        for key in order[shift:] + order[:shift]:
            start = snapshot()
            for _ in range(args.steps):
                cases[key].step()
            sync()
            wall, _cpu, other = elapsed(start)
            times[key].append(wall / args.steps)
            others.append(other)

    med = {key: statistics.median(v) for key, v in times.items()}
    title = "a training step of the 2-block model" if what == "model" else \
        "the attention alone, forward and backward, (1, 4, T, 32)"
    print(f"\n## {title}; others' median share of the machine {statistics.median(others):.0%}\n")
    print("| kind | kernel | T | keys/query | ms | × full | peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for k in kinds:
        base = "full-causal" if k in CAUSAL and "full-causal" in kinds else "full"
        for t in lengths:
            c = cases[(k, t)]
            ratio = med[(k, t)] / med[(base, t)] if (base, t) in med else float("nan")
            mib = memory[(k, t)]
            rows.append({"what": what, "kind": k, "kernel": c.kernel, "T": t, "keys_per_query": c.keys,
                         "step_s": med[(k, t)], "vs_full": ratio, "peak_mib": mib, "rounds_s": times[(k, t)]})
            print(f"| {k} | {c.kernel} | {t} | {c.keys:.0f} | {med[(k, t)] * 1e3:.1f} | {ratio:.2f} | {mib:.1f} |")
    print("\n| kind | exponent (all T) | exponent (last two T) | memory exponent (all T) |")
    print("|---|---:|---:|---:|")
    fits = {}
    for k in kinds:
        ys = [med[(k, t)] for t in lengths]
        ms = [max(memory[(k, t)], 0.01) for t in lengths]
        fits[k] = {"time": slope(lengths, ys), "time_last": slope(lengths[-2:], ys[-2:]), "memory": slope(lengths, ms)}
        print(f"| {k} | {fits[k]['time']:.2f} | {fits[k]['time_last']:.2f} | {fits[k]['memory']:.2f} |")
    if args.json:
        path = args.json.with_name(f"{args.json.stem}_{what}{args.json.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": rows, "exponents": fits, "args": vars(args) | {"json": str(args.json)}},
                                   indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
