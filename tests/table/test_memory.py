"""Host buffers for arenas and indexes: small ones plain, large ones huge-page mapped."""

from __future__ import annotations

import mmap

import numpy as np
import torch

from dynembed.table._memory import _HUGE_FROM_BYTES, host_empty


def test_small_and_large_buffers_are_writable_arrays_of_the_asked_shape():
    for rows in (10, _HUGE_FROM_BYTES // (8 * 8) + 1):
        a = host_empty((rows, 8), np.float64)
        assert a.shape == (rows, 8) and a.dtype == np.float64 and a.flags.c_contiguous
        a[:] = 1.5
        a[-1, -1] = 7.0
        t = torch.from_numpy(a)
        assert t[-1, -1].item() == 7.0 and float(t.sum()) == 1.5 * (a.size - 1) + 7.0


def test_large_buffer_is_a_private_mapping_that_outlives_its_creator():
    a = host_empty((_HUGE_FROM_BYTES // 4,), np.float32)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        owner = a
        while isinstance(owner, np.ndarray):
            owner = owner.base
        assert isinstance(owner, memoryview) and isinstance(owner.obj, mmap.mmap)
    t = torch.from_numpy(a)
    del a
    t.fill_(2.0)  # the tensor keeps the mapping alive
    assert float(t[::1 << 20].sum()) == 2.0 * t[::1 << 20].numel()
