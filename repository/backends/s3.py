"""S3 backend (AWS S3, Ceph RGW, MinIO, ...) with boto3.

``s3://BUCKET[/PREFIX]``. Endpoint, region and credentials come from the standard AWS chain (environment,
``~/.aws`` profiles, ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``), or ``--s3-endpoint``.

Error semantics (the backend contract):

* transient — 5xx, SlowDown/throttling, request timeouts, connection refused/reset, read timeouts, a body
  cut short: raised as :class:`TransientBackendError` for the :class:`~.wrappers.Retrying` layer to retry;
* permanent — access denied, bad credentials, no such bucket: raised with the bucket/key and what to
  check. Credentials never appear in a message.

Every error carries the S3 ``code`` (``AccessDenied``, ``PreconditionFailed`` …; botocore gives a bare
status such as ``"404"`` for bodiless HEAD replies), the HTTP ``status`` and the ``object``; decisions
("the object already exists", "the bucket is already ours") are made on those fields, never on the
message, which holds object names and the endpoint and so can contain any digits.

botocore's own retries are off: a failed request, including the body of a GET (which botocore does not
retry), leaves this backend at once as the contract's error, and one retry policy — the wrapper's,
which the tests pin down — decides what happens next. A big object's multipart upload is one ``put``:
a failed part fails the put (the upload is aborted), and the retried put starts a new upload.

Integrity: requests over plain HTTP are signed with the payload's SHA-256 (the server rejects a body
that changed in transit); over HTTPS, TLS protects the transfer. Either way everything fleece reads is
checked against its content hash, because RGW, for one, ignores ``x-amz-checksum-*`` headers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConnectionClosedError, ConnectTimeoutError,
                                 EndpointConnectionError, NoCredentialsError, ReadTimeoutError,
                                 ResponseStreamingError)

from ..errors import ObjectNotFound, PermanentBackendError, TransientBackendError, UsageError
from .base import Backend, Data, ObjectInfo, check_name

T = TypeVar("T")

MULTIPART_THRESHOLD = 64 << 20  # packs (16-32 MiB) go in one PUT: ≤ 64 requests per GiB
PART_SIZE = 16 << 20
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
                    "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "ConditionalRequestConflict"}
_AUTH_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
               "ExpiredToken", "AccountProblem", "AllAccessDisabled"}
_NETWORK = (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError,
            ResponseStreamingError, ConnectionError, TimeoutError)


class _ViewReader:
    """A seekable, read-only file over a memoryview: lets boto3 sign and send a pack without copying it
    (retries seek back to 0)."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def __len__(self) -> int:
        return len(self._view)

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else min(len(self._view), self._pos + n)
        out = bytes(self._view[self._pos:end])
        self._pos = end
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else len(self._view) + pos
        return self._pos

    def tell(self) -> int:
        return self._pos


class S3Backend(Backend):
    """One bucket (and optional key prefix) as a repository backend."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None, workers: int = 4) -> None:
        """Set up the client; no request is sent (:meth:`ensure_bucket` checks the bucket)."""
        if not bucket:
            raise UsageError("s3:// URL without a bucket: use s3://BUCKET[/PREFIX]")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.location = f"s3://{bucket}/{self.prefix}".rstrip("/")
        # Parallel PUTs: each holds one pack buffer in memory; three keep a link busy without bloating RSS.
        self.parallelism = max(2, min(workers, 3))
        self._pool_size = max(2, workers) + 4
        self.multipart_threshold = MULTIPART_THRESHOLD
        self.part_size = PART_SIZE
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        session = boto3.session.Session()
        config = Config(
            max_pool_connections=self._pool_size,
            retries={"max_attempts": 1, "mode": "standard"},  # the Retrying wrapper's, not botocore's
            connect_timeout=10, read_timeout=60, tcp_keepalive=True,
            s3={"addressing_style": "path"} if endpoint else {},
            # Newer boto3 adds CRC checksums with aws-chunked bodies many S3 servers (RGW 16) reject.
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        try:
            self.client = session.client("s3", endpoint_url=endpoint, config=config,
                                         region_name=session.region_name or "us-east-1")
        except BotoCoreError as exc:
            raise UsageError(f"cannot set up S3 for {self.location}: {exc}") from None
        self._where = f"{self.location} at {endpoint or 'AWS'}"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3Backend:
        parsed = urlparse(url)
        known = {k: v for k, v in options.items() if k in ("endpoint", "workers") and v is not None}
        return cls(parsed.netloc, parsed.path, **known)

    # -- plumbing ---------------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return self.prefix + check_name(name)

    def _error(self, exc: Exception, op: str, name: str | None) -> Exception:
        """Map a boto error to the contract's classes, with a message a user can act on.

        *name* is the object (None: the bucket itself). Unknown exceptions are returned unchanged.
        """
        what = f"{op} {name or '(bucket)'} in {self._where}"
        obj = name if name is not None else self.bucket
        if isinstance(exc, NoCredentialsError):
            return PermanentBackendError(f"no S3 credentials for {self.location}: set AWS_ACCESS_KEY_ID and "
                                         "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE", object=obj)
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code") or "") or None
            raw_status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            status = int(raw_status) if raw_status is not None else None
            fields: dict[str, Any] = {"object": obj, "code": code, "status": status}
            said = f"{code or status} {err.get('Message') or ''}".strip()
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(f"{name or self.bucket} not found in {self.location}", **fields)
            if code == "NoSuchBucket":
                return PermanentBackendError(f"bucket {self.bucket} does not exist at {self._where}: create it, "
                                             "or pass --create-bucket", **fields)
            if code in _AUTH_CODES or status == 403:
                return PermanentBackendError(f"access denied: {what} ({code}): check the S3 credentials "
                                             "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile) and the "
                                             "bucket's policy", **fields)
            if code in _TRANSIENT_CODES or (status is not None and status >= 500):
                return TransientBackendError(f"{what} failed: {said}", **fields)
            return PermanentBackendError(f"{what} failed: {said}", **fields)
        if isinstance(exc, _NETWORK):
            return TransientBackendError(f"{what} failed: {type(exc).__name__}: {exc}", object=obj)
        if isinstance(exc, BotoCoreError):
            return PermanentBackendError(f"{what} failed: {exc}", object=obj)
        return exc

    def _call(self, op: str, name: str | None, fn: Callable[[], T]) -> T:
        """Send one request; a failure leaves as the contract's error (retrying is not this layer's job)."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified by _error
            mapped = self._error(exc, op, name)
            if mapped is exc:
                raise
            raise mapped from None

    def ensure_bucket(self, create: bool = False) -> None:
        """Fail early — before any backup work — on a missing bucket or bad credentials; with *create*,
        make a missing bucket. Idempotent, so the Retrying layer may repeat it."""
        try:
            self._call("HEAD", None, lambda: self.client.head_bucket(Bucket=self.bucket))
            return
        except ObjectNotFound:
            pass  # HEAD of a missing bucket is a bare 404
        if not create:
            raise PermanentBackendError(f"bucket {self.bucket} does not exist at {self._where}: create it, or pass "
                                        "--create-bucket", object=self.bucket, code="NoSuchBucket", status=404)
        try:
            self._call("PUT", None, lambda: self.client.create_bucket(Bucket=self.bucket))
        except PermanentBackendError as exc:
            if exc.code != "BucketAlreadyOwnedByYou":  # created meanwhile by us (a retry, another fleece)
                raise

    # -- the contract ----------------------------------------------------------------------------------

    def put(self, name: str, data: Data) -> None:
        key = self._key(name)
        view = memoryview(data).cast("B")
        if len(view) >= self.multipart_threshold:
            self._multipart(name, key, view)
            return
        self._call("PUT", name, lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=_ViewReader(view)))

    def put_if_absent(self, name: str, data: Data) -> bool:
        key = self._key(name)
        body = bytes(data)
        try:
            self._call("PUT", name, lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                                                   IfNoneMatch="*"))
            return True
        except PermanentBackendError as exc:
            if exc.status == 412 or exc.code == "PreconditionFailed":  # If-None-Match: * found the object
                return False
            raise

    def _multipart(self, name: str, key: str, view: memoryview) -> None:
        upload = self._call("PUT", name, lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=key))
        upload_id = upload["UploadId"]
        try:
            parts = []
            for number, start in enumerate(range(0, len(view), self.part_size), 1):
                piece = _ViewReader(view[start:start + self.part_size])
                r = self._call("PUT", name, lambda n=number, b=piece: self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=b))
                parts.append({"PartNumber": number, "ETag": r["ETag"]})
            try:
                self._call("POST", name, lambda: self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}))
            except PermanentBackendError as exc:
                # A proxy that replayed the request after losing the first reply finds the upload
                # already completed: the object is there, whole.
                if exc.code != "NoSuchUpload" or self.head(name).size != len(view):
                    raise
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - the original error matters; lifecycle rules catch leftovers
                pass
            raise

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        key = self._key(name)
        if length is not None and length <= 0:
            self.head(name)
            return b""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if offset or length is not None:
            args["Range"] = f"bytes={offset}-" + ("" if length is None else str(offset + length - 1))

        def fetch() -> bytes:
            try:
                r = self.client.get_object(**args)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""  # offset at or past the end
                raise
            body = r["Body"].read()  # a connection reset here is retried like any other transient error
            expected = r.get("ContentLength")
            if expected is not None and len(body) != expected:
                raise ConnectionClosedError(endpoint_url=f"{name}: body cut short")
            return body

        return self._call("GET", name, fetch)

    def head(self, name: str) -> ObjectInfo:
        key = self._key(name)
        r = self._call("HEAD", name, lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        return ObjectInfo(name, int(r["ContentLength"]))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self.prefix + prefix
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full, "MaxKeys": 1000}
            if token:
                args["ContinuationToken"] = token
            page = self._call("LIST", prefix or "/", lambda a=args: self.client.list_objects_v2(**a))
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][len(self.prefix):], int(obj["Size"]))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def delete(self, name: str) -> None:
        key = self._key(name)
        try:
            self._call("DELETE", name, lambda: self.client.delete_object(Bucket=self.bucket, Key=key))
        except ObjectNotFound:
            pass

    def close(self) -> None:
        self.client.close()

