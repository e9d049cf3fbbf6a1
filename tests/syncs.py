"""Count, on CPU, the calls that would make the host wait for a CUDA device.

On a GPU these read a value the device computes (``Tensor.item``, ``bool(t)``,
``int(t)``, ``float(t)``, ``.tolist()``), copy to the host (``.cpu()``, ``.numpy()``) or
size an output by data (``nonzero``, ``masked_select``, ``unique``, a gather or an
assignment through a boolean mask): each stalls the launch queue until the GPU catches
up. On CPU they cost nothing, so they are counted instead: the scalar reads and
data-sized ops at the dispatcher (a ``TorchDispatchMode``, which sees the calls Python
makes and those inside other ops), the copies by wrapping the two methods.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
            "aten::unique_dim", "aten::unique_consecutive", "aten::repeat_interleave"}
MASK_INDEXED = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class SyncCounter(TorchDispatchMode):
    """Records the name of every would-be synchronizing call while active."""

    def __init__(self, where: bool = False):
        super().__init__()
        self.calls: list[str] = []
        self.where = where  # also record the innermost masklab frame of each call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNC_OPS or (name in MASK_INDEXED and _bool_index(args)):
            label = name if name in SYNC_OPS else f"{name} (boolean mask)"
            if self.where:
                import traceback

                frames = [f for f in traceback.extract_stack() if "/lit_modules/" in f.filename]
                label += f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else " (Lightning)"
            self.calls.append(label)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_copies(calls: list[str]):
    """Record ``Tensor.cpu`` / ``Tensor.numpy`` / ``Tensor.tolist`` calls into ``calls``."""
    originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "numpy", "tolist")}

    def wrap(name, real):
        def method(self, *a, **k):
            calls.append(f"Tensor.{name}")
            return real(self, *a, **k)
        return method

    try:
        for name, real in originals.items():
            setattr(torch.Tensor, name, wrap(name, real))
        yield calls
    finally:
        for name, real in originals.items():
            setattr(torch.Tensor, name, real)


def watch_training_steps(model) -> dict[int, list[str]]:
    """Wrap ``model.training_step`` so each call records its would-be syncs, by the
    global step it ran at: {step: [call names]}."""
    seen: dict[int, list[str]] = {}
    real = model.training_step

    def step(*args, **kwargs):
        counter = SyncCounter(where=True)
        with counting_copies(counter.calls), counter:
            out = real(*args, **kwargs)
        seen[model.global_step] = counter.calls
        return out

    model.training_step = step
    return seen
