"""GPT trained forward-causal plus, with probability p_bw per step, backward-causal.

The network is a pre-LayerNorm GPT-2 on the shared blocks. The direction it predicts is
told by a learned **direction embedding** (one vector per direction, added to every token
embedding like the position embedding). We chose an embedding over a direction token
because a token would shift every position by one and add a position that is never
scored; the embedding costs 2 x D parameters and keeps T unchanged.

Both directions use the fused causal kernel: the backward task is the forward task on
the reversed sequence (see ``masking/causal_lm.py``). When the per-step coin comes up,
the forward and backward views are stacked into one batch of 2B sequences and run in one
forward pass; their mean token losses are summed before one backward pass.

A sparse attention pattern (the run config's ``attention:`` section: sliding window,
Longformer, BigBird, prefix-LM) is ANDed with causal attention on the sequence each
direction reads, so the backward direction gets the mirror pattern. Under prefix-LM the
prefix positions are not scored (their next token is visible to them).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .base import MaskedModelBase, token_stats
from .blocks import attention_pairs, init_weights, make_blocks, run_blocks
from .config_errors import ConfigError
from .flops import Flops, encoder, linear
from .masking import MaskedBatch
from .masking.attention import Attention
from .masking.causal_lm import DIRECTIONS, reading_order
from .masking.plan import EvalItem, TrainItem
from .model_configs import GPTConfig
from .registry import MODELS

N_DIRECTIONS = len(DIRECTIONS)


class GPT(nn.Module):
    """Token + position + direction embeddings -> blocks -> final norm -> vocabulary."""

    def __init__(self, cfg: GPTConfig, vocab_size: int, attention=None, seed: int = 0):
        """``attention``: the run's ``AttentionConfig`` (None: full), its random blocks drawn with ``seed``."""
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(vocab_size, cfg.width)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.width)
        self.dir_emb = nn.Embedding(N_DIRECTIONS, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = make_blocks(cfg.depth, cfg.width, cfg.heads, cfg.dropout, attention, seed,
                                  max_len=cfg.block_size)
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, vocab_size, bias=False)
        init_weights(self, cfg.depth)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def embed(self, idx: Tensor, direction: Tensor) -> Tensor:
        """idx (B, T) in reading order, direction (B,) -> (B, T, D)."""
        t = idx.shape[1]
        if t > self.cfg.block_size:
            raise ConfigError("sequence length", t, f"must be <= model.block_size ({self.cfg.block_size})")
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)[None] + self.dir_emb(direction)[:, None, :]
        return self.drop(x)

    def logits(self, h: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, V)."""
        return self.head(self.ln_f(h))

    def forward(self, idx: Tensor, direction: Tensor, attention: Attention) -> Tensor:
        return self.logits(run_blocks(self.blocks, self.embed(idx, direction), attention))


@MODELS.register("gpt")
class LitGPT(MaskedModelBase):
    """Causal LM trained forward and, with probability p_bw per step, backward."""

    Config = GPTConfig
    causal = True

    def __init__(self, config: dict):
        super().__init__(config)
        rc = self.run_config
        self.model = GPT(rc.model, rc.data.vocab_size, rc.attention, rc.seed)
        # Steps that also trained the backward direction (persisted in checkpoints).
        self.register_buffer("bw_steps", torch.zeros((), dtype=torch.long))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    def _shared_step(self, item: TrainItem | EvalItem, stage: str):
        """Training: the step's windows, forward and (when the step's coin came up)
        backward, stacked by the data pipeline. Validation always scores both."""
        masked = self._scorable(item.masked if stage == "train" else item.common[0])
        logits = self.model(masked.inputs, masked.direction, masked.attention)  # (nB, T, V)
        loss_sum, correct, count = token_stats(logits, masked.targets, masked.loss_mask, masked.direction,
                                               N_DIRECTIONS, accuracy=stage != "train")
        mean_loss = loss_sum / count.clamp(min=1)  # an absent direction: 0 / 1 = 0
        metrics = {}
        if stage == "train":
            # The directions stacked are known on the host, from the shapes: forward, then
            # backward when the step's coin said so (CausalLM.directions); reading the
            # counts instead would make the host wait for the device every step.
            present = list(DIRECTIONS.items())[: masked.inputs.shape[0] // item.batch.size]
            for name, d in present:
                metrics[f"{name}_loss"] = (mean_loss[d], count[d])
        else:
            for name, d in DIRECTIONS.items():
                if count[d] > 0:
                    n = int(count[d])
                    metrics[f"{name}_loss"] = (mean_loss[d], n)
                    metrics[f"{name}_acc"] = (correct[d] / count[d], n)
        if stage == "train":
            with_bw = masked.inputs.shape[0] > item.batch.size  # both directions stacked
            self.bw_steps += int(with_bw)
            metrics["bw_steps"] = (self.bw_steps.float(), 1)
        # Sum of the per-direction mean losses: each direction counts fully when present.
        return mean_loss.sum(), metrics

    def _scorable(self, masked: MaskedBatch) -> MaskedBatch:
        """The batch with the positions the attention pattern lets see their own target
        taken out of the loss (prefix-LM's prefix); unchanged for every other pattern."""
        # Without blocks (every one removed) nothing attends: every position is scorable.
        pattern = self.model.blocks[0].attn.pattern if len(self.model.blocks) else None
        scored = None if pattern is None else pattern.pattern.scored(masked.inputs.shape[1], masked.inputs.device)
        return masked if scored is None else dataclasses.replace(masked, loss_mask=masked.loss_mask & scored)

    def step_flops(self, item: TrainItem) -> tuple[Flops, int]:
        """The blocks and the vocabulary head on every row read (2B when backward too)."""
        rows, t = item.masked.inputs.shape
        c = self.model.cfg
        vocab = self.model.head.out_features
        pairs = attention_pairs(self.model.blocks, t, causal=True)
        return encoder(rows, t, c.width, c.depth, pairs) + linear(rows * t, c.width, vocab), item.batch.size * t

    @torch.no_grad()
    def predict(self, tokens: Tensor, direction: str) -> Tensor:
        """Logits (B, T, V) for tokens (B, T).

        "fw": ``logits[:, t]`` predicts ``tokens[:, t+1]`` from ``tokens[:, :t+1]``.
        "bw": ``logits[:, t]`` predicts ``tokens[:, t-1]`` from ``tokens[:, t:]``.
        """
        seq = reading_order(tokens, direction)
        d = torch.full((tokens.shape[0],), DIRECTIONS[direction], dtype=torch.long, device=tokens.device)
        logits = self.model(seq, d, Attention(causal=True))
        return reading_order(logits, direction)

    # ------------------------------------------------------------ layer removal
    def ablation_batch(self, item: EvalItem) -> MaskedBatch:
        return self._scorable(item.common[0])  # both directions

    def ablation_embed(self, masked: MaskedBatch) -> Tensor:
        return self.model.embed(masked.inputs, masked.direction)

    def ablation_score(self, h: Tensor, masked: MaskedBatch) -> dict[str, tuple[Tensor, Tensor]]:
        logits = self.model.logits(h)
        loss_sum, correct, count = token_stats(logits, masked.targets, masked.loss_mask, masked.direction, N_DIRECTIONS)
        out = {}
        for name, d in DIRECTIONS.items():
            out[f"{name}_loss"] = (loss_sum[d], count[d])
            out[f"{name}_acc"] = (correct[d], count[d])
        return out

    # ------------------------------------------------------------ transfer features
    def transfer_embed(self, rows) -> tuple[Tensor, Attention, Tensor]:
        """Text rows read forward and, stacked below, backward (each row reversed on its
        own tokens, left-aligned, as the backward task reads a window): (2B, T, D)."""
        ids, valid = rows.ids, rows.valid
        b, t = ids.shape
        # Position j of the reversed row reads token n - 1 - j (padding past n stays 0).
        back = (rows.lengths[:, None] - 1 - torch.arange(t, device=ids.device)).clamp(min=0)
        rev = torch.where(valid, ids.gather(1, back), torch.zeros_like(ids))
        direction = torch.cat([torch.full((b,), DIRECTIONS[d], dtype=torch.long, device=ids.device)
                               for d in ("fw", "bw")])
        return self.model.embed(torch.cat([ids, rev]), direction), Attention(causal=True), valid

    def transfer_pool(self, normed: Tensor, valid: Tensor) -> dict[str, Tensor]:
        """fw / bw: the mean over a row's tokens of the forward / backward pass; fw_bw: both."""
        w = valid.to(normed.dtype) / valid.sum(1, keepdim=True).clamp(min=1)
        b = valid.shape[0]
        fw = torch.einsum("bt,btd->bd", w, normed[:b])
        bw = torch.einsum("bt,btd->bd", w, normed[b:])
        return {"fw": fw, "bw": bw, "fw_bw": torch.cat([fw, bw], dim=1)}

    def transfer_norm(self, h: Tensor) -> Tensor:
        return self.model.ln_f(h)

