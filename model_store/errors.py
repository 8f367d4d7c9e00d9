"""The model store's domain exceptions. Only the service maps them to HTTP."""

from __future__ import annotations

from protopnet.errors import ProtoPNetError


class StoreError(ProtoPNetError):
    """Base class of every error the model store raises on purpose."""


class IntegrityError(StoreError):
    """A published file that is missing, changed, truncated or unexpected.

    ``path`` is the offending file, so that a user can find it.
    """

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


class InvalidNameError(StoreError, ValueError):
    """A model, version or alias name that the store cannot hold (bad characters, clashes)."""


class VersionExistsError(StoreError):
    """Publishing an explicit version that is already taken."""


class PublishError(StoreError, ValueError):
    """Publish inputs that do not fit together (prototype table, visuals, class names...)."""


class UnsafePickleError(StoreError):
    """A file that holds pickled objects; loading it would run code from the file."""


class WrongKindError(StoreError):
    """A version of one model kind asked for where another is needed (a Drumond model's
    reference given to ProtoPNet-only code)."""

    def __init__(self, ref: str, kind: str, needed: str, what: str = "this"):
        self.ref, self.kind, self.needed = ref, kind, needed
        super().__init__(f"{ref} is a {kind} model; {what} needs a {needed} model")
