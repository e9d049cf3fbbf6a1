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
    "mae": {
        "seed": 0,
        "data": {"name": "cifar10", "batch_size": 8, "val_batch_size": 16, "val_images": 32},
        "model": {"name": "mae", "image_size": 32, "patch_size": 8, "depth": 2, "width": 32, "heads": 2,
                  "decoder_depth": 1, "decoder_width": 32, "decoder_heads": 2, "eval_masks": 2},
        "masking": {"name": "mae-random", "mask_ratio": 0.75},
        "optim": {"warmup_steps": 2},
        "trainer": {"max_steps": 4, "val_every": 2, "log_every": 1, "accelerator": "cpu", "progress_bar": False},
    },
    "video": {
        "seed": 0,
        "data": {"name": "moving-mnist", "frames": 4, "image_size": 64, "n_clips": 64, "batch_size": 2,
                 "val_batch_size": 4, "val_clips": 4},
        "model": {"name": "video", "clip_kind": "pixels", "frames": 4, "image_size": 64, "tubelet_frames": 2,
                  "patch_size": 16, "depth": 2, "width": 32, "heads": 2, "decoder_depth": 1, "decoder_width": 32,
                  "decoder_heads": 2, "eval_masks": 2},
        "masking": {"name": "video-tube", "mask_ratio": 0.75},
        "optim": {"warmup_steps": 2},
        "trainer": {"max_steps": 4, "val_every": 2, "log_every": 1, "accelerator": "cpu", "progress_bar": False},
    },
}


@pytest.fixture
def tiny_config():
    import copy

    def make(model: str = "gpt", overrides: dict | None = None):
        from lit_modules.config import load_run_config

        return load_run_config(copy.deepcopy(TINY[model]), list((overrides or {}).items()))

    return make
