"""Layer removal: the single-pass fast path equals deleting blocks and re-running; with
nothing removed it is every family's validation score."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
from torch import nn

from lit_modules.ablation import (
    COLUMNS,
    AblationOptions,
    hidden_states,
    layer_removal,
    truncation_curves,
)
from lit_modules.masking.attention import Attention
from lit_modules.masking.causal_lm import stacked_views
from lit_modules.registry import MODELS

from .conftest import TINY

VOCAB = TINY["gpt"]["data"]["vocab_size"]
DEPTH = 3
METRICS = {"fw_loss", "fw_acc", "bw_loss", "bw_acc"}


@pytest.fixture
def model(tiny_config):
    """A tiny GPT whose blocks matter: at GPT-2 init every residual branch is ~0.02 scale,
    so removing a block would barely move the loss and an off-by-one in the fast path
    could hide below the tolerance. Larger weights make every block count."""
    from lit_modules.run import build_model

    m = build_model(tiny_config("gpt", {"model.depth": DEPTH}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.model.blocks.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3, generator=g)  # weights: ~15x the GPT-2 init
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))  # biases, norm gains
    return m.eval()


@pytest.fixture
def batches(model):
    """Two validation items of (B, T+1) windows of unequal size (the per-token mean is
    pooled), their views drawn by the model's mask plan as the validation loader does."""
    from lit_modules.masking.batches import TokenWindows

    plan = type(model).mask_plan(model.run_config, steps_per_epoch=2)
    g = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, VOCAB, (4, 17), generator=g), torch.randint(0, VOCAB, (2, 17), generator=g)]
    return [plan.eval_item(TokenWindows(w)) for w in windows]


def _with_blocks(model, keep: list[int]):
    """A deep copy of ``model`` whose network holds only the blocks ``keep`` (in order)."""
    m = copy.deepcopy(model)
    m.model.blocks = nn.ModuleList(m.model.blocks[i] for i in keep)
    return m.eval()


def _reference(model, batches) -> dict[str, float]:
    """Per-token loss and accuracy in both directions, through the public predict()."""
    window = torch.cat([item.batch.windows for item in batches])
    ce = nn.functional.cross_entropy
    fw = model.predict(window[:, :-1], "fw")  # logits[:, t] predicts window[:, t+1]
    bw = model.predict(window[:, 1:], "bw")  # logits[:, t] predicts window[:, t]
    out = {}
    for name, logits, target in (("fw", fw, window[:, 1:]), ("bw", bw, window[:, :-1])):
        out[f"{name}_loss"] = ce(logits.reshape(-1, VOCAB), target.reshape(-1)).item()
        out[f"{name}_acc"] = (logits.argmax(-1) == target).float().mean().item()
    return out


def _values(df: pd.DataFrame, variant: str, **where) -> dict[str, float]:
    rows = df[df["variant"] == variant]
    for col, val in where.items():
        rows = rows[rows[col] == val]
    assert rows["metric"].is_unique
    return dict(zip(rows["metric"], rows["value"]))


def test_truncation_equals_deleting_blocks(model, batches):
    df = layer_removal(model, batches, AblationOptions(drop_one=False, similarity=False))
    losses = []
    for k in range(DEPTH + 1):
        expected = _reference(_with_blocks(model, list(range(DEPTH - k))), batches)
        got = _values(df, "truncate", removed=k)
        assert set(got) == METRICS
        for metric in METRICS:
            assert math.isclose(got[metric], expected[metric], abs_tol=1e-5), (k, metric, got[metric], expected[metric])
        losses.append((got["fw_loss"], got["bw_loss"]))
    # The test has teeth: every truncation depth gives a clearly different loss.
    for d in (0, 1):
        vals = sorted(loss[d] for loss in losses)
        assert min(b - a for a, b in zip(vals, vals[1:])) > 1e-3
    # k = 0 is the intact model.
    full = _reference(model, batches)
    assert math.isclose(_values(df, "truncate", removed=0)["fw_loss"], full["fw_loss"], abs_tol=1e-5)


def test_drop_one_equals_deleting_that_block(model, batches):
    df = layer_removal(model, batches, AblationOptions(truncate=False, similarity=False))
    assert set(df["variant"]) == {"drop_one"}
    seen = []
    for skip in range(DEPTH):
        expected = _reference(_with_blocks(model, [i for i in range(DEPTH) if i != skip]), batches)
        got = _values(df, "drop_one", block=skip)
        for metric in METRICS:
            assert math.isclose(got[metric], expected[metric], abs_tol=1e-5), (skip, metric)
        seen.append(got["fw_loss"])
    assert len({round(v, 4) for v in seen}) == DEPTH  # each removal is a different model


def _by_hand_states(model, window: torch.Tensor) -> list[torch.Tensor]:
    """Block inputs/outputs for the fw and bw views, built without lit_modules.ablation."""
    masked = stacked_views(window, ("fw", "bw"))
    h = model.model.embed(masked.inputs, masked.direction)
    states = [h]
    for block in model.model.blocks:
        h = block(h, Attention(causal=True))
        states.append(h)
    return states


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))  # (B, T)


@torch.no_grad()
def test_block_influence_and_angular_distance_by_hand(model, batches):
    df = layer_removal(model, batches, AblationOptions(truncate=False, drop_one=False))
    per_batch = [_by_hand_states(model, item.batch.windows) for item in batches]
    for i in range(DEPTH):
        cos = torch.cat([_cos(s[i], s[i + 1]).flatten() for s in per_batch])  # every token, fw and bw
        bi = (1 - cos).mean().item()
        assert math.isclose(_values(df, "block_influence", block=i)["block_influence"], bi, abs_tol=1e-5)
        assert bi > 1e-3
    for i in range(DEPTH + 1):
        for j in range(i + 1, DEPTH + 1):
            cos = torch.cat([_cos(s[i], s[j]).flatten() for s in per_batch]).clamp(-1, 1)
            ang = (torch.arccos(cos) / math.pi).mean().item()
            got = _values(df, "angular_distance", block=i, removed=j - i)["angular_distance"]
            assert math.isclose(got, ang, abs_tol=1e-5)
            assert 0.0 <= got <= 1.0


@torch.no_grad()
def test_hidden_states_match_model_forward(model, batches):
    masked = model.ablation_batch(batches[0])
    states = hidden_states(model, masked)
    assert len(states) == DEPTH + 1
    logits = model.model(masked.inputs, masked.direction, masked.attention)
    torch.testing.assert_close(model.model.logits(states[-1]), logits)


def test_frame_is_tidy(model, batches):
    model.train()  # layer_removal evaluates in eval mode and restores the mode
    df = layer_removal(model, batches)
    assert model.training
    assert list(df.columns) == COLUMNS
    assert str(df["removed"].dtype) == "Int64" and str(df["block"].dtype) == "Int64"
    assert not df.duplicated(["variant", "removed", "block", "metric"]).any()
    assert df["value"].map(math.isfinite).all()
    counts = df["variant"].value_counts().to_dict()
    assert counts == {
        "truncate": (DEPTH + 1) * len(METRICS),
        "drop_one": DEPTH * len(METRICS),
        "block_influence": DEPTH,
        "angular_distance": DEPTH * (DEPTH + 1) // 2,
    }
    t = df[df["variant"] == "truncate"]
    assert t["block"].isna().all() and sorted(set(t["removed"])) == list(range(DEPTH + 1))
    d = df[df["variant"] == "drop_one"]
    assert (d["removed"] == 1).all() and sorted(set(d["block"])) == list(range(DEPTH))
    b = df[df["variant"] == "block_influence"]
    assert b["removed"].isna().all() and (b["metric"] == "block_influence").all()
    a = df[df["variant"] == "angular_distance"]
    assert ((a["block"] + a["removed"]) <= DEPTH).all()
    for variant in ("truncate", "drop_one"):
        assert set(df.loc[df["variant"] == variant, "metric"]) == METRICS
    accs = df[df["metric"].str.endswith("_acc")]["value"]
    assert ((accs >= 0) & (accs <= 1)).all()

    curves = truncation_curves(df)
    assert list(curves.index) == list(range(DEPTH + 1))
    assert set(curves.columns) == METRICS


def test_max_batches_and_options(model, batches):
    first = layer_removal(model, batches[:1], AblationOptions(drop_one=False))
    limited = layer_removal(model, batches, AblationOptions(drop_one=False, max_batches=1))
    pd.testing.assert_frame_equal(first, limited)
    only = layer_removal(model, batches, AblationOptions(truncate=False, drop_one=False, similarity=False))
    assert only.empty and list(only.columns) == COLUMNS


@pytest.mark.parametrize("name", MODELS.names())
def test_nothing_removed_is_the_validation_score(tiny_config, workspace, name):
    """For every family, the intact model's layer-removal scores (k = 0) are its
    validation metrics on the same item, and removing blocks changes them."""
    from lit_modules.run import build_datamodule, build_model

    cfg = tiny_config(name)
    dm = build_datamodule(cfg, workspace)
    model = build_model(cfg, dm).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the init, where a block's residual branch is near zero
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p[0].numel() ** 0.5))
    item = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        _, metrics = model._shared_step(item, "val")
    df = layer_removal(model, [item], AblationOptions(drop_one=False, similarity=False))
    intact = _values(df, "truncate", removed=0)
    shared = set(intact) & set(metrics)
    assert shared, (sorted(intact), sorted(metrics))
    for metric in shared:
        assert math.isclose(intact[metric], float(metrics[metric][0]), rel_tol=1e-5, abs_tol=1e-6), metric
    removed = _values(df, "truncate", removed=len(model.blocks))
    assert any(not math.isclose(removed[m], intact[m], rel_tol=1e-3) for m in shared)
