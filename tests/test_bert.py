"""BERT: gathered MLM head equals the full head, padding is invisible, the evaluation
masks (drawn by the data pipeline's mask plan) are common to every trial, layer removal
matches deleting blocks."""

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
def item(tmp_path_factory, data_dir):
    """The first validation item of the tiny config: a TokenRows batch and its K
    evaluation masks, drawn by the validation loader."""
    from lit_modules.paths import Workspace
    from lit_modules.run import build_datamodule

    ws = Workspace.resolve(tmp_path_factory.mktemp("bert"), data_dir)
    return next(iter(build_datamodule(_cfg(), ws).val_dataloader()))


def _model(**changes):
    from lit_modules.run import build_model

    return build_model(_cfg(**changes)).eval()


def _plan(**changes):
    """The mask plan of the tiny config with ``changes`` (validation every 2 steps)."""
    from lit_modules.bert import LitBERT

    return LitBERT.mask_plan(_cfg(**changes), steps_per_epoch=2)


def test_batch_layout(item):
    from lit_modules.masking.batches import TokenRows

    rows = item.batch
    assert isinstance(rows, TokenRows)
    t, valid, eligible = rows.tokens, rows.valid, rows.eligible
    assert (t[:, 0] == 2).all()  # [CLS]
    assert (eligible <= valid).all() and not eligible[t < FIRST_PIECE].any()
    assert (t[~valid] == PAD).all()
    assert (rows.mask_token_id, rows.random_low, rows.vocab_size) == (4, FIRST_PIECE, 512)
    assert list(item.views) == [""] and len(item.common) == 2  # mlm-random at 15%: its own task is the common one


def test_gathered_head_equals_full_head(item):
    model = _model()
    masked = item.common[0]
    with torch.no_grad():
        h = model.model.encode(masked.inputs, item.batch.valid)
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


def test_evaluation_masks_are_common_to_every_trial(item):
    """Models trained at different ratios and with different strategies are scored on
    the same masks (mlm-random at the evaluation ratio, 15%); one trained on another
    task is also scored on its own (at the evaluation ratio)."""
    rows = item.batch
    a = _plan(**{"masking.mask_ratio": 0.15}).eval_item(rows)
    b = _plan(**{"masking.mask_ratio": 0.4}).eval_item(rows)
    c = _plan(**{"masking.name": "mlm-span", "masking.mask_ratio": 0.3}).eval_item(rows)
    for k in range(2):
        ma, mb, mc = a.common[k], b.common[k], c.common[k]
        assert torch.equal(ma.loss_mask, mc.loss_mask) and torch.equal(ma.inputs, mc.inputs)
        assert torch.equal(ma.loss_mask, mb.loss_mask) and torch.equal(ma.inputs, mb.inputs)
        assert torch.equal(ma.loss_mask, item.common[k].loss_mask)  # what the loader drew
    m0, m1 = a.common[0], a.common[1]
    assert not torch.equal(m0.loss_mask, m1.loss_mask)
    n = rows.eligible.sum(1).double()
    assert torch.equal(m0.loss_mask.sum(1).double(), torch.round(0.15 * n))
    # A model's own task: only where it differs from the common one (b's is mlm-random at 15%).
    assert set(a.views) == set(b.views) == {""} and set(c.views) == {"", "own"}
    own = c.views["own"][0]
    assert not torch.equal(own.loss_mask, m0.loss_mask)
    assert (own.loss_mask.sum(1).double() <= torch.round(0.15 * n)).all()  # spans within the evaluation budget


def test_strategies_are_scored_on_one_common_task(workspace):
    """Runs that differ only in their training strategy, with weights that cannot move
    (lr 1e-12), get the same val/mlm_loss: the evaluation task does not depend on what a
    model trained on. Each is also scored on its own task, which differs."""
    from lit_modules.masking.batches import TokenRows
    from lit_modules.model_configs import maskings_for
    from lit_modules.run import build_datamodule, build_model, build_trainer

    strategies = maskings_for(TokenRows)  # every registered masked-LM strategy
    assert len(strategies) >= 3
    logged = {}
    for strategy in strategies:
        cfg = _cfg(**{"masking.name": strategy, "optim.lr": 1e-12, "trainer.max_steps": 2,
                      "trainer.val_every": 2})
        trainer = build_trainer(cfg, None, [], None)
        trainer.fit(build_model(cfg), datamodule=build_datamodule(cfg, workspace))
        logged[strategy] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    common = {s: m["val/mlm_loss"] for s, m in logged.items()}
    assert len(set(common.values())) == 1, common  # identical, not merely close
    common_task = TINY["bert"]["model"].get("eval_masking", "mlm-random")
    assert "val/own_mlm_loss" not in logged[common_task]  # its own task is the common one
    for strategy in strategies:
        if strategy != common_task:
            assert abs(logged[strategy]["val/own_mlm_loss"] - common[strategy]) > 1e-4, strategy


def test_evaluation_task_is_configurable(item):
    from lit_modules.masking.mlm import MLMSpan

    plan = _plan(**{"model.eval_masking": "mlm-span", "model.eval_mask_ratio": 0.3})
    assert plan.evaluation[0] == ("", MLMSpan(mask_ratio=0.3)) and plan.eval_masks == 2
    span = plan.eval_item(item.batch).common[0]
    default = item.common[0]
    assert not torch.equal(span.loss_mask, default.loss_mask)
    from lit_modules.config_errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.eval_masking = 'causal-lm': allowed: (mlm-[a-z-]+(, )?)+$"):
        _cfg(**{"model.eval_masking": "causal-lm"})


def test_training_masks_follow_the_epoch(item):
    """An epoch is one validation interval (2 steps here): static masks repeat every 2
    epochs, dynamic masks change every epoch, and every step of an epoch shares one."""
    static = [_plan(**{"masking.static_masks": 2}).train_context(step).mask_index for step in range(8)]
    assert static == [0, 0, 1, 1, 0, 0, 1, 1]
    dynamic = [_plan().train_context(step).mask_index for step in range(8)]
    assert dynamic == [0, 0, 1, 1, 2, 2, 3, 3]
    plan = _plan(**{"masking.static_masks": 2, "trainer.max_steps": 8})
    masks = [plan.train_item(item.batch, step).masked.loss_mask for step in (0, 2, 4)]
    assert torch.equal(masks[0], masks[2]) and not torch.equal(masks[0], masks[1])


def test_layer_removal_equals_deleting_blocks(item):
    from lit_modules.ablation import AblationOptions, layer_removal

    model = _model(**{"model.depth": 3})
    for block in model.blocks:  # make each block matter
        for p in block.parameters():
            p.data.mul_(8.0)
    table = layer_removal(model, [item], AblationOptions(drop_one=False, similarity=False))
    fast = table[(table.variant == "truncate") & (table.metric == "mlm_loss")].set_index("removed")["value"]
    full = list(model.model.blocks)
    for k in range(4):
        model.model.blocks = torch.nn.ModuleList(full[: 3 - k])
        with torch.no_grad():
            ce = n = 0.0
            assert len(item.common) == model.run_config.model.eval_masks
            for view in item.common:
                c, _, m = model._loss(view, item.batch.valid)
                ce, n = ce + c, n + m
        assert float(ce / n) == pytest.approx(float(fast[k]), abs=1e-5)
    model.model.blocks = torch.nn.ModuleList(full)
    assert fast.nunique() == 4


def test_checkpoint_roundtrip(tmp_path, item):
    import lightning as L

    from lit_modules.bert import LitBERT

    model = _model(**{"masking.name": "mlm-span"})
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    loaded = LitBERT.load_from_checkpoint(tmp_path / "b.ckpt").eval()
    with torch.no_grad():
        assert torch.equal(loaded._shared_step(item, "val")[0], model._shared_step(item, "val")[0])
