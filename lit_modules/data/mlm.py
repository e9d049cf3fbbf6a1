"""The masked-LM layout of the text datasets: padded sequences ``[CLS] text [SEP] [PAD]...``.

The tokenizer of this layout reserves four symbols right after ``<unk>`` (0) and the
line separator ``</s>`` (1): ``[CLS]`` = 2, ``[SEP]`` = 3, ``[MASK]`` = 4, ``[PAD]`` = 5;
ordinary pieces start at ``FIRST_PIECE`` = 6 (random replacements are drawn from there).

A batch is a dict of (B, T) tensors:
- ``tokens``: ids; ``valid``: False at padding (the attention padding mask);
- ``eligible``: may be selected for masking (False at specials, line separators, padding);
- ``word_start``: the token begins a word (SentencePiece's ``▁`` prefix; specials count
  as boundaries), used by whole-word and span masking.

Training: item ``step`` is the batch of that step (as for the causal layout): random
offsets drawn from ``(seed, step)``, ``block_size - 2`` tokens cut at the last line end
in their second half, so lengths vary and padding is real. Validation: the split's lines
(paragraphs) of at least ``MIN_LINE`` tokens, truncated, evenly spread, fixed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..masking.batches import TokenRows
from ..masking.rng import Stream, step_bits

SPECIALS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]")
CLS, SEP, MASK, PAD = 2, 3, 4, 5
FIRST_PIECE = 6
EOS = 1
MIN_LINE = 8  # shorter validation lines (headings, blank lines) carry too few tokens to mask


def word_start_table(tokenizer_path) -> np.ndarray:
    """(V,) bool: piece begins a word (``▁`` prefix) or is a special/control symbol."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    for i, s in enumerate(SPECIALS):
        assert sp.piece_to_id(s) == CLS + i, "tokenizer lacks the MLM specials at their ids"
    table = np.array([sp.id_to_piece(i).startswith("▁") for i in range(sp.get_piece_size())])
    table[:FIRST_PIECE] = True
    return table


def pack(rows: list[np.ndarray], length: int, word_start: np.ndarray, vocab_size: int) -> TokenRows:
    """Rows of piece ids -> the padded (B, length) batch: ``[CLS] row [SEP] [PAD]...``,
    random replacements drawn from the pieces (ids >= FIRST_PIECE)."""
    b = len(rows)
    tokens = np.full((b, length), PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        seq = np.concatenate(([CLS], r[: length - 2], [SEP]))
        tokens[i, : len(seq)] = seq
    t = torch.from_numpy(tokens)
    valid = t != PAD
    eligible = t >= FIRST_PIECE
    ws = torch.from_numpy(word_start[tokens])
    ws[:, 1] = True  # the first text token starts a word even without the ▁ prefix
    return TokenRows(tokens=t, valid=valid, eligible=eligible, word_start=ws, vocab_size=vocab_size,
                     mask_token_id=MASK, random_low=FIRST_PIECE)


class MLMTrainBatches(Dataset):
    """Item ``step``: the whole (B, block_size) batch of that step."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, steps: int,
                 word_start: np.ndarray, vocab_size: int):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.steps, self.word_start, self.vocab_size = seed, steps, word_start, vocab_size
        self.span = block_size - 2
        self.n_offsets = len(tokens) - self.span

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> TokenRows:
        bits = step_bits(self.seed, step, Stream.MLM_BATCH, self.batch_size)  # (B,)
        rows = []
        for o in (bits % self.n_offsets).tolist():
            chunk = np.asarray(self.tokens[o : o + self.span], dtype=np.int64)
            ends = np.flatnonzero(chunk[self.span // 2 :] == EOS)
            if len(ends):  # end at the last line break in the second half
                chunk = chunk[: self.span // 2 + ends[-1]]
            rows.append(chunk)
        return pack(rows, self.block_size, self.word_start, self.vocab_size)


class MLMValSequences(Dataset):
    """Fixed validation sequences: lines of >= MIN_LINE tokens, evenly spread."""

    def __init__(self, tokens: np.ndarray, block_size: int, max_sequences: int):
        arr = np.asarray(tokens, dtype=np.int64)
        ends = np.flatnonzero(arr == EOS)
        starts = np.concatenate(([0], ends[:-1] + 1))
        keep = (ends - starts) >= MIN_LINE
        starts, ends = starts[keep], ends[keep]
        if max_sequences and len(starts) > max_sequences:
            pick = np.unique(np.linspace(0, len(starts) - 1, max_sequences).round().astype(np.int64))
            starts, ends = starts[pick], ends[pick]
        self.rows = [arr[s : min(e, s + block_size - 2)] for s, e in zip(starts, ends)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.rows[i]


class PadCollate:
    """Pads a list of rows to the longest in the batch (+ [CLS]/[SEP])."""

    def __init__(self, word_start: np.ndarray, vocab_size: int):
        self.word_start, self.vocab_size = word_start, vocab_size

    def __call__(self, rows: list[np.ndarray]) -> TokenRows:
        return pack(rows, max(len(r) for r in rows) + 2, self.word_start, self.vocab_size)
