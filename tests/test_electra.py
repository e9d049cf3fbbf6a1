"""ELECTRA: the generator's draws are counter-based and deterministic, the discriminator's
labels are exactly ``input != original``, gradients stop at the draw, the embeddings are
shared as configured, a short fit logs the RTD metrics, layer removal matches deleting
discriminator blocks, and the parts HF's post-LN ELECTRA has in common with our pre-LN
one give the same numbers."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lit_modules.config_errors import ConfigError
from lit_modules.data.mlm import PAD
from lit_modules.electra import draw_uniforms, roc_auc, sample_tokens
from lit_modules.masking.indices import eval_mask_indices
from lit_modules.masking.rng import content_key

from .conftest import TINY


def _cfg(**changes):
    from lit_modules.config import load_run_config

    return load_run_config(copy.deepcopy(TINY["electra"]), list(changes.items()))


def _model(**changes):
    from lit_modules.run import build_model

    return build_model(_cfg(**changes)).eval()


@pytest.fixture(scope="module")
def item(tmp_path_factory, data_dir):
    """The first validation item of the tiny config (TokenRows and its K common masks)."""
    from lit_modules.paths import Workspace
    from lit_modules.run import build_datamodule

    ws = Workspace.resolve(tmp_path_factory.mktemp("electra"), data_dir)
    return next(iter(build_datamodule(_cfg(), ws).val_dataloader()))


def _replaced(model, item, draw: int, view: int = 0) -> torch.Tensor:
    valid = item.batch.valid
    with torch.no_grad():
        return model._generate(item.common[view], valid, content_key(item.batch.tokens, valid), draw)[3]


# ---------------------------------------------------------------- the draw
def test_inverse_cdf_draws_the_softmax_exactly():
    """On an even grid of uniforms each token is drawn in proportion to its probability;
    a token of zero probability never is."""
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3], [0.0, 0.0, 1.0, 0.0]])
    logits = probs.log()  # -inf at the zero-probability tokens
    n = 1000
    u = torch.arange(n, dtype=torch.float32) / n
    for row in range(2):
        ids = sample_tokens(logits[row].expand(n, 4), u)
        counts = torch.bincount(ids, minlength=4).float() / n
        torch.testing.assert_close(counts, probs[row], atol=1.5 / n, rtol=0)


def test_draws_are_keyed_by_seed_sample_and_index():
    """Position j of a row draws from (seed, the row's content key, draw index, j) alone:
    the same in any batch position and padding width, different across steps, evaluation
    indices and seeds."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(6, 512, (4, 20), generator=g)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    key = content_key(tokens, valid)
    u = draw_uniforms(0, key, 7, 20)
    perm = torch.tensor([2, 0, 3, 1])
    padded = torch.cat([tokens[perm], torch.full((4, 5), PAD)], 1)
    pkey = content_key(padded, torch.cat([valid, torch.zeros(4, 5, dtype=torch.bool)], 1))
    assert torch.equal(draw_uniforms(0, pkey, 7, 25)[:, :20], u[perm])
    assert torch.equal(draw_uniforms(0, key, 7, 20), u)
    for other in (draw_uniforms(0, key, 8, 20), draw_uniforms(1, key, 7, 20),
                  draw_uniforms(0, key, eval_mask_indices(1)[0], 20)):
        assert (other != u).float().mean() > 0.99


def test_replacements_deterministic_per_step_and_evaluation_mask(item):
    model = _model()
    masked = item.common[0].loss_mask
    a = _replaced(model, item, 3)
    assert torch.equal(a, _replaced(model, item, 3))  # same step, same draw
    assert torch.equal(a[~masked], item.batch.tokens[~masked])  # only masked positions change
    b = _replaced(model, item, 4)
    assert (a[masked] != b[masked]).float().mean() > 0.5  # the next step draws anew
    # Validation: the draw index is the evaluation mask's, whatever the training step.
    k = eval_mask_indices(2)
    with torch.no_grad():
        _, m1 = model._shared_step(item, "val")
        _, m2 = model._shared_step(item, "val")
    assert {n: float(v) for n, (v, _) in m1.items()} == {n: float(v) for n, (v, _) in m2.items()}
    assert not torch.equal(_replaced(model, item, k[0]), _replaced(model, item, k[1]))


# ---------------------------------------------------------------- labels and gradients
def test_labels_are_input_not_equal_original(item):
    """With a generator that always draws token X, a masked position whose original is X
    is labelled original; every other masked position replaced; nothing else replaced."""
    model = _model()
    rows, view = item.batch, item.common[0]
    x = int(view.targets[view.loss_mask].mode().values)  # the most frequent masked token
    with torch.no_grad():
        model.generator.head_bias.zero_()
        model.generator.head_bias[x] = 1e4  # every draw is x
        inputs = _replaced(model, item, 0)
        h = model.model.encode(inputs, rows.valid)
        _, _, n, n_replaced, logits, labels = model._rtd(h, inputs, rows.tokens, rows.valid)
    assert (inputs[view.loss_mask] == x).all()
    assert torch.equal(labels, (inputs != rows.tokens)[rows.valid])
    kept = view.loss_mask & (rows.tokens == x)
    assert kept.any() and not (inputs != rows.tokens)[kept].any()  # drawn = original: original
    assert int(n_replaced) == int((view.loss_mask & (rows.tokens != x)).sum())
    assert int(n) == int(rows.valid.sum()) == logits.numel()


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}


def _nonzero(g) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


def test_gradients_stop_at_the_draw(item):
    """RTD alone reaches no parameter the generator owns (only the shared embeddings);
    MLM alone reaches no parameter the discriminator owns (and the shared embeddings)."""
    model = _model().train()
    valid = item.batch.valid
    key = content_key(item.batch.tokens, valid)
    shared = {"model.embeddings.tok_emb.weight", "model.embeddings.pos_emb.weight"}
    for part in ("rtd", "mlm"):
        model.zero_grad(set_to_none=True)
        ce, _, m, inputs = model._generate(item.common[0], valid, key, 0)
        assert not inputs.requires_grad
        bce, _, n, _, _, _ = model._rtd(model.model.encode(inputs, valid), inputs, item.batch.tokens, valid)
        (bce / n if part == "rtd" else ce / m).backward()
        grads = _grads(model)
        for name in shared:
            assert _nonzero(grads[name]), (part, name)
        own = "generator." if part == "rtd" else "model."
        for name, g in grads.items():
            if name.startswith(own) and name not in shared and not name.startswith("generator.embeddings."):
                assert not _nonzero(g), (part, name)
        other = "model.blocks.0.attn.qkv.weight" if part == "rtd" else "generator.blocks.0.attn.qkv.weight"
        assert _nonzero(grads[other]), (part, other)


# ---------------------------------------------------------------- sharing and config
def _ptrs(module) -> set[int]:
    return {p.data_ptr() for p in module.parameters()}


def test_embeddings_are_shared_as_configured():
    model = _model()
    g, d = model.generator, model.model
    assert g.embeddings is d.embeddings
    assert g.embeddings.tok_emb.weight is d.embeddings.tok_emb.weight
    assert _ptrs(g) & _ptrs(d) == {d.embeddings.tok_emb.weight.data_ptr(), d.embeddings.pos_emb.weight.data_ptr()}
    assert g.embeddings_project.in_features == 32 and g.embeddings_project.out_features == 16
    assert g.head_dense.out_features == 32  # back to the shared width, for the tied output
    # The parameters are counted (and optimized) once.
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(p.numel() for p in d.parameters()) + sum(
        p.numel() for n, p in g.named_parameters() if not n.startswith("embeddings."))
    assert _model(**{"model.generator_size": 1.0}).generator.embeddings_project is None

    apart = _model(**{"model.share_embeddings": False})
    g, d = apart.generator, apart.model
    assert g.embeddings is not d.embeddings and not _ptrs(g) & _ptrs(d)
    assert g.embeddings.tok_emb.weight.shape == (512, 16) and g.embeddings_project is None
    assert g.head_dense.out_features == 16  # tied to its own embedding


def test_shared_embeddings_survive_a_checkpoint(tmp_path, item):
    import lightning as L

    from lit_modules.electra import LitElectra

    model = _model()
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "e.ckpt")
    loaded = LitElectra.load_from_checkpoint(tmp_path / "e.ckpt").eval()
    assert loaded.generator.embeddings.tok_emb.weight is loaded.model.embeddings.tok_emb.weight
    with torch.no_grad():
        assert torch.equal(loaded._shared_step(item, "val")[0], model._shared_step(item, "val")[0])


def test_config_derives_the_generator_and_rejects_bad_values():
    from lit_modules.model_configs import ElectraConfig

    assert (ElectraConfig(width=128, heads=4).generator_width, ElectraConfig(width=128, heads=4).generator_heads) \
        == (32, 1)
    big = ElectraConfig(width=768, heads=12, depth=12)
    assert (big.generator_width, big.generator_heads, big.generator_layers) == (192, 3, 12)
    odd = ElectraConfig(width=64, heads=8, generator_size=0.4)  # width 26: 3 heads would not divide it
    assert (odd.generator_width, odd.generator_heads) == (26, 2)
    assert ElectraConfig(generator_depth=1).generator_layers == 1
    for field, value in (("generator_size", 0.0), ("generator_size", 1.5), ("generator_size", 0.01),
                         ("generator_depth", -1), ("rtd_weight", -1.0), ("rtd_weight", float("inf"))):
        with pytest.raises(ConfigError, match=rf"^{field} = ") as e:
            ElectraConfig(width=32, **{field: value})
        assert "\n" not in str(e.value)


def test_validation_is_scored_on_the_common_masks_of_bert():
    """val/mlm_loss of the generator is BERT's common task: the same evaluation plan."""
    from lit_modules.config import load_run_config
    from lit_modules.registry import MODELS

    bert_cfg = load_run_config(copy.deepcopy(TINY["bert"]), [])
    electra = MODELS.get("electra").mask_plan(_cfg(), steps_per_epoch=2)
    bert = MODELS.get("bert").mask_plan(bert_cfg, steps_per_epoch=2)
    assert electra.evaluation == bert.evaluation and electra.eval_masks == bert.eval_masks


def test_transfer_rows_leave_room_for_cls_and_sep():
    from lit_modules.transfer.features import text_budget

    assert text_budget(_cfg(), 64) == TINY["electra"]["model"]["block_size"] - 2


# ---------------------------------------------------------------- metrics and a real fit
def test_roc_auc_is_the_pairwise_probability():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (300,), generator=g).float()  # many ties
    labels = torch.rand(300, generator=g) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean()
    assert math.isclose(float(roc_auc(scores, labels)), float(pairwise), abs_tol=1e-12)
    assert float(roc_auc(torch.tensor([0.1, 0.9, 0.4]), torch.tensor([False, True, False]))) == 1.0
    assert math.isnan(float(roc_auc(scores, torch.zeros(300, dtype=torch.bool))))


def test_short_fit_logs_the_rtd_metrics(workspace):
    from lit_modules.run import build_datamodule, build_model, build_trainer

    cfg = _cfg(**{"trainer.max_steps": 4, "trainer.val_every": 2})
    trainer = build_trainer(cfg, None, [], None)
    trainer.fit(build_model(cfg), datamodule=build_datamodule(cfg, workspace))
    assert trainer.global_step == 4
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for name in ("val/mlm_loss", "val/mlm_acc", "val/rtd_loss", "val/rtd_acc", "val/rtd_auc", "val/replaced_frac",
                 "train/mlm_loss", "train/rtd_loss", "train/rtd_acc", "train/replaced_frac", "train/loss"):
        assert name in logged and math.isfinite(logged[name]), name
    assert 0.0 <= logged["val/rtd_auc"] <= 1.0 and 0.0 < logged["val/replaced_frac"] < 0.2
    assert logged["val/mlm_loss"] == pytest.approx(math.log(512), rel=0.1)  # 4 steps: still near chance


def test_layer_removal_equals_deleting_discriminator_blocks(item):
    from lit_modules.ablation import AblationOptions, layer_removal

    model = _model(**{"model.depth": 3})
    with torch.no_grad():
        for p in model.model.blocks.parameters():  # make each block matter
            p.mul_(8.0)
    table = layer_removal(model, [item], AblationOptions(drop_one=False, similarity=False))
    fast = table[(table.variant == "truncate") & (table.metric == "rtd_loss")].set_index("removed")["value"]
    full = list(model.model.blocks)
    for k in range(4):
        model.model.blocks = torch.nn.ModuleList(full[: 3 - k])
        with torch.no_grad():
            _, metrics = model._shared_step(item, "val")
        assert float(metrics["rtd_loss"][0]) == pytest.approx(float(fast[k]), abs=1e-5)
    model.model.blocks = torch.nn.ModuleList(full)
    assert fast.nunique() == 4


# ---------------------------------------------------------------- against HF ELECTRA
def test_discriminator_against_hf_electra():
    """HF's ``ElectraForPreTraining`` is post-LayerNorm (a norm after the embedding sum and
    after each residual add, none at the end); ours is pre-LayerNorm (a norm before each
    sublayer, ``ln_f`` at the end): with the same weights the logits cannot be equal, and
    they are not. Everything else is the same function: with our weights copied into HF's
    model, (1) HF's embeddings are its LayerNorm of our embedding sum, (2) HF's RTD head
    on any hidden states is ours (dense -> GELU -> dense), and (3) HF's logits are our
    own attention and MLP sublayers composed in HF's post-LN order with HF's norms."""
    transformers = pytest.importorskip("transformers")
    model = _model()
    disc = model.model
    d, v, t = 32, 512, 12
    g = torch.Generator().manual_seed(0)
    hf_cfg = transformers.ElectraConfig(
        vocab_size=v, embedding_size=d, hidden_size=d, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=4 * d, hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=32, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=PAD)
    hf = transformers.ElectraForPreTraining(hf_cfg).eval()
    with torch.no_grad():
        for p in [*disc.parameters(), *hf.parameters()]:  # off every init, norms included
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 1.5 / p.shape[-1] ** 0.5))
        e = hf.electra.embeddings
        e.word_embeddings.weight.copy_(disc.embeddings.tok_emb.weight)
        e.position_embeddings.weight.copy_(disc.embeddings.pos_emb.weight)
        e.token_type_embeddings.weight.zero_()
        for blk, layer in zip(disc.blocks, hf.electra.encoder.layer, strict=True):
            a = layer.attention.self
            for lin, w, b in zip((a.query, a.key, a.value), blk.attn.qkv.weight.split(d), blk.attn.qkv.bias.split(d),
                                 strict=True):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            for hf_lin, ours in ((layer.attention.output.dense, blk.attn.proj), (layer.intermediate.dense, blk.mlp.fc),
                                 (layer.output.dense, blk.mlp.proj)):
                hf_lin.weight.copy_(ours.weight)
                hf_lin.bias.copy_(ours.bias)
        hf.discriminator_predictions.dense.load_state_dict(disc.rtd_dense.state_dict())
        hf.discriminator_predictions.dense_prediction.load_state_dict(disc.rtd_out.state_dict())

        ids = torch.randint(6, v, (3, t), generator=g)
        valid = torch.ones_like(ids, dtype=torch.bool)
        valid[1, 9:], valid[2, 5:] = False, False
        ids[~valid] = PAD
        # (1) the embeddings: HF normalizes the same sum.
        torch.testing.assert_close(e(ids), e.LayerNorm(disc.embed(ids)))
        # (2) the RTD head on the same hidden states.
        x = torch.randn(3, t, d, generator=g)
        torch.testing.assert_close(hf.discriminator_predictions(x), disc.rtd_head(x))
        # (3) the whole model: our sublayers, HF's norm placement.
        from lit_modules.masking.attention import Attention, padding

        att = Attention(mask=padding(valid))
        h = e.LayerNorm(disc.embed(ids))
        for blk, layer in zip(disc.blocks, hf.electra.encoder.layer, strict=True):
            h = layer.attention.output.LayerNorm(h + blk.attn(h, att))
            h = layer.output.LayerNorm(h + blk.mlp(h))
        hf_logits = hf(input_ids=ids, attention_mask=valid.long()).logits  # (B, T)
        torch.testing.assert_close(hf_logits[valid], disc.rtd_head(h)[valid], atol=1e-5, rtol=1e-5)
        # ... and ours, pre-LN, differs: the one difference is where the norms sit.
        ours = disc.rtd_logits(disc.encode(ids, valid))
        assert not torch.allclose(ours[valid], hf_logits[valid], atol=1e-2)


def test_report_chance_levels_of_replaced_token_detection():
    """rtd metrics are judged against guessing "original" at the replaced fraction, not
    against the vocabulary."""
    import math
    from types import SimpleNamespace

    import pandas as pd

    from reports.findings import at_chance, chance_levels

    data = SimpleNamespace(spec={"model": "electra"}, swept=[], trials=pd.DataFrame(
        {"val/replaced_frac": [0.15, 0.15], "data.vocab_size": [2048, 2048]}))
    levels = chance_levels(data, ["val/rtd_acc", "val/rtd_loss", "val/rtd_auc"])
    assert levels["val/rtd_acc"].value == pytest.approx(0.85)
    assert levels["val/rtd_loss"].value == pytest.approx(-(0.15 * math.log(0.15) + 0.85 * math.log(0.85)))
    assert levels["val/rtd_auc"].value == 0.5
    assert at_chance(0.8539, levels["val/rtd_acc"], "val/rtd_acc") and not at_chance(0.95, levels["val/rtd_acc"], "val/rtd_acc")
