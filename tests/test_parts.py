"""Parquet part helpers: fixed-size-list columns in and out, and the cluster stage's streamed feature read."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from transfgu_dist.config import Config
from transfgu_dist.io import parts
from transfgu_dist.io.concepts_file import load_concepts
from transfgu_dist.io.parts import fixed_list, list_values, read_table, write_part
from transfgu_dist.io.stage_output import StageOutput
from transfgu_dist.io.storage_errors import StorageError
from transfgu_dist.pipeline import contract
from transfgu_dist.pipeline.stages.cluster import _fit, read_pools


def test_list_values_over_chunk_slices_and_shapes():
    x = np.arange(24, dtype=np.float16).reshape(6, 4)
    col = fixed_list(x, pa.float16())
    # three chunks, two of them slices with an offset into their values
    chunked = pa.chunked_array([col.slice(0, 1), col.slice(1, 3), col.slice(4, 2)])
    assert np.array_equal(list_values(chunked), x) and list_values(chunked).dtype == np.float16
    assert np.array_equal(list_values(col.slice(4, 2)), x[4:])
    assert list_values(chunked, (2, 2)).shape == (6, 2, 2)


def test_list_values_bool_and_empty():
    mask = np.array([[True, False], [False, True]])
    col = fixed_list(mask, pa.bool_())
    assert np.array_equal(list_values(col), mask) and list_values(col).dtype == bool
    assert list_values(col.slice(0, 0)).shape == (0, 2)


def test_read_pools_splits_and_widens_every_row(tmp_path):
    rng = np.random.default_rng(0)
    out, x, is_fg = StageOutput(str(tmp_path / "features")), [], []
    for i, n in enumerate([5, 1, 7, 3]):  # one part with a single (bg or fg) row
        feats, fg = rng.standard_normal((n, 6)).astype(np.float16), rng.random(n) < 0.5
        write_part(out, pa.table({"is_fg": pa.array(fg), "feature": fixed_list(feats, pa.float16())}), [str(i)], [])
        x.append(feats)
        is_fg.append(fg)
    uris = [out.part_uri(name) for name in out.done_parts()]
    x, is_fg = np.concatenate(x), np.concatenate(is_fg)
    fg, bg = read_pools(uris)
    assert fg.dtype == bg.dtype == np.float32 and fg.flags.c_contiguous and bg.flags.c_contiguous
    assert len(fg) == is_fg.sum() and len(bg) == (~is_fg).sum()

    def rows(a: np.ndarray) -> list[tuple]:
        return sorted(map(tuple, a.astype(np.float32).tolist()))

    assert rows(fg) == rows(x[is_fg]) and rows(bg) == rows(x[~is_fg])  # every row once, exactly widened
    table = read_table(uris)
    assert np.array_equal(list_values(table.column("feature"))[table.column("is_fg").to_numpy()], fg.astype(np.float16))


def _numbered_features(out: StageOutput, sizes: list[int], seed: int = 0) -> np.ndarray:
    """Feature parts whose rows carry their global number in column 0; returns is_fg of every row."""
    rng, is_fg, start = np.random.default_rng(seed), [], 0
    for i, n in enumerate(sizes):
        feats = np.zeros((n, 3), np.float16)
        feats[:, 0] = np.arange(start, start + n)
        fg = rng.random(n) < 0.4
        write_part(out, pa.table({"is_fg": pa.array(fg), "feature": fixed_list(feats, pa.float16())}), [str(i)], [])
        is_fg.append(fg)
        start += n
    return np.concatenate(is_fg)


def test_read_pools_caps_each_pool_to_a_uniform_sample(tmp_path):
    out = StageOutput(str(tmp_path / "features"))
    is_fg = _numbered_features(out, [40, 1, 90, 69])
    uris = [out.part_uri(name) for name in sorted(out.done_parts())]
    fg_rows, bg_rows = set(np.flatnonzero(is_fg)), set(np.flatnonzero(~is_fg))

    def numbers(a: np.ndarray) -> list[int]:
        return sorted(a[:, 0].astype(int).tolist())

    fg, bg = read_pools(uris, (30, None), seed=3)
    assert len(set(numbers(fg))) == 30 and set(numbers(fg)) <= fg_rows  # 30 distinct fg rows
    assert numbers(bg) == sorted(bg_rows)  # no cap: every bg row
    again, _ = read_pools(uris, (30, None), seed=3)
    other, _ = read_pools(uris, (30, None), seed=4)
    assert numbers(again) == numbers(fg) and numbers(other) != numbers(fg)
    fg, bg = read_pools(uris, (10**6, 0))  # a cap over the pool's size keeps it whole; 0 reads none
    assert numbers(fg) == sorted(fg_rows) and bg.shape == (0, 3)


def test_cluster_reads_only_the_points_it_trains_on(tmp_path):
    cfg = Config(output=str(tmp_path))
    cfg.cluster.k_fg, cfg.cluster.k_bg, cfg.cluster.niter, cfg.cluster.max_points_per_centroid = 3, 2, 5, 7
    features = contract.output(cfg, "extract")
    is_fg = _numbered_features(features, [50, 60, 70])
    assert is_fg.sum() > 3 * 7 and (~is_fg).sum() > 2 * 7  # both caps bind
    manifest = _fit(cfg, [features.part_uri(n) for n in sorted(features.done_parts())])
    assert (manifest["points_fg"], manifest["points_bg"]) == (3 * 7, 2 * 7)
    assert load_concepts(contract.output(cfg, "cluster")).centroids.shape == (5, 3)


def test_write_part_encodes_floats_byte_stream_split(tmp_path):
    out = StageOutput(str(tmp_path / "bank"))
    table = pa.table(
        {
            "image_id": ["a", "b"],
            "beta": pa.array([0.5, 0.2], pa.float32()),
            "maps": fixed_list(np.ones((2, 3), np.float16), pa.float16()),
            "box": fixed_list(np.ones((2, 4), np.int32), pa.int32()),
        }
    )
    name = write_part(out, table, ["a", "b"], [])
    meta = pq.ParquetFile(out.part_uri(name)).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings["beta"] and "BYTE_STREAM_SPLIT" in encodings["maps.list.element"]
    assert "RLE_DICTIONARY" in encodings["image_id"] and "RLE_DICTIONARY" not in encodings["maps.list.element"]
    assert read_table([out.part_uri(name)]).equals(table)


def _crop_part(out: StageOutput, writer: str, ids: list[str], bad: list[str] = ()) -> str:
    """A part with two rows per image, tagged with the attempt that wrote it."""
    rows = [i for i in ids for _ in range(2)]
    table = pa.table({"image_id": pa.array(rows, pa.string()), "writer": [writer] * len(rows)})
    return write_part(out, table, ids, list(bad))


def test_deduplicate_leaves_each_image_in_one_part(root):
    out = StageOutput(root + "/features")
    a = _crop_part(out, "a", ["1", "2", "3"])
    b = _crop_part(out, "b", ["3", "4"])  # overlaps a in part: rewritten as {4}
    c = _crop_part(out, "c", ["1", "2"])  # inside a: removed
    d = _crop_part(out, "d", ["5"], bad=["x"])  # kept
    e = _crop_part(out, "e", [], bad=["x"])  # its one bad image is in d: removed
    removed, left = parts.deduplicate(out)
    assert sorted(removed) == sorted([b, c, e])
    assert (
        parts.coverage(out)
        == left
        == {a: ({"1", "2", "3"}, set()), d: ({"5"}, {"x"}), parts.part_name(["4"], []): ({"4"}, set())}
    )
    table = read_table([out.part_uri(n) for n in out.done_parts()])
    rows = sorted(zip(table.column("image_id").to_pylist(), table.column("writer").to_pylist()))
    assert rows == [(i, w) for i, w in [("1", "a"), ("2", "a"), ("3", "a"), ("4", "b"), ("5", "d")] for _ in range(2)]
    assert parts.deduplicate(out) == ([], left)  # idempotent


def test_deduplicate_after_a_crash_mid_rewrite(root):
    """A crash after a's rewrite was published but before a was removed: the rerun removes a, keeps the rewrite."""
    out = StageOutput(root + "/bank")
    a = _crop_part(out, "a", ["1", "2"])
    b = _crop_part(out, "b", ["2", "3", "4"])  # the larger: kept first, so a loses "2"
    rest = _crop_part(out, "a", ["1"])  # what the interrupted rewrite of a had published
    removed, left = parts.deduplicate(out)
    assert removed == [a]
    assert sorted(parts.coverage(out)) == sorted(left) == sorted([b, rest])
    assert parts.processed_ids(out) == ({"1", "2", "3", "4"}, set())


def test_resume_and_commit_bookkeeping_is_linear_at_100k_images():
    """pending / covered over 100k image ids in 25k part records (4 images a part, the old layout's worst case),
    half of them done. A guard against quadratic blow-up, not a speed measurement: linear bookkeeping takes ~0.1 s
    here, a per-sample set union minutes, so 10 s separates the two by far more than shared-core noise."""
    import time

    from transfgu_dist.io.datasets import Sample

    n = 100_000
    samples = [Sample(image_id=f"{i:06d}", image=f"/x/{i:06d}.jpg") for i in range(n)]
    cover = {f"part-{p}": ({f"{i:06d}" for i in range(p * 4, p * 4 + 4)}, set()) for p in range(n // 8)}
    start = time.perf_counter()
    todo = parts.pending(samples, cover)
    done, bad = parts.covered(cover)
    assert len(todo) == n // 2 and todo[0].image_id == f"{n // 2:06d}" and len(done) == n // 2 and not bad
    assert parts.pending(samples[: n // 2], cover) == []
    assert time.perf_counter() - start < 10


def test_manifest_records_parts_and_verify_names_a_damaged_one(tmp_path):
    out = StageOutput(str(tmp_path / "stage"))
    a = write_part(out, pa.table({"image_id": pa.array(["1", "1", "2"])}), ["1", "2"], ["x"])
    b = write_part(out, pa.table({"image_id": pa.array(["3"])}), ["3"], [])
    cover = parts.coverage(out)
    recs = parts.records(out, cover)
    assert recs[a] == {"images": 2, "bad": 1, "rows": 3, "bytes": (tmp_path / "stage" / a).stat().st_size}
    assert recs[b]["rows"] == 1 and recs[b]["images"] == 1
    out.commit({"part_records": recs})
    parts.verify(out)  # intact
    path = tmp_path / "stage" / b
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(StorageError, match=f"{b}.*bytes, the manifest records"):
        parts.verify(out)
    path.unlink()
    with pytest.raises(StorageError, match=f"{b}.*missing"):
        parts.verify(out)
