"""Property tests of the masked-LM strategies: exact budgets, whole words, SpanBERT
spans, the replacement split, deterministic and distinct masks, static/dynamic/eval mask
indices, and one-line config errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lit_modules.config import from_dict
from lit_modules.config_errors import ConfigError
from lit_modules.masking import MaskContext, MaskedBatch, attention, rng
from lit_modules.masking.attention import Attention
from lit_modules.masking.batches import TokenRows, TokenWindows
from lit_modules.masking.indices import (
    EVAL_MASK_BASE,
    MAX_MASK_INDEX,
    epoch_mask_index,
    eval_mask_indices,
)
from lit_modules.masking.mlm import MLMRandom, MLMSpan, MLMWholeWord, find_words
from lit_modules.masking.plan import MaskPlan
from lit_modules.model_configs import maskings_for
from lit_modules.registry import MASKINGS

V, PAD, CLS, SEP, MASK, LOW = 1000, 0, 1, 2, 4, 5  # ids below LOW are special
# Every registered strategy that masks token rows (derived from the registry, so a new
# masked-LM strategy is held to the shared properties the moment it is registered).
MLM_NAMES = maskings_for(TokenRows)
# The strategies that select every position equally often (spans and n-grams, which
# never cross a segment edge, select a segment's first and last tokens less).
UNIFORM = {"mlm-random", "mlm-whole-word"}
# The strategies that select whole words only.
WHOLE_WORDS = {"mlm-whole-word", "mlm-span"}


def _rows(tokens, eligible, word_start=None, valid=None, **vocab) -> TokenRows:
    """A TokenRows batch in this file's vocabulary (V ids, [MASK] = MASK, random
    replacements from LOW)."""
    return TokenRows(tokens, valid, eligible, word_start, **({"vocab_size": V, "mask_token_id": MASK,
                                                               "random_low": LOW} | vocab))


def _batch(b: int, t: int, seed: int = 0, min_len: int = 2, p_start: float = 0.7) -> TokenRows:
    """[CLS] a ... [SEP] (b ... [SEP] in about half the rows), then padding; varied
    lengths; words of about 1 / p_start tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, t + 1, (b,), generator=g)
    pos = torch.arange(t)[None, :]
    valid = pos < lengths[:, None]
    tokens = torch.randint(LOW, V, (b, t), generator=g)
    special = (pos == 0) | (pos == lengths[:, None] - 1)
    pair = (torch.rand(b, generator=g) < 0.5) & (lengths >= 6)
    special |= pair[:, None] & (pos == lengths[:, None] // 2)  # a middle [SEP]
    tokens[special] = SEP
    tokens[:, 0] = CLS
    tokens[~valid] = PAD
    word_start = torch.rand(b, t, generator=g) < p_start
    return _rows(tokens, valid & ~special, word_start, valid)


def _mask(strategy, batch: TokenRows, mask_index=0, seed: int = 0) -> MaskedBatch:
    return strategy(batch, MaskContext(seed=seed, mask_index=mask_index))


def _budget(eligible: torch.Tensor, ratio: float) -> torch.Tensor:
    return torch.tensor([round(ratio * n) for n in eligible.sum(1).tolist()])


def _never_splits_a_word(selected: torch.Tensor, batch: TokenRows) -> bool:
    """A continuation token (eligible, not a word start, after an eligible token) is
    selected exactly when the token before it is."""
    cont = batch.eligible[:, 1:] & batch.eligible[:, :-1] & ~batch.word_start[:, 1:]
    return bool((selected[:, 1:] == selected[:, :-1])[cont].all())


def _word_lengths(eligible_row: list[bool], start_row: list[bool]) -> list[tuple[int, int]]:
    """Reference words of one row: (first position, length), cut at ineligible tokens."""
    words: list[list[int]] = []
    for j, (e, s) in enumerate(zip(eligible_row, start_row)):
        if not e:
            continue
        if s or j == 0 or not eligible_row[j - 1]:
            words.append([j, 0])
        words[-1][1] += 1
    return [(a, n) for a, n in words]


# ================================================================ registry and API


def test_registered_with_defaults():
    assert {"mlm-random", "mlm-whole-word", "mlm-span"} <= set(MLM_NAMES)
    for cls in (MLMRandom, MLMWholeWord, MLMSpan):
        assert MASKINGS.get(cls().name) is cls
        s = cls()
        assert (s.mask_ratio, s.mask_prob, s.random_prob, s.keep_prob, s.static_masks) == (0.15, 0.8, 0.1, 0.1, 0)
    assert (MLMSpan().span_p, MLMSpan().max_span) == (0.2, 10)
    for name in MLM_NAMES:
        s = MASKINGS.get(name)()
        assert s.name == name and s.accepts is TokenRows
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.mask_ratio = 0.3  # type: ignore[misc]


@pytest.mark.parametrize("name", MLM_NAMES)
def test_masked_batch_fields(name):
    cls = MASKINGS.get(name)
    batch = _batch(64, 24, seed=3)
    mb = _mask(cls(), batch)
    assert isinstance(mb, MaskedBatch)
    assert torch.equal(mb.targets, batch.tokens)
    assert mb.loss_mask.dtype == torch.bool and mb.loss_mask.shape == batch.tokens.shape
    assert torch.equal(mb.inputs[~mb.loss_mask], batch.tokens[~mb.loss_mask])
    assert mb.direction is None
    assert not mb.attention.causal
    assert torch.equal(mb.attention.mask, attention.padding(batch.valid))
    assert mb.attention.dense(24).shape == (64, 1, 24, 24)
    # Without padding: plain bidirectional attention, the fused kernel's form.
    full = _batch(8, 10, min_len=10)
    mb = cls()(dataclasses.replace(full, valid=None), MaskContext(seed=0))
    assert mb.attention == Attention()


def test_content_keys_ignore_padding_width():
    batch = _batch(50, 30, seed=1)
    keys = rng.content_key(batch.tokens, batch.valid)
    for i in range(50):
        n = int(batch.valid[i].sum())
        assert keys[i] == rng.content_key(batch.tokens[i : i + 1, :n])[0]
    wider = torch.nn.functional.pad(batch.tokens, (0, 9), value=PAD)
    assert torch.equal(rng.content_key(wider, torch.nn.functional.pad(batch.valid, (0, 9))), keys)
    everything = torch.ones_like(batch.valid)
    assert torch.equal(rng.content_key(batch.tokens, everything), rng.content_key(batch.tokens))
    assert not torch.equal(rng.content_key(batch.tokens), keys)  # padding counts when it is not excluded


# ================================================================ exact budgets


def test_random_exact_count_over_10k_sequences():
    batch = _batch(10_000, 64, seed=0)
    for ratio in (0.15, 0.4):
        mb = _mask(MLMRandom(mask_ratio=ratio), batch)
        assert not (mb.loss_mask & ~batch.eligible).any(), "selected a special or padding token"
        assert torch.equal(mb.loss_mask.sum(1), _budget(batch.eligible, ratio))


@pytest.mark.parametrize("name", MLM_NAMES)
def test_within_budget_over_10k_sequences(name):
    """Every masked-LM strategy: never past the budget, on it for > 99% of rows, short
    only by the documented bound; the word-level ones never split a word."""
    batch = _batch(10_000, 64, seed=1)
    sel = _mask(MASKINGS.get(name)(), batch).loss_mask
    budget = _budget(batch.eligible, 0.15)
    count = sel.sum(1)
    assert not (sel & ~batch.eligible).any(), "selected a special or padding token"
    assert _never_splits_a_word(sel, batch) == (name in WHOLE_WORDS)  # mlm-random splits words
    assert (count <= budget).all(), "exceeded the budget"
    assert (count == budget).float().mean() > 0.99
    # The documented bound: short only when every unselected word is longer than the rest.
    for i in torch.nonzero(count < budget).flatten().tolist():
        deficit = int(budget[i] - count[i])
        words = _word_lengths(batch.eligible[i].tolist(), batch.word_start[i].tolist())
        unselected = [n for a, n in words if not sel[i, a]]
        assert unselected and min(unselected) > deficit


def test_whole_word_fills_the_remainder_with_later_words():
    """Words 3 + 1 + 1 + 1 tokens, budget 2: the 3-token word never fits, two 1-token
    words are taken whatever their rank."""
    tokens = torch.arange(LOW, LOW + 8)[None].repeat(500, 1)
    tokens[:, 0], tokens[:, -1] = CLS, SEP
    tokens[:, 1] += torch.arange(500)  # distinct samples
    eligible = torch.ones(500, 8, dtype=torch.bool)
    eligible[:, [0, 7]] = False
    word_start = torch.tensor([[0, 1, 0, 0, 1, 1, 1, 0]], dtype=torch.bool).repeat(500, 1)
    rows = _rows(tokens, eligible, word_start)
    sel = MLMWholeWord(mask_ratio=2 / 6).select(rows, MaskContext(seed=0))
    assert (sel.sum(1) == 2).all()
    assert not sel[:, 1:4].any()
    assert (sel[:, 4:7].sum(1) == 2).all()
    # Budget 4: the 3-token word plus a single word (4), or, when two singles rank first,
    # three singles (3): the 3-token word no longer fits, and greedy never un-takes a word.
    sel = MLMWholeWord(mask_ratio=4 / 6).select(rows, MaskContext(seed=0))
    big = sel[:, 1:4].all(1)
    assert (big | ~sel[:, 1:4].any(1)).all()  # never split
    assert torch.equal(sel.sum(1), torch.where(big, 4, 3))
    assert 0.1 < big.float().mean() < 0.9  # both occur


def test_find_words_cuts_at_special_tokens():
    eligible = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    word_start = torch.tensor([[1, 1, 0, 1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    words = find_words(eligible, word_start)
    # Words: [1, 2], [3], [5, 6] (position 5 starts a word: it follows a special token).
    assert words.token_word[0].tolist() == [9, 0, 0, 1, 9, 2, 2, 9, 9]
    assert words.length[0, :4].tolist() == [2, 1, 2, 0]
    assert words.start[0, :3].tolist() == [1, 3, 5]
    assert words.segment[0, :3].tolist() == [1, 1, 2]
    assert find_words(eligible, None).length[0, :5].tolist() == [1, 1, 1, 1, 1]


# ================================================================ spans


def test_span_lengths_follow_the_truncated_geometric():
    s = MLMSpan()
    assert math.isclose(s.mean_span, 3.797, abs_tol=1e-3)  # SpanBERT's 3.8
    lengths = s.span_lengths(0, torch.arange(20_000), 0, 10).flatten()  # 200,000 draws
    assert lengths.min() == 1 and lengths.max() == 10
    q = 0.8
    pmf = torch.tensor([q ** (j - 1) for j in range(1, 11)], dtype=torch.float64)
    pmf /= pmf.sum()
    counts = torch.bincount(lengths, minlength=11)[1:].double()
    expected = pmf * lengths.numel()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 40, f"chi-square {chi2:.1f} with 9 dof"
    assert abs(lengths.double().mean().item() - s.mean_span) < 0.03
    assert (MLMSpan(span_p=1.0).span_lengths(0, torch.arange(100), 0, 5) == 1).all()
    assert (MLMSpan(max_span=1).span_lengths(0, torch.arange(100), 0, 5) == 1).all()
    short = MLMSpan(span_p=0.5, max_span=3)
    assert math.isclose(short.mean_span, (1 + 2 * 0.5 + 3 * 0.25) / 1.75)


def test_placed_spans_are_roughly_geometric():
    batch = _batch(1_000, 256, seed=2, min_len=200)
    s = MLMSpan()
    sel, drawn, placed = s.spans(dataclasses.replace(batch, word_start=None), MaskContext(seed=0))
    assert torch.equal(sel.sum(1), _budget(batch.eligible, 0.15))  # token spans: exact
    spans = placed > 0
    assert (placed <= drawn).all()
    assert torch.equal(placed.sum(1), sel.sum(1))  # word = token here
    # Only the span that meets the budget (the last one) is routinely cut short.
    order = spans.long().cumsum(1)
    not_last = spans & (order < order.max(1, keepdim=True).values)
    assert (placed == drawn)[not_last].float().mean() > 0.97
    mean = placed[spans].double().mean().item()
    assert 0.88 * s.mean_span < mean <= s.mean_span, f"mean placed span {mean:.2f}"


def test_spans_never_cross_special_tokens():
    """Every other token special: each span is cut to one token, the budget still met."""
    b, t = 200, 41
    tokens = torch.randint(LOW, V, (b, t))
    eligible = torch.zeros(b, t, dtype=torch.bool)
    eligible[:, 1::2] = True
    tokens[~eligible] = SEP
    sel, drawn, placed = MLMSpan(mask_ratio=0.5).spans(_rows(tokens, eligible), MaskContext(seed=0))
    assert placed.max() == 1 and (drawn > 1).any()
    assert torch.equal(sel.sum(1), _budget(eligible, 0.5))
    assert not (sel & ~eligible).any()


def test_span_uses_word_boundaries():
    batch = _batch(2_000, 96, seed=4, min_len=60, p_start=0.5)
    sel, _, placed = MLMSpan().spans(batch, MaskContext(seed=0))
    assert _never_splits_a_word(sel, batch)
    assert (placed.sum(1) < sel.sum(1)).any()  # lengths count words, not tokens


# ================================================================ replacement


@pytest.mark.parametrize("split", [(0.8, 0.1, 0.1), (0.5, 0.3, 0.2)])
@pytest.mark.parametrize("name", MLM_NAMES)
def test_replacement_split_within_one_percent(name, split):
    batch = _batch(10_000, 64, seed=5)
    s = MASKINGS.get(name)(mask_prob=split[0], random_prob=split[1], keep_prob=split[2])
    mb = _mask(s, batch)
    sel, out, orig = mb.loss_mask, mb.inputs, batch.tokens
    n = sel.sum().item()
    assert n > 40_000
    is_mask = sel & (out == MASK)
    keep = sel & (out == orig)
    is_random = sel & ~is_mask & ~keep
    for frac, got in zip(split, (is_mask, is_random, keep)):
        # A random token equal to the original reads as kept: 1 / (V - LOW) of random.
        assert abs(got.sum().item() / n - frac) < 0.01
    r = out[is_random]
    assert r.min() >= LOW and r.max() < V


# ================================================================ determinism


@pytest.mark.parametrize("name", MLM_NAMES)
def test_same_sample_same_mask_in_any_batch(name):
    a = _batch(32, 40, seed=6)
    other = _batch(32, 52, seed=7)
    # Rows 3..10 of `a`, padded to width 52, at positions 20..27 of another batch.
    fields = {"tokens": PAD, "eligible": False, "word_start": False, "valid": False}
    mixed = dataclasses.replace(other, **{f: getattr(other, f).clone() for f in fields})
    for field, fill in fields.items():
        src = getattr(a, field)[3:11]
        padded = torch.nn.functional.pad(src, (0, 12), value=fill)
        getattr(mixed, field)[20:28] = padded
    s = MASKINGS.get(name)()
    for k in (0, 5):
        mb_a, mb_m = _mask(s, a, k), _mask(s, mixed, k)
        assert torch.equal(mb_m.loss_mask[20:28, :40], mb_a.loss_mask[3:11])
        assert not mb_m.loss_mask[20:28, 40:].any()
        assert torch.equal(mb_m.inputs[20:28, :40], mb_a.inputs[3:11])
    # A per-row mask index tensor equals the int; rows with other indices follow theirs.
    idx = torch.full((32,), 5)
    assert torch.equal(_mask(s, a, idx).loss_mask, _mask(s, a, 5).loss_mask)
    idx[::2] = 0
    mixed_idx = _mask(s, a, idx).loss_mask
    assert torch.equal(mixed_idx[::2], _mask(s, a, 0).loss_mask[::2])
    assert torch.equal(mixed_idx[1::2], _mask(s, a, 5).loss_mask[1::2])
    # The global RNG plays no part.
    torch.manual_seed(99)
    assert torch.equal(_mask(s, a, 5).inputs, _mask(s, a, 5).inputs)


@pytest.mark.parametrize("name", MLM_NAMES)
def test_distinct_masks_for_distinct_indices_and_seeds(name):
    batch = _batch(2_000, 96, seed=8, min_len=60)
    s = MASKINGS.get(name)()
    base = _mask(s, batch, 0).loss_mask
    for other in (_mask(s, batch, 1).loss_mask, _mask(s, batch, 0, seed=1).loss_mask):
        assert (other != base).any(1).float().mean() > 0.99
    # Positions are covered evenly across masks. Spans, which never cross a segment
    # edge, cover a segment's first and last tokens less (0.064 for the first one here)
    # and the rest a little more; they are only checked for no starved or hot position.
    many = torch.stack([_mask(s, batch, k).loss_mask for k in range(4)])
    freq = many.float().sum((0, 1))[1:58] / (4 * batch.eligible[:, 1:58].float().sum(0))  # all rows
    if name in UNIFORM:
        assert ((freq - 0.15).abs() < 0.02).all(), freq
    else:
        assert freq.min() > 0.05 and freq.max() < 0.2, freq


# ================================================================ mask indices


def test_dynamic_and_static_mask_indices():
    assert [epoch_mask_index(e) for e in range(5)] == [0, 1, 2, 3, 4]
    assert [epoch_mask_index(e, 3) for e in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    batch = _batch(500, 96, seed=9, min_len=60)
    static = MLMWholeWord(static_masks=2)
    masks = [_mask(static, batch, static.training_index(10 * e, e)).loss_mask for e in range(4)]
    assert torch.equal(masks[0], masks[2]) and torch.equal(masks[1], masks[3])
    assert (masks[0] != masks[1]).any(1).float().mean() > 0.99
    dynamic = MLMWholeWord()
    masks = [_mask(dynamic, batch, dynamic.training_index(10 * e, e)).loss_mask for e in range(4)]
    for i in range(4):
        for j in range(i):
            assert (masks[i] != masks[j]).any(1).float().mean() > 0.99


@pytest.mark.parametrize("static_masks", [0, 2])
def test_training_steps_mask_by_epoch(static_masks):
    """In the data pipeline (``MaskPlan``), every step of an epoch uses the epoch's mask
    index: a new mask each epoch, or mask epoch % K for K static masks."""
    s = MLMRandom(static_masks=static_masks)
    plan = MaskPlan(seed=0, train=s, steps_per_epoch=3, masked_steps=(0, 11))
    got = [plan.train_context(step).mask_index for step in range(12)]
    assert got == [epoch_mask_index(step // 3, static_masks) for step in range(12)]
    batch = _batch(64, 40, seed=3)
    items = [plan.train_item(batch, step) for step in range(12)]
    for step, item in enumerate(items):
        assert item.step == step and item.batch is batch
        assert torch.equal(item.masked.loss_mask, _mask(s, batch, got[step]).loss_mask)
    assert torch.equal(items[0].masked.inputs, items[2].masked.inputs)  # one epoch, one mask
    assert (items[0].masked.loss_mask != items[3].masked.loss_mask).any()  # the next epoch: another


def test_eval_mask_indices_are_fixed_and_disjoint_from_training():
    idx = eval_mask_indices(4)
    assert idx == range(EVAL_MASK_BASE, EVAL_MASK_BASE + 4)
    assert idx.stop < MAX_MASK_INDEX
    with pytest.raises(ConfigError, match="epoch"):
        epoch_mask_index(EVAL_MASK_BASE)  # training never reaches the eval range
    assert epoch_mask_index(EVAL_MASK_BASE + 3, 5) < EVAL_MASK_BASE
    batch = _batch(500, 96, seed=10, min_len=60)
    s = MLMSpan()
    evals = [_mask(s, batch, k).loss_mask for k in idx]
    assert torch.equal(_mask(s, batch, idx[2]).loss_mask, evals[2])  # fixed
    train = _mask(s, batch, 0).loss_mask
    for i, m in enumerate(evals):
        assert (m != train).any(1).float().mean() > 0.99
        for j in range(i):
            assert (m != evals[j]).any(1).float().mean() > 0.99
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="eval_masks"):
            eval_mask_indices(bad)


# ================================================================ errors


@pytest.mark.parametrize(
    "cls, field, value",
    [
        (MLMRandom, "mask_ratio", 0.0),
        (MLMRandom, "mask_ratio", 1.0),
        (MLMWholeWord, "mask_ratio", -0.1),
        (MLMSpan, "mask_ratio", float("nan")),
        (MLMRandom, "mask_ratio", True),
        (MLMRandom, "mask_ratio", "0.15"),
        (MLMRandom, "mask_prob", 1.2),
        (MLMWholeWord, "random_prob", -0.1),
        (MLMSpan, "keep_prob", float("nan")),
        (MLMRandom, "static_masks", -1),
        (MLMRandom, "static_masks", 1.5),
        (MLMRandom, "static_masks", True),
        (MLMSpan, "span_p", 0.0),
        (MLMSpan, "span_p", 1.5),
        (MLMSpan, "max_span", 0),
        (MLMSpan, "max_span", 2.5),
    ],
)
def test_bad_config_values(cls, field, value):
    with pytest.raises(ConfigError) as e:
        cls(**{field: value})
    assert e.value.field == field
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{field} = ")


def test_replacement_must_sum_to_one():
    with pytest.raises(ConfigError) as e:
        MLMRandom(mask_prob=0.8, random_prob=0.1, keep_prob=0.2)
    msg = str(e.value)
    assert "\n" not in msg and "mask_prob + random_prob + keep_prob must sum to 1" in msg
    assert MLMRandom(mask_prob=1.0, random_prob=0.0, keep_prob=0.0).split.mask == 1.0


def test_config_section_errors_name_the_dotted_field():
    with pytest.raises(ConfigError) as e:
        from_dict(MLMSpan, {"name": "mlm-span", "mask_ratio": 1.5}, "masking")
    assert e.value.field == "masking.mask_ratio"
    with pytest.raises(ConfigError) as e:
        from_dict(MLMRandom, {"name": "mlm-random", "span_p": 0.3}, "masking")
    assert e.value.field == "masking.span_p" and "unknown key" in str(e.value)
    ok = from_dict(MLMSpan, {"name": "mlm-span", "mask_ratio": 0.2, "max_span": 5}, "masking")
    assert ok == MLMSpan(mask_ratio=0.2, max_span=5)


def test_bad_call_arguments():
    batch = _batch(4, 12, seed=11)
    no_pad = dataclasses.replace(batch, valid=None, word_start=None)

    def call(strategy=None, ctx=None, **change):
        return (strategy or MLMRandom())(dataclasses.replace(no_pad, **change), ctx or MaskContext(seed=0))

    with pytest.raises(ValueError, match="word_start"):
        call(MLMWholeWord())
    with pytest.raises(ValueError, match="eligible"):
        call(eligible=batch.eligible[:, :-1])
    with pytest.raises(ValueError, match="eligible"):
        call(eligible=batch.eligible.long())
    with pytest.raises(ValueError, match="eligible: required"):
        call(eligible=None)
    with pytest.raises(ValueError, match="padding"):
        call(eligible=torch.ones_like(batch.valid), valid=batch.valid)
    with pytest.raises(ValueError, match="tokens"):
        call(tokens=batch.tokens.float())
    for bad in (-1, MAX_MASK_INDEX, torch.tensor([0, 1, -1, 0]), torch.zeros(3, dtype=torch.long), 0.5):
        with pytest.raises(ValueError, match="mask_index"):
            call(ctx=MaskContext(seed=0, mask_index=bad))
    with pytest.raises(ValueError, match="seed"):
        call(ctx=MaskContext(seed=1.5))
    with pytest.raises(ValueError, match="random_low"):
        call(random_low=V)
    with pytest.raises(ValueError, match="mask_token_id"):
        call(mask_token_id=V)
    with pytest.raises(ValueError, match="TokenRows"):
        MLMRandom()(TokenWindows(batch.tokens), MaskContext(seed=0))
    assert call().loss_mask.shape == batch.tokens.shape  # the unchanged rows are fine


@pytest.mark.parametrize("name", MLM_NAMES)
def test_empty_and_tiny_rows(name):
    """Rows with no eligible token, or too few for a single selection, select nothing."""
    cls = MASKINGS.get(name)
    tokens = torch.tensor([[CLS, SEP, PAD, PAD], [CLS, 7, SEP, PAD], [CLS, 7, 8, SEP]])
    valid = tokens != PAD
    eligible = tokens >= LOW
    rows = _rows(tokens, eligible, eligible, valid)
    mb = cls()(rows, MaskContext(seed=0))
    assert not mb.loss_mask.any() and torch.equal(mb.inputs, tokens)  # round(0.15 * 2) = 0
    mb = cls(mask_ratio=0.5)(rows, MaskContext(seed=0))
    assert mb.loss_mask.sum(1).tolist() == [0, 0, 1]  # round(0.5) = 0, round(1.0) = 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", MLM_NAMES)
def test_same_masks_on_cuda(name):
    cls = MASKINGS.get(name)
    batch = _batch(256, 64, seed=12)
    cpu = _mask(cls(), batch, torch.arange(256) % 3)
    cuda_batch = batch.to("cuda")
    gpu = _mask(cls(), cuda_batch, (torch.arange(256) % 3).cuda())
    assert torch.equal(cpu.loss_mask, gpu.loss_mask.cpu())
    assert torch.equal(cpu.inputs, gpu.inputs.cpu())
