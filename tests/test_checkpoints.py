"""Checkpoints are read as data: a file whose unpickling would run code is refused with a
one-line error, and the code never runs; masklab's own checkpoints load that way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lit_modules.checkpoints import load_checkpoint
from lit_modules.config_errors import ConfigError


class _RunsCode:
    """Unpickling this calls os.makedirs(marker): code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"model.embed_in.weight": torch.zeros(2)}, "global_step": 3,
                "payload": _RunsCode(marker)}, path)
    return path, marker


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


def test_crafted_checkpoint_is_refused_and_nothing_runs(crafted, tmp_path):
    path, marker = crafted
    with pytest.raises(ConfigError) as info:
        load_checkpoint(path, "model.init_from")
    msg = _one_line(info.value)
    assert msg.startswith(f"model.init_from = '{path}': refused: it would build os.makedirs"), msg
    assert not marker.exists()
    # The payload is live: a plain unpickling would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_stage_one_weights_and_resume_checkpoints_refuse_it(crafted, tiny_config):
    from lit_modules.run import build_model
    from studies.train import checkpoint_step

    path, marker = crafted
    model = build_model(tiny_config("video-mae", {"model.stage": "autoregressive"}))
    with pytest.raises(ConfigError, match="model.init_from = .*refused"):
        model.load_pretrained(str(path))
    with pytest.raises(ConfigError, match="resume checkpoint = .*refused"):
        checkpoint_step(path)
    assert not marker.exists()


def test_masklab_train_refuses_an_unsafe_init_from(crafted, tmp_path, capsys, data_dir):
    from mlflow.tracking import MlflowClient

    from studies.cli import main

    path, marker = crafted
    out = tmp_path / "out"
    rc = main(["train", "studies/specs/video_ar_tiny.yaml", "--set", f"model.init_from={path}",
               "--set", "trainer.max_steps=2", "--output-dir", str(out), "--data-dir", str(data_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "refused" in err[0], err
    assert not marker.exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments)  # refused before any run was recorded


def test_own_checkpoints_load_as_plain_data(tiny_config, workspace, tmp_path):
    """What masklab writes (weights, optimizer, scheduler, loops, hparams) needs no
    allowlisted global."""
    from lit_modules.run import build_datamodule, build_model, build_trainer

    cfg = tiny_config("gpt", {"trainer.max_steps": 2, "trainer.val_every": 2})
    trainer = build_trainer(cfg, None, [], tmp_path / "ck")
    trainer.fit(build_model(cfg), datamodule=build_datamodule(cfg, workspace))
    state = load_checkpoint(tmp_path / "ck" / "last.ckpt")
    assert state["global_step"] == 2 and state["optimizer_states"] and state["hyper_parameters"]["config"]["seed"] == 0


def test_missing_and_broken_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.ckpt", "model.init_from")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError) as info:
        load_checkpoint(bad, "model.init_from")
    assert "is not a readable checkpoint" in _one_line(info.value)
