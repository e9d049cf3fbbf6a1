"""The one masking seam shared by every model: pure, deterministic functions.

Conventions (stated once, here):
- ``attn_mask`` is bool, True = the query may attend to the key (the meaning of
  ``torch.nn.functional.scaled_dot_product_attention``); see ``attention.Attention``.
- ``loss_mask`` is bool, True = the position is scored.
- Axis letters: B batch, T tokens, N patches or tubelets, F frames, D features,
  C channels, H heads, K masks per sample.
- Randomness: every mask is a pure function of (global_seed, sample_key, mask_index),
  ``sample_key`` a 64-bit hash of the sample's content (``rng.content_key``), drawn from
  streams declared once in ``rng.Stream``. The same sample gets the same k-th mask in
  every trial, worker, batch position and machine.
- Masks are data, made in the data pipeline: a masking strategy is a frozen dataclass
  (its fields are the ``masking:`` section of a run config) with one call for every
  modality, ``strategy(batch, ctx) -> MaskedBatch``. ``batch`` is a typed batch
  (``batches.TokenWindows | TokenRows | Images | Clips``); each strategy declares the
  kind it ``accepts``; ``ctx`` is a ``MaskContext``. A model's training step receives
  masks and builds none (``plan.MaskPlan`` applies the strategies where batches are
  assembled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .attention import Attention
from .batches import Movable

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class MaskContext:
    """Where a mask is drawn.

    seed:        the run's global seed.
    mask_index:  which mask of each sample: an int, or a (B,) int64 tensor (see
                 ``indices``: training indices, or ``eval_mask_indices(K)[k]``).
    step, total_steps: the training step within a mask-ratio schedule of that many
                 steps (``final`` is reached at ``step >= total_steps``); None when no
                 schedule applies.
    stage:       train, val, test or predict (every stage but train uses the
                 evaluation setting of a strategy, e.g. its evaluation ratio).
    """

    seed: int
    mask_index: Tensor | int = 0
    step: int | None = None
    total_steps: int | None = None
    stage: str = "train"


@dataclass(frozen=True)
class MaskedBatch(Movable):
    """What a masking strategy hands to a model.

    inputs:    what the model reads: (B, T) token ids in reading order, or the images /
               clips themselves (patch models select the visible ones with keep_idx).
    targets:   what it predicts: (B, T) ids at each position, or the images / clips.
    loss_mask: (B, T) or (B, N) bool, True = scored (for patch models, True = masked).
    attention: the attention pattern for every block.
    direction: (B,) int64 reading direction per row (0 = forward, 1 = backward), or None.
    keep_idx:  (B, N_keep) int64 visible patches or tubelets, ascending, or None.
    ratio:     the mask ratio the masks were drawn at, or None.
    actions:   (B, F) int64 the action taken at each frame of action-conditioned clips, or None.
    """

    inputs: Tensor
    targets: Tensor
    loss_mask: Tensor
    attention: Attention
    direction: Tensor | None = None
    keep_idx: Tensor | None = None
    ratio: float | None = None
    actions: Tensor | None = None


class MaskingStrategy:
    """What every registered strategy provides (a frozen dataclass subclasses this).

    accepts:  the batch kind (``batches``) the strategy masks.
    name:     its registry name (the ``masking.name`` of a run config).
    """

    accepts: ClassVar[type]
    name: str

    def __call__(self, batch, ctx: MaskContext) -> MaskedBatch:
        raise NotImplementedError

    def training_index(self, step: int, epoch: int) -> int:
        """The mask index of training step ``step`` (in epoch ``epoch``): a new mask
        every step unless the strategy says otherwise."""
        return int(step)


__all__ = ["Attention", "MaskContext", "MaskedBatch", "MaskingStrategy"]
