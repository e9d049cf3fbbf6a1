"""Mask-ratio schedules inside real training runs: the schedule spans the masked phase.

A schedule is at ``mask_ratio`` on the first masked-training step and at
``final_mask_ratio`` on the last one, also in a two-stage video run, where masked
pretraining ends at ``pretrain_steps`` (not at ``trainer.max_steps``). The ratio in use
is logged as ``train/mask_ratio`` on every masked step.
"""

from __future__ import annotations

import pytest
from lightning.pytorch.loggers import Logger

from lit_modules.run import build_datamodule, build_model, build_trainer

SCHEDULES = ("linear", "cosine", "exponential")


class RatioLog(Logger):
    """A logger that keeps the ``train/mask_ratio`` it is sent, by training step."""

    name, version = "ratios", 0

    def __init__(self):
        super().__init__()
        self.by_step: dict[int, float] = {}

    def log_metrics(self, metrics, step=None):
        if "train/mask_ratio" in metrics:
            self.by_step[step] = float(metrics["train/mask_ratio"])

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _fit(cfg, workspace) -> RatioLog:
    log = RatioLog()
    dm = build_datamodule(cfg, workspace)
    trainer = build_trainer(cfg, log, [], None)  # log_every 1: every step is sent
    trainer.fit(build_model(cfg), datamodule=dm)
    return log


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_two_stage_schedule_reaches_final_at_last_pretraining_step(schedule, tiny_config, workspace):
    pretrain, total = 4, 7
    cfg = tiny_config("video-mae", {
        "model.stage": "two-stage", "model.pretrain_steps": pretrain, "trainer.max_steps": total,
        "trainer.val_every": total, "masking.name": "video-frame", "masking.mask_ratio": 0.9,
        "masking.final_mask_ratio": 0.1, "masking.mask_ratio_schedule": schedule,
    })
    log = _fit(cfg, workspace)
    # Masked pretraining is steps 0..pretrain-1; the autoregressive steps mask nothing.
    assert sorted(log.by_step) == list(range(total))
    assert [log.by_step[s] for s in range(pretrain, total)] == [0.0] * (total - pretrain)
    assert log.by_step[0] == pytest.approx(0.9, abs=1e-6)
    assert log.by_step[pretrain - 1] == pytest.approx(0.1, abs=1e-6)
    ratios = [log.by_step[s] for s in range(pretrain)]
    assert all(a > b for a, b in zip(ratios, ratios[1:])), ratios  # strictly decreasing in between


def test_linear_and_cosine_differ_mid_pretraining(tiny_config, workspace):
    """The two schedules are different curves over the masked phase (they were nearly
    the same when the schedule ran over max_steps and was cut off half-way)."""
    mid = {}
    for schedule in ("linear", "cosine"):
        cfg = tiny_config("video-mae", {
            "model.stage": "two-stage", "model.pretrain_steps": 5, "trainer.max_steps": 6, "trainer.val_every": 6,
            "masking.name": "video-frame", "masking.mask_ratio": 0.9, "masking.final_mask_ratio": 0.1,
            "masking.mask_ratio_schedule": schedule,
        })
        mid[schedule] = _fit(cfg, workspace).by_step[1]  # progress 1/4
    assert mid["linear"] == pytest.approx(0.9 - 0.8 * 0.25, abs=1e-6)
    assert mid["cosine"] == pytest.approx(0.1 + 0.8 * (1 + 2 ** -0.5) / 2, abs=1e-6)


def test_mae_schedule_spans_the_whole_run(tiny_config, workspace):
    cfg = tiny_config("mae", {"trainer.max_steps": 4, "trainer.val_every": 4, "masking.mask_ratio": 0.5,
                              "masking.final_mask_ratio": 0.875, "masking.mask_ratio_schedule": "linear"})
    log = _fit(cfg, workspace)
    assert [round(log.by_step[s], 6) for s in range(4)] == pytest.approx([0.5, 0.625, 0.75, 0.875], abs=1e-6)
