"""Counters agree with what happened: gradients dropped, rows written, reads counted, and
the totals survive a checkpoint."""

from __future__ import annotations

import sys
import threading

import numpy as np
import torch

import dynembed as de
from dynembed.storage import MemoryStore


def test_deferred_gradients_dropped_by_clear_count_as_skipped():
    """Queued gradients of rows a clear removed once vanished uncounted (fused mode, and
    deferred mode cleared before backward, counted them)."""
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), update_mode="deferred")
    emb(torch.tensor([1, 2, 3])).sum().backward()
    emb.table.clear()
    emb.table.step_optimizer()
    totals = emb.stats().totals
    assert totals.skipped_gradients == 3 and totals.updated_rows == 0


def test_flush_counts_the_rows_it_moves_from_a_lazy_checkpoint(tmp_path):
    source = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1))
    source(torch.arange(10)).sum().backward()
    de.checkpoint.save(tmp_path / "c", source)
    store = MemoryStore()
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), store=store)
    de.checkpoint.load(tmp_path / "c", emb, lazy=True)
    assert emb.table.flush() == 10 == store.size()  # once 0
    assert emb.stats().totals.store_writes == 10


def test_sampled_softmax_in_eval_counts_its_label_reads():
    out = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1)
    out.table.insert_or_assign(torch.tensor([5]), torch.ones(1, 4))
    out.eval()
    de.sampled_softmax_loss(out, torch.zeros(2, 4), torch.tensor([5, 99]), num_sampled=2)
    call = out.table.last_call
    assert (call.keys, call.hits, call.defaults_served) == (2, 1, 1)  # once nothing
    assert out.stats().totals.defaults_served == 1


def test_counters_survive_a_checkpoint(tmp_path):
    """The aux state never held the counters, though load documented restoring them: every
    resume reset the totals."""
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1)
    emb(torch.tensor([1, 2, 2, 3])).sum().backward()
    emb.eval()
    emb(torch.tensor([7]))
    before = emb.stats().totals
    de.checkpoint.save(tmp_path / "c", emb)
    restored = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1)
    de.checkpoint.load(tmp_path / "c", restored)
    assert restored.stats().totals == before
    assert before.keys == 5 and before.defaults_served == 1 and before.updated_rows == 3


def test_find_and_find_or_insert_are_counted_lookup_calls():
    """Rows created by find_or_insert once counted nowhere: totals.inserts stayed 0 while
    the table held them."""
    table = de.DynamicTable(de.TableConfig(dim=4, eviction=de.policy.LRU(),
                                           store=MemoryStore()))
    table.find_or_insert(torch.tensor([1, 2, 2, 3]))
    call = table.last_call
    assert (call.keys, call.hits, call.misses, call.inserts) == (4, 0, 4, 3)
    assert table.evict(3) == 3  # all to the store
    table.find_or_insert(torch.tensor([1, 3, 4]))
    call = table.last_call
    assert (call.keys, call.hits, call.misses, call.inserts, call.loaded) == (3, 0, 3, 1, 2)
    found = table.find(torch.tensor([4, 5, 5]))
    assert found.found.tolist() == [True, False, False]
    call = table.last_call
    assert (call.keys, call.hits, call.defaults_served) == (3, 1, 2)
    totals = table.stats().totals
    assert (totals.lookup_calls, totals.inserts, totals.keys) == (3, 4, 10)
    assert table.size() == 3 and table.count_below_memory() == 1


def test_table_counters_count_every_key_looked_up_from_many_threads():
    """Counters.add_call read and wrote each field unlocked: lookups from a server's worker
    threads lost counts, and hits + misses could differ from the keys."""
    table = de.DynamicTable(de.TableConfig(dim=4))
    table.insert_or_assign(np.arange(1000), np.ones((1000, 4), np.float32))
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        def read():
            for k in range(300):
                table.read(np.arange(k % 7 * 200, k % 7 * 200 + 50))
        threads = [threading.Thread(target=read) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        sys.setswitchinterval(previous)
    totals = table.stats().totals
    assert (totals.keys, totals.lookup_calls) == (8 * 300 * 50, 8 * 300)
    assert totals.hits + totals.misses == totals.keys
