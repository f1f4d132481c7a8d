"""One filesystem layer for every stage: local paths, ``file://`` URIs and ``s3://bucket/prefix``.

Everything goes through :mod:`pyarrow.fs` (``LocalFileSystem`` / ``S3FileSystem``), the same
abstraction Ray Data and Ray Train use, so a path that works here works as a Ray
``storage_path`` too (see :func:`ray_storage`).

S3 configuration
    Endpoint and region: :mod:`transfgu_dist.io.s3` (``s3.configure`` once per process overrides the AWS
    environment defaults, e.g. for a MinIO endpoint).  Credentials are never handled here.

Atomicity
    :func:`write_bytes` is atomic on both backends (rename on local disk; an S3 object only
    becomes visible once its PUT / multipart upload completes).  Whole stage directories commit
    through :class:`transfgu_dist.io.stage_output.StageOutput`.

Errors
    Every failure is re-raised as a :class:`transfgu_dist.io.storage_errors.StorageError` with one
    message naming the URI and what was expected (missing bucket, missing key, access denied, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from transfgu_dist.io import s3
from transfgu_dist.io.storage_errors import StorageError, bucket_exists, endpoint_desc, translate

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
# errors


def error_for(uri: str, exc: BaseException, expected: str) -> StorageError:
    """The one-line :class:`StorageError` naming ``uri`` for a failure of another client
    (boto3/botocore errors included): missing bucket, access denied, unreachable endpoint, ..."""
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageError(
            uri,
            f"no usable AWS credentials while trying to {expected} ({exc}): set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
        )
    return translate(uri, exc, expected, _bucket(uri))


@contextlib.contextmanager
def _guard(uri: str, expected: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise translate(uri, exc, expected, _bucket(uri)) from exc


def _bucket(uri: str) -> str | None:
    """The S3 bucket `uri` names; None for a local path."""
    return _split_s3(uri)[0] if is_s3(uri) else None


def _require_bucket(uri: str) -> None:
    """After a NotFound answer on S3: tell a missing bucket apart from a missing key."""
    bucket = _bucket(uri)
    if bucket is not None and bucket_exists(bucket) is False:
        raise StorageError(uri, f"bucket '{bucket}' does not exist{endpoint_desc()}")


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


def relative_files(uri: str, expected: str) -> list[str]:
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
    rel = relative_files(uri, "list a directory")
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


def move(uri_src: str, uri_dst: str) -> None:
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
