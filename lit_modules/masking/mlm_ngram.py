"""ALBERT's n-gram masking: contiguous n-grams of tokens, n drawn with p(n) ∝ 1/n.

ALBERT (Lan et al. 2020) masks n-grams whose length n in 1..N (N = 3) is drawn with
probability p(n) = (1/n) / (1/1 + ... + 1/N): for N = 3, 6/11, 3/11, 2/11. Here an
n-gram is n consecutive eligible tokens; each is anchored uniformly among the positions
where it fits whole (n free tokens between two special or padding tokens, within the
remaining budget) and, where it fits nowhere, cut short at the end of its segment, at
a selected token or at the budget. So n-grams never cross special tokens and every row
selects exactly its budget, ``round(mask_ratio * n_eligible)`` tokens, then corrupts
them with the BERT split like every masked-LM strategy.

Randomness: the text-mask streams of ``rng.Stream`` (``TEXT_SELECT`` for the anchors,
``TEXT_SPAN_LENGTH`` for the lengths, ``TEXT_REPLACE`` / ``TEXT_RANDOM_TOKEN`` for the
replacement), as ``mlm-span`` draws its span lengths: deterministic per (seed, sample,
mask index), vectorized over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config_errors import ConfigError
from ..lazy import LazyModule
from ..registry import MASKINGS
from .indices import is_int
from .mlm import MaskedLMStrategy, find_words, place_spans
from .rng import Stream
from .selection import exact_count, mask_uniform

if TYPE_CHECKING:
    from torch import Tensor

torch = LazyModule("torch")  # imported on first use (lit_modules/lazy.py)


def ngram_length_cdf(max_n: int) -> list[float]:
    """Cumulative p(n) ∝ 1/n for n = 1..max_n-1 (the last bucket takes the rest)."""
    weights = [1.0 / n for n in range(1, max_n + 1)]
    total, cum, out = sum(weights), 0.0, []
    for w in weights[:-1]:
        cum += w
        out.append(cum / total)
    return out


@MASKINGS.register("mlm-ngram")
@dataclass(frozen=True)
class MLMNgram(MaskedLMStrategy):
    """ALBERT n-gram masking: n-grams of n <= max_n tokens, p(n) ∝ 1/n, exact budget.

    max_n: the longest n-gram, an integer >= 1 (ALBERT: 3).
    """

    name: str = "mlm-ngram"
    max_n: int = 3

    def __post_init__(self):
        super().__post_init__()
        if not is_int(self.max_n) or self.max_n < 1:
            raise ConfigError("max_n", self.max_n, "must be an integer >= 1")

    def lengths(self, seed: int, key: Tensor, mask_index: Tensor | int, rounds: int) -> Tensor:
        """(B, rounds) n-gram lengths in 1..max_n, by inverting the CDF of p(n) ∝ 1/n
        (float64 thresholds; the noise is exact in float64, so every device agrees)."""
        u = mask_uniform(seed, key, mask_index, Stream.TEXT_SPAN_LENGTH, rounds).to(torch.float64)
        cdf = torch.tensor(ngram_length_cdf(self.max_n), dtype=torch.float64, device=u.device)
        return 1 + torch.bucketize(u, cdf, right=True)

    def _select(self, eligible, word_start, seed, key, mask_index):
        tokens = find_words(eligible, None)  # every eligible token is its own unit
        budget = exact_count(eligible, self.mask_ratio)
        rounds = int(budget.max()) if budget.numel() else 0
        lengths = self.lengths(seed, key, mask_index, rounds).to(eligible.device)
        noise = mask_uniform(seed, key, mask_index, Stream.TEXT_SELECT, eligible.shape[1])
        chosen, _ = place_spans(tokens, noise.to(eligible.device), budget, lengths)
        return tokens.to_tokens(chosen)
