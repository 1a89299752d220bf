"""Trust on first use for write-only keys: the repository public key a host seals its packs to.

A write-only key cannot check the public key its slot gives: anything a write-only holder can verify,
the thief of a copy of that key can forge (wrap its *own* public key in a new slot under the same
secret, and read every later backup of the host). A full key derives the public key from the master
secret and needs none of this. So the first time a host unlocks a repository with a write-only key,
it records the repository's public key here, and refuses any other one afterwards — as SSH does with
host keys. The record is per repository id, private to the user, and tiny.

Where: ``FLEECE_STATE_DIR``, else ``$XDG_STATE_HOME/fleece``, else ``~/.local/state/fleece``.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from .errors import IntegrityError

log = logging.getLogger(__name__)


def state_dir() -> Path:
    explicit = os.environ.get("FLEECE_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "fleece"


def _path(repo_id: str) -> Path:
    return state_dir() / "repository-keys" / repo_id


def pinned(repo_id: str) -> bytes | None:
    """The public key recorded for *repo_id*, or ``None`` (first use, or no readable record)."""
    try:
        return bytes.fromhex(_path(repo_id).read_text().strip())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"the pinned key of repository {repo_id} ({_path(repo_id)}) is unreadable ({exc}): "
                             "remove it only if you are sure the repository is genuine", object=str(_path(repo_id)))


def matches(repo_id: str, public: bytes) -> bool:
    """Whether *public* is the key pinned for *repo_id* (true on first use)."""
    known = pinned(repo_id)
    return known is None or hmac.compare_digest(known, public)


def pin(repo_id: str, public: bytes) -> None:
    """Record *public* for *repo_id* if nothing is recorded yet; a host that cannot write its state
    directory goes on unpinned, with a warning."""
    path = _path(repo_id)
    if pinned(repo_id) is not None:
        return
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(public.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
    except FileExistsError:
        return  # a concurrent first use: the next open compares with whatever landed
    except OSError as exc:
        log.warning("cannot record the repository's public key in %s (%s): this write-only host cannot notice a "
                    "planted key slot; set FLEECE_STATE_DIR to a writable directory", path, exc.strerror or exc)
        return
    log.info("write-only key: pinned the public key of repository %s in %s", repo_id, path)
