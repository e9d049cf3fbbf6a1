"""Scale-out: crash-safe trials (checkpoint resume), many workers on one study, the
launcher and the SLURM script. Tests that need PostgreSQL or an MLflow server start
them on 127.0.0.1 (tests/servers.py) and stop them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from studies.train import Resume, Tracking, train_run


class _DieAt(Callback):
    """Stands in for a worker killed mid-trial: raises at a given global step."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"worker lost at step {self.step}")


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny_config, workspace):
    """A run cut off after its step-4 checkpoint and resumed from it ends with the same
    weights and validation loss as the run that was never interrupted, and its MLflow run
    links to the attempt and carries the attempt's curves up to the checkpoint."""
    from mlflow.tracking import MlflowClient

    cfg = tiny_config("gpt", {"trainer.max_steps": 8, "trainer.val_every": 2, "masking.p_bw": 0.5})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    straight = train_run(cfg, workspace, Tracking(uri, "resume"))

    with pytest.raises(RuntimeError, match="worker lost at step 5"):
        train_run(cfg, workspace, Tracking(uri, "resume"), callbacks=[_DieAt(5)])
    client = MlflowClient(uri)
    failed = [r for r in client.search_runs(client.get_experiment_by_name("resume").experiment_id)
              if r.info.status == "FAILED"]
    assert len(failed) == 1
    attempt = failed[0].info.run_id
    ckpt = workspace.checkpoint_dir / attempt / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 4

    resumed = train_run(cfg, workspace, Tracking(uri, "resume"), resume=Resume(attempt, ckpt))
    assert resumed.metrics["val/fw_loss"] == pytest.approx(straight.metrics["val/fw_loss"], abs=1e-6)
    assert resumed.metrics["val/bw_loss"] == pytest.approx(straight.metrics["val/bw_loss"], abs=1e-6)
    a, b = _weights(straight.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)

    run = client.get_run(resumed.run_id)
    assert run.data.tags["masklab.retry_of_run"] == attempt
    assert run.data.tags["masklab.resumed_at_step"] == "4"
    for key in ("val/fw_loss", "train/fw_loss"):
        # Points up to the checkpoint are copied from the attempt, the rest trained here:
        # together the same series as the uninterrupted run's.
        want = sorted((m.step, round(m.value, 5)) for m in client.get_metric_history(straight.run_id, key))
        got = sorted((m.step, round(m.value, 5)) for m in client.get_metric_history(resumed.run_id, key))
        assert got == want, key
