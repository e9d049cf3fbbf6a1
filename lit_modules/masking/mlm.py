"""Masked-LM (BERT) masking: random tokens, whole words, and SpanBERT spans.

Every strategy selects an exact token budget per sequence, ``round(mask_ratio * n)``
with ``n`` the sequence's eligible tokens (not special, not padding), then corrupts the
selected positions with the BERT replacement split (``mask_prob`` -> [MASK],
``random_prob`` -> a random token, ``keep_prob`` -> unchanged); every selected position
is scored, whatever its replacement.

- ``mlm-random``: the budget's tokens, anywhere (exactly the budget, always).
- ``mlm-whole-word``: whole SentencePiece words, a word being a word-start token plus
  the non-start tokens that follow it. Words are taken in the order of deterministic
  noise while they fit; a word that would exceed the budget is skipped and later
  (shorter) words still fill the remainder. Never splits a word, never exceeds the
  budget. It falls short only when every unselected word is longer than what is left
  of the budget, and then by less than the shortest unselected word (with single-token
  words present, which text always has, it practically always lands exactly).
- ``mlm-span``: SpanBERT spans. A span length ``l`` (in words, or in tokens when no word
  starts are given) is drawn from a geometric distribution truncated to
  ``1..max_span`` (``p(l) ~ span_p * (1 - span_p) ** (l - 1)``, renormalized; mean 3.8
  for the defaults, as in SpanBERT). Its first word is uniform among the free words
  where the whole span fits (``l`` unselected words of one segment, within the
  remaining budget); where it fits nowhere (mostly the last span of a sequence) it is
  cut short, as in SpanBERT, at the end of its segment (a special or padding token), at
  an already selected word, or where the next word would exceed the budget. Spans never
  cross special tokens, never split a word, never exceed the budget, and the
  falling-short bound is the one of ``mlm-whole-word``. As in any span masking, words
  within a span length of a segment edge are selected less often than the others (the
  first word of a segment about 0.4x as often).

Words never cross special or padding tokens: the first eligible token after one always
starts a word. Without ``word_start``, every eligible token is its own word.

Determinism (docs/architecture.md, "Masks"): all randomness is drawn from the text-mask
streams of ``rng.Stream`` (``TEXT_SELECT``: selection / anchor noise, ``TEXT_SPAN_LENGTH``:
span lengths, ``TEXT_REPLACE`` / ``TEXT_RANDOM_TOKEN``: the replacement) of ``(seed,
sample_key, mask_index)``, where ``sample_key`` is the content key of the row's valid
tokens (``rng.content_key(tokens, valid)``). Noise at position j depends on j only, never
on the padded width, so the same sample gets the same k-th mask in any batch, batch
position and padding width (padding at the end, as BERT batches have it).

Mask indices (``indices``): training uses ``epoch_mask_index(epoch, static_masks)``
(dynamic masking as in RoBERTa, a new mask each epoch; or BERT's static masks, mask
``epoch % K``); evaluation uses the fixed ``eval_mask_indices(K)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..config_errors import ConfigError
from ..lazy import LazyModule
from ..registry import MASKINGS
from . import MaskContext, MaskedBatch, MaskingStrategy
from .attention import Attention, padding
from .batches import TokenRows
from .indices import (
    check_float,
    check_mask_index,
    check_seed,
    check_static_masks,
    epoch_mask_index,
    is_int,
)
from .rng import Stream, content_key
from .selection import ReplacementSplit, apply_replacement, exact_count, mask_uniform, select_exact

if TYPE_CHECKING:
    from torch import Tensor

torch = LazyModule("torch")  # imported on first use (lit_modules/lazy.py)
F = LazyModule("torch.nn.functional")


# ---------------------------------------------------------------- words


@dataclass(frozen=True)
class Words:
    """The words of a batch, indexed (B, W) with W = T slots (a row has <= T words).

    token_word: (B, T) int64 word of each eligible token; T (a dummy slot) elsewhere.
    length:     (B, W) tokens per word; 0 for the unused slots.
    segment:    (B, W) id of the run of eligible tokens holding the word; -1 unused.
    start:      (B, W) token position of the word's first token; T for unused slots.
    """

    token_word: Tensor
    length: Tensor
    segment: Tensor
    start: Tensor

    @property
    def exists(self) -> Tensor:
        return self.length > 0

    def to_tokens(self, chosen: Tensor) -> Tensor:
        """(B, W) bool chosen words -> (B, T) bool tokens of those words."""
        padded = F.pad(chosen, (0, 1), value=False)  # slot T: ineligible tokens
        return padded.gather(1, self.token_word)

    def at_start(self, per_token: Tensor, fill: float) -> Tensor:
        """(B, T) per-token values -> (B, W) the value at each word's first token."""
        padded = F.pad(per_token, (0, 1), value=fill)
        return padded.gather(1, self.start)


def find_words(eligible: Tensor, word_start: Tensor | None) -> Words:
    """Group eligible tokens into words: a word-start token plus the following non-start
    tokens, cut at every ineligible (special or padding) token."""
    b, t = eligible.shape
    prev = F.pad(eligible[:, :-1], (1, 0), value=False)
    seg_start = eligible & ~prev  # first token of each run of eligible tokens
    if word_start is None:
        start = eligible
    else:
        start = eligible & (word_start | seg_start)
    token_word = torch.where(eligible, start.long().cumsum(1) - 1, t)  # (B, T)
    start_slot = torch.where(start, token_word, t)
    length = torch.zeros(b, t + 1, dtype=torch.int64, device=eligible.device)
    length.scatter_add_(1, token_word, torch.ones_like(token_word))
    segment = torch.full((b, t + 1), -1, dtype=torch.int64, device=eligible.device)
    segment.scatter_(1, start_slot, seg_start.long().cumsum(1))
    pos = torch.arange(t, dtype=torch.int64, device=eligible.device).expand(b, t)
    first = torch.full((b, t + 1), t, dtype=torch.int64, device=eligible.device)
    first.scatter_(1, start_slot, pos)
    # Slot T collects the writes of non-start tokens; it is dropped.
    return Words(token_word, length[:, :t], segment[:, :t], first[:, :t])


def select_whole_words(words: Words, noise: Tensor, budget: Tensor) -> Tensor:
    """(B, W) chosen words: in the order of the noise at each word's start, every word
    that still fits the budget (B,); never exceeds it.

    Phase 1 takes the longest prefix of the ranking that fits (one cumsum). Phase 2
    continues down the ranking with the remainder d < the next word's length, taking the
    first word with length <= d until none fits: each round takes >= 1 token, so it runs
    fewer rounds than the longest word has tokens.
    """
    b, w = words.length.shape
    rank_noise = words.at_start(noise, 2.0).masked_fill(~words.exists, 2.0)
    order = rank_noise.argsort(dim=1, stable=True)  # (B, W) word slots, best first
    length = words.length.gather(1, order)  # (B, W) in rank order
    take = length.cumsum(1) <= budget[:, None]
    remaining = ~take & (length > 0)
    deficit = budget - (length * take).sum(1)
    max_len = int(words.length.max()) if words.length.numel() else 0
    for _ in range(max_len):
        cand = remaining & (length <= deficit[:, None])
        has = cand.any(1)
        if not bool(has.any()):
            break
        first = F.one_hot(cand.to(torch.int32).argmax(1), w).bool() & has[:, None]
        take |= first
        remaining &= ~first
        deficit = deficit - (length * first).sum(1)
    return torch.zeros_like(take).scatter_(1, order, take) & words.exists


def span_length_cdf(span_p: float, max_span: int) -> list[float]:
    """P(l <= j) for j = 1..max_span-1 of the geometric law truncated to 1..max_span."""
    q = 1.0 - span_p
    total = 1.0 - q**max_span
    return [(1.0 - q**j) / total for j in range(1, max_span)]


def draw_span_lengths(u: Tensor, span_p: float, max_span: int) -> Tensor:
    """Uniform noise -> span lengths in 1..max_span (int64), by inverting the CDF.

    The thresholds are float64 numbers computed in Python and ``u`` is exact in float64
    (24-bit grid), so every device gives the same lengths.
    """
    cdf = torch.tensor(span_length_cdf(span_p, max_span), dtype=torch.float64, device=u.device)
    return 1 + torch.bucketize(u.to(torch.float64), cdf, right=True)


def free_runs(free: Tensor, segment: Tensor) -> Tensor:
    """(B, W) for each free word slot, how many consecutive free words of its segment
    start there (itself included); 0 at taken or unused slots."""
    b, w = free.shape
    slot = torch.arange(w, device=free.device)
    seg_change = F.pad(segment[:, 1:] != segment[:, :-1], (1, 0), value=False)
    stops = ~free | seg_change  # a run starting before slot k ends at k
    first_stop = torch.where(stops, slot, w).flip(1).cummin(1).values.flip(1)  # at >= k
    next_stop = F.pad(first_stop[:, 1:], (0, 1), value=w)  # at > k
    return torch.where(free, next_stop - slot, 0)


def place_spans(words: Words, noise: Tensor, budget: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Place spans of ``lengths`` (B, R) words, one per round, until the budget is met.

    Round r, in every row whose budget is not met: the span of ``lengths[:, r]`` words is
    anchored at the free word of least noise (a uniform choice) among the anchors where
    it fits whole: that many free words in one segment, within the remaining budget.
    Where it fits nowhere, it is anchored at the free word of least noise that fits the
    budget by itself and cut short, as in SpanBERT, at the segment's end, at a selected
    word, or where the next word would exceed the budget. Returns (chosen (B, W) bool,
    placed (B, R) words per span, 0 where a row placed none). R >= max(budget) rounds
    always suffice: each round places >= 1 token in every unfinished row.
    """
    b, w = words.length.shape
    anchor_noise = words.at_start(noise, 2.0)
    free = words.exists.clone()
    taken = torch.zeros(b, dtype=torch.int64, device=budget.device)
    placed = torch.zeros_like(lengths)
    slot = torch.arange(w, device=budget.device)[None, :]
    prefix = F.pad(words.length.cumsum(1), (1, 0))  # (B, W + 1) tokens before slot j
    for r in range(lengths.shape[1]):
        deficit = budget - taken
        cand = free & (words.length <= deficit[:, None])
        has = cand.any(1)
        if not bool(has.any()):
            break
        span = lengths[:, r : r + 1]  # (B, 1)
        cost = prefix.gather(1, (slot + span).clamp(max=w)) - prefix[:, :w]
        fits = cand & (free_runs(free, words.segment) >= span) & (cost <= deficit[:, None])
        cand = torch.where(fits.any(1, keepdim=True), fits, cand)
        anchor = anchor_noise.masked_fill(~cand, 3.0).argmin(1, keepdim=True)  # (B, 1)
        offset = slot - anchor
        window = (offset >= 0) & (offset < span)
        ok = free & (words.segment == words.segment.gather(1, anchor))
        run = window & ((window & ~ok).long().cumsum(1) == 0)  # up to the first blocked word
        take = run & ((words.length * run).cumsum(1) <= deficit[:, None]) & has[:, None]
        free &= ~take
        taken = taken + (words.length * take).sum(1)
        placed[:, r] = take.sum(1)
    return words.exists & ~free, placed


# ---------------------------------------------------------------- strategies


def _same_shape(name: str, x: Tensor | None, shape) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bool or x.shape != shape:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: must be a bool tensor of shape {tuple(shape)} like tokens, got {got}")


def check_rows(rows: TokenRows) -> None:
    """The shapes, dtypes and vocabulary of a ``TokenRows`` batch, or a ValueError."""
    tokens = rows.tokens
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point \
            or tokens.dtype == torch.bool:
        raise ValueError(f"tokens: must be a (B, T) integer tensor, got {getattr(tokens, 'shape', type(tokens))}")
    if rows.eligible is None:
        raise ValueError("eligible: required, a (B, T) bool tensor (False at special and padding tokens)")
    for name in ("eligible", "word_start", "valid"):
        _same_shape(name, getattr(rows, name), tokens.shape)
    if rows.valid is not None and bool((rows.eligible & ~rows.valid).any()):
        raise ValueError("eligible: marks a padding position (valid = False) as eligible")
    v, low, m = rows.vocab_size, rows.random_low, rows.mask_token_id
    if not is_int(v) or not is_int(low) or not 0 <= low < v:
        raise ValueError(f"random_low = {low!r}, vocab_size = {v!r}: need 0 <= random_low < vocab_size")
    if not is_int(m) or not 0 <= m < v:
        raise ValueError(f"mask_token_id = {m!r}: must be in [0, vocab_size = {v})")


@dataclass(frozen=True)
class MaskedLMStrategy(MaskingStrategy):
    """Fields and call shared by the masked-LM strategies (not registered itself).

    mask_ratio:   fraction of eligible tokens selected per sequence, in (0, 1).
    mask_prob, random_prob, keep_prob: the replacement split of selected tokens ([MASK],
                  a random token, unchanged); each in [0, 1], summing to 1.
    static_masks: 0 = dynamic masking (new mask each epoch); K > 0 = mask epoch % K.
    """

    accepts: ClassVar[type] = TokenRows
    name: str = ""
    mask_ratio: float = 0.15
    mask_prob: float = 0.8
    random_prob: float = 0.1
    keep_prob: float = 0.1
    static_masks: int = 0

    def __post_init__(self):
        check_float("mask_ratio", self.mask_ratio, 0.0, 1.0, lo_open=True, hi_open=True)
        for field in ("mask_prob", "random_prob", "keep_prob"):
            check_float(field, getattr(self, field), 0.0, 1.0, lo_open=False, hi_open=False)
        total = self.mask_prob + self.random_prob + self.keep_prob
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(
                "mask_prob", self.mask_prob,
                f"mask_prob + random_prob + keep_prob must sum to 1 "
                f"({self.mask_prob:g} + {self.random_prob:g} + {self.keep_prob:g} = {total:g})",
            )
        check_static_masks(self.static_masks)

    @property
    def split(self) -> ReplacementSplit:
        return ReplacementSplit(self.mask_prob, self.random_prob, self.keep_prob)

    def training_index(self, step: int, epoch: int) -> int:
        """A new mask every epoch (dynamic), or mask ``epoch % static_masks`` (static)."""
        return epoch_mask_index(epoch, self.static_masks)

    # Subclasses: (B, T) bool selected positions, within ``eligible``.
    def _select(self, eligible: Tensor, word_start: Tensor | None, seed: int, key: Tensor,
                mask_index: Tensor | int) -> Tensor:
        raise NotImplementedError

    def select(self, rows: TokenRows, ctx: MaskContext) -> Tensor:
        """(B, T) bool: the positions this strategy scores (before replacement)."""
        key = self._checked_key(rows, ctx)
        return self._select(rows.eligible, rows.word_start, ctx.seed, key, ctx.mask_index)

    def __call__(self, rows: TokenRows, ctx: MaskContext) -> MaskedBatch:
        """Mask a batch of token rows: inputs = the tokens after replacement, targets =
        the tokens, loss_mask = the selected positions, attention = bidirectional with
        the padding keys hidden."""
        key = self._checked_key(rows, ctx)
        mask_index = ctx.mask_index
        selected = self._select(rows.eligible, rows.word_start, ctx.seed, key, mask_index)
        inputs, _, _ = apply_replacement(rows.tokens, selected, self.split, rows.mask_token_id, rows.random_low,
                                         rows.vocab_size, ctx.seed, key, mask_index)
        attention = Attention() if rows.valid is None else Attention(mask=padding(rows.valid))
        return MaskedBatch(inputs=inputs, targets=rows.tokens, loss_mask=selected, attention=attention)

    def _checked_key(self, rows: TokenRows, ctx: MaskContext) -> Tensor:
        if not isinstance(rows, TokenRows):
            raise ValueError(f"{self.name} masks TokenRows, got {type(rows).__name__}")
        check_rows(rows)
        check_mask_index(ctx.mask_index, rows.tokens.shape[0])
        check_seed(ctx.seed)
        return content_key(rows.tokens, rows.valid)


@MASKINGS.register("mlm-random")
@dataclass(frozen=True)
class MLMRandom(MaskedLMStrategy):
    """BERT masking: exactly round(mask_ratio * n_eligible) random tokens per sequence."""

    name: str = "mlm-random"

    def _select(self, eligible, word_start, seed, key, mask_index):
        return select_exact(eligible, self.mask_ratio, seed, key, mask_index)


@MASKINGS.register("mlm-whole-word")
@dataclass(frozen=True)
class MLMWholeWord(MaskedLMStrategy):
    """Whole-word masking: whole SentencePiece words up to the token budget."""

    name: str = "mlm-whole-word"

    def _select(self, eligible, word_start, seed, key, mask_index):
        if word_start is None:
            raise ValueError("word_start: mlm-whole-word needs the (B, T) bool word starts")
        words = find_words(eligible, word_start)
        noise = mask_uniform(seed, key, mask_index, Stream.TEXT_SELECT, eligible.shape[1])
        chosen = select_whole_words(words, noise.to(eligible.device), exact_count(eligible, self.mask_ratio))
        return words.to_tokens(chosen)


@MASKINGS.register("mlm-span")
@dataclass(frozen=True)
class MLMSpan(MaskedLMStrategy):
    """SpanBERT masking: contiguous spans of geometric length up to the token budget.

    span_p:   the geometric parameter, in (0, 1].
    max_span: the largest span, in words (tokens without word starts), an integer >= 1.
    """

    name: str = "mlm-span"
    span_p: float = 0.2
    max_span: int = 10

    def __post_init__(self):
        super().__post_init__()
        check_float("span_p", self.span_p, 0.0, 1.0, lo_open=True, hi_open=False)
        if not is_int(self.max_span) or self.max_span < 1:
            raise ConfigError("max_span", self.max_span, "must be an integer >= 1")

    @property
    def mean_span(self) -> float:
        """Expected span length (words) of the truncated geometric law; 3.8 for defaults."""
        q = 1.0 - self.span_p
        weights = [q ** (j - 1) for j in range(1, self.max_span + 1)]
        return sum(j * wj for j, wj in enumerate(weights, start=1)) / sum(weights)

    def span_lengths(self, seed: int, key: Tensor, mask_index: Tensor | int, rounds: int) -> Tensor:
        """(B, rounds) the span lengths drawn for rounds 0..rounds-1 (prefix-stable)."""
        u = mask_uniform(seed, key, mask_index, Stream.TEXT_SPAN_LENGTH, rounds)
        return draw_span_lengths(u, self.span_p, self.max_span)

    def spans(self, rows: TokenRows, ctx: MaskContext) -> tuple[Tensor, Tensor, Tensor]:
        """(selected (B, T) bool, drawn (B, R) span lengths, placed (B, R) words per span)."""
        key = self._checked_key(rows, ctx)
        return self._spans(rows.eligible, rows.word_start, ctx.seed, key, ctx.mask_index)

    def _spans(self, eligible, word_start, seed, key, mask_index):
        words = find_words(eligible, word_start)
        budget = exact_count(eligible, self.mask_ratio)
        rounds = int(budget.max()) if budget.numel() else 0
        drawn = self.span_lengths(seed, key, mask_index, rounds).to(eligible.device)
        noise = mask_uniform(seed, key, mask_index, Stream.TEXT_SELECT, eligible.shape[1])
        chosen, placed = place_spans(words, noise.to(eligible.device), budget, drawn)
        return words.to_tokens(chosen), drawn, placed

    def _select(self, eligible, word_start, seed, key, mask_index):
        return self._spans(eligible, word_start, seed, key, mask_index)[0]


__all__ = [
    "MLMRandom",
    "MLMSpan",
    "MLMWholeWord",
    "MaskedLMStrategy",
    "Words",
    "check_rows",
    "draw_span_lengths",
    "find_words",
    "free_runs",
    "place_spans",
    "select_whole_words",
    "span_length_cdf",
]
