"""Storage backends, the wrappers around them, and the repository-URL parser.

``REPO`` on the command line is a path, ``file://PATH`` (the embedded default), or
``s3://BUCKET[/PREFIX]`` (S3 or any S3-compatible server such as Ceph RGW).
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from ..errors import UsageError
from .base import Backend, ObjectInfo, redact_url
from .local import LocalBackend
from .wrappers import BackendWrapper, Counting, RateLimited, Retrying, compose, layer

__all__ = ["Backend", "BackendWrapper", "Counting", "LocalBackend", "ObjectInfo", "RateLimited", "Retrying",
           "compose", "layer", "open_backend"]


def env_attempts() -> int | None:
    """``FLEECE_S3_ATTEMPTS``: how many times an S3 operation may be tried (unset or empty: the default)."""
    text = os.environ.get("FLEECE_S3_ATTEMPTS", "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"FLEECE_S3_ATTEMPTS={text!r} must be a whole number of at least 1 (how many times an "
                         "S3 operation may be tried; default 8): fix it or unset it")
    return value


def open_backend(url: str, create: bool = False, *, attempts: int | None = None, bwlimit: int | None = None,
                 create_bucket: bool = False, object_lock: bool = False, **options: object) -> Backend:
    """Open the backend a repository URL names, wrapped in the stack of :func:`~.wrappers.compose`.

    This is the one place where wrappers are put around a storage backend. *attempts* bounds the
    retries of transient failures (default 8; for S3 also ``FLEECE_S3_ATTEMPTS``), *bwlimit* caps the
    bytes per second sent (``--bwlimit``), *create_bucket* lets an S3 repository create its bucket
    (with S3 Object Lock enabled when *object_lock*).
    The remaining *options* are backend specific (S3: ``endpoint``, ``workers``); options a backend
    does not know are ignored so that callers can pass one set for every kind of repository.
    """
    if not url:
        raise UsageError("no repository given: pass --repo PATH or --repo s3://BUCKET[/PREFIX]")
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = unquote(parsed.path) if parsed.scheme == "file" else url
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise UsageError(f"file:// repositories must be local ({redact_url(url)}); use file:///absolute/path")
        if not path:
            raise UsageError(f"--repo {url} names no directory: use file:///absolute/path or a path")
        return compose(LocalBackend(path, create=create), attempts=attempts, bwlimit=bwlimit)
    if parsed.scheme == "s3":
        from .s3 import S3Backend  # boto3 is only imported when an S3 repository is used

        attempts = attempts or env_attempts()  # before the client: a mistake here costs no connection
        s3 = S3Backend.from_url(url, **options)
        stack = compose(s3, attempts=attempts, bwlimit=bwlimit)
        try:  # fail before any backup work when the bucket is missing or the keys are wrong
            stack.call("check", f"bucket {s3.bucket}", lambda: s3.ensure_bucket(create_bucket, object_lock))
        except BaseException:
            stack.close()
            raise
        return stack
    raise UsageError(f"unsupported repository URL {redact_url(url)!r}: use a path, file://PATH or "
                     "s3://BUCKET[/PREFIX]")
