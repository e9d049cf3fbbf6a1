"""Video families (every registered model that consumes clips: VideoMAE on pixel clips,
MaskViT on token clips): masked pretraining and frame-causal fine-tuning without
leakage, stage-1 -> stage-2 checkpoint loading, the two-stage switch, layer removal."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_modules.config_errors import ConfigError
from lit_modules.masking.batches import Clips
from lit_modules.registry import MODELS

from .conftest import TINY, TOKEN_VOCAB

# Every registered family that consumes clips (derived from the registry).
VIDEO = [n for n in MODELS.names() if MODELS.config(n).consumes is Clips]


def test_the_video_families():
    assert {"video-mae", "maskvit"} <= set(VIDEO)
    assert {MODELS.config(n).clip_kind for n in VIDEO} == {"pixels", "tokens"}


def _cfg(name="video-mae", **changes):
    from lit_modules.config import load_run_config

    return load_run_config(copy.deepcopy(TINY[name]), list(changes.items()))


def _model(name="video-mae", **changes):
    from lit_modules.run import build_model

    return build_model(_cfg(name, **changes)).eval()


def _plan(model):
    """The model's mask plan (a validation every 2 steps, as in its tiny config)."""
    return type(model).mask_plan(model.run_config, steps_per_epoch=2)


def _clips(model, b=2, seed=0) -> Clips:
    """A batch of ``b`` random clips of the model's kind, on its tubelet grid: pixels in
    [-1, 1] (B, F, 3, H, W) or token ids (B, F, h, w)."""
    from lit_modules.masking.rng import content_key

    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    if cfg.clip_kind == "pixels":
        x = torch.rand(b, cfg.frames, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    else:
        x = torch.randint(0, TOKEN_VOCAB, (b, cfg.frames, cfg.image_size, cfg.image_size), generator=g)
    return Clips(x, content_key(x), kind=cfg.clip_kind, grid=cfg.grid, index=torch.arange(b))


def _moved(x: torch.Tensor) -> torch.Tensor:
    """New content in place of ``x``: fresh noise (pixels) or every token id moved."""
    if x.is_floating_point():
        return torch.rand_like(x) * 2 - 1
    return (x + torch.randint(1, TOKEN_VOCAB, x.shape)) % TOKEN_VOCAB


def test_model_must_fit_the_clips_it_is_given(tiny_config, workspace):
    """A pixel family on token clips names the family that takes them; a MaskViT whose
    vocabulary is smaller than the clips' ids is refused before it could index past it."""
    from lit_modules.run import build_datamodule

    pixels_on_tokens = tiny_config("maskvit", {"model": TINY["video-mae"]["model"], "masking.name": "video-tube"})
    with pytest.raises(ConfigError, match=r"model.name = 'video-mae': takes pixels clips .* use model maskvit"):
        build_datamodule(pixels_on_tokens, workspace)
    small = tiny_config("maskvit", {"model.vocab_size": 8})
    with pytest.raises(ConfigError, match=r"model.vocab_size = 8: .* ids up to 15; set model.vocab_size >= 16"):
        build_datamodule(small, workspace)


@pytest.mark.parametrize("name", VIDEO)
@pytest.mark.parametrize("stage", ["pretrain", "autoregressive"])
def test_both_families_both_stages_train(name, stage):
    model = _model(name, **{"model.stage": stage}).train()
    item = _plan(model).train_item(_clips(model), 0)
    assert (item.masked is not None) == (stage == "pretrain")  # the autoregressive stage masks nothing
    loss, metrics = model._shared_step(item, "train")
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert set(metrics) == ({"recon_loss", "mask_ratio"} if stage == "pretrain" else {"next_frame_loss"})


@pytest.mark.parametrize("name", VIDEO)
def test_autoregressive_stage_has_no_leakage(name):
    """Predictions for time step t+1 (made at the tokens of step t) ignore step t+1 and
    later, and depend on step t."""
    model = _model(name, **{"model.stage": "autoregressive"})
    clips = _clips(model).clips
    t_steps, h, w = model.cfg.grid
    s, tf = h * w, model.cfg.tubelet_frames
    base_out = model.predict_next(clips)
    for t in range(t_steps - 1):
        later = clips.clone()
        frames = slice((t + 1) * tf, None)
        later[:, frames] = _moved(later[:, frames])
        out = model.predict_next(later)
        rows = slice(t * s, (t + 1) * s)  # the tokens of step t predict step t + 1
        assert torch.allclose(out[:, rows], base_out[:, rows], atol=1e-6), f"step {t} sees the future"
        now = clips.clone()
        now[:, t * tf] = _moved(now[:, t * tf])
        assert not torch.allclose(model.predict_next(now)[:, rows], base_out[:, rows])


def _encoder_output(model, v):
    """What the pretraining path hands to its decoder (pixel clips) or head (token
    clips): the normed encoder output, caught on its way in; and the predictions."""
    net = model.model
    into = net.decoder_embed if model.cfg.clip_kind == "pixels" else net.token_head
    caught = []
    handle = into.register_forward_pre_hook(lambda module, args: caught.append(args[0]))
    try:
        with torch.no_grad():
            pred = model.pretrain_out(v)
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
    clip[index] = _moved(clip[index])


@pytest.mark.parametrize("name", VIDEO)
def test_pretraining_encoder_sees_visible_tubelets_only(name):
    """Scribbling over every masked tubelet leaves the encoder output (and the
    predictions) unchanged; changing one visible tubelet of a clip changes that clip's
    encoder output, and no other clip's. Pixel clips: the encoder is given the visible
    tubelets only; token clips: masked ids are replaced by [MASK]."""
    from dataclasses import replace

    model = _model(name)
    v = _plan(model).eval_item(_clips(model, 3)).common[0]
    n = model.cfg.grid[0] * model.cfg.grid[1] * model.cfg.grid[2]
    masked = v.loss_mask
    assert (masked.sum(1) > 0).all() and (masked.sum(1) < n).all()
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


@pytest.mark.parametrize("name", VIDEO)
def test_stage_two_loads_stage_one_and_names_mismatches(name, tmp_path):
    import lightning as L

    stage1 = _model(name)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(stage1)
    path = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(path)
    stage2 = _model(name, **{"model.stage": "autoregressive", "model.init_from": str(path)})
    loaded = stage2.load_pretrained(str(path))
    assert any(k.startswith("model.blocks.") for k in loaded) and any(k.startswith("model.embed_in") for k in loaded)
    assert torch.equal(stage2.model.blocks[0].attn.qkv.weight, stage1.model.blocks[0].attn.qkv.weight)
    assert torch.equal(stage2.model.embed_in.weight, stage1.model.embed_in.weight)
    wider = _model(name, **{"model.stage": "autoregressive", "model.width": 64, "model.heads": 2})
    with pytest.raises(ConfigError) as info:
        wider.load_pretrained(str(path))
    msg = str(info.value)
    assert "model.init_from" in msg and "(32," in msg and "\n" not in msg
    with pytest.raises(ConfigError):
        wider.load_pretrained(str(tmp_path / "missing.ckpt"))
    acting = _model(name, **{"model.actions": 5})  # action-conditioned: stage 2 gets the action embeddings
    trainer.strategy.connect(acting)
    trainer.save_checkpoint(tmp_path / "acting.ckpt")
    stage2 = _model(name, **{"model.stage": "autoregressive", "model.actions": 5})
    assert "model.action_emb.weight" in stage2.load_pretrained(str(tmp_path / "acting.ckpt"))
    assert torch.equal(stage2.model.action_emb.weight, acting.model.action_emb.weight)


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


@pytest.mark.parametrize("name", VIDEO)
@pytest.mark.parametrize("stage, metric", [("pretrain", "recon_loss"), ("autoregressive", "next_frame_loss")])
def test_layer_removal_equals_deleting_blocks(name, stage, metric):
    from lit_modules.ablation import AblationOptions, layer_removal

    model = _model(name, **{"model.depth": 3, "model.stage": stage})
    _off_init(model)
    item = _plan(model).eval_item(_clips(model))
    table = layer_removal(model, [item], AblationOptions(drop_one=False))
    fast = table[(table.variant == "truncate") & (table.metric == metric)].set_index("removed")["value"]
    full = list(model.model.blocks)
    for k in range(4):
        model.model.blocks = torch.nn.ModuleList(full[: 3 - k])
        with torch.no_grad():
            loss, _ = model._shared_step(item, "val")
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
    with pytest.raises(ConfigError) as info:
        _cfg("maskvit", **{"model.patch_size": 2, "model.image_size": 4})
    assert str(info.value).startswith("model.patch_size = 2") and "\n" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        _cfg("maskvit", **{"model.vocab_size": 0})
    assert "model.vocab_size" in str(info.value)


@pytest.mark.parametrize("name", VIDEO)
def test_two_stage_switches_task_at_pretrain_steps(name, monkeypatch):
    """Steps 0..pretrain_steps-1 get masks from the data pipeline and train on them; the
    later steps get none and predict next frames; validation scores both tasks."""
    model = _model(name, **{"model.stage": "two-stage", "model.pretrain_steps": 3}).train()
    plan = _plan(model)
    assert plan.masked_steps == (0, 2)
    batch = _clips(model)
    assert [plan.train_item(batch, step).masked is None for step in range(4)] == [False, False, False, True]
    assert model.phase() == "pretrain"
    assert set(model._shared_step(plan.train_item(batch, 0), "train")[1]) == {"recon_loss", "mask_ratio"}
    monkeypatch.setattr(type(model), "global_step", property(lambda self: 3))  # as at step 3
    assert model.phase() == "autoregressive"
    metrics = model._shared_step(plan.train_item(batch, 3), "train")[1]
    assert set(metrics) == {"next_frame_loss", "mask_ratio"} and float(metrics["mask_ratio"][0]) == 0.0
    assert set(model._shared_step(plan.eval_item(batch), "val")[1]) == {"next_frame_loss", "recon_loss"}


def test_autoregressive_from_scratch_masks_nothing():
    """``pretrain_steps: 0`` (the baseline of a two-stage study) and the autoregressive
    stage draw no masks at all, in training or validation."""
    for changes in ({"model.stage": "two-stage", "model.pretrain_steps": 0}, {"model.stage": "autoregressive"}):
        model = _model(**changes)
        plan = _plan(model)
        assert plan.train is None and plan.evaluation == ()
        assert _plan(model).train_item(_clips(model), 0).masked is None
        assert _plan(model).eval_item(_clips(model)).views == {}


def test_tubelets_roundtrip_and_frame_strips():
    from lit_modules.patchify import tubelets, untubelets

    x = torch.randn(2, 4, 3, 64, 64)
    assert torch.equal(untubelets(tubelets(x, 2, 16), 2, 16, (2, 4, 4)), x)
    for stage in ("pretrain", "autoregressive"):
        model = _model(**{"model.stage": stage})
        img = model.frame_strip(_plan(model).eval_item(_clips(model)))
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
