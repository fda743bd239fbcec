"""Gradients into rows when the store fails: nothing is lost without being counted.

The store is the real MemoryStore with one failure injected, since a real server cannot
fail on cue between a lookup and its backward.
"""

from __future__ import annotations

import pytest
import torch

import dynembed as de
from dynembed.errors import StoreError


class FlakyStore(de.storage.MemoryStore):
    """A MemoryStore whose next read or write after ``fail_next`` raises, once."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: str | None = None

    def fail_next(self, verb: str) -> None:
        self.failing = verb

    def _fail(self, verb: str) -> None:
        if self.failing == verb:
            self.failing = None
            raise StoreError(f"{self.name}: injected {verb} failure")

    def _get(self, ids):
        self._fail("get")
        return super()._get(ids)

    def _put(self, ids, values):
        self._fail("put")
        return super()._put(ids, values)


def _sgd(**options) -> de.DynamicEmbedding:
    return de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.5), seed=1, **options)


def test_fused_gradients_of_rows_that_cannot_be_read_back_are_counted_as_skipped():
    """The rows were evicted between lookup and backward and the store read failed: the
    gradients were dropped without being counted."""
    store = FlakyStore()
    emb = _sgd(eviction=de.policy.LRU(), store=store)
    out = emb(torch.tensor([1, 2, 3]))
    emb.table.evict(rows=3)
    store.fail_next("get")
    with pytest.raises(StoreError, match="injected get failure"):
        out.sum().backward()
    totals = emb.stats().totals
    assert totals.updated_rows == 0
    assert totals.skipped_gradients == 3


def test_a_failed_write_through_in_a_chunked_deferred_step_applies_every_chunk():
    """The first chunk's write-through failed after its rows changed; the later chunks'
    gradients were dropped, neither applied nor counted."""
    store = FlakyStore()
    # max_rows=10 updates 6 keys in chunks of 5; all 6 stay in memory, so the only writes
    # of the step are the write-throughs
    emb = _sgd(store=store, write_policy="through", max_rows=10, update_mode="deferred")
    ref = _sgd(update_mode="deferred")
    keys = torch.arange(6)
    for model in (emb, ref):
        model(keys[:4]).sum().backward()
        model(keys[2:]).sum().backward()
    ref.sparse_step()
    store.fail_next("put")
    with pytest.raises(StoreError, match="do not apply the change again"):
        emb.sparse_step()
    assert not emb.table.has_pending_gradients
    totals = emb.stats().totals
    assert totals.updated_rows == 6 and totals.skipped_gradients == 0
    assert torch.equal(emb.table.find(keys).values, ref.table.find(keys).values)
    assert emb.table.flush() > 0  # the rows of the failed write were kept marked
    found, rows = store.get(keys.numpy())
    assert found.all()
    assert torch.equal(torch.from_numpy(rows.weights), ref.table.find(keys).values)


@pytest.mark.parametrize("shape", [(2, 4), (3, 2), (5, 4), (3,)])
def test_gradients_of_another_shape_are_refused_before_any_row_changes(shape):
    """A short or narrow gradient was accepted: the kernels read past its end, wrote those
    bytes into rows, and skipped_gradients went negative."""
    table = de.DynamicTable(de.TableConfig(dim=4, optimizer=de.optim.SGD(lr=1.0), seed=1))
    ids = torch.arange(3).numpy()
    table.find_or_insert(ids)
    slots = table.index.find(ids)
    before = table.find(ids).values.clone()
    with pytest.raises(ValueError, match=r"grads must have shape \(3, 4\)"):
        table.apply_gradients(ids, slots, torch.ones(shape), erasures_at_lookup=table.erasures)
    assert torch.equal(table.find(ids).values, before)
    assert table.stats().totals.skipped_gradients == 0


def test_ids_and_slots_that_do_not_match_are_refused():
    table = de.DynamicTable(de.TableConfig(dim=2, optimizer=de.optim.SGD(lr=1.0), seed=1))
    ids = torch.arange(3).numpy()
    slots = table.lookup_slots(ids, torch.ones(3, dtype=torch.int64).numpy(), insert=True)
    with pytest.raises(ValueError, match="slots must have one entry per id"):
        table.apply_gradients(ids, slots[:2], torch.ones(3, 2))
    with pytest.raises(TypeError, match="ids must be a \\(u,\\) int64 numpy array"):
        table.apply_gradients(ids.astype("int32"), slots, torch.ones(3, 2))
