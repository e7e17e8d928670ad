"""Arrow list<float32> columns <-> numpy matrices, without a Python object per value."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def to_list_array(matrix: np.ndarray) -> pa.ListArray:
    """Rows of a 2-D array as an Arrow list<float32> array (one list per row)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    rows, dim = matrix.shape if matrix.ndim == 2 else (0, 0)
    offsets = pa.array(np.arange(0, rows * dim + 1, max(dim, 1), dtype=np.int32)[: rows + 1])
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)), type=pa.list_(pa.float32()))


def to_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow list column whose lists all have the same length, as a 2-D numpy array (rows x length)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return column.flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
