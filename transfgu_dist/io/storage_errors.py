"""StorageError and the translation of a backend's failure into one line naming the URI and what was expected:
missing bucket or key, access denied, unreachable endpoint, a directory where a file was expected, ..."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.fs as pafs

from transfgu_dist.io import s3


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what was expected."""

    def __init__(self, uri: str, message: str):
        self.uri, self.message = uri, message
        super().__init__(f"{uri}: {message}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Pickled with both arguments: one raised in a Ray worker reaches the driver as itself."""
        return self.__class__, (self.uri, self.message)


_lock = threading.Lock()
_known_buckets: set[tuple] = set()  # (fs cache key, bucket) pairs verified to exist

_ACCESS_DENIED = (
    "access_denied",
    "accessdenied",
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "invalid_access_key_id",
    "signature_does_not_match",
    "expiredtoken",
    "http response code: 403",
    "forbidden",
)
_UNREACHABLE = (
    "network_connection",
    "couldn't connect",
    "could not connect",
    "curlcode: 7",
    "curlcode: 6",
    "curlcode: 28",
    "connection refused",
    "timed out",
    "timeout",
)


def endpoint_desc() -> str:
    ep = s3.options().endpoint_url
    return f" (endpoint {ep})" if ep else ""


def bucket_exists(bucket: str) -> bool | None:
    """True / False for an S3 bucket; None if that cannot be told (e.g. no access)."""
    fs, key = s3.filesystem(bucket)
    if (key, bucket) in _known_buckets:
        return True
    try:
        info = fs.get_file_info(bucket)
    except (OSError, pa.ArrowException):
        return None
    found = info.type != pafs.FileType.NotFound
    if found:
        with _lock:
            _known_buckets.add((key, bucket))
    return found


def first_line(msg: str) -> str:
    line = msg.strip().splitlines()[0] if msg.strip() else ""
    return line[:300]


def translate(uri: str, exc: BaseException, expected: str, bucket: str | None) -> StorageError:
    """The one-line StorageError for `exc` raised while trying to `expected` at `uri` (`bucket`: None off S3)."""
    msg = str(exc)
    low = msg.lower()
    on_s3 = bucket is not None
    ep = endpoint_desc() if on_s3 else ""

    if on_s3 and ("no_such_bucket" in low or "nosuchbucket" in low or "bucket does not exist" in low):
        return StorageError(uri, f"bucket '{bucket}' does not exist{ep}")
    if on_s3 and any(s in low for s in _ACCESS_DENIED):
        return StorageError(
            uri,
            f"access denied while trying to {expected}{ep}: check the AWS credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role) "
            f"and the bucket policy [{first_line(msg)}]",
        )
    if on_s3 and any(s in low for s in _UNREACHABLE):
        return StorageError(
            uri, f"cannot reach the S3 endpoint{ep or ' (AWS default)'} while trying to {expected} [{first_line(msg)}]"
        )
    if (
        isinstance(exc, FileNotFoundError)
        or "path does not exist" in low
        or "no_such_key" in low
        or "nosuchkey" in low
        or (on_s3 and ("(404)" in low or "not found" in low))
    ):  # boto3 HeadObject: "(404) ... Not Found"
        if on_s3 and bucket_exists(bucket) is False:
            return StorageError(uri, f"bucket '{bucket}' does not exist{ep}")
        if on_s3:
            where = f"; endpoint {s3.options().endpoint_url}" if s3.options().endpoint_url else ""
            return StorageError(uri, f"does not exist (tried to {expected}{where})")
        detail = "" if expected == "read it" else f" [{first_line(msg)}]"
        return StorageError(uri, f"does not exist (tried to {expected}){detail}")
    if "not a regular file" in low or "is a directory" in low:
        return StorageError(uri, f"is a directory/prefix, expected a file (tried to {expected})")
    if isinstance(exc, PermissionError):
        return StorageError(uri, f"permission denied (tried to {expected}) [{first_line(msg)}]")
    if isinstance(exc, NotADirectoryError):
        return StorageError(uri, f"a parent path is a file, not a directory (tried to {expected})")
    return StorageError(uri, f"failed to {expected}{ep}: {type(exc).__name__}: {first_line(msg)}")
