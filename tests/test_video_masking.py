"""Property tests of the video tubelet maskings (``lit_modules.masking.video``): exact
counts, tube / per-frame structure, keep_first_frames, index conventions, determinism,
ratio schedules and config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lit_modules.config import from_dict
from lit_modules.config_errors import ConfigError
from lit_modules.masking import MaskContext, MaskedBatch, rng
from lit_modules.masking.attention import Attention
from lit_modules.masking.batches import Clips, Images
from lit_modules.masking.patches import PatchMask, mask_from_scores, num_masked
from lit_modules.masking.rng import Stream
from lit_modules.masking.video import VideoFrame, VideoRandom, VideoTube, top_k_mask
from lit_modules.model_configs import maskings_for
from lit_modules.registry import MASKINGS

# Every registered strategy that masks clips (derived from the registry).
STRATEGIES = [MASKINGS.get(name) for name in maskings_for(Clips)]
GRIDS = [(1, 2, 1), (2, 2, 2), (4, 3, 5), (8, 14, 14)]
RATIOS = [0.1, 0.5, 0.75, 0.9]


def _keys(n: int, seed: int = 0) -> torch.Tensor:
    """n distinct int64 sample keys spread over the whole 64-bit range."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)


def _check_conventions(pm: PatchMask, n: int, n_mask: int) -> None:
    """Shapes, dtypes, ascending disjoint covering indices, and masked == mask_idx."""
    b = pm.masked.shape[0]
    assert pm.masked.shape == (b, n) and pm.masked.dtype == torch.bool
    assert pm.mask_idx.shape == (b, n_mask) and pm.keep_idx.shape == (b, n - n_mask)
    assert pm.mask_idx.dtype == torch.int64 and pm.keep_idx.dtype == torch.int64
    assert (pm.masked.sum(1) == n_mask).all()
    assert (pm.mask_idx.diff(dim=1) > 0).all() and (pm.keep_idx.diff(dim=1) > 0).all()
    both = torch.cat([pm.mask_idx, pm.keep_idx], 1).sort(dim=1).values
    assert torch.equal(both, torch.arange(n).expand(b, n))
    assert pm.masked.gather(1, pm.mask_idx).all() and not pm.masked.gather(1, pm.keep_idx).any()
    assert pm.loss_mask is pm.masked


def _masks(s, keys, grid, seed=0, mask_index=0, step=None, total_steps=None, stage="train") -> PatchMask:
    """The masks of ``keys`` on ``grid`` (``strategy.masks``) at one mask context."""
    return s.masks(keys, grid, MaskContext(seed, mask_index, step, total_steps, stage))


def _call(s, grid, b=32, **kw):
    return _masks(s, _keys(b), grid, **kw)


# ================================================================ registry and API


def test_registered_with_defaults():
    assert {VideoTube, VideoRandom, VideoFrame} <= set(STRATEGIES)
    for cls in STRATEGIES:
        s = cls()
        assert MASKINGS.get(s.name) is cls
        assert (s.mask_ratio_schedule, s.final_mask_ratio, s.eval_mask_ratio) == ("constant", None, None)
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.mask_ratio = 0.5  # type: ignore[misc]
    assert VideoTube().mask_ratio == VideoRandom().mask_ratio == 0.9
    assert (VideoFrame().mask_ratio, VideoFrame().keep_first_frames) == (0.75, 0)


def test_yaml_boundary_builds_and_prefixes_errors():
    s = from_dict(VideoFrame, {"name": "video-frame", "mask_ratio": 0.8, "final_mask_ratio": 0.1,
                               "mask_ratio_schedule": "cosine", "keep_first_frames": 2}, "masking")
    assert s == VideoFrame(mask_ratio=0.8, final_mask_ratio=0.1, mask_ratio_schedule="cosine", keep_first_frames=2)
    with pytest.raises(ConfigError, match=r"^masking\.keep_first_frames = -1: "):
        from_dict(VideoFrame, {"keep_first_frames": -1}, "masking")


def test_each_strategy_draws_from_its_own_stream():
    """Tube, random and frame masking each rank the noise of their own mask stream
    (``rng.Stream``), apart from every other purpose's."""
    ours = {int(st) for st in (Stream.VIDEO_TUBE, Stream.VIDEO_RANDOM, Stream.VIDEO_FRAME)}
    others = {int(st) for st in Stream} - ours
    assert len(ours) == 3 and not ours & others
    keys, (f, h, w) = _keys(16), (2, 4, 4)

    def noise(stream, n):
        return rng.bits(rng.mask_stream(7, keys, 3, stream), n)

    tube = _masks(VideoTube(mask_ratio=0.5), keys, (f, h, w), seed=7, mask_index=3).masked
    assert torch.equal(tube, top_k_mask(noise(Stream.VIDEO_TUBE, h * w), 8).repeat(1, f))
    rand = _masks(VideoRandom(mask_ratio=0.5), keys, (f, h, w), seed=7, mask_index=3).masked
    assert torch.equal(rand, mask_from_scores(noise(Stream.VIDEO_RANDOM, f * h * w), 16, 0.5).masked)
    frame = _masks(VideoFrame(mask_ratio=0.5), keys, (f, h, w), seed=7, mask_index=3).masked
    assert torch.equal(frame, top_k_mask(noise(Stream.VIDEO_FRAME, f * h * w).view(16, f, h * w), 8).view(16, -1))


@pytest.mark.parametrize("cls", STRATEGIES)
def test_call_on_clips_gives_the_tubelet_mask(cls):
    """``strategy(clips, ctx)``: inputs and targets are the clips (pixels or token ids),
    loss_mask the masked tubelets, keep_idx the visible ones."""
    s = cls(mask_ratio=0.5, final_mask_ratio=0.25, mask_ratio_schedule="linear", eval_mask_ratio=0.75)
    for x in (torch.rand(8, 4, 3, 16, 16), torch.randint(0, 16, (8, 4, 4, 4))):
        batch = Clips(x, _keys(8), kind="pixels" if x.is_floating_point() else "tokens", grid=(4, 2, 2))
        for ctx in (MaskContext(seed=1, mask_index=2, step=0, total_steps=4),
                    MaskContext(seed=1, mask_index=2, step=4, total_steps=4),
                    MaskContext(seed=1, mask_index=torch.arange(8), stage="val")):
            m = s(batch, ctx)
            pm = s.masks(batch.keys, (4, 2, 2), ctx)
            assert isinstance(m, MaskedBatch) and m.inputs is x and m.targets is x
            assert torch.equal(m.loss_mask, pm.masked) and torch.equal(m.keep_idx, pm.keep_idx)
            assert m.ratio == pm.ratio and m.attention == Attention()
        assert [s(batch, c).ratio for c in (MaskContext(0, 0, 0, 4), MaskContext(0, stage="val"))] == [0.5, 0.75]
    with pytest.raises(ValueError, match="grid"):
        s(Clips(x, _keys(8)), MaskContext(seed=0, stage="val"))  # the model sets the grid
    with pytest.raises(ValueError, match="Clips"):
        s(Images(torch.zeros(8, 3, 8, 8), _keys(8), grid=(2, 2)), MaskContext(seed=0, stage="val"))


# ================================================================ structure and counts


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_tube_is_one_spatial_mask_shared_by_every_time_step(grid, ratio):
    f, h, w = grid
    pm = _call(VideoTube(mask_ratio=ratio), grid)
    s_mask = num_masked(ratio, h * w)
    _check_conventions(pm, f * h * w, f * s_mask)
    m = pm.masked.reshape(-1, f, h * w)
    assert (m == m[:, :1]).all()  # identical across time
    assert (m[:, 0].sum(1) == s_mask).all()
    assert pm.ratio == ratio


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_random_masks_exactly_round_ratio_n(grid, ratio):
    n = grid[0] * grid[1] * grid[2]
    pm = _call(VideoRandom(mask_ratio=ratio), grid)
    _check_conventions(pm, n, num_masked(ratio, n))


def test_random_is_not_a_tube():
    pm = _call(VideoRandom(mask_ratio=0.5), (4, 4, 4), b=64)
    m = pm.masked.reshape(64, 4, 16)
    assert not (m == m[:, :1]).all(dim=(1, 2)).any()


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_frame_masks_exactly_per_frame_and_independently(grid, ratio):
    f, h, w = grid
    pm = _call(VideoFrame(mask_ratio=ratio), grid, b=64)
    s_mask = num_masked(ratio, h * w)
    _check_conventions(pm, f * h * w, f * s_mask)
    m = pm.masked.reshape(64, f, h * w)
    assert (m.sum(2) == s_mask).all()
    if f > 1 and h * w >= 4:  # frames differ within a sample (not a tube)
        assert not (m == m[:, :1]).all(dim=(1, 2)).all()


@pytest.mark.parametrize("k", [0, 1, 3])
def test_keep_first_frames_are_fully_visible(k):
    f, h, w = 4, 3, 5
    ratio = 0.6
    pm = _call(VideoFrame(mask_ratio=ratio, keep_first_frames=k), (f, h, w), b=64)
    s_mask = num_masked(ratio, h * w)
    _check_conventions(pm, f * h * w, (f - k) * s_mask)
    m = pm.masked.reshape(64, f, h * w)
    assert not m[:, :k].any()
    assert (m[:, k:].sum(2) == s_mask).all()
    # The masked frames are the same as without conditioning frames.
    base = _call(VideoFrame(mask_ratio=ratio), (f, h, w), b=64).masked.reshape(64, f, h * w)
    assert torch.equal(m[:, k:], base[:, k:])


def test_restore_idx_undoes_the_keep_mask_split():
    pm = _call(VideoTube(), (4, 4, 4), b=8)
    x = torch.randn(8, 64, 3)
    cat = torch.cat([x.gather(1, pm.keep_idx[..., None].expand(-1, -1, 3)),
                     x.gather(1, pm.mask_idx[..., None].expand(-1, -1, 3))], 1)
    assert torch.equal(cat.gather(1, pm.restore_idx[..., None].expand(-1, -1, 3)), x)


# ================================================================ determinism


@pytest.mark.parametrize("cls", STRATEGIES)
def test_same_key_same_mask_at_any_batch_position(cls):
    s, grid = cls(mask_ratio=0.5), (4, 4, 4)
    keys = _keys(16)
    full = _masks(s, keys, grid, seed=3, mask_index=5).masked
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    shuffled = _masks(s, keys[perm], grid, seed=3, mask_index=5).masked
    assert torch.equal(shuffled, full[perm])
    single = _masks(s, keys[7:8], grid, seed=3, mask_index=5).masked
    assert torch.equal(single[0], full[7])
    per_row = _masks(s, keys, grid, seed=3, mask_index=torch.full((16,), 5)).masked
    assert torch.equal(per_row, full)


@pytest.mark.parametrize("cls", STRATEGIES)
def test_mask_index_seed_and_key_change_the_mask(cls):
    s, grid = cls(mask_ratio=0.5), (4, 4, 4)
    keys = _keys(32)
    base = _masks(s, keys, grid, seed=0, mask_index=0).masked
    for other in (_masks(s, keys, grid, seed=0, mask_index=1).masked,
                  _masks(s, keys, grid, seed=1, mask_index=0).masked,
                  _masks(s, _keys(32, seed=9), grid, seed=0, mask_index=0).masked):
        assert (other != base).any(dim=1).all()


def test_strategies_use_different_streams():
    keys, grid = _keys(32), (2, 4, 4)
    tube = _masks(VideoTube(mask_ratio=0.5), keys, grid, seed=0, mask_index=0).masked.reshape(32, 2, 16)[:, 0]
    frame = _masks(VideoFrame(mask_ratio=0.5), keys, grid, seed=0, mask_index=0).masked.reshape(32, 2, 16)[:, 0]
    assert (tube != frame).any(dim=1).all()


# ================================================================ ratio schedules


@pytest.mark.parametrize("cls", STRATEGIES)
@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential"])
def test_ratio_schedule_08_to_01_endpoints_and_monotone(cls, schedule):
    s = cls(mask_ratio=0.8, final_mask_ratio=0.1, mask_ratio_schedule=schedule, eval_mask_ratio=0.5)
    total = 100
    values = [s.ratio_at(step, total) for step in range(total + 1)]
    assert values[0] == 0.8 and values[-1] == 0.1 and s.ratio_at(total + 5, total) == 0.1
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert s.ratio_at(stage="val") == 0.5
    grid = (4, 4, 5)
    counts = [_masks(s, _keys(4), grid, seed=0, mask_index=0, step=step, total_steps=total).num_masked
              for step in (0, 25, 50, 75, 100)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == s.num_masked(grid, 0.8) and counts[-1] == s.num_masked(grid, 0.1)
    val = _masks(s, _keys(4), grid, seed=0, mask_index=0, stage="val")
    assert val.ratio == 0.5 and val.num_masked == s.num_masked(grid, 0.5)


def test_constant_schedule_stays_put():
    for s in (VideoTube(mask_ratio=0.6), VideoTube(mask_ratio=0.6, final_mask_ratio=0.1)):
        assert not s.scheduled and s.ratio_at() == s.ratio_at(7, 10) == s.ratio_at(stage="val") == 0.6


def test_scheduled_training_needs_the_step():
    s = VideoRandom(mask_ratio=0.8, final_mask_ratio=0.1, mask_ratio_schedule="linear")
    with pytest.raises(ValueError, match="total_steps"):
        _masks(s, _keys(4), (2, 4, 4), seed=0, mask_index=0)


# ================================================================ errors


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_ratio": float("nan")}, "mask_ratio"),
        ({"mask_ratio": True}, "mask_ratio"),
        ({"mask_ratio_schedule": "step"}, "mask_ratio_schedule"),
        ({"final_mask_ratio": 1.0}, "final_mask_ratio"),
        ({"eval_mask_ratio": 1.2}, "eval_mask_ratio"),
    ],
)
@pytest.mark.parametrize("cls", STRATEGIES)
def test_bad_config_is_a_one_line_error_naming_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{field} = ")


@pytest.mark.parametrize("k", [-1, 1.5, True, "2"])
def test_bad_keep_first_frames(k):
    with pytest.raises(ConfigError, match=r"^keep_first_frames = "):
        VideoFrame(keep_first_frames=k)


def test_keep_first_frames_must_leave_a_masked_frame():
    with pytest.raises(ConfigError, match=r"^keep_first_frames = 4: must be < the 4 time steps"):
        _call(VideoFrame(keep_first_frames=4), (4, 2, 2), b=2)


@pytest.mark.parametrize(
    "cls,call,match",
    [
        (VideoTube, {"grid": (4, 1, 1)}, r"^grid = \(4, 1, 1\): "),
        (VideoFrame, {"grid": (4, 1, 1)}, r"^grid = "),
        (VideoRandom, {"grid": (1, 1, 1)}, r"^grid = "),
        (VideoTube, {"grid": (4, 4)}, r"^grid = "),
        (VideoTube, {"grid": (0, 4, 4)}, r"^grid = "),
        (VideoTube, {"keys": torch.zeros(4, dtype=torch.int32)}, r"^keys: "),
        (VideoTube, {"mask_index": -1}, r"^mask_index"),
        (VideoTube, {"mask_index": torch.zeros(3, dtype=torch.long)}, r"^mask_index"),
        (VideoTube, {"stage": "validation"}, r"^stage = 'validation': allowed: "),
        (VideoTube, {"seed": 1.5}, r"^seed = "),
    ],
)
def test_bad_call_arguments(cls, call, match):
    args = {"keys": _keys(4), "grid": (2, 4, 4), "seed": 0, "mask_index": 0, "stage": "train"} | call
    keys, grid = args.pop("keys"), args.pop("grid")
    with pytest.raises(ValueError, match=match) as e:
        _masks(cls(), keys, grid, **args)
    assert "\n" not in str(e.value)


def test_random_accepts_a_single_position_grid():
    pm = _call(VideoRandom(mask_ratio=0.5), (4, 1, 1), b=4)
    _check_conventions(pm, 4, 2)
