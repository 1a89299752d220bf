"""Errors of the QEMU side. All derive from :class:`repository.errors.FleeceError`."""

from __future__ import annotations

from fleece.repository.errors import FleeceError


class QemuError(FleeceError):
    """QEMU refused a command or cannot be reached over QMP."""


class QmpConnectError(QemuError):
    """The QMP socket is missing, refuses connections, or does not speak QMP."""


class BitmapError(QemuError):
    """A dirty bitmap is missing, busy or inconsistent in a way fleece cannot repair by itself."""


class BackupBusyError(FleeceError):
    """Another fleece backup is already running against this VM."""


class ExportReadError(FleeceError):
    """Reading the frozen point-in-time view of a disk failed (the guest is unaffected)."""
