"""GPT: no leakage in either direction, predict() semantics, the training step on the
data pipeline's views; registry smoke tests of every model family."""

from __future__ import annotations

import pytest
import torch

from lit_modules.registry import MODELS

from .conftest import TINY

VOCAB = TINY["gpt"]["data"]["vocab_size"]


def _model(tiny_config, **over):
    from lit_modules.run import build_model

    model = build_model(tiny_config("gpt", {f"model.{k}": v for k, v in over.items()}))
    return model.eval()


def _train_item(model, window: torch.Tensor, step: int = 0):
    """What the data pipeline hands the training step for ``window`` (B, T+1) at ``step``."""
    from lit_modules.masking.batches import TokenWindows

    plan = type(model).mask_plan(model.run_config, steps_per_epoch=2)
    return plan.train_item(TokenWindows(window), step)


@pytest.mark.parametrize("direction", ["fw", "bw"])
@pytest.mark.parametrize("length", [1, 2, 3, 7, 32])
def test_no_leakage(tiny_config, direction, length):
    """Changing a token a position must not see leaves its logits unchanged; changing one
    it may see changes them. fw: position t sees tokens <= t (and predicts t+1);
    bw: position t sees tokens >= t (and predicts t-1). Lengths far below block_size
    (32) included: a mask cut from a larger triangle would leak there."""
    model = _model(tiny_config)
    tokens = torch.randint(0, VOCAB, (3, length))
    base = model.predict(tokens, direction)  # (B, T, V)
    for j in range(length):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + torch.randint(1, VOCAB, (3,))) % VOCAB  # every row, a new token
        out = model.predict(changed, direction)
        for t in range(length):
            visible = j <= t if direction == "fw" else j >= t
            diff = (out[:, t] - base[:, t]).abs().amax(-1)  # (B,): each row on its own
            for row, d in enumerate(diff.tolist()):
                if visible:
                    assert d > 1e-6, f"{direction}: row {row}, position {t} ignores visible token {j}"
                else:
                    assert d == 0.0, f"{direction}: row {row}, position {t} sees token {j} (leak, diff {d})"


def test_target_never_visible(tiny_config):
    """The token each position is asked to predict does not influence that prediction."""
    model = _model(tiny_config)
    tokens = torch.randint(0, VOCAB, (3, 16))
    for direction, offset in (("fw", 1), ("bw", -1)):
        base = model.predict(tokens, direction)
        for t in range(16):
            target = t + offset
            if not 0 <= target < 16:
                continue
            changed = tokens.clone()
            changed[:, target] = (changed[:, target] + 7) % VOCAB
            assert torch.equal(model.predict(changed, direction)[:, t], base[:, t])


def test_predict_matches_training_path(tiny_config):
    """predict() in original coordinates gives exactly the losses the training step
    computes on its stacked fw/bw batch."""
    model = _model(tiny_config)  # p_bw = 1: every training step reads both directions
    window = torch.randint(0, VOCAB, (4, 17))  # (B, T+1)
    masked = _train_item(model, window).masked
    assert masked.direction.tolist() == [0] * 4 + [1] * 4
    with torch.no_grad():
        logits = model.model(masked.inputs, masked.direction, masked.attention)
    ce = torch.nn.functional.cross_entropy
    train_fw = ce(logits[:4].reshape(-1, VOCAB), masked.targets[:4].reshape(-1))
    train_bw = ce(logits[4:].reshape(-1, VOCAB), masked.targets[4:].reshape(-1))
    fw = model.predict(window[:, :-1], "fw")  # logits[:, t] predicts window[:, t+1]
    bw = model.predict(window[:, 1:], "bw")  # logits[:, t] predicts window[:, t]
    assert torch.allclose(ce(fw.reshape(-1, VOCAB), window[:, 1:].reshape(-1)), train_fw, atol=1e-6)
    assert torch.allclose(ce(bw.reshape(-1, VOCAB), window[:, :-1].reshape(-1)), train_bw, atol=1e-6)


def test_direction_changes_prediction(tiny_config):
    model = _model(tiny_config)
    tokens = torch.randint(0, VOCAB, (2, 8))
    fw = model.predict(tokens, "fw")
    bw = model.predict(tokens.flip(1), "bw").flip(1)  # same reading order, other direction
    assert not torch.allclose(fw, bw)


def test_every_model_is_covered():
    assert set(MODELS.names()) <= set(TINY), "add a tiny config to tests/conftest.py TINY"


@pytest.mark.parametrize("name", MODELS.names())
def test_model_smoke(tiny_config, workspace, name):
    """Forward, backward, every parameter gets a finite gradient; metrics are named. The
    training item comes from the data module with its masks drawn; a validation item
    is scored too."""
    from lit_modules.masking.plan import EvalItem, TrainItem
    from lit_modules.run import build_datamodule, build_model

    cfg = tiny_config(name)
    dm = build_datamodule(cfg, workspace)
    model = build_model(cfg, dm).train()
    item = next(iter(dm.train_dataloader()))
    assert isinstance(item, TrainItem) and item.step == 0 and item.masked is not None
    assert isinstance(item.batch, cfg.model.consumes)
    loss, metrics = model._shared_step(item, "train")
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    assert all(k.replace("_", "").isalnum() for k in metrics)
    val = next(iter(dm.val_dataloader()))
    assert isinstance(val, EvalItem) and len(val.common) == getattr(cfg.model, "eval_masks", 1)
    with torch.no_grad():
        vloss, vmetrics = model.eval()._shared_step(val, "val")
    assert torch.isfinite(vloss) and vmetrics and all(k.replace("_", "").isalnum() for k in vmetrics)


def test_backward_coin_sums_losses(tiny_config):
    """With p_bw = 1 the training loss is fw_loss + bw_loss; with p_bw = 0 only fw_loss."""
    window = torch.randint(0, VOCAB, (4, 17))
    for p_bw, expect_bw in ((1.0, True), (0.0, False)):
        from lit_modules.run import build_model

        model = build_model(tiny_config("gpt", {"masking.p_bw": p_bw}))
        loss, metrics = model._shared_step(_train_item(model, window), "train")
        assert ("bw_loss" in metrics) == expect_bw
        assert float(metrics["bw_steps"][0]) == float(expect_bw)
        total = metrics["fw_loss"][0] + (metrics["bw_loss"][0] if expect_bw else 0)
        assert torch.allclose(loss, total)


def test_checkpoint_roundtrip(tiny_config, tmp_path):
    """A checkpoint loads with Lightning's standard load_from_checkpoint(path)."""
    import lightning as L

    from lit_modules.gpt import LitGPT

    model = _model(tiny_config)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = LitGPT.load_from_checkpoint(path).eval()
    tokens = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(loaded.predict(tokens, "bw"), model.predict(tokens, "bw"))


def test_tiny_table_matches_registry_fields():
    for name, cfg in TINY.items():
        assert cfg["model"]["name"] == name
