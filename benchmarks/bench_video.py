"""Speed of masklab's video masking and VideoMAE training step, side by side with the common
per-sample loop and HF transformers' VideoMAEForPreTraining.

One process, two parts, each its own group of variants:

(a) Mask generation for one batch: B = 64 clips, tubelet grid (F', h, w) = (8, 14, 14)
    (16 frames of 224x224 cut into 2x16x16 tubelets: N = 1568), mask ratio 0.9.
  mask_tube     our ``video-tube`` strategy (``VideoTube``), one vectorized call on the
                batch's (B,) content keys: counter-based noise for the S = 196 spatial
                positions, the round(0.9 * 196) = 176 largest masked, the spatial mask
                tiled over the 8 time steps; returns the full ``PatchMask`` (masked (B, N)
                bool, keep_idx (B, 160), mask_idx (B, 1408)).
  mask_random   our ``video-random`` strategy: round(0.9 * 1568) = 1411 tubelets anywhere
                in the clip, same call and output.
  mask_loop     the common VideoMAE implementation (``TubeMaskingGenerator`` with
                ``torch.randperm`` instead of numpy): for each sample a Python loop runs
                ``randperm(h * w)``, sets the first round(0.9 * h * w) positions, tiles the
                spatial mask over time, and the B rows are stacked to (B, N) bool. It builds
                the bool mask only (no index tensors): the baseline does less work than ours.
  Per variant and round the figure is the median of ``--mask-reps`` calls.

(b) One training step (mask + forward + loss + backward + clip + AdamW + LR scheduler) of
    the VideoMAE of studies/specs/video_tiny.yaml: 16 frames of 64x64 (grid (8, 4, 4),
    N = 128 tubelets), encoder depth 4, width 128, 4 heads (MLP 512), decoder depth 2,
    width 64, 4 heads (MLP 256), norm_pix_loss, ``video-tube`` at 0.9 (S_mask =
    round(0.9 * 16) = 14 of 16 positions masked: 16 tubelets visible), batch 8. Every side
    runs at the same settings: dropout 0, exact GELU, the AdamW implementation ours'
    ``configure_optimizers`` picks (fused), SDPA attention, the same threads, device and
    precision, train mode.
  ours          the run's ``MaskPlan.train_item`` (the masks the data pipeline would
                draw, here in the step) and ``LitVideoMAE._shared_step(item, "train")``
                (video-tube masking of the batch's content keys, norm-pix targets, encoder on the visible tubelets
                only, light decoder with mask tokens, masked-tubelet MSE) in a plain loop
                with the optimizer and scheduler of its ``configure_optimizers``.
  masktok       the same LitVideoMAE, masking, decoder, loss and optimizer, with mask tokens
                through the encoder (``LitMaskTokenVideo`` below): all N = 128 tubelets enter
                the encoder, the masked ones as a learned encoder mask token (+ their
                position); the decoder gets the encoder output for all N (no decoder mask
                tokens). Ours without its visible-only encoder, for the ratio without it.
  hf            ``VideoMAEForPreTraining(VideoMAEConfig(image_size=64, patch_size=16,
                num_frames=16, tubelet_size=2, hidden_size=128, num_hidden_layers=4,
                num_attention_heads=4, intermediate_size=512, decoder_hidden_size=64,
                decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                decoder_intermediate_size=256, norm_pix_loss=True))``, sdpa attention where
                the installed transformers has it, random init, nothing downloaded;
                ``bool_masked_pos`` = our ``video-tube`` mask of the same batch and step
                (the same ``MaskPlan.train_item``), made inside the timed step (so both
                sides pay the same masking); its own loss
                (``.loss``); the same clips, AdamW groups and implementation, LR schedule and
                grad clip as ours. HF VideoMAE also encodes the visible tubelets only.
  The clips are synthetic: ``--batches`` batches of standard-normal (B, 16, 3, 64, 64)
  pixels made once with a fixed seed and cycled through (compute does not depend on the
  pixel values; both sides get the same tensors).

How the variants are interleaved (as in bench_gpt.py / bench_mae.py): a round gives every
variant ``--steps`` steps (mask variants: ``--mask-reps`` calls), group by group, the
variants of a group alternating A B A B ... so a ratio's two sides run moments apart, the
order inside a group rotating from round to round. Every variant runs in the main thread.
Per variant and round the figure is the mean of its steps (the median of its calls for the
mask variants); the table gives the median over rounds, and each ratio is the median of the
per-round ratios (paired: both sides measured in the same round). The "others" column is the
median share of the machine's CPU that other processes used during the variant's steps
(/proc/stat). Beside the median the ratio table gives best/best (each side's fastest round),
cpu (the paired median on process CPU time) and quiet (the paired median over rounds in
which other processes used < 10% of the machine during both sides' steps).
``--profile`` adds a torch.profiler table of one step of each named variant (default: the
variants behind a missed target).

FLOPs: before timing, one forward + backward of each step variant runs under
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention); the ratio
table's "FLOPs" column is the two sides' ratio (the speed-up if time followed FLOPs).

Usage:  python benchmarks/bench_video.py [--quick] [--json PATH] [--profile [missed|NAMES]]
                                         [--device cuda --precision bf16-mixed --sdpa-kernel flash]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere in the repo

import harness  # noqa: E402

from lit_modules.blocks import run_blocks  # noqa: E402
from lit_modules.config import load_run_config  # noqa: E402
from lit_modules.masking import MaskContext  # noqa: E402
from lit_modules.masking.attention import Attention  # noqa: E402
from lit_modules.masking.batches import Clips  # noqa: E402
from lit_modules.masking.rng import content_key  # noqa: E402
from lit_modules.masking.video import VideoRandom, VideoTube  # noqa: E402
from lit_modules.registry import MODELS  # noqa: E402
from lit_modules.run import build_model  # noqa: E402
from lit_modules.video import LitVideoMAE  # noqa: E402

# (a) mask generation
MASK_B, MASK_GRID, MASK_RATIO = 64, (8, 14, 14), 0.9
# (b) training step: the shape of studies/specs/video_tiny.yaml
FRAMES, SIZE, TUBELET, PATCH = 16, 64, 2, 16
DEPTH, WIDTH, HEADS, DEC_DEPTH, DEC_WIDTH, DEC_HEADS = 4, 128, 4, 2, 64, 4
BATCH, RATIO = 8, 0.9
MAX_STEPS = 1000  # the LR schedule's length: longer than any run here, so the rate stays sane

# label: (numerator, denominator, kind, bound); ratio = time(numerator) / time(denominator),
# i.e. the throughput of ours over the other side.
TARGETS = {
    "video-tube mask / per-sample randperm loop (speed-up)": ("mask_loop", "mask_tube", ">=", 20.0),
    "LitVideoMAE step / HF VideoMAE step (throughput)": ("hf", "ours", ">=", 1.0),
}
INFO_RATIOS = {
    "LitVideoMAE with mask tokens in encoder / HF VideoMAE (throughput)": ("hf", "masktok"),
    "LitVideoMAE / mask tokens in encoder (speed-up)": ("masktok", "ours"),
    "video-random mask / per-sample randperm loop (speed-up)": ("mask_loop", "mask_random"),
}
GROUPS = (("mask_tube", "mask_random", "mask_loop"), ("ours", "masktok", "hf"))
STEPS = ("ours", "masktok", "hf")


# ---------------------------------------------------------------- configs and data
def video_config_dict(args) -> dict:
    return {
        "seed": 0,
        "data": {"name": "bbb", "frames": FRAMES, "image_size": SIZE, "batch_size": BATCH},
        "model": {"name": "video-mae", "stage": "pretrain", "frames": FRAMES,
                  "image_size": SIZE, "tubelet_frames": TUBELET, "patch_size": PATCH, "depth": DEPTH,
                  "width": WIDTH, "heads": HEADS, "decoder_depth": DEC_DEPTH, "decoder_width": DEC_WIDTH,
                  "decoder_heads": DEC_HEADS, "norm_pix_loss": True},
        "masking": {"name": "video-tube", "mask_ratio": RATIO},
        "trainer": {"max_steps": MAX_STEPS, "val_every": MAX_STEPS, **harness.trainer_settings(args),
                    "progress_bar": False, "checkpoint": False},
    }


def make_batches(n: int, device: torch.device, grid: tuple[int, int, int], b: int = BATCH) -> list[Clips]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        clips = torch.randn(b, FRAMES, 3, SIZE, SIZE, generator=g)  # (B, F, 3, H, W)
        out.append(Clips(clips=clips, keys=content_key(clips), grid=grid).to(device))
    return out


class Cycle:
    def __init__(self, items: list):
        self.items, self.i = items, 0

    def next(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


# ---------------------------------------------------------------- variants
class Variant:
    """One measured configuration: ``turn()`` runs and times one call of ``fn``."""

    def __init__(self, name: str, what: str, fn, micro: bool, items: int, unit: str):
        self.name, self.what, self.fn, self.micro = name, what, fn, micro
        self.items, self.unit = items, unit  # items per call (clips), for the throughput column

    def turn(self) -> tuple[float, float, float]:
        start = harness.snapshot()
        self.fn()
        return harness.elapsed(start)


def loop_tube_mask(b: int, grid: tuple[int, int, int], ratio: float) -> Tensor:
    """The common VideoMAE tube masking: a per-sample Python loop over ``torch.randperm``."""
    f, h, w = grid
    s = h * w
    k = round(ratio * s)
    rows = []
    for _ in range(b):
        spatial = torch.zeros(s, dtype=torch.bool)
        spatial[torch.randperm(s)[:k]] = True
        rows.append(spatial.repeat(f))  # tile over time: (F' * S,), (t, y, x) order
    return torch.stack(rows)  # (B, N)


def mask_variants() -> tuple[list[Variant], dict]:
    g = torch.Generator().manual_seed(1)
    keys = torch.randint(-(2**62), 2**62, (MASK_B,), generator=g)  # (B,) int64 content keys
    tube, rand = VideoTube(mask_ratio=MASK_RATIO), VideoRandom(mask_ratio=MASK_RATIO)
    state = {"i": 0}

    def ours(strategy):
        def call():
            state["i"] += 1  # a fresh mask every call, as in training (mask index = step)
            ctx = MaskContext(seed=0, mask_index=state["i"], step=state["i"], total_steps=MAX_STEPS, stage="train")
            return strategy.masks(keys, MASK_GRID, ctx)  # the PatchMask of the batch's content keys
        return call

    # sanity: same counts and tube structure on both sides
    f, h, w = MASK_GRID
    pm, lp = ours(tube)(), loop_tube_mask(MASK_B, MASK_GRID, MASK_RATIO)
    m = pm.masked.view(MASK_B, f, h * w)
    checks = {"tube masked per row, ours": float(pm.masked.sum(1).unique().item()),
              "tube masked per row, loop": float(lp.sum(1).unique().item()),
              "tube mask equal over time, ours": float(bool((m == m[:, :1]).all())),
              "random masked per row, ours": float(ours(rand)().masked.sum(1).unique().item())}
    return [
        Variant("mask_tube", "VideoTube (video-tube), one vectorized call -> PatchMask", ours(tube), True,
                MASK_B, "clips"),
        Variant("mask_random", "VideoRandom (video-random), one vectorized call -> PatchMask", ours(rand), True,
                MASK_B, "clips"),
        Variant("mask_loop", "per-sample loop: randperm(h*w)[:k], tile over time, stack (bool only)",
                lambda: loop_tube_mask(MASK_B, MASK_GRID, MASK_RATIO), True, MASK_B, "clips"),
    ], checks


class LitMaskTokenVideo(LitVideoMAE):
    """LitVideoMAE (same masking, targets, loss, optimizer) with mask tokens through the
    encoder: every tubelet enters the blocks, the masked ones as a learned encoder mask
    token (+ their position); the decoder gets all N encoder outputs (no decoder mask tokens)."""

    def __init__(self, config: dict):
        super().__init__(config)
        self.enc_mask_token = nn.Parameter(torch.zeros(1, 1, self.cfg.width))
        nn.init.normal_(self.enc_mask_token, std=0.02)

    def pretrain_out(self, v, h=None) -> Tensor:
        """Clips (B, F, 3, H, W), masked (B, N) -> predictions of every tubelet (B, N, P)."""
        m = self.model
        x = m.embed_in(v.inputs.transpose(1, 2)).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.where(v.loss_mask[..., None], self.enc_mask_token.to(x.dtype), x) + m.pos[None]
        h = m.norm(run_blocks(self.blocks, x, Attention()))  # (B, N, D)
        y = m.decoder_embed(h) + m.dec_pos[None]  # (B, N, Dd)
        return m.decoder_pred(m.decoder_norm(run_blocks(m.decoder_blocks, y, Attention())))


class Trainer:
    """A plain training loop: the step's masks (``MaskPlan.train_item``, the same for
    every side), loss(item) -> zero_grad, backward, clip, AdamW, scheduler."""

    def __init__(self, model: nn.Module, loss, opt, sched, clip: float, batches: Cycle, args, plan):
        self.model, self.loss_fn, self.opt, self.sched, self.clip, self.batches = model, loss, opt, sched, clip, batches
        self.args, self.plan, self.step_index = args, plan, 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self.params)

    def loss(self, batch: Clips) -> Tensor:
        item = self.plan.train_item(batch, self.step_index)
        with harness.autocast(self.args):
            return self.loss_fn(item)

    def step(self) -> None:
        loss = self.loss(self.batches.next())
        self.step_index += 1
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()

    def first_loss(self) -> float:
        with torch.no_grad():
            return self.loss(self.batches.items[0]).item()

    def flops(self) -> int:
        """FLOPs of one forward + backward on the first batch (gradients discarded)."""
        with harness.flop_counter_mode() as fc:
            self.loss(self.batches.items[0]).backward()
        self.model.zero_grad(set_to_none=True)
        return fc.get_total_flops()

    def sdpa_calls(self) -> str:
        with torch.no_grad():
            return harness.sdpa_calls(lambda: self.loss(self.batches.items[0]))


def lit_trainer(lit: LitVideoMAE, batches: list[Clips], args, device: torch.device, plan) -> Trainer:
    """A LitVideoMAE (or subclass) trained by ``_shared_step`` + its ``configure_optimizers``."""
    lit.to(device).train()
    conf = lit.configure_optimizers()
    return Trainer(lit, lambda item: lit._shared_step(item, "train")[0], conf["optimizer"],
                   conf["lr_scheduler"]["scheduler"], lit.run_config.optim.grad_clip, Cycle(batches), args, plan)


def step_variants(args, device: torch.device) -> tuple[list[Variant], dict, dict]:
    import transformers
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    transformers.logging.set_verbosity_error()
    cfg = load_run_config(video_config_dict(args))
    plan = MODELS.get("video-mae").mask_plan(cfg, MAX_STEPS)
    batches = make_batches(args.batches, device, cfg.model.grid)
    torch.manual_seed(0)
    lit = build_model(cfg)
    ours = lit_trainer(lit, batches, args, device, plan)
    L.seed_everything(cfg.seed, verbose=False)
    masktok = lit_trainer(LitMaskTokenVideo(cfg.to_dict()), batches, args, device, plan)
    impl = harness.same_impl({"ours": harness.adamw_impl(ours.opt), "masktok": harness.adamw_impl(masktok.opt)})

    hf_cfg = VideoMAEConfig(image_size=SIZE, patch_size=PATCH, num_frames=FRAMES, tubelet_size=TUBELET,
                            hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                            intermediate_size=4 * WIDTH, decoder_hidden_size=DEC_WIDTH,
                            decoder_num_hidden_layers=DEC_DEPTH, decoder_num_attention_heads=DEC_HEADS,
                            decoder_intermediate_size=4 * DEC_WIDTH, norm_pix_loss=True)
    torch.manual_seed(0)
    try:
        model = VideoMAEForPreTraining._from_config(hf_cfg, attn_implementation="sdpa")
    except (ValueError, ImportError):  # an older transformers without sdpa for VideoMAE
        model = VideoMAEForPreTraining(hf_cfg)
    model.to(device).train()
    masking, grid = lit.masking, lit.cfg.grid

    def hf_loss(item) -> Tensor:
        return model(pixel_values=item.batch.clips, bool_masked_pos=item.masked.loss_mask).loss

    opt, sched = harness.adamw(model, cfg.optim, cfg.trainer.max_steps, impl)
    hf = Trainer(model, hf_loss, opt, sched, cfg.optim.grad_clip, Cycle(batches), args, plan)
    c = model.config
    n = grid[0] * grid[1] * grid[2]
    visible = n - masking.num_masked(grid, RATIO)
    variants = [
        Variant("ours", f"LitVideoMAE._shared_step (encoder on the {visible} visible tubelets), plain loop, AdamW {impl}",
                ours.step, False, BATCH, "clips"),
        Variant("masktok", f"LitVideoMAE with mask tokens through the encoder (all {n} tubelets), plain loop, "
                f"AdamW {impl}", masktok.step, False, BATCH, "clips"),
        Variant("hf", f"HF VideoMAEForPreTraining ({c._attn_implementation}, {c.hidden_act}, dropout "
                f"{c.hidden_dropout_prob}/{c.attention_probs_dropout_prob}), our tube mask, own loss, plain loop, "
                f"AdamW {impl}", hf.step, False, BATCH, "clips"),
    ]
    trainers = {"ours": ours, "masktok": masktok, "hf": hf}
    checks, info = {}, {}

    def probe(v: Variant) -> None:
        t = trainers[v.name]
        checks[f"first-batch loss {v.name}"] = t.first_loss()
        checks[f"SDPA calls, {v.name}"] = t.sdpa_calls()
        info[v.name] = {"trainable_params": t.n_params, "fwd_bwd_flops": t.flops()}

    variants, failed = harness.probe_all(variants, probe)
    checks["AdamW implementation, every side"] = impl
    info.update(grid=list(grid), visible_tubelets=visible, failed=failed)
    return variants, checks, info


# ---------------------------------------------------------------- measurement
def report(variants: list[Variant], times, checks: dict, info: dict) -> dict:
    wall = {v.name: harness.per_round(times[v.name], v.micro, 0) for v in variants}
    cpu = {v.name: harness.per_round(times[v.name], v.micro, 1) for v in variants}
    others = {v.name: harness.per_round(times[v.name], False, 2) for v in variants}
    rows = {}
    print(f"\n{'variant':<13}{'ms/call':>9}{'best':>9}{'cpu ms':>9}{'others':>7}{'clips/s':>10}  what")
    for v in variants:
        sec, best = statistics.median(wall[v.name]), min(wall[v.name])
        busy = harness.median_others(times[v.name])
        rows[v.name] = {"what": v.what, "ms_per_call": 1e3 * sec, "best_ms": 1e3 * best,
                        "cpu_ms_per_call": 1e3 * statistics.median(cpu[v.name]), "others_share": busy,
                        "clips_per_s": v.items / sec, "per_round_ms": [1e3 * s for s in wall[v.name]],
                        "raw_calls_wall_ms_cpu_ms_others": harness.raw_turns(times[v.name], 3)}
        print(f"{v.name:<13}{1e3 * sec:>9.3f}{1e3 * best:>9.3f}{rows[v.name]['cpu_ms_per_call']:>9.3f}"
              f"{busy:>7.0%}{v.items / sec:>10,.0f}  {v.what}")

    out, missed = {}, []
    print(f"\n{'ratio (wall clock unless said)':<67}{'median':>8}{'range':>16}{'best/best':>10}{'cpu':>8}"
          f"{'quiet (n)':>12}{'FLOPs':>7}  target")
    for label, num, den, kind, bound in harness.ratio_rows(TARGETS, INFO_RATIOS):
        if num not in wall or den not in wall:
            out[label] = harness.not_measured(label, num, den, kind, bound, 67)
            continue
        r = harness.paired(wall, num, den, others)
        r.update(num=num, den=den, cpu_time_median=harness.paired(cpu, num, den)["median"])
        if num in STEPS and den in STEPS:
            r["flop_ratio"] = info[num]["fwd_bwd_flops"] / info[den]["fwd_bwd_flops"]
        quiet = harness.quiet_cell(r, ".2f")
        flops = f"{r['flop_ratio']:>7.2f}" if "flop_ratio" in r else f"{'':>7}"
        line = (f"{label:<67}{r['median']:>8.2f}{r['min']:>8.2f}-{r['max']:<7.2f}{r['best_vs_best']:>10.2f}"
                f"{r['cpu_time_median']:>8.2f}{quiet:>12}{flops}") + harness.judge(r, kind, bound)
        if kind is not None and not r["met"]:
            missed.append((label, num, den))
        out[label] = r
        print(line)
    for name in (n for n in STEPS if n in info):
        print(f"{name}: {info[name]['fwd_bwd_flops'] / 1e9:.3f} GFLOP fwd+bwd, "
              f"{info[name]['trainable_params'] / 1e6:.3f} M trainable parameters")
    for name, value in checks.items():
        print(f"check: {name} = {value:.4f}" if isinstance(value, float) else f"check: {name} = {value}")
    return {"variants": rows, "ratios": out, "missed": [m[0] for m in missed],
            "missed_variants": sorted({n for m in missed for n in m[1:]}), "checks": checks}


# ---------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds x 1 step, 5 mask calls: a smoke run")
    p.add_argument("--rounds", type=int, help="round-robin repeats (default 7, quick 2)")
    p.add_argument("--steps", type=int, help="training steps per variant per round (default 4, quick 1)")
    p.add_argument("--mask-reps", type=int, help="mask calls per variant per round (default 21, quick 5)")
    p.add_argument("--batches", type=int, default=4, help="distinct synthetic batches cycled through (default 4)")
    harness.add_device_args(p)
    harness.add_output_args(p, "call")
    a = p.parse_args(argv)
    a.rounds = a.rounds or (2 if a.quick else 7)
    a.steps = a.steps or (1 if a.quick else 4)
    a.mask_reps = a.mask_reps or (5 if a.quick else 21)
    return a


def environment(args, info: dict) -> dict:
    import transformers

    return {**harness.machine(), **harness.settings(args),
            "transformers": transformers.__version__,
            "mask_shape": {"batch": MASK_B, "grid": list(MASK_GRID), "ratio": MASK_RATIO},
            "step_shape": {"frames": FRAMES, "image_size": SIZE, "tubelet": [TUBELET, PATCH, PATCH],
                           "depth": DEPTH, "width": WIDTH, "heads": HEADS, "decoder_depth": DEC_DEPTH,
                           "decoder_width": DEC_WIDTH, "decoder_heads": DEC_HEADS, "batch": BATCH,
                           "mask_ratio": RATIO, **info},
            "data": f"synthetic standard-normal clips, {args.batches} batches cycled",
            "rounds": args.rounds, "steps": args.steps, "mask_reps": args.mask_reps,
            **harness.invocation()}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.check_device(args)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    start = time.perf_counter()
    with harness.sdpa_kernel(args):
        masks, checks = mask_variants()
        steps, step_checks, info = step_variants(args, device)
        checks.update(step_checks)
        env = environment(args, info)
        variants = [*masks, *steps]
        by_name = {v.name: v for v in variants}
        groups = [kept for g in GROUPS if (kept := tuple(n for n in g if n in by_name))]
        print(f"bench_video: {env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}, "
              f"transformers {env['transformers']}, load {env['load_avg_start'][0]:.2f}")
        print(f"{args.device}, {args.precision}, SDPA kernel {args.sdpa_kernel}; mask {env['mask_shape']} (CPU); "
              f"step {env['step_shape']}; {args.rounds} rounds x {args.steps} step(s), {args.mask_reps} mask calls, "
              f"{len(variants)} variants", flush=True)
        is_mask = lambda group: by_name[group[0]].micro  # noqa: E731
        harness.measure(by_name, groups, 1, 1, 3, is_mask, label="warm-up round (not measured)")
        times, loads = harness.measure(by_name, groups, args.rounds, args.steps, args.mask_reps, is_mask)
        assert torch.get_num_threads() == args.threads, "something changed the thread count"
        result = report(variants, times, checks, info)
        result["load_avg_per_round"] = loads
        if args.profile:
            result["profiles"] = harness.profile(by_name, harness.profile_names(args.profile, result["missed_variants"],
                                                                                by_name),
                                                 "one call, {ms:.2f} ms", "ms_under_profiler", warm=True, ms_digits=2)
    rc = harness.finish(args, env, result, start)
    return harness.report_failures(info["failed"]) or rc


if __name__ == "__main__":
    raise SystemExit(main())
