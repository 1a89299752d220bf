"""What changes between repository formats at the level of whole objects: ids, names, seals.

Format 1 stores plaintext: blob ids are SHA-256, VM names appear percent-encoded in ``points/<vm>/``,
manifests and index objects are readable by anyone who can list the bucket. Format 2 seals all of it
(``crypto``): keyed blob ids, VM names replaced by keyed tokens, every manifest, index object and pack
sealed with its identity bound as associated data. The rest of the repository asks an
:class:`Envelope` and never branches on the format itself.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import quote, unquote

from .codec import blob_id as codec_blob_id
from .crypto import Keys, Sealer
from .errors import FormatMismatch, IntegrityError, KeyAccessError
from .manifest import check_vm_name
from .pack import PLAIN, PackLayout, SealedPacks

MANIFEST_MAGIC = b"FLCMAN2\n"


class Envelope:
    """Format 1 when *keys* is ``None``, else format 2 sealed with *keys*."""

    def __init__(self, keys: Keys | None = None) -> None:
        self.keys = keys
        self.packs: PackLayout = PLAIN if keys is None else SealedPacks(keys)
        self.meta: Sealer | None = None if keys is None else keys.meta

    @property
    def format(self) -> int:
        return 1 if self.keys is None else 2

    @property
    def encrypted(self) -> bool:
        return self.keys is not None

    @property
    def can_read(self) -> bool:
        """Whether disk contents can be read back (false only for a write-only key)."""
        return self.keys is None or self.keys.can_read

    def require_read(self, what: str) -> None:
        """Raise :class:`KeyAccessError` before any work when *what* needs disk contents a write-only
        key cannot open."""
        if not self.can_read:
            raise KeyAccessError(f"this key can only add backups (write-only): {what} needs a full key (a password "
                                 "or key file of a full key slot; 'fleece key list' shows each slot's access)")

    # -- ids and names ----------------------------------------------------------------------------------

    def blob_id(self, data: bytes | bytearray | memoryview) -> bytes:
        """A blob's id: SHA-256 of the plaintext (format 1), HMAC-SHA256 under the repository key (2)."""
        return codec_blob_id(data) if self.keys is None else self.keys.blob_id(data)

    def vm_key(self, vm: str) -> str:
        """The ``points/<key>/`` part for *vm*: reversible in format 1, a keyed token in format 2."""
        check_vm_name(vm)
        return quote(vm, safe="-_.") if self.keys is None else self.keys.name_token("vm", vm)

    def vm_from_key(self, key: str) -> str | None:
        """The VM name a ``points/<key>/`` part stands for; ``None`` when only its manifests know (2)."""
        return unquote(key) if self.keys is None else None

    def manifest_name(self, vm: str, point_id: str) -> str:
        return f"points/{self.vm_key(vm)}/{point_id}"

    # -- manifests --------------------------------------------------------------------------------------

    def seal_manifest(self, name: str, data: bytes) -> bytes:
        """The stored form of a manifest: sealed to its own object name, so it cannot be moved."""
        if self.meta is None:
            return data
        return MANIFEST_MAGIC + self.meta.seal(data, name.encode())

    def open_manifest(self, name: str, stored: bytes) -> bytes:
        if self.meta is None:
            if stored.startswith(MANIFEST_MAGIC):
                raise FormatMismatch(f"{name} is an encrypted manifest but the config says the repository is "
                                     "unencrypted: the config was replaced; put back the original config (and "
                                     "keys/)", object=name)
            return stored
        if not stored.startswith(MANIFEST_MAGIC):
            raise IntegrityError(f"{name} is not an encrypted manifest: in an encrypted repository it cannot be "
                                 "trusted (replaced or planted)", object=name)
        return self.meta.open(memoryview(stored)[len(MANIFEST_MAGIC):], name.encode(), name)

    # -- maintenance records (condemned/, locks/) -------------------------------------------------------

    def seal_record(self, name: str, doc: dict[str, object]) -> bytes:
        """A small JSON document of prune's (``condemned/``, ``locks/``): with a checksum in format 1,
        sealed to its name in format 2 (pack ids and times are not secret, but a planted record must not
        make backups refuse or prune delete)."""
        body = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        data = json.dumps({"record": doc, "sha256": hashlib.sha256(body.encode()).hexdigest()},
                          sort_keys=True).encode()
        return data if self.meta is None else self.meta.seal(data, b"fleece record " + name.encode())

    def open_record(self, name: str, stored: bytes) -> dict[str, Any]:
        data = stored if self.meta is None else self.meta.open(stored, b"fleece record " + name.encode(), name)
        try:
            outer = json.loads(data)
            doc = outer["record"]
            body = json.dumps(doc, sort_keys=True, separators=(",", ":"))
            ok = isinstance(doc, dict) and hashlib.sha256(body.encode()).hexdigest() == outer["sha256"]
        except (ValueError, KeyError, TypeError, RecursionError):
            ok = False
        if not ok:
            raise IntegrityError(f"{name} is not a readable record (garbled or planted): remove it", object=name)
        return doc
