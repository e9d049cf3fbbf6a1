"""Masks made in the data pipeline against masks made in the training step, and
DataLoader workers, for LitBERT and LitMAE.

One process, the shapes of bench_bert (depth 4, width 256, 4 heads, T 128, batch 32,
vocab 8192, mlm-random 15%) and bench_mae (Tiny-ImageNet at 64 px, patch 16, mae-random
75%), the real data modules. Per family, four variants of the same training step (the
same model, data, masks, AdamW and schedule), each a hand-written loop whose step is
``next(loader)`` + the LightningModule's ``_shared_step`` + backward + clipping + AdamW:

- ``in_step``: the loader yields unmasked batches and the step draws the masks
  (``MaskPlan.train_item``) before the forward pass: masks made in the training step;
- ``w0``: the loader yields ``TrainItem`` s, masks drawn by the loader in this process;
- ``w1``, ``w2``: the same with 1 and 2 DataLoader worker processes (spawned; the
  masks are drawn in the workers, the step only receives them).

Rounds are interleaved (``harness.measure``); each ratio is the median of the paired
per-round ratios of step time. On this 2-core CPU a worker process competes with the
two training threads for the cores; on a GPU machine it would use cores the step does
not. The loaders of the worker variants prefetch while the other variants run, so
their step time is mostly the step itself.

The profile (``--profile``, on by default) records one training step of ``in_step``
and of ``w0`` under ``torch.profiler`` (the fetch excluded): the number of operator
calls in each, and the operators that only the step that masks runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import harness
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lit_modules.config import load_run_config  # noqa: E402
from lit_modules.data.masked import Planned  # noqa: E402
from lit_modules.data.steps import StepSampler  # noqa: E402
from lit_modules.paths import Workspace  # noqa: E402
from lit_modules.registry import MODELS  # noqa: E402
from lit_modules.run import build_datamodule, build_model  # noqa: E402

MAX_STEPS = 1_000_000
WHERE = ("in_step", "w0", "w1", "w2")
CONFIGS = {
    "bert": {
        "seed": 0,
        "data": {"name": "wikitext-2", "vocab_size": 8192, "batch_size": 32},
        "model": {"name": "bert", "depth": 4, "width": 256, "heads": 4, "block_size": 128, "dropout": 0.0},
        "masking": {"name": "mlm-random", "mask_ratio": 0.15},
    },
    "mae": {
        "seed": 0,
        "data": {"name": "tiny-imagenet", "image_size": 64, "batch_size": 32},
        "model": {"name": "mae", "image_size": 64, "patch_size": 16, "depth": 4, "width": 256, "heads": 4,
                  "decoder_depth": 2, "decoder_width": 128, "decoder_heads": 4, "norm_pix_loss": True},
        "masking": {"name": "mae-random", "mask_ratio": 0.75},
    },
}


def config(family: str, args):
    d = {**CONFIGS[family], "trainer": {"max_steps": MAX_STEPS, "val_every": MAX_STEPS, "checkpoint": False,
                                        "progress_bar": False, **harness.trainer_settings(args)}}
    return load_run_config(d)


def workspace() -> Workspace:
    out = os.environ.get("MASKLAB_OUTPUT_DIR") or REPO / "masklab-runs"
    data = os.environ.get("MASKLAB_DATA_DIR") or REPO.parent / "shared" / "data"
    return Workspace.resolve(out, data)


class Step:
    """One variant's training loop: its loader iterator, model and optimizer."""

    def __init__(self, family: str, where: str, dm, args, device):
        cfg = config(family, args)
        self.family, self.where, self.device = family, where, device
        self.plan = MODELS.get(cfg.model.name).mask_plan(cfg, MAX_STEPS)
        base = dm.train_dataloader().dataset.base  # the step-indexed batches, unmasked
        workers = 0 if where in ("in_step", "w0") else int(where[1:])
        dataset = Planned(base, None if where == "in_step" else self.plan)
        self.loader = DataLoader(dataset, batch_size=None, sampler=StepSampler(MAX_STEPS, MAX_STEPS),
                                 num_workers=workers, persistent_workers=workers > 0,
                                 multiprocessing_context="spawn" if workers else None)
        self.model = build_model(cfg).to(device).train()
        self.opt, self.sched = harness.adamw(self.model, cfg.optim, MAX_STEPS, args.adamw)
        self.it, self.step_index = None, 0

    def fetch(self):
        """The next batch from the loader: masked already, except for ``in_step``."""
        if self.it is None:
            self.it = iter(self.loader)
        return next(self.it)

    def train(self, item) -> torch.Tensor:
        if self.where == "in_step":  # the masks of this step, drawn here
            item = self.plan.train_item(item, self.step_index)
        item = item.to(self.device)
        loss, _ = self.model._shared_step(item, "train")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.step_index += 1
        return loss.detach()

    def __call__(self) -> None:
        self.train(self.fetch())


def op_counts(step: Step) -> Counter:
    """Operator calls of one training step (the fetch excluded)."""
    item = step.fetch()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step.train(item)
    return Counter({e.key: e.count for e in prof.key_averages()})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="round-robin repeats (default 5)")
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round (default 3)")
    p.add_argument("--families", default="bert,mae", help="comma-separated: bert, mae")
    p.add_argument("--adamw", default="fused", choices=("fused", "foreach", "for-loop"),
                   help="the AdamW implementation of every variant (default fused, as LitBERT/LitMAE use)")
    p.add_argument("--no-profile", action="store_true", help="skip the operator counts")
    harness.add_device_args(p)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--json", type=Path, help="write all figures, ratios and raw step times here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.check_device(args)
    torch.set_num_threads(args.threads)
    harness.quiet_lightning()
    start = time.perf_counter()
    families = args.families.split(",")
    env = {**harness.machine(), **harness.settings(args), "adamw": args.adamw, "rounds": args.rounds,
           "steps": args.steps, **harness.invocation()}
    steps, variants = {}, []
    with harness.sdpa_kernel(args):
        for fam in families:
            dm = build_datamodule(config(fam, args), workspace())
            for where in WHERE:
                s = Step(fam, where, dm, args, device)
                steps[f"{fam}_{where}"] = s
                variants.append(harness.LoopVariant(f"{fam}_{where}", f"{fam}: {where}", s))
        result = {"profiles": {}}
        if not args.no_profile:
            for fam in families:
                masked, given = op_counts(steps[f"{fam}_in_step"]), op_counts(steps[f"{fam}_w0"])
                only = {k: v - given.get(k, 0) for k, v in masked.items() if v > given.get(k, 0)}
                result["profiles"][fam] = {"ops_masks_in_step": sum(masked.values()),
                                           "ops_masks_from_pipeline": sum(given.values()), "extra_ops": only}
                top = ", ".join(f"{k} {v}" for k, v in sorted(only.items(), key=lambda kv: -kv[1])[:8])
                print(f"{fam}: operator calls in one training step: {sum(masked.values())} with the masks made in "
                      f"the step, {sum(given.values())} with the masks from the pipeline; only in the first: {top}")
        variants, failed = harness.start_all(variants)
        by_name = {v.name: v for v in variants}
        groups = [tuple(f"{fam}_{w}" for w in WHERE if f"{fam}_{w}" in by_name) for fam in families]
        try:
            harness.measure(by_name, groups, 1, 1, label="warm-up round (not measured)")
            times, loads = harness.measure(by_name, groups, args.rounds, args.steps)
        finally:
            harness.close_all(variants)
    wall = {n: harness.per_round(t, False, 0) for n, t in times.items()}
    others = {n: harness.per_round(t, False, 2) for n, t in times.items()}
    print(f"\n{'variant':<14} {'ms/step':>9} {'others':>7}")
    for n in by_name:
        print(f"{n:<14} {1e3 * sorted(wall[n])[len(wall[n]) // 2]:9.1f} {harness.median_others(times[n]):7.0%}")
    ratios = {}
    print(f"\n{'time ratio':<40} {'median':>7} {'range':>13} {'quiet (n)':>10}")
    for fam in families:
        for w in ("w0", "w1", "w2"):
            num, den = f"{fam}_{w}", f"{fam}_in_step"
            if num in wall and den in wall:
                r = harness.paired(wall, num, den, others)
                ratios[f"{num} / {den}"] = r
                label = f"{fam}: masks from the pipeline ({w}) / in the step"
                print(f"{label:<40} {r['median']:7.3f} {r['min']:6.3f}-{r['max']:.3f} {harness.quiet_cell(r):>10}")
    result.update(ratios=ratios, load_avg_per_round=loads, failed_to_start=failed,
                  raw={n: harness.raw_turns(t) for n, t in times.items()})
    rc = harness.finish(args, env, result, start)
    return harness.report_failures(failed) or rc


if __name__ == "__main__":
    raise SystemExit(main())
