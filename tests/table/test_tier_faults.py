"""Store failures at precise moments of the background queue, and removals between a lookup
and its backward. The store here is the real MemoryStore with one fault injected on a
gate: real servers cannot fail on cue between two queued writes."""

from __future__ import annotations

import threading

import numpy as np
import torch

import dynembed as de
from dynembed.errors import StoreError
from dynembed.table import tiering


class GatedStore(de.storage.MemoryStore):
    """The first write after ``arm()`` waits for ``release()``, then fails once."""

    def __init__(self) -> None:
        super().__init__()
        self.background_io = True
        self._gate: threading.Event | None = None

    def arm(self) -> threading.Event:
        self._gate = threading.Event()
        return self._gate

    def _put(self, ids, values):
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.wait(10)
            raise StoreError(f"{self.name}: injected failure")
        super()._put(ids, values)


def reference(steps: int, keys=(1,)):
    ref = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.5), seed=1)
    for _ in range(steps):
        ref(torch.tensor(keys)).sum().backward()
    return ref.table.find(torch.tensor(keys)).values


def settle_queue(table) -> None:
    for pending in list(table.tier._pending):
        pending.future.exception(timeout=10)  # wait, whether it failed or not


def test_retry_of_a_failed_write_never_overwrites_a_newer_queued_copy():
    store = GatedStore()
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.5), seed=1, max_rows=4,
                              store=store)
    emb(torch.tensor([1])).sum().backward()
    gate = store.arm()
    emb.table.evict(rows=1)  # write A (row 1, one update) blocks, then fails
    emb(torch.tensor([1])).sum().backward()  # row 1 read back from the queue, updated again
    emb.table.evict(rows=1)  # write B (row 1, two updates) queued behind A
    gate.set()
    settle_queue(emb.table)  # A failed, B landed
    emb.table.flush()  # retries A without row 1, whose newer copy B wrote
    assert torch.equal(emb.table.find(torch.tensor([1])).values, reference(2))
    assert emb.table.export().counts.tolist() == [2]


def test_prefetch_behind_a_failed_write_is_not_trusted_after_the_retry():
    store = GatedStore()
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.5), seed=1, max_rows=4,
                              store=store)
    for _ in range(3):
        emb(torch.tensor([1])).sum().backward()
    gate = store.arm()
    emb.table.evict(rows=1)  # the only copy of row 1 is in the queue; its write will fail
    emb.table.prefetch(torch.tensor([1]))  # reads the store after the failed write: absent
    gate.set()
    emb.table.tier._staged.future.result(timeout=10)
    found = emb.table.find(torch.tensor([1]))  # retries the write, drops the stale prefetch
    assert found.found.all() and torch.equal(found.values, reference(3))
    emb(torch.tensor([1]))
    assert emb.table.last_call.inserts == 0 and emb.table.last_call.loaded == 1


def test_clear_between_forward_and_backward_skips_the_gradients():
    store = de.storage.MemoryStore()
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=1, max_rows=8,
                              store=store)
    out = emb(torch.tensor([1, 2, 3]))
    emb.table.clear()
    out.sum().backward()
    emb.table.flush()
    totals = emb.table.stats().totals
    assert totals.skipped_gradients == 3 and totals.updated_rows == 0
    assert emb.table.size() == 0 and store.size() == 0


def test_load_state_dict_between_forward_and_backward_keeps_the_checkpoint():
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.5), seed=1, max_rows=4,
                              store=de.storage.MemoryStore())
    emb(torch.tensor([1])).sum().backward()
    checkpoint = emb.table.state_dict()
    out = emb(torch.tensor([1]))
    emb.table.load_state_dict(checkpoint)
    out.sum().backward()  # belongs to the table before the load: skipped
    emb.table.flush()
    assert torch.equal(emb.table.find(torch.tensor([1])).values, checkpoint["weights"])
    assert emb.table.stats().totals.skipped_gradients == 1


def test_erased_and_recreated_key_does_not_get_the_old_gradient():
    for mode in ("fused", "deferred"):
        emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.5), seed=1,
                                  update_mode=mode)
        out = emb(torch.tensor([1]))
        if mode == "deferred":
            out.sum().backward()
        emb.table.erase(torch.tensor([1]))
        fresh = emb.table.find_or_insert(torch.tensor([1])).values.clone()
        if mode == "fused":
            out.sum().backward()
        else:
            emb.sparse_step()
        assert torch.equal(emb.table.find(torch.tensor([1])).values, fresh), mode
        assert emb.table.stats().totals.skipped_gradients == 1, mode


def test_the_erasure_log_is_bounded_in_ids_and_older_gradients_are_skipped(monkeypatch):
    """The log of erased ids kept 4,096 removals whatever their size: a table that discards
    2,000 rows a step held 8M ids (62 MiB) while its rows took 417 KiB. Bounded in ids
    now; the gradient of a lookup older than the log is skipped and counted, never given
    to the row that took the key's place."""
    from dynembed.table import lifecycle
    monkeypatch.setattr(lifecycle, "ERASE_LOG_IDS", 5_000)
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.5), seed=1, max_rows=1_000)
    out = emb(torch.tensor([7]))  # its backward comes after key 7 was discarded
    for step in range(1, 41):  # 40 x 1,000 new ids: 40,000 discarded
        emb(torch.arange(step * 10**6, step * 10**6 + 1000)).sum().backward()
        assert sum(ids.shape[0] for _, ids in emb.table._erase_log) <= 5_000 + 1000
    assert not emb.table.contains(torch.tensor([7])).any()
    fresh = emb.table.find_or_insert(torch.tensor([7])).values.clone()
    skipped = emb.table.stats().totals.skipped_gradients
    out.sum().backward()
    assert torch.equal(emb.table.find(torch.tensor([7])).values, fresh)
    assert emb.table.stats().totals.skipped_gradients == skipped + 1


def test_evicted_row_gets_its_gradient_in_both_modes():
    for mode in ("fused", "deferred"):
        emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.5), seed=1,
                                  update_mode=mode, eviction=de.policy.LRU(),
                                  store=de.storage.MemoryStore())
        emb(torch.tensor([2])).sum().backward()
        out = emb(torch.tensor([1]))
        emb.table.evict(rows=2)  # both rows leave memory before the update
        out.sum().backward()
        emb.sparse_step()
        assert torch.equal(emb.table.find(torch.tensor([1])).values, reference(1)), mode
        assert emb.table.stats().totals.skipped_gradients == 0, mode


def test_a_failing_sweep_leaves_the_lookup_undone():
    class Failing(de.storage.MemoryStore):
        fail = False

        def _delete(self, ids):  # a sweep removes expired rows from the store
            if self.fail:
                raise StoreError(f"{self.name}: injected failure")
            super()._delete(ids)

    store = Failing()
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.5), seed=1, store=store,
                              eviction=de.policy.TTL(steps=1), evict_every=1)
    emb(torch.tensor([1])).sum().backward()
    emb(torch.tensor([2])).sum().backward()
    before = (emb.table.step, emb.table.size(), sorted(emb.table.export().counts.tolist()))
    store.fail = True
    try:
        emb(torch.tensor([3, 2]))
    except StoreError:
        pass
    else:
        raise AssertionError("the sweep's write should have failed")
    store.fail = False
    after = (emb.table.step, emb.table.size(), sorted(emb.table.export().counts.tolist()))
    assert after == before
    emb(torch.tensor([3, 2])).sum().backward()  # the retried lookup counts once
    assert sorted(emb.table.export().counts.tolist()) == [1, 2]
    # 1 expired (two steps old): removed from the store too
    assert np.array_equal(emb.table.contains([1, 2, 3]).numpy(), [False, True, True])


def test_reads_from_two_threads_while_queued_writes_land_see_every_row(monkeypatch):
    """Reads may run from many threads at once (eval, serving), and each settles the write
    queue: a reader walked the queue while another popped the writes that had landed
    ("deque mutated during iteration"; "pop from an empty deque" when both popped)."""
    store = de.storage.MemoryStore()
    store.background_io = True
    gate = threading.Event()
    store._put = lambda ids, values, put=store._put: (gate.wait(10), put(ids, values))
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.5), seed=1, max_rows=8,
                              store=store)
    emb(torch.arange(8)).sum().backward()
    table = emb.table
    table.evict(rows=4)  # two writes queued, held by the gate
    table.evict(rows=4)
    assert len(table.tier._pending) == 2 and table.size() == 0
    expected = reference(1, keys=tuple(range(8)))
    reader_a = threading.get_ident()
    walked, other_done = threading.Event(), threading.Event()
    positions = tiering._positions

    def interleave(*args, **kwargs):
        # reader A, inside its walk of the queue: the writes land and reader B runs
        if threading.get_ident() == reader_a and not walked.is_set():
            walked.set()
            gate.set()
            for pending in list(table.tier._pending):
                pending.future.result(timeout=10)
            other = threading.Thread(target=lambda: (table.find(torch.arange(8)),
                                                     other_done.set()))
            other.start()
            other.join(10)
        return positions(*args, **kwargs)

    monkeypatch.setattr(tiering, "_positions", interleave)
    got = table.find(torch.arange(8))
    assert walked.is_set() and other_done.is_set()
    assert got.found.all() and torch.equal(got.values, expected)
