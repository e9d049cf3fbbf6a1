"""Action-conditioned video: Moving-MNIST with a controlled digit, actions carried with
the clips (and swapped with a mirror flip), an action embedding per frame in both video
families, causality in the actions, the shuffled / no-action scores and the counterfactual."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_modules.config_errors import ConfigError
from lit_modules.data.video import (
    ACTION_MOVES,
    DIGIT_SIZE,
    NATIVE_SIZE,
    STEP_LENGTH,
    generate_moving_mnist,
    generate_moving_mnist_actions,
)


def _digits(n: int = 40) -> np.ndarray:
    """Synthetic 28 x 28 'digits': a filled square, so the centre of mass is exact."""
    d = np.zeros((n, DIGIT_SIZE, DIGIT_SIZE), dtype=np.uint8)
    d[:, 10:18, 10:18] = 255
    return d


def test_the_controlled_digit_moves_by_its_actions():
    """With one digit, each frame's centre of mass moves by the previous frame's action
    (one step of the free range; none at a border it would cross), and the other clips'
    motion is untouched: frame 0 equals the plain generator's."""
    clips, actions = generate_moving_mnist_actions(_digits(), 30, 6, 1)
    assert clips.shape == (30, 6, 64, 64) and actions.shape == (30, 6) and set(np.unique(actions)) <= set(range(5))
    plain = generate_moving_mnist(_digits(), 30, 6, 1)
    assert np.array_equal(clips[:, 0], plain[:, 0])
    ys, xs = np.arange(64)[None, None, :, None], np.arange(64)[None, None, None, :]
    mass = clips.astype(np.float64).sum((2, 3))
    com = np.stack([(clips * ys).sum((2, 3)) / mass, (clips * xs).sum((2, 3)) / mass], -1)  # (N, F, 2)
    free = NATIVE_SIZE - DIGIT_SIZE
    step = np.diff(com, axis=1)  # (N, F-1, 2) pixels
    want = ACTION_MOVES[actions[:, :-1]] * STEP_LENGTH * free
    lo, hi = 10 + 3.5, 10 + 3.5 + free  # the square's centre at corner 0 and at the far border
    inside = (com[:, 1:] > lo + 0.5) & (com[:, 1:] < hi - 0.5) & (com[:, :-1] > lo + 0.5) & (com[:, :-1] < hi - 0.5)
    np.testing.assert_allclose(step[inside], want[inside], atol=1.01)  # corners are rounded to whole pixels


def test_actions_are_carried_with_the_clips_and_swap_under_a_flip(workspace):
    from lit_modules.data.configs import VideoDataConfig
    from lit_modules.data.video import MovingMnist

    cfg = VideoDataConfig(name="moving-mnist", frames=4, image_size=32, n_clips=40, actions=5, batch_size=4)
    dm = MovingMnist(cfg, 0, 0, 4, workspace)
    dm.setup()
    index = dm.train_index[:4]
    plain = dm.data.batch(index)
    flipped = dm.data.batch(index, torch.tensor([True, False, True, False]))
    assert plain.actions.shape == (4, 4)
    swap = torch.tensor([0, 1, 2, 4, 3])
    assert torch.equal(flipped.actions[0], swap[plain.actions[0]]) and torch.equal(flipped.actions[1], plain.actions[1])
    with pytest.raises(ConfigError, match="only moving-mnist clips have actions"):
        VideoDataConfig(name="bbb", actions=5)


def _model(tiny_config, name: str, stage: str = "autoregressive"):
    from lit_modules.run import build_model

    return build_model(tiny_config(name, {"model.actions": 5, "model.stage": stage, "model.tubelet_frames": 1}
                                   if name == "video-mae" else {"model.actions": 5, "model.stage": stage})).eval()


def _clips(model, b: int = 3):
    c = model.cfg
    if c.name == "maskvit":
        return torch.randint(0, c.vocab_size, (b, c.frames, c.image_size, c.image_size))
    return torch.randn(b, c.frames, 3, c.image_size, c.image_size)


@pytest.mark.parametrize("name", ["video-mae", "maskvit"])
def test_frame_t_sees_only_actions_up_to_t(tiny_config, name):
    """In the autoregressive stage, the predictions made at frame t do not change (exactly)
    when an action after t changes, and do change when the action at t does."""
    model = _model(tiny_config, name)
    clips = _clips(model)
    f, h, w = model.cfg.grid
    actions = torch.randint(0, 5, (clips.shape[0], model.cfg.frames))
    base = model.predict_next(clips, actions)
    for t in range(f - 1):
        changed = actions.clone()
        changed[:, t] = (changed[:, t] + 1) % 5
        out = model.predict_next(clips, changed)
        per_step = (out - base).abs().flatten(2).amax(-1).view(clips.shape[0], f, h * w).amax(-1)  # (B, F)
        assert (per_step[:, :t] == 0).all(), f"frame < {t} sees the action at {t}"
        assert (per_step[:, t] > 0).all(), f"frame {t} ignores its own action"
    assert not torch.equal(model.predict_next(clips, None), base)  # no actions: another prediction


def test_action_metrics_in_validation(tiny_config, workspace):
    """An action-conditioned run is scored with its actions, shuffled ones and none."""
    from lit_modules.run import build_datamodule, build_model

    over = {"model.actions": 5, "model.stage": "autoregressive", "model.tubelet_frames": 1,
            "model.norm_pix_loss": False, "data.name": "moving-mnist", "data.actions": 5, "data.n_clips": 40}
    cfg = tiny_config("video-mae", over)
    dm = build_datamodule(cfg, workspace)
    model = build_model(cfg, dm).eval()
    with torch.no_grad():
        _, metrics = model._shared_step(next(iter(dm.val_dataloader())), "val")
    assert {"next_frame_loss", "next_frame_loss_shuffled", "next_frame_loss_no_actions",
            "action_effect_frac"} <= set(metrics)
    assert 0.0 <= float(metrics["action_effect_frac"][0]) <= 1.0


def test_counterfactual_counts_predictions_that_move_the_right_way(tiny_config):
    """An oracle whose predicted frame is a dot displaced by the action at frame t scores
    1.0; one that moves it the opposite way scores 0.0."""
    model = _model(tiny_config, "video-mae")
    c = model.cfg
    f, h, w = c.grid

    def oracle(sign):
        def ar_out(v, h_=None):
            b = v.inputs.shape[0]
            frame = -torch.ones(b, 3, c.image_size, c.image_size)  # black, (x - 0.5) / 0.5
            a = v.actions[:, c.frames // 2 - 1]
            dy = torch.tensor(ACTION_MOVES[:, 0], dtype=torch.long)[a] * 8 * sign
            dx = torch.tensor(ACTION_MOVES[:, 1], dtype=torch.long)[a] * 8 * sign
            for i in range(b):
                frame[i, :, 28 + dy[i]:36 + dy[i], 28 + dx[i]:36 + dx[i]] = 1.0
            from lit_modules.patchify import tubelets

            step = tubelets(frame[:, None], 1, c.patch_size)  # (B, h*w, P)
            return step.repeat(1, f, 1)
        return ar_out

    clips = _clips(model, 4)
    actions = torch.randint(0, 5, (4, c.frames))
    for sign, want in ((1, 1.0), (-1, 0.0)):
        model.ar_out = oracle(sign)
        assert model.action_effect(clips, actions) == want
