"""BERT: gathered MLM head equals the full head, padding is invisible, the evaluation
masks are common to every trial, layer removal matches deleting blocks."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_modules.data.mlm import FIRST_PIECE, PAD

from .conftest import TINY


def _cfg(**changes):
    from lit_modules.config import load_run_config

    return load_run_config(copy.deepcopy(TINY["bert"]), list(changes.items()))


@pytest.fixture(scope="module")
def batch(tmp_path_factory, data_dir):
    from lit_modules.paths import Workspace
    from lit_modules.run import build_datamodule

    ws = Workspace.resolve(tmp_path_factory.mktemp("bert"), data_dir)
    return next(iter(build_datamodule(_cfg(), ws).val_dataloader()))


def _model(**changes):
    from lit_modules.run import build_model

    return build_model(_cfg(**changes)).eval()


def test_batch_layout(batch):
    t, valid, eligible = batch["tokens"], batch["valid"], batch["eligible"]
    assert (t[:, 0] == 2).all()  # [CLS]
    assert (eligible <= valid).all() and not eligible[t < FIRST_PIECE].any()
    assert (t[~valid] == PAD).all()


def test_gathered_head_equals_full_head(batch):
    model = _model()
    masked = model.mask(batch, "val", 0)
    with torch.no_grad():
        h = model.model.encode(masked.inputs, batch["valid"])
        full = model.model.head(h)  # (B, T, V): what the common implementation computes
        gathered = model.model.masked_logits(h, masked.loss_mask)  # (M, V)
    assert torch.allclose(full[masked.loss_mask], gathered, atol=1e-5)


def test_padding_is_invisible_and_attention_is_bidirectional():
    model = _model()
    tokens = torch.randint(FIRST_PIECE, 512, (2, 12))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[:, 9:] = False
    with torch.no_grad():
        base = model.model.encode(tokens, valid)
        changed = tokens.clone()
        changed[:, 10] = (changed[:, 10] + 7) % 512  # a padded position
        assert torch.allclose(model.model.encode(changed, valid)[:, :9], base[:, :9], atol=1e-6)
        later = tokens.clone()
        later[:, 8] = (later[:, 8] + 7) % 512  # the last valid token: seen by position 0
        assert not torch.allclose(model.model.encode(later, valid)[:, 0], base[:, 0])


def test_evaluation_masks_are_common_to_every_trial(batch):
    """Models trained at different ratios and with different strategies are scored on
    the same masks (mlm-random at the evaluation ratio, 15%)."""
    a, b = _model(**{"masking.mask_ratio": 0.15}), _model(**{"masking.mask_ratio": 0.4})
    c = _model(**{"masking.name": "mlm-span", "masking.mask_ratio": 0.3})
    for k in range(2):
        ma, mb, mc = a.mask(batch, "val", k), b.mask(batch, "val", k), c.mask(batch, "val", k)
        assert torch.equal(ma.loss_mask, mc.loss_mask) and torch.equal(ma.inputs, mc.inputs)
        assert torch.equal(ma.loss_mask, mb.loss_mask) and torch.equal(ma.inputs, mb.inputs)
    m0, m1 = a.mask(batch, "val", 0), a.mask(batch, "val", 1)
    assert not torch.equal(m0.loss_mask, m1.loss_mask)
    n = batch["eligible"].sum(1).double()
    assert torch.equal(m0.loss_mask.sum(1).double(), torch.round(0.15 * n))


def test_strategies_are_scored_on_one_common_task(workspace):
    """Runs that differ only in their training strategy, with weights that cannot move
    (lr 1e-12), get the same val/mlm_loss: the evaluation task does not depend on what a
    model trained on. Each is also scored on its own task, which differs."""
    from lit_modules.run import build_datamodule, build_model, build_trainer

    logged = {}
    for strategy in ("mlm-random", "mlm-whole-word", "mlm-span"):
        cfg = _cfg(**{"masking.name": strategy, "optim.lr": 1e-12, "trainer.max_steps": 2,
                      "trainer.val_every": 2})
        trainer = build_trainer(cfg, None, [], None)
        trainer.fit(build_model(cfg), datamodule=build_datamodule(cfg, workspace))
        logged[strategy] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    common = {s: m["val/mlm_loss"] for s, m in logged.items()}
    assert len(set(common.values())) == 1, common  # identical, not merely close
    assert "val/own_mlm_loss" not in logged["mlm-random"]  # its own task is the common one
    for strategy in ("mlm-whole-word", "mlm-span"):
        assert abs(logged[strategy]["val/own_mlm_loss"] - common[strategy]) > 1e-4


def test_evaluation_task_is_configurable(batch):
    model = _model(**{"model.eval_masking": "mlm-span", "model.eval_mask_ratio": 0.3})
    assert model.eval_masking.name == "mlm-span" and model.eval_masking.mask_ratio == 0.3
    span = model.mask(batch, "val", 0)
    default = _model().mask(batch, "val", 0)
    assert not torch.equal(span.loss_mask, default.loss_mask)
    from lit_modules.config_errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.eval_masking = 'causal-lm': allowed: mlm-random"):
        _cfg(**{"model.eval_masking": "causal-lm"})


def test_training_masks_follow_the_epoch(batch):
    model = _model(**{"masking.static_masks": 2})
    m = [model.masking.epoch_mask_index(e) for e in range(4)]
    assert m[0] == m[2] and m[1] == m[3] and m[0] != m[1]


def test_layer_removal_equals_deleting_blocks(batch):
    from lit_modules.ablation import AblationOptions, layer_removal

    model = _model(**{"model.depth": 3})
    for block in model.blocks:  # make each block matter
        for p in block.parameters():
            p.data.mul_(8.0)
    table = layer_removal(model, [batch], AblationOptions(drop_one=False, similarity=False))
    fast = table[(table.variant == "truncate") & (table.metric == "mlm_loss")].set_index("removed")["value"]
    full = list(model.model.blocks)
    for k in range(4):
        model.model.blocks = torch.nn.ModuleList(full[: 3 - k])
        with torch.no_grad():
            ce = n = 0.0
            for j in range(model.run_config.model.eval_masks):
                c, _, m = model._loss(model.mask(batch, "val", j), batch["valid"])
                ce, n = ce + c, n + m
        assert float(ce / n) == pytest.approx(float(fast[k]), abs=1e-5)
    model.model.blocks = torch.nn.ModuleList(full)
    assert fast.nunique() == 4


def test_checkpoint_roundtrip(tmp_path, batch):
    import lightning as L

    from lit_modules.bert import LitBERT

    model = _model(**{"masking.name": "mlm-span"})
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    loaded = LitBERT.load_from_checkpoint(tmp_path / "b.ckpt").eval()
    with torch.no_grad():
        assert torch.equal(loaded._shared_step(batch, "val")[0], model._shared_step(batch, "val")[0])
