"""The one exception tree of fleece.

Every error the core raises derives from :class:`FleeceError`, and every message is meant to be shown
to a user as-is: it names the object or device involved and says what to do next. The CLI maps the tree
to exit codes (usage errors → 2, everything else → 1) and never needs to know the individual reasons,
in the same spirit as ``qemu.qmp``'s ``QMPError`` family.

The base lives in ``repository`` because both ``exporter`` and ``restore`` depend on this package and on
nothing else of each other.
"""

from __future__ import annotations


class FleeceError(Exception):
    """Base of every error fleece raises on purpose."""


class UsageError(FleeceError):
    """The user asked for something that cannot work as given (bad flag value, unknown disk, ...)."""


class RepositoryError(FleeceError):
    """The repository is missing, of an unknown format, or cannot be read or written."""


class IntegrityError(RepositoryError):
    """Stored data does not match what the repository format promises (truncated, garbled, wrong hash)."""


class BackendError(RepositoryError):
    """A storage backend operation failed. Subclasses say whether retrying can help."""


class ObjectNotFound(BackendError):
    """The named object does not exist in the backend."""


class TransientBackendError(BackendError):
    """A failure that may go away when retried (timeouts, 5xx, throttling, connection resets)."""


class PermanentBackendError(BackendError):
    """A failure retrying will not fix (access denied, no such bucket, disk full, read-only)."""
