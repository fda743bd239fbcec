"""The flat row buffers a routed lookup exchanges: rows of several tables back to back."""

from __future__ import annotations

import numpy as np
import pytest

from dynembed.distributed.router import _Packing


@pytest.mark.parametrize("widths", [[4, 4, 4, 4, 4], [4, 2, 4, 3, 2, 4], [3]])
def test_rows_go_where_the_offsets_say(widths):
    """One width (rows by index) and mixed widths (every float's position) both put each
    entry's row at its offset and read it back from there."""
    widths = np.array(widths, dtype=np.int64)
    packing = _Packing(widths)
    starts = np.concatenate([[0], np.cumsum(widths)])
    assert packing.size == starts[-1]
    rng = np.random.default_rng(0)
    buf = np.zeros(packing.size, dtype=np.float32)
    for dim in np.unique(widths):
        entries = np.flatnonzero(widths == dim)[::-1]  # any order
        rows = rng.standard_normal((entries.shape[0], dim)).astype(np.float32)
        packing.put(buf, entries, rows)
        for k, row in zip(entries, rows):
            assert np.array_equal(buf[starts[k]:starts[k] + dim], row)
        assert np.array_equal(packing.take(buf, entries, int(dim)), rows)


@pytest.mark.parametrize("widths", [[4, 4, 4], [], [3, 5]])
def test_a_table_of_another_width_with_no_entries_gets_none(widths):
    """Tables of two dims where one has no entries here: the buffer holds one width, and
    the other table's (empty) request once reshaped the whole buffer by its dim."""
    packing = _Packing(np.array(widths, dtype=np.int64))
    buf = np.arange(packing.size, dtype=np.float32)
    none = np.empty(0, dtype=np.int64)
    assert packing.take(buf, none, 7).shape == (0, 7)
    packing.put(buf, none, np.empty((0, 7), dtype=np.float32))
    assert np.array_equal(buf, np.arange(packing.size, dtype=np.float32))
