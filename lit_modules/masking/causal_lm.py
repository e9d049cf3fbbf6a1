"""Forward- and backward-causal language modelling on the same tokens.

Forward:  position t predicts token t+1 from tokens <= t.
Backward: position t predicts token t-1 from tokens >= t.

The backward task is built by reversing the sequence and using the ordinary causal
pattern: in the reversed sequence r = flip(x), r-position s predicts r[s+1] from r[<= s],
which is exactly "x-position t predicts x[t-1] from x[>= t]" with t = T-1-s. The fused
``is_causal`` kernel then serves both directions; no dense T x T mask is built, and the
reversed sequence gets positions 0..T-1 in reading order (position = how many tokens of
context precede it in the direction being read), the mirror image of the forward task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..config_errors import ConfigError
from ..lazy import LazyModule
from ..registry import MASKINGS
from . import MaskContext, MaskedBatch, MaskingStrategy
from .attention import Attention
from .batches import TokenWindows
from .rng import Stream, step_uniform

if TYPE_CHECKING:
    from torch import Tensor

torch = LazyModule("torch")  # imported on first use (lit_modules/lazy.py)

FORWARD, BACKWARD = 0, 1
DIRECTIONS = {"fw": FORWARD, "bw": BACKWARD}


def reading_order(tokens: Tensor, direction: str) -> Tensor:
    """(B, T) tokens in the order a ``direction`` model reads them. An involution:
    applying it to (B, T, ...) outputs in reading order maps them back."""
    if direction not in DIRECTIONS:
        raise ConfigError("direction", direction, "allowed: fw, bw")
    return tokens if direction == "fw" else tokens.flip(1)


@MASKINGS.register("causal-lm")
@dataclass(frozen=True)
class CausalLM(MaskingStrategy):
    """Forward causal LM plus, with probability ``p_bw`` per training step, the backward
    causal LM on the same tokens (the two losses are summed)."""

    accepts: ClassVar[type] = TokenWindows
    name: str = "causal-lm"
    p_bw: float = 0.0

    def __post_init__(self):
        if isinstance(self.p_bw, bool) or not 0.0 <= self.p_bw <= 1.0:
            raise ConfigError("p_bw", self.p_bw, "must be a probability in [0, 1]")

    def use_backward(self, global_seed: int, step: int) -> bool:
        """The per-step coin: its own stream seeded by (seed, step), independent of the
        batch sampler, so runs that differ only in p_bw see identical batches."""
        if self.p_bw <= 0.0:
            return False
        return step_uniform(global_seed, step, Stream.BW_COIN) < self.p_bw

    def directions(self, ctx: MaskContext) -> tuple[str, ...]:
        """Training: forward, plus backward when the step's coin says so; every other
        stage scores both directions."""
        if ctx.stage != "train" or self.use_backward(ctx.seed, int(ctx.step or 0)):
            return ("fw", "bw")
        return ("fw",)

    def __call__(self, batch: TokenWindows, ctx: MaskContext) -> MaskedBatch:
        """(B, T+1) token windows -> one batch of len(directions) * B rows, each direction
        in reading order, stacked along the batch (one fused forward pass for all)."""
        if not isinstance(batch, TokenWindows):
            raise ValueError(f"causal-lm masks TokenWindows, got {type(batch).__name__}")
        return stacked_views(batch.windows, self.directions(ctx))


def stacked_views(window: Tensor, directions: tuple[str, ...]) -> MaskedBatch:
    """The causal-LM views of (B, T+1) windows in each of ``directions``, stacked."""
    b = window.shape[0]
    inputs, targets, dirs = [], [], []
    for d in directions:
        seq = reading_order(window, d)  # (B, T+1)
        inputs.append(seq[:, :-1])
        targets.append(seq[:, 1:])
        dirs.append(torch.full((b,), DIRECTIONS[d], dtype=torch.long, device=window.device))
    inp = torch.cat(inputs)  # (nB, T)
    return MaskedBatch(
        inputs=inp,
        targets=torch.cat(targets),
        loss_mask=torch.ones_like(inp, dtype=torch.bool),
        attention=Attention(causal=True),
        direction=torch.cat(dirs),
    )
