"""take_rows: the compiled row gather against torch's indexing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynembed.kernels._streaming import STREAM_FROM_BYTES, can_stream
from dynembed.kernels._threads import get_num_threads, set_num_threads
from dynembed.table.arena import take_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32,
                                   torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 300, 70_000])  # serial and threaded kernels
def test_take_rows_matches_indexing(dtype, n):
    rng = np.random.default_rng(n)
    source = torch.from_numpy(rng.standard_normal((1_000, 24)) * 100).to(dtype)
    index = rng.integers(0, 1_000, size=n)
    index[:3] = [0, 999, 0][:n]
    got = take_rows(source, index)
    assert got.dtype == dtype and got.shape == (n, 24)
    assert torch.equal(got, source[torch.from_numpy(index)])
    if n:  # a copy, never a view of the source
        kept = source.clone()
        got.fill_(0)
        assert torch.equal(source, kept)


@pytest.mark.parametrize("n", [500, 70_000])  # serial and threaded kernels
@pytest.mark.parametrize("bad", [-1, 1_000, 2**40])
def test_take_rows_rejects_out_of_range_indices(bad, n):
    source = torch.arange(12_000, dtype=torch.float32).reshape(1_000, 12)
    before = source.clone()
    index = np.arange(n, dtype=np.int64) % 1_000
    index[[123, n - 1]] = bad
    with pytest.raises(IndexError, match=rf"2 of {n} indices outside \[0, 1000\)"):
        take_rows(source, index)
    assert torch.equal(source, before)


def test_take_rows_of_a_non_contiguous_source_and_index():
    source = torch.arange(4_000, dtype=torch.float32).reshape(200, 20)[:, ::2]
    index = np.arange(400, dtype=np.int64)[::2] % 200
    assert torch.equal(take_rows(source, index), source[torch.from_numpy(index)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.int64])
@pytest.mark.parametrize("dim", [8, 64])
def test_take_rows_streams_large_outputs_correctly(dtype, dim):
    """Outputs of at least STREAM_FROM_BYTES are written with streaming stores; the rows
    must still be exact, on one thread and on several."""
    rng = np.random.default_rng(dim)
    source = torch.from_numpy(rng.standard_normal((3_000, dim)) * 1e6).to(dtype)
    n = STREAM_FROM_BYTES // (dim * source.element_size()) + 5
    index = rng.integers(0, 3_000, size=n)
    assert can_stream(torch.empty(n, dim, dtype=dtype).numpy(), source.numpy())
    expected = source[torch.from_numpy(index)]
    assert torch.equal(take_rows(source, index), expected)
    previous = get_num_threads()
    set_num_threads(1)
    try:
        assert torch.equal(take_rows(source, index), expected)
    finally:
        set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # compiled and torch paths
def test_take_rows_takes_any_integer_index_on_every_path(dtype):
    """torch's path (dtypes the gather does not handle, other devices) refused a reversed
    index (negative strides) and a uint64 one, which the compiled gather takes."""
    source = torch.arange(40, dtype=torch.float32).reshape(20, 2).to(dtype)
    reversed_index = np.arange(12, dtype=np.int64)[::-3]
    assert torch.equal(take_rows(source, reversed_index),
                       source[torch.from_numpy(reversed_index.copy())])
    narrow = np.array([3, 0, 19], dtype=np.uint64)
    assert torch.equal(take_rows(source, narrow), source[[3, 0, 19]])
    with pytest.raises(IndexError):
        take_rows(source, np.array([2**63], dtype=np.uint64))  # wraps to a negative index
