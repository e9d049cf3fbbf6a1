"""Shared fixtures: seeded RNGs, no outbound network, the real data, tiny configs."""

from __future__ import annotations

import ipaddress
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "studies" / "specs"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Tiny test models run fastest on one thread, and a 2-core CI machine is not
# oversubscribed by worker subprocesses (which inherit this).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


def shared_data_dir() -> Path:
    path = Path(os.environ.get("MASKLAB_DATA_DIR") or REPO.parent / "shared" / "data")
    if not (path / "wikitext-2").is_dir():
        pytest.exit(f"real data not found at {path}: set MASKLAB_DATA_DIR to the shared data folder", returncode=2)
    return path


# ---------------------------------------------------------------- no outbound network
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _is_local(address) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX paths
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname other than localhost would need DNS: refuse


def _guarded(real):
    def connect(self, address):
        if not _is_local(address):
            raise OSError(f"tests may not reach the network (tried {address!r}); only loopback is allowed")
        return real(self, address)

    return connect


@pytest.fixture(autouse=True, scope="session")
def _block_network():
    socket.socket.connect = _guarded(_real_connect)
    socket.socket.connect_ex = _guarded(_real_connect_ex)
    yield
    socket.socket.connect = _real_connect
    socket.socket.connect_ex = _real_connect_ex


@pytest.fixture(autouse=True)
def _seed_everything():
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------- data and workspaces
@pytest.fixture(scope="session")
def data_dir() -> Path:
    return shared_data_dir()


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One output dir per test session, so tokenizers train once."""
    return tmp_path_factory.mktemp("masklab-session")


@pytest.fixture
def workspace(session_cache, data_dir):
    from lit_modules.paths import Workspace

    return Workspace.resolve(session_cache, data_dir)


TOKEN_VOCAB = 16  # ids of the synthetic token clips of TINY["maskvit"]

# A tiny config per registered model family: the registry-parametrized tests use it, so
# a model registered without an entry here fails loudly instead of going untested.
TINY = {
    "gpt": {
        "seed": 0,
        "data": {"name": "wikitext-2", "vocab_size": 512, "batch_size": 4, "val_batch_size": 8, "val_windows": 8},
        "model": {"name": "gpt", "depth": 2, "width": 32, "heads": 2, "block_size": 32},
        "masking": {"name": "causal-lm", "p_bw": 1.0},
        "optim": {"warmup_steps": 2},
        "trainer": {"max_steps": 4, "val_every": 2, "log_every": 1, "accelerator": "cpu", "progress_bar": False},
    },
    "bert": {
        "seed": 0,
        "data": {"name": "wikitext-2", "vocab_size": 512, "batch_size": 4, "val_batch_size": 8, "val_windows": 8},
        "model": {"name": "bert", "depth": 2, "width": 32, "heads": 2, "block_size": 32, "eval_masks": 2},
        "masking": {"name": "mlm-random", "mask_ratio": 0.15},
        "optim": {"warmup_steps": 2},
        "trainer": {"max_steps": 4, "val_every": 2, "log_every": 1, "accelerator": "cpu", "progress_bar": False},
    },
    "electra": {
        "seed": 0,
        "data": {"name": "wikitext-2", "vocab_size": 512, "batch_size": 4, "val_batch_size": 8, "val_windows": 8},
        "model": {"name": "electra", "depth": 2, "width": 32, "heads": 2, "block_size": 32, "eval_masks": 2,
                  "generator_size": 0.5},
        "masking": {"name": "mlm-random", "mask_ratio": 0.15},
        "optim": {"warmup_steps": 2},
        "trainer": {"max_steps": 4, "val_every": 2, "log_every": 1, "accelerator": "cpu", "progress_bar": False},
    },
    "mae": {
        "seed": 0,
        "data": {"name": "cifar10", "batch_size": 8, "val_batch_size": 16, "val_images": 32},
        "model": {"name": "mae", "image_size": 32, "patch_size": 8, "depth": 2, "width": 32, "heads": 2,
                  "decoder_depth": 1, "decoder_width": 32, "decoder_heads": 2, "eval_masks": 2},
        "masking": {"name": "mae-random", "mask_ratio": 0.75},
        "optim": {"warmup_steps": 2},
        "trainer": {"max_steps": 4, "val_every": 2, "log_every": 1, "accelerator": "cpu", "progress_bar": False},
    },
    "beit": {
        "seed": 0,
        "data": {"name": "cifar10", "batch_size": 8, "val_batch_size": 16, "val_images": 32},
        "model": {"name": "beit", "image_size": 32, "patch_size": 8, "depth": 2, "width": 32, "heads": 2,
                  "codebook_size": 16, "tokenizer_patches": 2000, "eval_masks": 2},
        "masking": {"name": "mae-block", "mask_ratio": 0.4},
        "optim": {"warmup_steps": 2},
        "trainer": {"max_steps": 4, "val_every": 2, "log_every": 1, "accelerator": "cpu", "progress_bar": False},
    },
    "video-mae": {
        "seed": 0,
        "data": {"name": "moving-mnist", "frames": 4, "image_size": 64, "n_clips": 64, "batch_size": 2,
                 "val_batch_size": 4, "val_clips": 4},
        "model": {"name": "video-mae", "frames": 4, "image_size": 64, "tubelet_frames": 2, "patch_size": 16,
                  "depth": 2, "width": 32, "heads": 2, "decoder_depth": 1, "decoder_width": 32, "decoder_heads": 2,
                  "eval_masks": 2},
        "masking": {"name": "video-tube", "mask_ratio": 0.75},
        "optim": {"warmup_steps": 2},
        "trainer": {"max_steps": 4, "val_every": 2, "log_every": 1, "accelerator": "cpu", "progress_bar": False},
    },
    "maskvit": {
        "seed": 0,
        # data.path: the session's synthetic token clips (``token_clips_file``), set before any test runs.
        "data": {"name": "video-tokens", "path": "", "clip_kind": "tokens", "frames": 4, "vocab_size": TOKEN_VOCAB,
                 "batch_size": 2, "val_batch_size": 4},
        "model": {"name": "maskvit", "frames": 4, "image_size": 4, "vocab_size": TOKEN_VOCAB, "depth": 2,
                  "width": 32, "heads": 2, "eval_masks": 2},
        "masking": {"name": "video-frame", "mask_ratio": 0.5},
        "optim": {"warmup_steps": 2},
        "trainer": {"max_steps": 4, "val_every": 2, "log_every": 1, "accelerator": "cpu", "progress_bar": False},
    },
}


def write_token_clips(path: Path, n_clips: int = 40, seed: int = 0) -> Path:
    """A small synthetic ``video-tokens`` file: (n_clips, 4 frames, 4, 4) int64 ids in
    [0, TOKEN_VOCAB) (the last 10% of clips validate)."""
    ids = np.random.default_rng(seed).integers(0, TOKEN_VOCAB, (n_clips, 4, 4, 4)).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, ids)
    return path


@pytest.fixture(autouse=True, scope="session")
def token_clips_file(tmp_path_factory) -> Path:
    """The token clips of TINY["maskvit"], written once per session."""
    path = write_token_clips(tmp_path_factory.mktemp("token-clips") / "clips.npy")
    TINY["maskvit"]["data"]["path"] = str(path)
    return path


@pytest.fixture
def tiny_config():
    import copy

    def make(model: str = "gpt", overrides: dict | None = None):
        from lit_modules.config import load_run_config

        return load_run_config(copy.deepcopy(TINY[model]), list((overrides or {}).items()))

    return make


# ---------------------------------------------------------------- a batch of every kind
# Small typed batches of each kind a masking strategy may accept (lit_modules/masking/
# batches.py), for the registry-parametrized masking tests. A strategy that accepts a
# kind without a builder here fails those tests instead of going untested.
TEXT_VOCAB, TEXT_MASK, TEXT_LOW = 512, 4, 6  # ids below TEXT_LOW are special ([CLS] 2, [SEP] 3, [PAD] 5)


def _token_windows(b: int, seed: int):
    """(B, 17) causal-LM windows: T = 16 positions read, each predicting its neighbour."""
    import torch

    from lit_modules.masking.batches import TokenWindows

    g = torch.Generator().manual_seed(seed)
    return TokenWindows(torch.randint(0, TEXT_VOCAB, (b, 17), generator=g))


def _token_rows(b: int, seed: int):
    """(B, 48) masked-LM rows ``[CLS] text [SEP]`` then padding, lengths 24..48, words of
    about two tokens."""
    import torch

    from lit_modules.masking.batches import TokenRows

    g = torch.Generator().manual_seed(seed)
    t = 48
    lengths = torch.randint(24, t + 1, (b,), generator=g)
    pos = torch.arange(t)[None, :]
    valid = pos < lengths[:, None]
    tokens = torch.randint(TEXT_LOW, TEXT_VOCAB, (b, t), generator=g)
    tokens[:, 0] = 2
    tokens[pos == lengths[:, None] - 1] = 3
    tokens[~valid] = 5
    eligible = tokens >= TEXT_LOW
    word_start = (torch.rand(b, t, generator=g) < 0.5) | ~eligible
    return TokenRows(tokens, valid, eligible, word_start, TEXT_VOCAB, TEXT_MASK, TEXT_LOW)


def _images(b: int, seed: int):
    """(B, 3, 16, 16) images on a 4 x 4 patch grid, keyed by their content."""
    import torch

    from lit_modules.masking.batches import Images
    from lit_modules.masking.rng import content_key

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 16, 16, generator=g)
    return Images(x, content_key(x), labels=torch.randint(0, 10, (b,), generator=g), grid=(4, 4),
                  index=torch.arange(b))


def _clips(b: int, seed: int):
    """(B, 4, 3, 16, 16) pixel clips on a (2, 4, 4) tubelet grid (tubelets 2 x 4 x 4)."""
    import torch

    from lit_modules.masking.batches import Clips
    from lit_modules.masking.rng import content_key

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 4, 3, 16, 16, generator=g) * 2 - 1
    return Clips(x, content_key(x), kind="pixels", grid=(2, 4, 4), index=torch.arange(b))


def _builders() -> dict[type, object]:
    from lit_modules.masking.batches import Clips, Images, TokenRows, TokenWindows

    return {TokenWindows: _token_windows, TokenRows: _token_rows, Images: _images, Clips: _clips}


def make_batch(kind: type, b: int = 32, seed: int = 0):
    """A batch of ``kind`` (a class of ``lit_modules.masking.batches``) with ``b`` samples."""
    builders = _builders()
    if kind not in builders:
        raise KeyError(f"no test batch of kind {kind.__name__}: add a builder to tests/conftest.py _builders")
    return builders[kind](b, seed)


def take_rows(batch, index):
    """The samples ``index`` (a list or (n,) int64 tensor) of ``batch``: every per-sample
    tensor field indexed along its first axis, other fields kept."""
    import dataclasses

    import torch

    index = torch.as_tensor(index, dtype=torch.int64)
    b = batch.size
    changes = {f.name: getattr(batch, f.name)[index] for f in dataclasses.fields(batch)
               if isinstance(getattr(batch, f.name), torch.Tensor) and getattr(batch, f.name).shape[:1] == (b,)}
    return dataclasses.replace(batch, **changes)


def concat_batches(first, second):
    """Two batches of one kind (same shapes but the first axis) as one."""
    import dataclasses

    import torch

    changes = {}
    for f in dataclasses.fields(first):
        a, b = getattr(first, f.name), getattr(second, f.name)
        if isinstance(a, torch.Tensor):
            changes[f.name] = torch.cat([a, b])
        else:
            assert a == b, f"{f.name}: {a!r} != {b!r}"
    return dataclasses.replace(first, **changes)


def scored_shape(batch) -> tuple[int, ...]:
    """The shape of a mask's ``loss_mask`` on ``batch`` (one view per sample): (B, T)
    positions read, (B, T) tokens, (B, N) patches or (B, N) tubelets."""
    import math

    from lit_modules.masking.batches import Clips, Images, TokenRows, TokenWindows

    if isinstance(batch, TokenWindows):
        return batch.windows.shape[0], batch.windows.shape[1] - 1
    if isinstance(batch, TokenRows):
        return tuple(batch.tokens.shape)
    if isinstance(batch, (Images, Clips)):
        return batch.size, math.prod(batch.grid)
    raise KeyError(f"no scored shape for {type(batch).__name__}: add it to tests/conftest.py scored_shape")
