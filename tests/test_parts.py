"""Parquet part helpers: fixed-size-list columns in and out."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from transfgu_dist.parts import column_array, fixed_list


def test_column_array_over_chunks_slices_and_casts():
    x = np.arange(24, dtype=np.float16).reshape(6, 4)
    col = fixed_list(x, pa.float16())
    # three chunks, two of them slices with an offset into their values
    table = pa.table({"feature": pa.chunked_array([col.slice(0, 1), col.slice(1, 3), col.slice(4, 2)])})
    out = column_array(table, "feature", dtype=np.float32)
    assert out.dtype == np.float32 and np.array_equal(out, x.astype(np.float32))
    assert column_array(table, "feature", (2, 2)).shape == (6, 2, 2)
    assert column_array(table, "feature").dtype == np.float16


def test_column_array_bool_and_empty():
    mask = np.array([[True, False], [False, True]])
    table = pa.table({"fg": fixed_list(mask, pa.bool_())})
    assert np.array_equal(column_array(table, "fg"), mask) and column_array(table, "fg").dtype == bool
    empty = table.slice(0, 0)
    assert column_array(empty, "fg").shape == (0, 2)
