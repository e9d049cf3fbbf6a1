"""Sparse attention patterns (the ``attention:`` section): what each kind lets a query see,
in both GPT directions and for BERT, through every kernel; the cached layouts against a
rule written out here; training, layer removal and transfer on patterned models."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lit_modules.config import AttentionConfig
from lit_modules.config_errors import ConfigError
from lit_modules.masking.attention import Attention, Pattern, padding
from lit_modules.sparse_attention import PatternAttention

from .conftest import SPECS

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

# Every kind, with settings small enough that the patterns are sparse at T = 24.
KINDS = {
    "sliding": dict(window=3, block_size=4),
    "longformer": dict(window=2, global_tokens=2, block_size=4),
    "bigbird": dict(window=2, global_tokens=1, random_blocks=1, block_size=4),
    "prefix": dict(prefix=6),
}
BERT_KINDS = [k for k in KINDS if k != "prefix"]
T = 24


def _pattern(kind: str, seed: int = 0, layer: int = 0) -> Pattern:
    return Pattern.from_config(AttentionConfig(kind=kind, **KINDS[kind]), seed, layer)


def _reference(kind: str, t: int, causal: bool, pattern: Pattern) -> torch.Tensor:
    """The rule written out position by position (BigBird's random blocks from its table)."""
    cfg = KINDS[kind]
    table = pattern.random_table(t, causal)
    out = torch.zeros(t, t, dtype=torch.bool)
    for q in range(t):
        for k in range(t):
            if kind == "prefix":
                out[q, k] = k <= q or k < cfg["prefix"]
                continue
            ok = abs(q - k) <= cfg["window"]
            g = cfg.get("global_tokens", 0)
            ok = ok or q < g or k < g
            if table is not None:
                ok = ok or bool(table[q // cfg["block_size"], k // cfg["block_size"]])
            out[q, k] = ok and (k <= q or not causal)
    return out


def _cases():
    for kind in KINDS:
        yield kind, True
        if kind != "prefix":
            yield kind, False


# ---------------------------------------------------------------- the rule and its layouts
@pytest.mark.parametrize("kind,causal", list(_cases()))
@pytest.mark.parametrize("t", [5, 24, 37])
def test_rule_and_cached_layouts_equal_the_written_rule(kind, causal, t):
    """The pattern's dense rule, the tiles of the block-sparse kernel scattered back to a
    (T, T) mask, and the FlexAttention block mask (its block lists and its mask_mod) all
    equal the rule written out here; each layout is built once and reused."""
    pattern = _pattern(kind)
    expected = _reference(kind, t, causal, pattern)
    assert torch.equal(pattern.dense(t, causal), expected)

    pa = PatternAttention(pattern, "blocks")
    lay = pa.layout(t, causal)
    assert pa.layout(t, causal) is lay  # cached per (length, causal, device)
    n, k = lay.idx.shape
    bs = lay.block
    rebuilt = torch.zeros(n * bs, n * bs, dtype=torch.bool)
    inblock = lay.inblock.view(n, bs, k, bs)
    for i in range(n):
        for slot in range(k):
            j = int(lay.idx[i, slot])
            rebuilt[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] |= inblock[i, :, slot, :]
    g = lay.global_rows
    assert torch.equal(rebuilt[g:t, :t], expected[g:])
    assert not rebuilt[g:t, t:].any()  # never a filler key
    assert g == (0 if causal or kind not in ("longformer", "bigbird") else KINDS[kind]["global_tokens"])

    flex = PatternAttention(pattern, "flex").layout(t, causal, grad=False)
    dense_blocks = flex.block_mask.to_dense()[0, 0].bool()  # (n, n) tiles read
    n128 = dense_blocks.shape[0]
    padded = torch.zeros(n128 * 128, n128 * 128, dtype=torch.bool)
    padded[:t, :t] = expected
    assert torch.equal(dense_blocks, padded.view(n128, 128, n128, 128).any(dim=(1, 3)))
    pos = torch.arange(t)
    assert torch.equal(flex.block_mask.mask_mod(0, 0, pos[:, None], pos[None, :]), expected)


@pytest.mark.parametrize("causal", [False, True])
def test_global_tokens_see_and_are_seen_by_every_token(causal):
    for kind in ("longformer", "bigbird"):
        g = KINDS[kind]["global_tokens"]
        m = _pattern(kind).dense(T, causal)
        later = torch.tril(torch.ones(T, T, dtype=torch.bool)) if causal else torch.ones(T, T, dtype=torch.bool)
        assert m[:, :g][later[:, :g]].all()  # every token sees them (every later one, if causal)
        assert m[:g][later[:g]].all()  # they see every token (every earlier one, if causal)
        assert not m[~later].any()


def test_bigbird_random_blocks_fixed_per_seed_and_layer():
    """r blocks per query block, never one the window or a global token covers (causal:
    never a later block), the same on every call, different across layers and seeds."""
    cfg = AttentionConfig(kind="bigbird", window=4, random_blocks=2, block_size=4)
    p = Pattern.from_config(cfg, seed=7, layer=1)
    for causal in (False, True):
        table = p.random_table(64, causal)
        assert torch.equal(table, Pattern.from_config(cfg, seed=7, layer=1).random_table(64, causal))
        i, j = torch.arange(16)[:, None], torch.arange(16)[None, :]
        eligible = ((i - j).abs() > 1) & (j >= 1) & ((j <= i) if causal else True)
        assert not table[~eligible].any()
        assert torch.equal(table.sum(1), eligible.sum(1).clamp(max=2))
    others = [Pattern.from_config(cfg, seed=s, layer=la).random_table(64, False) for s, la in ((7, 2), (8, 1))]
    assert all(not torch.equal(p.random_table(64, False), o) for o in others)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_blocks_do_not_depend_on_the_sequence_length(causal):
    """Drawn at the model's length and cut: a shorter (or padded) sequence reads the
    random blocks the model trained with; with a window that ends inside a block
    (5 of 4-token blocks), the blocks it reaches are never drawn."""
    cfg = AttentionConfig(kind="bigbird", window=5, random_blocks=2, block_size=4)
    p = Pattern.from_config(cfg, seed=3, layer=0, max_len=96)
    full = p.random_table(96, causal)
    for t in (9, 40, 64, 95):
        n = -(-t // 4)
        assert torch.equal(p.random_table(t, causal), full[:n, :n])
        assert torch.equal(p.dense(t, causal), p.dense(96, causal)[:t, :t])
    i, j = torch.arange(24)[:, None], torch.arange(24)[None, :]
    assert not full[(i - j).abs() <= 2].any()  # ceil(5 / 4) = 2 blocks away: the window reaches them


# ---------------------------------------------------------------- the kernels agree
@pytest.mark.parametrize("kind,causal", list(_cases()))
def test_kernels_agree_forward_and_backward(kind, causal):
    """Block-sparse, dense and (without gradients, the only CPU form) FlexAttention give
    the same outputs, with padding; block-sparse and dense the same gradients."""
    pattern = _pattern(kind)
    b, h, t, d = 3, 2, 37, 8
    valid = torch.arange(t)[None] < torch.tensor([t, 30, 9])[:, None]
    attention = Attention(causal=True) if causal else Attention(mask=padding(valid))
    rows = torch.ones(b, t, dtype=torch.bool) if causal else valid  # the positions compared
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    w = torch.randn(b, h, t, d) * rows[:, None, :, None]
    outs, grads = {}, {}
    for kernel in ("blocks", "dense"):
        y = PatternAttention(pattern, kernel)(q, k, v, attention)
        outs[kernel] = y * rows[:, None, :, None]
        grads[kernel] = torch.autograd.grad((y * w).sum(), (q, k, v))
    with torch.no_grad():
        outs["flex"] = PatternAttention(pattern, "flex")(q.detach(), k.detach(), v.detach(), attention) \
            * rows[:, None, :, None]
    allowed = pattern.dense(t, causal) & (valid[:, None, None, :] | ~valid[:, None, :, None] if not causal else True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed) * rows[:, None, :, None]
    for kernel, y in outs.items():
        torch.testing.assert_close(y, ref, atol=2e-6, rtol=1e-5, msg=kernel)
    for a, c in zip(grads["blocks"], grads["dense"]):
        torch.testing.assert_close(a, c, atol=2e-6, rtol=1e-5)


def test_flex_refused_for_training_on_cpu():
    pa = PatternAttention(_pattern("sliding"), "flex")
    q = torch.randn(1, 1, 8, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        pa(q, q, q, Attention(causal=True))


def test_auto_kernel_is_dense_where_tiles_would_cover_most_pairs():
    """auto: the block-sparse kernel where it computes at most half the T x T pairs."""
    pa = PatternAttention(_pattern("sliding"), "auto")
    assert pa.layout(8, False).kernel == "dense"
    lay = pa.layout(256, False)
    assert lay.kernel == "blocks" and lay.pairs == 256 * 3 * 4  # 3 tiles of 4 keys per query
    assert PatternAttention(_pattern("prefix"), "auto").layout(256, True).kernel == "dense"


# ---------------------------------------------------------------- what a model's query sees
def _model(tiny_config, family: str, kind: str, depth: int = 1):
    from lit_modules.run import build_model

    over = {f"attention.{k}": v for k, v in {"kind": kind, **KINDS[kind]}.items()}
    return build_model(tiny_config(family, {**over, "model.depth": depth})).eval()


def _visible(pattern_dense: torch.Tensor, depth: int) -> torch.Tensor:
    """Which inputs reach which outputs through ``depth`` layers of the same pattern."""
    reach = torch.eye(pattern_dense.shape[0], dtype=torch.bool)
    for _ in range(depth):
        reach = (pattern_dense.float() @ reach.float()) > 0
    return reach


def _influence(outputs, tokens, vocab: int):
    """(T_out, T_in) max |change| of each output position when one input token changes."""
    base = outputs(tokens)
    diffs = []
    for j in range(tokens.shape[1]):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1 + torch.arange(tokens.shape[0]) % (vocab - 8)) % vocab
        diffs.append((outputs(changed) - base).abs().amax(dim=(0, 2)))
    return torch.stack(diffs, dim=1)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("direction", ["fw", "bw"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_gpt_query_sees_exactly_its_pattern(tiny_config, kind, direction, depth):
    """A GPT position's logits do not change (exactly) when a token its layers must not
    reach changes, and do change when one they may reach changes; backward is the mirror
    of forward (the pattern holds in reading order)."""
    model = _model(tiny_config, "gpt", kind, depth)
    vocab = model.run_config.data.vocab_size
    tokens = torch.randint(8, vocab, (2, T))
    infl = _influence(lambda x: model.predict(x, direction), tokens, vocab)
    reach = [_visible(model.model.blocks[i].attn.pattern.pattern.dense(T, True), 1) for i in range(depth)]
    expected = torch.eye(T, dtype=torch.bool)
    for r in reach:
        expected = (r.float() @ expected.float()) > 0
    if direction == "bw":
        expected = expected.flip(0, 1)  # reading order reversed
    assert (infl[~expected] == 0).all(), f"{kind} {direction}: a query sees a key it must not"
    assert (infl[expected] > 0).all(), f"{kind} {direction}: a query ignores a key it may see"


@pytest.mark.parametrize("kind", list(KINDS))
def test_gpt_target_never_visible(tiny_config, kind):
    """At every scored position (prefix-LM: after the prefix), changing the token to be
    predicted leaves the prediction unchanged, in both directions."""
    model = _model(tiny_config, "gpt", kind, depth=2)
    vocab = model.run_config.data.vocab_size
    tokens = torch.randint(8, vocab, (2, T))
    scored = model.model.blocks[0].attn.pattern.pattern.scored(T)
    scored = torch.ones(T, dtype=torch.bool) if scored is None else scored
    for direction, offset in (("fw", 1), ("bw", -1)):
        infl = _influence(lambda x, d=direction: model.predict(x, d), tokens, vocab)
        for q in range(T):
            target = q + offset
            reading_q = q if direction == "fw" else T - 1 - q
            if 0 <= target < T and scored[reading_q]:
                assert infl[q, target] == 0, f"{kind} {direction}: position {q} sees its target"
            if kind == "prefix" and 0 <= target < T and not scored[reading_q]:
                assert infl[q, target] > 0  # why those positions are not scored


@pytest.mark.parametrize("kind", BERT_KINDS)
def test_bert_query_sees_exactly_its_pattern_and_never_padding(tiny_config, kind):
    """A BERT position's output changes exactly when a token its two layers reach
    changes; padding is never seen: changing padded ids leaves every valid output
    unchanged, bit for bit."""
    model = _model(tiny_config, "bert", kind, depth=2)
    enc = model.model
    vocab = model.run_config.data.vocab_size
    tokens = torch.randint(8, vocab, (2, T))
    valid = torch.ones(2, T, dtype=torch.bool)
    outputs = lambda x: enc.encode(x, valid)  # noqa: E731
    infl = _influence(outputs, tokens, vocab)
    expected = torch.eye(T, dtype=torch.bool)
    for block in enc.blocks:
        expected = (block.attn.pattern.pattern.dense(T, False).float() @ expected.float()) > 0
    assert (infl[~expected] == 0).all() and (infl[expected] > 0).all()

    valid = torch.arange(T)[None] < torch.tensor([T, 13])[:, None]
    base = enc.encode(tokens, valid)
    changed = torch.where(valid, tokens, torch.randint(8, vocab, tokens.shape))
    out = enc.encode(changed, valid)
    assert torch.equal(out[valid], base[valid])


# ---------------------------------------------------------------- training with a pattern
@pytest.mark.parametrize("family,kind", [("gpt", k) for k in KINDS] + [("bert", k) for k in BERT_KINDS]
                         + [("electra", "bigbird")])
def test_training_step_with_every_kind(tiny_config, family, kind):
    """A training step on the data pipeline's batch: a finite loss, gradients in every
    block; the FLOP count uses the pairs the kernel computes, not T²."""
    from lit_modules.run import build_model
    from tests.conftest import make_batch

    over = {f"attention.{k}": v for k, v in {"kind": kind, **KINDS[kind]}.items()}
    model = build_model(tiny_config(family, {**over, "model.block_size": 64})).train()
    kind_of_batch = model.Config.consumes
    plan = type(model).mask_plan(model.run_config, steps_per_epoch=2)
    batch = make_batch(kind_of_batch, b=4)
    item = plan.train_item(batch, 0)
    loss, _ = model._shared_step(item, "train")
    assert torch.isfinite(loss)
    loss.backward()
    for block in model.blocks:
        assert block.attn.qkv.weight.grad.abs().sum() > 0
    flops, _ = model.step_flops(item)
    assert flops.training > 0
    params = model.run_params()
    assert 0 < params["attention.keys_per_query"] < 64


def test_sparse_flops_match_torch_counter(tiny_config):
    """With the block-sparse kernel, the step's FLOPs are within 2% of torch's counter
    (the pairs the tiles compute, about 3 * 8 keys per query here, not 128)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lit_modules.run import build_model
    from tests.conftest import make_batch

    over = {"attention.kind": "sliding", "attention.window": 8, "attention.block_size": 8,
            "model.block_size": 128, "model.width": 64}
    model = build_model(tiny_config("bert", over)).train()
    plan = type(model).mask_plan(model.run_config, steps_per_epoch=2)
    import dataclasses

    from lit_modules.masking.batches import TokenRows

    batch = make_batch(TokenRows, b=4)
    tokens = batch.tokens.repeat(1, 3)[:, :128]  # rows of 128 tokens, so the tiles are sparse
    full = torch.ones_like(tokens, dtype=torch.bool)
    batch = dataclasses.replace(batch, tokens=tokens, valid=full, eligible=tokens >= 6, word_start=full)
    item = plan.train_item(batch, 0)
    assert model.blocks[0].attn.pattern.layout(128, False).kernel == "blocks"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # torch's counter has no formula for the fused CPU attention kernel: count the same
    # shapes on the math backend (the FLOPs do not depend on the backend).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = model._shared_step(item, "train")
        loss.backward()
    flops, _ = model.step_flops(item)
    assert flops.training == pytest.approx(counter.get_total_flops(), rel=0.02)


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("over,field", [
    ({"attention.kind": "windowed"}, "attention.kind"),
    ({"attention.kind": "sliding", "attention.window": -1}, "attention.window"),
    ({"attention.kind": "sliding", "attention.global_tokens": 2}, "attention.global_tokens"),
    ({"attention.kind": "longformer", "attention.global_tokens": 0}, "attention.global_tokens"),
    ({"attention.kind": "prefix"}, "attention.prefix"),
    ({"attention.kind": "prefix", "attention.prefix": 64}, "attention.prefix"),
    ({"attention.kind": "bigbird", "attention.block_size": 0}, "attention.block_size"),
])
def test_bad_attention_settings_are_one_line_errors(tiny_config, over, field):
    with pytest.raises(ConfigError) as e:
        tiny_config("gpt", over)
    assert str(e.value).startswith(f"{field} = ") and "\n" not in str(e.value)


def test_kind_a_family_does_not_support_is_refused(tiny_config):
    with pytest.raises(ConfigError, match=r"attention.kind = 'prefix': allowed for model bert: full, sliding"):
        tiny_config("bert", {"attention.kind": "prefix", "attention.prefix": 4})
    with pytest.raises(ConfigError, match=r"attention.kind = 'sliding': allowed for model mae: full"):
        tiny_config("mae", {"attention.kind": "sliding"})


def test_full_attention_keeps_the_config_hash(tiny_config):
    """A run without the section (or with kind full) has the hash it had before."""
    plain = tiny_config("gpt")
    assert "attention" not in plain.to_dict()
    assert tiny_config("gpt", {"attention.kind": "full"}).hash() == plain.hash()
    assert tiny_config("gpt", {"attention.kind": "sliding"}).hash() != plain.hash()


def test_specs_sweep_the_attention_axis():
    """bert_attention sweeps the kinds (an equal attended-keys budget) and gpt_window the
    window against p_bw; both validate."""
    from lit_modules.config import run_config_from_dict
    from studies.spec import load_spec

    def configs(name):
        spec = load_spec(SPECS / f"{name}.yaml")
        return [run_config_from_dict(spec.run_config_dict(p, s)) for p, s in spec.grid_points()]

    bert = configs("bert_attention")
    assert {c.attention.kind for c in bert} == {"full", "sliding", "longformer", "bigbird"}
    assert {c.seed for c in bert} == {0, 1}
    gpt = configs("gpt_window")
    assert len({(c.attention.window, c.masking.p_bw) for c in gpt}) >= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,causal", [("sliding", True), ("longformer", False), ("bigbird", False)])
def test_flex_kernel_trains_on_cuda(kind, causal):
    """On CUDA, auto picks compiled FlexAttention; its outputs and gradients equal the
    dense rule's, with padding."""
    pattern = Pattern.from_config(AttentionConfig(kind=kind, **{**KINDS[kind], "block_size": 16}), 0, 0)
    b, h, t, d = 2, 2, 300, 16
    valid = torch.arange(t)[None] < torch.tensor([t, 200])[:, None]
    valid = valid.cuda()
    attention = Attention(causal=True) if causal else Attention(mask=padding(valid))
    rows = torch.ones(b, t, dtype=torch.bool, device="cuda") if causal else valid
    q, k, v = (torch.randn(b, h, t, d, device="cuda", requires_grad=True) for _ in range(3))
    pa = PatternAttention(pattern, "auto")
    assert pa.layout(t, causal, "cuda").kernel == "flex"
    w = torch.randn(b, h, t, d, device="cuda") * rows[:, None, :, None]
    y = pa(q, k, v, attention)
    grads = torch.autograd.grad((y * w).sum(), (q, k, v))
    ref = PatternAttention(pattern, "dense")(q, k, v, attention)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(y * rows[:, None, :, None], ref * rows[:, None, :, None], atol=1e-4, rtol=1e-4)
    for a, c in zip(grads, ref_grads):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


def test_transfer_on_a_patterned_model_with_its_own_random_init_baseline(tiny_config, workspace):
    """The transfer stage runs on a sliding-window BERT unchanged (every layer probed),
    and its random-init baseline is the sliding-window architecture's, not a cached
    full-attention one."""
    from lit_modules.run import build_datamodule, build_model
    from lit_modules.transfer.stage import run_transfer

    caps = {"transfer.tasks": ["sst2"], "transfer.max_train": 120, "transfer.max_select": 60, "transfer.max_eval": 80}
    scores = {}
    cache = workspace.cache_dir / "transfer"
    for kind in ("full", "sliding"):
        over = {**caps, "attention.kind": kind, **({"attention.window": 1} if kind == "sliding" else {})}
        cfg = tiny_config("bert", over)
        dm = build_datamodule(cfg, workspace)
        model = build_model(cfg)
        before = set(cache.glob("random-init-*.json")) if cache.is_dir() else set()
        out = run_transfer(model, cfg, workspace.data_dir, workspace.cache_dir, dm.tokenizer_path, build_model)
        layers = sorted(s for m, _, s in out.points if m == "transfer/sst2/probe_acc")
        assert layers == list(range(len(model.blocks) + 1))
        scores[kind] = out.metrics["transfer/sst2/baseline_random_init"]
        # at init, the run's own model is the random-init model: its top-layer probe is the baseline
        assert out.metrics["transfer/sst2/probe_acc"] == pytest.approx(scores[kind])
        if kind == "sliding":  # its own random-init entry, not the full-attention one
            assert len(set(cache.glob("random-init-*.json")) - before) == 1
