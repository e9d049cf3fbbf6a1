"""Text corpora -> SentencePiece ids in a numpy memmap -> token windows.

Training batches are random windows of ``block_size + 1`` tokens whose offsets are a
pure function of (seed, step): batch ``step`` is the same in every run with that seed,
whatever its p_bw, and independent of the per-step backward coin. Validation uses fixed,
non-overlapping windows spread evenly over the validation split.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config_errors import ConfigError
from ..masking.batches import TokenWindows
from ..masking.plan import MaskPlan
from ..masking.rng import Stream, step_bits
from ..paths import Workspace, atomic_write
from ..registry import DATASETS
from .configs import TextDataConfig
from .loading import LoaderMixin
from .masked import EvalCollate, Planned
from .steps import StepSampler


@dataclass(frozen=True)
class Splits:
    train: str
    val: str
    train_source: str
    val_source: str
    note: str = ""


# ---------------------------------------------------------------- tokenizer + memmap


def train_tokenizer(text: str, cfg: TextDataConfig, cache_dir: Path, specials: tuple[str, ...] = ()) -> Path:
    """SentencePiece trained on ``text``, cached by (corpus hash, options).

    ``specials`` are reserved as user-defined symbols right after <unk> and </s>."""
    import sentencepiece as spm

    options = {
        "model_type": cfg.tokenizer,
        "vocab_size": cfg.vocab_size,
        # Identity normalization and kept whitespace: ids decode back to the exact text.
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "character_coverage": 1.0,
        "unk_id": 0,
        "eos_id": 1,  # used as the line separator
        "bos_id": -1,
        "pad_id": -1,
        # WikiText paragraphs run to several thousand bytes; the default 4192 drops them.
        "max_sentence_length": 1 << 16,
    }
    if specials:
        options["user_defined_symbols"] = ",".join(specials)
    key = hashlib.sha256(text.encode() + json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / "tokenizers" / f"spm-{key}.model"
    if path.exists():
        return path
    lines = [ln for ln in text.split("\n") if ln.strip()]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, num_threads=os.cpu_count() or 1,
            minloglevel=2, **options,
        )
    except RuntimeError as e:
        raise ConfigError("data.vocab_size", cfg.vocab_size, f"SentencePiece cannot train it on this corpus ({str(e).splitlines()[0]})") from None
    atomic_write(path, model.getvalue())
    return path


def encode_to_memmap(text: str, tokenizer: Path, cache_dir: Path) -> np.memmap:
    """Encode once into a .npy cache (one eos id per line end); open it as a memmap."""
    import sentencepiece as spm

    key = hashlib.sha256(text.encode() + tokenizer.name.encode()).hexdigest()[:16]
    path = cache_dir / "tokens" / f"{tokenizer.stem}-{key}.npy"
    if not path.exists():
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        lines = text.split("\n")
        ids = sp.encode(lines, num_threads=os.cpu_count() or 1)
        eos = sp.eos_id()
        flat = np.fromiter((i for line in ids for i in (*line, eos)), dtype=np.int64)
        dtype = np.uint16 if sp.get_piece_size() <= 1 << 16 else np.int32
        buf = io.BytesIO()
        np.save(buf, flat.astype(dtype))
        atomic_write(path, buf.getvalue())
    return np.load(path, mmap_mode="r")


# ---------------------------------------------------------------- datasets


class TrainWindows(Dataset):
    """Item ``step`` is the whole batch of step ``step``: (B, T+1) int64 windows."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, steps: int):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.steps = seed, steps
        self.n_offsets = len(tokens) - block_size  # window [o, o + T] needs o + T < n

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> TokenWindows:
        bits = step_bits(self.seed, step, Stream.TEXT_BATCH, self.batch_size)  # (B,)
        offsets = (bits % self.n_offsets).numpy()
        idx = offsets[:, None] + np.arange(self.block_size + 1)[None, :]  # (B, T+1)
        return TokenWindows(torch.from_numpy(self.tokens[idx].astype(np.int64)))


class ValWindows(Dataset):
    """Fixed non-overlapping windows of T+1 tokens, evenly spread over the split."""

    def __init__(self, tokens: np.ndarray, block_size: int, max_windows: int):
        self.tokens, self.block_size = tokens, block_size
        total = len(tokens) // (block_size + 1)
        if max_windows and total > max_windows:
            starts = np.unique(np.linspace(0, total - 1, max_windows).round().astype(np.int64))
        else:
            starts = np.arange(total)
        self.starts = starts * (block_size + 1)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = int(self.starts[i])
        return torch.from_numpy(self.tokens[s : s + self.block_size + 1].astype(np.int64))


def stack_windows(windows: list[torch.Tensor]) -> TokenWindows:
    return TokenWindows(torch.stack(windows))


# ---------------------------------------------------------------- data modules


class TextDataModule(LoaderMixin, L.LightningDataModule):
    NOTE = ""  # said in every report's header (e.g. which split stands in for which)
    """Base of every text dataset: subclasses say where the train/val text comes from."""

    Config = TextDataConfig

    def __init__(
        self, cfg: TextDataConfig, block_size: int, seed: int, max_steps: int, workspace: Workspace,
        steps_per_epoch: int | None = None, layout: str = "windows", plan: MaskPlan | None = None,
    ):
        """``layout``: "windows" (causal LM: (B, T+1) windows) or "mlm" (padded
        [CLS] ... [SEP] sequences with word starts, see ``data/mlm.py``). ``plan``: the
        run's masking, applied to every batch the loaders assemble (None: unmasked)."""
        super().__init__()
        self.layout, self.plan = layout, plan
        self.word_start = None
        self.cfg, self.block_size, self.seed, self.max_steps = cfg, block_size, seed, max_steps
        self.steps_per_epoch = steps_per_epoch or max_steps
        self.workspace = workspace
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None
        self.info: dict[str, object] = {}

    def read_splits(self) -> Splits:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_tokens is not None:
            return
        splits = self.read_splits()
        cache = self.workspace.cache_dir
        from . import mlm

        tokenizer = train_tokenizer(splits.train, self.cfg, cache, mlm.SPECIALS if self.layout == "mlm" else ())
        self.tokenizer_path = tokenizer  # transfer tasks are tokenized with it too
        if self.layout == "mlm":
            self.word_start = mlm.word_start_table(tokenizer)
        self.train_tokens = encode_to_memmap(splits.train, tokenizer, cache)
        self.val_tokens = encode_to_memmap(splits.val, tokenizer, cache)
        for split, toks in (("train", self.train_tokens), ("val", self.val_tokens)):
            if len(toks) < self.block_size + 2:
                raise ConfigError(
                    "model.block_size", self.block_size,
                    f"exceeds the {split} split of {self.cfg.name} ({len(toks)} tokens); "
                    f"allowed: at most {len(toks) - 2}",
                )
        self.info = {
            "data.train_source": splits.train_source,
            "data.val_source": splits.val_source,
            "data.split_note": splits.note,
            "data.train_tokens": len(self.train_tokens),
            "data.val_tokens": len(self.val_tokens),
            "data.tokenizer_file": tokenizer.name,
            "data.summary": self._summary(splits),
        }

    def _summary(self, splits: Splits) -> str:
        """One line for reports: what was trained on and what every trial is scored on."""
        val = self.val_dataloader().dataset
        if self.layout == "mlm":
            scored = f"{len(val)} sequences, {sum(len(r) for r in val.rows):,} tokens"
        else:
            scored = f"{len(val)} windows x {self.block_size} tokens = {len(val) * self.block_size:,} tokens"
        text = (f"trained on {Path(splits.train_source).name} ({len(self.train_tokens):,} tokens); "
                f"validated on {Path(splits.val_source).name} ({scored})")
        return f"{text}; {self.NOTE}" if self.NOTE else text

    def train_dataloader(self) -> DataLoader:
        sampler = StepSampler(self.max_steps, self.steps_per_epoch)
        if self.layout == "mlm":
            from .mlm import MLMTrainBatches

            ds = MLMTrainBatches(self.train_tokens, self.block_size, self.cfg.batch_size, self.seed, self.max_steps,
                                 self.word_start, self.cfg.vocab_size)
        else:
            ds = TrainWindows(self.train_tokens, self.block_size, self.cfg.batch_size, self.seed, self.max_steps)
        return self.loader(Planned(ds, self.plan), batch_size=None, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        if self.layout == "mlm":
            from .mlm import MLMValSequences, PadCollate

            ds = MLMValSequences(self.val_tokens, self.block_size, self.cfg.val_windows)
            collate = PadCollate(self.word_start, self.cfg.vocab_size)
        else:
            ds = ValWindows(self.val_tokens, self.block_size, self.cfg.val_windows)
            collate = stack_windows
        return self.loader(ds, pin=False, batch_size=self.cfg.val_batch_size, shuffle=False,
                          collate_fn=EvalCollate(self.plan, collate))

    # helpers for subclasses
    def _read(self, relative: str) -> tuple[str, Path]:
        path = self.workspace.data_file(relative, "data.path", self.cfg.name)
        return path.read_text(encoding="utf-8"), path

    def _split_tail(self, text: str, source: str) -> Splits:
        """Hold out the last ``val_fraction`` of the text, cut at a line boundary."""
        cut = int(len(text) * (1 - self.cfg.val_fraction))
        nl = text.rfind("\n", 0, cut)
        cut = nl + 1 if nl > 0 else cut
        frac = self.cfg.val_fraction
        return Splits(
            text[:cut], text[cut:], source, source,
            f"train = first {1 - frac:.0%} of {Path(source).name}, val = last {frac:.0%}",
        )


@DATASETS.register("wikitext-2")
class WikiText2(TextDataModule):
    """WikiText-2 raw: trains on wiki.valid.raw, validates on wiki.test.raw (the train
    split is not available offline; recorded in the run)."""

    NOTE = "WikiText-2's train split is not available offline, so its valid split trains"

    def read_splits(self) -> Splits:
        train, tp = self._read("wikitext-2/raw/wiki.valid.raw")
        val, vp = self._read("wikitext-2/raw/wiki.test.raw")
        return Splits(train, val, str(tp), str(vp), "train = wiki.valid.raw, val = wiki.test.raw (train split not available offline)")


@DATASETS.register("tinyshakespeare")
class TinyShakespeare(TextDataModule):
    """Tiny Shakespeare (1.1 MB of plays); validation is the last 10% (val_fraction)."""

    def read_splits(self) -> Splits:
        text, path = self._read("tinyshakespeare/input.txt")
        return self._split_tail(text, str(path))


@DATASETS.register("text")
class LocalText(TextDataModule):
    """Any local text file, or a folder of *.txt files (concatenated in name order)."""

    def read_splits(self) -> Splits:
        if not self.cfg.path:
            raise ConfigError("data.path", self.cfg.path, "required for dataset 'text': a text file or a folder of *.txt files")
        path = self.workspace.data_file(self.cfg.path, "data.path")
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise ConfigError("data.path", str(path), "folder holds no *.txt files")
            text = "\n".join(f.read_text(encoding="utf-8") for f in files)
        else:
            text = path.read_text(encoding="utf-8")
        return self._split_tail(text, str(path))
