"""Shared LightningModule base: hyperparameters, the shared step, optimizers, logging,
and the contract every model family fulfils.

A model family subclasses ``MaskedModelBase``, names its config class (``Config``, in
``model_configs.py``: it declares the batch kind the family consumes), builds its
network in ``__init__``, and implements:

- ``_shared_step(item, stage)``: ``item`` is a ``TrainItem`` (training) or ``EvalItem``
  (validation) from the data pipeline, its masks already drawn by ``mask_plan``;
- the layer-removal protocol used by ``lit_modules.ablation``:
  ``blocks`` (the ``nn.ModuleList`` removed from the back),
  ``ablation_batch(item) -> MaskedBatch`` (the masked inputs evaluated),
  ``ablation_embed(masked) -> (B, T, D)`` (the input of the first block),
  ``ablation_score(h, masked) -> {metric: (sum, count)}`` (final norm + head + metrics
  applied to a hidden state ``h`` taken after any block).

Optional hooks, with their defaults here: ``mask_plan`` (how batches are masked),
``masked_steps`` (the steps that train on masks), ``ablation_token_mask`` (the tokens
compared between blocks), ``features`` (frozen features for a linear probe; None = no
probe), ``data_layout`` (how the text data module lays out rows).
"""

from __future__ import annotations

import math
from typing import ClassVar

import lightning as L
import torch
from torch import Tensor, nn

from .config import RunConfig, run_config_from_dict
from .flops import Flops
from .masking import MaskedBatch
from .masking.batches import Movable
from .masking.plan import COMMON, EvalItem, MaskPlan, TrainItem


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss; the run cannot continue."""


class MaskedModelBase(L.LightningModule):
    Config: ClassVar[type]
    # How the text data module lays out rows: "windows" (causal LM) or "mlm" (padded
    # rows with [CLS]/[SEP] and word starts). Other data kinds ignore it.
    data_layout: ClassVar[str] = "windows"
    # Whether the blocks attend causally (in the reading order of each row).
    causal: ClassVar[bool] = False

    def __init__(self, config: dict):
        super().__init__()
        # The plain nested dict is the checkpoint's hparams: load_from_checkpoint(path)
        # rebuilds the module from it with no other argument.
        self.save_hyperparameters()
        self.run_config: RunConfig = run_config_from_dict(config)
        # A masking strategy's config is the strategy itself (a frozen dataclass).
        self.masking = self.run_config.masking
        # Compute so far (lit_modules/flops.py), kept in checkpoints so a resumed run
        # goes on counting: training FLOPs and the input tokens (patches, tubelets) read.
        self.register_buffer("flops_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    def run_params(self) -> dict[str, object]:
        """What the run records beside its config: for a family with the attention section,
        the keys a query attends on average at the model's length (mean over layers and
        queries; full attention: T, or (T + 1) / 2 causal) and the kernel that runs on CPU."""
        if not hasattr(type(self.run_config.model), "attention_kinds"):
            return {}  # a family without the attention section
        patterns = [b.attn.pattern for b in self.blocks]
        t = self.run_config.model.block_size
        keys = [float(p.pattern.dense(t, self.causal).sum(1).float().mean()) if p is not None
                else (t + 1) / 2 if self.causal else float(t) for p in patterns]
        kernel = "sdpa" if patterns[0] is None else patterns[0].layout(t, self.causal).kernel
        return {"attention.keys_per_query": round(sum(keys) / len(keys), 2), "attention.kernel_cpu": kernel}

    # ------------------------------------------------------------ to implement
    blocks: nn.ModuleList

    def _shared_step(self, item: TrainItem | EvalItem, stage: str) -> tuple[Tensor, dict[str, tuple[Tensor, int]]]:
        """Return (loss to optimize, {metric name: (value, weight)})."""
        raise NotImplementedError

    def step_flops(self, item: TrainItem) -> tuple[Flops, int]:
        """The forward FLOPs of this training step from the shapes it runs on
        (``lit_modules/flops.py``), and the input tokens of its batch."""
        raise NotImplementedError

    def ablation_batch(self, item: EvalItem) -> MaskedBatch:
        raise NotImplementedError

    def ablation_embed(self, masked: MaskedBatch) -> Tensor:
        raise NotImplementedError

    def ablation_score(self, h: Tensor, masked: MaskedBatch) -> dict[str, tuple[Tensor, Tensor]]:
        raise NotImplementedError

    # ------------------------------------------------------------ optional hooks
    @classmethod
    def mask_plan(cls, cfg: RunConfig, steps_per_epoch: int) -> MaskPlan:
        """How the run's batches are masked: the training strategy at every masked step,
        and the same strategy (at its evaluation setting) as the common evaluation task
        with ``model.eval_masks`` fixed masks."""
        return MaskPlan(seed=cfg.seed, train=cfg.masking, evaluation=((COMMON, cfg.masking),),
                        eval_masks=getattr(cfg.model, "eval_masks", 1), steps_per_epoch=steps_per_epoch,
                        masked_steps=cls.masked_steps(cfg), grid=getattr(cfg.model, "grid", None))

    @classmethod
    def masked_steps(cls, cfg: RunConfig) -> tuple[int, int]:
        """The first and last training step that trains on masks (default: every step).
        A mask-ratio schedule spans them: ``mask_ratio`` on the first, ``final_mask_ratio``
        on the last. A family with a phase after masked training narrows them."""
        return 0, cfg.trainer.max_steps - 1

    def ablation_token_mask(self, masked: MaskedBatch, h: Tensor) -> Tensor:
        """(B, T) bool: the tokens whose block-to-block similarity is measured (default:
        the scored ones)."""
        return masked.loss_mask

    def features(self, inputs: Tensor, blocks: int | None = None) -> Tensor | None:
        """Frozen features (B, D) after the first ``blocks`` blocks, for a linear probe;
        None: the family has no probe."""
        return None

    # Transfer (lit_modules/transfer/features.py): the features of every layer from one
    # pass. ``transfer_embed(inputs) -> (h_0, attention, ctx)`` gives the first block's
    # input for a batch of task inputs (text: ``TextRows``; images (B, 3, H, W); clips
    # (B, F, 3, H, W)); ``transfer_pool(normed, ctx) -> {feature: (B, D)}`` pools the
    # final-normed states of one layer; ``transfer_norm`` is that final norm. Families
    # whose config declares no ``transfer_input`` have none.
    def transfer_embed(self, inputs) -> tuple[Tensor, object, object]:
        raise NotImplementedError(f"{type(self).__name__} has no transfer features")

    def transfer_pool(self, normed: Tensor, ctx) -> dict[str, Tensor]:
        raise NotImplementedError

    def transfer_norm(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------ Lightning hooks
    # The training step never waits for the device: nothing in it reads a tensor's value
    # on the host (on CUDA each such read, ``.item()``, ``bool(t)``, ``int(t)``, a
    # boolean-mask gather, stalls the launch queue until the GPU catches up). A non-finite
    # loss is recorded on the device and read at logging steps, where Lightning brings
    # the logged values to the host anyway; compute counts come from the batch on the host.
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss, metrics = self._shared_step(batch, "train")
        self._watch_finite(loss)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self._count_compute(batch)
        for name, (value, _weight) in metrics.items():
            # Step values only (no epoch mean): the weight is not needed, and reading it would sync.
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=1)
        if self._logging_step():
            self.check_finite()
        return loss

    def _logging_step(self) -> bool:
        """Whether Lightning logs (brings the step's values to the host) after this step."""
        trainer = self._trainer
        every = getattr(trainer, "log_every_n_steps", 1) if trainer is not None else 1
        return (self.global_step + 1) % max(1, every) == 0

    def _watch_finite(self, loss: Tensor) -> None:
        """Remember, on the device, the first step whose loss is NaN or inf and its value."""
        loss = loss.detach()
        if getattr(self, "_bad_step", None) is None or self._bad_step.device != loss.device:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_value = torch.zeros((), dtype=torch.float32, device=loss.device)
        first = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step.masked_fill_(first, self.global_step)  # a scalar argument: no copy, no sync
        self._bad_value = torch.where(first, loss.float(), self._bad_value)

    def check_finite(self) -> None:
        """Raise ``NonFiniteLossError`` if a training loss since the start was NaN or inf
        (one read of the device flag: call it where the host syncs anyway)."""
        if getattr(self, "_bad_step", None) is None:
            return
        step = int(self._bad_step)
        if step >= 0:
            raise NonFiniteLossError(f"train/loss = {float(self._bad_value)} at step {step}")

    def on_validation_start(self) -> None:
        # Before a validation (and the checkpoint after it): never save weights a
        # non-finite loss has already spoiled.
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self.check_finite()

    def on_train_end(self) -> None:
        self.check_finite()  # the steps after the last logging step

    def configure_model(self) -> None:
        """``trainer.compile``: compile every block in place (``nn.Module.compile``: the
        parameters and checkpoint keys stay as they are). The blocks hold nearly all of a
        step's FLOPs, and being alike they share their compiled code."""
        if self.run_config.trainer.compile and not getattr(self, "_compiled", False):
            for block in self.blocks:
                block.compile()
            self._compiled = True

    def on_train_start(self) -> None:
        # The host's copy of the compute so far (one read, before the first step; a resumed
        # run's buffers are restored by now).
        self._flops_host = int(self.flops_seen)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """Our batches and items move themselves (frozen dataclasses of tensors). A
        training item's compute is counted here, on the host, before it moves."""
        if isinstance(batch, TrainItem) and self.training:
            self._compute_pending = {batch.step: self.step_flops(batch)}  # the step about to run
        if isinstance(batch, Movable):
            return batch.to(device, non_blocking=True)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _count_compute(self, item: TrainItem) -> None:
        """Add the step's FLOPs and tokens; log the totals; stop at ``trainer.flops_budget``."""
        pending = getattr(self, "_compute_pending", {})
        flops, tokens = pending.pop(item.step) if item.step in pending else self.step_flops(item)
        self.flops_seen += int(flops.training)
        self.tokens_seen += int(tokens)
        self.last_step_compute = (float(flops.training), int(tokens), item.batch.size)  # for perf/* (lit_modules/perf.py)
        self.log("train/flops", self.flops_seen.double(), on_step=True, on_epoch=False)
        self.log("train/tokens", self.tokens_seen.double(), on_step=True, on_epoch=False)
        budget = self.run_config.trainer.flops_budget
        if getattr(self, "_flops_host", None) is None:  # outside fit (a test calling the step)
            self._flops_host = int(self.flops_seen)
        else:
            self._flops_host += int(flops.training)
        if budget and self._flops_host >= budget and self._trainer is not None:
            self.trainer.should_stop = True  # this step is the last; its validation follows

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        _, metrics = self._shared_step(batch, "val")
        for name, (value, weight) in metrics.items():
            # batch_size = number of scored tokens: the epoch value is a per-token mean.
            self.log(f"val/{name}", value, on_step=False, on_epoch=True, batch_size=int(weight),
                     prog_bar=name.endswith("loss"))

    def configure_optimizers(self):
        cfg = self.run_config.optim
        decay = [p for p in self.parameters() if p.dim() >= 2]  # matrices and embeddings
        no_decay = [p for p in self.parameters() if p.dim() < 2]  # biases and norms
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = fused_adamw(getattr(getattr(self, "_trainer", None), "precision", ""))
        try:
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)
        except RuntimeError:  # a device or dtype the fused kernel does not support
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        total = self.run_config.trainer.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = self.run_config.optim.grad_clip
        if clip <= 0:
            return
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # A fused AdamW (never under 16-mixed, see configure_optimizers): the gradients
            # are not scaled, so clip them directly. Lightning's own clip_gradients refuses
            # any optimizer that could unscale internally, bf16-mixed included.
            torch.nn.utils.clip_grad_norm_(self.parameters(), clip)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")


def at_least_one(n):
    """``max(n, 1)`` for a count that may live on the device (a tensor: no host read)."""
    return n.clamp(min=1) if isinstance(n, Tensor) else max(float(n), 1.0)


def fused_adamw(precision: str) -> bool:
    """Whether to use the fused AdamW kernel: it updates all tensors at once, ~4x cheaper
    than the per-parameter loop on CPU (benchmarks/README.md), and exists on CUDA. Not
    under 16-mixed: a fused AdamW unscales the GradScaler's gradients inside its step,
    after clipping would have seen them scaled."""
    return precision != "16-mixed"


def lr_factor(step: int, total: int, cfg) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` at ``total`` (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def token_stats(logits: Tensor, targets: Tensor, loss_mask: Tensor, group: Tensor | None, n_groups: int,
                accuracy: bool = True):
    """Per-group sums of token cross-entropy and correct predictions, and token counts.

    logits (B, T, V), targets (B, T), loss_mask (B, T) bool, group (B,) in [0, n_groups).
    Returns three (n_groups,) tensors: loss_sum, correct, count (float32 sums).
    ``accuracy=False`` skips the argmax over the vocabulary (~2% of a training step)
    and returns zeros for ``correct``.
    """
    b, t, v = logits.shape
    ce = nn.functional.cross_entropy(logits.reshape(-1, v).float(), targets.reshape(-1), reduction="none")
    m = loss_mask.reshape(b, t).to(ce.dtype)
    ce = ce.view(b, t) * m  # (B, T)
    correct = (logits.argmax(-1) == targets).to(ce.dtype) * m if accuracy else torch.zeros_like(ce)
    group = torch.zeros(b, dtype=torch.long, device=logits.device) if group is None else group
    zeros = torch.zeros(n_groups, dtype=ce.dtype, device=ce.device)
    loss_sum = zeros.index_add(0, group, ce.sum(1))
    correct_sum = zeros.index_add(0, group, correct.sum(1))
    count = zeros.index_add(0, group, m.sum(1))
    return loss_sum, correct_sum, count
