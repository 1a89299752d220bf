"""fleece's repository: formats 1 (plaintext) and 2 (encrypted) — config, key slots, packs, index,
manifests —, codec, encryption, and storage backends.

See ``docs/FORMAT.md`` for the byte layout and DESIGN.md §4 for the invariants.

The names below are loaded on first use (PEP 562): a process that needs only :mod:`.errors` (the thaw and
pause guard a backup starts, whose Python start-up precedes the guest's pause) must not import the whole
repository — ~0.1 s here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .chain import Piece
    from .config import RepoConfig
    from .errors import (BackendError, FleeceError, IntegrityError, ObjectNotFound, PermanentBackendError,
                         RepositoryError, TransientBackendError, UsageError)
    from .manifest import KIND_FULL, KIND_INCREMENTAL, DiskRecord, Manifest, new_point_id
    from .repo import PointScan, Repository
    from .writer import BlobWriter, WriterStats

#: each public name and the module that defines it
_WHERE = {
    "Piece": "chain", "RepoConfig": "config",
    **{n: "errors" for n in ("BackendError", "FleeceError", "IntegrityError", "ObjectNotFound",
                             "PermanentBackendError", "RepositoryError", "TransientBackendError", "UsageError")},
    **{n: "manifest" for n in ("KIND_FULL", "KIND_INCREMENTAL", "DiskRecord", "Manifest", "new_point_id")},
    "PointScan": "repo", "Repository": "repo", "BlobWriter": "writer", "WriterStats": "writer",
}

__all__ = [
    "BackendError", "BlobWriter", "DiskRecord", "FleeceError", "IntegrityError", "KIND_FULL", "KIND_INCREMENTAL",
    "Manifest", "ObjectNotFound", "PermanentBackendError", "Piece", "PointScan", "RepoConfig", "Repository",
    "RepositoryError", "TransientBackendError", "UsageError", "WriterStats", "new_point_id",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value
