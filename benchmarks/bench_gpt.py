"""Training speed of masklab's LitGPT, side by side with a plain PyTorch loop and HF GPT-2.

One process, one shape (depth 4, width 256, 4 heads, T 256, batch 16, vocab 8192, tied
input and output embeddings), every side at the same settings: dropout 0, the AdamW
implementation LitGPT's ``configure_optimizers`` picks (fused), SDPA attention, the same
threads, device and precision, train mode.

How the variants are interleaved: every variant lives in its own worker thread and runs
exactly one step when handed the turn, then hands the turn back (only one thread works
at a time, so the variants never compete for the cores). A round gives every variant
``--steps`` turns, variant by variant, in groups of the variants that are compared with
each other (so a ratio's two sides run seconds apart), the order inside a group rotating
from round to round. The LitGPT variants are real ``lightning.Trainer.fit`` runs that
pause inside ``on_train_batch_end`` between turns; a measured Lightning step is the time
from the turn being handed over to the next ``on_train_batch_end``: the batch fetch,
every Lightning hook, forward, loss, backward, clipping, AdamW and the LR scheduler.
Per variant and round the figure is the mean of its steps (the median of its calls for
the attention microbenchmarks); the table gives the median over rounds, and each ratio is
the median of the per-round ratios (paired: both sides measured in the same round).
The variant table's "others" column is the median share of the machine's CPU that
other processes used during the variant's steps (from /proc/stat): 0% = a quiet machine.
Beside the median the ratio table gives three cross-checks: best/best (each side's
fastest round), cpu (the same paired median on process CPU time, ``time.process_time``,
which load from other processes inflates less than wall time; it counts OpenMP
spin-waits too) and quiet (the paired median over the rounds in which other processes
used < 10% of the machine during both sides' steps, with the number of such rounds).

Variants (a step = fetch a batch + forward + loss + backward (+ clip + AdamW step)):
  lit_fw, lit_fwbw        LitGPT driven by a real ``lightning.Trainer`` fit (the project's
                          ``build_trainer``: logger, progress bar, checkpoints off),
                          masking.p_bw = 0 / 1 (p_bw = 1 stacks fw and bw views: 2B rows);
                          its loader masks each batch with the run's ``MaskPlan`` (in
                          this process: the fetch is part of the measured step).
  plain_fw, plain_fwbw    the same nn.Module (``lit_modules.gpt.GPT``) in a hand-written
                          loop: AdamW (same groups and implementation), grad clip 1.0, LR schedule.
  hf_gpt2                 ``GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4,
                          n_positions=256, vocab_size=8192, resid_pdrop=0, embd_pdrop=0,
                          attn_pdrop=0), attn_implementation="sdpa")``: HF's default
                          activation gelu_new (the tanh approximation); same plain loop, fw only.
  hf_gpt2_gelu            the same with ``activation_function="gelu"`` (exact GELU, as ours):
                          the matched architecture.
  pass_fw, pass_bw        one forward+backward (no optimizer) of a fw-only / bw-only batch
                          of the library's causal-LM views (``stacked_views``): bw = flipped
                          sequence + is_causal.
  pass_bw_dense           the bw batch in original token order with a dense (T, T)
                          upper-triangular bool mask passed to SDPA (the same function).
  attn_causal, attn_dense_triu, attn_flip_causal
                          attention alone, forward+backward of one SDPA call
                          (B 16, H 4, T 256, D/H 64): is_causal on a sequence already in
                          reading order (what the model runs) / dense triu mask / flip
                          q, k, v, is_causal, flip back (the cost if the flip were per layer).
With ``--sdpa-kernel flash`` the two dense-mask variants are left out (flash takes no mask).

Usage:  python benchmarks/bench_gpt.py [--quick] [--json PATH] [--profile [missed|NAMES]]
                                       [--device cuda --precision bf16-mixed --sdpa-kernel flash]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

import harness  # noqa: E402
import lightning as L  # noqa: E402

from lit_modules.blocks import run_blocks  # noqa: E402
from lit_modules.config import load_run_config  # noqa: E402
from lit_modules.data.masked import Planned  # noqa: E402
from lit_modules.gpt import GPT  # noqa: E402
from lit_modules.masking.attention import Attention, backward_causal  # noqa: E402
from lit_modules.masking.batches import TokenWindows  # noqa: E402
from lit_modules.masking.causal_lm import DIRECTIONS, stacked_views  # noqa: E402
from lit_modules.registry import MODELS  # noqa: E402
from lit_modules.run import build_model, build_trainer  # noqa: E402

DEPTH, WIDTH, HEADS, T, BATCH, VOCAB = 4, 256, 4, 256, 16, 8192
N_BATCHES = 256  # synthetic windows per epoch: more steps than any run takes, so no epoch ends
FIT_STEPS = 1_000_000  # a Lightning fit runs until the benchmark stops it; also the LR schedule's length

TARGETS = {  # label: (numerator, denominator, kind, bound); ratio = time(numerator) / time(denominator)
    "LitGPT / plain loop, fw (throughput)": ("plain_fw", "lit_fw", ">=", 0.95),
    "LitGPT / plain loop, fw+bw (throughput)": ("plain_fwbw", "lit_fwbw", ">=", 0.95),
    "bw pass / fw pass (time)": ("pass_bw", "pass_fw", "<=", 1.10),
    "LitGPT / HF GPT-2, HF's gelu_new (throughput)": ("hf_gpt2", "lit_fw", ">=", 1.20),
    "LitGPT / HF GPT-2, exact gelu (throughput)": ("hf_gpt2_gelu", "lit_fw", ">=", 1.20),
}
INFO_RATIOS = {
    "plain loop / HF GPT-2, HF's gelu_new (throughput)": ("hf_gpt2", "plain_fw"),
    "plain loop / HF GPT-2, exact gelu (throughput)": ("hf_gpt2_gelu", "plain_fw"),
    "HF GPT-2 gelu_new / exact gelu (time)": ("hf_gpt2", "hf_gpt2_gelu"),
    "dense triu / flip+causal, whole-model pass (time)": ("pass_bw_dense", "pass_bw"),
    "dense triu / causal, attention only (time)": ("attn_dense_triu", "attn_causal"),
    "flip+causal+flip / causal, attention only (time)": ("attn_flip_causal", "attn_causal"),
    "LitGPT fw+bw step / LitGPT fw step (time)": ("lit_fwbw", "lit_fw"),
}
# Variants compared with each other run back to back (see the module docstring).
GROUPS = (
    ("lit_fw", "plain_fw", "hf_gpt2", "hf_gpt2_gelu"),
    ("lit_fwbw", "plain_fwbw"),
    ("pass_fw", "pass_bw", "pass_bw_dense"),
    ("attn_causal", "attn_dense_triu", "attn_flip_causal"),
)
DENSE = ("pass_bw_dense", "attn_dense_triu")  # need an attention mask: not with --sdpa-kernel flash


# ---------------------------------------------------------------- data
class Windows(Dataset):
    """Synthetic step-indexed batches: item ``step`` is a ``TokenWindows`` of B windows of
    block_size + 1 tokens (inputs and shifted targets), N_BATCHES distinct ones cycled."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, VOCAB, (N_BATCHES, BATCH, T + 1), generator=g)  # (N, B, T+1)

    def __len__(self) -> int:
        return FIT_STEPS

    def __getitem__(self, step: int) -> TokenWindows:
        return TokenWindows(self.data[step % N_BATCHES])


WINDOWS = Windows()


def make_loader(plan=None) -> DataLoader:
    """The windows, one batch per step; with a ``MaskPlan`` the loader masks them (as the
    project's data modules do: ``TrainItem`` s, masks made where the batch is assembled)."""
    return DataLoader(Planned(WINDOWS, plan), batch_size=None, shuffle=False, num_workers=0)


class Batches:
    """The next step's windows (B, T+1), on a device."""

    def __init__(self, device: torch.device):
        self.it, self.device = iter(make_loader()), device

    def next(self) -> torch.Tensor:
        return next(self.it).windows.to(self.device, non_blocking=True)


# ---------------------------------------------------------------- pieces of the plain loops
def fw_batch(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) -> inputs (B, T), targets (B, T)."""
    return window[:, :-1], window[:, 1:]


def fwbw_batch(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T+1) -> inputs (2B, T), targets (2B, T), direction (2B,): fw rows, then flipped rows."""
    rev = window.flip(1)
    inputs = torch.cat([window[:, :-1], rev[:, :-1]])
    targets = torch.cat([window[:, 1:], rev[:, 1:]])
    direction = torch.arange(2, device=window.device).repeat_interleave(window.shape[0])
    return inputs, targets, direction


def ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def optimizer_step(model, loss, opt, sched, clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()


def gpt_config_dict(p_bw: float, args, max_steps: int = FIT_STEPS) -> dict:
    return {
        "seed": 0,
        "data": {"name": "wikitext-2", "vocab_size": VOCAB, "batch_size": BATCH},
        "model": {"name": "gpt", "depth": DEPTH, "width": WIDTH, "heads": HEADS, "block_size": T,
                  "dropout": 0.0, "tie_embeddings": True},
        "masking": {"name": "causal-lm", "p_bw": p_bw},
        "trainer": {"max_steps": max_steps, "val_every": max_steps, **harness.trainer_settings(args),
                    "progress_bar": False, "checkpoint": False},
    }


class LitVariant(harness.Variant):
    """LitGPT trained by one ``lightning.Trainer.fit`` for the whole benchmark."""

    def __init__(self, name: str, what: str, p_bw: float, args):
        super().__init__(name, what, rows=2 * BATCH if p_bw >= 1 else BATCH)
        self.cfg = load_run_config(gpt_config_dict(p_bw, args))
        self.module = build_model(self.cfg)
        self.plan = MODELS.get("gpt").mask_plan(self.cfg, FIT_STEPS)
        self.adamw = harness.module_adamw_impl(self.module)
        self.what += f", AdamW {self.adamw}"

    def work(self) -> None:
        trainer = build_trainer(self.cfg, logger=None, callbacks=[harness.TurnTaker(self.baton)], checkpoint_dir=None)
        trainer.fit(self.module, train_dataloaders=make_loader(self.plan))


# ---------------------------------------------------------------- the variants
def plain_variants(args, device, impl: str) -> tuple[list[harness.Variant], dict]:
    out, checks = [], {}
    cfg = load_run_config(gpt_config_dict(0.0, args))
    for name, fwbw in (("plain_fw", False), ("plain_fwbw", True)):
        torch.manual_seed(0)
        model = GPT(cfg.model, VOCAB).to(device).train()
        opt, sched = harness.adamw(model, cfg.optim, FIT_STEPS, impl)
        batches = Batches(device)

        def loss_of(window, model=model, fwbw=fwbw):
            with harness.autocast(args):
                if fwbw:
                    inputs, targets, direction = fwbw_batch(window)
                    logits = model(inputs, direction, Attention(causal=True))  # (2B, T, V)
                    # Sum of the two per-direction mean losses (LitGPT's loss). Both directions
                    # score B*T tokens, so it is twice the mean over all 2B rows: one
                    # cross-entropy, where two on slices would each backprop a zero-filled
                    # (2B, T, V) gradient (~0.16 s more per step on the 2-core CPU).
                    return 2 * ce(logits, targets)
                inputs, targets = fw_batch(window)
                direction = torch.zeros(inputs.shape[0], dtype=torch.long, device=inputs.device)
                return ce(model(inputs, direction, Attention(causal=True)), targets)

        def step(model=model, opt=opt, sched=sched, batches=batches, loss_of=loss_of):
            optimizer_step(model, loss_of(batches.next()), opt, sched, cfg.optim.grad_clip)

        what = "plain loop, same GPT nn.Module, " + ("fw+bw (2B rows)" if fwbw else "fw only") + f", AdamW {impl}"
        out.append(harness.LoopVariant(name, what, step, rows=2 * BATCH if fwbw else BATCH))
        if not fwbw:
            checks["tied embeddings, ours"] = model.head.weight is model.tok_emb.weight
            checks["parameters, ours"] = sum(p.numel() for p in model.parameters())
            checks["SDPA calls, ours (fw step)"] = sdpa_check(lambda lo=loss_of: lo(WINDOWS.data[0].to(device)))
    return out, checks


def sdpa_check(fn) -> str:
    with torch.no_grad():
        return harness.sdpa_calls(fn)


def hf_variants(args, device, impl: str) -> tuple[list[harness.Variant], dict]:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT2Config keeps GPT-2's bos/eos id 50256, outside vocab 8192: only a warning, and no
    # training step uses those ids, so the warning is silenced rather than the config changed.
    transformers.logging.set_verbosity_error()
    optim = load_run_config(gpt_config_dict(0.0, args)).optim
    out, checks = [], {}
    for name, act in (("hf_gpt2", "gelu_new"), ("hf_gpt2_gelu", "gelu")):
        cfg = GPT2Config(n_layer=DEPTH, n_embd=WIDTH, n_head=HEADS, n_positions=T, vocab_size=VOCAB,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function=act)
        torch.manual_seed(0)
        model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").to(device).train()
        opt, sched = harness.adamw(model, optim, FIT_STEPS, impl)
        batches = Batches(device)

        def loss_of(window, model=model):
            inputs, targets = fw_batch(window)
            with harness.autocast(args):
                return ce(model(input_ids=inputs).logits, targets)

        def step(model=model, opt=opt, sched=sched, batches=batches, loss_of=loss_of):
            optimizer_step(model, loss_of(batches.next()), opt, sched, optim.grad_clip)

        c = model.config
        what = (f"HF GPT2LMHeadModel ({c._attn_implementation}, {c.activation_function}, dropout "
                f"{c.resid_pdrop}/{c.embd_pdrop}/{c.attn_pdrop}), plain loop, fw only, AdamW {impl}")
        out.append(harness.LoopVariant(name, what, step, rows=BATCH))
        checks[f"tied embeddings, {name}"] = model.lm_head.weight is model.transformer.wte.weight
        checks[f"parameters, {name}"] = sum(p.numel() for p in model.parameters())
        checks[f"SDPA calls, {name} (fw step)"] = sdpa_check(lambda lo=loss_of: lo(WINDOWS.data[0].to(device)))
    return out, checks


def dense_bw_logits(gpt: GPT, window: torch.Tensor) -> torch.Tensor:
    """The bw task in original token order with a dense upper-triangular mask.

    window (B, T+1) -> logits (B, T, V); logits[:, t] predicts window[:, t] from
    window[:, t+1:]. The same function as the flip form: x-position t sits at reading
    position T-1-t, and "reading position s sees s' <= s" becomes "key >= query" (triu).
    """
    x = window[:, 1:]  # (B, T)
    b, t = x.shape
    pos = torch.arange(t - 1, -1, -1, device=x.device)  # reading-order position of each x-position
    direction = torch.full((b,), DIRECTIONS["bw"], dtype=torch.long, device=x.device)
    h = gpt.tok_emb(x) + gpt.pos_emb(pos)[None] + gpt.dir_emb(direction)[:, None, :]  # (B, T, D)
    h = run_blocks(gpt.blocks, gpt.drop(h), Attention(mask=backward_causal(t, device=x.device)))
    return gpt.logits(h)


def pass_variants(args, device, dense: bool) -> tuple[list[harness.Variant], dict]:
    """fw-only, bw-only (flip + is_causal) and bw-only dense-mask forward+backward passes,
    and the max |difference| between the two bw forms' logits (they compute one function)."""
    torch.manual_seed(0)
    gpt = GPT(load_run_config(gpt_config_dict(0.0, args)).model, VOCAB).to(device).train()
    batches = Batches(device)

    def library_pass(direction: str):
        masked = stacked_views(batches.next(), (direction,))  # the causal-lm views, one direction
        with harness.autocast(args):
            logits = gpt(masked.inputs, masked.direction, masked.attention)  # (B, T, V)
            loss = ce(logits, masked.targets)
        loss.backward()
        gpt.zero_grad(set_to_none=True)

    def dense_pass():
        window = batches.next()
        with harness.autocast(args):
            loss = ce(dense_bw_logits(gpt, window), window[:, :-1])
        loss.backward()
        gpt.zero_grad(set_to_none=True)

    out = [
        harness.LoopVariant("pass_fw", "fw-only forward+backward (library masking, is_causal)",
                            lambda: library_pass("fw"), rows=BATCH),
        harness.LoopVariant("pass_bw", "bw-only forward+backward (flipped sequence, is_causal)",
                            lambda: library_pass("bw"), rows=BATCH),
    ]
    if not dense:
        return out, {}
    with torch.no_grad():
        window = WINDOWS.data[0, :4].to(device)
        masked = stacked_views(window, ("bw",))
        flip_form = gpt(masked.inputs, masked.direction, masked.attention).flip(1)
        diff = (flip_form - dense_bw_logits(gpt, window)).abs().max().item()
    out.append(harness.LoopVariant("pass_bw_dense", "bw-only forward+backward, original order, dense triu mask",
                                   dense_pass, rows=BATCH))
    return out, {"max |dense - flip| logits, bw model": diff}


def attention_variants(args, device, dense: bool) -> tuple[list[harness.Variant], dict]:
    """One SDPA call, forward+backward, at the model's per-layer shape (B, H, T, D/H)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, T, WIDTH // HEADS, generator=g).to(device).requires_grad_()
               for _ in range(3))
    grad = torch.randn(BATCH, HEADS, T, WIDTH // HEADS, generator=g).to(device)
    triu = backward_causal(T, device=device)

    def causal():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def dense_mask():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=triu)

    def flip_causal():
        qf, kf, vf = (z.flip(2) for z in (q, k, v))
        return F.scaled_dot_product_attention(qf, kf, vf, is_causal=True).flip(2)

    def fwd_bwd(fn):
        def step():
            with harness.autocast(args):
                y = fn()
            y.backward(grad.to(y.dtype))
            q.grad = k.grad = v.grad = None
        return step

    what = "attention only, 1 SDPA call fwd+bwd: "
    out = [
        harness.LoopVariant("attn_causal", what + "is_causal (sequence already in reading order)", fwd_bwd(causal),
                            rows=BATCH),
        harness.LoopVariant("attn_flip_causal", what + "flip q,k,v + is_causal + flip back", fwd_bwd(flip_causal),
                            rows=BATCH),
    ]
    if not dense:
        return out, {}
    with torch.no_grad():
        diff = (dense_mask() - flip_causal()).abs().max().item()
    out.append(harness.LoopVariant("attn_dense_triu", what + "dense (T, T) triu bool mask", fwd_bwd(dense_mask),
                                   rows=BATCH))
    return out, {"max |dense - flip| attention output": diff}


# ---------------------------------------------------------------- measurement
def is_attention(group) -> bool:
    return group[0].startswith("attn_")


def report(variants: list[harness.Variant], times, checks: dict) -> dict:
    names = {v.name for v in variants}
    wall = {v.name: harness.per_round(times[v.name], v.name.startswith("attn_"), 0) for v in variants}
    cpu = {v.name: harness.per_round(times[v.name], v.name.startswith("attn_"), 1) for v in variants}
    others = {v.name: harness.per_round(times[v.name], False, 2) for v in variants}
    rows = {}
    print(f"\n{'variant':<17}{'ms/step':>9}{'best':>8}{'cpu ms':>8}{'others':>7}{'tokens/s':>10}{'pred/s':>9}  what")
    for v in variants:
        sec, best = statistics.median(wall[v.name]), min(wall[v.name])
        busy = harness.median_others(times[v.name])
        rows[v.name] = {"what": v.what, "ms_per_step": 1e3 * sec, "best_ms": 1e3 * best,
                        "cpu_ms_per_step": 1e3 * statistics.median(cpu[v.name]),
                        "others_share": busy,
                        "tokens_per_s": BATCH * T / sec, "predictions_per_s": v.rows * T / sec,
                        "per_round_ms": [1e3 * s for s in wall[v.name]],
                        "raw_steps_wall_ms_cpu_ms_others": harness.raw_turns(times[v.name], 1)}
        print(f"{v.name:<17}{1e3 * sec:>9.1f}{1e3 * best:>8.1f}{rows[v.name]['cpu_ms_per_step']:>8.1f}"
              f"{busy:>7.0%}{BATCH * T / sec:>10,.0f}{v.rows * T / sec:>9,.0f}  {v.what}")

    out, missed = {}, []
    print(f"\n{'ratio (wall clock unless said)':<51}{'median':>7}{'range':>14}{'best/best':>10}{'cpu':>7}"
          f"{'quiet (n)':>12}  target")
    for label, num, den, kind, bound in harness.ratio_rows(TARGETS, INFO_RATIOS):
        if num not in names or den not in names:
            out[label] = harness.not_measured(label, num, den, kind, bound, 51)
            continue
        r = harness.paired(wall, num, den, others)
        r.update(num=num, den=den, cpu_time_median=harness.paired(cpu, num, den)["median"])
        quiet = harness.quiet_cell(r)
        line = (f"{label:<51}{r['median']:>7.3f}{r['min']:>7.3f}-{r['max']:<6.3f}{r['best_vs_best']:>10.3f}"
                f"{r['cpu_time_median']:>7.3f}{quiet:>12}") + harness.judge(r, kind, bound)
        if kind is not None and not r["met"]:
            missed.append(label)
        out[label] = r
        print(line)
    share = DEPTH * rows["attn_causal"]["ms_per_step"] / rows["pass_fw"]["ms_per_step"]
    print(f"\nattention share of a fw pass ({DEPTH} x attn_causal / pass_fw): {share:.0%}")
    for name, value in checks.items():
        print(f"check: {name} = {value:.2e}" if isinstance(value, float) else f"check: {name} = {value}")
    return {"variants": rows, "ratios": out, "missed": missed, "attention_share_of_fw_pass": share,
            "checks": checks}


# ---------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds x 1 step, 3 attention calls: a smoke run")
    p.add_argument("--rounds", type=int, help="round-robin repeats (default 5, quick 2)")
    p.add_argument("--steps", type=int, help="steps per variant per round (default 3, quick 1)")
    p.add_argument("--micro-reps", type=int, help="attention calls per variant per round (default 7, quick 3)")
    harness.add_device_args(p)
    harness.add_output_args(p, "step")
    a = p.parse_args(argv)
    a.rounds = a.rounds or (2 if a.quick else 5)
    a.steps = a.steps or (1 if a.quick else 3)
    a.micro_reps = a.micro_reps or (3 if a.quick else 7)
    return a


def environment(args) -> dict:
    import transformers

    return {**harness.machine(), **harness.settings(args), "lightning": L.__version__,
            "transformers": transformers.__version__,
            "shape": {"depth": DEPTH, "width": WIDTH, "heads": HEADS, "seq": T, "batch": BATCH, "vocab": VOCAB},
            "data": f"synthetic uniform token windows ({N_BATCHES} batches cycled)",
            "rounds": args.rounds, "steps": args.steps, "micro_reps": args.micro_reps,
            **harness.invocation()}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.check_device(args)
    torch.set_num_threads(args.threads)
    harness.quiet_lightning()
    start = time.perf_counter()
    env = environment(args)
    dense = args.sdpa_kernel != "flash"
    groups = tuple(tuple(n for n in g if dense or n not in DENSE) for g in GROUPS)
    variants = []
    try:
        with harness.sdpa_kernel(args):
            lit = [LitVariant("lit_fw", "LitGPT, lightning.Trainer fit, p_bw = 0", 0.0, args),
                   LitVariant("lit_fwbw", "LitGPT, lightning.Trainer fit, p_bw = 1 (2B rows)", 1.0, args)]
            impl = harness.same_impl({v.name: v.adamw for v in lit})
            plain, checks = plain_variants(args, device, impl)
            hf, hf_checks = hf_variants(args, device, impl)
            passes, pass_checks = pass_variants(args, device, dense)
            attn, attn_checks = attention_variants(args, device, dense)
            checks = {**checks, **hf_checks, **pass_checks, **attn_checks, "AdamW implementation, every side": impl}
            variants = [*lit, *plain, *hf, *passes, *attn]
            assert sorted(v.name for v in variants) == sorted(n for g in groups for n in g)
            print(f"bench_gpt: {env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}, "
                  f"lightning {env['lightning']}, transformers {env['transformers']}, "
                  f"load {env['load_avg_start'][0]:.2f}")
            print(f"{args.device}, {args.precision}, SDPA kernel {args.sdpa_kernel}, AdamW {impl}; shape {env['shape']}; "
                  f"{args.rounds} rounds x {args.steps} step(s), {args.micro_reps} attention calls, "
                  f"{len(variants)} variants", flush=True)
            variants, failed = harness.start_all(variants)
            by_name = {v.name: v for v in variants}
            groups = [kept for g in groups if (kept := tuple(n for n in g if n in by_name))]
            harness.measure(by_name, groups, 1, 1, 1, is_attention, label="warm-up round (not measured)")
            times, loads = harness.measure(by_name, groups, args.rounds, args.steps, args.micro_reps, is_attention)
            assert torch.get_num_threads() == args.threads, "something changed the thread count"
            result = report(variants, times, checks)
            result.update(load_avg_per_round=loads, failed_to_start=failed)
            if args.profile:
                missed = [n for label in result["missed"] for n in TARGETS[label][:2]]
                result["profiles"] = harness.profile(by_name, harness.profile_names(args.profile, missed, by_name),
                                                     "one step, {ms:.0f} ms", "step_ms_under_profiler",
                                                     all_threads=True)
    finally:
        harness.close_all(variants)
    rc = harness.finish(args, env, result, start)
    return harness.report_failures(failed) or rc


if __name__ == "__main__":
    raise SystemExit(main())
