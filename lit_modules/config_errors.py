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
