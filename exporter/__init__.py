"""The QEMU side of fleece: QMP, the fleece graph, dirty bitmaps, NBD extent plans and the parallel pull.

The public names are loaded on first use (PEP 562): the thaw/pause guard (``python -m
fleece.exporter.guard``) imports only this package and its own few modules, and a start-up that
also imported the whole backup pipeline (repository, crypto, boto3-free but still ~0.25 s here) would be
paid by every backup that starts a guard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backup import BackupRequest, BackupResult, run_backup

__all__ = ["BackupRequest", "BackupResult", "run_backup"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import backup

        return getattr(backup, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
