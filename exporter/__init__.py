"""The QEMU side of fleece: QMP, the fleece graph, dirty bitmaps, NBD extent plans and the parallel pull."""

from .backup import BackupRequest, BackupResult, run_backup

__all__ = ["BackupRequest", "BackupResult", "run_backup"]
