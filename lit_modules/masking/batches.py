"""What a batch holds, by kind: the typed batches the data pipeline assembles and the
masking strategies accept.

Each masking strategy declares the kind it accepts (``accepts``) and each model family
the kind it consumes (``consumes`` on its config); a strategy fits a model when the two
are the same class, so compatibility is derived, never listed by name.

Every kind moves between devices with ``.to(device)`` and pins with ``.pin_memory()``
(what the DataLoader and Lightning call), and is plain data (pickled to DataLoader
worker processes). Axis letters as in ``masking/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


def _map_tensors(obj: Any, fn) -> Any:
    """A copy of the dataclass ``obj`` with ``fn`` applied to every tensor field (and to
    the tensors inside nested batches, lists and dicts)."""
    import torch

    def visit(v):
        if isinstance(v, torch.Tensor):
            return fn(v)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return _map_tensors(v, fn)
        if isinstance(v, (list, tuple)):
            return type(v)(visit(x) for x in v)
        if isinstance(v, dict):
            return {k: visit(x) for k, x in v.items()}
        return v

    changes = {f.name: visit(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return dataclasses.replace(obj, **changes)


class Movable:
    """``.to(device)`` and ``.pin_memory()`` for a frozen dataclass of tensors."""

    def to(self, device, non_blocking: bool = False):
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self):
        return _map_tensors(self, lambda t: t.pin_memory())


@dataclass(frozen=True)
class TokenWindows(Movable):
    """Causal-LM windows: ``windows`` (B, T+1) token ids; a model reads T of them and
    predicts the next (or, read backward, the previous) token."""

    windows: Tensor

    @property
    def size(self) -> int:
        return self.windows.shape[0]


@dataclass(frozen=True)
class TokenRows(Movable):
    """Masked-LM rows: ``tokens`` (B, T) ids ``[CLS] text [SEP]`` then padding;
    ``valid`` (B, T) bool, False at padding; ``eligible`` (B, T) bool, the tokens a
    masking may select (not special, not padding); ``word_start`` (B, T) bool, True at
    the first token of a word (None when unknown). The vocabulary: ``vocab_size`` ids,
    ``mask_token_id`` = [MASK], random replacements drawn from ``[random_low,
    vocab_size)``."""

    tokens: Tensor
    valid: Tensor
    eligible: Tensor
    word_start: Tensor | None
    vocab_size: int
    mask_token_id: int
    random_low: int = 0

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


@dataclass(frozen=True)
class Images(Movable):
    """``images`` (B, C, H, W) float; ``keys`` (B,) int64 content keys (a hash of each
    image's bytes); ``labels`` (B,) int64 or None; ``grid`` (h, w), the patch grid a
    patch masking works on (set by the model, which knows its patch size); ``index``
    (B,) int64 the images' rows in their dataset, or None."""

    images: Tensor
    keys: Tensor
    labels: Tensor | None = None
    grid: tuple[int, int] | None = None
    index: Tensor | None = None  # (B,) int64 each image's row in its dataset

    @property
    def size(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class Clips(Movable):
    """Video clips: ``clips`` (B, F, C, H, W) float pixels, or (B, F, h, w) int64 ids of
    a discrete tokenizer (``kind`` = "pixels" | "tokens"); ``keys`` (B,) int64 content
    keys; ``grid`` (F', h, w), the tubelet grid a video masking works on (set by the
    model); ``index`` (B,) int64 the clips' rows in their dataset, or None."""

    clips: Tensor
    keys: Tensor
    kind: str = "pixels"
    grid: tuple[int, int, int] | None = None
    index: Tensor | None = None  # (B,) int64 each clip's row in its dataset
    actions: Tensor | None = None  # (B, F) int64 the action taken at each frame (action-conditioned data)

    @property
    def size(self) -> int:
        return self.clips.shape[0]


KINDS = (TokenWindows, TokenRows, Images, Clips)


def kind_name(kind: type) -> str:
    """``TokenRows`` -> ``token rows`` (for messages)."""
    return "".join(f" {c.lower()}" if c.isupper() else c for c in kind.__name__).strip()
