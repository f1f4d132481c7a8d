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
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from transfgu_dist import storage
from transfgu_dist.storage import StageOutput

IDS_KEY, BAD_KEY = b"transfgu.image_ids", b"transfgu.bad_images"


def fixed_list(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    """(n, m) array -> Arrow fixed_size_list<dtype, m> column."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=dtype)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def _float_leaves(schema: pa.Schema) -> list[str]:
    """Parquet paths of the floating-point columns, inside fixed-size lists too."""
    paths = []
    for field in schema:
        dtype, path = field.type, field.name
        while pa.types.is_fixed_size_list(dtype) or pa.types.is_list(dtype):
            dtype, path = dtype.value_type, path + ".list.element"
        if pa.types.is_floating(dtype):
            paths.append(path)
    return paths


def write_part(out: StageOutput, table: pa.Table, image_ids: list[str], bad: list[str]) -> str:
    """Publish `table` as one part covering `image_ids` (bad images included, listed apart)."""
    covered = sorted(image_ids) + sorted(bad)
    name = "part-" + hashlib.sha1("\n".join(covered).encode()).hexdigest()[:16] + ".parquet"
    meta = {**(table.schema.metadata or {}), IDS_KEY: json.dumps(sorted(image_ids)).encode(),
            BAD_KEY: json.dumps(sorted(bad)).encode()}
    buf = io.BytesIO()
    # Floats go BYTE_STREAM_SPLIT, not dictionary-encoded (pyarrow's default): an fp16 column never outgrows its
    # 64k-entry dictionary, and decoding those indices made reads 2.6x slower (docs/performance.md).
    floats = _float_leaves(table.schema)
    flat = [f.name for f in table.schema if not pa.types.is_nested(f.type) and f.name not in floats]
    pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd", use_dictionary=flat,
                   column_encoding=dict.fromkeys(floats, "BYTE_STREAM_SPLIT"))
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


def dataset(uris: list[str]) -> ds.Dataset:
    """The given parts as one Arrow dataset, to scan in batches or read whole."""
    if not uris:
        raise FileNotFoundError("no Parquet parts to read")
    fs, _ = storage.filesystem(uris[0])
    return ds.dataset([storage.filesystem(u)[1] for u in uris], filesystem=fs, format="parquet")


def read_table(uris: list[str], columns: list[str] | None = None) -> pa.Table:
    """Concatenate the given parts (only `columns`)."""
    return dataset(uris).to_table(columns=columns)


def list_values(column: pa.Array | pa.ChunkedArray, shape: tuple[int, ...] = ()) -> np.ndarray:
    """A fixed_size_list array or column as an (n, *shape) numpy array of its stored dtype (no copy for one chunk
    of numbers)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), *(shape or (width,)))
