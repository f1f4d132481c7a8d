"""How this process reaches S3: the options (endpoint, region, anonymous), the boto3 client and the cached pyarrow
S3 filesystems that `transfgu_dist.io.storage` reads and writes through.

Defaults come from the standard AWS environment variables (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``); credentials are never handled here (the AWS SDKs' default chain).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


@dataclasses.dataclass(frozen=True)
class S3Options:
    """How to reach S3.  ``None`` fields fall back to the AWS SDK defaults.

    ``endpoint_url`` is a full URL (``http://127.0.0.1:9000``) for S3-compatible stores
    (MinIO, Ceph, moto); ``anonymous=True`` sends unsigned requests (public buckets).
    """

    endpoint_url: str | None = dataclasses.field(
        default_factory=lambda: _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    )
    region: str | None = dataclasses.field(default_factory=lambda: _env("AWS_REGION", "AWS_DEFAULT_REGION"))
    anonymous: bool = False


_lock = threading.Lock()
_configured: S3Options | None = None
_fs_cache: dict[tuple, pafs.S3FileSystem] = {}
_region_cache: dict[str, str | None] = {}


def configure(opts: S3Options | None) -> None:
    """Set the process-wide S3 options (``None``: back to the AWS environment defaults)."""
    global _configured
    with _lock:
        _configured = opts


def options() -> S3Options:
    """The S3 options in effect in this process (:func:`configure`'d, else read from the environment now, so that
    variables set after import, by tests or a Ray runtime_env, are honoured)."""
    return _configured if _configured is not None else S3Options()


def boto3_client(max_pool_connections: int = 10) -> Any:
    """A boto3 S3 client reaching the same store as everything here (endpoint, region, anonymous).

    For what pyarrow does not offer (e.g. boto3's parallel multipart ``upload_file``); the
    credentials come from boto3's default chain, like pyarrow's.
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config as BotoConfig

    opts = options()
    extra: dict[str, Any] = {}
    endpoint = None
    if opts.endpoint_url:
        endpoint = opts.endpoint_url if "://" in opts.endpoint_url else "https://" + opts.endpoint_url
        extra["s3"] = {"addressing_style": "path"}  # as the pyarrow filesystem: S3-compatible stores
    if opts.anonymous:
        extra["signature_version"] = UNSIGNED
    config = BotoConfig(
        max_pool_connections=max_pool_connections,
        connect_timeout=10,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
        **extra,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=opts.region, config=config)


def _make(opts: S3Options, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = dict(
        anonymous=opts.anonymous,
        connect_timeout=10,
        request_timeout=60,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        # Small writes become one PutObject on close instead of a multipart upload; either
        # way the object only appears once complete.
        allow_delayed_open=True,
    )
    if region:
        kwargs["region"] = region
    if opts.endpoint_url:
        ep = urlparse(opts.endpoint_url if "://" in opts.endpoint_url else "https://" + opts.endpoint_url)
        kwargs["endpoint_override"] = ep.netloc + ep.path.rstrip("/")
        kwargs["scheme"] = ep.scheme or "https"
        # S3-compatible stores are usually addressed path-style.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def filesystem(bucket: str) -> tuple[pafs.S3FileSystem, tuple]:
    opts = options()
    region = opts.region
    if region is None and opts.endpoint_url is None:
        # AWS proper with no region configured: find the bucket's region (one HEAD request,
        # cached), else leave it to the SDK default.
        if bucket not in _region_cache:
            try:
                found: str | None = pafs.resolve_s3_region(bucket)
            except (OSError, pa.ArrowException):
                found = None
            with _lock:
                _region_cache[bucket] = found
        region = _region_cache[bucket]
    key = (bucket, opts.endpoint_url, region, opts.anonymous)
    with _lock:
        fs = _fs_cache.get(key)
        if fs is None:
            fs = _fs_cache[key] = _make(opts, region)
    return fs, key
