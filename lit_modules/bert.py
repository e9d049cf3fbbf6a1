"""BERT masked-LM on the shared blocks.

A bidirectional pre-LayerNorm encoder with a padding mask (variable-length inputs), and
an MLM head (dense -> GELU -> LayerNorm -> vocabulary projection tied to the input
embedding, plus a bias). The head and the loss run only at the selected positions: the
hidden states are gathered first, so the (B, T, V) logits of the common implementation
are never formed -- at 15% masking that is ~7x less head compute and memory.

Masks come from the text masking strategies in ``masking/mlm.py``. Training masks use
mask index = epoch (dynamic, RoBERTa) or epoch % K (static, BERT). Validation scores
every trial on one common task, whatever strategy and ratio it trained with: K fixed
masks per validation sequence drawn by ``model.eval_masking`` (default ``mlm-random``,
80/10/10) at ``model.eval_mask_ratio`` (default 15%), logged as ``val/mlm_loss`` and
``val/mlm_acc``; so span-, word- and token-masked models, or models trained at 15% and
40%, are ranked on the same questions. A model trained on another task is also scored
on its own strategy at the evaluation ratio (``val/own_mlm_loss``, ``val/own_mlm_acc``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MaskedModelBase
from .blocks import attention_pairs, init_weights, make_blocks, run_blocks
from .config_errors import ConfigError
from .flops import Flops, encoder, linear
from .masking import MaskedBatch
from .masking.attention import Attention, padding
from .masking.plan import COMMON, EvalItem, MaskPlan, TrainItem, gather_scored
from .model_configs import BERTConfig
from .registry import MASKINGS, MODELS

OWN = "own"  # the evaluation task of the model's own training strategy


class BERT(nn.Module):
    """Token + position embeddings -> bidirectional blocks -> final norm -> MLM head."""

    def __init__(self, cfg: BERTConfig, vocab_size: int, attention=None, seed: int = 0):
        """``attention``: the run's ``AttentionConfig`` (None: full), its random blocks drawn with ``seed``."""
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(vocab_size, cfg.width)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = make_blocks(cfg.depth, cfg.width, cfg.heads, cfg.dropout, attention, seed,
                                  max_len=cfg.block_size)
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head_dense = nn.Linear(cfg.width, cfg.width)
        self.head_ln = nn.LayerNorm(cfg.width)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))
        init_weights(self, cfg.depth)

    def embed(self, idx: Tensor) -> Tensor:
        """idx (B, T) -> (B, T, D)."""
        t = idx.shape[1]
        if t > self.cfg.block_size:
            raise ConfigError("sequence length", t, f"must be <= model.block_size ({self.cfg.block_size})")
        pos = torch.arange(t, device=idx.device)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos)[None])

    def encode(self, idx: Tensor, valid: Tensor) -> Tensor:
        """(B, T) ids, (B, T) bool valid (False = padding) -> final hidden states (B, T, D)."""
        return run_blocks(self.blocks, self.embed(idx), Attention(mask=padding(valid)))

    def head(self, h: Tensor) -> Tensor:
        """Hidden states (..., D) *after* the final norm's input -> logits (..., V)."""
        x = self.head_ln(F.gelu(self.head_dense(self.ln_f(h))))
        return F.linear(x, self.tok_emb.weight, self.head_bias)  # tied to the input embedding; bias in the matmul

    def masked_logits(self, h: Tensor, where: Tensor) -> Tensor:
        """Logits (M, V) at the M selected positions only (row-major): ``where`` is the
        (B, T) loss mask or its listed positions (``gather_scored``)."""
        return self.head(gather_scored(h, where))  # gather (M, D) first, then project


class MLMRows:
    """What the families that read masked-LM rows share (BERT, ELECTRA): the row layout,
    the mask plan (the common evaluation task, and the model's own), and the transfer
    hooks. A mixin placed before ``MaskedModelBase``; ``self.model`` is the encoder kept
    for transfer, with ``embed(ids)`` and the final norm ``ln_f``."""

    data_layout = "mlm"  # padded rows with [CLS]/[SEP], word starts, mask token

    # ------------------------------------------------------------ masking
    @classmethod
    def mask_plan(cls, cfg, steps_per_epoch: int) -> MaskPlan:
        """Training masks of the configured strategy (mask index = epoch, or epoch % K for
        static masks); evaluation on the common task (``model.eval_masking`` at
        ``model.eval_mask_ratio``, its default 80/10/10) and, when it differs, on the
        model's own strategy at the evaluation ratio (task ``own``)."""
        m = cfg.model
        common = MASKINGS.get(m.eval_masking, "model.eval_masking")(mask_ratio=m.eval_mask_ratio)
        own = dataclasses.replace(cfg.masking, mask_ratio=m.eval_mask_ratio, static_masks=0)
        tasks = ((COMMON, common),) if own == common else ((COMMON, common), (OWN, own))
        plan = super().mask_plan(cfg, steps_per_epoch)
        return dataclasses.replace(plan, evaluation=tasks)

    # ------------------------------------------------------------ transfer features
    def transfer_embed(self, rows) -> tuple[Tensor, Attention, Tensor]:
        """``[CLS] row [SEP] [PAD]...`` with the padding mask, as validation rows are laid out."""
        from .data.mlm import CLS, PAD, SEP

        b, t = rows.ids.shape
        ids = torch.full((b, t + 2), PAD, dtype=torch.long, device=rows.ids.device)
        ids[:, 0] = CLS
        ids[:, 1:-1] = torch.where(rows.valid, rows.ids, torch.full_like(rows.ids, PAD))
        ids[torch.arange(b, device=ids.device), rows.lengths + 1] = SEP
        valid = ids != PAD
        return self.model.embed(ids), Attention(mask=padding(valid)), valid

    def transfer_pool(self, normed: Tensor, valid: Tensor) -> dict[str, Tensor]:
        """mean: over the row's tokens ([CLS] and [SEP] included); cls: the [CLS] token."""
        w = valid.to(normed.dtype) / valid.sum(1, keepdim=True)
        return {"mean": torch.einsum("bt,btd->bd", w, normed), "cls": normed[:, 0]}

    def transfer_norm(self, h: Tensor) -> Tensor:
        return self.model.ln_f(h)


@MODELS.register("bert")
class LitBERT(MLMRows, MaskedModelBase):
    """Bidirectional encoder trained on masked-LM (BERT)."""

    Config = BERTConfig

    def __init__(self, config: dict):
        super().__init__(config)
        rc = self.run_config
        self.model = BERT(rc.model, rc.data.vocab_size, rc.attention, rc.seed)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    def _loss(self, masked: MaskedBatch, valid: Tensor, where: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``where``: the scored positions (``TrainItem.where_scored``), else the loss mask."""
        where = masked.loss_mask if where is None else where
        h = self.model.encode(masked.inputs, valid)
        logits = self.model.masked_logits(h, where)  # (M, V)
        targets = gather_scored(masked.targets, where)  # (M,)
        ce = F.cross_entropy(logits.float(), targets, reduction="sum")
        correct = (logits.argmax(-1) == targets).sum()
        return ce, correct.float(), masked.loss_mask.sum().float()

    def _shared_step(self, item: TrainItem | EvalItem, stage: str):
        valid = item.batch.valid
        if stage == "train":
            ce, correct, n = self._loss(item.masked, valid, item.where_scored())
            loss = ce / n.clamp(min=1)
            return loss, {"mlm_loss": (loss.detach(), n), "mlm_acc": ((correct / n.clamp(min=1)), n)}
        loss, metrics = self._eval_task(item.views[COMMON], valid, "mlm")
        if OWN in item.views:
            metrics.update(self._eval_task(item.views[OWN], valid, "own_mlm")[1])
        return loss, metrics

    def _eval_task(self, views, valid: Tensor, prefix: str):
        """Loss and {prefix_loss, prefix_acc} over the K evaluation masks of one task."""
        ce = correct = n = 0.0
        for masked in views:
            c, a, m = self._loss(masked, valid)
            ce, correct, n = ce + c, correct + a, n + m
        n_ = max(float(n), 1.0)
        return ce / n_, {f"{prefix}_loss": (ce / n_, int(n)), f"{prefix}_acc": (correct / n_, int(n))}

    def step_flops(self, item: TrainItem) -> tuple[Flops, int]:
        """The blocks on every padded row; the MLM head (dense + vocabulary) only at the
        masked positions (it gathers them first)."""
        b, t = item.masked.inputs.shape
        c = self.run_config.model
        m = int(item.masked.loss_mask.sum())
        head = linear(m, c.width, c.width) + linear(m, c.width, self.model.tok_emb.num_embeddings)
        pairs = attention_pairs(self.model.blocks, t, causal=False)
        return encoder(b, t, c.width, c.depth, pairs) + head, int(item.batch.valid.sum())

    # ------------------------------------------------------------ layer removal
    def ablation_batch(self, item: EvalItem) -> MaskedBatch:
        """The K masks of the common evaluation task, stacked along the batch."""
        views = item.common
        valid = item.batch.valid.repeat(len(views), 1)
        return MaskedBatch(
            inputs=torch.cat([v.inputs for v in views]), targets=torch.cat([v.targets for v in views]),
            loss_mask=torch.cat([v.loss_mask for v in views]), attention=Attention(mask=padding(valid)),
        )

    def ablation_embed(self, masked: MaskedBatch) -> Tensor:
        return self.model.embed(masked.inputs)

    def ablation_score(self, h: Tensor, masked: MaskedBatch) -> dict[str, tuple[Tensor, Tensor]]:
        logits = self.model.masked_logits(h, masked.loss_mask)
        targets = masked.targets[masked.loss_mask]
        n = masked.loss_mask.sum().float()
        ce = F.cross_entropy(logits.float(), targets, reduction="sum")
        return {"mlm_loss": (ce, n), "mlm_acc": ((logits.argmax(-1) == targets).sum().float(), n)}
