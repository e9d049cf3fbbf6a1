"""Name -> class registries for models, maskings and datasets, filled by decorators.

Tests, ``masklab list`` and config validation enumerate them; adding a model or a masking
strategy is one class with a ``@MODELS.register(...)`` / ``@MASKINGS.register(...)`` line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config_errors import ConfigError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def decorator(obj: Any) -> Any:
            if name in self._items and self._items[name] is not obj:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str, field: str | None = None) -> Any:
        ensure_registered()
        if name not in self._items:
            raise ConfigError(field or f"{self.kind}.name", name, f"allowed: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        ensure_registered()
        return sorted(self._items)

    def items(self) -> list[tuple[str, Any]]:
        return [(n, self._items[n]) for n in self.names()]


MODELS = Registry("model")
MASKINGS = Registry("masking")
DATASETS = Registry("dataset")


def ensure_registered() -> None:
    """Import the modules whose decorators fill the registries (idempotent)."""
    from . import bert, gpt, mae  # noqa: F401
    from . import video as video_model  # noqa: F401  (aliased: data.video and masking.video share the name)
    from .data import images, text, video  # noqa: F401
    from .masking import causal_lm, mlm, patches  # noqa: F401
    from .masking import video as masking_video  # noqa: F401  (aliased: data.video shares the name)
