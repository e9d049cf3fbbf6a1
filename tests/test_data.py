"""Text data: cached tokenizer, memmap encoding, deterministic training windows, fixed
validation windows, clear errors for missing corpora and oversized blocks; and, for
every model family, masks made in the data pipeline (the same with or without worker
processes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sentencepiece as spm
import torch

from lit_modules.config_errors import ConfigError
from lit_modules.data.text import TextDataConfig, TrainWindows, ValWindows, train_tokenizer
from lit_modules.masking.batches import TokenWindows
from lit_modules.masking.plan import EvalItem, TrainItem
from lit_modules.paths import Workspace
from lit_modules.registry import MODELS
from lit_modules.run import build_datamodule

WIKI_TRAIN = "wikitext-2/raw/wiki.valid.raw"
WIKI_VAL = "wikitext-2/raw/wiki.test.raw"


def _dm(tiny_config, workspace, **overrides):
    return build_datamodule(tiny_config("gpt", overrides), workspace)


def _tokenizer_path(dm, workspace):
    return workspace.cache_dir / "tokenizers" / dm.info["data.tokenizer_file"]


def _train_items(dm) -> list[TrainItem]:
    """Every training item of the run in step order: the loader serves one validation
    interval per epoch, and Lightning calls ``set_epoch`` on its sampler each epoch."""
    loader = dm.train_dataloader()
    out: list[TrainItem] = []
    for epoch in range(math.ceil(dm.max_steps / dm.steps_per_epoch)):
        loader.sampler.set_epoch(epoch)
        out.extend(loader)
    assert [item.step for item in out] == list(range(dm.max_steps))
    return out


def _train_batches(dm) -> list[torch.Tensor]:
    """The (B, T+1) training windows of every step, in step order."""
    return [item.batch.windows for item in _train_items(dm)]


# ---------------------------------------------------------------- tokenizer and memmap


def test_tokenizer_trained_once_and_cached(tiny_config, workspace, monkeypatch):
    first = _dm(tiny_config, workspace)
    path = _tokenizer_path(first, workspace)
    assert path.is_file()
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again instead of read from the cache")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", staticmethod(no_training))
    second = _dm(tiny_config, workspace)
    assert second.info["data.tokenizer_file"] == first.info["data.tokenizer_file"]
    assert path.stat().st_mtime_ns == mtime
    assert np.array_equal(second.train_tokens, first.train_tokens)


def test_tokenizer_cache_key_follows_options_and_corpus(tiny_config, workspace, data_dir):
    base = _dm(tiny_config, workspace)
    bigger = _dm(tiny_config, workspace, **{"data.vocab_size": 384})
    a, b = _tokenizer_path(base, workspace), _tokenizer_path(bigger, workspace)
    assert a != b and a.is_file() and b.is_file()
    assert spm.SentencePieceProcessor(model_file=str(a)).get_piece_size() == 512
    assert spm.SentencePieceProcessor(model_file=str(b)).get_piece_size() == 384
    # Same options, different text: a different file; same text again: the same file.
    text = (data_dir / WIKI_TRAIN).read_text(encoding="utf-8")[:200_000]
    cfg = TextDataConfig(vocab_size=256)
    small = train_tokenizer(text, cfg, workspace.cache_dir)
    assert train_tokenizer(text, cfg, workspace.cache_dir) == small
    assert train_tokenizer(text[:150_000], cfg, workspace.cache_dir) != small
    assert train_tokenizer(text, TextDataConfig(vocab_size=256, tokenizer="unigram"), workspace.cache_dir) != small


def test_memmap_encodes_the_corpus(tiny_config, workspace, data_dir):
    dm = _dm(tiny_config, workspace)
    tokens = dm.train_tokens
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert len(tokens) == dm.info["data.train_tokens"] > 100_000
    sp = spm.SentencePieceProcessor(model_file=str(_tokenizer_path(dm, workspace)))
    assert int(tokens.max()) < sp.get_piece_size()
    assert not (tokens == sp.unk_id()).any()  # full character coverage of the train text
    # One eos per line end; decoding line by line gives back the exact text.
    text = (data_dir / WIKI_TRAIN).read_text(encoding="utf-8")
    lines = text.split("\n")
    ids = np.asarray(tokens, dtype=np.int64)
    eos = np.flatnonzero(ids == sp.eos_id())
    assert len(eos) == len(lines) and eos[-1] == len(ids) - 1
    pieces = np.split(ids, eos + 1)[:-1]
    assert sp.decode([p[:-1].tolist() for p in pieces]) == lines
    assert pieces[1][:-1].tolist() == sp.encode(lines[1])
    assert len(dm.val_tokens) == dm.info["data.val_tokens"] > 100_000


# ---------------------------------------------------------------- training windows


def test_training_windows_are_a_function_of_seed_and_step(tiny_config, workspace):
    a, b = _dm(tiny_config, workspace), _dm(tiny_config, workspace)
    batches_a, batches_b = _train_batches(a), _train_batches(b)
    cfg = tiny_config("gpt")
    assert len(batches_a) == cfg.trainer.max_steps
    for x, y in zip(batches_a, batches_b):
        assert x.shape == (cfg.data.batch_size, cfg.model.block_size + 1) and x.dtype == torch.int64
        assert torch.equal(x, y)
    # Different steps draw different windows.
    assert len({tuple(x.flatten().tolist()) for x in batches_a}) == len(batches_a)
    # Random access by step gives the same batch as iterating, and batch `step` does not
    # depend on how long the run is.
    ds = a.train_dataloader().dataset
    assert torch.equal(ds[2].batch.windows, batches_a[2])
    longer = TrainWindows(a.train_tokens, cfg.model.block_size, cfg.data.batch_size, cfg.seed, steps=100)
    assert isinstance(longer[3], TokenWindows) and torch.equal(longer[3].windows, batches_a[3])


def test_epochs_serve_consecutive_steps(tiny_config, workspace):
    """Epoch e serves steps [e * val_every, (e + 1) * val_every); the step -> batch map does
    not depend on val_every."""
    cfg = tiny_config("gpt", {"trainer.max_steps": 7, "trainer.val_every": 3})
    dm = build_datamodule(cfg, workspace)
    loader = dm.train_dataloader()
    ds = loader.dataset
    for epoch, steps in enumerate([[0, 1, 2], [3, 4, 5], [6]]):
        loader.sampler.set_epoch(epoch)
        assert len(loader) == len(steps)
        got = list(loader)
        assert [g.step for g in got] == steps
        assert all(torch.equal(g.batch.windows, ds[s].batch.windows) for g, s in zip(got, steps, strict=True))
    loader.sampler.set_epoch(3)
    assert list(loader) == []
    one_epoch = tiny_config("gpt", {"trainer.max_steps": 7, "trainer.val_every": 7})
    assert all(torch.equal(x, y) for x, y in zip(_train_batches(build_datamodule(one_epoch, workspace)),
                                                 _train_batches(dm), strict=True))


def test_windows_are_slices_of_the_corpus(tiny_config, workspace):
    dm = _dm(tiny_config, workspace)
    t = dm.block_size + 1
    view = np.lib.stride_tricks.sliding_window_view(np.asarray(dm.train_tokens), t)  # (n-T, T+1)
    for row in _train_batches(dm)[0].numpy():
        starts = np.flatnonzero(view[:, 0] == row[0])
        assert any(np.array_equal(view[s], row) for s in starts), "window is not a corpus slice"


def test_batches_independent_of_p_bw(tiny_config, workspace):
    never = _train_items(_dm(tiny_config, workspace, **{"masking.p_bw": 0.0}))
    always = _train_items(_dm(tiny_config, workspace, **{"masking.p_bw": 1.0}))
    half = _train_items(_dm(tiny_config, workspace, **{"masking.p_bw": 0.5}))
    for x, y, z in zip(never, always, half, strict=True):
        assert torch.equal(x.batch.windows, y.batch.windows) and torch.equal(x.batch.windows, z.batch.windows)
        # The views the pipeline made: forward always, backward too when the step's coin says so.
        b = x.batch.size
        assert x.masked.inputs.shape[0] == b and y.masked.inputs.shape[0] == 2 * b
        assert z.masked.inputs.shape[0] in (b, 2 * b)
        assert torch.equal(x.masked.inputs, y.masked.inputs[:b]) and torch.equal(x.masked.inputs, z.masked.inputs[:b])


def test_different_seeds_give_different_batches(tiny_config, workspace):
    s0 = _train_batches(_dm(tiny_config, workspace, seed=0))
    s1 = _train_batches(_dm(tiny_config, workspace, seed=1))
    for x, y in zip(s0, s1):
        assert not torch.equal(x, y)
        # Not a shifted copy: almost no window start is shared.
        assert len(set(x[:, 0].tolist()) & set(y[:, 0].tolist())) < x.shape[0]


def test_training_offsets_cover_the_corpus():
    """Offsets spread over the whole split and the last window ends inside it."""
    tokens = np.arange(1000, dtype=np.uint16)
    ds = TrainWindows(tokens, block_size=9, batch_size=64, seed=0, steps=50)
    starts = torch.cat([ds[s].windows[:, 0] for s in range(50)]).numpy()
    assert starts.min() >= 0 and starts.max() <= 1000 - 10
    assert starts.min() < 50 and starts.max() > 940
    # Each window is consecutive tokens.
    w = ds[0].windows
    assert torch.equal(w - w[:, :1], torch.arange(10).expand_as(w))


# ---------------------------------------------------------------- validation windows


def test_validation_windows_fixed_and_non_overlapping(tiny_config, workspace):
    a = _dm(tiny_config, workspace, seed=0)
    b = _dm(tiny_config, workspace, seed=5)
    cfg = tiny_config("gpt")
    t = cfg.model.block_size + 1
    ds = a.val_dataloader().dataset
    starts = np.asarray(ds.starts)
    assert len(ds) == cfg.data.val_windows
    assert (np.diff(starts) >= t).all(), "validation windows overlap"
    assert starts[0] == 0 and starts[-1] + t <= len(a.val_tokens)
    assert starts[-1] > len(a.val_tokens) // 2  # spread over the split, not its head
    items_a, items_b = list(a.val_dataloader()), list(b.val_dataloader())
    assert all(isinstance(x, EvalItem) for x in items_a)
    batches_a, batches_b = [x.batch.windows for x in items_a], [x.batch.windows for x in items_b]
    assert [x.shape[0] for x in batches_a] == [cfg.data.val_batch_size]  # 8 windows, batch 8
    for x, y in zip(batches_a, batches_b):
        assert torch.equal(x, y)  # independent of the seed
    for i, s in enumerate(starts):
        assert np.array_equal(batches_a[0][i].numpy(), a.val_tokens[s : s + t])
    assert torch.equal(list(a.val_dataloader())[0].batch.windows, batches_a[0])  # same every epoch
    # Every validation scores both directions of every window (p_bw plays no part).
    view = items_a[0].common[0]
    assert len(items_a[0].common) == 1 and view.direction.tolist() == [0] * 8 + [1] * 8


def test_validation_windows_all():
    tokens = np.arange(100, dtype=np.uint16)
    every = ValWindows(tokens, block_size=9, max_windows=0)
    assert len(every) == 10 and every.starts.tolist() == list(range(0, 100, 10))
    few = ValWindows(tokens, block_size=9, max_windows=4)
    assert len(few) == 4 and few.starts.tolist() == [0, 30, 60, 90]
    assert torch.equal(few[3], torch.arange(90, 100))


# ---------------------------------------------------------------- splits and errors


def test_wikitext2_declares_its_splits(tiny_config, workspace):
    info = _dm(tiny_config, workspace).info
    assert info["data.train_source"].endswith(WIKI_TRAIN)
    assert info["data.val_source"].endswith(WIKI_VAL)
    note = info["data.split_note"]
    assert "wiki.valid.raw" in note and "wiki.test.raw" in note
    assert all(isinstance(v, str | int) for v in info.values())  # loggable as MLflow params


def test_missing_corpus_is_a_one_line_error(tiny_config, tmp_path):
    ws = Workspace.resolve(tmp_path / "out", tmp_path / "no-data")
    with pytest.raises(ConfigError) as e:
        build_datamodule(tiny_config("gpt"), ws)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "no-data" / WIKI_TRAIN) in msg
    assert "MASKLAB_DATA_DIR" in msg and "--data-dir" in msg
    assert "masklab data fetch wikitext-2" in msg
    assert e.value.field == "data.path"


def test_local_text_without_path(tiny_config, workspace):
    with pytest.raises(ConfigError, match="data.path"):
        _dm(tiny_config, workspace, **{"data.name": "text"})


def test_block_size_larger_than_corpus(tiny_config, workspace):
    cfg = tiny_config("gpt", {"model.block_size": 10_000_000})
    with pytest.raises(ConfigError) as e:
        build_datamodule(cfg, workspace)
    msg = str(e.value)
    assert e.value.field == "model.block_size" and "\n" not in msg
    assert msg.startswith("model.block_size = 10000000") and "at most" in msg


# ---------------------------------------------------------------- masks made in the pipeline


def _items_equal(a, b, where: str = "item") -> None:
    """Two items (frozen dataclasses of tensors, nested) are bit-identical."""
    import dataclasses

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            _items_equal(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _items_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _items_equal(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("name", MODELS.names())
def test_the_data_pipeline_makes_the_masks(tiny_config, workspace, name):
    """A training loader's items already carry their masks (the model's training step
    builds none), drawn by the run's strategy for that step; validation items carry the
    K evaluation masks. The items are bit-identical whether the masks are drawn in the
    main process or in two DataLoader worker processes."""
    from torch.utils.data import DataLoader

    cfg = tiny_config(name)
    dm = build_datamodule(cfg, workspace)
    loader = dm.train_dataloader()
    here = list(loader)
    assert [item.step for item in here] == list(range(cfg.trainer.val_every))
    plan = dm.plan
    for item in here:
        assert isinstance(item, TrainItem) and isinstance(item.batch, cfg.model.consumes)
        assert item.masked is not None and item.masked.loss_mask.any()
        # The masks are the strategy's, at the step's mask index and schedule position.
        direct = cfg.masking(item.batch, plan.train_context(item.step))
        _items_equal(item.masked, direct, "masked")
    workers = DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, num_workers=2)
    there = list(workers)
    assert len(there) == len(here)
    for a, b in zip(here, there):
        _items_equal(a, b)

    val = dm.val_dataloader()
    val_here = list(val)
    assert val_here and all(isinstance(v, EvalItem) for v in val_here)
    assert len(val_here[0].common) == getattr(cfg.model, "eval_masks", 1)
    val_there = list(DataLoader(val.dataset, batch_size=val.batch_size, collate_fn=val.collate_fn, num_workers=2))
    assert len(val_there) == len(val_here)
    for a, b in zip(val_here, val_there):
        _items_equal(a, b)
