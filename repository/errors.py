"""The one exception tree of fleece: every error fleece raises on purpose is defined here.

::

    FleeceError                      kind "error"        exit 1   (message, object)
     ├── UsageError                  kind "usage"        exit 2   a flag, name or path that cannot work as given
     ├── Interrupted                 kind "interrupted"  exit 1   Ctrl-C / SIGTERM; everything was rolled back
     ├── HostError                   kind "os"           exit 1   the OS refused something fleece did not classify
     ├── OutputError                 kind "stdout"       exit 1   stdout is closed or full (what ran, ran)
     ├── InternalError               kind "internal"     exit 1   a bug: reported as one line, traceback with -v
     ├── RepositoryError             kind "repository"   exit 1   missing, unknown format, unreadable
     │    ├── IntegrityError         kind "integrity"    exit 1   stored bytes break the format's promises
     │    │    └── FormatMismatch    kind "integrity"             objects of the other format: config replaced
     │    ├── LockedError            kind "locked"       exit 1   (holder): another prune/forget holds locks/
     │    ├── PruneConflict          kind "prune-conflict" exit 1 a pack the run needs is condemned: not committed
     │    └── BackendError           kind "backend"      exit 1   (code, status): the storage said no
     │         ├── ObjectNotFound    kind "not-found"
     │         ├── TransientBackendError  kind "transient"   retrying may help (timeouts, 5xx, throttling)
     │         └── PermanentBackendError  kind "permanent"   it will not (denied, no bucket, disk full)
     ├── QemuError                   kind "qemu"         exit 1   QEMU cannot be reached or refused
     │    ├── QmpConnectError        kind "qmp-connect"           socket missing, busy, silent, not QMP
     │    ├── CommandError           kind "qmp-command"           (command, error_class, desc)
     │    ├── BitmapError            kind "bitmap"                a dirty bitmap fleece cannot repair
     │    ├── LibvirtError           kind "libvirt"               (code): libvirtd cannot be reached or refused
     │    └── AgentError             kind "guest-agent"           (stage): the guest agent cannot freeze/thaw
     ├── BackupBusyError             kind "busy"         exit 1   another fleece backs this VM up now
     │    └── ImageInUseError        kind "image-in-use"         (object): another process holds the image open
     ├── ExportReadError             kind "export-read"  exit 1   reading the frozen view failed
     ├── IdentityError               kind "identity"     exit 1   the VM name belongs to another machine
     ├── WrongKeyError               kind "key"          exit 1   no key slot opens with the password / key file
     │    └── KeyAccessError         kind "key-access"           a write-only key cannot read disk contents
     └── RestoreError                kind "restore"      exit 1   a target image cannot be made or written
          ├── ServeError             kind "serve"                nbdkit could not serve a point, or died
          └── LiveRestoreError       kind "live-restore"         a stream could not finish (images intact)

Every message is one line meant for a user as-is: it names the object or device involved and says what
to do next. Decisions are made on the class and its fields (``code``, ``status``, ``object``), never on
the message text: messages carry object names and endpoints that can contain anything. The CLI needs
only :meth:`FleeceError.to_json` and :attr:`FleeceError.exit`; it never inspects reasons (the model is
``qemu.qmp``'s ``error.py``).

The tree lives in ``repository`` because both ``exporter`` and ``restore`` depend on this package and on
nothing else of each other.
"""

from __future__ import annotations

from typing import Any


class FleeceError(Exception):
    """Base of every error fleece raises on purpose.

    :param message: one line for the user, with the remedy.
    :param object: the repository object, device, disk or path the error is about (if any).
    """

    kind = "error"
    exit = 1

    def __init__(self, message: str, *, object: str | None = None) -> None:  # noqa: A002 - the field's name
        super().__init__(message)
        self.message = message
        self.object = object

    def fields(self) -> dict[str, Any]:
        """The structured fields a script may act on (never secrets)."""
        return {"object": self.object} if self.object is not None else {}

    def to_json(self) -> dict[str, Any]:
        """The ``{"error": …}`` document ``--json`` prints for this failure."""
        return {"error": {"kind": self.kind, "message": self.message, "exit": self.exit, **self.fields()}}


class UsageError(FleeceError):
    """The user asked for something that cannot work as given (bad flag value, unknown disk, bad path)."""

    kind = "usage"
    exit = 2


class Interrupted(FleeceError):
    """The run was interrupted by a signal after it unwound (VM running, bitmaps folded back)."""

    kind = "interrupted"


class HostError(FleeceError):
    """An operating-system failure no layer classified (strerror and the path, as one line)."""

    kind = "os"


class OutputError(FleeceError):
    """stdout is closed or cannot take the output (``>&-``, ``> /dev/full``); the command itself ran."""

    kind = "stdout"


class InternalError(FleeceError):
    """Anything fleece did not expect: a bug, reported as one line (the traceback only with -v)."""

    kind = "internal"


class RepositoryError(FleeceError):
    """The repository is missing, of an unknown format, or cannot be read or written."""

    kind = "repository"


class IntegrityError(RepositoryError):
    """Stored data does not match what the repository format promises (truncated, garbled, wrong hash)."""

    kind = "integrity"


class FormatMismatch(IntegrityError):
    """An object of the other repository format (an encrypted pack, index or manifest where the config
    says plaintext, or the reverse): the config was replaced. Never repaired, never skipped — rebuilding
    or writing on would turn an encrypted repository into a plaintext one."""


class LockedError(RepositoryError):
    """Maintenance (forget, prune, rebuild-index, protect) is exclusive: another one holds the lock.

    :param holder: who holds it (``purpose on host pid N since T``).
    """

    kind = "locked"

    def __init__(self, message: str, *, holder: str, object: str | None = None) -> None:  # noqa: A002
        super().__init__(message, object=object)
        self.holder = holder

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "holder": self.holder}


class PruneConflict(RepositoryError):
    """A backup would reference a pack a prune condemned and may delete before the point is seen (the
    run outlived the prune's grace): the point is not committed, the VM's bitmap keeps every change."""

    kind = "prune-conflict"


class BackendError(RepositoryError):
    """A storage backend operation failed. Subclasses say whether retrying can help.

    :param code: the backend's own error code (S3 ``Code`` such as ``AccessDenied``, or ``errno`` name).
    :param status: the HTTP status of the failed request (S3 only).
    """

    kind = "backend"

    def __init__(self, message: str, *, object: str | None = None, code: str | None = None,  # noqa: A002
                 status: int | None = None) -> None:
        super().__init__(message, object=object)
        self.code = code
        self.status = status

    def fields(self) -> dict[str, Any]:
        out = super().fields()
        if self.code is not None:
            out["code"] = self.code
        if self.status is not None:
            out["status"] = self.status
        return out


class ObjectNotFound(BackendError):
    """The named object does not exist in the backend."""

    kind = "not-found"


class TransientBackendError(BackendError):
    """A failure that may go away when retried (timeouts, 5xx, throttling, connection resets)."""

    kind = "transient"


class PermanentBackendError(BackendError):
    """A failure retrying will not fix (access denied, no such bucket, disk full, read-only)."""

    kind = "permanent"


class QemuError(FleeceError):
    """QEMU refused a command or cannot be reached over QMP."""

    kind = "qemu"


class QmpConnectError(QemuError):
    """The QMP socket is missing, refuses connections, is busy or silent, or does not speak QMP."""

    kind = "qmp-connect"


class CommandError(QemuError):
    """QEMU answered a command with an error.

    :param command: the QMP command (``blockdev-add`` …).
    :param error_class: QMP's class (``GenericError``, ``DeviceNotFound`` …).
    :param desc: QEMU's own text; only ``exporter.qmp.refused_because`` may look into it.
    """

    kind = "qmp-command"

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc}", object=command)
        self.command = command
        self.error_class = error_class
        self.desc = desc

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "code": self.error_class}


class BitmapError(QemuError):
    """A dirty bitmap is missing, busy or inconsistent in a way fleece cannot repair by itself."""

    kind = "bitmap"


class LibvirtError(QemuError):
    """libvirtd cannot be reached, or refused a call (``exporter.virt``).

    :param code: libvirt's symbolic error code (``VIR_ERR_CHECKPOINT_INCONSISTENT``, ``VIR_ERR_NO_DOMAIN``,
        ``VIR_ERR_OPERATION_TIMEOUT`` …), or ``None`` when libvirt gave none.
    """

    kind = "libvirt"

    def __init__(self, message: str, *, object: str | None = None, code: str | None = None) -> None:  # noqa: A002
        super().__init__(message, object=object)
        self.code = code

    def fields(self) -> dict[str, Any]:
        out = super().fields()
        if self.code is not None:
            out["code"] = self.code
        return out


class AgentError(QemuError):
    """qemu-guest-agent could not be reached, did not answer in time, or refused a freeze or thaw
    (``exporter.agent``). A backup never fails for it: the point falls back to crash-consistent with this
    message as the reason — except that a thaw that keeps failing is logged as an error.

    :param stage: what was being done: ``connect``, ``sync``, ``status``, ``freeze`` or ``thaw``.
    :param maybe_frozen: whether the guest may be frozen after this failure (a freeze that timed out or lost
        its connection may still complete in the guest, so it must be thawed); ``False`` only when the
        agent certainly did not freeze (no connection, or it answered the freeze with an error).
    """

    kind = "guest-agent"

    def __init__(self, message: str, *, stage: str, object: str | None = None,  # noqa: A002
                 maybe_frozen: bool = True) -> None:
        super().__init__(message, object=object)
        self.stage = stage
        self.maybe_frozen = maybe_frozen

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "stage": self.stage}


class BackupBusyError(FleeceError):
    """Another fleece backup is already running against this VM."""

    kind = "busy"


class ImageInUseError(BackupBusyError):
    """A shut-off VM's image (``backup --image``) is held open by another process: a running VM, another
    backup, a qemu-img. QEMU's image lock said so; nothing was read or written."""

    kind = "image-in-use"


class ExportReadError(FleeceError):
    """Reading the frozen point-in-time view of a disk failed (the guest is unaffected)."""

    kind = "export-read"


class IdentityError(FleeceError):
    """The VM name's history in the repository belongs to another machine."""

    kind = "identity"


class WrongKeyError(FleeceError):
    """No key slot of an encrypted repository opens with the password or key file given."""

    kind = "key"


class KeyAccessError(WrongKeyError):
    """The key opened the repository, but only to add backups (a write-only key): reading disk contents
    (restore, ``verify --read-data``, exporting the master key) needs a full key."""

    kind = "key-access"


class RestoreError(FleeceError):
    """The target image could not be created or written."""

    kind = "restore"


class ServeError(RestoreError):
    """``fleece serve``: nbdkit could not start serving the point (the plugin's reason is the message), or
    stopped on its own."""

    kind = "serve"


class LiveRestoreError(RestoreError):
    """``fleece live-restore``: the stream could not finish, or the QEMU is not one it may stream into; the
    images are intact (still backed by the server)."""

    kind = "live-restore"
