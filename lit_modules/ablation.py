"""Layer-removal evaluation, generic over models that expose their blocks.

For k = 0..L blocks removed from the back, the model is re-scored with the final norm
and head applied to the hidden state after block L-k. One forward pass keeps the hidden
state after every block, so all L+1 truncations cost one pass (``test_ablation`` checks
this equals deleting the blocks and re-running). The same pass gives per-block
Block Influence, BI_i = 1 - cos(x_i, x_{i+1}) (Men et al. 2024, "ShortGPT"), and the
angular distance arccos(cos(x_i, x_j)) / pi between block inputs (Gromov et al. 2024).
Drop-one (each block removed alone) restarts from the cached input of that block.

Output: a tidy DataFrame, one row per variant x blocks removed x metric, columns
``variant, removed, block, metric, value``:
- ``truncate``: ``removed`` = k blocks removed from the back, ``block`` = <NA>;
- ``drop_one``: ``block`` = the block removed alone, ``removed`` = 1;
- ``block_influence``: ``block`` = i, ``removed`` = <NA>;
- ``angular_distance``: between the inputs of blocks i and i + n: ``block`` = i,
  ``removed`` = n (the span); the input of "block L" is the last block's output.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import pandas as pd
import torch
from torch import Tensor

from .config import AblationOptions
from .masking import MaskedBatch

COLUMNS = ["variant", "removed", "block", "metric", "value"]


def hidden_states(model, masked: MaskedBatch) -> list[Tensor]:
    """[x_0, x_1, ..., x_L]: the input of block 0 and the output of every block."""
    h = model.ablation_embed(masked)
    states = [h]
    for block in model.blocks:
        h = block(h, masked.attention)
        states.append(h)
    return states


def _token_cosine(a: Tensor, b: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum over scored tokens of cos(a, b) and of the angular distance; a, b (B, T, D)."""
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1, 1)  # (B, T)
    m = mask.to(cos.dtype)
    return (cos * m).sum(), (torch.arccos(cos) / torch.pi * m).sum()


class _Accumulator:
    def __init__(self):
        self.sums: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def add(self, key: tuple, total: Tensor | float, count: Tensor | float) -> None:
        s = self.sums[key]
        s[0] += float(total)
        s[1] += float(count)

    def add_scores(self, variant: str, removed, block, scores: dict) -> None:
        for metric, (total, count) in scores.items():
            self.add((variant, removed, block, metric), total, count)

    def frame(self) -> pd.DataFrame:
        rows = [(*k, s / c if c else float("nan")) for k, (s, c) in self.sums.items()]
        df = pd.DataFrame(rows, columns=COLUMNS)
        df["removed"] = df["removed"].astype("Int64")
        df["block"] = df["block"].astype("Int64")
        return df


@torch.no_grad()
def layer_removal(model, batches: Iterable, options: AblationOptions = AblationOptions()) -> pd.DataFrame:
    """Run the layer-removal variants over ``batches`` (the validation loader's
    ``EvalItem`` s: the model stacks their evaluation masks)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_blocks = len(model.blocks)
    acc = _Accumulator()
    try:
        for i, batch in enumerate(batches):
            if options.max_batches and i >= options.max_batches:
                break
            masked = model.ablation_batch(batch.to(device))
            states = hidden_states(model, masked)
            if options.truncate:
                for k in range(n_blocks + 1):
                    acc.add_scores("truncate", k, None, model.ablation_score(states[n_blocks - k], masked))
            if options.drop_one:
                for skip in range(n_blocks):
                    h = states[skip]
                    for block in list(model.blocks)[skip + 1:]:
                        h = block(h, masked.attention)
                    acc.add_scores("drop_one", 1, skip, model.ablation_score(h, masked))
            if options.similarity:
                # Tokens compared between blocks: the scored ones, unless the model says
                # otherwise (an MAE's hidden states are the visible patches, not the scored).
                token_mask = model.ablation_token_mask(masked, states[0])
                _similarity(states, token_mask, acc)
    finally:
        model.train(was_training)
    return acc.frame()


def _similarity(states: list[Tensor], mask: Tensor, acc: _Accumulator) -> None:
    n = len(states)
    count = mask.sum()
    for i in range(n):
        for j in range(i + 1, n):
            cos_sum, ang_sum = _token_cosine(states[i], states[j], mask)
            if j == i + 1:
                acc.add(("block_influence", None, i, "block_influence"), count - cos_sum, count)
            acc.add(("angular_distance", j - i, i, "angular_distance"), ang_sum, count)


def truncation_curves(df: pd.DataFrame) -> pd.DataFrame:
    """The ``truncate`` rows as a wide table: index = blocks removed, one column per metric."""
    t = df[df["variant"] == "truncate"]
    return t.pivot(index="removed", columns="metric", values="value").sort_index()
