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

Determinism (DESIGN.md section 3): all randomness is ``rng.uniform`` of
``(seed, sample_key, stream_index(mask_index, stream))`` with one stream per purpose
(``STREAM_SELECT``: selection / anchor noise, ``STREAM_SPAN_LENGTH``: span lengths,
``STREAM_REPLACE`` / ``STREAM_RANDOM_TOKEN``: the replacement), and ``sample_key`` is the
content key of the row's valid tokens (``sample_keys``). Noise at position j depends on j
only, never on the padded width, so the same sample gets the same k-th mask in any
batch, batch position and padding width (padding at the end, as BERT batches have it).

Mask indices: training uses ``epoch_mask_index(epoch, static_masks)`` (dynamic masking
as in RoBERTa, a new mask each epoch; or BERT's static masks, mask ``epoch % K``);
evaluation uses the fixed ``eval_mask_indices(K)``, a reserved range starting at
``EVAL_MASK_BASE`` that training indices never reach.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config_errors import ConfigError
from ..lazy import LazyModule
from ..registry import MASKINGS
from . import MaskedBatch
from .attention import Attention, padding
from .rng import _GOLDEN, _LANE2, MASK32, _absorb, content_key, mix32, uniform
from .selection import (
    STREAM_RANDOM_TOKEN,
    STREAM_REPLACE,
    STREAM_SELECT,
    ReplacementSplit,
    apply_replacement,
    exact_count,
    select_exact,
    stream_index,
)

if TYPE_CHECKING:
    from torch import Tensor

torch = LazyModule("torch")  # imported on first use (lit_modules/lazy.py)
F = LazyModule("torch.nn.functional")

# The sub-stream of a mask index that draws span lengths; selection.py owns 0..2.
STREAM_SPAN_LENGTH = 3
assert STREAM_SPAN_LENGTH not in (STREAM_SELECT, STREAM_REPLACE, STREAM_RANDOM_TOKEN)
assert stream_index(0, STREAM_SPAN_LENGTH) < stream_index(1, 0), "span stream must fit the stride"

# seed_hash keeps the low 32 bits of stream_index(k, s) = stride * k + s, so mask indices
# are distinct streams only below 2**32 / stride (2**30).
MAX_MASK_INDEX = (1 << 32) // stream_index(1, 0)
# Evaluation masks live in [EVAL_MASK_BASE, EVAL_MASK_BASE + MAX_EVAL_MASKS); training
# mask indices (epochs) stay below EVAL_MASK_BASE, so the two never coincide.
EVAL_MASK_BASE = 1 << 28
MAX_EVAL_MASKS = 1 << 20
assert EVAL_MASK_BASE + MAX_EVAL_MASKS <= MAX_MASK_INDEX


# ---------------------------------------------------------------- mask indices


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_static_masks(static_masks: object) -> None:
    if not _is_int(static_masks) or not 0 <= static_masks < EVAL_MASK_BASE:
        raise ConfigError(
            "static_masks", static_masks,
            "must be an integer >= 0 (0 = a new mask every epoch, K = mask epoch % K)",
        )


def epoch_mask_index(epoch: int, static_masks: int = 0) -> int:
    """The training mask index of ``epoch``.

    ``static_masks = 0``: dynamic masking (RoBERTa), mask index = epoch, a new mask every
    epoch. ``static_masks = K > 0``: static masking (original BERT, whose data was
    duplicated K times with K masks), mask index = epoch % K.
    """
    if not _is_int(epoch) or epoch < 0:
        raise ConfigError("epoch", epoch, "must be an integer >= 0")
    _check_static_masks(static_masks)
    k = int(epoch) % static_masks if static_masks else int(epoch)
    if k >= EVAL_MASK_BASE:
        raise ConfigError("epoch", epoch, f"dynamic masking needs epoch < {EVAL_MASK_BASE} (the eval mask range)")
    return k


def eval_mask_indices(k: int) -> range:
    """The K fixed evaluation mask indices: ``range(EVAL_MASK_BASE, EVAL_MASK_BASE + K)``.

    Every trial scores the same K masks per validation sample, disjoint from any
    training mask, so validation losses differ only by the model, not by mask noise.
    Score sample b under mask k by passing ``mask_index=eval_mask_indices(K)[k]`` (an
    int for the whole batch, or a (B,) tensor).
    """
    if not _is_int(k) or not 1 <= k <= MAX_EVAL_MASKS:
        raise ConfigError("eval_masks", k, f"must be an integer in [1, {MAX_EVAL_MASKS}]")
    return range(EVAL_MASK_BASE, EVAL_MASK_BASE + int(k))


# ---------------------------------------------------------------- sample keys


def sample_keys(tokens: Tensor, valid: Tensor | None = None) -> Tensor:
    """(B, T) tokens -> (B,) int64 content keys of the valid tokens of each row.

    Equal to ``rng.content_key(row[:n])`` when the row's valid tokens are its first n
    (right padding), whatever the padded width T. ``valid=None``: all tokens count.
    """
    if valid is None:
        return content_key(tokens)
    words = tokens.detach().to(torch.int64) & MASK32  # (B, T)
    pos = torch.arange(words.shape[1], dtype=torch.int64, device=words.device)
    n = valid.sum(dim=1).to(torch.int64)  # (B,)
    lanes = []
    # rng.content_key restricted to the valid tokens (hence its private salts and mixer).
    for salt in (_GOLDEN, _LANE2):
        per_elem = mix32(_absorb(mix32(pos + salt)[None, :], words))  # (B, T)
        total = per_elem.masked_fill(~valid, 0).sum(dim=1) & MASK32
        lanes.append(mix32(total ^ (n & MASK32)))
    return lanes[0] | (lanes[1] << 32)


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


def _check_float(name: str, value: object, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        above = value > lo if lo_open else value >= lo
        below = value < hi if hi_open else value <= hi
        ok = above and below  # False for NaN
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(name, value, f"must be a number in {interval}")


def _same_shape(name: str, x: Tensor | None, shape: torch.Size) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bool or x.shape != shape:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: must be a bool tensor of shape {tuple(shape)} like tokens, got {got}")


def _check_mask_index(mask_index: Tensor | int, b: int) -> None:
    if isinstance(mask_index, torch.Tensor):
        if mask_index.shape not in ((b,), ()) or mask_index.dtype.is_floating_point or mask_index.dtype == torch.bool:
            raise ValueError(f"mask_index: must be an int or an integer tensor of shape ({b},), got {mask_index.dtype} {tuple(mask_index.shape)}")
        bad = bool(((mask_index < 0) | (mask_index >= MAX_MASK_INDEX)).any()) if mask_index.numel() else False
    elif _is_int(mask_index):
        bad = not 0 <= mask_index < MAX_MASK_INDEX
    else:
        raise ValueError(f"mask_index = {mask_index!r}: must be an int or a (B,) integer tensor")
    if bad:
        raise ValueError(f"mask_index: must be in [0, {MAX_MASK_INDEX})")


@dataclass(frozen=True)
class MaskedLMStrategy:
    """Fields and call shared by the masked-LM strategies (not registered itself).

    mask_ratio:   fraction of eligible tokens selected per sequence, in (0, 1).
    mask_prob, random_prob, keep_prob: the replacement split of selected tokens ([MASK],
                  a random token, unchanged); each in [0, 1], summing to 1.
    static_masks: 0 = dynamic masking (new mask each epoch); K > 0 = mask epoch % K.
    """

    name: str = ""
    mask_ratio: float = 0.15
    mask_prob: float = 0.8
    random_prob: float = 0.1
    keep_prob: float = 0.1
    static_masks: int = 0

    def __post_init__(self):
        _check_float("mask_ratio", self.mask_ratio, 0.0, 1.0, lo_open=True, hi_open=True)
        for field in ("mask_prob", "random_prob", "keep_prob"):
            _check_float(field, getattr(self, field), 0.0, 1.0, lo_open=False, hi_open=False)
        total = self.mask_prob + self.random_prob + self.keep_prob
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(
                "mask_prob", self.mask_prob,
                f"mask_prob + random_prob + keep_prob must sum to 1 "
                f"({self.mask_prob:g} + {self.random_prob:g} + {self.keep_prob:g} = {total:g})",
            )
        _check_static_masks(self.static_masks)

    @property
    def split(self) -> ReplacementSplit:
        return ReplacementSplit(self.mask_prob, self.random_prob, self.keep_prob)

    def epoch_mask_index(self, epoch: int) -> int:
        """The training mask index of ``epoch`` under this strategy's ``static_masks``."""
        return epoch_mask_index(epoch, self.static_masks)

    # Subclasses: (B, T) bool selected positions, within ``eligible``.
    def _select(self, eligible: Tensor, word_start: Tensor | None, seed: int, key: Tensor, mask_index: Tensor | int) -> Tensor:
        raise NotImplementedError

    def select(
        self,
        tokens: Tensor,
        *,
        seed: int,
        mask_index: Tensor | int,
        eligible: Tensor,
        word_start: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> Tensor:
        """(B, T) bool: the positions this strategy scores (before replacement)."""
        self._check(tokens, mask_index, eligible, word_start, valid)
        return self._select(eligible, word_start, seed, sample_keys(tokens, valid), mask_index)

    def __call__(
        self,
        tokens: Tensor,
        *,
        seed: int,
        mask_index: Tensor | int,
        eligible: Tensor,
        word_start: Tensor | None = None,
        valid: Tensor | None = None,
        vocab_size: int,
        mask_token_id: int,
        random_low: int = 0,
    ) -> MaskedBatch:
        """Mask a batch of token ids.

        tokens:      (B, T) int64 ids, special tokens included, padding at the end.
        seed:        the run's global seed.
        mask_index:  int or (B,) int64: which mask of each sample (``epoch_mask_index``
                     in training, ``eval_mask_indices(K)[k]`` in evaluation).
        eligible:    (B, T) bool, False at special and padding tokens (never selected).
        word_start:  (B, T) bool, True at the first token of a SentencePiece word
                     (required by mlm-whole-word; mlm-span uses it if given).
        valid:       (B, T) bool, False at padding (None: no padding).
        vocab_size, mask_token_id: the vocabulary; random replacements are uniform over
                     [random_low, vocab_size), special ids included unless ``random_low``
                     excludes a low block of them (BERT draws from the whole vocabulary).

        Returns inputs = tokens after replacement, targets = tokens, loss_mask = the
        selected positions, attention = bidirectional with padded keys hidden,
        direction = None.
        """
        if not _is_int(vocab_size) or not _is_int(random_low) or not 0 <= random_low < vocab_size:
            raise ValueError(f"random_low = {random_low!r}, vocab_size = {vocab_size!r}: need 0 <= random_low < vocab_size")
        if not _is_int(mask_token_id) or not 0 <= mask_token_id < vocab_size:
            raise ValueError(f"mask_token_id = {mask_token_id!r}: must be in [0, vocab_size = {vocab_size})")
        self._check(tokens, mask_index, eligible, word_start, valid)
        key = sample_keys(tokens, valid)
        selected = self._select(eligible, word_start, seed, key, mask_index)
        inputs, _, _ = apply_replacement(
            tokens, selected, self.split, mask_token_id, random_low, vocab_size, seed, key, mask_index,
        )
        attention = Attention() if valid is None else Attention(mask=padding(valid))
        return MaskedBatch(inputs=inputs, targets=tokens, loss_mask=selected, attention=attention)

    def _check(self, tokens, mask_index, eligible, word_start, valid) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens: must be a (B, T) integer tensor, got {getattr(tokens, 'shape', type(tokens))}")
        if eligible is None:
            raise ValueError("eligible: required, a (B, T) bool tensor (False at special and padding tokens)")
        for name, x in (("eligible", eligible), ("word_start", word_start), ("valid", valid)):
            _same_shape(name, x, tokens.shape)
        if valid is not None and bool((eligible & ~valid).any()):
            raise ValueError("eligible: marks a padding position (valid = False) as eligible")
        _check_mask_index(mask_index, tokens.shape[0])


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
        noise = uniform(seed, key, stream_index(mask_index, STREAM_SELECT), (eligible.shape[1],))
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
        _check_float("span_p", self.span_p, 0.0, 1.0, lo_open=True, hi_open=False)
        if not _is_int(self.max_span) or self.max_span < 1:
            raise ConfigError("max_span", self.max_span, "must be an integer >= 1")

    @property
    def mean_span(self) -> float:
        """Expected span length (words) of the truncated geometric law; 3.8 for defaults."""
        q = 1.0 - self.span_p
        weights = [q ** (j - 1) for j in range(1, self.max_span + 1)]
        return sum(j * wj for j, wj in enumerate(weights, start=1)) / sum(weights)

    def span_lengths(self, seed: int, key: Tensor, mask_index: Tensor | int, rounds: int) -> Tensor:
        """(B, rounds) the span lengths drawn for rounds 0..rounds-1 (prefix-stable)."""
        u = uniform(seed, key, stream_index(mask_index, STREAM_SPAN_LENGTH), (rounds,))
        return draw_span_lengths(u, self.span_p, self.max_span)

    def spans(
        self,
        tokens: Tensor,
        *,
        seed: int,
        mask_index: Tensor | int,
        eligible: Tensor,
        word_start: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(selected (B, T) bool, drawn (B, R) span lengths, placed (B, R) words per span)."""
        self._check(tokens, mask_index, eligible, word_start, valid)
        return self._spans(eligible, word_start, seed, sample_keys(tokens, valid), mask_index)

    def _spans(self, eligible, word_start, seed, key, mask_index):
        words = find_words(eligible, word_start)
        budget = exact_count(eligible, self.mask_ratio)
        rounds = int(budget.max()) if budget.numel() else 0
        drawn = self.span_lengths(seed, key, mask_index, rounds).to(eligible.device)
        noise = uniform(seed, key, stream_index(mask_index, STREAM_SELECT), (eligible.shape[1],))
        chosen, placed = place_spans(words, noise.to(eligible.device), budget, drawn)
        return words.to_tokens(chosen), drawn, placed

    def _select(self, eligible, word_start, seed, key, mask_index):
        return self._spans(eligible, word_start, seed, key, mask_index)[0]


__all__ = [
    "EVAL_MASK_BASE",
    "MAX_EVAL_MASKS",
    "MAX_MASK_INDEX",
    "STREAM_SPAN_LENGTH",
    "MLMRandom",
    "MLMSpan",
    "MLMWholeWord",
    "MaskedLMStrategy",
    "Words",
    "draw_span_lengths",
    "epoch_mask_index",
    "eval_mask_indices",
    "find_words",
    "free_runs",
    "place_spans",
    "sample_keys",
    "select_whole_words",
    "span_length_cdf",
]
