"""The repository's ``config`` object: format version and the parameters every writer must share.

It is written once, with put-if-absent, when the repository is created; a reader that finds a format it
does not know refuses to touch the repository rather than guess.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import IntegrityError, RepositoryError

FORMAT = 1
CONFIG_NAME = "config"
MiB = 1 << 20

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
    encryption: dict[str, Any] = field(default_factory=lambda: {"mode": "none"})

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> RepoConfig:
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise IntegrityError(f"{where}/config is garbled ({exc}); this is not a usable fleece repository") from None
        fmt = obj.get("format")
        if fmt != FORMAT:
            raise RepositoryError(f"{where} has repository format {fmt!r}, this fleece knows format {FORMAT}: "
                                  "use a fleece version that supports it")
        try:
            cfg = cls(**{k: obj[k] for k in ("id", "format", "created", "chunk_size", "pack_target", "hash",
                                               "compression", "encryption")})
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
        if self.encryption.get("mode") != "none":
            raise RepositoryError(f"{where}: encrypted repositories ({self.encryption.get('mode')!r}) are not "
                                  "supported by this fleece version")
        if self.chunk_size <= 0 or self.chunk_size & (self.chunk_size - 1) or self.chunk_size > 32 * MiB:
            raise RepositoryError(f"{where}: chunk_size {self.chunk_size} must be a power of two ≤ 32 MiB")
        if not MiB <= self.pack_target <= 1024 * MiB:
            raise RepositoryError(f"{where}: pack_target {self.pack_target} out of range")
