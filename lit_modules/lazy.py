"""A module imported on first use.

The masking strategies are also the config sections they are named by, so a spec is
validated by building them; importing torch for that would cost seconds before a
one-line error. The masking modules therefore refer to torch through ``LazyModule``:
``torch.zeros`` imports torch the first time it is looked up, and code that only builds
and checks the frozen dataclasses never does.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands in for ``importlib.import_module(name)``; imports it on first attribute use."""

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_module", None)

    def _load(self) -> ModuleType:
        module = object.__getattribute__(self, "_module")
        if module is None:
            module = importlib.import_module(object.__getattribute__(self, "_name"))
            object.__setattr__(self, "_module", module)
        return module

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._load(), attr)
        object.__setattr__(self, attr, value)  # later lookups skip __getattr__
        return value

    def __repr__(self) -> str:
        return f"<lazy module {object.__getattribute__(self, '_name')!r}>"
