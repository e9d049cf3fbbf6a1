"""Training speed of masklab's LitBERT, side by side with HF transformers' BertForMaskedLM.

One process, one "BERT-mini" shape (depth 4, width 256, 4 heads, T 128, batch 32,
vocab 8192, MLM decoder tied to the input embedding on both sides), real text: the batches
are the masklab ``wikitext-2`` data module's masked-LM batches (``[CLS] text [SEP]
[PAD]...``, SentencePiece BPE 8192 trained on wiki.valid.raw, rows cut at a line end so
~9% of positions are padding), the same token rows on both sides. Every side runs at the
same settings: dropout 0, the AdamW implementation LitBERT's ``configure_optimizers``
picks (fused), SDPA attention with the padding mask, the same threads, device and
precision, train mode.

Measured (a step = fetch + collate a batch + mask + forward + loss + backward + clip 1.0 +
AdamW + LR scheduler):
  plain_bert        LitBERT (``mlm-random``, 15%, 80/10/10) in a hand-written loop:
                    ``MLMTrainBatches[step]`` (the data module's fetch + pack), the run's
                    ``MaskPlan.train_item`` (the masks the data pipeline would draw, here
                    in the step), ``LitBERT._shared_step(item, "train")`` (encode +
                    gathered head + loss), then AdamW (LitBERT's groups and implementation)
                    and the LR schedule.
                    This is the variant the target is set on: the HF reference runs in the
                    same kind of loop, so both sides do the same work around the model.
  plain_bert_full   the same with the common MLM head instead of the gathered one: logits at
                    all B*T positions, cross-entropy with ignore_index (``LitBERTFullHead``
                    below): LitBERT without its head feature, for the ratio without it.
  lit_bert          the same LitBERT driven by a real ``lightning.Trainer`` fit (the project's
                    ``build_trainer``: logger, progress bar, checkpoints off) over the data
                    module's train loader; timed from the handover to the next
                    ``on_train_batch_end`` (every Lightning hook included). Info only.
  hf_bert           ``BertForMaskedLM(BertConfig(vocab_size=8192, hidden_size=256,
                    num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                    max_position_embeddings=128, pad_token_id=5, hidden_dropout_prob=0,
                    attention_probs_dropout_prob=0), attn_implementation="sdpa")``
                    (random init, nothing downloaded; pad_token_id = our [PAD] id), its
                    batches made by ``DataCollatorForLanguageModeling(mlm_probability=0.15,
                    pad_to_multiple_of=128)`` from per-row ``input_ids`` + ``special_tokens_mask``
                    lists (what HF's run_mlm.py hands it), the loss of the model's own
                    ``labels`` path; same loop, AdamW groups, implementation and
                    hyperparameters as ours. (HF's default dropout is 0.1; LitBERT trains
                    with 0.0, so both run at 0.)
The collator needs a tokenizer: a ``PreTrainedTokenizerFast`` wrapped around an in-memory
``tokenizers`` WordLevel model whose 8192 ids are ours, with <unk> = 0, </s> = 1 (eos),
[CLS] = 2, [SEP] = 3, [MASK] = 4, [PAD] = 5 as its special tokens -- so HF never selects the
ids our ``eligible`` excludes, and draws random replacements from all 8192 ids (as HF does).

Masking throughput (one call, the same (32, 128) batch, on the CPU where the data pipeline
runs; a turn makes MASK_CALLS calls, the figure is the median over ``--micro-reps`` turns,
per call):
  mask_ours         ``MLMRandom(mask_ratio=0.15)`` on the batch tensors: content keys,
                    counter-hash noise, exact per-row count, 80/10/10 replacement.
  mask_hf           ``collator.torch_mask_tokens(tokens.clone(), special_tokens_mask)``: the
                    tensor-to-tensor part of the HF collator (Bernoulli 15%, 80/10/10).
  mask_ours_collate ``data.mlm.pack`` of the batch's rows (numpy piece ids) + ``MLMRandom``.
  mask_hf_collate   the whole collator call on the batch's example dicts (pad + mask).

Gathered head vs the head at every position (our BERT nn.Module, one fixed masked batch,
no optimizer):
  pass_gathered     encode + ``masked_logits`` (the head at the M ~ 540 selected rows: 15% of
                    the ~3.6k eligible tokens of the 4096 positions).
  pass_full         encode + ``head`` at all B*T positions (B, T, V) + cross-entropy with
                    ignore_index at the unselected positions (the common implementation;
                    the same loss, checked).
  head_gathered, head_full   the head + loss alone on fixed hidden states, fw+bw.

How the variants are interleaved (as in bench_gpt.py): every variant lives in its own worker
thread and runs one step when handed the turn (one thread works at a time). A round gives
every variant ``--steps`` turns in groups of the variants compared with each other, the order
inside a group rotating from round to round. Per variant and round the figure is the mean of
its steps (the median of its calls for the masking group); the table gives the median over
rounds, each ratio the median of the per-round ratios (paired). Cross-checks beside it:
best/best, cpu (the paired median on process CPU time) and quiet (rounds in which other
processes used < 10% of the machine during both sides' steps).

Usage:  python benchmarks/bench_bert.py [--quick] [--json PATH] [--profile [missed|NAMES]]
                                        [--device cuda --precision bf16-mixed --sdpa-kernel efficient]
(flash takes no attention mask, and both sides pass the padding mask: on CUDA the
mem-efficient kernel is the fused one they can share.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere in the repo

import harness  # noqa: E402
import lightning as L  # noqa: E402

from lit_modules.bert import BERT, LitBERT  # noqa: E402
from lit_modules.config import load_run_config  # noqa: E402
from lit_modules.data.mlm import CLS, EOS, MASK, PAD, SEP, pack  # noqa: E402
from lit_modules.masking import MaskContext  # noqa: E402
from lit_modules.paths import Workspace  # noqa: E402
from lit_modules.run import build_datamodule, build_model, build_trainer  # noqa: E402

DEPTH, WIDTH, HEADS, T, BATCH, VOCAB = 4, 256, 4, 128, 32, 8192
MASK_RATIO = 0.15
N_BATCHES = 64  # distinct batches cycled through (steps 0..63 of the data module)
FIT_STEPS = 1_000_000  # a Lightning fit runs until the benchmark stops it
MASK_CALLS = 20  # masking calls per timed turn: one call is ~1 ms, too short to time alone

TARGETS = {  # label: (numerator, denominator, kind, bound); ratio = time(numerator) / time(denominator)
    "LitBERT / HF BertForMaskedLM, plain loop (throughput)": ("hf_bert", "plain_bert", ">=", 1.30),
}
INFO_RATIOS = {
    "LitBERT without gathered head / HF (throughput)": ("hf_bert", "plain_bert_full"),
    "full head / gathered head, LitBERT training step (time)": ("plain_bert_full", "plain_bert"),
    "LitBERT Lightning fit / HF (throughput)": ("hf_bert", "lit_bert"),
    "Lightning fit / plain loop, LitBERT (time)": ("lit_bert", "plain_bert"),
    "masking: ours / HF torch_mask_tokens (throughput)": ("mask_hf", "mask_ours"),
    "collate+mask: ours / HF collator call (throughput)": ("mask_hf_collate", "mask_ours_collate"),
    "full head / gathered head, fw+bw pass (time)": ("pass_full", "pass_gathered"),
    "full head / gathered head, head+loss only (time)": ("head_full", "head_gathered"),
}
# Variants compared with each other run back to back (see the module docstring).
GROUPS = (
    ("plain_bert", "plain_bert_full", "hf_bert", "lit_bert"),
    ("pass_gathered", "pass_full", "head_gathered", "head_full"),
    ("mask_ours", "mask_hf", "mask_ours_collate", "mask_hf_collate"),
)
MICRO = {"mask_ours", "mask_hf", "mask_ours_collate", "mask_hf_collate"}


# ---------------------------------------------------------------- config and data
def bert_config_dict(args, max_steps: int = FIT_STEPS) -> dict:
    return {
        "seed": 0,
        "data": {"name": "wikitext-2", "vocab_size": VOCAB, "batch_size": BATCH},
        "model": {"name": "bert", "depth": DEPTH, "width": WIDTH, "heads": HEADS, "block_size": T, "dropout": 0.0},
        "masking": {"name": "mlm-random", "mask_ratio": MASK_RATIO},
        "trainer": {"max_steps": max_steps, "val_every": max_steps, **harness.trainer_settings(args),
                    "progress_bar": False, "checkpoint": False},
    }


def to_device(batch, device: torch.device):
    """A typed batch or item (``.to``), or HF's dict of tensors, on ``device``."""
    if not isinstance(batch, dict):
        return batch.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def workspace() -> Workspace:
    """Tokenizer cache in the git-ignored output dir; the shared data beside the repo."""
    out = os.environ.get("MASKLAB_OUTPUT_DIR") or REPO / "masklab-runs"
    data = os.environ.get("MASKLAB_DATA_DIR") or REPO.parent / "shared" / "data"
    return Workspace.resolve(out, data)


def rows_of(batch) -> list[torch.Tensor]:
    """The valid ids of each row ([CLS] text [SEP]) of a ``TokenRows``, padding dropped."""
    return [row[v] for row, v in zip(batch.tokens, batch.valid)]


class Data:
    """The data module's first N_BATCHES training batches, and the same rows for HF."""

    def __init__(self, dm, hf_tokenizer):
        self.dm = dm
        planned = dm.train_dataloader().dataset  # item = TrainItem of that step (masks drawn)
        self.ds, self.plan = planned.base, planned.plan  # MLMTrainBatches: TokenRows of that step; the run's MaskPlan
        self.batches = [self.ds[i] for i in range(N_BATCHES)]
        # HF examples as run_mlm.py's tokenization map leaves them: ids + special_tokens_mask.
        self.examples = []
        for b in self.batches:
            ex = []
            for ids in rows_of(b):
                ids = ids.tolist()
                ex.append({"input_ids": ids, "special_tokens_mask":
                           hf_tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)})
            self.examples.append(ex)
        b0 = self.batches[0]
        hf_special = torch.tensor(self.examples[0][0]["special_tokens_mask"], dtype=torch.bool)
        assert torch.equal(hf_special, ~b0.eligible[0, : len(hf_special)]), "HF specials != ~eligible"

    def item(self, rows, step: int, device: torch.device):
        """The training item of ``rows``: masks drawn on the CPU, as the data pipeline
        draws them, then moved to ``device``."""
        return to_device(self.plan.train_item(rows, step), device)

    def stats(self) -> dict:
        valid = torch.cat([b.valid for b in self.batches]).float()
        eligible = torch.cat([b.eligible for b in self.batches]).float()
        return {"valid_share": valid.mean().item(), "eligible_share": eligible.mean().item(),
                "full_length_rows": (valid.sum(1) == T).float().mean().item()}


def hf_tokenizer():
    """A PreTrainedTokenizerFast over our 8192 ids, specials at our ids; no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {0: "<unk>", EOS: "</s>", CLS: "[CLS]", SEP: "[SEP]", MASK: "[MASK]", PAD: "[PAD]"}
    vocab = {names.get(i, f"p{i}"): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                  pad_token="[PAD]")
    assert len(out) == VOCAB and out.pad_token_id == PAD and out.mask_token_id == MASK
    return out


def hf_collator(tokenizer):
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=MASK_RATIO, pad_to_multiple_of=T, seed=0)


# ---------------------------------------------------------------- models and loops
def optimizer_step(model, loss, opt, sched, clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()


class LitBERTFullHead(LitBERT):
    """LitBERT with the common MLM head: logits at every position (B, T, V), cross-entropy
    with ignore_index at the unselected ones. The same loss as the gathered head."""

    def _loss(self, masked, valid, where=None):
        """``where`` (the listed positions) is not needed: the head runs at every position."""
        h = self.model.encode(masked.inputs, valid)
        logits = self.model.head(h)  # (B, T, V)
        labels = masked.targets.masked_fill(~masked.loss_mask, -100)  # (B, T): scored positions only
        ce = F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels.reshape(-1), ignore_index=-100,
                             reduction="sum")
        # Accuracy at the scored rows only, as LitBERT computes it (no argmax over all B*T rows).
        correct = (logits[masked.loss_mask].argmax(-1) == masked.targets[masked.loss_mask]).sum()
        return ce, correct.float(), masked.loss_mask.sum().float()


class LitVariant(harness.Variant):
    """LitBERT trained by one ``lightning.Trainer.fit`` for the whole benchmark."""

    def __init__(self, name: str, what: str, dm, args):
        super().__init__(name, what)
        self.dm, self.cfg = dm, load_run_config(bert_config_dict(args))
        self.module = build_model(self.cfg)
        self.adamw = harness.module_adamw_impl(self.module)
        self.what += f", AdamW {self.adamw}"

    def work(self) -> None:
        trainer = build_trainer(self.cfg, logger=None, callbacks=[harness.TurnTaker(self.baton)], checkpoint_dir=None)
        trainer.fit(self.module, train_dataloaders=self.dm.train_dataloader())


# ---------------------------------------------------------------- the variants
def step_variants(data: Data, tokenizer, args, device, impl: str) -> tuple[list[harness.Variant], dict]:
    """plain_bert, plain_bert_full, hf_bert (the step comparison) and their checks."""
    import lightning as L
    import transformers
    from transformers import BertConfig, BertForMaskedLM

    transformers.logging.set_verbosity_error()
    cfg = load_run_config(bert_config_dict(args))
    clip = cfg.optim.grad_clip
    out, info = [], {}
    for name, cls, what in (("plain_bert", LitBERT, "gathered head (masked_logits)"),
                            ("plain_bert_full", LitBERTFullHead, "head at every position, CE ignore_index")):
        L.seed_everything(cfg.seed, verbose=False)
        lit = cls(cfg.to_dict()).to(device).train()
        opt, sched = harness.adamw(lit, cfg.optim, FIT_STEPS, impl)
        count = {"i": 0}

        def loss_of(item, lit=lit):
            with harness.autocast(args):
                return lit._shared_step(item, "train")[0]

        def plain_step(lit=lit, opt=opt, sched=sched, count=count, loss_of=loss_of):
            step = count["i"]
            rows = data.ds[step % N_BATCHES]  # the data module's fetch + pack
            count["i"] += 1
            optimizer_step(lit, loss_of(data.item(rows, step, device)), opt, sched, clip)

        out.append(harness.LoopVariant(name, f"LitBERT._shared_step (mlm-random 15%), {what}, plain loop, "
                                             f"AdamW {impl}", plain_step))
        info[f"SDPA calls, {name}"] = sdpa_check(lambda lo=loss_of: lo(data.item(data.batches[0], 0, device)))
        if name == "plain_bert":
            info["parameters, ours"] = sum(p.numel() for p in lit.parameters())
    collator = hf_collator(tokenizer)
    hcfg = BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                      intermediate_size=4 * WIDTH, max_position_embeddings=T, pad_token_id=PAD,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForMaskedLM._from_config(hcfg, attn_implementation="sdpa").to(device).train()
    h_opt, h_sched = harness.adamw(model, cfg.optim, FIT_STEPS, impl)
    h_count = {"i": 0}

    def hf_loss(batch):
        with harness.autocast(args):
            return model(**batch).loss

    def hf_step():
        batch = to_device(collator(data.examples[h_count["i"] % N_BATCHES]), device)  # pad + mask
        h_count["i"] += 1
        optimizer_step(model, hf_loss(batch), h_opt, h_sched, clip)

    c = model.config
    what = (f"HF BertForMaskedLM ({c._attn_implementation}, {c.hidden_act}, dropout {c.hidden_dropout_prob}/"
            f"{c.attention_probs_dropout_prob}) + HF collator, plain loop, AdamW {impl}")
    out.append(harness.LoopVariant("hf_bert", what, hf_step))
    info["parameters, HF"] = sum(p.numel() for p in model.parameters())
    info["MLM decoder tied to the input embedding, HF"] = (
        model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight)
    info["SDPA calls, hf_bert"] = sdpa_check(lambda: hf_loss(to_device(collator(data.examples[0]), device)))
    return out, info


def sdpa_check(fn) -> str:
    with torch.no_grad():
        return harness.sdpa_calls(fn)


def head_variants(data: Data, args, device) -> tuple[list[harness.Variant], dict]:
    """The gathered head vs the head at every position, in a whole pass and alone."""
    cfg = load_run_config(bert_config_dict(args))
    torch.manual_seed(0)
    bert = BERT(cfg.model, VOCAB).to(device).train()
    item = data.item(data.batches[0], 0, device)  # the training masks of the run config
    masked = item.masked
    valid, sel = item.batch.valid, masked.loss_mask
    labels = masked.targets.masked_fill(~sel, -100)  # (B, T): scored positions only

    def gathered_loss(h):
        logits = bert.masked_logits(h, sel)  # (M, V)
        return F.cross_entropy(logits.float(), masked.targets[sel])

    def full_loss(h):
        logits = bert.head(h)  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels.reshape(-1), ignore_index=-100)

    def whole_pass(loss_fn):
        def step():
            with harness.autocast(args):
                loss = loss_fn(bert.encode(masked.inputs, valid))
            loss.backward()
            bert.zero_grad(set_to_none=True)
        return step

    h0 = bert.encode(masked.inputs, valid).detach().requires_grad_()  # (B, T, D)

    def head_only(loss_fn):
        def step():
            with harness.autocast(args):
                loss = loss_fn(h0)
            loss.backward()
            bert.zero_grad(set_to_none=True)
            h0.grad = None
        return step

    with torch.no_grad():
        diff = (gathered_loss(h0) - full_loss(h0)).abs().item()
    m = int(sel.sum())
    return [
        harness.LoopVariant("pass_gathered", f"BERT fw+bw, head at the {m} selected rows (masked_logits)",
                    whole_pass(gathered_loss)),
        harness.LoopVariant("pass_full", f"BERT fw+bw, head at all {BATCH * T} positions, CE ignore_index",
                    whole_pass(full_loss)),
        harness.LoopVariant("head_gathered", "head + loss fw+bw on fixed h, selected rows", head_only(gathered_loss)),
        harness.LoopVariant("head_full", "head + loss fw+bw on fixed h, every position", head_only(full_loss)),
    ], {"max |gathered - full| loss": diff, "scored rows M (head batch)": m}


def mask_variants(data: Data, tokenizer, args) -> tuple[list[harness.Variant], dict]:
    """Masking alone, on the CPU: our strategy vs the HF collator, on tensors and from rows."""
    cfg = load_run_config(bert_config_dict(args))
    strategy = cfg.masking
    batch = data.batches[0]
    word_start = data.dm.word_start
    rows = [r[1:-1].numpy() for r in rows_of(batch)]  # piece ids without [CLS]/[SEP]
    collator = hf_collator(tokenizer)
    special = (~batch.eligible).long()  # (B, T) what the HF collator gets from pad()
    ctx = MaskContext(seed=0, mask_index=0, stage="train")

    def ours(b=batch):
        return strategy(b, ctx)

    def hf():
        return collator.torch_mask_tokens(batch.tokens.clone(), special_tokens_mask=special)

    def ours_collate():
        return ours(pack(rows, T, word_start, VOCAB))

    def hf_collate():
        return collator(data.examples[0])

    # Same input on both sides: HF's padded batch is our batch, its specials our ~eligible.
    assert torch.equal(hf_collate()["input_ids"].ne(PAD), batch.valid), "HF padding != ours"
    assert torch.equal(pack(rows, T, word_start, VOCAB).tokens, batch.tokens)
    ours_share = ours().loss_mask.sum().item() / batch.eligible.sum().item()
    hf_share = statistics.fmean((hf()[1] != -100).sum().item() / batch.eligible.sum().item() for _ in range(50))
    what = f"{MASK_CALLS} calls per turn, figures per call: "
    return [
        harness.LoopVariant("mask_ours", what + "MLMRandom 15% on the (B, T) tensors", ours, MASK_CALLS),
        harness.LoopVariant("mask_hf", what + "HF torch_mask_tokens on the same tensors", hf, MASK_CALLS),
        harness.LoopVariant("mask_ours_collate", what + "data.mlm.pack of the rows + MLMRandom", ours_collate, MASK_CALLS),
        harness.LoopVariant("mask_hf_collate", what + "HF collator call on the rows (pad + mask)", hf_collate, MASK_CALLS),
    ], {"selected share of eligible, ours (exact)": ours_share,
        "selected share of eligible, HF (Bernoulli, mean of 50)": hf_share}


# ---------------------------------------------------------------- measurement
def is_masking(group) -> bool:
    return group[0] in MICRO


def report(variants: list[harness.Variant], times, checks: dict) -> dict:
    wall = {v.name: harness.per_round(times[v.name], v.name in MICRO, 0) for v in variants}
    cpu = {v.name: harness.per_round(times[v.name], v.name in MICRO, 1) for v in variants}
    others = {v.name: harness.per_round(times[v.name], False, 2) for v in variants}
    rows = {}
    print(f"\n{'variant':<18}{'ms/call':>9}{'best':>8}{'cpu ms':>8}{'others':>7}{'seq/s':>10}{'tokens/s':>12}  what")
    for v in variants:
        sec, best = statistics.median(wall[v.name]), min(wall[v.name])
        busy = harness.median_others(times[v.name])
        rows[v.name] = {"what": v.what, "ms_per_call": 1e3 * sec, "best_ms": 1e3 * best,
                        "cpu_ms_per_call": 1e3 * statistics.median(cpu[v.name]), "others_share": busy,
                        "sequences_per_s": BATCH / sec, "tokens_per_s": BATCH * T / sec,
                        "per_round_ms": [1e3 * s for s in wall[v.name]],
                        "raw_wall_ms_cpu_ms_others": harness.raw_turns(times[v.name], 2)}
        print(f"{v.name:<18}{1e3 * sec:>9.1f}{1e3 * best:>8.1f}{rows[v.name]['cpu_ms_per_call']:>8.1f}"
              f"{busy:>7.0%}{BATCH / sec:>10,.0f}{BATCH * T / sec:>12,.0f}  {v.what}")

    out, missed = {}, []
    print(f"\n{'ratio (wall clock unless said)':<55}{'median':>7}{'range':>14}{'best/best':>10}{'cpu':>7}"
          f"{'quiet (n)':>12}  target")
    for label, num, den, kind, bound in harness.ratio_rows(TARGETS, INFO_RATIOS):
        if num not in wall or den not in wall:
            out[label] = harness.not_measured(label, num, den, kind, bound, 55)
            continue
        r = harness.paired(wall, num, den, others)
        r.update(num=num, den=den, cpu_time_median=harness.paired(cpu, num, den)["median"])
        quiet = harness.quiet_cell(r)
        line = (f"{label:<55}{r['median']:>7.3f}{r['min']:>7.3f}-{r['max']:<6.3f}{r['best_vs_best']:>10.3f}"
                f"{r['cpu_time_median']:>7.3f}{quiet:>12}") + harness.judge(r, kind, bound)
        if kind is not None and not r["met"]:
            missed.append(label)
        out[label] = r
        print(line)
    print()
    for name, value in checks.items():
        print(f"check: {name} = {value:.4g}" if isinstance(value, float) else f"check: {name} = {value}")
    return {"variants": rows, "ratios": out, "missed": missed, "checks": checks}


# ---------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds x 1 step, 3 masking turns: a smoke run")
    p.add_argument("--rounds", type=int, help="round-robin repeats (default 5, quick 2)")
    p.add_argument("--steps", type=int, help="steps per variant per round (default 3, quick 1)")
    p.add_argument("--micro-reps", type=int, help="masking turns per variant per round (default 5, quick 3)")
    harness.add_device_args(p)
    harness.add_output_args(p, "step")
    a = p.parse_args(argv)
    a.rounds = a.rounds or (2 if a.quick else 5)
    a.steps = a.steps or (1 if a.quick else 3)
    a.micro_reps = a.micro_reps or (3 if a.quick else 5)
    return a


def environment(args) -> dict:
    import transformers

    return {**harness.machine(), **harness.settings(args), "lightning": L.__version__,
            "transformers": transformers.__version__,
            "shape": {"depth": DEPTH, "width": WIDTH, "heads": HEADS, "seq": T, "batch": BATCH, "vocab": VOCAB},
            "rounds": args.rounds, "steps": args.steps, "micro_reps": args.micro_reps, "mask_calls": MASK_CALLS,
            **harness.invocation()}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.check_device(args)
    torch.set_num_threads(args.threads)
    harness.quiet_lightning()
    start = time.perf_counter()
    env = environment(args)
    dm = build_datamodule(load_run_config(bert_config_dict(args)), workspace())  # trains the tokenizer once
    tokenizer = hf_tokenizer()
    data = Data(dm, tokenizer)
    env["data"] = {**dm.info, **data.stats(), "batches": N_BATCHES}
    variants = []
    try:
        with harness.sdpa_kernel(args):
            lit = LitVariant("lit_bert", "LitBERT, lightning.Trainer fit, mlm-random 15%", dm, args)
            steps, info = step_variants(data, tokenizer, args, device, lit.adamw)
            heads, head_checks = head_variants(data, args, device)
            masks, mask_checks = mask_variants(data, tokenizer, args)
            variants = [*steps, lit, *heads, *masks]
            assert sorted(v.name for v in variants) == sorted(n for g in GROUPS for n in g)
            checks = {**info, **head_checks, **mask_checks, "AdamW implementation, every side": lit.adamw}
            print(f"bench_bert: {env['cpu']}, {env['torch_threads']} threads, torch {env['torch']}, "
                  f"lightning {env['lightning']}, transformers {env['transformers']}, "
                  f"load {env['load_avg_start'][0]:.2f}")
            print(f"{args.device}, {args.precision}, SDPA kernel {args.sdpa_kernel}, AdamW {lit.adamw}; "
                  f"shape {env['shape']}; data: wikitext-2 (masklab data module), "
                  f"{data.stats()['valid_share']:.1%} of positions valid; {args.rounds} rounds x {args.steps} "
                  f"step(s), {args.micro_reps} masking turns of {MASK_CALLS} calls, {len(variants)} variants",
                  flush=True)
            variants, failed = harness.start_all(variants)
            by_name = {v.name: v for v in variants}
            groups = [kept for g in GROUPS if (kept := tuple(n for n in g if n in by_name))]
            harness.measure(by_name, groups, 1, 1, 1, is_masking, label="warm-up round (not measured)")
            times, loads = harness.measure(by_name, groups, args.rounds, args.steps, args.micro_reps, is_masking)
            assert torch.get_num_threads() == args.threads, "something changed the thread count"
            result = report(variants, times, checks)
            result.update(load_avg_per_round=loads, failed_to_start=failed)
            if args.profile:
                missed = [n for label in result["missed"] for n in TARGETS[label][:2]]
                result["profiles"] = harness.profile(by_name, harness.profile_names(args.profile, missed, by_name),
                                                     "one turn, {ms:.1f} ms per call", "ms_per_call_under_profiler",
                                                     all_threads=True)
    finally:
        harness.close_all(variants)
    rc = harness.finish(args, env, result, start)
    return harness.report_failures(failed) or rc


if __name__ == "__main__":
    raise SystemExit(main())
