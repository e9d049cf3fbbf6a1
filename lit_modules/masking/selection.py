"""Token selection: an exact number of positions per sample, chosen by ranking
deterministic noise, and the BERT replacement split of the selected positions.

Selection is exact, not Bernoulli: sample b gets exactly ``round(ratio * n_b)`` selected
positions, where ``n_b`` counts its eligible positions (not special, not padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config_errors import ConfigError
from ..lazy import LazyModule
from .rng import Stream, bits, mask_stream, to_uniform

if TYPE_CHECKING:
    from torch import Tensor

torch = LazyModule("torch")  # imported on first use (lit_modules/lazy.py)

def mask_uniform(seed: int, key: Tensor, mask_index: Tensor | int, stream: Stream, n: int) -> Tensor:
    """(B, n) float32 uniform noise of one purpose of mask ``mask_index`` of each sample.
    Selection and replacement draw from different streams (``rng.Stream``): otherwise
    which token is replaced would correlate with which token was selected."""
    return to_uniform(bits(mask_stream(seed, key, mask_index, stream), n))


def exact_count(eligible: Tensor, ratio: float) -> Tensor:
    """(B, T) bool eligible -> (B,) int64 number to select: round(ratio * n) per row.

    Python's round (half to even) applied as torch.round, so counts match ``round()``.
    """
    n = eligible.sum(dim=1).to(torch.float64)
    return torch.round(n * ratio).to(torch.int64)


def select_exact(
    eligible: Tensor,
    ratio: float,
    global_seed: int,
    sample_key: Tensor,
    mask_index: Tensor | int,
) -> Tensor:
    """(B, T) bool eligible -> (B, T) bool selected; exactly round(ratio * n_b) per row.

    The selected positions are the eligible ones with the smallest deterministic noise,
    so the same sample (same key) gets the same k-th selection in any batch.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError("mask_ratio", ratio, "must be in [0, 1]")
    b, t = eligible.shape
    noise = mask_uniform(global_seed, sample_key, mask_index, Stream.TEXT_SELECT, t)
    noise = noise.to(eligible.device).masked_fill(~eligible, 2.0)  # ineligible rank last
    rank = noise.argsort(dim=1, stable=True).argsort(dim=1)  # (B, T) rank of each position
    count = exact_count(eligible, ratio)
    return rank < count[:, None]


@dataclass(frozen=True)
class ReplacementSplit:
    """Fractions of selected positions replaced by [MASK], by a random token, or kept."""

    mask: float = 0.8
    random: float = 0.1
    keep: float = 0.1

    def __post_init__(self):
        for name in ("mask", "random", "keep"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"replacement.{name}", v, "must be in [0, 1]")
        total = self.mask + self.random + self.keep
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(
                "replacement", (self.mask, self.random, self.keep),
                f"mask + random + keep must sum to 1 (sums to {total:g})",
            )


def apply_replacement(
    tokens: Tensor,
    selected: Tensor,
    split: ReplacementSplit,
    mask_token: int,
    random_low: int,
    random_high: int,
    global_seed: int,
    sample_key: Tensor,
    mask_index: Tensor | int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Corrupt the selected positions of ``tokens`` (B, T).

    Each selected position draws u ~ U[0, 1): u < mask -> ``mask_token``;
    u < mask + random -> a token uniform in [random_low, random_high); else kept.
    Returns (corrupted tokens, is_masked, is_random), both masks (B, T) bool.
    """
    b, t = tokens.shape
    u = mask_uniform(global_seed, sample_key, mask_index, Stream.TEXT_REPLACE, t)
    u = u.to(tokens.device)
    is_mask = selected & (u < split.mask)
    is_random = selected & (u >= split.mask) & (u < split.mask + split.random)
    r = mask_uniform(global_seed, sample_key, mask_index, Stream.TEXT_RANDOM_TOKEN, t)
    random_tokens = random_low + (r.to(tokens.device) * (random_high - random_low)).long()
    out = torch.where(is_mask, torch.full_like(tokens, mask_token), tokens)
    out = torch.where(is_random, random_tokens.clamp(max=random_high - 1), out)
    return out, is_mask, is_random
