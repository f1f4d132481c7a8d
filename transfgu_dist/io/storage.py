"""One filesystem layer for every stage: local paths, ``file://`` URIs and ``s3://bucket/prefix``.

Everything goes through :mod:`pyarrow.fs` (``LocalFileSystem`` / ``S3FileSystem``), the same
abstraction Ray Data and Ray Train use, so a path that works here works as a Ray
``storage_path`` too (see :func:`ray_storage`).

S3 configuration
    Endpoint and region: :mod:`transfgu_dist.io.s3` (``s3.configure`` once per process overrides the AWS
    environment defaults, e.g. for a MinIO endpoint).  Credentials are never handled here.

Atomicity
    :func:`write_bytes` is atomic on both backends (rename on local disk; an S3 object only
    becomes visible once its PUT / multipart upload completes).  :class:`StageOutput` adds a
    commit protocol for whole stage directories: parts are staged under ``<dir>/_tmp/<uuid>/``
    and renamed to their final name (on S3: one PUT of the final name), then ``<dir>/_SUCCESS.json``
    is written last.  Readers trust a stage only once ``_SUCCESS.json`` exists.

Errors
    Every failure is re-raised as :class:`StorageError` with one message naming the URI and what
    was expected (missing bucket, missing key, access denied, unreachable endpoint, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from transfgu_dist.io import s3

__all__ = [
    "StageOutput",
    "StorageError",
    "delete",
    "error_for",
    "exists",
    "filesystem",
    "join",
    "list_files",
    "local_copy",
    "ray_storage",
    "read_bytes",
    "read_json",
    "split_s3",
    "write_bytes",
    "write_json",
]

SUCCESS_NAME = "_SUCCESS.json"
TMP_DIR_NAME = "_tmp"


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what was expected."""

    def __init__(self, uri: str, message: str):
        self.uri = uri
        super().__init__(f"{uri}: {message}")


_lock = threading.Lock()
_known_buckets: set[tuple] = set()  # (fs cache key, bucket) pairs verified to exist
_local_fs = pafs.LocalFileSystem()


# --------------------------------------------------------------------------------------------
# URI handling


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(uri, "expected s3://<bucket>/<key>, got no bucket name")
    if parsed.query:
        raise StorageError(
            uri,
            "query parameters are not supported; use transfgu_dist.io.s3.S3Options / "
            "AWS_ENDPOINT_URL_S3 to set the endpoint",
        )
    return parsed.netloc, parsed.path.strip("/")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b"); :class:`StorageError` if ``uri`` is not one."""
    if not is_s3(uri):
        raise StorageError(uri, "expected an s3://<bucket>/<prefix> URI")
    return _split_s3(uri)


def _local_path(uri: str) -> str:
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(uri, "file:// URIs must name a local path (file:///abs/path)")
        return os.path.abspath(unquote(parsed.path))
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(uri, f"unsupported scheme '{scheme}://' (expected a local path, file:// or s3://)")
    return os.path.abspath(os.path.expanduser(uri))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it (``bucket/key`` on S3).

    S3 filesystems are cached per (bucket, endpoint, region, anonymous).
    """
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        fs, _ = s3.filesystem(bucket)
        return fs, f"{bucket}/{key}" if key else bucket
    return _local_fs, _local_path(uri)


def join(uri: str, *parts: str) -> str:
    """Join path components; keeps the style (local path / file:// / s3://) of ``uri``."""
    parts = tuple(p.strip("/") for p in parts if p and p.strip("/"))
    if not parts:
        return uri
    if "://" in uri:
        return uri.rstrip("/") + "/" + "/".join(parts)
    return os.path.join(uri, *parts)


# --------------------------------------------------------------------------------------------
# error translation


def _endpoint_desc() -> str:
    ep = s3.options().endpoint_url
    return f" (endpoint {ep})" if ep else ""


def _bucket_exists(uri: str) -> bool | None:
    """True / False for an S3 URI's bucket; None if that cannot be told (e.g. no access)."""
    bucket, _ = _split_s3(uri)
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


def _translate(uri: str, exc: BaseException, expected: str) -> StorageError:
    msg = str(exc)
    low = msg.lower()
    on_s3 = is_s3(uri)
    bucket = _split_s3(uri)[0] if on_s3 else None
    ep = _endpoint_desc() if on_s3 else ""

    if on_s3 and ("no_such_bucket" in low or "nosuchbucket" in low or "bucket does not exist" in low):
        return StorageError(uri, f"bucket '{bucket}' does not exist{ep}")
    if on_s3 and any(
        s in low
        for s in (
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
    ):
        return StorageError(
            uri,
            f"access denied while trying to {expected}{ep}: check the AWS credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role) "
            f"and the bucket policy [{_first_line(msg)}]",
        )
    if on_s3 and any(
        s in low
        for s in (
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
    ):
        return StorageError(
            uri, f"cannot reach the S3 endpoint{ep or ' (AWS default)'} while trying to {expected} [{_first_line(msg)}]"
        )
    if (
        isinstance(exc, FileNotFoundError)
        or "path does not exist" in low
        or "no_such_key" in low
        or "nosuchkey" in low
        or (on_s3 and ("(404)" in low or "not found" in low))
    ):  # boto3 HeadObject: "(404) ... Not Found"
        if on_s3 and _bucket_exists(uri) is False:
            return StorageError(uri, f"bucket '{bucket}' does not exist{ep}")
        if on_s3:
            where = f"; endpoint {s3.options().endpoint_url}" if s3.options().endpoint_url else ""
            return StorageError(uri, f"does not exist (tried to {expected}{where})")
        detail = "" if expected == "read it" else f" [{_first_line(msg)}]"
        return StorageError(uri, f"does not exist (tried to {expected}){detail}")
    if "not a regular file" in low or "is a directory" in low:
        return StorageError(uri, f"is a directory/prefix, expected a file (tried to {expected})")
    if isinstance(exc, PermissionError):
        return StorageError(uri, f"permission denied (tried to {expected}) [{_first_line(msg)}]")
    if isinstance(exc, NotADirectoryError):
        return StorageError(uri, f"a parent path is a file, not a directory (tried to {expected})")
    return StorageError(uri, f"failed to {expected}{ep}: {type(exc).__name__}: {_first_line(msg)}")


def error_for(uri: str, exc: BaseException, expected: str) -> StorageError:
    """The one-line :class:`StorageError` naming ``uri`` for a failure of another client
    (boto3/botocore errors included): missing bucket, access denied, unreachable endpoint, ..."""
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageError(
            uri,
            f"no usable AWS credentials while trying to {expected} ({exc}): set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
        )
    return _translate(uri, exc, expected)


def _first_line(msg: str) -> str:
    line = msg.strip().splitlines()[0] if msg.strip() else ""
    return line[:300]


@contextlib.contextmanager
def _guard(uri: str, expected: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise _translate(uri, exc, expected) from exc


def _require_bucket(uri: str) -> None:
    """After a NotFound answer on S3: tell a missing bucket apart from a missing key."""
    if is_s3(uri) and _bucket_exists(uri) is False:
        bucket, _ = _split_s3(uri)
        raise StorageError(uri, f"bucket '{bucket}' does not exist{_endpoint_desc()}")


# --------------------------------------------------------------------------------------------
# file operations


def _info(uri: str, expected: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    with _guard(uri, expected):
        info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        _require_bucket(uri)
    return info


def exists(uri: str) -> bool:
    """Whether a file or a non-empty prefix/directory exists at ``uri``.

    On S3 a missing *bucket* raises :class:`StorageError` (it is a configuration error, not a
    missing object).
    """
    return _info(uri, "check whether it exists").type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with _guard(uri, "read it"):
        with fs.open_input_stream(path) as f:
            return f.read()


def _ensure_parent(fs: pafs.FileSystem, path: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path) or "/", recursive=True)


def _write_direct(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` atomically: readers see the old content, or all of the new one."""
    fs, path = filesystem(uri)
    with _guard(uri, "write it"):
        if isinstance(fs, pafs.LocalFileSystem):
            _ensure_parent(fs, path)
            d, name = os.path.split(path)
            tmp = os.path.join(d, f".{name}.tmp-{uuid.uuid4().hex}")
            try:
                _write_direct(fs, tmp, data)
                os.replace(tmp, path)  # atomic on POSIX, overwrites
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            _write_direct(fs, path, data)  # an S3 object appears only when complete


def read_json(uri: str) -> Any:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StorageError(uri, f"expected a JSON document: {exc}") from exc


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)  # paths, datetimes, enums


def write_json(uri: str, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    write_bytes(uri, data.encode())


def _relative_files(uri: str, expected: str) -> list[str]:
    """Paths of all files under ``uri`` relative to it (posix separators), sorted."""
    fs, base = filesystem(uri)
    with _guard(uri, expected):
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            _require_bucket(uri)
            return []
        if info.type == pafs.FileType.File:
            return [""]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    prefix = base.rstrip("/") + "/"
    out = []
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        p = i.path.replace(os.sep, "/") if os.sep != "/" else i.path
        out.append(p[len(prefix) :] if p.startswith(prefix) else p)
    return sorted(out)


def list_files(uri: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """All files below ``uri`` (recursive), as full URIs in ``uri``'s style, sorted.

    ``suffixes`` filters by name ending (e.g. ``(".jpg", ".png")``).  A missing directory
    gives ``[]``; a missing bucket raises :class:`StorageError`.
    """
    rel = _relative_files(uri, "list a directory")
    if suffixes:
        rel = [r for r in rel if r.endswith(tuple(suffixes))]
    return [join(uri, r) if r else uri for r in rel]


def delete(uri: str) -> None:
    """Delete a file, or a directory/prefix with everything below it.  Missing: no-op."""
    fs, path = filesystem(uri)
    with _guard(uri, "delete it"):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            fs.delete_file(path)
        elif info.type == pafs.FileType.Directory:
            if is_s3(uri) and "/" not in path.strip("/"):
                raise StorageError(uri, "refusing to delete a whole bucket")
            fs.delete_dir(path)
        else:
            _require_bucket(uri)


def _move(uri_src: str, uri_dst: str) -> None:
    """Rename a local file into place (atomic on POSIX)."""
    fs, src = filesystem(uri_src)
    _, dst = filesystem(uri_dst)
    with _guard(uri_dst, f"move {uri_src} into place"):
        _ensure_parent(fs, dst)
        os.replace(src, dst)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """Yield a local path holding the file at ``uri`` (e.g. for ``torch.load``).

    Local files are yielded in place; remote ones are downloaded to a temporary directory that
    is removed afterwards.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        if not os.path.isfile(path):
            raise StorageError(uri, "does not exist (tried to open it as a local file)")
        yield path
        return
    tmpdir = tempfile.mkdtemp(prefix="transfgu-")
    try:
        local = os.path.join(tmpdir, posixpath.basename(path) or "data")
        with _guard(uri, "download it"):
            with fs.open_input_stream(path) as src, open(local, "wb") as dst:
                while chunk := src.read(16 << 20):
                    dst.write(chunk)
        yield local
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def ray_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig`` / ``tune.RunConfig``.

    Local: ``(absolute path, None)``.  S3: ``("bucket/prefix", S3FileSystem)`` configured like
    every other access here (endpoint, region), so MinIO / moto endpoints work in Ray too.
    """
    if is_s3(uri):
        fs, path = filesystem(uri)
        return path, fs
    return _local_path(uri), None


# --------------------------------------------------------------------------------------------
# atomic stage outputs


class StageOutput:
    """A stage's output directory with an all-or-nothing commit.

    - :meth:`write_part` stages ``name`` under a fresh ``<dir>/_tmp/<uuid>/`` and then moves it to
      ``<dir>/<name>``, so a part is either fully present or absent;
    - :meth:`done_parts` lists committed parts (for resuming an interrupted stage);
    - :meth:`commit` writes ``<dir>/_SUCCESS.json`` last (manifest = caller metadata plus
      ``parts`` and ``committed_at``) and removes ``_tmp``.

    Part names are deterministic per input shard, so a retried attempt rewrites the same
    names with the same content; readers trust the directory only once it is committed.
    """

    RESERVED_KEYS = ("parts", "committed_at")

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/") if uri.rstrip("/") else uri

    def __repr__(self) -> str:
        return f"StageOutput({self.uri!r})"

    @property
    def success_uri(self) -> str:
        return join(self.uri, SUCCESS_NAME)

    def part_uri(self, name: str) -> str:
        self._check_name(name)
        return join(self.uri, name)

    @staticmethod
    def _check_name(name: str) -> None:
        parts = name.strip("/").split("/")
        if not name.strip("/") or any(p in ("", ".", "..") for p in parts) or parts[0] in (SUCCESS_NAME, TMP_DIR_NAME):
            raise ValueError(f"invalid part name {name!r}")

    def write_part(self, name: str, data: bytes) -> str:
        """Publish one part; returns its final URI. On S3 one PUT of the final name (an object appears only when
        complete); on local disk a staged file renamed into place."""
        final = self.part_uri(name)
        if is_s3(final):
            write_bytes(final, data)
            return final
        # A fresh staging directory per write: concurrent or retried writers of the same part
        # never share a temporary file.
        staging = join(self.uri, TMP_DIR_NAME, uuid.uuid4().hex)
        tmp = join(staging, name)
        fs, tmp_path = filesystem(tmp)
        with _guard(tmp, "write a staged part"):
            _ensure_parent(fs, tmp_path)
            _write_direct(fs, tmp_path, data)
        _move(tmp, final)
        shutil.rmtree(filesystem(staging)[1], ignore_errors=True)
        return final

    def done_parts(self) -> set[str]:
        """Names of the parts already published (``_tmp`` leftovers and the marker excluded)."""
        rel = _relative_files(self.uri, "list a stage directory")
        return {r for r in rel if r and r != SUCCESS_NAME and r.split("/", 1)[0] != TMP_DIR_NAME}

    def commit(self, manifest: dict | None = None) -> dict:
        """Write ``_SUCCESS.json`` (caller metadata + ``parts`` + ``committed_at``), drop ``_tmp``."""
        manifest = dict(manifest or {})
        clash = [k for k in self.RESERVED_KEYS if k in manifest]
        if clash:
            raise ValueError(f"manifest keys {clash} are reserved by StageOutput.commit")
        doc = {
            **manifest,
            "parts": sorted(self.done_parts()),
            "committed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(self.success_uri, doc)
        delete(join(self.uri, TMP_DIR_NAME))
        return doc

    def is_committed(self) -> bool:
        return exists(self.success_uri)

    def manifest(self) -> dict:
        """The committed manifest; :class:`StorageError` if the stage is not committed."""
        try:
            return read_json(self.success_uri)
        except StorageError as exc:
            if not exists(self.success_uri):
                raise StorageError(self.uri, f"stage output is not committed (no {SUCCESS_NAME})") from exc
            raise
