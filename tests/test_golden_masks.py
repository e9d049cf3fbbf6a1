"""Golden masks: sha256 fingerprints of every masking strategy's output on fixed inputs
(several seeds, mask indices and ratios, each schedule at several steps), recorded in
``tests/golden/masks.json``. A refactor of the masking code must leave every mask
bit-identical; a deliberate change of a mask regenerates the file
(``python -m tests.test_golden_masks``) and says why in its commit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "masks.json"
SEEDS = (0, 1, 1234)
INDICES = (0, 3, (1 << 28) + 1)  # training indices and an evaluation index
VOCAB, MASK_ID, LOW = 512, 4, 6


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def text_batch() -> dict[str, torch.Tensor]:
    """(4, 40) token rows with [CLS]/[SEP], right padding and word starts."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(LOW, VOCAB, (4, 40), generator=g)
    lengths = torch.tensor([40, 33, 25, 12])
    valid = torch.arange(40)[None] < lengths[:, None]
    tokens[:, 0] = 2
    tokens[torch.arange(4), lengths - 1] = 3
    tokens[~valid] = 5
    eligible = valid.clone()
    eligible[:, 0] = False
    eligible[torch.arange(4), lengths - 1] = False
    word_start = (torch.rand(4, 40, generator=g) < 0.6) & eligible
    return {"tokens": tokens, "valid": valid, "eligible": eligible, "word_start": word_start}


def image_keys() -> torch.Tensor:
    return torch.tensor([11, -5, 1 << 40, 987654321987], dtype=torch.int64)


def text_cases():
    from lit_modules.masking.mlm import MLMRandom, MLMSpan, MLMWholeWord

    for cls in (MLMRandom, MLMWholeWord, MLMSpan):
        for ratio in (0.15, 0.4):
            for extra in ({}, {"mask_prob": 1.0, "random_prob": 0.0, "keep_prob": 0.0}):
                yield f"{cls().name} r={ratio} {extra or 'default split'}", cls(mask_ratio=ratio, **extra)


def patch_cases():
    from lit_modules.masking.patches import MAEBlock, MAERandom

    yield "mae-random r=0.75", MAERandom(mask_ratio=0.75)
    yield "mae-random r=0.5", MAERandom(mask_ratio=0.5)
    yield "mae-block r=0.4", MAEBlock(mask_ratio=0.4)
    yield "mae-block r=0.75 min=4", MAEBlock(mask_ratio=0.75, min_block_patches=4)
    for sched in ("linear", "cosine", "exponential"):
        yield f"mae-random {sched} 0.5->0.9", MAERandom(mask_ratio=0.5, final_mask_ratio=0.9, mask_ratio_schedule=sched)


def video_cases():
    from lit_modules.masking.video import VideoFrame, VideoRandom, VideoTube

    yield "video-tube r=0.9", VideoTube(mask_ratio=0.9)
    yield "video-random r=0.75", VideoRandom(mask_ratio=0.75)
    yield "video-frame r=0.75 keep=1", VideoFrame(mask_ratio=0.75, keep_first_frames=1)
    for sched in ("linear", "cosine", "exponential"):
        yield f"video-frame {sched} 0.8->0.1", VideoFrame(mask_ratio=0.8, final_mask_ratio=0.1,
                                                          mask_ratio_schedule=sched)


def fingerprints() -> dict[str, str]:
    """Every fingerprint, by a readable key, each mask drawn through the one masking
    interface ``strategy(batch, ctx)``."""
    from lit_modules.masking import MaskContext
    from lit_modules.masking.batches import Clips, Images, TokenRows, TokenWindows
    from lit_modules.masking.causal_lm import CausalLM

    out = {}
    b = text_batch()
    rows = TokenRows(b["tokens"], b["valid"], b["eligible"], b["word_start"], VOCAB, MASK_ID, LOW)
    for name, s in text_cases():
        for seed in SEEDS:
            for k in INDICES:
                m = s(rows, MaskContext(seed=seed, mask_index=k))
                out[f"{name} seed={seed} k={k}"] = _digest(m.inputs, m.loss_mask)
    keys = image_keys()
    images = Images(torch.zeros(4, 3, 8, 8), keys, grid=(4, 4))
    clips = Clips(torch.zeros(4, 8, 3, 4, 4), keys, grid=(4, 2, 2))
    for batch, cases in ((images, patch_cases), (clips, video_cases)):
        grid = batch.grid
        for name, s in cases():
            for seed in SEEDS:
                for k in INDICES:
                    for step in ((0, 7, 15) if s.scheduled else (None,)):
                        m = s(batch, MaskContext(seed, k, step, 15, "train"))
                        out[f"{name} grid={grid} seed={seed} k={k} step={step}"] = _digest(m.loss_mask, m.keep_idx)
                    ev = s(batch, MaskContext(seed, k, stage="val"))
                    out[f"{name} grid={grid} seed={seed} k={k} val"] = _digest(ev.loss_mask)
    window = TokenWindows(b["tokens"][:, :33])
    for p in (0.0, 0.3, 1.0):
        s = CausalLM(p_bw=p)
        for seed in SEEDS:
            coins = torch.tensor([s.use_backward(seed, step) for step in range(64)])
            out[f"causal-lm p_bw={p} seed={seed} coins"] = _digest(coins)
        m = s(window, MaskContext(seed=0, stage="val"))  # every stage but train: both directions
        out[f"causal-lm p_bw={p} fw+bw"] = _digest(m.inputs, m.targets, m.direction)
    return out


def test_every_mask_matches_its_golden_fingerprint():
    want = json.loads(GOLDEN.read_text())
    got = fingerprints()
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    changed = [k for k in want if got[k] != want[k]]
    assert not changed, f"{len(changed)} of {len(want)} masks changed, e.g. {changed[:5]}"


def test_every_strategy_with_golden_masks_is_still_registered():
    from lit_modules.registry import MASKINGS

    covered = {key.split()[0] for key in json.loads(GOLDEN.read_text())}
    assert covered <= set(MASKINGS.names())


@pytest.mark.parametrize("seed", [0])
def test_a_changed_mask_changes_its_fingerprint(seed):
    from lit_modules.masking import MaskContext
    from lit_modules.masking.batches import TokenRows
    from lit_modules.masking.mlm import MLMRandom

    b = text_batch()
    rows = TokenRows(b["tokens"], b["valid"], b["eligible"], b["word_start"], VOCAB, MASK_ID, LOW)
    a = MLMRandom()(rows, MaskContext(seed=seed))
    c = MLMRandom()(rows, MaskContext(seed=seed + 1))
    assert _digest(a.inputs, a.loss_mask) != _digest(c.inputs, c.loss_mask)


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(fingerprints(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
