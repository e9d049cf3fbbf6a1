"""Reading checkpoints without running their code.

A checkpoint is a pickle; unpickling an arbitrary one can execute code. Every checkpoint
masklab reads (``model.init_from``, a resumed trial's ``last.ckpt``) is loaded with
``torch.load(weights_only=True)``: tensors and plain containers (dict, list, tuple, str,
numbers) only. masklab's own checkpoints need nothing more: hyperparameters are saved as
the plain nested run-config dict, and the optimizer, scheduler and loop states are plain
too, so no global is allowlisted. Anything else is refused with a one-line error naming
the file and the object it would have built, and nothing in the file runs.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from .config_errors import ConfigError


def load_checkpoint(path: str | Path, field: str = "checkpoint", *, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path`` as plain data (tensors on the CPU); ``mmap`` maps the
    tensors instead of reading them. A missing, unreadable or unsafe file is a
    ConfigError about ``field``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, str(path), "no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:  # not a pickle torch wrote: garbage or a foreign format
            raise ConfigError(field, str(path), "is not a readable checkpoint (not a torch.save file)") from None
        raise ConfigError(field, str(path), f"refused: it would build {found.group(1)}; only tensors and plain "
                                            "data are loaded (weights_only), so nothing in it ran") from None
    except (RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(field, str(path), f"is not a readable checkpoint ({first})") from None
    if not isinstance(state, dict):
        raise ConfigError(field, str(path), f"holds a {type(state).__name__}, not a checkpoint dict")
    return state

