"""Video models: both clip kinds, masked pretraining and frame-causal fine-tuning
without leakage, stage-1 -> stage-2 checkpoint loading, layer removal."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_modules.config_errors import ConfigError

from .conftest import TINY

TOKENS = {
    "seed": 0,
    "data": {"name": "video-tokens", "path": "PLACEHOLDER", "frames": 4, "image_size": 4, "vocab_size": 16,
             "batch_size": 4, "val_batch_size": 4, "kind_of_clip": "tokens"},
    "model": {"name": "video", "clip_kind": "tokens", "frames": 4, "image_size": 4, "tubelet_frames": 1,
              "patch_size": 1, "vocab_size": 16, "depth": 2, "width": 32, "heads": 2},
    "masking": {"name": "video-frame", "mask_ratio": 0.5},
    "optim": {"warmup_steps": 2},
    "trainer": {"max_steps": 4, "val_every": 2, "log_every": 1, "accelerator": "cpu", "progress_bar": False},
}


def _cfg(base=None, **changes):
    from lit_modules.config import load_run_config

    return load_run_config(copy.deepcopy(base or TINY["video"]), list(changes.items()))


def _model(base=None, **changes):
    from lit_modules.run import build_model

    return build_model(_cfg(base, **changes)).eval()


def _pixel_batch(b=2):
    m = TINY["video"]["model"]
    return {"clips": torch.rand(b, m["frames"], 3, m["image_size"], m["image_size"]) * 2 - 1,
            "keys": torch.arange(b, dtype=torch.int64) * 7919, "index": torch.arange(b)}


def _token_batch(b=2):
    return {"tokens": torch.randint(0, 16, (b, 4, 4, 4)), "keys": torch.arange(b, dtype=torch.int64) * 31,
            "index": torch.arange(b)}


@pytest.mark.parametrize("kind", ["pixels", "tokens"])
@pytest.mark.parametrize("stage", ["pretrain", "autoregressive"])
def test_both_kinds_both_stages_train(kind, stage):
    base = TINY["video"] if kind == "pixels" else TOKENS
    model = _model(base, **{"model.stage": stage}).train()
    batch = _pixel_batch() if kind == "pixels" else _token_batch()
    loss, metrics = model._shared_step(batch, "train")
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert set(metrics) == ({"recon_loss"} if stage == "pretrain" else {"next_frame_loss"})


@pytest.mark.parametrize("kind", ["pixels", "tokens"])
def test_autoregressive_stage_has_no_leakage(kind):
    """Predictions for time step t+1 (made at the tokens of step t) ignore step t+1 and
    later, and depend on step t."""
    base = TINY["video"] if kind == "pixels" else TOKENS
    model = _model(base, **{"model.stage": "autoregressive"})
    batch = _pixel_batch() if kind == "pixels" else _token_batch()
    key = "clips" if kind == "pixels" else "tokens"
    t_steps, h, w = model.cfg.grid
    s, tf = h * w, model.cfg.tubelet_frames
    base_out = model.predict_next(batch)
    for t in range(t_steps - 1):
        later = {k: v.clone() for k, v in batch.items()}
        frames = slice((t + 1) * tf, None)
        later[key][:, frames] = (later[key][:, frames] + 1) % 16 if kind == "tokens" else torch.rand_like(later[key][:, frames])
        out = model.predict_next(later)
        rows = slice(t * s, (t + 1) * s)  # the tokens of step t predict step t + 1
        assert torch.allclose(out[:, rows], base_out[:, rows], atol=1e-6), f"step {t} sees the future"
        now = {k: v.clone() for k, v in batch.items()}
        now[key][:, t * tf] = (now[key][:, t * tf] + 1) % 16 if kind == "tokens" else torch.rand_like(now[key][:, t * tf])
        assert not torch.allclose(model.predict_next(now)[:, rows], base_out[:, rows])


def test_pixel_pretraining_encoder_sees_visible_tubelets_only():
    model = _model()
    batch = _pixel_batch()
    v = model.mask(batch, "val", 0)
    n = model.cfg.grid[0] * model.cfg.grid[1] * model.cfg.grid[2]
    assert v.keep_idx.shape[1] == n - int(v.loss_mask[0].sum())


def test_stage_two_loads_stage_one_and_names_mismatches(tmp_path):
    import lightning as L

    stage1 = _model()
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(stage1)
    path = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(path)
    stage2 = _model(**{"model.stage": "autoregressive", "model.init_from": str(path)})
    loaded = stage2.load_pretrained(str(path))
    assert any(k.startswith("model.blocks.") for k in loaded)
    assert torch.equal(stage2.model.blocks[0].attn.qkv.weight, stage1.model.blocks[0].attn.qkv.weight)
    wider = _model(**{"model.stage": "autoregressive", "model.width": 64, "model.heads": 2})
    with pytest.raises(ConfigError) as info:
        wider.load_pretrained(str(path))
    msg = str(info.value)
    assert "model.init_from" in msg and "(32," in msg and "\n" not in msg
    with pytest.raises(ConfigError):
        wider.load_pretrained(str(tmp_path / "missing.ckpt"))


def test_layer_removal_equals_deleting_blocks():
    from lit_modules.ablation import AblationOptions, layer_removal

    model = _model(**{"model.depth": 3})
    batch = _pixel_batch()
    table = layer_removal(model, [batch], AblationOptions(drop_one=False))
    fast = table[(table.variant == "truncate") & (table.metric == "recon_loss")].set_index("removed")["value"]
    full = list(model.model.blocks)
    for k in range(4):
        model.model.blocks = torch.nn.ModuleList(full[: 3 - k])
        with torch.no_grad():
            loss, _ = model._shared_step(batch, "val")
        assert float(loss) == pytest.approx(float(fast[k]), abs=1e-5)


def test_bad_shapes_are_config_errors():
    with pytest.raises(ConfigError) as info:
        _cfg(**{"model.frames": 5})
    assert "model.frames" in str(info.value) and "tubelet_frames" in str(info.value)
    with pytest.raises(ConfigError) as info:
        _cfg(**{"model.image_size": 40})
    assert "model.image_size" in str(info.value)


def test_two_stage_switches_task_at_pretrain_steps(monkeypatch):
    from lit_modules.video import LitVideo

    model = _model(**{"model.stage": "two-stage", "model.pretrain_steps": 3}).train()
    batch = _pixel_batch()
    assert model.phase() == "pretrain"
    assert set(model._shared_step(batch, "train")[1]) == {"recon_loss"}
    monkeypatch.setattr(LitVideo, "global_step", property(lambda self: 3))  # as at step 3
    assert model.phase() == "autoregressive"
    assert set(model._shared_step(batch, "train")[1]) == {"next_frame_loss"}
    assert set(model._shared_step(batch, "val")[1]) == {"next_frame_loss", "recon_loss"}


def test_tubelets_roundtrip_and_frame_strips():
    from lit_modules.video import tubelets, untubelets

    x = torch.randn(2, 4, 3, 64, 64)
    assert torch.equal(untubelets(tubelets(x, 2, 16), 2, 16, (2, 4, 4)), x)
    for stage in ("pretrain", "autoregressive"):
        img = _model(**{"model.stage": stage}).frame_strip(_pixel_batch())
        rows = 3 if stage == "pretrain" else 2
        assert img.shape == (3, rows * 64, 4 * 64) and 0 <= float(img.min()) and float(img.max()) <= 1


def test_frame_causal_pattern_and_next_frame_loss_mask():
    from lit_modules.masking.attention import frame_causal
    from lit_modules.masking.video import next_frame_loss_mask

    m = frame_causal((3, 1, 2))  # 3 time steps of 2 tokens
    expected = torch.tensor([[j // 2 <= i // 2 for j in range(6)] for i in range(6)])
    assert torch.equal(m, expected)
    scored = next_frame_loss_mask(2, (3, 1, 2))
    assert scored.tolist() == [[True, True, True, True, False, False]] * 2
