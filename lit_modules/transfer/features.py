"""Frozen features of every layer from one pass, for the probes.

A task's inputs are put in the model's form (text tokenized with the run's own
tokenizer; images and clips scaled as the run's data module scales them), embedded by
the family's ``transfer_embed``, and run through the blocks once; after each block (and
for the embeddings, layer 0) the family's final norm is applied and its
``transfer_pool`` pools each feature kind: the same hidden states the layer-removal
ablation scores, so layer l of the probe curve is the model with L - l blocks removed.
Eval mode, no grad, in fixed batches: the features of a run are the same to the last
digit every time they are computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..masking.batches import Movable


@dataclass(frozen=True)
class TextRows(Movable):
    """Token rows right-padded with 0: ``ids`` (B, T), ``valid`` (B, T) False at padding,
    ``lengths`` (B,) >= 1."""

    ids: Tensor
    valid: Tensor
    lengths: Tensor


def encode_texts(texts: Sequence[str], tokenizer: Path, max_tokens: int) -> list[np.ndarray]:
    """Each text as the run's tokenizer's piece ids, cut to ``max_tokens`` (an empty text
    becomes the one token ``<unk>``)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    out = []
    for ids in sp.encode(list(texts)):
        ids = ids[:max_tokens] or [0]
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def text_rows(rows: Sequence[np.ndarray]) -> TextRows:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(r) for r in rows], batch_first=True)
    valid = torch.arange(ids.shape[1])[None] < lengths[:, None]
    return TextRows(ids, valid, lengths)


def model_inputs(kind: str, x, cfg, tokenizer: Path | None, max_tokens: int) -> Sequence:
    """The task inputs ``x`` in a form ``batches`` can slice."""
    if kind == "text":
        return encode_texts(x, tokenizer, text_budget(cfg, max_tokens))
    return x  # uint8 arrays, converted per batch


def text_budget(cfg, max_tokens: int) -> int:
    """Tokens of a task row the model can read: the masked-LM row layout (BERT, ELECTRA)
    adds [CLS] and [SEP]."""
    from ..registry import MODELS

    reserved = 2 if MODELS.get(cfg.model.name).data_layout == "mlm" else 0
    return max(1, min(max_tokens, cfg.model.block_size - reserved))


def batches(kind: str, inputs: Sequence, cfg, batch_size: int) -> Iterator:
    """Model-ready batches of the inputs, in order."""
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        if kind == "text":
            yield text_rows(chunk)
        elif kind == "image":
            from ..data.images import to_float

            yield to_float(np.asarray(chunk), cfg.data.normalize)
        else:
            from ..data.video import to_float

            yield to_float(np.asarray(chunk))


@torch.no_grad()
def layer_features(model, kind: str, inputs: Sequence, cfg, features: Sequence[str],
                   batch_size: int) -> dict[str, np.ndarray]:
    """{feature: (L + 1, N, D) float32}: the pooled features after every block. Text
    rows are batched in order of length (less padding), the result in input order."""
    order = np.argsort([len(r) for r in inputs], kind="stable") if kind == "text" else None
    if order is not None:
        inputs = [inputs[i] for i in order]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[list[Tensor]]] = {f: [[] for _ in range(len(model.blocks) + 1)] for f in features}
    try:
        for batch in batches(kind, inputs, cfg, batch_size):
            batch = batch.to(device)
            h, attention, ctx = model.transfer_embed(batch)
            for layer in range(len(model.blocks) + 1):
                if layer:
                    h = model.blocks[layer - 1](h, attention)
                pooled = model.transfer_pool(model.transfer_norm(h), ctx)
                for f in features:
                    out[f][layer].append(pooled[f].float().cpu())
    finally:
        model.train(was_training)
    feats = {f: torch.stack([torch.cat(parts) for parts in layers]).numpy() for f, layers in out.items()}
    if order is not None:
        back = np.argsort(order)
        feats = {f: v[:, back] for f, v in feats.items()}
    return feats


def top_features(model, batch, feature: str) -> Tensor:
    """The last layer's pooled ``feature`` of one batch, with grad (for fine-tuning)."""
    h, attention, ctx = model.transfer_embed(batch)
    for block in model.blocks:
        h = block(h, attention)
    return model.transfer_pool(model.transfer_norm(h), ctx)[feature]
