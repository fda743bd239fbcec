"""Kernel threading: results do not depend on the thread count; bad settings are refused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
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


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, np.bool_(True), np.float64(1.0),
                                 numba.config.NUMBA_NUM_THREADS + 1,
                                 np.int64(numba.config.NUMBA_NUM_THREADS + 1)])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="threads"):
        de.set_num_threads(bad)


@pytest.mark.parametrize("kind", [np.int64, np.int32, np.uint8])
def test_numpy_integer_thread_counts_are_taken(kind):
    """Like every config check, numpy integers count as ints (they were refused)."""
    previous = de.get_num_threads()
    try:
        de.set_num_threads(kind(1))
        assert de.get_num_threads() == 1 and type(de.get_num_threads()) is int
        assert numba.get_num_threads() == 1
    finally:
        de.set_num_threads(previous)


def test_threads_sharing_a_table_survive_numba_workqueue_layer():
    """Where neither OpenMP nor TBB loads, numba falls back to its workqueue layer, which
    aborted the process (SIGABRT) when two threads ran parallel kernels at once: a model
    server with two workers did."""
    script = textwrap.dedent("""
        import threading
        import numba, numpy as np
        import dynembed as de
        table = de.DynamicTable(de.TableConfig(dim=16))
        table.insert_or_assign(np.arange(100_000), np.ones((100_000, 16), np.float32))
        def read():
            for _ in range(100):
                assert table.read(np.arange(40_000)).shape == (40_000, 16)
        threads = [threading.Thread(target=read) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(numba.threading_layer())
    """)
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, check=False,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "workqueue"


class _LookupsInWorker(torch.utils.data.Dataset):
    """Each item: an eval read of a trained table, and a training step on a fresh one."""

    def __init__(self, trained: de.DynamicEmbedding):
        self.trained = trained

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        return _read_and_train(self.trained)


def _read_and_train(trained: de.DynamicEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
    keys = np.arange(40_000)  # large enough for the parallel path
    trained.eval()
    read = trained(keys)
    fresh = de.DynamicEmbedding(dim=8, optimizer=de.optim.Adagrad(lr=0.1), seed=5)
    (fresh(keys) ** 2).sum().backward()
    return read, fresh.table.find(keys).values


def test_kernels_run_in_a_worker_forked_after_the_thread_pool_started():
    """A DataLoader worker forked after numba's OpenMP pool had started was killed by
    SIGTERM ("fork() called from a process already using GNU OpenMP") at its first large
    lookup; it now runs the kernels as serial copies, with the same results."""
    trained = de.DynamicEmbedding(dim=8, optimizer=de.optim.SGD(lr=0.1), seed=4)
    (trained(torch.arange(60_000)) ** 2).sum().backward()  # starts the pool here
    numba.threading_layer()  # raises if it has not
    loader = torch.utils.data.DataLoader(_LookupsInWorker(trained), batch_size=None,
                                         num_workers=1, multiprocessing_context="fork",
                                         timeout=300)
    (read, stepped), = list(loader)
    want_read, want_stepped = _read_and_train(trained)
    assert torch.equal(read, want_read) and torch.equal(stepped, want_stepped)
    assert not torch.equal(stepped[:1], torch.zeros_like(stepped[:1]))
