"""Local directory backend (the embedded default).

Durability recipe, the same one every serious store uses: write to a temporary file in the target
directory, ``fsync`` it, move it into place, ``fsync`` the directory. A crash leaves either the old state
or the complete new object, plus at worst a ``*.tmp-*`` file that listings ignore and GC may delete.
Create-if-absent uses ``link(2)``, which fails atomically when the name exists.

Big objects (packs) are written with ``O_DIRECT`` (from the caller's buffer when it is page aligned, as
pack buffers are, otherwise through a small aligned bounce buffer): on this kind of
machine copying a backup's packs through the page cache cost more CPU than hashing them, and a backup
should not evict the host's cache for data it will not read again. Filesystems without ``O_DIRECT``
(tmpfs) fall back to ordinary writes.

Disk images hold secrets, so everything this backend creates is private to its owner, as restic does:
files ``0600`` (temporary files too, from the moment they exist, so the rename never publishes a
readable object) and directories ``0700`` (the root and its missing parents, ``data/xx/`` …, made on
demand). The modes are passed to ``open(2)``/``mkdir(2)`` rather than left to the umask (a umask can only
take bits away, and a default ACL on the parent is masked by them). What an older fleece created — a
root or fan-out directory that is ``0755`` — is left as it is: changing the modes of a user's existing
directories behind their back is not this backend's call; new objects in them are private all the same.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import ObjectNotFound, PermanentBackendError, RepositoryError, TransientBackendError, UsageError
from ..spill import Spill, data_size, pieces
from .base import Backend, Data, ObjectInfo, RangeReader, check_name

_PIECE = 1 << 20  # write in pieces of this size
_DIRECT_MIN = 256 << 10  # objects at least this big bypass the page cache (O_DIRECT)
_ALIGN = 4096
_TRANSIENT = {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.EBUSY}
FILE_MODE = 0o600  # every object and temporary file
DIR_MODE = 0o700  # every directory this backend makes


def _page_aligned(view: memoryview) -> bool:
    """Whether a buffer starts on an ``O_DIRECT`` boundary (read-only buffers are not inspected)."""
    if view.readonly or not view:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % _ALIGN == 0


class LocalBackend(Backend):
    def __init__(self, root: str | os.PathLike[str], create: bool = False) -> None:
        self.root = Path(root).absolute()
        self.location = str(self.root)
        self._direct_ok = True
        self._local = threading.local()
        #: directories opening with *create* made, outermost first (:meth:`discard_location` removes them)
        self._made: list[Path] = []
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"--repo {self.root} is a file, not a repository directory: pass the directory of "
                             "a repository (or a new path)", object=str(self.root))
        if create:
            d = self.root
            while not d.exists() and d != d.parent:
                self._made.insert(0, d)
                d = d.parent
            try:
                self._ensure_dir(self.root)
            except OSError as exc:
                raise self._error(exc, "create the repository directory", str(self.root)) from None
        elif not self.root.is_dir():
            raise RepositoryError(f"repository directory {self.root} does not exist "
                                  "(create it with 'fleece init --repo ...' or check the path)")

    def discard_location(self) -> None:
        """Remove the directories opening made, bottom-up, as long as they are empty (never a file)."""
        if not self._made:
            return
        for dirpath, _, _ in sorted(os.walk(self.root), key=lambda w: -w[0].count(os.sep)):
            try:
                os.rmdir(dirpath)  # only succeeds on an empty directory
            except OSError:
                pass
        for d in reversed(self._made[:-1]):
            try:
                os.rmdir(d)
            except OSError:
                break

    # -- helpers ---------------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def _error(self, exc: OSError, action: str, name: str) -> Exception:
        """Map an OSError to the contract's classes; ``code`` is the errno's name (``ENOSPC`` …)."""
        text = f"cannot {action} {name} in {self.root}: {exc.strerror or exc}"
        fields = {"object": name, "code": errno.errorcode.get(exc.errno) if exc.errno else None}
        if exc.errno == errno.ENOENT:
            return ObjectNotFound(f"{name} not found in {self.root}", **fields)
        if exc.errno == errno.ENOSPC:
            return PermanentBackendError(text + " (free some space on that filesystem)", **fields)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return PermanentBackendError(text + " (check permissions / that the filesystem is writable)", **fields)
        if exc.errno in _TRANSIENT:
            return TransientBackendError(text, **fields)
        return PermanentBackendError(text, **fields)

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_dir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        missing = []
        d = directory
        while not d.is_dir():
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            try:
                m.mkdir(mode=DIR_MODE)
            except FileExistsError:
                if not m.is_dir():  # a file where a directory belongs
                    raise
            self._fsync_dir(m.parent)

    def _open_temp(self, tmp: Path, direct: bool) -> tuple[int, bool]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        if direct and self._direct_ok:
            try:
                return os.open(tmp, flags | os.O_DIRECT, FILE_MODE), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_ok = False  # filesystem without O_DIRECT (tmpfs): stop trying
                tmp.unlink(missing_ok=True)
        return os.open(tmp, flags, FILE_MODE), False

    def _bounce(self) -> mmap.mmap:
        buf = getattr(self._local, "bounce", None)
        if buf is None:
            buf = self._local.bounce = mmap.mmap(-1, _PIECE)  # page aligned
        return buf

    def _write_temp(self, path: Path, data: Data) -> Path:
        self._ensure_dir(path.parent)
        tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(6)}")
        fd, direct = self._open_temp(tmp, data_size(data) >= _DIRECT_MIN)
        try:
            if isinstance(data, Spill):  # read piece by piece into the (page-aligned) bounce buffer
                source, source_aligned = pieces(data, memoryview(self._bounce())), True
            else:
                view = memoryview(data).cast("B")
                source, source_aligned = (view[i:i + _PIECE] for i in range(0, len(view), _PIECE)), _page_aligned(view)
            for piece in source:  # pieces start at multiples of _PIECE
                if direct:
                    aligned = len(piece) - len(piece) % _ALIGN
                    if aligned and source_aligned:  # straight from a page-aligned buffer
                        self._write_all(fd, piece[:aligned])
                    elif aligned:
                        bounce = self._bounce()
                        bounce[:aligned] = piece[:aligned]
                        with memoryview(bounce) as b:
                            self._write_all(fd, b[:aligned])
                    if aligned != len(piece):  # unaligned tail: only at the very end of the object
                        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                        direct = False
                        self._write_all(fd, piece[aligned:])
                else:
                    self._write_all(fd, piece)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    @staticmethod
    def _write_all(fd: int, view: memoryview) -> None:
        while view:
            view = view[os.write(fd, view):]

    # -- the contract ----------------------------------------------------------------------------------

    def put(self, name: str, data: Data) -> None:
        path = self._path(name)
        try:
            tmp = self._write_temp(path, data)
            os.replace(tmp, path)
            self._fsync_dir(path.parent)
        except OSError as exc:
            raise self._error(exc, "write", name) from None

    def put_if_absent(self, name: str, data: Data) -> bool:
        path = self._path(name)
        try:
            if path.exists():
                return False
            tmp = self._write_temp(path, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            self._fsync_dir(path.parent)
            return True
        except OSError as exc:
            raise self._error(exc, "write", name) from None

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except OSError as exc:
            raise self._error(exc, "read", name) from None

    def open_range(self, name: str, offset: int, length: int) -> RangeReader:
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error(exc, "read", name) from None
        return _FileRange(self, name, fd, offset, length)

    def head(self, name: str) -> ObjectInfo:
        try:
            st = self._path(name).stat()
            return ObjectInfo(name, st.st_size, st.st_mtime)
        except OSError as exc:
            raise self._error(exc, "stat", name) from None

    def _unlistable(self, exc: OSError, directory: str | os.PathLike[str]) -> Exception:
        rel = os.path.relpath(directory, self.root)
        return self._error(exc, "list", "." if rel == "." else rel)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under *prefix*. A directory that cannot be read fails the listing (EACCES …
        → :class:`PermanentBackendError` whose ``object`` is the directory): skipping it, as ``os.walk``
        does by default, would make ``verify`` report a repository it could not see as "all ok". Only
        a directory that vanished while being listed (a concurrent delete) is passed over."""
        # Walk only the deepest directory the prefix names; filter the rest by string prefix.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = self.root / base if base else self.root
        try:
            if not stat.S_ISDIR(top.stat().st_mode):
                return
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise self._unlistable(exc, top) from None

        def failed(exc: OSError) -> None:
            if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
                raise self._unlistable(exc, exc.filename or top) from None

        for dirpath, dirnames, filenames in os.walk(top, onerror=failed):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            for fn in sorted(filenames):
                if ".tmp-" in fn:
                    continue
                name = fn if rel_dir == "." else f"{rel_dir}/{fn}"
                if name.startswith(prefix):
                    try:
                        st = os.stat(os.path.join(dirpath, fn))
                    except FileNotFoundError:
                        continue  # deleted while listing
                    except OSError as exc:
                        raise self._error(exc, "stat", name) from None
                    yield ObjectInfo(name, st.st_size, st.st_mtime)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
            self._fsync_dir(path.parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc, "delete", name) from None


class _FileRange(RangeReader):
    """A range of a local object: ``pread`` straight into the caller's buffer, no copy of the range."""

    def __init__(self, backend: LocalBackend, name: str, fd: int, offset: int, length: int) -> None:
        self._backend, self._name, self._fd = backend, name, fd
        self._pos, self._end = offset, offset + length

    def readinto(self, out: memoryview) -> int:
        done = 0
        while done < len(out) and self._pos < self._end:
            try:
                n = os.preadv(self._fd, [out[done:done + min(len(out) - done, self._end - self._pos)]], self._pos)
            except OSError as exc:
                raise self._backend._error(exc, "read", self._name) from None
            if n == 0:
                break  # the object ends before the range
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
