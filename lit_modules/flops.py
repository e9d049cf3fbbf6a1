"""Training FLOPs of a step, from the model's shapes.

Every family counts the matrix products its training step runs (a multiply-add is 2
FLOPs): per transformer block on R rows of T tokens of width D, 24·R·T·D² for the
projections (QKV 3D², output D², MLP 8D²) and 4·R·T²·D for the attention scores and
their weighted sum (counted over the full T x T square, as a dense kernel computes it;
a causal kernel skips about half); plus the family's own embeddings and heads on the
tokens they run on (BERT's head only at the masked positions, an MAE encoder only on
the visible patches). The backward pass costs twice the forward (gradients of the
inputs and of the weights), except for a first layer whose input needs no gradient (a
patch embedding of pixels: weights only, once) and for products no gradient flows
through (BEiT's tokenizer finding each patch's word: forward only). LayerNorms, activations, softmax and
losses are not counted: they are a few percent of a step at any realistic width.
``tests/test_flops.py`` checks every family against torch's own FLOP counter.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs of a step: ``dense`` (backward 2x), ``first`` (backward 1x),
    ``nograd`` (no backward: e.g. BEiT's tokenizer finding each patch's word)."""

    dense: float = 0.0
    first: float = 0.0
    nograd: float = 0.0

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.dense + other.dense, self.first + other.first, self.nograd + other.nograd)

    @property
    def training(self) -> float:
        """Forward plus backward."""
        return 3 * self.dense + 2 * self.first + self.nograd


def linear(tokens: float, d_in: int, d_out: int) -> Flops:
    return Flops(dense=2.0 * tokens * d_in * d_out)


def encoder(rows: int, tokens: int, width: int, depth: int, pairs: float | None = None) -> Flops:
    """``depth`` pre-LN blocks (4x MLP) on ``rows`` sequences of ``tokens`` tokens; ``pairs``:
    the query-key pairs a block's attention computes per sequence (default tokens², a
    dense kernel; a sparse pattern's kernel computes fewer, ``blocks.attention_pairs``)."""
    pairs = tokens**2 if pairs is None else pairs
    per_block = 24.0 * rows * tokens * width**2 + 4.0 * rows * pairs * width
    return Flops(dense=depth * per_block)


def first_layer(tokens: float, d_in: int, d_out: int) -> Flops:
    """A first layer whose input needs no gradient (patch or tubelet embedding of pixels)."""
    return Flops(first=2.0 * tokens * d_in * d_out)
