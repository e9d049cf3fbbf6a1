"""The one masking seam shared by every model: pure, deterministic functions.

Conventions (stated once, here):
- ``attn_mask`` is bool, True = the query may attend to the key (the meaning of
  ``torch.nn.functional.scaled_dot_product_attention``); see ``attention.Attention``.
- ``loss_mask`` is bool, True = the position is scored.
- Axis letters: B batch, T tokens, N patches or tubelets, F frames, D features,
  C channels, H heads, K masks per sample.
- Randomness: every mask is a pure function of (global_seed, sample_key, mask_index),
  ``sample_key`` a 64-bit hash of the sample's content (``rng.content_key``). The same
  sample gets the same k-th mask in every trial, worker, batch position and machine.
- Masks are data: a masking strategy is a frozen dataclass whose call maps a batch to a
  ``MaskedBatch``; models consume masks and never build them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .attention import Attention

if TYPE_CHECKING:
    from torch import Tensor



@dataclass(frozen=True)
class MaskedBatch:
    """What a masking strategy hands to a model.

    inputs:    (B, T) token ids in the order the model reads them.
    targets:   (B, T) ids to predict at each position.
    loss_mask: (B, T) bool, True = scored.
    attention: the attention pattern for every block.
    direction: (B,) int64 reading direction per row (0 = forward, 1 = backward), or None.
    """

    inputs: Tensor
    targets: Tensor
    loss_mask: Tensor
    attention: Attention
    direction: Tensor | None = None


__all__ = ["Attention", "MaskedBatch"]
