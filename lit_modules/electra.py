"""ELECTRA: replaced-token detection (Clark et al. 2020) on the shared blocks.

Two bidirectional pre-LayerNorm encoders read the same masked-LM rows. The data pipeline
masks each batch with the configured text strategy, as for BERT; then per step:

1. masking:       the generator, a small masked-LM encoder (``round(width *
                  generator_size)`` wide), reads the masked rows and is trained with the
                  MLM loss at the masked positions (the head gathers them first, as BERT's);
2. sampling:      at every masked position a token is drawn from the generator's softmax
                  by inverting its CDF at a counter-based uniform (``rng.Stream.
                  ELECTRA_SAMPLE`` of (seed, the row's content key, draw index), one
                  number per position); no gradient flows through the draw;
3. discriminator: reads the original row with the masked positions replaced by the
                  samples, and predicts at every valid token whether it was replaced:
                  label = (input != original), so a sample equal to the original counts
                  as original;
4. loss:          MLM + ``rtd_weight`` * RTD, the RTD loss the mean binary cross-entropy
                  over the valid tokens ([CLS] and [SEP] included, padding excluded).

The draw index is the training step (a new draw every step, even where the text mask
stays the same all epoch), and in validation the index of the evaluation mask (disjoint
from every step below 2**28): a sample's k-th validation replacement is the same in
every epoch and trial with the same generator. The uniforms are exact on every device;
the sample is then a pure function of them and the generator's probabilities.

Embedding sharing (``share_embeddings``, the paper's choice): the generator reads the
discriminator's token and position embeddings, projected to its width by a linear map
(``embeddings_project``, as in the paper and HF ``ElectraModel``, when narrower), and
its MLM head maps back to the embedding width (dense -> GELU -> LayerNorm) before the
vocabulary projection tied to that shared token embedding, plus a bias: HF's
``ElectraGeneratorPredictions`` + tied ``generator_lm_head``. Unshared, the generator
has its own embeddings at its own width and its head is tied to those, as BERT's.

The discriminator is the model kept: layer removal and the transfer features read its
blocks (``self.model``); the generator is ``self.generator``.

Metrics (``train/`` and ``val/``): ``mlm_loss``, ``mlm_acc`` of the generator (in
validation on the common evaluation task, exactly BERT's ``val/mlm_loss``; also its own
task, ``own_mlm_*``, when it trains on another one), ``rtd_loss``, ``rtd_acc`` per valid
token, ``replaced_frac`` (the share of valid tokens labelled replaced: 1 - it is the
accuracy of always answering "original"), and in validation ``rtd_auc``, the ROC AUC of
the discriminator's logits over every valid token of the validation set (exact: the
scores are kept through the epoch and ranked once, ties counted half).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MaskedModelBase
from .bert import OWN, MLMRows
from .blocks import attention_pairs, init_weights, make_blocks, run_blocks
from .config_errors import ConfigError
from .flops import Flops, encoder, linear
from .masking import MaskedBatch
from .masking.attention import Attention, padding
from .masking.indices import eval_mask_indices
from .masking.plan import EvalItem, TrainItem, gather_scored, scatter_scored
from .masking.rng import Stream, bits, content_key, mask_stream, to_uniform
from .model_configs import ElectraConfig
from .registry import MODELS


class TokenEmbedding(nn.Module):
    """Token + position embeddings, then dropout: (B, T) ids -> (B, T, D). No norm: the
    pre-LayerNorm blocks normalize their inputs."""

    def __init__(self, vocab_size: int, block_size: int, width: int, dropout: float):
        super().__init__()
        self.block_size, self.width = block_size, width
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(block_size, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ConfigError("sequence length", t, f"must be <= model.block_size ({self.block_size})")
        pos = torch.arange(t, device=idx.device)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos)[None])


class Discriminator(nn.Module):
    """Embeddings -> bidirectional blocks -> final norm -> RTD head (dense -> GELU ->
    dense to one logit per token: HF's ``ElectraDiscriminatorPredictions``)."""

    def __init__(self, cfg: ElectraConfig, vocab_size: int, attention=None, seed: int = 0):
        super().__init__()
        self.embeddings = TokenEmbedding(vocab_size, cfg.block_size, cfg.width, cfg.dropout)
        self.blocks = make_blocks(cfg.depth, cfg.width, cfg.heads, cfg.dropout, attention, seed,
                                  max_len=cfg.block_size)
        self.ln_f = nn.LayerNorm(cfg.width)
        self.rtd_dense = nn.Linear(cfg.width, cfg.width)
        self.rtd_out = nn.Linear(cfg.width, 1)
        init_weights(self, cfg.depth)

    def embed(self, idx: Tensor) -> Tensor:
        """(B, T) ids -> the first block's input (B, T, D)."""
        return self.embeddings(idx)

    def encode(self, idx: Tensor, valid: Tensor) -> Tensor:
        """(B, T) ids, (B, T) bool valid (False = padding) -> last hidden states (B, T, D)."""
        return run_blocks(self.blocks, self.embed(idx), Attention(mask=padding(valid)))

    def rtd_head(self, x: Tensor) -> Tensor:
        """Normed hidden states (..., D) -> replaced-token logits (...)."""
        return self.rtd_out(F.gelu(self.rtd_dense(x))).squeeze(-1)

    def rtd_logits(self, h: Tensor) -> Tensor:
        """Hidden states (..., D) after any block -> logits (...): final norm, then head."""
        return self.rtd_head(self.ln_f(h))


class Generator(nn.Module):
    """(Shared) embeddings -> [projection to the generator width] -> bidirectional blocks
    -> final norm -> MLM head tied to the token embedding (see the module docstring)."""

    def __init__(self, cfg: ElectraConfig, vocab_size: int, shared: TokenEmbedding | None, attention=None,
                 seed: int = 0):
        """``attention``: the discriminator's pattern; the generator's layers draw BigBird's
        random blocks as layers ``depth``, ``depth + 1``, ... of the same run."""
        super().__init__()
        width = cfg.generator_width
        own = shared is None
        if own:
            self.embeddings = TokenEmbedding(vocab_size, cfg.block_size, width, cfg.dropout)
        self.blocks = make_blocks(cfg.generator_layers, width, cfg.generator_heads, cfg.dropout, attention, seed,
                                  first_layer=cfg.depth, max_len=cfg.block_size)
        self.ln_f = nn.LayerNorm(width)
        emb_width = width if own else shared.width
        # The paper's "embeddings_project": shared embeddings wider than the generator.
        self.embeddings_project = nn.Linear(emb_width, width) if emb_width != width else None
        self.head_dense = nn.Linear(width, emb_width)  # back to the embedding width, for the tie
        self.head_ln = nn.LayerNorm(emb_width)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))
        init_weights(self, cfg.generator_layers)
        if not own:
            self.embeddings = shared  # after init: the discriminator initialized it

    def encode(self, idx: Tensor, valid: Tensor) -> Tensor:
        """(B, T) ids, (B, T) bool valid -> last hidden states (B, T, D_g)."""
        x = self.embeddings(idx)  # (B, T, D) shared, or (B, T, D_g) own
        if self.embeddings_project is not None:
            x = self.embeddings_project(x)  # (B, T, D_g)
        return run_blocks(self.blocks, x, Attention(mask=padding(valid)))

    def masked_logits(self, h: Tensor, where: Tensor) -> Tensor:
        """Logits (M, V) at the M masked positions only (row-major): ``where`` is the
        (B, T) loss mask or its listed positions (``gather_scored``)."""
        x = self.ln_f(gather_scored(h, where))  # gather (M, D_g) first, then project
        x = self.head_ln(F.gelu(self.head_dense(x)))  # (M, D)
        return F.linear(x, self.embeddings.tok_emb.weight, self.head_bias)  # tied; bias in the matmul


# ---------------------------------------------------------------- sampling
def draw_uniforms(seed: int, key: Tensor, draw: int, t: int) -> Tensor:
    """(B, T) float32 uniforms in [0, 1) of the generator's samples: position j of row b
    depends only on (seed, key[b], draw, j), never on the batch or its padded width."""
    return to_uniform(bits(mask_stream(seed, key, draw, Stream.ELECTRA_SAMPLE), t))


def sample_tokens(logits: Tensor, u: Tensor) -> Tensor:
    """Draw one token per row of ``logits`` (M, V) from its softmax by inverting the CDF
    at ``u`` (M,) in [0, 1): the first id whose cumulative probability exceeds u (ids of
    zero probability are never drawn). float64, outside autocast; no gradient."""
    with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
        cdf = logits.detach().double().softmax(-1).cumsum(-1)  # (M, V)
        x = u.to(cdf)[:, None] * cdf[:, -1:]  # scaled to the CDF's own total
        return torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)


def roc_auc(scores: Tensor, labels: Tensor) -> Tensor:
    """ROC AUC of ``scores`` (N,) for bool ``labels`` (N,): the Mann-Whitney U statistic
    from average ranks (tied scores count half). NaN when one class is absent."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos = labels.sum().double()
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # 1-based rank of the last score of each tie group
    ranks = (last - (counts.double() - 1) / 2)[inverse]  # average rank of each score
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


@MODELS.register("electra")
class LitElectra(MLMRows, MaskedModelBase):
    """Encoder trained to tell tokens a small masked-LM generator replaced from original ones (ELECTRA)."""

    Config = ElectraConfig

    def __init__(self, config: dict):
        super().__init__(config)
        cfg, vocab = self.run_config.model, self.run_config.data.vocab_size
        rc = self.run_config
        self.model = Discriminator(cfg, vocab, rc.attention, rc.seed)
        self.generator = Generator(cfg, vocab, self.model.embeddings if cfg.share_embeddings else None,
                                   rc.attention, rc.seed)
        self._val_scores: list[tuple[Tensor, Tensor]] = []  # (logits, labels) of this validation epoch

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    # ------------------------------------------------------------ the two passes
    def _generate(self, masked: MaskedBatch, valid: Tensor, key: Tensor, draw: int, where: Tensor | None = None):
        """Generator MLM at the masked positions and the discriminator's input; ``where``:
        the masked positions listed (``TrainItem.where_scored``), else the loss mask.

        Returns (ce sum, correct, masked count, (B, T) original ids with the masked
        positions replaced by the generator's samples)."""
        where = masked.loss_mask if where is None else where
        h = self.generator.encode(masked.inputs, valid)
        logits = self.generator.masked_logits(h, where)  # (M, V)
        targets = gather_scored(masked.targets, where)  # (M,)
        ce = F.cross_entropy(logits.float(), targets, reduction="sum")
        correct = (logits.argmax(-1) == targets).sum().float()
        u = gather_scored(draw_uniforms(self.run_config.seed, key, draw, masked.loss_mask.shape[1]), where)  # (M,)
        replaced = scatter_scored(masked.targets, where, sample_tokens(logits, u))  # (B, T), no gradient
        return ce, correct, masked.loss_mask.sum().float(), replaced

    def _rtd(self, h: Tensor, inputs: Tensor, originals: Tensor, valid: Tensor):
        """Replaced-token detection on hidden states ``h`` (B, T, D) after any block.

        Returns (bce sum, correct, valid count, replaced count, logits (N,), labels (N,))
        over the N valid tokens."""
        if self.training:  # every position, padding weighted out: no boolean gather, no host sync
            every = self.model.rtd_logits(h).float()  # (B, T)
            labels, weight = inputs != originals, valid.float()
            bce = F.binary_cross_entropy_with_logits(every, labels.float(), weight=weight, reduction="sum")
            correct = (((every > 0) == labels) & valid).sum().float()
            return bce, correct, weight.sum(), (labels & valid).sum().float(), every, labels
        logits = self.model.rtd_logits(h[valid]).float()  # gather (N, D) first
        labels = (inputs != originals)[valid]  # (N,) bool: a sample equal to the original is original
        bce = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
        correct = ((logits > 0) == labels).sum().float()
        return bce, correct, valid.sum().float(), labels.sum().float(), logits, labels

    def _views(self, item: TrainItem | EvalItem, stage: str) -> list[tuple[MaskedBatch, int, Tensor]]:
        """(masks, draw index, masked positions): the step's mask at the step (its positions
        listed by the data pipeline), or the K evaluation masks at their evaluation mask
        indices (their loss masks)."""
        if stage == "train":
            return [(item.masked, item.step, item.where_scored())]
        return [(m, k, m.loss_mask) for m, k in zip(item.common, eval_mask_indices(len(item.common)))]

    def _shared_step(self, item: TrainItem | EvalItem, stage: str):
        valid = item.batch.valid
        key = content_key(item.batch.tokens, valid)
        ce = mlm_correct = n_masked = bce = rtd_correct = n_valid = n_replaced = 0.0
        for masked, draw, where in self._views(item, stage):
            c, a, m, inputs = self._generate(masked, valid, key, draw, where)
            h = self.model.encode(inputs, valid)
            b, r, n, k, logits, labels = self._rtd(h, inputs, masked.targets, valid)
            ce, mlm_correct, n_masked = ce + c, mlm_correct + a, n_masked + m
            bce, rtd_correct, n_valid, n_replaced = bce + b, rtd_correct + r, n_valid + n, n_replaced + k
            if stage == "val":
                self._val_scores.append((logits.detach().cpu(), labels.cpu()))
        nm, nv = n_masked.clamp(min=1), n_valid.clamp(min=1)
        mlm, rtd = ce / nm, bce / nv
        loss = mlm + self.run_config.model.rtd_weight * rtd
        im, iv = (n_masked, n_valid) if stage == "train" else (int(n_masked), int(n_valid))  # no sync in training
        metrics = {"mlm_loss": (mlm.detach(), im), "mlm_acc": (mlm_correct / nm, im),
                   "rtd_loss": (rtd.detach(), iv), "rtd_acc": (rtd_correct / nv, iv),
                   "replaced_frac": (n_replaced / nv, iv)}
        if stage != "train" and OWN in item.views:
            metrics.update(self._own_mlm(item.views[OWN], valid))
        return loss, metrics

    def _own_mlm(self, views, valid: Tensor) -> dict[str, tuple[Tensor, int]]:
        """The generator's MLM on its own training strategy (at the evaluation ratio)."""
        ce = correct = n = 0.0
        for masked in views:
            logits = self.generator.masked_logits(self.generator.encode(masked.inputs, valid), masked.loss_mask)
            targets = masked.targets[masked.loss_mask]
            ce = ce + F.cross_entropy(logits.float(), targets, reduction="sum")
            correct = correct + (logits.argmax(-1) == targets).sum().float()
            n = n + masked.loss_mask.sum().float()
        n_ = max(float(n), 1.0)
        return {"own_mlm_loss": (ce / n_, int(n)), "own_mlm_acc": (correct / n_, int(n))}

    # ------------------------------------------------------------ validation AUC
    def on_validation_epoch_start(self) -> None:
        self._val_scores.clear()

    def on_validation_epoch_end(self) -> None:
        """``val/rtd_auc`` over every valid token of the epoch (this process's share when
        several devices validate)."""
        if self._val_scores:
            scores, labels = (torch.cat(parts) for parts in zip(*self._val_scores))
            self.log("val/rtd_auc", roc_auc(scores, labels).float())
        self._val_scores.clear()

    # ------------------------------------------------------------ compute
    def step_flops(self, item: TrainItem) -> tuple[Flops, int]:
        """Both encoders on every padded row; the generator's projection on every token,
        its MLM head at the masked positions; the RTD head at the valid tokens. The
        draw (softmax, cumulative sum, search) has no matrix product."""
        b, t = item.masked.inputs.shape
        c = self.run_config.model
        g = self.generator
        emb = g.embeddings.width  # the width the generator's embeddings and head tie have
        vocab = g.embeddings.tok_emb.num_embeddings
        m, n = int(item.masked.loss_mask.sum()), int(item.batch.valid.sum())  # on the host (base.transfer_batch_to_device)
        project = linear(b * t, emb, c.generator_width) if g.embeddings_project is not None else Flops()
        generator = project + encoder(b, t, c.generator_width, c.generator_layers,
                                      attention_pairs(g.blocks, t, causal=False)) \
            + linear(m, c.generator_width, emb) + linear(m, emb, vocab)
        discriminator = encoder(b, t, c.width, c.depth, attention_pairs(self.model.blocks, t, causal=False)) + linear(n, c.width, c.width) + linear(n, c.width, 1)  # the RTD head's useful work: the valid tokens
        return generator + discriminator, n

    # ------------------------------------------------------------ layer removal
    @torch.no_grad()
    def ablation_batch(self, item: EvalItem) -> MaskedBatch:
        """The discriminator's inputs of the K common evaluation masks (the generator run
        once on each, its draws at their evaluation mask indices, as validation draws
        them), stacked along the batch; scored at every valid token."""
        valid = item.batch.valid
        key = content_key(item.batch.tokens, valid)
        views = self._views(item, "val")
        inputs = [self._generate(masked, valid, key, draw, where)[3] for masked, draw, where in views]
        valid_k = valid.repeat(len(views), 1)
        return MaskedBatch(inputs=torch.cat(inputs), targets=torch.cat([m.targets for m, _, _ in views]),
                           loss_mask=valid_k, attention=Attention(mask=padding(valid_k)))

    def ablation_embed(self, masked: MaskedBatch) -> Tensor:
        return self.model.embed(masked.inputs)

    def ablation_score(self, h: Tensor, masked: MaskedBatch) -> dict[str, tuple[Tensor, Tensor]]:
        bce, correct, n, _, _, _ = self._rtd(h, masked.inputs, masked.targets, masked.loss_mask)
        return {"rtd_loss": (bce, n), "rtd_acc": (correct, n)}
