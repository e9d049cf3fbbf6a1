"""Property tests of the masking seam: deterministic noise and the random-stream
registry, attention patterns, exact selection, ratio schedules, the forward/backward
causal-LM views, and the properties every registered strategy has whatever its kind."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_modules.config_errors import ConfigError
from lit_modules.masking import (
    MaskContext,
    MaskedBatch,
    MaskingStrategy,
    attention,
    rng,
    schedules,
    selection,
)
from lit_modules.masking.attention import Attention
from lit_modules.masking.batches import KINDS, TokenRows, TokenWindows
from lit_modules.masking.causal_lm import BACKWARD, FORWARD, CausalLM, reading_order, stacked_views
from lit_modules.masking.rng import Stream
from lit_modules.registry import MASKINGS

from .conftest import concat_batches, make_batch, scored_shape, take_rows


def _keys(n: int, seed: int = 0) -> torch.Tensor:
    """n distinct int64 sample keys spread over the whole 64-bit range."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)


# ================================================================ rng


def test_uniform_is_a_pure_function_of_seed_key_index():
    keys = _keys(6)
    a = rng.uniform(7, keys, 3, (5, 11))
    b = rng.uniform(7, keys.clone(), 3, (5, 11))
    assert a.shape == (6, 5, 11) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # The global torch RNG plays no part.
    torch.manual_seed(123)
    torch.rand(100)
    assert torch.equal(rng.uniform(7, keys, 3, (5, 11)), a)


@pytest.mark.parametrize("change", ["seed", "key", "mask_index"])
def test_uniform_changes_with_each_input(change):
    keys = _keys(4)
    base = rng.uniform(1, keys, 0, (256,))
    if change == "seed":
        other = rng.uniform(2, keys, 0, (256,))
    elif change == "key":
        other = rng.uniform(1, keys + 1, 0, (256,))
    else:
        other = rng.uniform(1, keys, 1, (256,))
    # Not merely different somewhere: independent streams agree almost nowhere.
    assert (base == other).float().mean() < 0.01


def test_seed_high_bits_matter():
    """Seeds that differ only above bit 32 give different streams."""
    keys = _keys(2)
    assert not torch.equal(rng.uniform(5, keys, 0, (64,)), rng.uniform(5 + (1 << 40), keys, 0, (64,)))


def test_key_high_bits_matter():
    keys = _keys(3)
    assert (rng.uniform(0, keys, 0, (64,)) != rng.uniform(0, keys ^ (1 << 50), 0, (64,))).float().mean() > 0.99


def test_uniform_range():
    u = rng.uniform(0, _keys(64), torch.arange(64), (1000,))
    assert u.min() >= 0.0 and u.max() < 1.0
    # 24-bit grid: every value is an exact multiple of 2**-24.
    assert torch.equal(u * (1 << 24), (u * (1 << 24)).floor())


def test_uniform_does_not_depend_on_batch_or_position():
    keys = _keys(8)
    idx = torch.arange(8) % 3
    batch = rng.uniform(11, keys, idx, (4, 9))  # (8, 4, 9)
    for b in range(8):
        alone = rng.uniform(11, keys[b : b + 1], int(idx[b]), (4, 9))  # batch of 1
        assert torch.equal(alone[0], batch[b])
    perm = torch.randperm(8)
    assert torch.equal(rng.uniform(11, keys[perm], idx[perm], (4, 9)), batch[perm])
    # Row 5 of a batch of 8 == row 0 of a batch of 1 == row 2 of another batch.
    other = torch.cat([_keys(2, seed=9), keys[5:6], _keys(3, seed=10)])
    mixed = rng.uniform(11, other, int(idx[5]), (4, 9))
    assert torch.equal(mixed[2], batch[5])


def test_random_bits_prefix_stable_in_shape():
    """Element j of a sample depends on j only, not on how many elements were drawn."""
    keys = _keys(3)
    short = rng.random_bits(4, keys, 2, (10,))
    long = rng.random_bits(4, keys, 2, (50,))
    assert torch.equal(short, long[:, :10])
    assert short.min() >= 0 and short.max() < 2**32


def test_content_key_identical_rows_equal():
    row = torch.randint(0, 50_000, (1, 37))
    x = torch.cat([row, torch.randint(0, 50_000, (2, 37)), row, row])
    k = rng.content_key(x)
    assert k.shape == (5,) and k.dtype == torch.int64
    assert k[0] == k[3] == k[4]
    assert k[0] != k[1] and k[0] != k[2]
    # Same row, different batch: same key.
    assert rng.content_key(row)[0] == k[0]


def test_content_key_differs_for_one_token_changes():
    row = torch.randint(0, 512, (64,))
    variants = row.repeat(64, 1)  # (64, 64): variant j changes token j
    variants[torch.arange(64), torch.arange(64)] += 1
    keys = rng.content_key(torch.cat([row[None], variants]))
    assert len(set(keys.tolist())) == 65


def test_content_key_is_order_sensitive_and_length_sensitive():
    row = torch.arange(10)[None]
    swapped = row.clone()
    swapped[0, [2, 7]] = swapped[0, [7, 2]]
    assert rng.content_key(row) != rng.content_key(swapped)
    assert rng.content_key(torch.zeros(1, 5, dtype=torch.long)) != rng.content_key(torch.zeros(1, 6, dtype=torch.long))


def test_content_key_of_floats_and_many_rows():
    x = torch.randn(2, 3, 8, 8)
    y = x.clone()
    y[1, 2, 7, 7] = torch.nextafter(y[1, 2, 7, 7], torch.tensor(math.inf))  # one ulp
    kx, ky = rng.content_key(x), rng.content_key(y)
    assert kx[0] == ky[0] and kx[1] != ky[1]
    # No collisions among 20,000 distinct random rows.
    keys = rng.content_key(torch.randint(0, 1000, (20_000, 16)))
    assert len(set(keys.tolist())) == 20_000


def test_uniform_is_roughly_uniform_and_uncorrelated():
    u = rng.uniform(0, torch.arange(1000), 0, (1000,)).flatten().double()  # 1e6 draws
    assert abs(u.mean().item() - 0.5) < 0.002
    assert abs(u.var().item() - 1 / 12) < 0.001
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    expected = u.numel() / 20
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 60, f"chi-square {chi2:.1f} with 19 dof"  # p ~ 4e-6
    # Adjacent elements, adjacent keys and adjacent mask indices are uncorrelated.
    grid = rng.uniform(0, torch.arange(1000), 0, (1000,)).double()
    nxt_idx = rng.uniform(0, torch.arange(1000), 1, (1000,)).double()
    for a, b in ((grid[:, :-1], grid[:, 1:]), (grid[:-1], grid[1:]), (grid, nxt_idx)):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 0.01


def test_step_uniform_matches_uniform():
    assert rng.step_uniform(3, 17, Stream.BW_COIN) == float(rng.uniform(3, torch.tensor([17]), 0xB5, (1,))[0, 0])
    bits = rng.step_bits(3, 17, Stream.TEXT_BATCH, 5)
    assert bits.shape == (5,) and torch.equal(bits, rng.random_bits(3, torch.tensor([17]), int(Stream.TEXT_BATCH), (5,))[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_uniform_same_on_cuda():
    keys = _keys(16)
    cpu = rng.uniform(5, keys, torch.arange(16), (33,))
    gpu = rng.uniform(5, keys.cuda(), torch.arange(16).cuda(), (33,))
    assert torch.equal(cpu, gpu.cpu())
    x = torch.randint(0, 50_000, (16, 40))
    assert torch.equal(rng.content_key(x), rng.content_key(x.cuda()).cpu())


# ================================================================ the stream registry


def _stream_kind(stream: Stream) -> str:
    """"mask" or "step": the draw that accepts ``stream``; the other must refuse it."""
    keys = _keys(1)
    try:
        rng.mask_stream(0, keys, 0, stream)
        mask_ok = True
    except ValueError as e:
        assert "per-step stream" in str(e) and stream.name in str(e)
        mask_ok = False
    try:
        rng.step_stream(0, 0, stream)
        step_ok = True
    except ValueError as e:
        assert "mask stream" in str(e) and stream.name in str(e)
        step_ok = False
    assert mask_ok != step_ok, f"{stream.name} must be exactly one of a mask stream and a per-step stream"
    return "mask" if mask_ok else "step"


def test_every_stream_has_its_own_id_and_one_kind():
    values = [int(s) for s in Stream]
    assert len(set(values)) == len(values)
    kinds = {s: _stream_kind(s) for s in Stream}
    assert {"mask", "step"} == set(kinds.values())
    # The text slots keep the layout their masks were made with: ids 0..TEXT_SLOTS-1,
    # mask index k drawing from seed_hash(seed, key, TEXT_SLOTS * k + slot).
    slots = [s for s in Stream if s.name.startswith("TEXT_") and kinds[s] == "mask"]
    assert sorted(int(s) for s in slots) == list(range(rng.TEXT_SLOTS))
    keys = _keys(8)
    for s in slots:
        for k in (0, 3, 1 << 20):
            assert torch.equal(rng.mask_stream(5, keys, k, s), rng.seed_hash(5, keys, rng.TEXT_SLOTS * k + int(s)))


def test_mask_streams_never_coincide():
    """No (purpose, mask index) of any mask stream reproduces another's stream: the ids
    of every mask stream at mask indices 0..15 are distinct for every sample, so no two
    purposes (nor two indices of one purpose) ever draw the same numbers."""
    keys = _keys(8)
    mask_streams = [s for s in Stream if _stream_kind(s) == "mask"]
    ids = torch.stack([rng.mask_stream(5, keys, k, s) for s in mask_streams for k in range(16)])  # (S*16, B)
    for b in range(keys.shape[0]):
        assert ids[:, b].unique().numel() == ids.shape[0]
    # Distinct ids mean unrelated numbers, not shifted copies.
    a = rng.bits(rng.mask_stream(5, keys, 0, Stream.PATCH_RANK), 64)
    c = rng.bits(rng.mask_stream(5, keys, 0, Stream.PATCH_BLOCK), 64)
    assert (a == c).float().mean() < 0.01


def test_step_streams_are_keyed_by_step_and_apart_from_each_other():
    step_streams = [s for s in Stream if _stream_kind(s) == "step"]
    ids = torch.cat([rng.step_stream(9, step, s) for s in step_streams for step in range(32)])
    assert ids.unique().numel() == ids.numel()
    assert torch.equal(rng.step_bits(9, 4, Stream.IMAGE_BATCH, 6), rng.step_bits(9, 4, Stream.IMAGE_BATCH, 6))
    assert not torch.equal(rng.step_bits(9, 4, Stream.IMAGE_BATCH, 6), rng.step_bits(10, 4, Stream.IMAGE_BATCH, 6))


# ================================================================ attention

SIZES = [1, 2, 3, 5, 8]


def _expected(t: int, rule) -> torch.Tensor:
    return torch.tensor([[bool(rule(q, k)) for k in range(t)] for q in range(t)], dtype=torch.bool).reshape(t, t)


@pytest.mark.parametrize("t", SIZES)
def test_forward_and_backward_causal(t):
    fw, bw = attention.forward_causal(t), attention.backward_causal(t)
    assert fw.dtype == torch.bool and fw.shape == (t, t)
    assert torch.equal(fw, _expected(t, lambda q, k: k <= q))
    assert torch.equal(bw, _expected(t, lambda q, k: k >= q))
    # Every query sees itself and nothing else is shared between the two directions.
    assert torch.equal(fw & bw, torch.eye(t, dtype=torch.bool))


def test_causal_small_sizes_written_out():
    assert attention.forward_causal(1).tolist() == [[True]]
    assert attention.forward_causal(2).tolist() == [[True, False], [True, True]]
    assert attention.backward_causal(2).tolist() == [[True, True], [False, True]]
    assert attention.backward_causal(3).tolist() == [
        [True, True, True],
        [False, True, True],
        [False, False, True],
    ]


def test_padding():
    valid = torch.tensor([[True, True, False], [True, False, False]])
    m = attention.padding(valid)
    assert m.shape == (2, 1, 1, 3)
    dense = m.expand(2, 1, 3, 3)
    for b in range(2):
        expected = torch.tensor([[bool(valid[b, k]) for k in range(3)] for _ in range(3)])
        assert torch.equal(dense[b, 0], expected)


@pytest.mark.parametrize("t", SIZES)
@pytest.mark.parametrize("prefix", [0, 1, 2, 3])
def test_prefix_lm_int(t, prefix):
    assert torch.equal(attention.prefix_lm(t, prefix), _expected(t, lambda q, k: k <= q or k < prefix))


def test_prefix_lm_extremes_and_per_row():
    assert torch.equal(attention.prefix_lm(4, 0), attention.forward_causal(4))
    assert attention.prefix_lm(4, 4).all()
    prefix = torch.tensor([0, 2, 3])
    m = attention.prefix_lm(3, prefix)
    assert m.shape == (3, 1, 3, 3)
    for b, p in enumerate(prefix.tolist()):
        assert torch.equal(m[b, 0], attention.prefix_lm(3, p))


def test_combine():
    a = attention.forward_causal(3)
    b = torch.tensor([True, False, True])[None, :].expand(3, 3)
    assert torch.equal(attention.combine(a, b), _expected(3, lambda q, k: k <= q and k != 1))
    assert torch.equal(attention.combine(None, a, None), a)
    assert attention.combine() is None and attention.combine(None, None) is None
    pad = attention.padding(torch.tensor([[True, True, False]]))  # (1, 1, 1, 3)
    assert attention.combine(a, pad).shape == (1, 1, 3, 3)
    assert torch.equal(attention.combine(a, attention.backward_causal(3)), torch.eye(3, dtype=torch.bool))


@pytest.mark.parametrize("t", [1, 2, 3, 6])
def test_attention_dense(t):
    assert Attention().dense(t).all()
    assert torch.equal(Attention(causal=True).dense(t), attention.forward_causal(t))
    win = attention.prefix_lm(t, 2)
    assert torch.equal(Attention(mask=win).dense(t), win)
    assert torch.equal(Attention(causal=True, mask=win).dense(t), win & attention.forward_causal(t))


def _qkv(b: int, h: int, t: int, d: int = 8):
    g = torch.Generator().manual_seed(t)
    return (torch.randn(b, h, t, d, generator=g) for _ in range(3))


def _sdpa(q, k, v, pattern: Attention):
    return F.scaled_dot_product_attention(q, k, v, **pattern.sdpa_args(q.shape[2], k.shape[2]))


def _sdpa_dense(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("t", [1, 2, 3, 7])
def test_sdpa_args_match_dense_masks(t):
    q, k, v = _qkv(2, 2, t)
    causal = Attention(causal=True)
    assert causal.sdpa_args(t, t) == {"attn_mask": None, "is_causal": True}
    assert Attention().sdpa_args(t, t) == {"attn_mask": None, "is_causal": False}
    torch.testing.assert_close(_sdpa(q, k, v, causal), _sdpa_dense(q, k, v, attention.forward_causal(t)))
    torch.testing.assert_close(_sdpa(q, k, v, Attention()), _sdpa_dense(q, k, v, torch.ones(t, t, dtype=torch.bool)))
    # A mask plus causal: the fused flag is dropped and the AND of both is used.
    valid = torch.ones(2, t, dtype=torch.bool)
    if t > 1:
        valid[1, -1] = False  # row 1: last key padded (query 0 still sees key 0)
    pattern = Attention(causal=True, mask=attention.padding(valid))
    args = pattern.sdpa_args(t, t)
    assert args["is_causal"] is False
    expected = attention.combine(attention.forward_causal(t), attention.padding(valid))
    assert torch.equal(args["attn_mask"].expand(2, 1, t, t), expected.expand(2, 1, t, t))
    torch.testing.assert_close(_sdpa(q, k, v, pattern), _sdpa_dense(q, k, v, expected))
    torch.testing.assert_close(_sdpa(q, k, v, pattern), _sdpa_dense(q, k, v, pattern.dense(t)))


@pytest.mark.parametrize("t", [1, 2, 3, 7])
def test_backward_causal_is_the_flip_of_the_fused_causal_kernel(t):
    """What causal_lm relies on: flip, run is_causal=True, flip back == backward mask."""
    q, k, v = _qkv(2, 2, t)
    flipped = _sdpa(q.flip(2), k.flip(2), v.flip(2), Attention(causal=True)).flip(2)
    torch.testing.assert_close(flipped, _sdpa_dense(q, k, v, attention.backward_causal(t)))


def test_true_means_may_attend():
    """A mask with a single True per query copies exactly that key's value."""
    t = 5
    q, k, v = _qkv(1, 1, t)
    target = torch.tensor([3, 0, 4, 4, 1])
    mask = F.one_hot(target, t).bool()  # (T, T): query i may attend only to key target[i]
    out = _sdpa(q, k, v, Attention(mask=mask))
    torch.testing.assert_close(out[0, 0], v[0, 0, target])
    # With causal added, query 0 may attend only key 0 whatever the mask allows beyond it.
    out = _sdpa(q, k, v, Attention(causal=True, mask=torch.ones(t, t, dtype=torch.bool)))
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])


# ================================================================ selection

RATIOS = [0.0, 0.15, 0.3333, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("ratio", RATIOS)
def test_select_exact_count_per_row(ratio):
    g = torch.Generator().manual_seed(1)
    b, t = 10_000, 48
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    eligible = torch.arange(t)[None, :] < lengths[:, None]  # (B, T) varied lengths
    eligible &= torch.rand(b, t, generator=g) < 0.9  # and some specials inside
    keys = _keys(b)
    sel = selection.select_exact(eligible, ratio, 0, keys, 0)
    assert sel.dtype == torch.bool and sel.shape == (b, t)
    assert not (sel & ~eligible).any(), "selected an ineligible position"
    n = eligible.sum(1).tolist()
    expected = torch.tensor([round(ratio * x) for x in n])
    assert torch.equal(sel.sum(1), expected)
    assert torch.equal(selection.exact_count(eligible, ratio), expected)


def test_exact_count_rounds_half_to_even_like_python():
    eligible = torch.ones(4, 10, dtype=torch.bool)
    eligible[1, 5:] = False  # n = 5
    eligible[2, 3:] = False  # n = 3
    eligible[3, 1:] = False  # n = 1
    assert selection.exact_count(eligible, 0.5).tolist() == [round(0.5 * n) for n in (10, 5, 3, 1)]


def test_select_exact_deterministic_and_keyed():
    eligible = torch.ones(64, 32, dtype=torch.bool)
    keys = _keys(64)
    a = selection.select_exact(eligible, 0.25, 3, keys, 0)
    assert torch.equal(a, selection.select_exact(eligible, 0.25, 3, keys.clone(), 0))
    # Same sample, other batch position: same selection.
    perm = torch.randperm(64)
    assert torch.equal(selection.select_exact(eligible, 0.25, 3, keys[perm], 0), a[perm])
    assert torch.equal(selection.select_exact(eligible[:1], 0.25, 3, keys[5:6], 0)[0], a[5])
    # Other mask index / seed: distinct masks for nearly every sample.
    for other in (
        selection.select_exact(eligible, 0.25, 3, keys, 1),
        selection.select_exact(eligible, 0.25, 4, keys, 0),
    ):
        assert (other != a).any(dim=1).float().mean() > 0.95


def test_select_exact_covers_positions_evenly():
    eligible = torch.ones(20_000, 16, dtype=torch.bool)
    freq = selection.select_exact(eligible, 0.25, 0, _keys(20_000), 0).float().mean(0)
    assert torch.allclose(freq, torch.full((16,), 0.25), atol=0.015)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_select_exact_rejects_bad_ratio(ratio):
    with pytest.raises(ConfigError, match="mask_ratio") as e:
        selection.select_exact(torch.ones(2, 4, dtype=torch.bool), ratio, 0, _keys(2), 0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("split", [(0.8, 0.1, 0.1), (0.5, 0.25, 0.25), (1.0, 0.0, 0.0)])
def test_replacement_split_fractions(split):
    b, t = 2_000, 128  # 256,000 selected positions
    tokens = torch.randint(10, 500, (b, t))
    selected = torch.ones(b, t, dtype=torch.bool)
    selected[:, ::4] = False  # some unselected positions, which must stay untouched
    cfg = selection.ReplacementSplit(*split)
    out, is_mask, is_random = selection.apply_replacement(
        tokens, selected, cfg, mask_token=3, random_low=10, random_high=500,
        global_seed=0, sample_key=_keys(b), mask_index=0,
    )
    n = selected.sum().item()
    keep = selected & ~is_mask & ~is_random
    assert not (is_mask & is_random).any()
    assert not ((is_mask | is_random) & ~selected).any()
    for frac, got in ((cfg.mask, is_mask), (cfg.random, is_random), (cfg.keep, keep)):
        assert abs(got.sum().item() / n - frac) < 0.01
    assert (out[is_mask] == 3).all()
    assert torch.equal(out[~selected], tokens[~selected])
    assert torch.equal(out[keep], tokens[keep])
    if cfg.random:
        r = out[is_random]
        assert r.min() >= 10 and r.max() < 500
        assert (r != tokens[is_random]).float().mean() > 0.9  # really random tokens
    again = selection.apply_replacement(tokens, selected, cfg, 3, 10, 500, 0, _keys(b), 0)
    assert all(torch.equal(x, y) for x, y in zip(again, (out, is_mask, is_random)))


def test_replacement_split_defaults():
    s = selection.ReplacementSplit()
    assert (s.mask, s.random, s.keep) == (0.8, 0.1, 0.1)


@pytest.mark.parametrize(
    "split, field",
    [
        ((1.2, -0.1, -0.1), "replacement.mask"),
        ((0.8, -0.1, 0.3), "replacement.random"),
        ((0.5, 0.4, 1.5), "replacement.keep"),
        ((0.8, 0.1, 0.2), "replacement"),
        ((0.5, 0.1, 0.1), "replacement"),
    ],
)
def test_replacement_split_rejects_bad_values(split, field):
    with pytest.raises(ConfigError) as e:
        selection.ReplacementSplit(*split)
    assert e.value.field == field
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{field} = ")


# ================================================================ schedules

PAIRS = [(0.8, 0.1), (0.1, 0.8), (0.9, 0.05), (0.15, 0.75), (0.0, 1.0), (1.0, 0.0), (0.4, 0.4)]
TOTALS = [1, 3, 10, 97, 1000]
MOVING = [n for n in schedules.SCHEDULES if n != "constant"]


def test_every_schedule_is_tested():
    assert set(schedules.SCHEDULES) == {"constant", "linear", "cosine", "exponential"}


@pytest.mark.parametrize("name", MOVING)
@pytest.mark.parametrize("initial, final", PAIRS)
def test_schedule_endpoints_exact_and_monotone(name, initial, final):
    f = schedules.get_schedule(name)
    for total in TOTALS:
        assert f(0, total, initial, final) == initial
        assert f(total, total, initial, final) == final
        assert f(total + 5, total, initial, final) == final  # clamps after the end
        assert f(-1, total, initial, final) == initial
        values = [f(s, total, initial, final) for s in range(total + 1)]
        pairs = list(zip(values, values[1:]))
        if initial > final:
            assert all(a >= b for a, b in pairs), f"{name} increases somewhere"
        else:
            assert all(a <= b for a, b in pairs), f"{name} decreases somewhere"
        lo, hi = min(initial, final), max(initial, final)
        assert all(lo <= v <= hi for v in values)
        if total >= 3 and initial != final:
            assert lo < values[total // 2] < hi  # it actually moves in between


def test_cosine_is_the_half_cosine():
    f = schedules.cosine
    assert f(100, 100, 0.8, 0.1) == 0.1  # the often-printed form ends at 2*0.1-0.8 = -0.6
    assert math.isclose(f(50, 100, 0.8, 0.1), 0.45)
    assert math.isclose(f(25, 100, 0.8, 0.1), 0.1 + 0.7 * (1 + math.cos(math.pi / 4)) / 2)


def test_linear_and_exponential_shapes():
    assert math.isclose(schedules.linear(30, 100, 0.8, 0.1), 0.8 - 0.7 * 0.3)
    # Exponential moves fastest early: past the linear value at the same step.
    assert schedules.exponential(20, 100, 0.8, 0.1) < schedules.linear(20, 100, 0.8, 0.1)


@pytest.mark.parametrize("initial, final", PAIRS)
def test_constant_schedule(initial, final):
    f = schedules.get_schedule("constant")
    assert all(f(s, 10, initial, final) == initial for s in range(-1, 12))


@pytest.mark.parametrize("name", ["", "Linear", "cosine_restarts", "step"])
def test_unknown_schedule(name):
    with pytest.raises(ConfigError) as e:
        schedules.get_schedule(name)
    msg = str(e.value)
    assert "\n" not in msg and repr(name) in msg
    assert all(n in msg for n in schedules.SCHEDULES)


# ================================================================ causal LM


def test_backward_coin_deterministic_in_seed_and_step():
    m = CausalLM(p_bw=0.5)
    coins = [m.use_backward(0, s) for s in range(200)]
    torch.manual_seed(999)  # other randomness does not enter
    torch.rand(10)
    assert [CausalLM(p_bw=0.5).use_backward(0, s) for s in range(200)] == coins
    assert [m.use_backward(0, s) for s in reversed(range(200))] == coins[::-1]  # order-free
    assert [m.use_backward(1, s) for s in range(200)] != coins
    assert 50 < sum(coins) < 150


def test_backward_coin_is_one_uniform_thresholded():
    """Coins at different p_bw share one uniform per (seed, step): coin(p) implies
    coin(p') for p < p', so changing p_bw changes nothing else."""
    steps = range(1000)
    lo = [CausalLM(p_bw=0.3).use_backward(4, s) for s in steps]
    hi = [CausalLM(p_bw=0.7).use_backward(4, s) for s in steps]
    assert all(h for lo_, h in zip(lo, hi) if lo_)
    assert sum(hi) > sum(lo)


def test_backward_coin_extremes():
    assert not any(CausalLM(p_bw=0.0).use_backward(0, s) for s in range(500))
    assert all(CausalLM(p_bw=1.0).use_backward(0, s) for s in range(500))


@pytest.mark.parametrize("p_bw", [0.1, 0.5, 0.9])
def test_backward_coin_frequency(p_bw):
    m = CausalLM(p_bw=p_bw)
    freq = sum(m.use_backward(2, s) for s in range(2500)) / 2500
    assert abs(freq - p_bw) < 0.04  # 4 standard deviations at p = 0.5


@pytest.mark.parametrize("p_bw", [-0.01, 1.01, 2, float("nan"), True])
def test_p_bw_out_of_range(p_bw):
    with pytest.raises(ConfigError, match="p_bw") as e:
        CausalLM(p_bw=p_bw)
    assert "\n" not in str(e.value)


def test_p_bw_error_names_config_field(tiny_config):
    with pytest.raises(ConfigError) as e:
        tiny_config("gpt", {"masking.p_bw": 1.5})
    assert e.value.field == "masking.p_bw" and "[0, 1]" in str(e.value)


def test_forward_and_backward_views():
    b, t = 3, 6
    window = torch.randint(0, 100, (b, t + 1))  # (B, T+1)
    mb = stacked_views(window, ("fw", "bw"))
    assert isinstance(mb, MaskedBatch)
    assert mb.inputs.shape == mb.targets.shape == mb.loss_mask.shape == (2 * b, t)
    assert mb.direction.tolist() == [FORWARD] * b + [BACKWARD] * b
    assert mb.loss_mask.all()
    assert mb.attention == Attention(causal=True)  # the fused kernel, no dense mask
    # Forward: position t reads window[t] and predicts window[t+1].
    assert torch.equal(mb.inputs[:b], window[:, :-1])
    assert torch.equal(mb.targets[:b], window[:, 1:])
    # Backward, mapped back to original coordinates: the input at original position
    # j+1 predicts the token at position j (position t predicts t-1).
    bw_in = reading_order(mb.inputs[b:], "bw")
    bw_tgt = reading_order(mb.targets[b:], "bw")
    assert torch.equal(bw_in, window[:, 1:])
    assert torch.equal(bw_tgt, window[:, :-1])
    # In reading order the first backward input is the last token of the window.
    assert torch.equal(mb.inputs[b:, 0], window[:, -1])
    # The strategy's call on a batch of windows gives these views at every stage but train.
    for stage in ("val", "test", "predict"):
        got = CausalLM()(TokenWindows(window), MaskContext(seed=0, stage=stage))
        for field in ("inputs", "targets", "loss_mask", "direction"):
            assert torch.equal(getattr(got, field), getattr(mb, field)), (stage, field)


def test_views_stack_and_default():
    window = torch.randint(0, 100, (2, 9))
    fw_only = CausalLM()(TokenWindows(window), MaskContext(seed=0, step=0))  # training, p_bw = 0
    assert fw_only.inputs.shape == (2, 8) and fw_only.direction.tolist() == [FORWARD, FORWARD]
    bw_only = stacked_views(window, ("bw",))
    both = stacked_views(window, ("fw", "bw"))
    assert torch.equal(both.inputs[:2], fw_only.inputs) and torch.equal(both.targets[:2], fw_only.targets)
    assert torch.equal(both.inputs[2:], bw_only.inputs) and torch.equal(both.targets[2:], bw_only.targets)
    assert torch.equal(CausalLM(p_bw=1.0)(TokenWindows(window), MaskContext(seed=0, step=5)).inputs, both.inputs)


def test_training_views_follow_the_step_coin():
    """In training, a step's windows are read backward too exactly when the (seed, step)
    coin says so; the mask index plays no part."""
    window = TokenWindows(torch.randint(0, 100, (3, 9)))
    s = CausalLM(p_bw=0.5)
    coins = []
    for step in range(40):
        m = s(window, MaskContext(seed=4, mask_index=step % 3, step=step))
        coin = s.use_backward(4, step)
        assert m.inputs.shape[0] == (6 if coin else 3)
        assert s.directions(MaskContext(seed=4, step=step)) == (("fw", "bw") if coin else ("fw",))
        coins.append(coin)
    assert 5 < sum(coins) < 35  # both kinds of step occur


def test_causal_lm_masks_token_windows_only():
    with pytest.raises(ValueError, match="TokenWindows"):
        CausalLM()(make_batch(TokenRows, 2), MaskContext(seed=0))


@pytest.mark.parametrize("t", [1, 2, 3, 8])
def test_backward_view_never_sees_its_target(t):
    """Index bookkeeping of the flip: with causal attention in reading order, reading
    position s sees original positions {T - s', s' <= s}, i.e. >= T - s; its target is
    original position T - s - 1, which it never sees."""
    window = torch.arange(t + 1)[None]  # token id = original position
    mb = stacked_views(window, ("bw",))
    visible = attention.forward_causal(t)  # what the fused causal kernel allows
    for s in range(t):
        seen = set(mb.inputs[0][visible[s]].tolist())
        target = mb.targets[0, s].item()
        assert target not in seen
        assert seen == set(range(target + 1, t + 1))


def test_reading_order_involution_and_errors():
    x = torch.arange(12).reshape(2, 6)
    assert torch.equal(reading_order(x, "fw"), x)
    assert torch.equal(reading_order(reading_order(x, "bw"), "bw"), x)
    with pytest.raises(ConfigError, match="direction"):
        reading_order(x, "up")


# ================================================================ every registered strategy
# Parametrized over the registry: a strategy is held to these properties the moment it
# is registered, given a batch of the kind it accepts (tests/conftest.py make_batch).

STRATEGY_NAMES = MASKINGS.names()
# Strategies whose mask is the same at every mask index and seed by design. causal-lm
# reads every window whole; its one random draw is the per-step backward coin, a
# function of (seed, step) (test_training_views_follow_the_step_coin). Every other
# strategy must draw a new mask for a new index; these must not.
SAME_FOR_EVERY_INDEX = {"causal-lm"}


def _strategy(name: str) -> MaskingStrategy:
    s = MASKINGS.get(name)()
    assert isinstance(s, MaskingStrategy) and s.name == name
    return s


def _per_row(m: MaskedBatch) -> dict[str, torch.Tensor]:
    """The per-row tensors of a masked batch: what must follow a sample around."""
    out = {"inputs": m.inputs, "targets": m.targets, "loss_mask": m.loss_mask}
    for field in ("direction", "keep_idx"):
        if getattr(m, field) is not None:
            out[field] = getattr(m, field)
    mask = m.attention.mask
    if mask is not None and mask.dim() == 4 and mask.shape[0] == m.inputs.shape[0]:
        out["attention.mask"] = mask
    return out


def _same(a: MaskedBatch, b: MaskedBatch, rows=None) -> None:
    """``b`` equals ``a`` (``a``'s rows ``rows`` when given), field by field."""
    ra, rb = _per_row(a), _per_row(b)
    assert ra.keys() == rb.keys()
    for k in ra:
        want = ra[k] if rows is None else ra[k][rows]
        assert torch.equal(want, rb[k]), k
    assert a.attention.causal == b.attention.causal and a.ratio == b.ratio


def _rows_differ(a: MaskedBatch, b: MaskedBatch) -> torch.Tensor:
    """(B,) bool: the rows whose mask (scored positions, model inputs, visible patches)
    differs between ``a`` and ``b``."""
    differ = (a.loss_mask != b.loss_mask).flatten(1).any(1) | (a.inputs != b.inputs).flatten(1).any(1)
    if a.keep_idx is not None:
        differ |= (a.keep_idx != b.keep_idx).any(1)
    return differ


def _take_masked(m: MaskedBatch, rows) -> MaskedBatch:
    """Rows ``rows`` of every per-row field of a masked batch."""
    import dataclasses

    rows = torch.as_tensor(rows)
    changes = {k: v[rows] for k, v in _per_row(m).items() if "." not in k}
    mask = m.attention.mask
    if "attention.mask" in _per_row(m):
        changes["attention"] = Attention(causal=m.attention.causal, mask=mask[rows])
    return dataclasses.replace(m, **changes)


def test_every_batch_kind_has_a_test_batch():
    for kind in KINDS:
        batch = make_batch(kind, 3)
        assert isinstance(batch, kind) and batch.size == 3 and len(scored_shape(batch)) == 2
        assert take_rows(batch, [2, 0]).size == 2


def test_every_strategy_accepts_a_batch_kind_that_a_model_consumes():
    from lit_modules.model_configs import maskings_for
    from lit_modules.registry import MODELS

    consumed = {MODELS.config(n).consumes for n in MODELS.names()}
    for name in STRATEGY_NAMES:
        kind = MASKINGS.get(name).accepts
        assert kind in KINDS and kind in consumed, name
        assert name in maskings_for(kind)
    # Derived compatibility partitions the registry by kind.
    assert sorted(n for k in KINDS for n in maskings_for(k)) == sorted(STRATEGY_NAMES)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_strategy_properties(name):
    """Any registered strategy, on a batch of the kind it accepts: returns a MaskedBatch
    whose loss_mask has the batch's shape; the same (seed, content, index) gives the same
    mask, in a fresh batch, at another batch position and among other samples, with the
    index an int or a (B,) tensor; a new index or seed gives a new mask."""
    s = _strategy(name)
    batch = make_batch(s.accepts, 32)
    ctx = MaskContext(seed=3, mask_index=5, step=0, total_steps=10)
    m = s(batch, ctx)
    assert isinstance(m, MaskedBatch)
    assert m.loss_mask.dtype == torch.bool and tuple(m.loss_mask.shape) == scored_shape(batch)
    assert m.loss_mask.any(), "scores nothing"

    # Deterministic: same content in a freshly built batch, whatever the global RNG.
    torch.manual_seed(1234)
    torch.rand(10)
    _same(m, s(make_batch(s.accepts, 32), ctx))
    _same(m, s(batch, MaskContext(seed=3, mask_index=torch.full((32,), 5), step=0, total_steps=10)))
    # The same sample, the same mask: rows permuted, and rows inside a batch of others.
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(2))
    _same(m, s(take_rows(batch, perm), ctx), perm)
    mixed = concat_batches(make_batch(s.accepts, 8, seed=9), take_rows(batch, [5, 6, 7]))
    _same(_take_masked(s(mixed, ctx), [8, 9, 10]), _take_masked(m, [5, 6, 7]))

    # Another mask index, or another seed.
    for other in (MaskContext(seed=3, mask_index=6, step=0, total_steps=10),
                  MaskContext(seed=4, mask_index=5, step=0, total_steps=10)):
        differ = _rows_differ(m, s(batch, other))
        if name in SAME_FOR_EVERY_INDEX:
            assert not differ.any()
        else:
            assert differ.float().mean() > 0.75, f"{name}: only {int(differ.sum())} of 32 masks changed"


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_strategy_evaluation_masks_are_fixed_and_distinct(name):
    """The K evaluation masks (stage val, indices eval_mask_indices(K)) are the same on
    every call and differ from one another and from training's."""
    from lit_modules.masking.indices import eval_mask_indices

    s = _strategy(name)
    batch = make_batch(s.accepts, 32)
    views = [s(batch, MaskContext(seed=0, mask_index=k, stage="val")) for k in eval_mask_indices(3)]
    for k, v in zip(eval_mask_indices(3), views):
        _same(v, s(batch, MaskContext(seed=0, mask_index=k, stage="val")))
        assert tuple(v.loss_mask.shape[1:]) == scored_shape(batch)[1:]
    if name in SAME_FOR_EVERY_INDEX:
        return
    train = s(batch, MaskContext(seed=0, mask_index=0, step=0, total_steps=10))
    for i in range(3):
        assert _rows_differ(views[i], train).float().mean() > 0.75
        for j in range(i):
            assert _rows_differ(views[i], views[j]).float().mean() > 0.75


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_strategy_refuses_other_batch_kinds(name):
    s = _strategy(name)
    for kind in KINDS:
        if kind is s.accepts:
            continue
        with pytest.raises(ValueError, match=s.accepts.__name__) as e:
            s(make_batch(kind, 2), MaskContext(seed=0))
        assert "\n" not in str(e.value)

