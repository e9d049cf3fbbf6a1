"""What a GPU run depends on, checked on CPU: batches and masks made in DataLoader workers
are the ones the main process makes; the training step never waits for the device
outside logging steps; a non-finite loss still ends the trial; a compiled model computes
the losses the eager one does."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lit_modules.base import NonFiniteLossError
from lit_modules.data.loading import Loading, resolve_workers
from lit_modules.registry import MODELS
from lit_modules.run import build_datamodule, build_model, build_trainer

from .syncs import watch_training_steps

LOG_EVERY = 10


def _tensors(obj, prefix="") -> dict[str, torch.Tensor]:
    """Every tensor inside a (nested) batch dataclass, by its path."""
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            out.update(_tensors(getattr(obj, f.name), f"{prefix}.{f.name}"))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}[{k!r}]"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}[{i}]"))
    return out


def _batches(dm, workers: int) -> list[dict[str, torch.Tensor]]:
    dm.loading = Loading(workers=workers)
    train, val = dm.train_dataloader(), dm.val_dataloader()
    return [_tensors(item) for item in train] + [_tensors(item) for item in val]


@pytest.mark.parametrize("family", ["bert", "mae"])
def test_batches_and_masks_are_bit_identical_at_0_1_and_2_workers(family, tiny_config, workspace):
    """BERT: MLM masks on sampled text rows; MAE: crop-and-flip augmentation and patch
    masks on sampled images. Training items of one epoch and every validation batch."""
    cfg = tiny_config(family, {"trainer.max_steps": 6, "trainer.val_every": 6})
    dm = build_datamodule(cfg, workspace)
    runs = {w: _batches(dm, w) for w in (0, 1, 2)}
    assert len(runs[0]) > 6 and all(len(r) == len(runs[0]) for r in runs.values())
    assert any(k.endswith("loss_mask") for k in runs[0][0])  # the masks are part of what is compared
    for w in (1, 2):
        for i, (a, b) in enumerate(zip(runs[0], runs[w])):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (w, i, k)


def test_auto_workers_leave_the_cpu_to_training_and_share_cores_between_gpus(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert resolve_workers("auto", cuda=False) == 0
    assert resolve_workers("auto", cuda=True, devices=1) == 8  # capped
    assert resolve_workers("auto", cuda=True, devices=4) == 3  # 4 cores per GPU, one for the training loop
    assert resolve_workers("auto", cuda=True, devices=16) == 1
    assert resolve_workers(3, cuda=False) == 3
    monkeypatch.setenv("MASKLAB_CORES", "4")  # masklab launch: 4 GPU workers on this machine
    assert resolve_workers("auto", cuda=True) == 3


def test_num_workers_is_not_part_of_the_experiment(tiny_config):
    """Runs that differ only in how data is loaded (or whether the model is compiled)
    are replicates of one config: the same hash."""
    base = tiny_config("gpt")
    for change in ({"data.num_workers": 4}, {"data.prefetch_factor": 8}, {"trainer.compile": True}):
        assert tiny_config("gpt", change).hash() == base.hash(), change
    assert tiny_config("gpt", {"data.batch_size": 8}).hash() != base.hash()


@pytest.mark.parametrize("family", sorted(MODELS.names()))
def test_no_host_sync_in_the_training_step_outside_logging_steps(family, tiny_config, workspace):
    """20 steps, logging every 10: the calls that would make the host wait for a CUDA
    device (tests/syncs.py: item, bool, int, float, cpu, tolist, numpy, nonzero, boolean
    masks) happen in training_step only at the logging steps (global steps 9 and 19),
    where the non-finite-loss flag is read."""
    cfg = tiny_config(family, {"trainer.max_steps": 20, "trainer.val_every": 20, "trainer.log_every": LOG_EVERY,
                               "trainer.checkpoint": False})
    dm = build_datamodule(cfg, workspace)
    model = build_model(cfg, dm)
    seen = watch_training_steps(model)
    build_trainer(cfg, None, [], None).fit(model, datamodule=dm)
    assert sorted(seen) == list(range(20))
    outside = {step: calls for step, calls in seen.items() if (step + 1) % LOG_EVERY and calls}
    assert not outside, f"syncs outside logging steps: {outside}"
    assert all(seen[s] for s in (9, 19))  # the flag is read there (the counter sees what it should)


def test_a_non_finite_loss_ends_the_trial_with_its_first_step_and_value(tiny_config, workspace):
    """The loss turns NaN at step 3; the flag is read at the logging step (9): the run
    ends there, before any validation or checkpoint, naming step 3."""
    cfg = tiny_config("gpt", {"trainer.max_steps": 20, "trainer.val_every": 20, "trainer.log_every": LOG_EVERY,
                              "trainer.checkpoint": False})
    dm = build_datamodule(cfg, workspace)
    model = build_model(cfg, dm)
    real = model._shared_step

    def poisoned(item, stage):
        loss, metrics = real(item, stage)
        return (loss * math.nan if stage == "train" and model.global_step >= 3 else loss), metrics

    model._shared_step = poisoned
    steps = []
    model.on_train_batch_end = lambda *a: steps.append(model.global_step)
    with pytest.raises(NonFiniteLossError, match=r"^train/loss = nan at step 3$"):
        build_trainer(cfg, None, [], None).fit(model, datamodule=dm)
    assert max(steps) == 9  # steps 3-8 ran (the device flag held the first); step 9's check ended it


def _losses(cfg, workspace) -> list[float]:
    dm = build_datamodule(cfg, workspace)
    model = build_model(cfg, dm)
    losses = []

    class Record(__import__("lightning").Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    build_trainer(cfg, None, [Record()], None).fit(model, datamodule=dm)
    return losses


def test_compiled_gpt_gives_the_eager_losses(tiny_config, workspace):
    """trainer.compile: the blocks compiled by inductor; 5 steps, the same losses within 1e-5."""
    from lit_modules.config_errors import ConfigError
    from lit_modules.run import check_compiler

    try:
        check_compiler("cpu")
    except ConfigError as e:
        pytest.skip(f"torch.compile is unavailable here: {e}")
    settings = {"trainer.max_steps": 5, "trainer.val_every": 5, "trainer.checkpoint": False, "model.depth": 1}
    eager = _losses(tiny_config("gpt", settings), workspace)
    compiled = _losses(tiny_config("gpt", {**settings, "trainer.compile": True}), workspace)
    assert len(eager) == len(compiled) == 5
    assert compiled == pytest.approx(eager, abs=1e-5, rel=0)
    assert eager[0] != eager[-1]  # it trained


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", sorted(MODELS.names()))
def test_no_cuda_sync_in_the_training_step_on_a_gpu(family, tiny_config, workspace):
    """On a CUDA device, bf16-mixed, with workers: CUDA's own sync debug mode flags no
    synchronizing call inside training_step outside the logging steps, and flags the read
    of the non-finite flag at the logging steps (the mode is on)."""
    import warnings

    cfg = tiny_config(family, {"trainer.max_steps": 20, "trainer.val_every": 20, "trainer.log_every": LOG_EVERY,
                               "trainer.checkpoint": False, "trainer.accelerator": "cuda",
                               "trainer.precision": "bf16-mixed", "data.num_workers": 2})
    dm = build_datamodule(cfg, workspace)
    model = build_model(cfg, dm)
    real, flagged = model.training_step, {}

    def step(*args, **kwargs):
        at = model.global_step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return real(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                flagged[at] = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]

    model.training_step = step
    build_trainer(cfg, None, [], None).fit(model, datamodule=dm)
    assert sorted(flagged) == list(range(20))
    assert not {s: f for s, f in flagged.items() if f and (s + 1) % LOG_EVERY}, flagged
    assert flagged[9] and flagged[19]
