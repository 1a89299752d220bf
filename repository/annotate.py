"""Protection, tags and notes of a point (``fleece protect`` / ``unprotect``).

They live in the manifest's ``extra`` (``protected``, ``tags``, ``note``), so a point carries them into
every copy of the repository and ``forget`` reads them with the manifests it reads anyway. Changing
them rewrites the manifest in place under the maintenance lock (``Repository.replace_manifest``): the
point's disks are untouched, and a forget cannot run in between and drop a point being protected.
"""

from __future__ import annotations

from dataclasses import replace

from .manifest import Manifest, annotation_fields
from .repo import Repository


def annotate(repo: Repository, vm: str, point: str | None, *, protected: bool | None = None,
             note: str | None = None, add_tags: list[str] | None = None,
             remove_tags: list[str] | None = None) -> Manifest:
    """Change the annotations of one point (``None``: leave as it is; ``note=""`` removes the note)."""
    repo.envelope.require_read("changing a point's protection")
    with repo.maintenance("protect"):
        m = repo.find_point(vm, point)
        m = repo.manifest(vm, m.id)
        tags = set(m.extra.get("tags") or [])
        tags |= set(add_tags or [])
        tags -= set(remove_tags or [])
        fields = annotation_fields(sorted(tags), m.extra.get("note") if note is None else note,
                                   bool(m.extra.get("protected")) if protected is None else protected)
        extra = {k: v for k, v in m.extra.items() if k not in ("tags", "note", "protected")}
        new = replace(m, extra={**extra, **fields})
        if new.extra != m.extra:
            repo.replace_manifest(new)
        return new
