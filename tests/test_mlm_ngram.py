"""mlm-ngram (ALBERT's n-gram masking): lengths with p(n) ∝ 1/n up to max_n, the exact
token budget, never across special tokens, deterministic, and usable by BERT."""

from __future__ import annotations

import pytest
import torch

from lit_modules.config_errors import ConfigError
from lit_modules.masking import MaskContext
from lit_modules.masking.batches import TokenRows
from lit_modules.masking.mlm_ngram import MLMNgram, ngram_length_cdf

VOCAB = 512


def rows(b: int = 64, t: int = 96, seed: int = 0) -> TokenRows:
    """Right-padded rows with [CLS] at 0, [SEP] at the end and a special token inside."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(6, VOCAB, (b, t), generator=g)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    valid = torch.arange(t)[None] < lengths[:, None]
    tokens[:, 0] = 2
    tokens[torch.arange(b), lengths - 1] = 3
    tokens[:, t // 3] = 3  # a [SEP] inside every row: two segments
    tokens[~valid] = 5
    eligible = valid & (tokens >= 6)
    return TokenRows(tokens, valid, eligible, None, VOCAB, 4, 6)


def test_exact_budget_and_never_a_special_token():
    """Exactly the budget, and only eligible tokens: an n-gram is contiguous, so one that
    crossed the [SEP] inside each row would have to select it."""
    r = rows()
    for ratio in (0.15, 0.3, 0.5):
        m = MLMNgram(mask_ratio=ratio)(r, MaskContext(seed=1, mask_index=2))
        want = torch.round(r.eligible.sum(1).double() * ratio).long()
        assert torch.equal(m.loss_mask.sum(1), want)
        assert not (m.loss_mask & ~r.eligible).any()


def test_length_distribution_is_one_over_n():
    """Lengths drawn for many rows follow p(n) ∝ 1/n (6/11, 3/11, 2/11 for max_n 3)."""
    s = MLMNgram(max_n=3)
    key = torch.arange(20000, dtype=torch.int64)
    n = s.lengths(seed=0, key=key, mask_index=0, rounds=1).flatten()
    freq = torch.bincount(n, minlength=4)[1:].double() / len(n)
    assert freq.tolist() == pytest.approx([6 / 11, 3 / 11, 2 / 11], abs=0.01)
    assert ngram_length_cdf(1) == [] and MLMNgram(max_n=1).lengths(0, key[:5], 0, 3).eq(1).all()


def test_deterministic_per_sample_and_mask_index():
    s, r = MLMNgram(mask_ratio=0.3), rows(b=8)
    a = s(r, MaskContext(seed=5, mask_index=1))
    b = s(r, MaskContext(seed=5, mask_index=1))
    c = s(r, MaskContext(seed=5, mask_index=2))
    assert torch.equal(a.loss_mask, b.loss_mask) and torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.loss_mask, c.loss_mask)
    flipped = TokenRows(r.tokens.flip(0), r.valid.flip(0), r.eligible.flip(0), None, VOCAB, 4, 6)
    d = s(flipped, MaskContext(seed=5, mask_index=1))  # same samples, other batch positions
    assert torch.equal(d.loss_mask.flip(0), a.loss_mask)


def test_bad_max_n_and_use_by_bert(tiny_config):
    with pytest.raises(ConfigError, match="max_n = 0: must be an integer >= 1"):
        MLMNgram(max_n=0)
    cfg = tiny_config("bert", {"masking.name": "mlm-ngram", "masking.max_n": 2, "model.eval_masking": "mlm-ngram"})
    assert cfg.masking == MLMNgram(mask_ratio=0.15, max_n=2)
