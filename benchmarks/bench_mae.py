"""Training speed of masklab's MAE, side by side with mask tokens in the encoder and HF ViTMAE.

One process, a ViT-Tiny-like MAE: 16x16 patches, encoder depth 4, width 192, 3 heads
(MLP 768), decoder depth 2, width 128, 4 heads (MLP 512), batch 32, mask ratio 0.75
(``mae-random``: 25% of the patches visible), norm_pix_loss on, AdamW (the project's
OptimConfig defaults: lr 1e-3, wd 0.1 on matrices, betas (0.9, 0.95), warm-up + cosine
LR schedule, grad clip 1.0). Every side runs at the same settings: dropout 0, exact GELU,
the AdamW implementation ours' ``configure_optimizers`` picks (fused), SDPA attention, the
same threads, device and precision, train mode. Two image sizes, each its own group of
variants:
  64    64x64 images, N = 4x4 = 16 patches (4 visible): the stated shape, real images.
  224   224x224 images, N = 14x14 = 196 patches (49 visible): ViT-Tiny/16's resolution.
The images are real: augmented training batches of the masklab ``tiny-imagenet`` data
module (Tiny-ImageNet-200 val JPEGs, 64x64, MAE's RandomResizedCrop + flip, ImageNet
normalization), ``--batches`` of them fetched once before timing and cycled through; the
224 group uses the same batches bilinearly upsampled to 224x224 (compute does not depend
on pixel values). Fetching is outside the timed step and the same for every variant.

Variants (a step = mask + forward + loss + backward + clip + AdamW + LR scheduler):
  ours_S      the run's ``MaskPlan.train_item`` (the masks the data pipeline would draw,
              here in the step) and ``LitMAE._shared_step(item, "train")`` (mae-random
              masking of the batch's content keys, norm-pix targets, ``MAE.encode`` on the class token and the
              N/4 visible patches only, ``MAE.decode`` with mask tokens, masked-patch MSE)
              in a plain loop with the optimizer and scheduler of its ``configure_optimizers``.
  masktok_S   the same LitMAE, masking, decoder, loss and optimizer, but with mask tokens
              through the encoder (SimMIM / BEiT style, MAE paper Table 1c "w/ [M] in
              encoder"): every patch embedding enters the encoder, the masked ones replaced
              by a learned encoder mask token (+ their position), so the encoder runs on
              1 + N tokens; its output for all N patches goes through ``decoder_embed`` and
              the decoder (no decoder mask tokens: the encoder already filled the holes).
              ``MaskTokenMAE`` / ``LitMaskTokenMAE`` below (subclasses of ours).
  hf_S        ``ViTMAEForPreTraining(ViTMAEConfig(image_size=S, patch_size=16, hidden_size=192,
              num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
              decoder_hidden_size=128, decoder_num_hidden_layers=2,
              decoder_num_attention_heads=4, decoder_intermediate_size=512, mask_ratio=0.75,
              norm_pix_loss=True), attn_implementation="sdpa")``, random init, nothing
              downloaded; its own masking (torch.rand + argsort) and loss (``.loss``), the
              same batches, loop, AdamW groups and implementation (for-loop / foreach /
              fused: whatever ours' ``configure_optimizers`` picks), schedule and clipping.

How the variants are interleaved (as in bench_gpt.py): a round gives every variant
``--steps`` steps, group by group (the variants of one image size, compared with each
other, run A B C A B C ..., so a ratio's two sides run seconds apart), the order inside a
group rotating from round to round. Every variant is a plain step function run in the main
thread (no Lightning fit here, so no worker threads are needed). Per variant and round the
figure is the mean of its steps; the table gives the median over rounds, and each ratio is
the median of the per-round ratios (paired: both sides measured in the same round). The
"others" column is the median share of the machine's CPU that other processes used during
the variant's steps (/proc/stat). Beside the median the ratio table gives best/best (each
side's fastest round), cpu (the paired median on process CPU time) and quiet (the paired
median over rounds in which other processes used < 10% of the machine during both sides).

FLOPs: before timing, one forward + backward of every variant runs under
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention; the CPU
flash-attention kernels get the counter's SDPA formulas), in all and for the encoder alone
(patch embedding + blocks + norm). The ratio table's "FLOPs" column is the ratio of the two
sides' counts: the speed-up if step time were proportional to FLOPs. ``--profile`` adds a
torch.profiler table of one step of each named variant (default: the variants behind a
missed target) and the encoder / decoder+loss fw+bw times of ours and masktok alone.

Usage:  python benchmarks/bench_mae.py [--quick] [--sizes 64,224] [--json PATH] [--profile [missed|NAMES]]
                                       [--device cuda --precision bf16-mixed --sdpa-kernel flash]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere in the repo

import harness  # noqa: E402

from lit_modules.blocks import run_blocks  # noqa: E402
from lit_modules.config import load_run_config  # noqa: E402
from lit_modules.mae import MAE, LitMAE, MAEConfig  # noqa: E402
from lit_modules.masking.attention import Attention  # noqa: E402
from lit_modules.paths import Workspace  # noqa: E402
from lit_modules.registry import MODELS  # noqa: E402
from lit_modules.run import build_datamodule, build_model  # noqa: E402

PATCH, DEPTH, WIDTH, HEADS = 16, 4, 192, 3
DEC_DEPTH, DEC_WIDTH, DEC_HEADS = 2, 128, 4
BATCH, MASK_RATIO, DATA_SIZE = 32, 0.75, 64  # tiny-imagenet is 64x64
MAX_STEPS = 1000  # the LR schedule's length: longer than any run here, so the rate stays sane

# label: (numerator, denominator, kind, bound); ratio = time(numerator) / time(denominator),
# i.e. the throughput of ours over the other side. One row per image size measured.
TARGETS = {
    "MAE / mask tokens in encoder, {s}px (speed-up)": ("masktok_{s}", "ours_{s}", ">=", 2.5),
    "MAE / HF ViTMAE sdpa, {s}px (throughput)": ("hf_{s}", "ours_{s}", ">=", 1.0),
}
INFO_RATIOS = {
    "HF ViTMAE / mask tokens in encoder, {s}px (speed-up)": ("masktok_{s}", "hf_{s}"),
}


# ---------------------------------------------------------------- configs and data
def mae_config_dict(size: int, args) -> dict:
    return {
        "seed": 0,
        "data": {"name": "tiny-imagenet", "image_size": DATA_SIZE, "batch_size": BATCH},
        "model": {"name": "mae", "image_size": size, "patch_size": PATCH, "depth": DEPTH, "width": WIDTH,
                  "heads": HEADS, "decoder_depth": DEC_DEPTH, "decoder_width": DEC_WIDTH,
                  "decoder_heads": DEC_HEADS, "norm_pix_loss": True},
        "masking": {"name": "mae-random", "mask_ratio": MASK_RATIO},
        "trainer": {"max_steps": MAX_STEPS, "val_every": MAX_STEPS, **harness.trainer_settings(args),
                    "progress_bar": False, "checkpoint": False},
    }


def workspace() -> Workspace:
    """Decoded-image cache in the git-ignored output dir; the shared data beside the repo."""
    out = os.environ.get("MASKLAB_OUTPUT_DIR") or REPO / "masklab-runs"
    data = os.environ.get("MASKLAB_DATA_DIR") or REPO.parent / "shared" / "data"
    return Workspace.resolve(out, data)


def fetch_batches(n: int, args) -> tuple[list, dict]:
    """The first n training batches of the tiny-imagenet data module (64x64, augmented),
    unmasked (``Images``): each size masks them on its own patch grid."""
    dm = build_datamodule(load_run_config(mae_config_dict(DATA_SIZE, args)), workspace())
    base = dm.train_dataloader().dataset.base  # step-indexed Images, before the mask plan
    return [base[i] for i in range(n)], dict(dm.info)


def resized(batches: list, size: int, device: torch.device) -> list:
    """The same batches with images bilinearly resized to size x size (content keys
    unchanged), on the device (moved once, before timing)."""
    out = []
    for b in batches:
        b = b.to(device)
        if size != DATA_SIZE:
            b = dataclasses.replace(b, images=F.interpolate(b.images, size=(size, size), mode="bilinear",
                                                            align_corners=False))
        out.append(b)
    return out


class Cycle:
    def __init__(self, items: list):
        self.items, self.i = items, 0

    def next(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


# ---------------------------------------------------------------- the mask-token baseline
class MaskTokenMAE(MAE):
    """Our MAE with mask tokens through the encoder: all N patches enter the blocks."""

    def __init__(self, cfg: MAEConfig):
        super().__init__(cfg)
        self.enc_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        nn.init.normal_(self.enc_mask_token, std=0.02)

    def encode_all(self, images: Tensor, masked: Tensor) -> Tensor:
        """Images (B, 3, H, W), masked (B, N) True = masked -> latent (B, 1 + N, D)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.where(masked[..., None], self.enc_mask_token.to(x.dtype), x) + self.pos[None]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        return self.norm(run_blocks(self.blocks, x, Attention()))

    def decode_all(self, latent: Tensor) -> Tensor:
        """Latent (B, 1 + N, D) -> pixel predictions of every patch (B, N, P)."""
        y = self.decoder_embed(latent)  # (B, 1 + N, Dd)
        y = torch.cat([y[:, :1], y[:, 1:] + self.dec_pos[None]], dim=1)
        y = self.decoder_norm(run_blocks(self.decoder_blocks, y, Attention()))
        return self.decoder_pred(y[:, 1:])


class LitMaskTokenMAE(LitMAE):
    """LitMAE (same masking, targets, loss, optimizer) with ``MaskTokenMAE`` inside."""

    def __init__(self, config: dict):
        super().__init__(config)
        torch.manual_seed(self.run_config.seed)
        self.model = MaskTokenMAE(self.run_config.model)

    def _shared_step(self, item, stage: str):
        assert stage == "train", "the benchmark baseline only trains"
        v = item.masked
        pred = self.model.decode_all(self.model.encode_all(v.inputs, v.loss_mask))
        s, n = self.model.loss_sums(pred, self.model.target(v.targets), v.loss_mask)
        loss = s / max(float(n), 1.0)
        return loss, {"recon_loss": (loss.detach(), int(n))}


# ---------------------------------------------------------------- the variants
class Variant:
    """One measured configuration: ``step()`` runs one training step; ``loss()`` is its
    mask + forward + loss alone (for the FLOP count)."""

    def __init__(self, name: str, what: str, size: int, model: nn.Module, loss, opt, sched, clip: float,
                 batches: Cycle, encoder_tokens: int, args, plan=None):
        self.name, self.what, self.size, self.model, self.args = name, what, size, model, args
        self._loss, self.opt, self.sched, self.clip, self.batches = loss, opt, sched, clip, batches
        self.plan, self.step_index = plan, 0  # our variants: the run's MaskPlan and the step's index
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self.params)
        self.images, self.encoder_tokens = BATCH, encoder_tokens
        self.flops = self.encoder_flops = 0

    def loss(self, batch) -> Tensor:
        """Ours: the step's masks (``MaskPlan.train_item``) + ``_shared_step``; HF: its own."""
        if self.plan is not None:
            batch = self.plan.train_item(batch, self.step_index)
        with harness.autocast(self.args):
            return self._loss(batch)

    def masked(self, batch):
        """Our variants' training masks of ``batch`` at step 0 (a ``MaskedBatch``)."""
        return self.plan.train_item(batch, 0).masked

    def step(self) -> None:
        loss = self.loss(self.batches.next())
        self.step_index += 1
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()

    def turn(self) -> tuple[float, float, float]:
        """One step: (wall s, process CPU s, share of the machine used by other processes)."""
        start = harness.snapshot()
        self.step()
        return harness.elapsed(start)

    def first_loss(self) -> float:
        with torch.no_grad():
            return self.loss(self.batches.items[0]).item()

    def count_flops(self) -> None:
        """FLOPs of one forward + backward (matmuls, convolutions and attention, as
        ``torch.utils.flop_counter`` counts them; elementwise ops, norms and the optimizer
        are not counted) on the first batch, in all and in the encoder (patch embedding +
        blocks + norm); gradients discarded."""
        batch = self.batches.items[0]
        with harness.flop_counter_mode() as fc:
            self.loss(batch).backward()
        self.model.zero_grad(set_to_none=True)
        self.flops = fc.get_total_flops()
        if isinstance(self.model, LitMAE):  # our modules: count the encoder on its own
            mae, mb = self.model.model, self.masked(batch)
            with harness.flop_counter_mode() as fc, harness.autocast(self.args):
                if isinstance(mae, MaskTokenMAE):
                    latent = mae.encode_all(mb.inputs, mb.loss_mask)
                else:
                    latent = mae.encode(mb.inputs, mb.keep_idx)
                latent.backward(torch.ones_like(latent))
            self.model.zero_grad(set_to_none=True)
            self.encoder_flops = fc.get_total_flops()
        else:  # HF: the ViTMAEModel submodule (embeddings + encoder layers + layernorm)
            self.encoder_flops = sum(fc.get_flop_counts().get(f"{type(self.model).__name__}.vit", {}).values())


def lit_variant(name: str, what: str, lit: LitMAE, batches: Cycle, encoder_tokens: int, args,
                device: torch.device) -> Variant:
    """A LitMAE (or subclass) trained by ``_shared_step`` + its ``configure_optimizers``."""
    lit.to(device)
    conf = lit.configure_optimizers()
    lit.train()
    what += f", AdamW {harness.adamw_impl(conf['optimizer'])}"
    plan = MODELS.get("mae").mask_plan(lit.run_config, MAX_STEPS)  # masks on this size's patch grid
    return Variant(name, what, lit.run_config.model.image_size, lit,
                   lambda item: lit._shared_step(item, "train")[0],
                   conf["optimizer"], conf["lr_scheduler"]["scheduler"], lit.run_config.optim.grad_clip,
                   batches, encoder_tokens, args, plan)


def hf_variant(size: int, batches: Cycle, impl: str, args, device: torch.device) -> Variant:
    import transformers
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    transformers.logging.set_verbosity_error()
    cfg = load_run_config(mae_config_dict(size, args))
    hf_cfg = ViTMAEConfig(image_size=size, patch_size=PATCH, num_channels=3, hidden_size=WIDTH,
                          num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * WIDTH,
                          decoder_hidden_size=DEC_WIDTH, decoder_num_hidden_layers=DEC_DEPTH,
                          decoder_num_attention_heads=DEC_HEADS, decoder_intermediate_size=4 * DEC_WIDTH,
                          mask_ratio=MASK_RATIO, norm_pix_loss=True)
    torch.manual_seed(0)
    try:
        model = ViTMAEForPreTraining._from_config(hf_cfg, attn_implementation="sdpa")
    except (ValueError, ImportError):  # an older transformers without sdpa for ViTMAE
        model = ViTMAEForPreTraining(hf_cfg)
    model.to(device).train()
    # AdamW over the trainable parameters (HF's sin-cos positions are frozen).
    opt, sched = harness.adamw(model, cfg.optim, cfg.trainer.max_steps, impl)
    c = model.config
    n = (size // PATCH) ** 2
    what = (f"HF ViTMAEForPreTraining ({c._attn_implementation}, {c.hidden_act}, dropout "
            f"{c.hidden_dropout_prob}), own masking + loss, plain loop")
    what += f", AdamW {harness.adamw_impl(opt)}"
    return Variant(f"hf_{size}", what, size, model, lambda batch: model(pixel_values=batch.images).loss,
                   opt, sched, cfg.optim.grad_clip, batches, 1 + int(n * (1 - MASK_RATIO)), args)


def variants_for(size: int, batches: list[dict], args, device: torch.device) -> list[Variant]:
    n = (size // PATCH) ** 2
    cfg = mae_config_dict(size, args)
    ours = lit_variant(f"ours_{size}", "LitMAE._shared_step (encoder on visible patches), plain loop",
                       build_model(load_run_config(cfg)), Cycle(batches), 1 + n - round(MASK_RATIO * n), args, device)
    masktok = lit_variant(f"masktok_{size}", "LitMAE with mask tokens through the encoder (all N patches), "
                          "plain loop", LitMaskTokenMAE(load_run_config(cfg).to_dict()), Cycle(batches), 1 + n,
                          args, device)
    impl = harness.same_impl({v.name: harness.adamw_impl(v.opt) for v in (ours, masktok)})
    return [ours, masktok, hf_variant(size, Cycle(batches), impl, args, device)]


# ---------------------------------------------------------------- measurement
def ratio_rows(sizes: list[int]) -> list[tuple[str, str, str, str | None, float | None]]:
    rows = []
    for s in sizes:
        rows += [(label.format(s=s), num.format(s=s), den.format(s=s), kind, bound)
                 for label, (num, den, kind, bound) in TARGETS.items()]
    for s in sizes:
        rows += [(label.format(s=s), num.format(s=s), den.format(s=s), None, None)
                 for label, (num, den) in INFO_RATIOS.items()]
    return rows


def report(variants: list[Variant], sizes: list[int], times, checks: dict[str, float]) -> dict:
    wall = {v.name: harness.per_round(times[v.name], False, 0) for v in variants}
    cpu = {v.name: harness.per_round(times[v.name], False, 1) for v in variants}
    others = {v.name: harness.per_round(times[v.name], False, 2) for v in variants}
    flops = {v.name: v.flops for v in variants}
    rows = {}
    print(f"\n{'variant':<12}{'ms/step':>9}{'best':>8}{'cpu ms':>8}{'others':>7}{'img/s':>7}{'GFLOP':>7}"
          f"{'enc':>7}{'GFLOP/s':>8}{'enc tok':>8}{'params':>8}  what")
    for v in variants:
        sec, best = statistics.median(wall[v.name]), min(wall[v.name])
        busy = harness.median_others(times[v.name])
        rows[v.name] = {"what": v.what, "image_size": v.size, "ms_per_step": 1e3 * sec, "best_ms": 1e3 * best,
                        "cpu_ms_per_step": 1e3 * statistics.median(cpu[v.name]), "others_share": busy,
                        "images_per_s": v.images / sec, "fwd_bwd_gflop": v.flops / 1e9,
                        "encoder_fwd_bwd_gflop": v.encoder_flops / 1e9,
                        "gflop_per_s": v.flops / 1e9 / sec, "encoder_tokens_per_image": v.encoder_tokens,
                        "trainable_params": v.n_params, "per_round_ms": [1e3 * s for s in wall[v.name]],
                        "raw_steps_wall_ms_cpu_ms_others": harness.raw_turns(times[v.name], 1)}
        print(f"{v.name:<12}{1e3 * sec:>9.1f}{1e3 * best:>8.1f}{rows[v.name]['cpu_ms_per_step']:>8.1f}"
              f"{busy:>7.0%}{v.images / sec:>7.0f}{v.flops / 1e9:>7.2f}{v.encoder_flops / 1e9:>7.2f}"
              f"{v.flops / 1e9 / sec:>8.1f}"
              f"{v.encoder_tokens:>8}{v.n_params / 1e6:>7.2f}M  {v.what}")

    out, missed = {}, []
    print(f"\n{'ratio (wall clock unless said)':<52}{'median':>7}{'range':>14}{'best/best':>10}{'cpu':>7}"
          f"{'quiet (n)':>11}{'FLOPs':>7}  target")
    for label, num, den, kind, bound in ratio_rows(sizes):
        if num not in wall or den not in wall:
            out[label] = harness.not_measured(label, num, den, kind, bound, 52)
            continue
        r = harness.paired(wall, num, den, others)
        r.update(num=num, den=den, cpu_time_median=harness.paired(cpu, num, den)["median"],
                 flop_ratio=flops[num] / flops[den])
        quiet = harness.quiet_cell(r)
        line = (f"{label:<52}{r['median']:>7.3f}{r['min']:>7.3f}-{r['max']:<6.3f}{r['best_vs_best']:>10.3f}"
                f"{r['cpu_time_median']:>7.3f}{quiet:>11}{r['flop_ratio']:>7.3f}") + harness.judge(r, kind, bound)
        if kind is not None and not r["met"]:
            missed.append((label, num, den))
        out[label] = r
        print(line)
    print("GFLOP / enc = fwd+bwd FLOPs of the step / of its encoder (patch embedding + blocks), counted by "
          "torch.utils.flop_counter (matmul, conv, attention);\nFLOPs = the two sides' GFLOP ratio: the "
          "speed-up if time were proportional to FLOPs")
    for name, value in checks.items():
        print(f"check: {name} = {value:.4f}" if isinstance(value, float) else f"check: {name} = {value}")
    return {"variants": rows, "ratios": out, "missed": [m[0] for m in missed],
            "missed_variants": sorted({n for m in missed for n in m[1:]}), "checks": checks}


def phase_split(variants: list[Variant], reps: int) -> dict:
    """Median ms of the encoder fw+bw and of the decoder + loss fw+bw alone (first batch,
    mask made outside the timing, no optimizer) for ours and the mask-token baseline:
    where their step's time goes."""
    out = {}
    for v in variants:
        lit = v.model
        if not isinstance(lit, LitMAE):
            continue
        model, mtok = lit.model, isinstance(lit.model, MaskTokenMAE)
        mb = v.masked(v.batches.items[0])
        target = model.target(mb.targets)  # (B, N, P) norm-pix targets, made outside the timing
        enc_ms, dec_ms = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            with harness.autocast(v.args):
                latent = model.encode_all(mb.inputs, mb.loss_mask) if mtok else model.encode(mb.inputs, mb.keep_idx)
            latent.backward(torch.ones_like(latent))
            harness.sync()
            t1 = time.perf_counter()
            z = latent.detach().requires_grad_()
            with harness.autocast(v.args):
                pred = model.decode_all(z) if mtok else model.decode(z, mb.keep_idx)
                s, n = model.loss_sums(pred, target, mb.loss_mask)
            (s / n).backward()
            harness.sync()
            t2 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            enc_ms.append(1e3 * (t1 - t0))
            dec_ms.append(1e3 * (t2 - t1))
        out[v.name] = {"encoder_fwbw_ms": statistics.median(enc_ms), "decoder_loss_fwbw_ms": statistics.median(dec_ms)}
        print(f"phase: {v.name:<12} encoder fw+bw {out[v.name]['encoder_fwbw_ms']:7.1f} ms, "
              f"decoder + loss fw+bw {out[v.name]['decoder_loss_fwbw_ms']:7.1f} ms")
    return out


# ---------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds x 1 step, 64px only: a smoke run")
    p.add_argument("--sizes", help="comma-separated image sizes (default 64,224; quick 64)")
    p.add_argument("--rounds", type=int, help="round-robin repeats (default 5, quick 2)")
    p.add_argument("--steps", type=int, help="steps per variant per round (default 4, quick 1)")
    p.add_argument("--batches", type=int, default=8, help="distinct real batches cycled through (default 8)")
    harness.add_device_args(p)
    harness.add_output_args(p, "step", ", and time the encoder / decoder fw+bw of ours and masktok alone")
    a = p.parse_args(argv)
    a.sizes = [int(s) for s in (a.sizes or ("64" if a.quick else "64,224")).split(",")]
    for s in a.sizes:
        if s < PATCH or s % PATCH:
            p.error(f"--sizes: {s} must be a positive multiple of the patch size {PATCH}")
    a.rounds = a.rounds or (2 if a.quick else 5)
    a.steps = a.steps or (1 if a.quick else 4)
    return a


def environment(args, data_info: dict) -> dict:
    import lightning as L
    import transformers

    return {**harness.machine(), **harness.settings(args), "lightning": L.__version__,
            "transformers": transformers.__version__,
            "shape": {"patch": PATCH, "depth": DEPTH, "width": WIDTH, "heads": HEADS, "decoder_depth": DEC_DEPTH,
                      "decoder_width": DEC_WIDTH, "decoder_heads": DEC_HEADS, "batch": BATCH,
                      "mask_ratio": MASK_RATIO, "image_sizes": args.sizes},
            "data": {"source": data_info.get("data.source"), "batches": args.batches,
                     "note": f"tiny-imagenet train batches ({DATA_SIZE}px, augmented); other sizes bilinear-resized"},
            "rounds": args.rounds, "steps": args.steps,
            **harness.invocation()}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.check_device(args)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    start = time.perf_counter()
    data, data_info = fetch_batches(args.batches, args)
    env = environment(args, data_info)
    batches = {s: resized(data, s, device) for s in args.sizes}
    with harness.sdpa_kernel(args):
        variants = [v for s in args.sizes for v in variants_for(s, batches[s], args, device)]
        checks = {}

        def first_loss(v):  # sanity: norm-pix MSE of an untrained model is ~1 on every side
            checks[f"first-batch loss {v.name}"] = v.first_loss()

        variants, failed = harness.probe_all(variants, first_loss)
        for v in variants:
            with torch.no_grad():
                checks[f"SDPA calls, {v.name}"] = harness.sdpa_calls(lambda v=v: v.loss(v.batches.items[0]))
        for v in variants:
            v.count_flops()
        by_name = {v.name: v for v in variants}
        groups = [tuple(v.name for v in variants if v.size == s) for s in args.sizes]
        impl = harness.same_impl({v.name: harness.adamw_impl(v.opt) for v in variants})
        checks["AdamW implementation, every side"] = impl
        print(f"bench_mae: {env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}, "
              f"transformers {env['transformers']}, load {env['load_avg_start'][0]:.2f}")
        print(f"{args.device}, {args.precision}, SDPA kernel {args.sdpa_kernel}, AdamW {impl}; shape {env['shape']}; "
              f"data {data_info.get('data.source')} ({args.batches} batches); "
              f"{args.rounds} rounds x {args.steps} step(s), {len(variants)} variants", flush=True)
        harness.measure(by_name, groups, 1, 1, label="warm-up round (not measured)")
        times, loads = harness.measure(by_name, groups, args.rounds, args.steps)
        assert torch.get_num_threads() == args.threads, "something changed the thread count"
        result = report(variants, args.sizes, times, checks)
        result["load_avg_per_round"] = loads
        if args.profile:
            names = harness.profile_names(args.profile, result["missed_variants"], by_name)
            result["profiles"] = harness.profile(by_name, names, "one step, {ms:.0f} ms", "step_ms_under_profiler",
                                                 warm=True)
            result["phases"] = phase_split(variants, reps=5)
        result["failed"] = failed
    rc = harness.finish(args, env, result, start)
    return harness.report_failures(failed) or rc


if __name__ == "__main__":
    raise SystemExit(main())
