"""Counter-based deterministic randomness for masks.

Every random number a mask uses is a pure function of
``(global_seed, sample_key, mask_index, counter)``: a stateless integer hash, not a
stateful generator. The same sample therefore gets the same k-th mask whatever batch,
batch position, worker, trial or machine it lands on, and the numbers are identical on
CPU and CUDA (only integer ops on int64 tensors are used).

The hash works on 32-bit words held in int64 tensors. Products of two 32-bit words may
wrap around int64, but the low 32 bits of a two's-complement product are exact, and
``& MASK32`` keeps only those; right shifts are applied to values already in
[0, 2**32), so sign extension never enters.
"""

from __future__ import annotations

from enum import IntEnum, unique
from typing import TYPE_CHECKING

from ..lazy import LazyModule

if TYPE_CHECKING:
    from torch import Tensor

torch = LazyModule("torch")  # imported on first use (lit_modules/lazy.py)


MASK32 = 0xFFFFFFFF
# Constants of the "lowbias32" integer finalizer (C. Wellons' hash-prospector), a
# 32-bit mixer with near-ideal avalanche: every input bit flips each output bit ~50%.
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
# Golden-ratio increment (as in splitmix) used to salt each absorbed word.
_GOLDEN = 0x9E3779B9
# A second, independent lane for 64-bit content keys.
_LANE2 = 0x85EBCA6B


# ---------------------------------------------------------------- the stream registry
@unique  # two purposes can never share an id: a duplicate value fails at import
class Stream(IntEnum):
    """Every stream of counter-based randomness in masklab, one id per purpose.

    Three kinds, by how the id enters the hash (``mask_stream``, ``step_stream``):

    - text-mask slots (``TEXT_*``, ids 0..TEXT_SLOTS-1): mask index k of a sample draws
      from ``seed_hash(seed, key, TEXT_SLOTS * k + slot)``. The text maskings were the
      first to be written and their masks are kept bit-identical; no other stream may
      use this layout, so the slots are closed;
    - mask purposes (patch, video, and every strategy added later): ``seed_hash(seed,
      key, k)`` with the purpose id absorbed as one more word, so a new purpose is a new
      member here and changes no existing mask;
    - per-step streams (batch samplers, augmentation, per-step coins): keyed by the
      training step, ``seed_hash(seed, step, id)``, independent of every mask; a
      per-layer stream (BigBird's random blocks) is drawn the same way with the layer
      index in place of the step, so every step, trial and worker sees the same pattern.
    """

    # text-mask slots
    TEXT_SELECT = 0  # which tokens are selected (and span anchors)
    TEXT_REPLACE = 1  # [MASK] / random / keep for each selected token
    TEXT_RANDOM_TOKEN = 2  # the random replacement token
    TEXT_SPAN_LENGTH = 3  # SpanBERT span lengths
    # mask purposes
    PATCH_RANK = 0xFA70  # MAE ranking noise, one number per patch
    PATCH_BLOCK = 0xFA71  # BEiT block placement, four numbers per round
    VIDEO_TUBE = 0xF1D0  # tube masking, one number per spatial position
    VIDEO_RANDOM = 0xF1D1  # random tubelet masking, one number per tubelet
    VIDEO_FRAME = 0xF1D2  # per-frame masking, one number per tubelet
    # per-step streams
    BW_COIN = 0xB5  # whether a GPT step also trains the backward direction
    TEXT_BATCH = 0xDA7A  # the training windows of a step
    MLM_BATCH = 0xDA7B  # the masked-LM training rows of a step
    IMAGE_BATCH = 0x1A6E  # the training images of a step
    IMAGE_AUG = 0x1A6F  # their crop and flip
    VIDEO_BATCH = 0x71DE  # the training clips of a step
    VIDEO_FLIP = 0x71DF  # their flips
    # mask purposes added later (appended: the ids above never change)
    ELECTRA_SAMPLE = 0xE1EC  # ELECTRA's generator samples, one number per position
    # per-layer streams (keyed by the layer where a per-step stream has the step)
    ATTENTION_BLOCKS = 0xA77B  # BigBird's random key blocks, one number per (query block, key block)


TEXT_SLOTS = 4  # text mask index k uses ids TEXT_SLOTS * k + slot
_SLOTS = {Stream.TEXT_SELECT, Stream.TEXT_REPLACE, Stream.TEXT_RANDOM_TOKEN, Stream.TEXT_SPAN_LENGTH}
_STEP = {Stream.BW_COIN, Stream.TEXT_BATCH, Stream.MLM_BATCH, Stream.IMAGE_BATCH, Stream.IMAGE_AUG,
         Stream.VIDEO_BATCH, Stream.VIDEO_FLIP, Stream.ATTENTION_BLOCKS}
assert {int(s) for s in _SLOTS} == set(range(TEXT_SLOTS)), "the text slots are 0..TEXT_SLOTS-1"


def mix32(x: Tensor) -> Tensor:
    """lowbias32 finalizer on int64 tensors holding values in [0, 2**32)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    x = x ^ (x >> 16)
    return x


def _absorb(h: Tensor, word: Tensor | int) -> Tensor:
    """Fold one 32-bit word into the running hash ``h``. A Python int stays a scalar
    argument of the ops (no host-to-device copy, which on a GPU would wait for the device)."""
    if isinstance(word, int):
        return mix32(h ^ ((word + _GOLDEN) & MASK32))
    return mix32(h ^ ((torch.as_tensor(word, dtype=torch.int64, device=h.device) + _GOLDEN) & MASK32))


def _split64(x: Tensor) -> tuple[Tensor, Tensor]:
    """Low and high 32-bit halves of an int64 tensor (bit pattern, sign ignored)."""
    return x & MASK32, (x >> 32) & MASK32


def seed_hash(global_seed: int, sample_key: Tensor, mask_index: Tensor | int) -> Tensor:
    """(B,) 32-bit hash of (seed, sample key, mask index): the stream id of one mask."""
    sample_key = torch.as_tensor(sample_key, dtype=torch.int64)
    lo, hi = _split64(sample_key)
    s = int(global_seed) & 0xFFFFFFFFFFFFFFFF
    h = torch.full_like(sample_key, s & MASK32)
    h = _absorb(h, (s >> 32) & MASK32)
    h = _absorb(h, lo)
    h = _absorb(h, hi)
    if isinstance(mask_index, int):
        return _absorb(h, mask_index & MASK32)
    index = torch.as_tensor(mask_index, dtype=torch.int64, device=sample_key.device)
    return _absorb(h, index & MASK32)


def random_bits(
    global_seed: int, sample_key: Tensor, mask_index: Tensor | int, shape: tuple[int, ...]
) -> Tensor:
    """Random 32-bit integers, (B, *shape) int64 in [0, 2**32).

    Element ``j`` (flat index within the sample) of row ``b`` depends only on
    ``(global_seed, sample_key[b], mask_index[b], j)``. Vectorized over the batch.
    """
    sample_key = torch.as_tensor(sample_key, dtype=torch.int64)
    stream = seed_hash(global_seed, sample_key, mask_index)  # (B,)
    n = 1
    for s in shape:
        n *= int(s)
    counter = torch.arange(n, dtype=torch.int64, device=sample_key.device)  # (n,)
    bits = mix32(_absorb(stream[:, None], counter[None, :]))  # (B, n)
    return bits.reshape(sample_key.shape[0], *shape)


def uniform(
    global_seed: int, sample_key: Tensor, mask_index: Tensor | int, shape: tuple[int, ...]
) -> Tensor:
    """Uniform noise in [0, 1), (B, *shape) float32, from the top 24 bits of the hash.

    24 bits because float32 has a 24-bit significand: every value is exact, so the same
    bits give the same float on every device.
    """
    bits = random_bits(global_seed, sample_key, mask_index, shape)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def content_key(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """64-bit content hash of each sample: (B, ...) -> (B,) int64.

    Integer tensors are hashed by value, floating tensors by their float32 bit pattern.
    Every element is salted by its position, so reordering a sample changes its key;
    two independent 32-bit lanes make the 64-bit key (collisions ~ n**2 / 2**65).
    ``valid`` (B, n) bool restricts the hash to the valid elements: a right-padded row
    gets the key of its unpadded content, whatever the padded width.
    """
    if x.dtype.is_floating_point:
        words = x.detach().to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    else:
        words = x.detach().to(torch.int64)
    words = words.reshape(words.shape[0], -1) & MASK32  # (B, n)
    pos = torch.arange(words.shape[1], dtype=torch.int64, device=words.device)
    if valid is None:
        count = torch.full((words.shape[0],), words.shape[1], dtype=torch.int64, device=words.device)
    else:
        valid = valid.reshape(words.shape)
        count = valid.sum(dim=1).to(torch.int64)  # (B,)
    lanes = []
    for salt in (_GOLDEN, _LANE2):
        per_elem = mix32(_absorb(mix32(pos + salt)[None, :], words))  # (B, n)
        if valid is not None:
            per_elem = per_elem.masked_fill(~valid, 0)
        # Sum of position-salted hashes: order-sensitive because each term carries its
        # position; n < 2**31 terms of < 2**32 cannot overflow int64.
        total = per_elem.sum(dim=1) & MASK32
        lanes.append(mix32(total ^ (count & MASK32)))
    return lanes[0] | (lanes[1] << 32)


# ---------------------------------------------------------------- drawing from a stream
def mask_stream(global_seed: int, sample_key: Tensor, mask_index: Tensor | int, stream: Stream) -> Tensor:
    """(B,) 32-bit id of one purpose of mask ``mask_index`` of each sample."""
    if stream in _SLOTS:
        return seed_hash(global_seed, sample_key, mask_index * TEXT_SLOTS + int(stream))
    if stream in _STEP:
        raise ValueError(f"{stream.name} is a per-step stream: draw it with step_stream")
    return _absorb(seed_hash(global_seed, sample_key, mask_index), int(stream))


def step_stream(global_seed: int, step: int, stream: Stream) -> Tensor:
    """(1,) 32-bit id of a per-step stream at training step ``step``."""
    if stream not in _STEP:
        raise ValueError(f"{stream.name} is a mask stream: draw it with mask_stream")
    return seed_hash(global_seed, torch.tensor([int(step)], dtype=torch.int64), int(stream))


def bits(ids: Tensor, n: int, start: int = 0) -> Tensor:
    """(B, n) int64 in [0, 2**32): counters start..start+n-1 of each row's stream."""
    counter = torch.arange(start, start + n, dtype=torch.int64, device=ids.device)
    return mix32(_absorb(ids[:, None], counter[None, :]))


def bits_at(ids: Tensor, counters: Tensor) -> Tensor:
    """32-bit numbers at explicit ``counters`` of the stream ``ids`` (broadcast together):
    a number depends on its counter alone, not on how many others are drawn."""
    return mix32(_absorb(ids, counters))


def to_uniform(b: Tensor, dtype=None) -> Tensor:
    """32-bit integers -> uniform in [0, 1) on the 2**-24 grid (exact in float32 and
    float64, so the same bits give the same number on every device)."""
    return (b >> 8).to(dtype or torch.float32) * (1.0 / (1 << 24))


def step_uniform(global_seed: int, step: int, stream: Stream) -> float:
    """One uniform number for training step ``step`` of a per-step stream (e.g. whether
    a step also trains the backward direction): independent of the batch sampler, so
    runs that differ only in the coin's probability still see identical batches."""
    return float(to_uniform(bits(step_stream(global_seed, step, stream), 1))[0, 0])


def step_bits(global_seed: int, step: int, stream: Stream, n: int) -> Tensor:
    """(n,) int64 32-bit numbers of a per-step stream at training step ``step``."""
    return bits(step_stream(global_seed, step, stream), n)[0]
