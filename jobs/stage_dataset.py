"""Upload a local dataset folder to object storage: python jobs/stage_dataset.py SRC_DIR s3://bucket/prefix

Files are uploaded in parallel (--workers threads), large ones as multipart uploads (boto3's upload_file with a
TransferConfig), with a progress bar. Resumable: an object already there with the same size is skipped, so a
rerun after an interruption uploads only what is missing (an interrupted multipart upload never shows up as an
object). When every file is there, `<prefix>/_MANIFEST.json` lists the keys (relative to the prefix) and sizes.

Endpoint, region and credentials come from the standard AWS environment, like every other job:
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (MinIO, Ceph, ...), AWS_REGION, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY or AWS_PROFILE.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from transfgu_dist.io import s3, storage
from transfgu_dist.io.storage_errors import StorageError

MANIFEST = "_MANIFEST.json"
MB = 1 << 20


def local_files(src: Path) -> dict[str, int]:
    """{relative posix path: size} of every file below `src` (a top-level manifest excluded)."""
    if not src.is_dir():
        raise StorageError(str(src), "expected a local dataset folder to upload")
    files = {}
    for dirpath, _, names in os.walk(src):
        for name in names:
            path = Path(dirpath) / name
            rel = path.relative_to(src).as_posix()
            if rel != MANIFEST and path.is_file():
                files[rel] = path.stat().st_size
    return dict(sorted(files.items()))


def remote_sizes(client: Any, bucket: str, prefix: str) -> dict[str, int]:
    """{key relative to `prefix`: size} of the objects already below `prefix`."""
    base = f"{prefix}/" if prefix else ""
    sizes = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        for obj in page.get("Contents", []):
            sizes[obj["Key"][len(base) :]] = obj["Size"]
    return sizes


def stage_dataset(
    src: str | Path, dst: str, workers: int = 8, chunk_mb: int = 64, progress: bool = True
) -> dict[str, Any]:
    """Upload `src` below `dst` (s3://bucket/prefix); returns the manifest written to `dst`/_MANIFEST.json."""
    from boto3.exceptions import Boto3Error
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError
    from tqdm import tqdm

    errors = (ClientError, BotoCoreError, Boto3Error, OSError)
    src = Path(src).resolve()
    dst = dst.rstrip("/")
    bucket, prefix = storage.split_s3(dst)
    files = local_files(src)
    client = s3.boto3_client(max_pool_connections=max(10, 2 * workers))
    try:
        there = remote_sizes(client, bucket, prefix)
    except errors as e:
        raise storage.error_for(dst, e, "list the objects already there") from e
    key = lambda rel: f"{prefix}/{rel}" if prefix else rel  # noqa: E731
    todo = [rel for rel, size in files.items() if there.get(rel) != size]
    chunk = max(5, chunk_mb) * MB  # S3's smallest multipart part is 5 MiB
    transfer = TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=4)
    total = sum(files[rel] for rel in todo)
    print(
        f"{src} -> {dst}: {len(files)} files, {len(files) - len(todo)} already there (same size), "
        f"uploading {len(todo)} ({total / MB:.1f} MiB) with {workers} workers",
        file=sys.stderr,
        flush=True,
    )
    failed: list[tuple[str, BaseException]] = []
    with (
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="upload",
            disable=not progress,
            file=sys.stderr,
        ) as bar,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        futures = {
            pool.submit(client.upload_file, str(src / rel), bucket, key(rel), Config=transfer, Callback=bar.update): rel
            for rel in todo
        }
        try:
            for future in as_completed(futures):
                try:
                    future.result()
                except errors as e:
                    failed.append((futures[future], e))
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if failed:
        rel, e = failed[0]
        first = storage.error_for(f"{dst}/{rel}", e, f"upload {src / rel}")
        raise StorageError(dst, f"{len(failed)} of {len(todo)} uploads failed (rerun to resume); first: {first}")
    manifest = {
        "source": str(src),
        "destination": dst,
        "files": files,
        "n_files": len(files),
        "bytes": sum(files.values()),
        "uploaded": len(todo),
        "skipped": len(files) - len(todo),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        client.put_object(
            Bucket=bucket,
            Key=key(MANIFEST),
            Body=json.dumps(manifest, indent=2).encode(),
            ContentType="application/json",
        )
    except errors as e:
        raise storage.error_for(f"{dst}/{MANIFEST}", e, "write the manifest") from e
    print(
        f"uploaded {len(todo)} files, skipped {len(files) - len(todo)} already there; manifest {dst}/{MANIFEST}",
        file=sys.stderr,
        flush=True,
    )
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="local dataset folder (its layout is kept below the prefix)")
    parser.add_argument("dst", help="s3://bucket/prefix")
    parser.add_argument("--workers", type=int, default=8, help="files uploaded in parallel (default 8)")
    parser.add_argument(
        "--chunk-mb", type=int, default=64, help="multipart threshold and part size in MiB (default 64, at least 5)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    try:
        stage_dataset(args.src, args.dst, args.workers, args.chunk_mb, progress=not args.no_progress)
    except StorageError as e:
        print(f"stage_dataset: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
