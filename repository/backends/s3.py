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

botocore's own retries are off (``total_max_attempts=1``: botocore's ``max_attempts`` counts *retries*, so
``max_attempts=1`` would still send every request twice): a failed request, including the body of a GET
(which botocore does not retry), leaves this backend at once as the contract's error, and one retry
policy — the wrapper's, which the tests pin down — decides what happens next.

Timeouts are explicit: 10 s to connect, 60 s for each read of a reply (:data:`CONNECT_TIMEOUT`,
:data:`READ_TIMEOUT`). A server that accepts connections and then says nothing costs one read timeout
per attempt, and the :class:`~.wrappers.Retrying` deadline bounds the attempts (5 min): a silent endpoint
ends the run in about 6 min, not 16. 60 s is what a healthy server may take to acknowledge a 32 MiB PUT
it has received under load (RGW writing through to a busy cluster); 10 s to connect is long for a LAN
and ample for a WAN.

Set-up errors are the user's to fix and say how (:class:`UsageError`, before any request): a bucket
name S3 does not allow, a missing AWS profile, an unparsable AWS config file, an endpoint that is not an
http(s) URL, credentials written into the repository or endpoint URL (refused: a URL ends up in
messages, logs and shell history; the keys belong in the environment or a profile). No message ever
shows a URL's userinfo. A big object's multipart upload is one ``put``:
a failed part fails the put (the upload is aborted), and the retried put starts a new upload.

Integrity: requests over plain HTTP are signed with the payload's SHA-256 (the server rejects a body
that changed in transit); over HTTPS, TLS protects the transfer. Either way everything fleece reads is
checked against its content hash, because RGW, for one, ignores ``x-amz-checksum-*`` headers.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConfigParseError, ConnectionClosedError,
                                 ConnectTimeoutError, EndpointConnectionError, NoCredentialsError,
                                 ProfileNotFound, ReadTimeoutError, ResponseStreamingError)

from ..errors import ObjectNotFound, PermanentBackendError, TransientBackendError, UsageError
from ..spill import Spill, data_size, pieces
from .base import Backend, Data, ObjectInfo, RangeReader, check_name, has_userinfo, redact_url

T = TypeVar("T")

MULTIPART_THRESHOLD = 64 << 20  # packs (16-32 MiB) go in one PUT: ≤ 64 requests per GiB
PART_SIZE = 16 << 20
#: what a repository under Object Lock locks (with ``config``): what a point needs and its commit record
LOCKED_PREFIXES = ("data/", "index/", "points/")
CONNECT_TIMEOUT = 10.0  # seconds (see the module docstring)
READ_TIMEOUT = 60.0
CREDENTIALS_IN_URL = ("credentials in the URL are not supported: use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                      "or AWS_PROFILE for the keys")
#: The widest bucket names any S3 server accepts (botocore's own check; legacy AWS buckets and relaxed
#: Ceph RGW setups allow capitals and underscores, so only what can never name a bucket is refused here;
#: the server says InvalidBucketName for the rest).
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
                    "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "ConditionalRequestConflict"}
_AUTH_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
               "ExpiredToken", "AccountProblem", "AllAccessDisabled"}
_NETWORK = (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError,
            ResponseStreamingError, ConnectionError, TimeoutError)


class _BodyReader:
    """A seekable, read-only file over ``data[start:end]`` — a buffer or a :class:`~..spill.Spill` — that
    lets boto3 sign and send a pack without copying it whole (retries seek back to 0). A spill is read
    in the pieces boto3 asks for: the pack never sits in this process's memory."""

    def __init__(self, data: Data, start: int = 0, end: int | None = None) -> None:
        self._data = data if isinstance(data, Spill) else memoryview(data).cast("B")
        self._start = start
        self._end = data_size(data) if end is None else min(end, data_size(data))
        self._pos = 0

    def __len__(self) -> int:
        return self._end - self._start

    def read(self, n: int | None = -1) -> bytes:
        left = len(self) - self._pos
        count = left if n is None or n < 0 else max(0, min(left, n))
        at = self._start + self._pos
        self._pos += count
        if isinstance(self._data, Spill):
            return self._data.read(at, count)
        return bytes(self._data[at:at + count])

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else len(self) + pos
        return self._pos

    def tell(self) -> int:
        return self._pos


def _md5(data: Data) -> bytes:
    if not isinstance(data, Spill):
        return hashlib.md5(data).digest()  # a buffer in memory needs no bounce buffer
    digest = hashlib.md5()
    for piece in pieces(data, memoryview(bytearray(1 << 20))):
        digest.update(piece)
    return digest.digest()


def check_bucket(bucket: str) -> str:
    """Refuse a bucket name S3 does not allow, naming the rules (botocore would send the request and
    fail with its own regex, or the server with InvalidBucketName)."""
    if not bucket:
        raise UsageError("s3:// URL without a bucket: use s3://BUCKET[/PREFIX]")
    if not _BUCKET.fullmatch(bucket):
        raise UsageError(f"invalid S3 bucket name {bucket!r}: bucket names are made of letters, digits, dots, hyphens "
                         "(and on some servers underscores), e.g. s3://my-backups/vm1")
    return bucket


def check_endpoint(endpoint: str, source: str) -> str:
    """Refuse an endpoint boto3 cannot use, saying where it came from (*source*); never echo userinfo."""
    if "@" in endpoint:  # user[:password]@ (anywhere: a password with a '/' hides it from a URL parser)
        raise UsageError(f"{CREDENTIALS_IN_URL}, and {source} as http(s)://HOST[:PORT]")
    try:
        parsed = urlparse(endpoint)
        parsed.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"{source}={endpoint!r} is not an S3 endpoint URL: use http(s)://HOST[:PORT], "
                         "e.g. http://127.0.0.1:7480")
    return endpoint


def _setup_error(exc: Exception, location: str) -> UsageError:
    """A boto3 set-up failure as what the user must fix (they are all configuration mistakes)."""
    if isinstance(exc, ProfileNotFound):
        profile = exc.kwargs.get("profile", "")
        return UsageError(f"AWS profile {profile!r} not found: fix or unset AWS_PROFILE, or add the profile to "
                          "~/.aws/config (or the file AWS_CONFIG_FILE names)")
    if isinstance(exc, ConfigParseError):
        path = exc.kwargs.get("path", "")
        return UsageError(f"cannot parse the AWS configuration file {path}: fix it, or point AWS_CONFIG_FILE / "
                          "AWS_SHARED_CREDENTIALS_FILE at a valid one")
    return UsageError(f"cannot set up S3 for {location}: {exc} (check the AWS_* environment and ~/.aws/config)")


class S3Backend(Backend):
    """One bucket (and optional key prefix) as a repository backend."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None, workers: int = 4,
                 connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT) -> None:
        """Set up the client; no request is sent (:meth:`ensure_bucket` checks the bucket).

        Raises :class:`UsageError` for every set-up mistake (see the module docstring). The timeouts are
        botocore's, per connection attempt and per read (tests make them short).
        """
        self.bucket = check_bucket(bucket)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.location = f"s3://{bucket}/{self.prefix}".rstrip("/")
        # Parallel PUTs: each holds one pack buffer in memory; three keep a link busy without bloating RSS.
        self.parallelism = max(2, min(workers, 3))
        self._pool_size = max(2, workers) + 4
        self.multipart_threshold = MULTIPART_THRESHOLD
        self.part_size = PART_SIZE
        if endpoint:
            check_endpoint(endpoint, "--s3-endpoint")
        else:
            for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
                if os.environ.get(var):
                    endpoint = check_endpoint(os.environ[var], var)
                    break
        config = Config(
            max_pool_connections=self._pool_size,
            # total_max_attempts, not max_attempts (which counts retries): one try; Retrying decides the rest
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=connect_timeout, read_timeout=read_timeout, tcp_keepalive=True,
            s3={"addressing_style": "path"} if endpoint else {},
            # Newer boto3 adds CRC checksums with aws-chunked bodies many S3 servers (RGW 16) reject.
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        try:
            session = boto3.session.Session()  # reads AWS_PROFILE and the config files
            self.client = session.client("s3", endpoint_url=endpoint, config=config,
                                         region_name=session.region_name or "us-east-1")
        except (BotoCoreError, ValueError) as exc:  # ValueError: a bad endpoint or region from the config
            raise _setup_error(exc, self.location) from None
        self._where = f"{self.location} at {redact_url(endpoint) if endpoint else 'AWS'}"
        self.object_lock: tuple[str, int] | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3Backend:
        if has_userinfo(url):
            raise UsageError(f"{CREDENTIALS_IN_URL}; the repository is s3://BUCKET[/PREFIX] "
                             f"(got {redact_url(url)})")
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

    def ensure_bucket(self, create: bool = False, object_lock: bool = False) -> None:
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
            extra = {"ObjectLockEnabledForBucket": True} if object_lock else {}
            self._call("PUT", None, lambda: self.client.create_bucket(Bucket=self.bucket, **extra))
        except PermanentBackendError as exc:
            if exc.code != "BucketAlreadyOwnedByYou":  # created meanwhile by us (a retry, another fleece)
                raise

    # -- object lock ----------------------------------------------------------------------------------

    def lock_enabled(self) -> bool:
        """Whether the bucket has S3 Object Lock enabled (it can only be chosen when it is created)."""
        try:
            r = self._call("GET", None, lambda: self.client.get_object_lock_configuration(Bucket=self.bucket))
        except PermanentBackendError as exc:
            if exc.code in ("ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound"):
                return False
            raise
        return r.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"

    def set_object_lock(self, mode: str, days: int) -> None:
        self.object_lock = (mode, days)

    def _locked(self, name: str) -> bool:
        return self.object_lock is not None and (name == "config" or name.startswith(LOCKED_PREFIXES))

    def _lock_args(self, name: str, body: Data) -> dict[str, Any]:
        """Retention headers for a new object of a locked repository (with the Content-MD5 AWS requires)."""
        if not self._locked(name):
            return {}
        assert self.object_lock is not None
        mode, days = self.object_lock
        until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)
        return {"ObjectLockMode": mode, "ObjectLockRetainUntilDate": until,
                "ContentMD5": base64.b64encode(_md5(body)).decode()}

    def extend_lock(self, name: str, until: float) -> None:
        if self.object_lock is None:
            return
        mode = self.object_lock[0]
        when = datetime.datetime.fromtimestamp(until, datetime.timezone.utc)
        self._call("PUT", name, lambda: self.client.put_object_retention(
            Bucket=self.bucket, Key=self._key(name), Retention={"Mode": mode, "RetainUntilDate": when}))

    # -- the contract ----------------------------------------------------------------------------------

    def put(self, name: str, data: Data) -> None:
        key = self._key(name)
        if data_size(data) >= self.multipart_threshold:
            self._multipart(name, key, data)
            return
        lock = self._lock_args(name, data)
        self._call("PUT", name, lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=_BodyReader(data),
                                                               **lock))

    def put_if_absent(self, name: str, data: Data) -> bool:
        key = self._key(name)
        body = bytes(data)
        lock = self._lock_args(name, body)
        if self.object_lock is not None:
            return self._put_if_absent_versioned(name, key, body, lock)
        try:
            self._call("PUT", name, lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                                                   IfNoneMatch="*", **lock))
            return True
        except PermanentBackendError as exc:
            if exc.status == 412 or exc.code == "PreconditionFailed":  # If-None-Match: * found the object
                return False
            raise

    def _put_if_absent_versioned(self, name: str, key: str, body: bytes, lock: dict[str, Any]) -> bool:
        """put-if-absent in a versioned bucket (Object Lock implies versioning), where Ceph RGW 16 ignores
        ``If-None-Match: *`` (measured: every PUT creates a version). Look first; put; then the key's
        versions decide: the oldest version after the newest delete marker is the one that was first,
        and a later one that raced it is taken back (possible outside the locked prefixes — the
        maintenance lock —; a locked object cannot be, and is only reported as not created)."""
        try:
            self.head(name)
            return False
        except ObjectNotFound:
            pass
        mine = self._call("PUT", name, lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                                                      **lock)).get("VersionId")
        listing = self._call("LIST", name, lambda: self.client.list_object_versions(Bucket=self.bucket, Prefix=key))
        events = [(v["LastModified"], 1, v["VersionId"]) for v in listing.get("Versions", []) if v["Key"] == key]
        events += [(d["LastModified"], 0, d["VersionId"]) for d in listing.get("DeleteMarkers", []) if d["Key"] == key]
        # newest first; equal (1 s) stamps keep the server's order, in which versions come newest first
        events.sort(key=lambda e: e[0], reverse=True)
        live: list[str] = []
        for _, is_version, version in events:
            if not is_version:
                break
            live.append(version)
        if not live or mine is None or live[-1] == mine:
            return True
        if not self._locked(name):
            self._call("DELETE", name, lambda: self.client.delete_object(Bucket=self.bucket, Key=key, VersionId=mine))
        return False

    def _multipart(self, name: str, key: str, data: Data) -> None:
        upload = self._call("PUT", name, lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=key))
        upload_id = upload["UploadId"]
        try:
            parts = []
            for number, start in enumerate(range(0, data_size(data), self.part_size), 1):
                piece = _BodyReader(data, start, start + self.part_size)
                r = self._call("PUT", name, lambda n=number, b=piece: self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=b))
                parts.append({"PartNumber": number, "ETag": r["ETag"]})
            try:
                self._call("POST", name, lambda: self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}))
            except PermanentBackendError as exc:
                # A proxy that replayed the request after losing the first reply finds the upload
                # already completed: the object is there, whole.
                if exc.code != "NoSuchUpload" or self.head(name).size != data_size(data):
                    raise
            if self._locked(name):
                # RGW ignores retention given to create_multipart_upload: set it on the completed object
                assert self.object_lock is not None
                self.extend_lock(name, time.time() + self.object_lock[1] * 86400)
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
        rng = None if not offset and length is None else f"bytes={offset}-" + (
            "" if length is None else str(offset + length - 1))

        def fetch() -> bytes:
            r = self._get_object(key, rng)
            if r is None:
                return b""
            body = r["Body"].read()  # a connection reset here is retried like any other transient error
            expected = r.get("ContentLength")
            if expected is not None and len(body) != expected:
                raise ConnectionClosedError(endpoint_url=f"{name}: body cut short")
            return body

        return self._call("GET", name, fetch)

    def open_range(self, name: str, offset: int, length: int) -> RangeReader:
        """One ranged GET whose body is read as the caller asks: the range never sits whole in memory."""
        if length <= 0:
            return RangeReader(self.get(name, offset, length))
        key, rng = self._key(name), f"bytes={offset}-{offset + length - 1}"
        r = self._call("GET", name, lambda: self._get_object(key, rng))
        if r is None:
            return RangeReader(b"")
        return _S3Range(self, name, r["Body"], int(r.get("ContentLength") or 0))

    def _get_object(self, key: str, rng: str | None) -> Any:
        """One GET (of *rng*, an HTTP Range, if given); None if the range starts at or past the end."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if rng is not None:
            args["Range"] = rng
        try:
            return self.client.get_object(**args)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return None
            raise

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
                stamp = obj.get("LastModified")
                yield ObjectInfo(obj["Key"][len(self.prefix):], int(obj["Size"]),
                                 stamp.timestamp() if stamp is not None else None)
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def delete(self, name: str) -> None:
        key = self._key(name)
        try:
            self._call("DELETE", name, lambda: self.client.delete_object(Bucket=self.bucket, Key=key))
        except ObjectNotFound:
            pass

    def delete_many(self, names: Sequence[str]) -> None:
        """``DeleteObjects`` in batches of 1000 (quiet mode: the reply lists only failures)."""
        for i in range(0, len(names), 1000):
            part = names[i:i + 1000]
            request = {"Objects": [{"Key": self._key(n)} for n in part], "Quiet": True}
            reply = self._call("DELETE", part[0], lambda r=request: self.client.delete_objects(
                Bucket=self.bucket, Delete=r))
            failed = [e for e in reply.get("Errors", []) if e.get("Code") not in ("NoSuchKey",)]
            if failed:
                first = failed[0]
                raise self._error(ClientError({"Error": {"Code": first.get("Code"), "Message": first.get("Message")},
                                               "ResponseMetadata": {}}, "DeleteObjects"),
                                  "DELETE", str(first.get("Key", ""))[len(self.prefix):])

    def close(self) -> None:
        self.client.close()



class _S3Range(RangeReader):
    """The body of a ranged GET, read piece by piece; a connection lost mid-body is a transient error
    (the retry layer resumes from where it stopped)."""

    def __init__(self, backend: S3Backend, name: str, body: Any, length: int) -> None:
        self._backend, self._name, self._body, self._left = backend, name, body, length

    def readinto(self, out: memoryview) -> int:
        done = 0
        while done < len(out) and self._left > 0:
            want = min(len(out) - done, self._left)
            chunk = self._backend._call("GET", self._name, lambda: self._body.read(want))
            if not chunk:
                raise TransientBackendError(f"GET {self._name} in {self._backend.location}: body cut short "
                                            f"({self._left} bytes missing)", object=self._name)
            out[done:done + len(chunk)] = chunk
            done += len(chunk)
            self._left -= len(chunk)
        return done

    def close(self) -> None:
        try:
            self._body.close()
        except Exception:  # noqa: BLE001 - a connection that cannot even close is dropped anyway
            pass
