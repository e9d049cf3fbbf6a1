"""The one error type for bad user input: names the field, the value and what is allowed."""

from __future__ import annotations


class ConfigError(ValueError):
    """A one-line error about user input.

    ``ConfigError("model.depth", 0, "must be an integer >= 1")`` reads
    ``model.depth = 0: must be an integer >= 1``.
    """

    def __init__(self, field: str, value: object, allowed: str, source: str | None = None):
        self.field, self.value, self.allowed, self.source = field, value, allowed, source
        super().__init__(self._message())

    def _message(self) -> str:
        head = f"{self.source}: " if self.source else ""
        return f"{head}{self.field} = {self.value!r}: {self.allowed}"

    def within(self, prefix: str | None = None, source: str | None = None) -> ConfigError:
        """The same error with the field prefixed by its section and/or a source file."""
        field = f"{prefix}.{self.field}" if prefix else self.field
        return ConfigError(field, self.value, self.allowed, source or self.source)


def check_at_least(cfg: object, names: tuple[str, ...], minimum: int = 1) -> None:
    """Each named integer field of ``cfg`` is >= ``minimum``."""
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ConfigError(name, getattr(cfg, name), f"must be an integer >= {minimum}")


def check_width(cfg: object, width: str = "width", heads: str = "heads") -> None:
    """A transformer width splits evenly into its attention heads."""
    w, h = getattr(cfg, width), getattr(cfg, heads)
    if w < 1 or w % h:
        raise ConfigError(width, w, f"must be a positive multiple of {heads} ({h})")


def check_dropout(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError("dropout", value, "must be in [0, 1)")

