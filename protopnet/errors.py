"""Domain exceptions. Library code raises these; only the service maps them to HTTP."""

from __future__ import annotations

from collections.abc import Iterable


class ProtoPNetError(Exception):
    """Base class of every error this project raises on purpose."""


class UnknownNameError(ProtoPNetError, KeyError):
    """A name (backbone, model, version, alias, dataset...) that is not registered."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        shown = ", ".join(self.valid[:40]) + (" ..." if len(self.valid) > 40 else "")
        super().__init__(f"unknown {kind} {name!r}; valid: {shown or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightsError(ProtoPNetError):
    """A weights file that is missing, unsafe or does not fit the architecture."""


class ShapeError(ProtoPNetError, ValueError):
    """An input whose shape does not fit the model."""
