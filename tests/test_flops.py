"""FLOP accounting (lit_modules/flops.py) against torch's FLOP counter, every family."""

from __future__ import annotations

import pytest

from lit_modules.registry import MODELS


@pytest.mark.parametrize("name", MODELS.names())
def test_step_flops_match_torch_flop_counter(tiny_config, workspace, name):
    """The closed form from the shapes equals what torch counts for the step's forward
    and backward (matrix products; the attention through the math kernel, which torch
    counts), within 2%. Video families: the masked step and the autoregressive one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from lit_modules.run import build_datamodule, build_model

    stages = ["pretrain", "autoregressive"] if name in ("video-mae", "maskvit") else [None]
    for stage in stages:
        cfg = tiny_config(name, {"model.stage": stage} if stage else None)
        dm = build_datamodule(cfg, workspace)
        model = build_model(cfg, dm).train()
        item = next(iter(dm.train_dataloader()))
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            loss, _ = model._shared_step(item, "train")
            loss.backward()
        counted = counter.get_total_flops()
        ours, tokens = model.step_flops(item)
        assert tokens > 0
        assert ours.training == pytest.approx(counted, rel=0.02), (name, stage, ours, counted)


def test_flops_and_tokens_are_logged_and_a_budget_ends_training(tiny_config, workspace):
    """train/flops grows by the step's count; a budget of 3 steps' FLOPs stops at step 3."""
    import lightning as L

    from lit_modules.run import build_datamodule, build_model

    cfg = tiny_config("bert", {"trainer.max_steps": 20, "trainer.val_every": 20})
    dm = build_datamodule(cfg, workspace)
    model = build_model(cfg)
    per_step = model.step_flops(next(iter(dm.train_dataloader())))[0].training
    budget = 2.5 * per_step  # rows vary in length: the third step crosses it
    cfg = tiny_config("bert", {"trainer.max_steps": 20, "trainer.val_every": 20, "trainer.flops_budget": budget})
    model = build_model(cfg)
    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=build_datamodule(cfg, workspace))
    assert 2 <= trainer.global_step <= 4 and model.flops_seen >= budget
    assert float(trainer.callback_metrics["train/flops"]) == float(model.flops_seen)
    assert model.tokens_seen > 0
