"""Mixed precision: every family trains under bf16-mixed (what ``precision: auto`` picks on
a CUDA device that has it) with gradient clipping and the fused AdamW; CPU autocast
stands in for the GPU here. Under 16-mixed the optimizer is not fused, so gradients are
unscaled before they are clipped."""

from __future__ import annotations

import pytest
import torch

from lit_modules.registry import MODELS
from lit_modules.run import build_datamodule, build_model, build_trainer


@pytest.mark.parametrize("name", MODELS.names())
def test_every_family_trains_under_bf16_mixed_with_clipping(name, tiny_config, workspace):
    cfg = tiny_config(name, {"trainer.precision": "bf16-mixed", "trainer.max_steps": 2, "trainer.val_every": 2,
                             "optim.grad_clip": 0.5})
    assert cfg.optim.grad_clip > 0
    trainer = build_trainer(cfg, None, [], None)
    model = build_model(cfg)
    trainer.fit(model, datamodule=build_datamodule(cfg, workspace))
    assert trainer.global_step == 2
    assert trainer.optimizers[0].defaults.get("fused") is True
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    assert metrics and all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics


def test_16_mixed_uses_an_unfused_optimizer():
    """(On a CPU Lightning turns 16-mixed into bf16-mixed, so the rule is checked alone.)"""
    from lit_modules.base import fused_adamw

    assert not fused_adamw("16-mixed")
    assert fused_adamw("bf16-mixed") and fused_adamw("32-true") and fused_adamw("")
