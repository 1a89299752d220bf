"""Storage backends and the repository-URL parser.

``REPO`` on the command line is a path, ``file://PATH`` (the embedded default), or
``s3://BUCKET[/PREFIX]`` (S3 or any S3-compatible server such as Ceph RGW).
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from ..errors import UsageError
from .base import Backend, ObjectInfo
from .local import LocalBackend

__all__ = ["Backend", "ObjectInfo", "LocalBackend", "open_backend"]


def open_backend(url: str, create: bool = False, **options: object) -> Backend:
    """Open the backend a repository URL names.

    *options* are backend specific (S3: ``endpoint``, ``workers``, ``create_bucket``, ...); options a
    backend does not know are ignored so that callers can pass one set for every kind of repository.
    """
    if not url:
        raise UsageError("no repository given: pass --repo PATH or --repo s3://BUCKET[/PREFIX]")
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = unquote(parsed.path) if parsed.scheme == "file" else url
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise UsageError(f"file:// repositories must be local ({url}); use file:///absolute/path")
        return LocalBackend(path, create=create)
    if parsed.scheme == "s3":
        from .s3 import S3Backend  # boto3 is only imported when an S3 repository is used

        return S3Backend.from_url(url, create=create, **options)
    raise UsageError(f"unsupported repository URL {url!r}: use a path, file://PATH or s3://BUCKET[/PREFIX]")
