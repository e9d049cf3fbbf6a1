"""How the data modules' loaders run: worker processes, pinned memory, prefetch.

Batch assembly, augmentation and masking all happen in the dataset's ``__getitem__``
(a whole step's batch, masked by the run's ``MaskPlan``) and in the validation collate,
so with workers they run in the worker processes while the device computes, and the
training loop only dequeues ready batches. Each item depends on its step alone (see
``steps.py``): the batches and masks are bit-identical whatever the number of workers.

``data.num_workers: auto`` gives each training process a share of the CPU cores it may
use: on a CUDA device ``min(8, cores // devices - 1)`` (one core stays with the
training loop), on a CPU 0: there the workers would take cores from the training step
itself (``benchmarks/bench_data.py`` measures it). ``cores`` is the process's CPU
affinity (what Slurm's ``--cpus-per-task`` grants), or ``MASKLAB_CORES`` where ``masklab
launch`` starts several GPU workers on one machine and gives each its share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MAX_AUTO_WORKERS = 8  # beyond this the loader rarely is the bottleneck, and each worker holds a copy of the plan


@dataclass(frozen=True)
class Loading:
    """The DataLoader settings of a run's training and validation loaders."""

    workers: int = 0
    pin_memory: bool = False  # page-locked batches: asynchronous host-to-GPU copies
    prefetch_factor: int = 2  # batches each worker keeps ready

    def kwargs(self, pin: bool = True) -> dict:
        """DataLoader arguments; ``pin``: whether this loader pins its batches (the
        training loader: the hot path). A pinning loader starts torch's pin thread, whose
        first act, ``torch.set_num_threads(1)``, the process's other threads see too:
        ``perf.Throughput`` sets the count back after training."""
        pin = pin and self.pin_memory
        if self.workers == 0:
            return {"num_workers": 0, "pin_memory": pin}
        # Persistent: the workers outlive an epoch (one validation interval), so a run
        # pays their start once, not at every validation.
        return {"num_workers": self.workers, "pin_memory": pin, "persistent_workers": True,
                "prefetch_factor": self.prefetch_factor}


def uses_cuda(accelerator: str) -> bool:
    """Whether a trainer with this ``accelerator`` setting trains on a CUDA device."""
    import torch

    return accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_workers(setting: int | str, cuda: bool, devices: int = 1) -> int:
    """``data.num_workers`` as a number: itself, or for ``auto`` the share described in
    the module docstring."""
    if setting != "auto":
        return int(setting)
    if not cuda:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = os.environ.get("MASKLAB_CORES", "")
    if share.isdigit() and int(share) > 0:
        cores = min(cores, int(share))
    return max(1, min(MAX_AUTO_WORKERS, cores // max(1, devices) - 1))


def loading_for(data_cfg, trainer_cfg) -> Loading:
    """The loaders' settings of a run from its ``data`` and ``trainer`` sections."""
    cuda = uses_cuda(trainer_cfg.accelerator)
    workers = resolve_workers(getattr(data_cfg, "num_workers", 0), cuda, trainer_cfg.devices)
    return Loading(workers=workers, pin_memory=cuda, prefetch_factor=getattr(data_cfg, "prefetch_factor", 2))


class LoaderMixin:
    """``self.loader(dataset, **kw)``: a DataLoader with the run's ``Loading`` (set by
    ``run.build_datamodule``; a data module built by hand loads in the main process)."""

    loading: Loading = Loading()

    def loader(self, dataset, pin: bool = True, **kwargs):
        from torch.utils.data import DataLoader

        return DataLoader(dataset, **kwargs, **self.loading.kwargs(pin))
