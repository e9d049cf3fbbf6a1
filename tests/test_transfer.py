"""The transfer stage: probes on planted features, the features hook of every family,
determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_modules.registry import MODELS
from lit_modules.transfer.probe import fit_probe, r2, score


def planted(n: int, d: int, k: int, seed: int, signal: float = 3.0):
    """Features whose first k dimensions hold a noisy one-hot of the label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.normal(size=(n, d))
    x[np.arange(n), y] += signal
    return x, y


@pytest.mark.parametrize("k", [2, 4, 50])  # 50 classes: the ridge path
def test_probe_reads_planted_labels_and_not_shuffled_ones(k):
    (xt, yt), (xs, ys), (xe, ye) = (planted(n, 64, k, s, signal=6.0) for n, s in ((1500, 0), (300, 1), (600, 2)))
    res = fit_probe(xt, yt, xs, ys, xe, ye, "class", k)
    assert res.score > 0.97, res
    assert res.kind == ("softmax" if k <= 20 else "ridge")
    rng = np.random.default_rng(3)  # every split's labels shuffled: nothing links features and labels
    chance = fit_probe(xt, rng.permutation(yt), xs, rng.permutation(ys), xe, rng.permutation(ye), "class", k).score
    # at chance: 1/k within 4 binomial standard errors of the 600 evaluation rows
    assert abs(chance - 1 / k) < 4 * np.sqrt((1 / k) * (1 - 1 / k) / 600), chance


def test_probe_multilabel_sets_and_regression():
    rng = np.random.default_rng(0)
    n, d = 1200, 32
    pairs = np.array([rng.choice(10, 2, replace=False) for _ in range(n)])
    y = np.zeros((n, 10), np.float32)
    y[np.arange(n)[:, None], pairs] = 1
    x = rng.normal(size=(n, d)) * 0.3
    x[:, :10] += 2 * y
    res = fit_probe(x[:800], y[:800], x[800:1000], y[800:1000], x[1000:], y[1000:], "multilabel", 10)
    assert res.score > 0.95 and res.kind == "ridge"
    w = rng.normal(size=(d, 4))
    v = (x @ w).astype(np.float32)
    res = fit_probe(x[:800], v[:800], x[800:1000], v[800:1000], x[1000:], v[1000:], "regression", 4)
    assert res.score > 0.99
    noise = rng.normal(size=(n, 4)).astype(np.float32)
    res = fit_probe(x[:800], noise[:800], x[800:1000], noise[800:1000], x[1000:], noise[1000:], "regression", 4)
    assert res.score < 0.05  # nothing to read: R² at or below 0


def test_scores_against_closed_forms():
    pred = torch.tensor([[0.1, 0.9, 0.8, 0.0], [0.7, 0.1, 0.2, 0.6]], dtype=torch.float64)
    assert score(pred, np.array([[0, 1, 1, 0], [1, 0, 1, 0]]), "multilabel") == 0.5
    assert score(pred, np.array([1, 3]), "class") == 0.5
    y = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    assert r2(y.clone(), y) == 1.0 and abs(r2(torch.full_like(y, 2.0), y)) < 1e-12


# ---------------------------------------------------------------- the features hook


def transfer_families():
    return [n for n in MODELS.names() if MODELS.config(n).transfer_input]


def test_every_family_declares_its_transfer_features():
    for name in MODELS.names():
        cfg = MODELS.config(name)
        assert cfg.transfer_input in ("", "text", "image", "clip"), name
        assert bool(cfg.transfer_input) == bool(cfg.transfer_features), name


def _inputs(cfg, n: int, seed: int = 0):
    """n task rows of the family's input kind (text as token rows of varied length)."""
    rng = np.random.default_rng(seed)
    kind = type(cfg.model).transfer_input
    if kind == "text":
        return [rng.integers(6, cfg.data.vocab_size, size=int(rng.integers(3, 12))) for _ in range(n)]
    s = cfg.model.image_size
    if kind == "image":
        return rng.integers(0, 256, size=(n, s, s, 3), dtype=np.uint8)
    return rng.integers(0, 256, size=(n, cfg.model.frames, s, s), dtype=np.uint8)


@pytest.mark.parametrize("name", transfer_families())
def test_features_hook_of_every_family(tiny_config, name):
    """Every layer's features of every kind, finite, (L + 1, N, D); a row's features do
    not depend on the other rows of its batch (text: on their padding); the top layer
    changes when the last block's weights change and layer 0 does not."""
    from lit_modules.run import build_model
    from lit_modules.transfer.features import layer_features

    cfg = tiny_config(name)
    model = build_model(cfg)
    kind = type(cfg.model).transfer_input
    kinds = type(cfg.model).transfer_features
    rows = _inputs(cfg, 6)
    together = layer_features(model, kind, rows, cfg, kinds, batch_size=6)
    alone = layer_features(model, kind, rows, cfg, kinds, batch_size=1)
    depth = len(model.blocks)
    for f in kinds:
        assert together[f].shape[:2] == (depth + 1, 6), f
        assert np.isfinite(together[f]).all()
        np.testing.assert_allclose(together[f], alone[f], atol=2e-5, err_msg=f"{name} {f}: batch-dependent")
    with torch.no_grad():
        for p in model.blocks[-1].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    changed = layer_features(model, kind, rows, cfg, kinds, batch_size=6)
    f = kinds[0]
    np.testing.assert_array_equal(changed[f][0], together[f][0])
    assert not np.allclose(changed[f][depth], together[f][depth])


def test_gpt_features_are_the_forward_and_backward_passes(tiny_config):
    """fw is the mean over a row's tokens of the forward pass's normed states; bw the
    same for the row read backward (as ``predict(..., "bw")`` reads it); fw_bw both."""
    from lit_modules.masking.attention import Attention
    from lit_modules.run import build_model
    from lit_modules.transfer.features import layer_features

    cfg = tiny_config("gpt")
    model = build_model(cfg).eval()
    row = np.array([7, 9, 11, 13, 40], dtype=np.int64)
    feats = layer_features(model, "text", [row], cfg, ("fw", "bw", "fw_bw"), batch_size=1)
    gpt = model.model
    with torch.no_grad():
        for direction, seq in (("fw", row), ("bw", row[::-1].copy())):
            d = torch.tensor([0 if direction == "fw" else 1])
            h = gpt.embed(torch.from_numpy(seq)[None], d)
            for block in gpt.blocks:
                h = block(h, Attention(causal=True))
            want = gpt.ln_f(h).mean(1)[0].numpy()
            np.testing.assert_allclose(feats[direction][-1][0], want, atol=1e-5)
    np.testing.assert_array_equal(feats["fw_bw"][-1][0], np.concatenate([feats["fw"][-1][0], feats["bw"][-1][0]]))
    assert not np.allclose(feats["fw"][-1], feats["bw"][-1])


def test_mae_mean_feature_is_the_existing_probe_feature(tiny_config):
    from lit_modules.data.images import to_float
    from lit_modules.run import build_model
    from lit_modules.transfer.features import layer_features

    cfg = tiny_config("mae")
    model = build_model(cfg).eval()
    images = _inputs(cfg, 3)
    feats = layer_features(model, "image", images, cfg, ("mean",), batch_size=3)
    x = to_float(images, cfg.data.normalize)
    for layer in range(len(model.blocks) + 1):
        np.testing.assert_allclose(feats["mean"][layer], model.features(x, layer).numpy(), atol=1e-5)


# ---------------------------------------------------------------- the stage


def test_stage_is_deterministic_to_the_last_digit(tiny_config, workspace):
    """The same model's transfer stage twice: identical probe curves and baselines;
    the baselines come from the cache the second time, the random-init one included."""
    from lit_modules.run import build_datamodule, build_model
    from lit_modules.transfer.stage import run_transfer

    cfg = tiny_config("bert", {"transfer.tasks": ["sst2"], "transfer.max_train": 120, "transfer.max_select": 60,
                               "transfer.max_eval": 80})
    dm = build_datamodule(cfg, workspace)
    model = build_model(cfg)
    with torch.no_grad():  # off the init, so the trained and random-init features differ
        for p in model.blocks.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    first = run_transfer(model, cfg, workspace.data_dir, workspace.cache_dir, dm.tokenizer_path, build_model)
    second = run_transfer(model, cfg, workspace.data_dir, workspace.cache_dir, dm.tokenizer_path, build_model)
    assert first.table().equals(second.table())
    names = {m for m, _, _ in first.points}
    assert {"transfer/sst2/probe_acc", "transfer/sst2/probe_acc_cls", "transfer/sst2/baseline_majority",
            "transfer/sst2/baseline_tfidf", "transfer/sst2/baseline_random_init"} <= names
    layers = sorted(s for m, _, s in first.points if m == "transfer/sst2/probe_acc")
    assert layers == list(range(len(model.blocks) + 1))
    assert all(0.0 <= v <= 1.0 for _, v, _ in first.points)


def test_finetune_moves_the_encoder_and_is_scored(tiny_config, workspace):
    from lit_modules.run import build_datamodule, build_model
    from lit_modules.transfer.stage import run_transfer

    cfg = tiny_config("gpt", {"transfer.tasks": ["sst2"], "transfer.max_train": 64, "transfer.max_select": 32,
                              "transfer.max_eval": 64, "transfer.baselines": False, "transfer.finetune_steps": 3,
                              "transfer.features": ["bw"]})
    dm = build_datamodule(cfg, workspace)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = run_transfer(model, cfg, workspace.data_dir, workspace.cache_dir, dm.tokenizer_path, build_model)
    assert 0.0 <= out.metrics["transfer/sst2/finetune_acc"] <= 1.0
    assert "transfer/sst2/probe_acc" in out.metrics  # bw is the primary feature here
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the run's model is untouched


@pytest.mark.parametrize("changes, field", [
    ({"objective": {"metric": "transfer/agnews/probe_acc", "direction": "maximize"}}, "objective.metric"),
    ({"objective": {"metric": "test/acc", "direction": "maximize"}}, "objective.metric"),
])
def test_transfer_objective_errors_are_one_line(changes, field):
    import copy

    from lit_modules.config_errors import ConfigError
    from studies.spec import load_spec

    from .conftest import TINY

    fixed = copy.deepcopy(TINY["bert"])
    fixed["transfer"] = {"tasks": ["sst2"]}
    d = {"name": "t", "model": "bert", "data": "wikitext-2", "fixed": fixed, "grid": {"model.depth": [1, 2]},
         "objective": {"metric": "transfer/sst2/probe_acc", "direction": "maximize"}, **changes}
    with pytest.raises(ConfigError) as e:
        load_spec(d)
    assert e.value.field == field and "\n" not in str(e.value)


def test_transfer_config_errors_name_the_field(tiny_config):
    from lit_modules.config_errors import ConfigError

    for overrides, field in (({"transfer.tasks": ["cifar10"]}, "transfer.tasks[0]"),
                             ({"transfer.tasks": ["sst2"], "transfer.features": ["fw"]}, "transfer.features[0]"),
                             ({"transfer.tasks": ["imdb"]}, "transfer.tasks[0]"),
                             ({"transfer.max_train": 0}, "transfer.max_train")):
        with pytest.raises(ConfigError) as e:
            tiny_config("bert", overrides)
        assert e.value.field == field, (overrides, str(e.value))
