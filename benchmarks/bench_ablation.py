"""Layer-removal evaluation: one pass for every k against L + 1 separate truncated passes.

``lit_modules.ablation.layer_removal`` scores a model with k = 0..L blocks removed from the
back by running the model once and applying the final norm, the head and the metrics to
the hidden state after every block. The naive way truncates the model to its first L - k
blocks and evaluates it again, once for each k: L + 1 passes. This script measures both,
side by side in one process, for LitGPT at depth 4, 12 and 24 (everything else the same:
width 256, 4 heads, T 128, vocab 8192, the same batches), and puts the measured ratio next
to the FLOP ratio.

Data: real text, the masklab ``wikitext-2`` data module's validation windows (SentencePiece
BPE 8192 trained on wiki.valid.raw, cached under masklab-runs/cache), ``--batches`` batches
of B = 4 windows of T + 1 tokens, fetched once and cycled through. ``ablation_batch``
scores both directions, so every evaluation runs 2B = 8 rows.

Variants, for each depth L (a call = the evaluation of one batch, no_grad, eval mode):
  onepass_L   ``layer_removal(model, [batch], AblationOptions(truncate=True, drop_one=False,
              similarity=False))``: the masked batch, one pass through the L blocks keeping
              every hidden state, L + 1 scorings (final norm + head + fw/bw loss and
              accuracy), and the tidy DataFrame.
  naive_L     for k = 0..L: the same model truncated to its first L - k blocks (a module
              whose ``blocks`` is the ModuleList of those blocks, weights shared), the
              masked batch, embed, the L - k blocks, one scoring; the L + 1 results.
Both compute the same numbers: every run checks that the two agree for every k and metric.

FLOPs: one call of each variant runs under ``torch.utils.flop_counter.FlopCounterMode``
(matmuls and attention). A block costs b FLOPs and one scoring h (the vocabulary
projection: 2 D V per token, here about 2.5 b), so the naive FLOPs are
L (L + 1) / 2 b + (L + 1) h against L b + (L + 1) h for one pass: the scorings, the same
on both sides, bound the ratio from above.

Interleaving, statistics and columns are the harness's (see bench_gpt.py): a round gives
each variant ``--steps`` calls, depth by depth (onepass_L and naive_L alternate), the order
rotating from round to round; per-round means, medians over rounds, paired per-round
ratios with best/best, cpu and quiet (n).

Usage:  python benchmarks/bench_ablation.py [--quick] [--depths 4,12,24] [--json PATH]
                                            [--device cuda --precision bf16-mixed --sdpa-kernel flash]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere in the repo

import harness  # noqa: E402

from lit_modules.ablation import AblationOptions, layer_removal, truncation_curves  # noqa: E402
from lit_modules.config import load_run_config  # noqa: E402
from lit_modules.paths import Workspace  # noqa: E402
from lit_modules.run import build_datamodule, build_model  # noqa: E402

WIDTH, HEADS, T, BATCH, VOCAB = 256, 4, 128, 4, 8192
DEPTHS = (4, 12, 24)
TRUNCATE_ONLY = AblationOptions(truncate=True, drop_one=False, similarity=False)
METRICS = ("fw_loss", "bw_loss", "fw_acc", "bw_acc")


def gpt_config_dict(depth: int, args) -> dict:
    return {
        "seed": 0,
        "data": {"name": "wikitext-2", "vocab_size": VOCAB, "batch_size": BATCH, "val_batch_size": BATCH},
        "model": {"name": "gpt", "depth": depth, "width": WIDTH, "heads": HEADS, "block_size": T, "dropout": 0.0},
        "masking": {"name": "causal-lm", "p_bw": 0.5},
        "trainer": {"max_steps": 10, "val_every": 10, **harness.trainer_settings(args),
                    "progress_bar": False, "checkpoint": False},
    }


def workspace() -> Workspace:
    """Tokenizer cache in the git-ignored output dir; the shared data beside the repo."""
    out = os.environ.get("MASKLAB_OUTPUT_DIR") or REPO / "masklab-runs"
    data = os.environ.get("MASKLAB_DATA_DIR") or REPO.parent / "shared" / "data"
    return Workspace.resolve(out, data)


def fetch_batches(n: int, args) -> tuple[list[torch.Tensor], dict]:
    """The first n validation batches of the wikitext-2 data module: (B, T+1) windows."""
    dm = build_datamodule(load_run_config(gpt_config_dict(DEPTHS[0], args)), workspace())
    it = iter(dm.val_dataloader())
    return [next(it) for _ in range(n)], dict(dm.info)


# ---------------------------------------------------------------- the two evaluations
def truncated(model, keep: int):
    """A shallow copy of ``model`` whose network runs only its first ``keep`` blocks
    (the weights are shared, nothing is copied but the module objects)."""
    net = copy.copy(model.model)
    net._modules = dict(net._modules)  # its own child table: the original keeps all its blocks
    net.blocks = nn.ModuleList(list(model.model.blocks)[:keep])
    m = copy.copy(model)
    m._modules = dict(m._modules)
    m.model = net
    return m


@torch.no_grad()
def full_pass(model, batch: torch.Tensor) -> dict[str, float]:
    """One ordinary evaluation of ``model`` (all of its blocks) on one batch: metric -> mean."""
    masked = model.ablation_batch(batch)
    h = model.ablation_embed(masked)
    for block in model.blocks:
        h = block(h, masked.attention)
    return {m: float(s) / float(c) for m, (s, c) in model.ablation_score(h, masked).items()}


class Variant:
    """One measured evaluation: ``turn()`` evaluates the next batch and times it."""

    def __init__(self, name: str, what: str, depth: int, fn, batches: list[torch.Tensor]):
        self.name, self.what, self.depth, self.fn, self.batches, self.i = name, what, depth, fn, batches, 0

    def call(self, batch=None):
        if batch is None:
            batch = self.batches[self.i % len(self.batches)]
            self.i += 1
        return self.fn(batch)

    def turn(self) -> tuple[float, float, float]:
        start = harness.snapshot()
        self.call()
        return harness.elapsed(start)


def variants_for(depth: int, batches: list[torch.Tensor], args, device: torch.device) -> tuple[list[Variant], dict]:
    model = build_model(load_run_config(gpt_config_dict(depth, args))).to(device).eval()
    cuts = [truncated(model, depth - k) for k in range(depth + 1)]  # cuts[k]: k blocks removed

    def onepass(batch):
        with harness.autocast(args):
            return truncation_curves(layer_removal(model, [batch], TRUNCATE_ONLY))

    def naive(batch):
        with harness.autocast(args):
            return {k: full_pass(m, batch) for k, m in enumerate(cuts)}

    # The same numbers both ways, for every k and metric (first batch).
    curves, separate = onepass(batches[0]), naive(batches[0])
    diff = max(abs(curves.loc[k, m] - separate[k][m]) for k in range(depth + 1) for m in METRICS)
    info = {"params": sum(p.numel() for p in model.parameters()), "max_abs_diff": diff,
            "fw_loss_by_removed": [separate[k]["fw_loss"] for k in range(depth + 1)]}
    return [
        Variant(f"onepass_{depth}", f"layer_removal, truncate only: 1 pass through {depth} blocks, "
                f"{depth + 1} scorings", depth, onepass, batches),
        Variant(f"naive_{depth}", f"{depth + 1} truncated models evaluated separately: {depth * (depth + 1) // 2} "
                f"block passes, {depth + 1} scorings", depth, naive, batches),
    ], info


def count_flops(v: Variant) -> int:
    with harness.flop_counter_mode() as fc:
        v.call(v.batches[0])
    return fc.get_total_flops()


# ---------------------------------------------------------------- report
def report(variants: list[Variant], depths: list[int], times, flops: dict, info: dict) -> dict:
    wall = {v.name: harness.per_round(times[v.name], False, 0) for v in variants}
    cpu = {v.name: harness.per_round(times[v.name], False, 1) for v in variants}
    others = {v.name: harness.per_round(times[v.name], False, 2) for v in variants}
    rows = {}
    print(f"\n{'variant':<12}{'ms/call':>9}{'best':>9}{'cpu ms':>9}{'others':>7}{'GFLOP':>8}{'GFLOP/s':>9}  what")
    for v in variants:
        sec, best = statistics.median(wall[v.name]), min(wall[v.name])
        busy = harness.median_others(times[v.name])
        rows[v.name] = {"what": v.what, "depth": v.depth, "ms_per_call": 1e3 * sec, "best_ms": 1e3 * best,
                        "cpu_ms_per_call": 1e3 * statistics.median(cpu[v.name]), "others_share": busy,
                        "gflop": flops[v.name] / 1e9, "gflop_per_s": flops[v.name] / 1e9 / sec,
                        "per_round_ms": [1e3 * s for s in wall[v.name]],
                        "raw_calls_wall_ms_cpu_ms_others": harness.raw_turns(times[v.name], 1)}
        print(f"{v.name:<12}{1e3 * sec:>9.1f}{1e3 * best:>9.1f}{rows[v.name]['cpu_ms_per_call']:>9.1f}{busy:>7.0%}"
              f"{flops[v.name] / 1e9:>8.1f}{flops[v.name] / 1e9 / sec:>9.1f}  {v.what}")
    out = {}
    print(f"\n{'ratio: naive time / one-pass time (speed-up)':<46}{'median':>8}{'range':>15}{'best/best':>10}"
          f"{'cpu':>7}{'quiet (n)':>11}{'FLOPs':>8}")
    for d in depths:
        num, den = f"naive_{d}", f"onepass_{d}"
        r = harness.paired(wall, num, den, others)
        r.update(num=num, den=den, cpu_time_median=harness.paired(cpu, num, den)["median"],
                 flop_ratio=flops[num] / flops[den], target=None)
        label = f"depth {d}: {d + 1} truncations"
        print(f"{label:<46}{r['median']:>8.2f}{r['min']:>7.2f}-{r['max']:<7.2f}{r['best_vs_best']:>10.2f}"
              f"{r['cpu_time_median']:>7.2f}{harness.quiet_cell(r, '.2f'):>11}{r['flop_ratio']:>8.2f}")
        out[label] = r
    for d in depths:
        print(f"check: depth {d}: max |one-pass - naive| over k and metrics = {info[d]['max_abs_diff']:.2e}; "
              f"fw_loss with k = 0..{d} removed: " + " ".join(f"{x:.3f}" for x in info[d]["fw_loss_by_removed"]))
    return {"variants": rows, "ratios": out, "models": {str(d): info[d] for d in depths}}


# ---------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds x 1 call, depths 4,12: a smoke run")
    p.add_argument("--depths", help="comma-separated depths (default 4,12,24; quick 4,12)")
    p.add_argument("--rounds", type=int, help="round-robin repeats (default 5, quick 2)")
    p.add_argument("--steps", type=int, help="calls per variant per round (default 3, quick 1)")
    p.add_argument("--batches", type=int, default=4, help="distinct validation batches cycled through (default 4)")
    harness.add_device_args(p)
    harness.add_output_args(p, "call")
    a = p.parse_args(argv)
    a.depths = [int(d) for d in (a.depths or ("4,12" if a.quick else ",".join(map(str, DEPTHS)))).split(",")]
    if any(d < 1 for d in a.depths):
        p.error(f"--depths: {a.depths} must be integers >= 1")
    a.rounds = a.rounds or (2 if a.quick else 5)
    a.steps = a.steps or (1 if a.quick else 3)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.check_device(args)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    start = time.perf_counter()
    batches, data_info = fetch_batches(args.batches, args)
    batches = [b.to(device) for b in batches]
    # A loader that pins memory (on CUDA) starts a thread that sets torch's thread count to 1,
    # and it is seen by this thread too: set it again for the measurement.
    torch.set_num_threads(args.threads)
    env = {**harness.machine(), **harness.settings(args),
           "shape": {"depths": args.depths, "width": WIDTH, "heads": HEADS, "seq": T, "batch": BATCH,
                     "rows_scored": 2 * BATCH, "vocab": VOCAB},
           "data": {"source": data_info.get("data.val_source"), "batches": args.batches,
                    "note": "wikitext-2 validation windows (B, T+1) from the masklab data module"},
           "rounds": args.rounds, "steps": args.steps, **harness.invocation()}
    with harness.sdpa_kernel(args):
        variants, info = [], {}
        for d in args.depths:
            vs, info[d] = variants_for(d, batches, args, device)
            variants += vs
        flops = {v.name: count_flops(v) for v in variants}
        by_name = {v.name: v for v in variants}
        groups = [(f"onepass_{d}", f"naive_{d}") for d in args.depths]
        print(f"bench_ablation: {env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}, "
              f"load {env['load_avg_start'][0]:.2f}")
        print(f"{args.device}, {args.precision}, SDPA kernel {args.sdpa_kernel}; shape {env['shape']}; data "
              f"{data_info.get('data.val_source')} ({args.batches} batches); {args.rounds} rounds x {args.steps} "
              f"call(s), {len(variants)} variants", flush=True)
        harness.measure(by_name, groups, 1, 1, label="warm-up round (not measured)")
        times, loads = harness.measure(by_name, groups, args.rounds, args.steps)
        assert torch.get_num_threads() == args.threads, "something changed the thread count"
        result = report(variants, args.depths, times, flops, info)
        result["load_avg_per_round"] = loads
    return harness.finish(args, env, result, start)


if __name__ == "__main__":
    raise SystemExit(main())
