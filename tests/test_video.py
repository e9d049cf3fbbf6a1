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
    assert set(metrics) == ({"recon_loss", "mask_ratio"} if stage == "pretrain" else {"next_frame_loss"})


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


def _encoder_output(model, v):
    """What the pretraining path hands to its decoder (pixel clips) or head (token
    clips): the normed encoder output, caught on its way in; and the predictions."""
    net = model.model
    into = net.decoder_embed if model.cfg.clip_kind == "pixels" else net.head
    caught = []
    handle = into.register_forward_pre_hook(lambda module, args: caught.append(args[0]))
    try:
        with torch.no_grad():
            pred = model._pretrain_out(v)
    finally:
        handle.remove()
    assert len(caught) == 1
    return caught[0], pred


def _tubelet(model, b: int, i: int) -> tuple:
    """Index of tubelet ``i`` (in (t, y, x) order) of clip ``b``, in a (B, F, [C,] H, W) clip."""
    _, h, w = model.cfg.grid
    tf, p = model.cfg.tubelet_frames, model.cfg.patch_size
    t, rest = divmod(i, h * w)
    y, x = divmod(rest, w)
    return b, slice(t * tf, (t + 1) * tf), Ellipsis, slice(y * p, (y + 1) * p), slice(x * p, (x + 1) * p)


def _scribble(clip: torch.Tensor, index: tuple) -> None:
    """New content at ``index``: fresh noise (pixels) or every token id moved (tokens)."""
    if clip.is_floating_point():
        clip[index] = torch.rand_like(clip[index]) * 2 - 1
    else:
        clip[index] = (clip[index] + torch.randint(1, 16, clip[index].shape)) % 16


@pytest.mark.parametrize("kind", ["pixels", "tokens"])
def test_pretraining_encoder_sees_visible_tubelets_only(kind):
    """Scribbling over every masked tubelet leaves the encoder output (and the
    predictions) unchanged; changing one visible tubelet of a clip changes that clip's
    encoder output. Pixel clips: the encoder is given the visible tubelets only; token
    clips: masked ids are replaced by [MASK]."""
    from dataclasses import replace

    base_cfg = TINY["video"] if kind == "pixels" else TOKENS
    model = _model(base_cfg)
    batch = _pixel_batch(3) if kind == "pixels" else _token_batch(3)
    v = model.mask(batch, "val", 0)
    n = model.cfg.grid[0] * model.cfg.grid[1] * model.cfg.grid[2]
    masked = v.loss_mask
    assert (masked.sum(1) > 0).all() and (masked.sum(1) < n).all()
    if kind == "pixels":
        assert v.keep_idx.shape[1] == n - int(masked[0].sum())
    latent, pred = _encoder_output(model, v)

    hidden = v.inputs.clone()
    for b in range(hidden.shape[0]):
        for i in masked[b].nonzero().flatten().tolist():
            _scribble(hidden, _tubelet(model, b, i))
    assert not torch.equal(hidden, v.inputs)
    latent_hidden, pred_hidden = _encoder_output(model, replace(v, inputs=hidden))
    assert torch.allclose(latent_hidden, latent, atol=1e-6), "the encoder sees a masked tubelet"
    assert torch.allclose(pred_hidden, pred, atol=1e-6), "a prediction depends on a masked tubelet"

    for b in range(hidden.shape[0]):  # every clip of the batch, each through one visible tubelet
        seen = v.inputs.clone()
        first_visible = int((~masked[b]).nonzero()[0])
        _scribble(seen, _tubelet(model, b, first_visible))
        latent_seen, _ = _encoder_output(model, replace(v, inputs=seen))
        assert not torch.allclose(latent_seen[b], latent[b], atol=1e-4), f"clip {b} ignores a visible tubelet"
        others = [r for r in range(hidden.shape[0]) if r != b]
        assert torch.allclose(latent_seen[others], latent[others], atol=1e-6)


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


def _off_init(model) -> None:
    """Weights well off their init. At init every residual branch is small and the
    decoder's output near zero, so removing a block barely moves the loss and an
    off-by-one in the fast path would hide below any tolerance."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p[0].numel() ** 0.5))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_layer_removal_equals_deleting_blocks():
    from lit_modules.ablation import AblationOptions, layer_removal

    model = _model(**{"model.depth": 3})
    _off_init(model)
    batch = _pixel_batch()
    table = layer_removal(model, [batch], AblationOptions(drop_one=False))
    fast = table[(table.variant == "truncate") & (table.metric == "recon_loss")].set_index("removed")["value"]
    full = list(model.model.blocks)
    for k in range(4):
        model.model.blocks = torch.nn.ModuleList(full[: 3 - k])
        with torch.no_grad():
            loss, _ = model._shared_step(batch, "val")
        assert float(loss) == pytest.approx(float(fast[k]), rel=1e-5, abs=1e-6), k
    # The test has teeth: every truncation depth gives a clearly different loss.
    values = sorted(float(fast[k]) for k in range(4))
    assert min(b - a for a, b in zip(values, values[1:])) > 1e-3, values


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
    assert set(model._shared_step(batch, "train")[1]) == {"recon_loss", "mask_ratio"}
    monkeypatch.setattr(LitVideo, "global_step", property(lambda self: 3))  # as at step 3
    assert model.phase() == "autoregressive"
    metrics = model._shared_step(batch, "train")[1]
    assert set(metrics) == {"next_frame_loss", "mask_ratio"} and float(metrics["mask_ratio"][0]) == 0.0
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
