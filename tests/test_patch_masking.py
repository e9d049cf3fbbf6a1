"""Property tests of the MAE patch maskings (``lit_modules.masking.patches``): exact
counts, index conventions, determinism, uniformity, blockiness, ratio schedules and
config errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lit_modules.config import from_dict
from lit_modules.config_errors import ConfigError
from lit_modules.masking import MaskContext, MaskedBatch, indices, rng
from lit_modules.masking.attention import Attention
from lit_modules.masking.batches import Clips, Images
from lit_modules.masking.patches import MAEBlock, MAERandom, PatchMask, num_masked
from lit_modules.masking.rng import Stream
from lit_modules.model_configs import maskings_for
from lit_modules.registry import MASKINGS

# Every registered strategy that masks images (derived from the registry).
STRATEGIES = [MASKINGS.get(name) for name in maskings_for(Images)]
GRIDS = [(2, 2), (4, 4), (3, 5), (14, 14)]
RATIOS = [0.1, 0.5, 0.75, 0.9]


def _keys(n: int, seed: int = 0) -> torch.Tensor:
    """n distinct int64 sample keys spread over the whole 64-bit range."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)


def _masks(s, keys, grid, seed=0, mask_index=0, step=None, total_steps=None, stage="train") -> PatchMask:
    """The masks of ``keys`` on ``grid`` (``strategy.masks``) at one mask context."""
    return s.masks(keys, grid, MaskContext(seed, mask_index, step, total_steps, stage))


def _check_conventions(pm: PatchMask, n: int, n_mask: int) -> None:
    """Shapes, dtypes, ascending disjoint covering indices, and masked == mask_idx."""
    b = pm.masked.shape[0]
    assert pm.masked.shape == (b, n) and pm.masked.dtype == torch.bool
    assert pm.mask_idx.shape == (b, n_mask) and pm.keep_idx.shape == (b, n - n_mask)
    assert pm.mask_idx.dtype == torch.int64 and pm.keep_idx.dtype == torch.int64
    assert (pm.masked.sum(1) == n_mask).all()  # exact count, every sample
    assert (pm.mask_idx.diff(dim=1) > 0).all() and (pm.keep_idx.diff(dim=1) > 0).all()
    both = torch.cat([pm.mask_idx, pm.keep_idx], 1).sort(dim=1).values
    assert torch.equal(both, torch.arange(n).expand(b, n))  # disjoint and covering 0..N-1
    assert pm.masked.gather(1, pm.mask_idx).all() and not pm.masked.gather(1, pm.keep_idx).any()
    assert pm.loss_mask is pm.masked
    assert (pm.num_patches, pm.num_masked, pm.num_keep) == (n, n_mask, n - n_mask)


def _components(masked: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N) bool -> (B,) number of 4-connected components of the masked patches,
    by propagating the smallest patch index through each component."""
    h, w = grid
    b = masked.shape[0]
    m = masked.reshape(b, h, w)
    big = h * w
    own = torch.arange(big).reshape(1, h, w)
    label = torch.where(m, own, big)
    while True:
        nxt = label.clone()
        nxt[:, 1:, :] = torch.minimum(nxt[:, 1:, :], label[:, :-1, :])
        nxt[:, :-1, :] = torch.minimum(nxt[:, :-1, :], label[:, 1:, :])
        nxt[:, :, 1:] = torch.minimum(nxt[:, :, 1:], label[:, :, :-1])
        nxt[:, :, :-1] = torch.minimum(nxt[:, :, :-1], label[:, :, 1:])
        nxt = torch.where(m, nxt, big)
        if torch.equal(nxt, label):
            break
        label = nxt
    return (m & (label == own)).reshape(b, -1).sum(1)


# ================================================================ registry and API


def test_registered_with_defaults():
    assert {MAERandom, MAEBlock} <= set(STRATEGIES)
    for cls in STRATEGIES:
        s = cls()
        assert MASKINGS.get(s.name) is cls
        assert (s.mask_ratio, s.mask_ratio_schedule, s.final_mask_ratio, s.eval_mask_ratio) == (0.75, "constant", None, None)
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.mask_ratio = 0.5  # type: ignore[misc]
    assert (MAEBlock().min_block_patches, MAEBlock().min_aspect) == (4, 0.3)


def test_yaml_boundary_builds_and_prefixes_errors():
    s = from_dict(MAEBlock, {"name": "mae-block", "mask_ratio": 0.6, "final_mask_ratio": 0.9,
                             "mask_ratio_schedule": "linear"}, "masking")
    assert s == MAEBlock(mask_ratio=0.6, final_mask_ratio=0.9, mask_ratio_schedule="linear")
    with pytest.raises(ConfigError, match=r"^masking\.final_mask_ratio = 1\.5: "):
        from_dict(MAERandom, {"final_mask_ratio": 1.5}, "masking")


@pytest.mark.parametrize("cls", STRATEGIES)
def test_call_on_images_gives_the_patch_mask(cls):
    """``strategy(images, ctx)``: inputs and targets are the images, loss_mask the masked
    patches, keep_idx the visible ones, at the ratio of the context's stage and step."""
    s = cls(mask_ratio=0.5, final_mask_ratio=0.75, mask_ratio_schedule="linear", eval_mask_ratio=0.25)
    x = torch.rand(16, 3, 16, 16)
    batch = Images(x, _keys(16), labels=torch.zeros(16, dtype=torch.long), grid=(4, 4))
    for ctx in (MaskContext(seed=2, mask_index=3, step=0, total_steps=4),
                MaskContext(seed=2, mask_index=3, step=4, total_steps=4),
                MaskContext(seed=2, mask_index=torch.arange(16), stage="val")):
        m = s(batch, ctx)
        pm = s.masks(batch.keys, (4, 4), ctx)
        assert isinstance(m, MaskedBatch) and m.inputs is x and m.targets is x
        assert torch.equal(m.loss_mask, pm.masked) and torch.equal(m.keep_idx, pm.keep_idx)
        assert m.ratio == pm.ratio and m.attention == Attention() and m.direction is None
    ratios = [s(batch, c).ratio for c in (MaskContext(0, 0, 0, 4), MaskContext(0, 0, 4, 4), MaskContext(0, stage="val"))]
    assert ratios == [0.5, 0.75, 0.25]
    with pytest.raises(ValueError, match="grid"):
        s(Images(x, _keys(16)), MaskContext(seed=0, stage="val"))  # the model sets the grid
    with pytest.raises(ValueError, match="Images"):
        s(Clips(torch.zeros(16, 2, 3, 16, 16), _keys(16), grid=(2, 4, 4)), MaskContext(seed=0, stage="val"))


@pytest.mark.parametrize("cls", STRATEGIES)
def test_restore_idx_undoes_the_keep_mask_split(cls):
    pm = _masks(cls(), _keys(16), (4, 4), seed=0, mask_index=0)
    x = torch.randn(16, 16, 3)  # (B, N, D)
    split = torch.cat([x.gather(1, pm.keep_idx[..., None].expand(-1, -1, 3)),
                       x.gather(1, pm.mask_idx[..., None].expand(-1, -1, 3))], 1)
    assert torch.equal(split.gather(1, pm.restore_idx[..., None].expand(-1, -1, 3)), x)


# ================================================================ exact counts and conventions


@pytest.mark.parametrize("cls", STRATEGIES)
@pytest.mark.parametrize("grid", GRIDS)
def test_exact_count_and_index_conventions(cls, grid):
    keys = _keys(4096, seed=grid[0] * 31 + grid[1])
    n = grid[0] * grid[1]
    for ratio in RATIOS:
        pm = _masks(cls(mask_ratio=ratio), keys, grid, seed=3, mask_index=torch.arange(4096) % 7)
        assert pm.ratio == ratio
        _check_conventions(pm, n, num_masked(ratio, n))


def test_count_is_rounded_and_clamped():
    assert num_masked(0.75, 196) == 147 and num_masked(0.5, 196) == 98
    assert num_masked(0.625, 4) == 2  # round(2.5) = 2: half to even, as Python's round
    assert num_masked(0.1, 4) == 1  # round(0.4) = 0 -> at least one masked
    assert num_masked(0.9, 4) == 3  # round(3.6) = 4 -> at least one visible
    assert num_masked(0.99, 2) == 1 and num_masked(0.01, 2) == 1
    for cls in STRATEGIES:
        for ratio, n_mask in ((0.01, 1), (0.99, 3)):
            _check_conventions(_masks(cls(mask_ratio=ratio), _keys(64), (2, 2), seed=0, mask_index=0), 4, n_mask)


# ================================================================ determinism


@pytest.mark.parametrize("cls", STRATEGIES)
def test_same_key_same_mask_anywhere_in_any_batch(cls):
    s = cls(mask_ratio=0.6)
    keys = _keys(32)
    idx = torch.arange(32) % 5
    batch = _masks(s, keys, (6, 6), seed=11, mask_index=idx)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    shuffled = _masks(s, keys[perm], (6, 6), seed=11, mask_index=idx[perm])
    assert torch.equal(shuffled.masked, batch.masked[perm])
    assert torch.equal(shuffled.keep_idx, batch.keep_idx[perm])
    for b in (0, 7, 31):
        alone = _masks(s, keys[b : b + 1], (6, 6), seed=11, mask_index=int(idx[b]))  # a batch of 1
        assert torch.equal(alone.masked[0], batch.masked[b])
    # Inside a larger batch of other images, too.
    bigger = torch.cat([_keys(40, seed=5), keys[:3]])
    mixed = _masks(s, bigger, (6, 6), seed=11, mask_index=torch.cat([torch.zeros(40, dtype=torch.long), idx[:3]]))
    assert torch.equal(mixed.masked[40:], batch.masked[:3])
    # The global torch RNG plays no part.
    torch.manual_seed(123)
    torch.rand(10)
    assert torch.equal(_masks(s, keys, (6, 6), seed=11, mask_index=idx).masked, batch.masked)


@pytest.mark.parametrize("cls", STRATEGIES)
@pytest.mark.parametrize("change", ["mask_index", "seed", "key"])
def test_mask_changes_with_each_input(cls, change):
    s = cls(mask_ratio=0.5)
    keys = _keys(256)
    base = _masks(s, keys, (14, 14), seed=1, mask_index=0).masked
    if change == "mask_index":
        other = _masks(s, keys, (14, 14), seed=1, mask_index=1).masked
    elif change == "seed":
        other = _masks(s, keys, (14, 14), seed=2, mask_index=0).masked
    else:
        other = _masks(s, keys + 1, (14, 14), seed=1, mask_index=0).masked
    differs = (base != other).any(1)
    assert differs.float().mean() > 0.99  # practically every image gets a new mask
    # And the new masks are unrelated, not shifted copies: overlap ~ ratio**2 + noise.
    overlap = (base & other).float().sum(1).mean() / base.float().sum(1).mean()
    assert overlap < 0.8


def test_eval_masks_are_the_shared_reserved_indices():
    idx = indices.eval_mask_indices(4)
    assert idx[0] == indices.EVAL_MASK_BASE and len(idx) == 4
    # Training draws a new mask every step, at indices below the evaluation range.
    assert [MAERandom().training_index(step, step // 3) for step in range(5)] == [0, 1, 2, 3, 4]
    s = MAERandom(eval_mask_ratio=0.5)
    keys = _keys(128)
    views = [_masks(s, keys, (8, 8), seed=0, mask_index=k, stage="val").masked for k in idx]
    again = [_masks(s, keys, (8, 8), seed=0, mask_index=k, stage="val").masked for k in idx]
    assert all(torch.equal(a, b) for a, b in zip(views, again))  # fixed masks
    for i in range(4):
        for j in range(i):
            assert (views[i] != views[j]).any(1).float().mean() > 0.99  # K distinct masks


def test_streams_are_apart_from_the_text_masking_streams():
    """No mask index of the patch streams reproduces a text-masking stream of any nearby
    mask index (the TEXT_SLOTS * k + slot streams of the masked-LM strategies)."""
    purposes = (Stream.PATCH_RANK, Stream.PATCH_BLOCK)
    taken = [st for st in Stream if st.name.startswith("TEXT_") and int(st) < rng.TEXT_SLOTS]
    assert len(taken) == rng.TEXT_SLOTS and not set(purposes) & set(taken)
    keys = _keys(8)
    text = torch.stack([rng.bits(rng.mask_stream(5, keys, k, st), 32) for k in range(12) for st in taken])  # (48, B, 32)
    for purpose in purposes:
        for k in range(12):
            bits = rng.bits(rng.mask_stream(5, keys, k, purpose), 32)  # (B, 32)
            assert not (text == bits[None]).all(-1).any()
    rank = rng.bits(rng.mask_stream(5, keys, 0, purposes[0]), 32)
    block = rng.bits(rng.mask_stream(5, keys, 0, purposes[1]), 32)
    assert (rank == block).float().mean() < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", STRATEGIES)
def test_same_masks_on_cuda(cls):
    keys = _keys(512)
    cpu = _masks(cls(mask_ratio=0.6), keys, (14, 14), seed=3, mask_index=torch.arange(512))
    gpu = _masks(cls(mask_ratio=0.6), keys.cuda(), (14, 14), seed=3, mask_index=torch.arange(512).cuda())
    assert gpu.masked.is_cuda and torch.equal(gpu.masked.cpu(), cpu.masked)


# ================================================================ distributions


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_random_masking_is_uniform_over_patches(ratio):
    n_keys = 4096
    pm = _masks(MAERandom(mask_ratio=ratio), _keys(n_keys), (14, 14), seed=0, mask_index=0)
    freq = pm.masked.float().mean(0)  # (N,)
    p = num_masked(ratio, 196) / 196
    sigma = math.sqrt(p * (1 - p) / n_keys)
    assert (freq - p).abs().max() < 5 * sigma  # every patch, not just on average
    # The test has teeth: block masking, centre-biased (documented), fails it by far.
    blocky = _masks(MAEBlock(mask_ratio=ratio), _keys(n_keys), (14, 14), seed=0, mask_index=0)
    assert (blocky.masked.float().mean(0) - p).abs().max() > 10 * sigma


@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.4), ((14, 14), 0.75), ((8, 8), 0.5)])
def test_block_masking_is_blocky(grid, ratio):
    keys = _keys(512)
    block = _masks(MAEBlock(mask_ratio=ratio), keys, grid, seed=0, mask_index=0)
    rand = _masks(MAERandom(mask_ratio=ratio), keys, grid, seed=0, mask_index=0)
    n = grid[0] * grid[1]
    _check_conventions(block, n, num_masked(ratio, n))
    cb = _components(block.masked, grid).float().mean()
    cr = _components(rand.masked, grid).float().mean()
    assert cb < 0.5 * cr, (cb, cr)
    # Not the same mask shifted: the blocks are their own draw.
    assert (block.masked != rand.masked).any(1).all()


def test_components_helper():
    m = torch.tensor([[1, 1, 0, 1],
                      [0, 0, 0, 1],
                      [1, 0, 1, 0],
                      [1, 0, 0, 1]], dtype=torch.bool).reshape(1, 16)
    assert _components(m, (4, 4)).tolist() == [5]


def test_blocks_reach_the_budget_without_exceeding_it():
    s = MAEBlock(mask_ratio=0.75)
    keys = _keys(1024)
    n_mask = num_masked(0.75, 196)
    blocks = s.blocks(keys, (14, 14), seed=0, mask_index=0, n_mask=n_mask)
    count = blocks.sum(1)
    assert (count <= n_mask).all()  # BEiT's acceptance rule: never past the budget
    assert (count == n_mask).float().mean() > 0.99  # the top-up is a rare exception
    final = _masks(s, keys, (14, 14), seed=0, mask_index=0).masked
    assert (final | ~blocks).all()  # every block patch stays masked; top-up only adds


def test_block_top_up_on_a_tiny_grid_is_exact():
    """2 x 2 at 0.75: blocks often stop short of 3 patches; the noise ranking tops up."""
    s = MAEBlock(mask_ratio=0.75)
    keys = _keys(4096)
    blocks = s.blocks(keys, (2, 2), seed=0, mask_index=0, n_mask=3)
    short = blocks.sum(1) < 3
    assert short.any()  # the top-up is exercised
    pm = _masks(s, keys, (2, 2), seed=0, mask_index=0)
    _check_conventions(pm, 4, 3)
    assert (pm.masked | ~blocks).all()


def test_min_block_patches_shapes_the_blocks():
    keys = _keys(512)
    small = _masks(MAEBlock(mask_ratio=0.4, min_block_patches=1), keys, (14, 14), seed=0, mask_index=0)
    large = _masks(MAEBlock(mask_ratio=0.4, min_block_patches=16), keys, (14, 14), seed=0, mask_index=0)
    assert _components(large.masked, (14, 14)).float().mean() < _components(small.masked, (14, 14)).float().mean()


# ================================================================ ratio schedules


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential"])
@pytest.mark.parametrize("initial,final", [(0.5, 0.9), (0.9, 0.6)])
def test_ratio_schedule_endpoints_and_monotone(schedule, initial, final):
    s = MAERandom(mask_ratio=initial, final_mask_ratio=final, mask_ratio_schedule=schedule, eval_mask_ratio=0.75)
    total = 100
    values = [s.ratio_at(step, total) for step in range(total + 1)]
    assert values[0] == initial and values[-1] == final
    assert s.ratio_at(total + 50, total) == final  # past the end: stays at final
    diffs = [b - a for a, b in zip(values, values[1:])]
    assert all(d >= 0 for d in diffs) if final > initial else all(d <= 0 for d in diffs)
    for stage in ("val", "test", "predict"):
        assert s.ratio_at(0, total, stage) == 0.75 and s.ratio_at(total, total, stage) == 0.75
        assert s.ratio_at(stage=stage) == 0.75  # no step needed outside training


def test_call_uses_the_ratio_of_the_step_and_stage():
    s = MAEBlock(mask_ratio=0.5, final_mask_ratio=0.9, mask_ratio_schedule="linear", eval_mask_ratio=0.75)
    keys = _keys(64)
    start = _masks(s, keys, (4, 4), seed=0, mask_index=0, step=0, total_steps=10)
    end = _masks(s, keys, (4, 4), seed=0, mask_index=0, step=10, total_steps=10)
    val = _masks(s, keys, (4, 4), seed=0, mask_index=0, step=10, total_steps=10, stage="val")
    assert (start.ratio, end.ratio, val.ratio) == (0.5, 0.9, 0.75)
    assert (start.num_masked, end.num_masked, val.num_masked) == (8, 14, 12)


def test_constant_and_unset_final_ratio_stay_put():
    for s in (MAERandom(mask_ratio=0.6),
              MAERandom(mask_ratio=0.6, mask_ratio_schedule="cosine"),  # final None = constant
              MAERandom(mask_ratio=0.6, final_mask_ratio=0.9)):  # the constant schedule ignores final
        assert not s.scheduled
        assert s.ratio_at() == s.ratio_at(7, 10) == 0.6
        assert s.ratio_at(stage="val") == 0.6  # eval_mask_ratio None = mask_ratio


# ================================================================ errors


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_ratio": -0.2}, "mask_ratio"),
        ({"mask_ratio": float("nan")}, "mask_ratio"),
        ({"mask_ratio": True}, "mask_ratio"),
        ({"mask_ratio_schedule": "step"}, "mask_ratio_schedule"),
        ({"mask_ratio_schedule": 3}, "mask_ratio_schedule"),
        ({"final_mask_ratio": 1.0}, "final_mask_ratio"),
        ({"final_mask_ratio": 0.0}, "final_mask_ratio"),
        ({"eval_mask_ratio": 1.2}, "eval_mask_ratio"),
    ],
)
@pytest.mark.parametrize("cls", STRATEGIES)
def test_bad_config_is_a_one_line_error_naming_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{field} = ")
    if field == "mask_ratio_schedule" and kwargs[field] == "step":
        assert all(name in msg for name in ("constant", "linear", "cosine", "exponential"))


@pytest.mark.parametrize("kwargs,field", [({"min_block_patches": 0}, "min_block_patches"),
                                          ({"min_block_patches": 2.5}, "min_block_patches"),
                                          ({"min_aspect": 0.0}, "min_aspect"),
                                          ({"min_aspect": 1.5}, "min_aspect")])
def test_bad_block_config(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^{field} = "):
        MAEBlock(**kwargs)


@pytest.mark.parametrize(
    "call,match",
    [
        ({"grid": (1, 1)}, r"^grid = \(1, 1\): "),
        ({"grid": (0, 4)}, r"^grid = "),
        ({"grid": 16}, r"^grid = "),
        ({"keys": torch.zeros(4, dtype=torch.int32)}, r"^keys: "),
        ({"keys": torch.zeros(4, 2, dtype=torch.int64)}, r"^keys: "),
        ({"mask_index": -1}, r"^mask_index"),
        ({"mask_index": torch.zeros(3, dtype=torch.long)}, r"^mask_index"),
        ({"mask_index": 0.5}, r"^mask_index"),
        ({"stage": "validation"}, r"^stage = 'validation': allowed: train, val, test, predict"),
        ({"seed": 1.5}, r"^seed = "),
    ],
)
def test_bad_call_arguments(call, match):
    args = {"keys": _keys(4), "grid": (4, 4), "seed": 0, "mask_index": 0, "stage": "train"} | call
    keys, grid = args.pop("keys"), args.pop("grid")
    with pytest.raises(ValueError, match=match):
        _masks(MAERandom(), keys, grid, **args)


def test_scheduled_training_needs_the_step():
    s = MAERandom(mask_ratio=0.5, final_mask_ratio=0.8, mask_ratio_schedule="linear")
    with pytest.raises(ValueError, match="total_steps"):
        _masks(s, _keys(4), (4, 4), seed=0, mask_index=0)
    with pytest.raises(ValueError, match="total_steps"):
        s.ratio_at(5, 0)
    assert _masks(s, _keys(4), (4, 4), seed=0, mask_index=0, stage="val").ratio == 0.5
