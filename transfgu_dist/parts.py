"""Parquet parts of a stage output: each part records which images it covers, so a rerun skips them.

A part is named by a hash of the image ids it covers and published atomically (StageOutput.write_part),
so a retried batch rewrites the same name; `processed_ids` reads only the Parquet footers.
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from transfgu_dist import storage
from transfgu_dist.storage import StageOutput

IDS_KEY, BAD_KEY = b"transfgu.image_ids", b"transfgu.bad_images"


def fixed_list(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    """(n, m) array -> Arrow fixed_size_list<dtype, m> column."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=dtype)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def write_part(out: StageOutput, table: pa.Table, image_ids: list[str], bad: list[str]) -> str:
    """Publish `table` as one part covering `image_ids` (bad images included, listed apart)."""
    covered = sorted(image_ids) + sorted(bad)
    name = "part-" + hashlib.sha1("\n".join(covered).encode()).hexdigest()[:16] + ".parquet"
    meta = {**(table.schema.metadata or {}), IDS_KEY: json.dumps(sorted(image_ids)).encode(),
            BAD_KEY: json.dumps(sorted(bad)).encode()}
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd")
    out.write_part(name, buf.getvalue())
    return name


def _footer(uri: str) -> dict[bytes, bytes]:
    fs, path = storage.filesystem(uri)
    return pq.read_schema(path, filesystem=fs).metadata or {}


def processed_ids(out: StageOutput) -> tuple[set[str], set[str]]:
    """(image ids written, bad image ids) over the committed parts of `out`."""
    done, bad = set(), set()
    if storage.exists(out.uri):
        for name in sorted(n for n in out.done_parts() if n.endswith(".parquet")):
            meta = _footer(out.part_uri(name))
            done.update(json.loads(meta[IDS_KEY]))
            bad.update(json.loads(meta[BAD_KEY]))
    return done, bad


def part_uris(out: StageOutput) -> list[str]:
    """Committed part URIs listed in the stage's manifest."""
    return [out.part_uri(name) for name in out.manifest()["parts"] if name.endswith(".parquet")]


def read_table(uris: list[str], columns: list[str] | None = None) -> pa.Table:
    """Concatenate the given parts (only `columns`)."""
    if not uris:
        raise FileNotFoundError("no Parquet parts to read")
    fs, _ = storage.filesystem(uris[0])
    return pq.ParquetDataset([storage.filesystem(u)[1] for u in uris], filesystem=fs).read(columns=columns)


def column_array(table: pa.Table, name: str, shape: tuple[int, ...] = (), dtype: np.dtype | None = None
                 ) -> np.ndarray:
    """A fixed_size_list column as an (n, *shape) numpy array of `dtype` (default: the stored one), filled chunk by
    chunk: no combined copy of the column, and the cast done in the same pass (docs/performance.md)."""
    col = table.column(name)
    width = col.type.list_size
    out = np.empty((len(col), width), dtype=dtype or col.type.value_type.to_pandas_dtype())
    row = 0
    for chunk in col.chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False, writable=True).reshape(len(chunk), width)
        torch.from_numpy(out[row:row + len(chunk)]).copy_(torch.from_numpy(values))  # vectorised fp16 -> fp32
        row += len(chunk)
    return out.reshape(len(col), *(shape or (width,)))
