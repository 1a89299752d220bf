"""nbdkit Python plugin serving the disks of one point (run by :mod:`fleece.restore.serve`, never imported).

nbdkit embeds Debian's libpython, whose ``sys.path`` knows neither the venv nor this package (FIELD-NOTES
§10): the ``sitedirs`` parameter names the directories the launching ``fleece`` imports from, added with
``site.addsitedir`` so the editable install's ``.pth`` hooks work too. The work is
:class:`fleece.restore.reader.PointReader`; this file only maps nbdkit's callbacks onto it.

Parameters (``key=value`` after the script; set by ``serve``): ``repo`` (URL), ``endpoint`` (S3, may be
empty), ``vm``, ``point`` (a full point id: resolved once by the launcher, so a backup committing meanwhile
cannot change what is served), ``disks`` (comma-separated), ``default`` (the disk exported under the name
``""``, may be empty), ``keyfd`` (a pipe holding the repository's key, read once and closed — never a file
or the environment), ``statusfd`` (where a failure to start is written, one line, for the launcher to
show), ``cache``, ``workers``, ``readahead``.

Why the callbacks' names shadow builtins (``open``): nbdkit looks them up by name; this module never
uses the builtin ``open``.
"""

import errno
import logging
import os
import site
import sys

import nbdkit

API_VERSION = 2

_params: dict[str, str] = {}
_readers: dict = {}
_default: str = ""
_repo = None
log = logging.getLogger("fleece.serve")


def thread_model():  # noqa: D103
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):  # noqa: D103
    _params[key] = value


def _fail_start(message: str) -> None:
    """Tell the launcher why, in one line, and end nbdkit before it listens: a traceback from nbdkit's
    embedding would bury the message (the launcher shows it as the error)."""
    fd = _params.get("statusfd")
    line = " ".join(message.split()) + "\n"
    try:
        os.write(int(fd) if fd else 2, line.encode())
    except OSError:
        os.write(2, line.encode())
    os._exit(1)


def _watch_launcher(fd: int) -> None:
    """End nbdkit the moment the launching fleece is gone (its end of the *lifeline* pipe closes: EOF).
    nbdkit's ``--exit-with-parent`` sends SIGTERM, after which nbdkit waits for its clients for as long as
    they stay; and a parent-death SIGKILL set with setpriv did not reach it once a client was connected
    (measured): a reader on a pipe always wakes."""
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
    os.write(2, b"fleece serve: the fleece that started this server is gone: stopping\n")
    os._exit(0)


def config_complete():  # noqa: D103
    global _default, _repo
    if _params.get("lifefd"):
        import threading

        threading.Thread(target=_watch_launcher, args=(int(_params["lifefd"]),), name="fleece-lifeline",
                         daemon=True).start()
    # the launcher's path first, in its order (Debian's dist-packages holds older cryptography and boto3
    # than the venv does), then .pth files processed for the editable install's import hook
    first = [d for d in _params.get("sitedirs", "").split(os.pathsep) if d]
    sys.path[:] = first + [p for p in sys.path if p not in first]
    for d in first:
        if d.endswith("-packages"):
            site.addsitedir(d)
    logging.basicConfig(level=logging.INFO if _params.get("verbose") else logging.WARNING, stream=sys.stderr,
                        format="fleece serve: %(message)s")
    try:
        from fleece.repository import Repository
        from fleece.repository.credentials import PAPER, Credential
        from fleece.repository.errors import FleeceError
        from fleece.restore.reader import PointReader
    except ImportError as exc:
        _fail_start(f"the nbdkit plugin cannot import fleece ({exc}): is sitedirs= right?")
    credential = None
    if _params.get("keyfd"):
        fd = int(_params["keyfd"])
        with os.fdopen(fd, "rb") as pipe:
            secret = pipe.read()
        if secret:
            credential = Credential(PAPER, secret, "fleece serve")
    try:
        options = {"endpoint": _params["endpoint"]} if _params.get("endpoint") else {}
        _repo = Repository.open(_params["repo"], credential=credential, **options)
        manifest = _repo.manifest(_params["vm"], _params["point"])
        disks = [d for d in _params["disks"].split(",") if d]
        view = _repo.point_view(manifest, disks)
        for d in disks:
            _readers[d] = PointReader(_repo, view[d], d, cache_bytes=int(_params.get("cache", 64 << 20)),
                                      workers=int(_params.get("workers", 4)),
                                      readahead=int(_params.get("readahead", 16 << 20)))
    except FleeceError as exc:
        _fail_start(str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug: one line, type included
        _fail_start(f"internal error while opening the point: {type(exc).__name__}: {exc}; please report it")
    _default = _params.get("default", "")
    log.info("serving VM %s point %s: %s", _params["vm"], _params["point"],
             ", ".join(f"{d} ({r.size} bytes, {r.data_bytes} of data)" for d, r in _readers.items()))


def cleanup():  # noqa: D103
    for r in _readers.values():
        log.info("disk %s: %s", r.disk, r.stats.as_dict())
        r.close()
    if _repo is not None:
        _repo.close()


def list_exports(readonly, is_tls):  # noqa: D103
    return [(d, f"VM {_params['vm']} point {_params['point']} disk {d}") for d in _readers]


def default_export(readonly, is_tls):  # noqa: D103
    return _default


def open(readonly):  # noqa: A001, D103 - the name nbdkit calls
    name = nbdkit.export_name() or _default
    reader = _readers.get(name)
    if reader is None:
        nbdkit.set_error(errno.ENOENT)
        raise RuntimeError(f"no export {name!r}: this server exports {', '.join(_readers)}"
                           + ("" if _default else " (and no default export: name a disk)"))
    return reader


def get_size(h):  # noqa: D103
    return h.size


def export_description(h):  # noqa: D103
    return f"VM {_params['vm']} point {_params['point']} disk {h.disk}"


def is_rotational(h):  # noqa: D103
    return False


def can_multi_conn(h):  # noqa: D103
    return True  # read-only and consistent across connections (the cow filter decides for itself)


def can_extents(h):  # noqa: D103
    return True


def can_cache(h):  # noqa: D103
    return nbdkit.CACHE_NATIVE


def block_size(h):  # noqa: D103
    return (1, 64 << 10, 32 << 20)


class ReadFailed(Exception):
    """What nbdkit sees of a failed read: the reader logged the cause (with its pack) already, and
    nbdkit prints the traceback of whatever a callback raises — this one's is two lines."""


def pread(h, buf, offset, flags):  # noqa: D103
    try:
        h.pread(memoryview(buf), offset)
    except Exception as exc:  # noqa: BLE001 - the client gets EIO, never a byte of a failed blob
        nbdkit.set_error(errno.EIO)
        message = f"read of {len(buf)} bytes at {offset} of disk {h.disk} failed: {type(exc).__name__}"
    else:
        return
    raise ReadFailed(message)


def cache(h, count, offset, flags):  # noqa: D103
    """NBD_CMD_CACHE: fetch the range's blobs now, answer at once (a hint, not a read)."""
    h.prefetch(offset, count)


def extents(h, count, offset, flags):  # noqa: D103
    runs = h.extents(offset, count)
    if flags & nbdkit.FLAG_REQ_ONE:
        return runs[:1]
    return runs
