"""Build the pieces of one run from a RunConfig: data module, model, Trainer.

Tracking-agnostic: the caller passes the Lightning logger and any callbacks.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

import lightning as L
import torch

from .config import RunConfig
from .config_errors import ConfigError
from .paths import Workspace
from .registry import DATASETS, MODELS


def build_datamodule(cfg: RunConfig, workspace: Workspace) -> L.LightningDataModule:
    """The data module, already set up (tokenizer trained, corpus encoded): data errors
    surface here, before any run is recorded."""
    t = cfg.trainer
    if t.compile:
        check_compiler(t.accelerator)
    family = MODELS.get(cfg.model.name)
    steps_per_epoch = max(1, min(t.val_every, t.max_steps))  # one epoch = one validation interval
    dm = DATASETS.get(cfg.data.name)(cfg.data, getattr(cfg.model, "block_size", 0), cfg.seed, t.max_steps, workspace,
                                     steps_per_epoch=steps_per_epoch, layout=family.data_layout,
                                     plan=family.mask_plan(cfg, steps_per_epoch))
    from .data.loading import loading_for

    dm.loading = loading_for(cfg.data, t)
    dm.setup("fit")
    dm.info["data.workers"] = dm.loading.workers  # what num_workers resolved to on this machine
    check_fits_data(cfg, dm)
    return dm


def check_compiler(accelerator: str) -> None:
    """``trainer.compile`` needs a compiler for the device: Triton on CUDA, a C++
    compiler on CPU (inductor's code generators); a one-line ConfigError otherwise."""
    import shutil

    from .data.loading import uses_cuda

    if uses_cuda(accelerator):
        try:
            import triton  # noqa: F401
        except ImportError:
            raise ConfigError("trainer.compile", True, "needs Triton for torch.compile on CUDA; "
                                                       "it is not installed (set trainer.compile: false)") from None
        return
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        raise ConfigError("trainer.compile", True, "needs a C++ compiler (g++, c++ or clang++ on PATH) for "
                                                   "torch.compile on CPU; none found (set trainer.compile: false)")


def check_fits_data(cfg: RunConfig, dm) -> None:
    """The model is built for the data's shapes (image and video models): a one-line
    ConfigError naming what to change otherwise."""
    kind, have_kind = getattr(cfg.model, "clip_kind", None), getattr(dm, "clip_kind", None)
    if kind is not None and have_kind is not None and kind != have_kind:
        fits = [n for n in MODELS.names() if getattr(MODELS.config(n), "clip_kind", None) == have_kind]
        raise ConfigError("model.name", cfg.model.name, f"takes {kind} clips and the {cfg.data.name} data has "
                                                        f"{have_kind} clips; use model {' or '.join(fits)}")
    for field in ("image_size", "frames"):
        want, have = getattr(cfg.model, field, None), getattr(dm, field, None)
        if want is not None and have not in (None, 0) and want != have:
            raise ConfigError(f"model.{field}", want, f"the {cfg.data.name} data has {field} {have}; "
                              f"set model.{field}: {have} or change the data config to match")
    want, have = getattr(cfg.model, "vocab_size", None), getattr(dm, "vocab_size", None)
    if have_kind == "tokens" and want is not None and have and want < have:
        raise ConfigError("model.vocab_size", want, f"the {cfg.data.name} clips hold ids up to {have - 1}; "
                                                    f"set model.vocab_size >= {have} (data.vocab_size)")


def build_model(cfg: RunConfig, datamodule: L.LightningDataModule | None = None) -> L.LightningModule:
    """The run's module, seeded; with its data module, a family that learns something
    from the data before training (BEiT's patch tokenizer: ``fit_to_data``) learns it here
    (otherwise Lightning's ``setup`` hook does, when it trains)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = MODELS.get(cfg.model.name)(cfg.to_dict())
    if datamodule is not None and hasattr(model, "fit_to_data"):
        model.fit_to_data(datamodule)
    return model


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto' -> bf16-mixed where a CUDA device supports it, else full fp32."""
    if precision != "auto":
        return precision
    if accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, unwritable output dir); one line
    naming the path, and whether an earlier checkpoint is still there."""


def ensure_written(path: Path) -> None:
    """Raise the OSError that kept ``path`` from being written. Lightning saves through an
    fsspec transaction whose commit can fail without a word (a directory made unwritable
    after the run started): the file is then simply not there."""
    if path.is_file():
        return
    with open(path, "wb"):  # raises the reason (permission, read-only filesystem, full disk)
        pass
    path.unlink()
    raise OSError(f"{path} was not written")


def discard_partial(path: Path) -> None:
    """Remove a half-written checkpoint, if it can be."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


class LastCheckpoint(L.Callback):
    """Keeps ``last.ckpt`` (weights, optimizer, schedule, loop state), rewritten after
    every validation. A run cut off resumes from it at a validation boundary
    (``fit(ckpt_path=...)``), where the next epoch's batches are exactly those the
    uninterrupted run would have drawn.

    Each checkpoint is written to a partial file and renamed over ``last.ckpt``, so a
    process killed while saving leaves the previous one. A logger that sends in the
    background may offer ``when_stored(fn)`` (run ``fn`` once everything logged so far
    is stored): the rename then waits for it, off the training thread, so a resumed run
    always finds its curves complete up to its checkpoint and training never waits on
    the tracking server.
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / "last.ckpt"

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.{trainer.global_step}.partial")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(partial, weights_only=False)  # saving: False keeps the optimizer state
            ensure_written(partial)
        except OSError as e:
            discard_partial(partial)
            kept = f"the previous checkpoint {self.path} is kept" if self.path.exists() else "no earlier checkpoint"
            raise CheckpointWriteError(f"cannot write the checkpoint at step {trainer.global_step} to "
                                       f"{e.filename or partial}: {e.strerror or e}; {kept}") from None
        if not trainer.is_global_zero:
            return
        waiting = [lg for lg in trainer.loggers if hasattr(lg, "when_stored")]
        if not waiting:
            os.replace(partial, self.path)
            return
        left, lock, step = [len(waiting)], threading.Lock(), trainer.global_step

        def stored() -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            try:
                os.replace(partial, self.path)
            except OSError as e:
                discard_partial(partial)
                raise CheckpointWriteError(f"cannot publish the checkpoint of step {step} as {self.path}: "
                                           f"{e.strerror or e}; the previous one is kept") from None

        for logger in waiting:
            logger.when_stored(stored)


def build_trainer(cfg: RunConfig, logger, callbacks: list, checkpoint_dir: Path | None) -> L.Trainer:
    # Our items move themselves (MaskedModelBase.transfer_batch_to_device), deliberately.
    warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
    t = cfg.trainer
    from .perf import Throughput

    callbacks = [*callbacks, Throughput()]
    if t.checkpoint and checkpoint_dir is not None:
        callbacks.append(LastCheckpoint(Path(checkpoint_dir)))
    return L.Trainer(
        # One epoch = one validation interval (see lit_modules/data/steps.py).
        max_steps=t.max_steps,
        max_epochs=-(-t.max_steps // t.val_every),
        check_val_every_n_epoch=1,
        log_every_n_steps=min(t.log_every, t.val_every),
        accelerator=t.accelerator,
        devices=t.devices,
        precision=resolve_precision(t.precision, t.accelerator),
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=False,  # LastCheckpoint (above) is the only checkpointing
        # Bars only on a terminal: in logs and CI they are thousands of redrawn lines.
        enable_progress_bar=t.progress_bar and sys.stderr.isatty(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(checkpoint_dir) if checkpoint_dir else None,
    )
