"""Saves and loads stream: extra memory is a few chunks (plus 8 bytes per row for the sort
order of a save), never a second copy of the table."""

from __future__ import annotations

import tracemalloc

import numpy as np
import torch

import dynembed as de

from .helpers import assert_same_rows, make_table

ROWS, CHUNK = 200_000, 2048


def peak_extra(fn) -> int:
    """Peak bytes allocated (numpy and Python, every thread) while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_save_and_load_hold_a_few_chunks_not_a_second_table(tmp_path):
    table = make_table(dim=16)
    table.insert_or_assign(np.arange(ROWS) * 7919, torch.randn(ROWS, 16))
    table_bytes = ROWS * table.arena.bytes_per_row()
    record_bytes = 4 * (4 + 16 + 16) + 8  # a packed row and its id
    chunks = 8 * CHUNK * record_bytes  # chunks being packed, checked, written, read ahead

    saved = peak_extra(lambda: de.checkpoint.save(tmp_path / "c", tables={"t": table},
                                                  chunk_rows=CHUNK))
    assert saved < 8 * ROWS + chunks + (1 << 20), saved
    assert saved < table_bytes / 4

    restored = make_table(dim=16)
    restored.reserve(ROWS)  # the table's own memory is not extra
    loaded = peak_extra(lambda: de.checkpoint.load(tmp_path / "c", tables={"t": restored},
                                                   chunk_rows=CHUNK))
    assert loaded < chunks + (1 << 20), loaded
    assert_same_rows(table, restored)
