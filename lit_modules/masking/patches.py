"""Patch masking for masked autoencoders (MAE): which patches of an image the encoder
sees, and which it must reconstruct.

Axis legend: B batch, N = h * w patches on the (h, w) patch grid (row-major: patch
``i`` sits at row ``i // w``, column ``i % w``), N_keep visible patches, N_mask masked
patches, R block-placement rounds.

Conventions (the MAE convention, stated where the mask is made):
- ``PatchMask.masked`` is bool (B, N), **True = masked**: hidden from the encoder,
  reconstructed by the decoder and scored. It *is* the ``loss_mask`` of the masking
  seam (True = scored; docs/architecture.md, "Masks"); the visible patches are not scored.
- ``keep_idx`` (B, N_keep) / ``mask_idx`` (B, N_mask) list the visible / masked patch
  indices of each sample in ascending order; together they cover 0..N-1 exactly once.
  Every sample of a batch masks exactly ``N_mask = round(ratio * N)`` patches (Python's
  round, half to even), clamped to [1, N - 1] so that at least one patch is visible
  and at least one is scored; the encoder therefore takes (B, N_keep, D) without
  padding. ``restore_idx`` undoes ``cat([keep_idx, mask_idx], 1)`` (MAE's
  ``ids_restore``).

Strategies (registered in ``MASKINGS``):
- ``mae-random``: MAE's masking. Each patch gets 32-bit deterministic noise; the
  N_mask patches with the largest noise are masked and the rest kept (MAE keeps the
  ``len_keep`` smallest of its argsort of noise: the same rule). Exact and uniform:
  every patch is masked with probability N_mask / N.
- ``mae-block``: BEiT's block-wise masking (``MaskingGenerator`` of BEiT). Rounds
  place rectangles on the patch grid: area uniform between ``m = min(min_block_patches,
  N_mask)`` and ``left``, what remains of the budget N_mask (in either order, as BEiT's
  ``random.uniform``); log-aspect-ratio uniform in [log(min_aspect), -log(min_aspect)];
  ``bh = round(sqrt(area * aspect))`` rows by ``bw = round(sqrt(area / aspect))``
  columns at a uniform position where it fits. As in BEiT a rectangle is accepted only
  if it fits on the grid and adds between 1 and ``left`` new patches, so the blocks
  never exceed the budget, and once ``left < m`` the accepted rectangles overlap (attach
  to) blocks already placed. BEiT gives up after 10 failed attempts in a row and then
  falls short; here every row gets ``block_rounds(N, N_mask)`` attempts, and the count
  is then made exact with the noise of ``mae-random``: patches are ranked block-masked
  first, then by noise, and the top N_mask are masked. That ranking tops up a shortfall
  with the unmasked patches of largest noise (scattered single patches) and would trim
  an excess (the block patches of smallest noise), which BEiT's acceptance rule never
  produces. Measured over 4096 keys: at 14 x 14 with ratio 0.75 or 0.4 the blocks alone
  reach the budget in all but ~0.05% of rows; tiny grids need the top-up more (2 x 2 at
  0.75: ~5% of rows get one scattered patch). Another difference from BEiT: a block may
  span the whole grid side (BEiT requires bh < h, bw < w).
  Position frequencies are NOT uniform, as in BEiT: rectangles must fit on the grid, so
  central patches are masked more often than edge patches (14 x 14, ratio 0.75: from
  ~0.18 at the corners to ~0.98 at the centre; BEiT's own generator gives 0.16..0.985).
  Connected components of the mask match BEiT's (14 x 14, ratio 0.4, min 16: 1.45 per
  image vs BEiT's 1.37; random masking: 24.7).

Mask ratio: ``ratio_at(step, total_steps, stage)``. Training with
``final_mask_ratio`` set follows ``schedules.get_schedule(mask_ratio_schedule)`` from
``mask_ratio`` at step 0 to ``final_mask_ratio`` at ``total_steps`` (``constant``
ignores ``final_mask_ratio``); N_keep is then the same for every sample of a batch but
changes from step to step. Any other stage uses ``eval_mask_ratio`` (None =
``mask_ratio``), so every trial is validated at one fixed ratio whatever its schedule.

Determinism (docs/architecture.md, "Masks"): every random number is a pure function of
``(seed, sample_key, mask_index, stream, counter)`` with ``sample_key`` the (B,) int64
content key of each image (``data.images.image_keys``, a hash of its bytes), drawn from
two mask-purpose streams of ``rng.Stream``: ``PATCH_RANK`` (the ranking noise, counter =
patch index) and ``PATCH_BLOCK`` (4 numbers per block round r: area, aspect, top, left
at counters 4r..4r+3). A row's mask depends on its own key and mask index only: the same
image gets the same k-th mask in any batch, batch position, worker and trial. All of it
is integer arithmetic, exact on every device, except mae-block's rectangle sides
(float64 exp / sqrt / round), which could only differ between devices on a rounding tie
within one ulp.

Mask indices (``indices``): training uses the global step (``training_index``: a new
mask every step); validation scores the K fixed masks ``eval_mask_indices(K)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..config_errors import ConfigError
from ..lazy import LazyModule
from ..registry import MASKINGS
from . import MaskContext, MaskedBatch, MaskingStrategy
from .attention import Attention
from .batches import Images
from .indices import STAGES, check_float, check_mask_index, check_seed, check_stage, is_int
from .rng import Stream, bits, mask_stream, to_uniform
from .schedules import get_schedule

if TYPE_CHECKING:
    from torch import Tensor

torch = LazyModule("torch")  # imported on first use (lit_modules/lazy.py)

_DRAWS_PER_ROUND = 4  # area, aspect, top, left


# ---------------------------------------------------------------- the mask


@dataclass(frozen=True)
class PatchMask:
    """One mask per sample; see the module docstring for the conventions.

    keep_idx: (B, N_keep) int64 visible patches, ascending.
    mask_idx: (B, N_mask) int64 masked patches, ascending.
    masked:   (B, N) bool, True = masked = reconstructed and scored (the loss mask).
    ratio:    the mask ratio used (scheduled or eval); N_mask = round(ratio * N),
              clamped to [1, N - 1].
    """

    keep_idx: Tensor
    mask_idx: Tensor
    masked: Tensor
    ratio: float

    @property
    def num_patches(self) -> int:
        return self.masked.shape[1]

    @property
    def num_masked(self) -> int:
        return self.mask_idx.shape[1]

    @property
    def num_keep(self) -> int:
        return self.keep_idx.shape[1]

    @property
    def loss_mask(self) -> Tensor:
        """(B, N) bool, True = scored: the same tensor as ``masked``."""
        return self.masked

    @property
    def restore_idx(self) -> Tensor:
        """(B, N) int64: position of patch i in ``cat([keep_idx, mask_idx], 1)``, so
        ``x_cat.gather(1, restore_idx[..., None].expand(-1, -1, D))`` is in patch order."""
        return torch.cat([self.keep_idx, self.mask_idx], 1).argsort(dim=1)


def num_masked(ratio: float, n: int) -> int:
    """round(ratio * n), clamped to [1, n - 1]."""
    return min(max(round(ratio * n), 1), n - 1)


def mask_from_scores(score: Tensor, n_mask: int, ratio: float) -> PatchMask:
    """(B, N) int64 scores -> the PatchMask masking the ``n_mask`` largest of each row.

    Ties go to the lower patch index (stable sort), so the result is a pure function
    of the row's scores on every device.
    """
    order = score.argsort(dim=1, descending=True, stable=True)  # (B, N) best first
    mask_idx = order[:, :n_mask].sort(dim=1).values  # (B, N_mask)
    keep_idx = order[:, n_mask:].sort(dim=1).values  # (B, N_keep)
    masked = torch.zeros_like(score, dtype=torch.bool).scatter_(1, mask_idx, True)
    return PatchMask(keep_idx=keep_idx, mask_idx=mask_idx, masked=masked, ratio=ratio)


# ---------------------------------------------------------------- block-wise


def block_rounds(n: int, n_mask: int) -> int:
    """Attempts each row gets to place blocks: a fixed function of (N, N_mask), never of
    the batch, so a row's mask does not depend on its neighbours. 4 + 2 * N_mask leaves
    room for the rejected attempts (too big for the grid, or past the budget): measured
    over 4096 rows at 14 x 14, ratio 0.75 needs <= 94 of its 298 and ratio 0.4 with
    min_block_patches 16 runs out in ~0.05% of rows. Rows that are done stop, and the
    loop ends when every row is (one host sync per round)."""
    return 4 + 2 * n_mask


def place_blocks(
    stream: Tensor, grid: tuple[int, int], budget: int, min_block: int, min_aspect: float
) -> Tensor:
    """(B, N) bool: BEiT's rectangles for each row of ``stream`` (B,), at most ``budget``
    patches per row (fewer where the attempts ran out; see the module docstring)."""
    h, w = grid
    b = stream.shape[0]
    dev = stream.device
    masked = torch.zeros(b, h * w, dtype=torch.bool, device=dev)
    left = torch.full((b,), budget, dtype=torch.int64, device=dev)
    rows = torch.arange(h, device=dev)[None, :]  # (1, h)
    cols = torch.arange(w, device=dev)[None, :]  # (1, w)
    log_lo = math.log(min_aspect)
    for r in range(block_rounds(h * w, budget)):
        active = left > 0
        if not bool(active.any()):
            break
        u = to_uniform(bits(stream, _DRAWS_PER_ROUND, start=_DRAWS_PER_ROUND * r), torch.float64)  # (B, 4)
        # Uniform between min_block and left, in either order (BEiT's random.uniform):
        # once left < min_block, rectangles of up to min_block patches that add at most
        # `left` new ones, i.e. that overlap (attach to) the blocks already placed.
        area = min_block + u[:, 0] * (left - min_block).to(torch.float64)
        aspect = torch.exp(log_lo + u[:, 1] * (-2.0 * log_lo))
        bh = torch.round(torch.sqrt(area * aspect)).to(torch.int64).clamp(min=1)  # (B,)
        bw = torch.round(torch.sqrt(area / aspect)).to(torch.int64).clamp(min=1)
        fits = (bh <= h) & (bw <= w)
        top = (u[:, 2] * (h - bh + 1).clamp(min=1)).to(torch.int64)[:, None]  # floor
        lft = (u[:, 3] * (w - bw + 1).clamp(min=1)).to(torch.int64)[:, None]
        in_rows = (rows >= top) & (rows < top + bh[:, None])  # (B, h)
        in_cols = (cols >= lft) & (cols < lft + bw[:, None])  # (B, w)
        rect = (in_rows[:, :, None] & in_cols[:, None, :]).reshape(b, h * w)  # (B, N)
        new = (rect & ~masked).sum(1)  # (B,)
        accept = active & fits & (new > 0) & (new <= left)
        masked |= rect & accept[:, None]
        left = left - new * accept
    return masked


# ---------------------------------------------------------------- strategies


def _check_optional_ratio(name: str, value: object) -> None:
    if value is not None:
        check_float(name, value, 0.0, 1.0, lo_open=True, hi_open=True)


def _check_grid(grid: object) -> tuple[int, int]:
    ok = isinstance(grid, (tuple, list)) and len(grid) == 2 and all(is_int(g) and g >= 1 for g in grid)
    if not ok or grid[0] * grid[1] < 2:
        raise ValueError(f"grid = {grid!r}: must be (h, w), two integers >= 1 with h * w >= 2 patches")
    return int(grid[0]), int(grid[1])


def _check_keys(keys: object) -> None:
    if not isinstance(keys, torch.Tensor) or keys.dim() != 1 or keys.dtype != torch.int64:
        got = f"{keys.dtype} {tuple(keys.shape)}" if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise ValueError(f"keys: must be a (B,) int64 tensor of sample content keys, got {got}")


@dataclass(frozen=True)
class ScheduledRatio(MaskingStrategy):
    """The mask-ratio fields and the call shared by the patch and video maskings.

    mask_ratio:          fraction masked, in (0, 1) (the initial one under a schedule).
    mask_ratio_schedule: constant, linear, cosine or exponential (``schedules``).
    final_mask_ratio:    the training ratio at the last step, in (0, 1); None = constant.
    eval_mask_ratio:     the ratio of every non-training stage, in (0, 1);
                         None = ``mask_ratio``.

    ``strategy(batch, ctx)`` masks an ``Images`` (patch maskings) or ``Clips`` (video
    maskings) batch on its ``grid``: inputs and targets are the images or clips,
    loss_mask the masked patches, keep_idx the visible ones, ratio the ratio drawn at.
    ``masks(keys, grid, ctx)`` is the same mask as a ``PatchMask``.
    """

    name: str = ""
    mask_ratio: float = 0.75
    mask_ratio_schedule: str = "constant"
    final_mask_ratio: float | None = None
    eval_mask_ratio: float | None = None

    def __post_init__(self):
        check_float("mask_ratio", self.mask_ratio, 0.0, 1.0, lo_open=True, hi_open=True)
        if not isinstance(self.mask_ratio_schedule, str):
            raise ConfigError("mask_ratio_schedule", self.mask_ratio_schedule, "must be a schedule name")
        get_schedule(self.mask_ratio_schedule)  # ConfigError naming the allowed ones
        _check_optional_ratio("final_mask_ratio", self.final_mask_ratio)
        _check_optional_ratio("eval_mask_ratio", self.eval_mask_ratio)

    @property
    def scheduled(self) -> bool:
        """Whether the training ratio changes with the step."""
        return self.final_mask_ratio is not None and self.mask_ratio_schedule != "constant"

    def ratio_at(self, step: int | None = None, total_steps: int | None = None, stage: str = "train") -> float:
        """The mask ratio of ``stage`` at training step ``step`` of ``total_steps``."""
        check_stage(stage)
        if stage != "train":
            return self.mask_ratio if self.eval_mask_ratio is None else self.eval_mask_ratio
        if not self.scheduled:
            return self.mask_ratio
        if not is_int(step) or not is_int(total_steps) or step < 0 or total_steps < 1:
            raise ValueError(
                f"step = {step!r}, total_steps = {total_steps!r}: a {self.mask_ratio_schedule} "
                "mask ratio schedule needs integers step >= 0 and total_steps >= 1"
            )
        f = get_schedule(self.mask_ratio_schedule)
        return f(step, total_steps, self.mask_ratio, self.final_mask_ratio)

    def masks(self, keys: Tensor, grid: tuple[int, ...], ctx: MaskContext) -> PatchMask:
        """The masks of the samples with content ``keys`` (B,) on ``grid``."""
        _check_keys(keys)
        check_mask_index(ctx.mask_index, keys.shape[0])
        check_seed(ctx.seed)
        mask_index = ctx.mask_index
        if isinstance(mask_index, torch.Tensor):
            mask_index = mask_index.to(device=keys.device, dtype=torch.int64)
        return self._mask(keys, grid, ctx.seed, mask_index, self.ratio_at(ctx.step, ctx.total_steps, ctx.stage))

    def __call__(self, batch, ctx: MaskContext) -> MaskedBatch:
        if not isinstance(batch, self.accepts):
            raise ValueError(f"{self.name} masks {self.accepts.__name__}, got {type(batch).__name__}")
        if batch.grid is None:
            raise ValueError(f"{type(batch).__name__}.grid: not set; the model sets the patch grid it masks")
        data = batch.images if isinstance(batch, Images) else batch.clips
        pm = self.masks(batch.keys, batch.grid, ctx)
        return MaskedBatch(inputs=data, targets=data, loss_mask=pm.masked, attention=Attention(),
                           keep_idx=pm.keep_idx, ratio=pm.ratio, actions=getattr(batch, "actions", None))

    # Subclasses: the PatchMask of each row at ``ratio``.
    def _mask(self, keys: Tensor, grid, seed: int, mask_index: Tensor | int, ratio: float) -> PatchMask:
        raise NotImplementedError


@dataclass(frozen=True)
class PatchMaskingStrategy(ScheduledRatio):
    """The MAE patch maskings (not registered itself); mask_ratio is the fraction of
    patches masked (MAE: 0.75); the grid is (h, w)."""

    accepts: ClassVar[type] = Images

    # Subclasses: (B, N) int64 scores; the N_mask largest of each row are masked.
    def _scores(self, keys: Tensor, grid: tuple[int, int], seed: int, mask_index: Tensor | int, n_mask: int) -> Tensor:
        raise NotImplementedError

    def _mask(self, keys, grid, seed, mask_index, ratio) -> PatchMask:
        h, w = _check_grid(grid)
        n_mask = num_masked(ratio, h * w)
        return mask_from_scores(self._scores(keys, (h, w), seed, mask_index, n_mask), n_mask, ratio)

    def rank_noise(self, keys: Tensor, n: int, seed: int, mask_index: Tensor | int) -> Tensor:
        """(B, n) int64 32-bit noise of each patch (``Stream.PATCH_RANK``)."""
        return bits(mask_stream(seed, keys, mask_index, Stream.PATCH_RANK), n)


@MASKINGS.register("mae-random")
@dataclass(frozen=True)
class MAERandom(PatchMaskingStrategy):
    """MAE masking: exactly N_mask uniformly random patches per image."""

    name: str = "mae-random"

    def _scores(self, keys, grid, seed, mask_index, n_mask):
        return self.rank_noise(keys, grid[0] * grid[1], seed, mask_index)


@MASKINGS.register("mae-block")
@dataclass(frozen=True)
class MAEBlock(PatchMaskingStrategy):
    """BEiT block-wise masking, made exact (see the module docstring).

    min_block_patches: the smallest rectangle area drawn, an integer >= 1 (clipped to
                       what remains of the budget). BEiT uses 16 on its 14 x 14 grid.
    min_aspect:        aspect ratios are log-uniform in [min_aspect, 1 / min_aspect],
                       min_aspect in (0, 1].
    """

    name: str = "mae-block"
    min_block_patches: int = 4
    min_aspect: float = 0.3

    def __post_init__(self):
        super().__post_init__()
        if not is_int(self.min_block_patches) or self.min_block_patches < 1:
            raise ConfigError("min_block_patches", self.min_block_patches, "must be an integer >= 1")
        check_float("min_aspect", self.min_aspect, 0.0, 1.0, lo_open=True, hi_open=False)

    def blocks(self, keys: Tensor, grid: tuple[int, int], *, seed: int, mask_index: Tensor | int, n_mask: int) -> Tensor:
        """(B, N) bool: the rectangles alone, before the exact-count top-up."""
        stream = mask_stream(seed, keys, mask_index, Stream.PATCH_BLOCK)
        min_block = min(self.min_block_patches, n_mask)  # clipped to the budget
        return place_blocks(stream, grid, n_mask, min_block, float(self.min_aspect))

    def _scores(self, keys, grid, seed, mask_index, n_mask):
        blocks = self.blocks(keys, grid, seed=seed, mask_index=mask_index, n_mask=n_mask)
        noise = self.rank_noise(keys, grid[0] * grid[1], seed, mask_index)  # < 2**32
        return noise + (blocks.to(torch.int64) << 32)  # block patches rank first


__all__ = [
    "STAGES",
    "MAEBlock",
    "MAERandom",
    "PatchMask",
    "PatchMaskingStrategy",
    "ScheduledRatio",
    "block_rounds",
    "mask_from_scores",
    "num_masked",
    "place_blocks",
]
