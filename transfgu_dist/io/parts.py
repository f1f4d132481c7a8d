"""Parquet parts of a stage output: each part records which images it covers, so a rerun skips them.

A part is named by a hash of the image ids it covers and published atomically (StageOutput.write_part),
so a retried batch rewrites the same name; `processed_ids` reads only the Parquet footers, and `deduplicate`
leaves each image in one part before a stage commits.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from transfgu_dist.io import storage
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.io.storage_errors import StorageError

IDS_KEY, BAD_KEY, REASONS_KEY = b"transfgu.image_ids", b"transfgu.bad_images", b"transfgu.bad_reasons"


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


def part_name(image_ids: Iterable[str], bad: Iterable[str]) -> str:
    """The name of the part covering `image_ids` and the unreadable `bad` ones: the same for a retried batch."""
    covered = sorted(image_ids) + sorted(bad)
    return "part-" + hashlib.sha1("\n".join(covered).encode()).hexdigest()[:16] + ".parquet"


def write_part(
    out: StageOutput,
    table: pa.Table,
    image_ids: list[str],
    bad: list[str],
    reasons: dict[str, str] | None = None,
    name: str | None = None,
) -> str:
    """Publish `table` as one part covering `image_ids` (bad images included, listed apart, with why each could not
    be read in `reasons`), named `name` or by part_name."""
    name = name or part_name(image_ids, bad)
    meta = {
        **(table.schema.metadata or {}),
        IDS_KEY: json.dumps(sorted(image_ids)).encode(),
        BAD_KEY: json.dumps(sorted(bad)).encode(),
        REASONS_KEY: json.dumps({b: (reasons or {}).get(b, "unreadable") for b in sorted(bad)}).encode(),
    }
    buf = io.BytesIO()
    # Floats go BYTE_STREAM_SPLIT, not dictionary-encoded (pyarrow's default): an fp16 column never outgrows its
    # 64k-entry dictionary, and decoding those indices made the feature read 3.8x slower (docs/performance.md).
    floats = _float_leaves(table.schema)
    flat = [f.name for f in table.schema if not pa.types.is_nested(f.type) and f.name not in floats]
    # Page CRC32s let a reader (page_checksum_verification) catch a part corrupted after it was published.
    pq.write_table(
        table.replace_schema_metadata(meta),
        buf,
        compression="zstd",
        use_dictionary=flat,
        column_encoding=dict.fromkeys(floats, "BYTE_STREAM_SPLIT"),
        write_page_checksum=True,
    )
    out.write_part(name, buf.getvalue())
    return name


def _footer(uri: str) -> dict[bytes, bytes]:
    """A published part's footer metadata; an unreadable part (truncated or overwritten after it was published)
    fails in one line naming it."""
    fs, path = storage.filesystem(uri)
    try:
        return pq.read_schema(path, filesystem=fs).metadata or {}
    except (OSError, pa.ArrowException) as e:
        raise StorageError(
            uri, f"part footer unreadable ({str(e).splitlines()[0]}); delete this part to recompute its images"
        ) from e


def bad_reasons(out: StageOutput, cover: dict[str, tuple[set[str], set[str]]]) -> dict[str, str]:
    """Bad image id -> why it could not be read, from the footers of the parts of `cover` that have bad images."""
    found = {}
    for name, (_, bad) in sorted(cover.items()):
        if bad:
            recorded = json.loads(_footer(out.part_uri(name)).get(REASONS_KEY, b"{}"))
            found.update({b: recorded.get(b, "unreadable") for b in bad})
    return found


def coverage(out: StageOutput) -> dict[str, tuple[set[str], set[str]]]:
    """Published part name -> (image ids written, bad image ids), from the footers."""
    if not storage.exists(out.uri):
        return {}
    cover = {}
    for name in sorted(n for n in out.done_parts() if n.endswith(".parquet")):
        meta = _footer(out.part_uri(name))
        cover[name] = set(json.loads(meta[IDS_KEY])), set(json.loads(meta[BAD_KEY]))
    return cover


def covered(cover: dict[str, tuple[set[str], set[str]]]) -> tuple[set[str], set[str]]:
    """(image ids written, bad image ids) over the parts of a `coverage`."""
    done, bad = set(), set()
    for ids, bad_ids in cover.values():
        done |= ids
        bad |= bad_ids
    return done, bad


def pending(samples: list, cover: dict[str, tuple[set[str], set[str]]]) -> list:
    """The samples (anything with an `image_id`) no part of `cover` holds, in order: one set union, O(N)."""
    seen = set().union(*(ids | bad for ids, bad in cover.values()))
    return [s for s in samples if s.image_id not in seen]


def records(out: StageOutput, cover: dict[str, tuple[set[str], set[str]]]) -> dict[str, dict[str, int]]:
    """What the manifest records of each part: images, bad images, Parquet rows and bytes (not the image ids, so
    the manifest stays ~100 bytes per part at any image count)."""
    fs, _ = storage.filesystem(out.uri)
    names = sorted(cover)
    infos = fs.get_file_info([storage.filesystem(out.part_uri(n))[1] for n in names]) if names else []
    return {
        n: {
            "images": len(cover[n][0]),
            "bad": len(cover[n][1]),
            "bytes": info.size,
            "rows": pq.read_metadata(info.path, filesystem=fs).num_rows,
        }
        for n, info in zip(names, infos)
    }


def _check_present(out: StageOutput, uri: str, info: pafs.FileInfo, rec: dict[str, int]) -> None:
    """StorageError in one line when the part at `uri` is missing or not the size its manifest record says."""
    redo = f"delete {out.uri} to redo that stage"
    if info.type != pafs.FileType.File:
        raise StorageError(
            uri,
            f"part recorded in the committed manifest is missing (expected "
            f"{rec['bytes']} bytes, {rec['rows']} rows); {redo}",
        )
    if info.size != rec["bytes"]:
        raise StorageError(
            uri, f"part is {info.size} bytes, the manifest records {rec['bytes']} (truncated or rewritten); {redo}"
        )


def verify(out: StageOutput) -> None:
    """Check every part the committed manifest records against its byte size and footer row count; raises
    StorageError naming the first part that is missing, resized or unreadable."""
    recorded = out.manifest().get("part_records", {})
    fs, _ = storage.filesystem(out.uri)
    for name, rec in sorted(recorded.items()):
        uri = out.part_uri(name)
        info = fs.get_file_info(storage.filesystem(uri)[1])
        _check_present(out, uri, info, rec)
        try:
            rows = pq.read_metadata(info.path, filesystem=fs).num_rows
        except (OSError, pa.ArrowException) as e:
            raise StorageError(uri, f"part footer unreadable: {str(e).splitlines()[0]}") from e
        if rows != rec["rows"]:
            raise StorageError(uri, f"part holds {rows} rows, the manifest records {rec['rows']}")


def processed_ids(out: StageOutput) -> tuple[set[str], set[str]]:
    """(image ids written, bad image ids) over the published parts of `out`."""
    return covered(coverage(out))


def deduplicate(out: StageOutput) -> tuple[list[str], dict[str, tuple[set[str], set[str]]]]:
    """Leave every image in exactly one published part of `out`; returns the names of the parts removed and the
    coverage of the parts left.

    Attempts that batched the same images differently (two drivers resuming one output at once, a retry that Ray
    Data re-bundled) publish overlapping parts, and the stage would count those images twice. Larger parts are kept
    first; a part whose images are all kept elsewhere is removed, one that overlaps in part is rewritten without the
    overlap and then removed. Safe to rerun after a crash at any point (the rewrite's name is deterministic).
    """
    cover = coverage(out)
    kept, removed, left = set(), [], {}
    for name in sorted(cover, key=lambda n: (-len(cover[n][0]) - len(cover[n][1]), n)):
        ids, bad = cover[name]
        overlap = (ids | bad) & kept
        if not overlap:
            kept |= ids | bad
            left[name] = ids, bad
            continue
        ids, bad = ids - overlap, bad - overlap
        if (ids or bad) and part_name(ids, bad) not in cover:  # else: nothing left, or a part already holds the rest
            table = read_table([out.part_uri(name)])
            rest = write_part(
                out,
                table.filter(pc.is_in(table.column("image_id"), pa.array(sorted(ids), pa.string()))),
                sorted(ids),
                sorted(bad),
            )
            kept |= ids | bad
            left[rest] = ids, bad
        storage.delete(out.part_uri(name))
        removed.append(name)
    return removed, left


def part_uris(out: StageOutput) -> list[str]:
    """Committed part URIs listed in the stage's manifest, each checked in one listing call to exist with the byte
    size its `part_records` entry gives: a deleted or truncated part fails here in one line naming it, before the
    next stage reads it (the footers are read by `verify`, not here)."""
    manifest = out.manifest()
    names = [name for name in manifest["parts"] if name.endswith(".parquet")]
    uris = [out.part_uri(name) for name in names]
    recorded = manifest.get("part_records", {})  # absent in manifests written before parts were recorded
    checked = [(name, uri) for name, uri in zip(names, uris) if name in recorded]
    if checked:
        fs, _ = storage.filesystem(out.uri)
        infos = fs.get_file_info([storage.filesystem(uri)[1] for _, uri in checked])
        for (name, uri), info in zip(checked, infos):
            _check_present(out, uri, info, recorded[name])
    return uris


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
