"""Tubelet masking for video masked autoencoders: which tubelets of a clip the encoder
sees, and which it must reconstruct.

Axis legend: B batch, F' = frames / tubelet_frames time steps, (h, w) the spatial patch
grid, S = h * w positions per time step, N = F' * S tubelets. Tokens are flattened in
(t, y, x) row-major order: tubelet ``i`` sits at time step ``i // S``, row
``(i % S) // w``, column ``i % w``.

The mask is the image maskings' ``patches.PatchMask`` with the same conventions:
``masked`` (B, N) bool, True = masked = hidden from the encoder, reconstructed and
scored (the loss mask); ``keep_idx`` / ``mask_idx`` ascending, covering 0..N-1 once;
every sample of a batch masks the same number of tubelets, so the encoder takes
(B, N_keep, D) without padding.

Strategies (registered in ``MASKINGS``):
- ``video-tube``: VideoMAE's tube masking. One spatial mask of exactly
  ``S_mask = round(ratio * S)`` positions (clamped to [1, S - 1]) per clip, shared by
  every time step, so a masked position stays hidden for the whole clip and cannot be
  copied from a neighbouring frame. N_mask = F' * S_mask. Default ratio 0.9 (VideoMAE).
- ``video-random``: random tubelet masking: exactly ``round(ratio * N)`` tubelets
  (clamped to [1, N - 1]) uniformly over the whole clip (the ``mae-random`` rule on N
  tubelets). Default ratio 0.9.
- ``video-frame``: MaskViT-style per-frame masking: every time step masks exactly
  S_mask = round(ratio * S) positions (clamped to [1, S - 1]), independently per time
  step. ``keep_first_frames = K`` leaves the first K time steps fully visible (the
  conditioning frames of frame prediction) and the ratio applies to the other F' - K,
  so N_mask = (F' - K) * S_mask. K must be < F'. Default ratio 0.75.

Mask ratio: the fields and ``ratio_at(step, total_steps, stage)`` of the image maskings
(``patches.ScheduledRatio``): training with ``final_mask_ratio`` set follows
``schedules.get_schedule(mask_ratio_schedule)`` from ``mask_ratio`` at step 0 to
``final_mask_ratio`` at ``total_steps``; every other stage uses ``eval_mask_ratio``
(None = ``mask_ratio``). ``PatchMask.ratio`` is that ratio; the counts round it as above.

Determinism (docs/architecture.md, "Masks"): every random number is a pure function of
``(seed, sample_key, mask_index, stream, counter)``, drawn from one mask-purpose stream
of ``rng.Stream`` per strategy (``VIDEO_TUBE``, counter = spatial position;
``VIDEO_RANDOM`` and ``VIDEO_FRAME``, counter = tubelet index). The positions with the
largest 32-bit noise are masked, ties to the lower index (stable sort). A row's mask
depends on its own key and mask index only; everything is integer arithmetic,
identical on every device. Mask indices as for the patch maskings (``indices``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..config_errors import ConfigError
from ..lazy import LazyModule
from ..registry import MASKINGS
from .batches import Clips
from .indices import is_int
from .patches import PatchMask, ScheduledRatio, mask_from_scores, num_masked
from .rng import Stream, bits, mask_stream

if TYPE_CHECKING:
    from torch import Tensor

torch = LazyModule("torch")  # imported on first use (lit_modules/lazy.py)


def _check_video_grid(grid: object, min_spatial: int) -> tuple[int, int, int]:
    ok = isinstance(grid, (tuple, list)) and len(grid) == 3 and all(is_int(g) and g >= 1 for g in grid)
    if not ok or grid[1] * grid[2] < min_spatial or grid[0] * grid[1] * grid[2] < 2:
        raise ValueError(
            f"grid = {grid!r}: must be (F', h, w), three integers >= 1 with h * w >= {min_spatial} "
            "and F' * h * w >= 2 tubelets"
        )
    return int(grid[0]), int(grid[1]), int(grid[2])


def masked_to_patch_mask(masked: Tensor, n_mask: int, ratio: float) -> PatchMask:
    """(B, N) bool with exactly ``n_mask`` True per row -> its ``PatchMask``."""
    b, n = masked.shape
    # nonzero() lists positions row-major, so each row's indices come out ascending.
    mask_idx = masked.nonzero()[:, 1].view(b, n_mask)
    keep_idx = (~masked).nonzero()[:, 1].view(b, n - n_mask)
    return PatchMask(keep_idx=keep_idx, mask_idx=mask_idx, masked=masked, ratio=ratio)


def top_k_mask(score: Tensor, k: int) -> Tensor:
    """bool of ``score``'s shape: the ``k`` largest along the last dim (ties to the lower
    index)."""
    order = score.argsort(dim=-1, descending=True, stable=True)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order[..., :k], True)


@dataclass(frozen=True)
class VideoMaskingStrategy(ScheduledRatio):
    """The video maskings (not registered itself): ``strategy(clips, ctx)`` masks a
    ``Clips`` batch on its (F', h, w) tubelet grid. The ratio fields are
    ``patches.ScheduledRatio``'s; mask_ratio is the fraction of the positions per time
    step for tube and frame masking, of all tubelets for random masking."""

    accepts: ClassVar[type] = Clips
    mask_ratio: float = 0.9

    _MIN_SPATIAL = 2  # positions per time step: one masked and one visible

    def num_masked(self, grid: tuple[int, int, int], ratio: float) -> int:
        """Masked tubelets per sample on ``grid`` at ``ratio``."""
        raise NotImplementedError

    # Subclasses: (B, N) bool, True = masked, exactly num_masked(grid, ratio) per row.
    def _masked(self, keys: Tensor, grid: tuple[int, int, int], seed: int, mask_index: Tensor | int, ratio: float) -> Tensor:
        raise NotImplementedError

    def _mask(self, keys, grid, seed, mask_index, ratio) -> PatchMask:
        grid = _check_video_grid(grid, self._MIN_SPATIAL)
        masked = self._masked(keys, grid, seed, mask_index, ratio)
        return masked_to_patch_mask(masked, self.num_masked(grid, ratio), ratio)


@MASKINGS.register("video-tube")
@dataclass(frozen=True)
class VideoTube(VideoMaskingStrategy):
    """VideoMAE tube masking: one spatial mask shared by every time step."""

    name: str = "video-tube"

    def num_masked(self, grid, ratio):
        f, h, w = grid
        return f * num_masked(ratio, h * w)

    def _masked(self, keys, grid, seed, mask_index, ratio):
        f, h, w = grid
        noise = bits(mask_stream(seed, keys, mask_index, Stream.VIDEO_TUBE), h * w)  # (B, S)
        spatial = top_k_mask(noise, num_masked(ratio, h * w))  # (B, S)
        return spatial.repeat(1, f)  # (B, f*S): the same spatial mask at every time step


@MASKINGS.register("video-random")
@dataclass(frozen=True)
class VideoRandom(VideoMaskingStrategy):
    """Random tubelet masking: exactly round(ratio * N) tubelets over the whole clip."""

    name: str = "video-random"
    _MIN_SPATIAL = 1

    def num_masked(self, grid, ratio):
        return num_masked(ratio, grid[0] * grid[1] * grid[2])

    def _masked(self, keys, grid, seed, mask_index, ratio):
        n = grid[0] * grid[1] * grid[2]
        noise = bits(mask_stream(seed, keys, mask_index, Stream.VIDEO_RANDOM), n)
        return mask_from_scores(noise, self.num_masked(grid, ratio), ratio).masked


@MASKINGS.register("video-frame")
@dataclass(frozen=True)
class VideoFrame(VideoMaskingStrategy):
    """MaskViT-style masking: round(ratio * h * w) positions per time step, drawn
    independently per time step; the first ``keep_first_frames`` time steps stay fully
    visible.

    keep_first_frames: K, an integer >= 0 (and < F' at call time).
    """

    name: str = "video-frame"
    mask_ratio: float = 0.75
    keep_first_frames: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not is_int(self.keep_first_frames) or self.keep_first_frames < 0:
            raise ConfigError("keep_first_frames", self.keep_first_frames, "must be an integer >= 0")

    def _check_frames(self, f: int) -> None:
        if self.keep_first_frames >= f:
            raise ConfigError(
                "keep_first_frames", self.keep_first_frames,
                f"must be < the {f} time steps of the tubelet grid (at least one masked time step)",
            )

    def num_masked(self, grid, ratio):
        f, h, w = grid
        self._check_frames(f)
        return (f - self.keep_first_frames) * num_masked(ratio, h * w)

    def _masked(self, keys, grid, seed, mask_index, ratio):
        f, h, w = grid
        self._check_frames(f)
        b = keys.shape[0]
        noise = bits(mask_stream(seed, keys, mask_index, Stream.VIDEO_FRAME), f * h * w)
        masked = top_k_mask(noise.reshape(b, f, h * w), num_masked(ratio, h * w))  # (B, F', S)
        masked[:, : self.keep_first_frames] = False
        return masked.reshape(b, f * h * w)


__all__ = [
    "VideoFrame",
    "VideoMaskingStrategy",
    "VideoRandom",
    "VideoTube",
    "masked_to_patch_mask",
    "top_k_mask",
]


def next_frame_loss_mask(batch: int, grid: tuple[int, int, int], device: torch.device | str = "cpu") -> Tensor:
    """(B, N) bool for next-frame prediction on a (T, h, w) grid: every token predicts the
    token one time step later, so the tokens of the last step are not scored."""
    t, h, w = grid
    scored = torch.ones(batch, t * h * w, dtype=torch.bool, device=device)
    scored[:, (t - 1) * h * w:] = False
    return scored

