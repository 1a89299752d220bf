"""fleece's repository: formats 1 (plaintext) and 2 (encrypted) — config, key slots, packs, index,
manifests —, codec, encryption, and storage backends.

See ``docs/FORMAT.md`` for the byte layout and DESIGN.md §4 for the invariants.
"""

from .chain import Piece
from .config import RepoConfig
from .errors import (BackendError, FleeceError, IntegrityError, ObjectNotFound, PermanentBackendError,
                     RepositoryError, TransientBackendError, UsageError)
from .manifest import KIND_FULL, KIND_INCREMENTAL, DiskRecord, Manifest, new_point_id
from .repo import PointScan, Repository
from .writer import BlobWriter, WriterStats

__all__ = [
    "BackendError", "BlobWriter", "DiskRecord", "FleeceError", "IntegrityError", "KIND_FULL", "KIND_INCREMENTAL",
    "Manifest", "ObjectNotFound", "PermanentBackendError", "Piece", "PointScan", "RepoConfig", "Repository",
    "RepositoryError", "TransientBackendError", "UsageError", "WriterStats", "new_point_id",
]
