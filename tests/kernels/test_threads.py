"""Kernel threading: results do not depend on the thread count; bad settings are refused."""

from __future__ import annotations

import numba
import pytest
import torch

import dynembed as de


def _train(threads: int) -> torch.Tensor:
    previous = de.get_num_threads()
    de.set_num_threads(threads)
    try:
        emb = de.DynamicEmbedding(dim=16, optimizer=de.optim.Adagrad(lr=0.1), seed=3)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):  # batches large enough to take the parallel path
            keys = torch.randint(0, 50_000, (40_000,), generator=g)
            (emb(keys) ** 2).sum().backward()
        return emb.table.find(torch.arange(50_000)).values
    finally:
        de.set_num_threads(previous)


def test_same_weights_with_one_or_all_threads():
    assert torch.equal(_train(1), _train(numba.config.NUMBA_NUM_THREADS))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, numba.config.NUMBA_NUM_THREADS + 1])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="threads"):
        de.set_num_threads(bad)
