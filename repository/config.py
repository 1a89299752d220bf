"""The repository's ``config`` object: format version and the parameters every writer must share.

It is written once, with put-if-absent, when the repository is created; a reader that finds a format it
does not know refuses to touch the repository rather than guess.

The object carries ``sha256``, the SHA-256 of the canonical JSON of all its other fields, checked on every
open: a digit changed by hand or by bit-rot (a chunk size, a pack size, a compression level) would
otherwise be taken at its word by every later writer and reader. A config written before the checksum
existed has no ``sha256`` and still opens (legacy, logged at debug level): existing repositories keep
working, and fleece never rewrites a config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import IntegrityError, RepositoryError

log = logging.getLogger(__name__)

FORMAT = 1  #: what a plaintext repository is written as
FORMATS = (1, 2)  #: what this fleece reads and writes (2: encrypted)
ENCRYPTION_NONE = {"mode": "none"}
#: format 2's parameters (see crypto): the only ones there are so far
ENCRYPTION_V2 = {"mode": "aes-256-gcm", "ids": "hmac-sha256", "pack_keys": "x25519-hkdf-sha256",
                 "kdf": "scrypt"}
CONFIG_NAME = "config"
MiB = 1 << 20

LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")
MAX_LOCK_DAYS = 36500
MIN_LEVEL, MAX_LEVEL = 1, 19  # zstd levels a repository may use (20+ need huge windows: not for restore hosts)


@dataclass(frozen=True)
class RepoConfig:
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    format: int = FORMAT
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    chunk_size: int = 4 * MiB
    pack_target: int = 20 * MiB  # packs close at ≥ 20 MiB: ≤ ~52 PUTs per GiB on S3
    hash: str = "sha256"
    compression: dict[str, Any] = field(default_factory=lambda: {"algorithm": "zstd", "level": 3})
    encryption: dict[str, Any] = field(default_factory=lambda: dict(ENCRYPTION_NONE))
    #: format 2: a keyed checksum of every other field (``Keys.mac``), checked once the key is unlocked
    auth: str = ""
    #: S3 Object Lock (WORM): ``{"mode": "GOVERNANCE"|"COMPLIANCE", "days": N}`` — every pack, index
    #: object, manifest and the config are written locked for N days (absent: no lock)
    object_lock: dict[str, Any] | None = None

    @classmethod
    def encrypted(cls, **fields: Any) -> RepoConfig:
        """A new format 2 configuration (its ``auth`` is set by :meth:`authenticated`)."""
        return cls(format=2, encryption=dict(ENCRYPTION_V2), **fields)

    def fields(self) -> dict[str, Any]:
        """Every field as stored (``auth`` only in format 2)."""
        fields = asdict(self)
        if not self.auth:
            fields.pop("auth")
        if self.object_lock is None:
            fields.pop("object_lock")  # configs without it stay as they were written
        return fields

    def canonical(self) -> bytes:
        """The canonical JSON of every field but ``auth``: what ``auth`` authenticates."""
        fields = asdict(self)
        fields.pop("auth")
        if self.object_lock is None:
            fields.pop("object_lock")
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def to_bytes(self) -> bytes:
        fields = self.fields()
        return (json.dumps({**fields, "sha256": _digest(fields)}, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> RepoConfig:
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise IntegrityError(f"{where}/config is garbled ({exc}); this is not a usable fleece repository") from None
        fmt = obj.get("format")
        if fmt not in FORMATS or isinstance(fmt, bool):
            raise RepositoryError(f"{where} has repository format {fmt!r}, this fleece knows formats "
                                  f"{', '.join(map(str, FORMATS))}: use a fleece version that supports it")
        # After the format: a newer format may checksum differently, and must be told as such.
        _check_digest(obj, where)
        try:
            cfg = cls(**{k: obj[k] for k in ("id", "format", "created", "chunk_size", "pack_target", "hash",
                                               "compression", "encryption")}, auth=str(obj.get("auth", "")),
                      object_lock=obj.get("object_lock"))
        except KeyError as exc:
            raise IntegrityError(f"{where}/config lacks field {exc}") from None
        cfg.validate(where)
        return cfg

    def validate(self, where: str) -> None:
        if self.hash != "sha256":
            raise RepositoryError(f"{where}: unsupported blob hash {self.hash!r}")
        if self.compression.get("algorithm") != "zstd":
            raise RepositoryError(f"{where}: unsupported compression {self.compression!r}")
        level = self.compression.get("level")
        if not isinstance(level, int) or not MIN_LEVEL <= level <= MAX_LEVEL:
            raise RepositoryError(f"{where}: zstd level {level!r} must be a whole number from {MIN_LEVEL} to "
                                  f"{MAX_LEVEL}")
        wanted = ENCRYPTION_NONE if self.format == 1 else ENCRYPTION_V2
        if self.encryption != wanted:
            raise RepositoryError(f"{where}: format {self.format} with encryption {self.encryption!r} is not "
                                  "supported by this fleece version")
        if self.format == 1 and self.auth:
            raise IntegrityError(f"{where}/config is unencrypted (format 1) but carries a key checksum: it was "
                                 "edited, perhaps to turn encryption off", object="config")
        if self.chunk_size <= 0 or self.chunk_size & (self.chunk_size - 1) or self.chunk_size > 32 * MiB:
            raise RepositoryError(f"{where}: chunk_size {self.chunk_size} must be a power of two ≤ 32 MiB")
        if not MiB <= self.pack_target <= 1024 * MiB:
            raise RepositoryError(f"{where}: pack_target {self.pack_target} out of range")
        lock = self.object_lock
        if lock is not None and not (isinstance(lock, dict) and set(lock) == {"mode", "days"}
                                     and lock["mode"] in LOCK_MODES and isinstance(lock["days"], int)
                                     and not isinstance(lock["days"], bool) and 1 <= lock["days"] <= MAX_LOCK_DAYS):
            raise RepositoryError(f"{where}: object_lock {lock!r} is not supported by this fleece version")


def _digest(fields: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of the config's fields (every field but ``sha256`` itself)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_digest(obj: dict[str, Any], where: str) -> None:
    if "sha256" not in obj:
        log.debug("%s/config has no checksum (written by an older fleece): accepted as is", where)
        return
    fields = {k: v for k, v in obj.items() if k != "sha256"}
    if obj["sha256"] != _digest(fields):
        raise IntegrityError(f"{where}/config does not match its sha256 checksum: it was edited or damaged, and "
                             "fleece will not guess its chunk size, pack size or compression; put back the "
                             "original config object (from a copy of the repository, or as another host "
                             "last read it)", object="config")
