"""Name -> class registries for models, maskings and datasets, filled by decorators.

Tests, ``masklab list`` and config validation enumerate them; adding a model or a masking
strategy is one class with a ``@MODELS.register(...)`` / ``@MASKINGS.register(...)`` line.

Each name has a config (a frozen dataclass, torch-free) and an implementation:
- maskings: the strategy class is both (its fields are the config section);
- models and datasets: the config is registered with ``register_config`` in the
  torch-free ``model_configs.py`` / ``data/configs.py``, the implementation (a
  LightningModule or LightningDataModule) with ``register`` in its own module.
``config(name)`` imports only the torch-free modules, so specs are validated without
torch or Lightning; ``get(name)`` imports the implementations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config_errors import ConfigError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._configs: dict[str, Any] = {}
        self._retired: dict[str, str] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator: ``obj`` implements ``name``."""
        return _adder(self._items, f"{self.kind} {name!r}", (name,))

    def register_config(self, *names: str) -> Callable[[Any], Any]:
        """Decorator: the config dataclass of each of ``names`` (torch-free modules only)."""
        return _adder(self._configs, f"{self.kind} config", names)

    def retire(self, name: str, why: str) -> None:
        """``name`` is no longer registered; looking it up is an error saying ``why``."""
        self._retired[name] = why

    def get(self, name: str, field: str | None = None) -> Any:
        """The implementation registered as ``name`` (imports every implementation)."""
        ensure_registered()
        self._check_retired(name, field)
        if name not in self._items:
            raise ConfigError(field or f"{self.kind}.name", name, f"allowed: {', '.join(self.names())}")
        return self._items[name]

    def config(self, name: str, field: str | None = None) -> Any:
        """The config dataclass of ``name``; imports no torch."""
        ensure_configs()
        self._check_retired(name, field)
        found = self._configs.get(name, self._items.get(name))
        if found is None:
            raise ConfigError(field or f"{self.kind}.name", name, f"allowed: {', '.join(self.names())}")
        return getattr(found, "Config", found)

    def _check_retired(self, name: str, field: str | None) -> None:
        if name in self._retired:
            raise ConfigError(field or f"{self.kind}.name", name, self._retired[name])

    def names(self) -> list[str]:
        ensure_configs()
        return sorted(set(self._configs) | set(self._items))

    def items(self) -> list[tuple[str, Any]]:
        """(name, implementation) pairs, every implementation imported."""
        ensure_registered()
        return [(n, self._items[n]) for n in sorted(self._items)]


def _adder(table: dict[str, Any], what: str, names: tuple[str, ...]) -> Callable[[Any], Any]:
    def decorator(obj: Any) -> Any:
        for name in names:
            if name in table and table[name] is not obj:
                raise KeyError(f"{what} {name!r} is registered twice")
            table[name] = obj
        return obj

    return decorator


MODELS = Registry("model")
MASKINGS = Registry("masking")
DATASETS = Registry("dataset")


def ensure_configs() -> None:
    """Import the torch-free modules that register every config (idempotent): the model
    and data configs, and every module of ``lit_modules.masking`` (a new strategy is one
    new file there, found without being listed)."""
    import importlib
    import pkgutil

    from . import masking, model_configs  # noqa: F401
    from .data import configs  # noqa: F401

    for info in pkgutil.iter_modules(masking.__path__):
        importlib.import_module(f"{masking.__name__}.{info.name}")


def ensure_registered() -> None:
    """Import the modules whose decorators fill the registries (idempotent)."""
    ensure_configs()
    from . import beit, bert, electra, gpt, mae  # noqa: F401
    from . import video as video_model  # noqa: F401  (aliased: data.video and masking.video share the name)
    from .data import images, text, video  # noqa: F401
