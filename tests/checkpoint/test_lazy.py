"""Lazy restore: lookups answered at once, rows faulted in on first use, hidden when erased."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

import dynembed as de
from dynembed.checkpoint.lazy import DEFAULT_CHUNK_ROWS
from dynembed.checkpoint.rows_file import RowsFile

from .helpers import assert_same_rows, batches, make_table, rows_by_id, train


@pytest.fixture
def saved(tmp_path):
    table = make_table()
    train(table, batches(30, 20_000, size=2000))
    de.checkpoint.save(tmp_path / "c", tables={"t": table})
    return tmp_path / "c", table


def test_lookups_fault_in_only_the_rows_they_use(saved):
    path, table = saved
    lazy = make_table()
    de.checkpoint.load(path, tables={"t": lazy}, lazy=True)
    ids = table.export().ids.numpy()[:50]
    np.testing.assert_array_equal(lazy.find(ids).values, table.find(ids).values)
    assert len(lazy) == 0  # reads do not enter memory
    train(lazy, [ids])
    assert len(lazy) == 50
    files = lazy.base.files
    checked = sum(int(f._verified["records"].sum()) for f in files)
    total = sum(f._verified["records"].shape[0] for f in files)
    assert checked < total / 4  # only the blocks of those rows were read and checked


def test_a_lazily_restored_table_trains_like_an_eager_one(saved):
    path, _ = saved
    eager, lazy = make_table(), make_table()
    de.checkpoint.load(path, tables={"t": eager})
    de.checkpoint.load(path, tables={"t": lazy}, lazy=True)
    more = batches(10, 25_000, size=1000, seed=5)
    train(eager, more)
    train(lazy, more)
    assert_same_rows(eager, lazy)


def test_clear_counts_every_row_once_including_those_not_read_yet(saved):
    path, table = saved
    lazy = make_table()
    de.checkpoint.load(path, tables={"t": lazy}, lazy=True)
    ids = table.export().ids.numpy()
    train(lazy, [ids[:300]])  # 300 rows in memory, the rest only in the checkpoint
    lazy.erase(ids[300:310])  # hidden: gone already, counted then
    before = lazy.counters.erased
    assert before == 10
    lazy.clear()
    assert lazy.counters.erased - before == len(table) - 10
    assert len(lazy) == 0 and not lazy.contains(ids).any()


def test_clear_of_a_tiered_lazy_table_counts_rows_in_store_and_checkpoint_once(saved):
    path, table = saved
    tiered = make_table(store=de.storage.MemoryStore(), max_rows=100)
    de.checkpoint.load(path, tables={"t": tiered}, lazy=True)
    ids = table.export().ids.numpy()
    train(tiered, [ids[i:i + 50] for i in range(0, 300, 50)])  # 200 of them evicted to the store
    train(tiered, [np.arange(10**12, 10**12 + 50)])  # 50 new ids: 50 more go to the store
    assert tiered.tier.store.size() >= 200
    tiered.clear()
    assert tiered.counters.erased == len(table) + 50  # each row once, wherever it was
    assert tiered.tier.store.size() == 0 and not tiered.contains(ids).any()


def test_erased_and_discarded_rows_do_not_come_back_from_the_checkpoint(saved):
    path, table = saved
    lazy = make_table(max_rows=500, eviction=de.policy.LRU())
    de.checkpoint.load(path, tables={"t": lazy}, lazy=True)
    ids = table.export().ids.numpy()
    assert lazy.erase(ids[:10]) == 10  # rows only in the checkpoint count as removed
    assert not lazy.contains(ids[:10]).any()
    train(lazy, [ids[10:410], ids[410:810]])  # the budget discards the first 400
    assert lazy.counters.discarded > 0
    gone = ids[10:410][~lazy.contains(ids[10:410]).numpy()]
    assert gone.shape[0] > 0
    assert not lazy.find(gone).found.any()
    assert lazy.contains(ids[1000:1100]).all()  # untouched rows still answer


def test_background_load_brings_every_row_over_lookups(saved):
    path, table = saved
    lazy = make_table()
    de.checkpoint.load(path, tables={"t": lazy}, lazy=True, background_rows=4000)
    lookups = 0
    while lazy.base is not None and lookups < 1000:
        train(lazy, [np.array([lookups])])
        lookups += 1
    assert lazy.base is None  # everything is in memory and the files are let go
    assert lookups <= len(table) // 4000 + 2
    reference = rows_by_id(table)
    now = rows_by_id(lazy)
    keep = np.isin(now["ids"], reference["ids"])
    np.testing.assert_array_equal(now["ids"][keep], reference["ids"])


def test_load_step_loads_everything_in_bounded_steps(saved):
    path, table = saved
    lazy = make_table()
    de.checkpoint.load(path, tables={"t": lazy}, lazy=True)
    steps = 0
    while not de.checkpoint.load_step(lazy, rows=1000):
        steps += 1
        assert len(lazy) <= 1000 * steps
    assert len(lazy) == len(table)
    assert_same_rows(table, lazy)


def test_damaged_rows_raise_when_a_lookup_reads_them(saved, tmp_path):
    path, _ = saved
    rows_file = next(path.glob("tables/t/*.rows"))
    layout = RowsFile(str(rows_file)).layout
    data = bytearray(rows_file.read_bytes())
    data[layout.offsets["records"][0] + 100] ^= 0xFF
    rows_file.write_bytes(bytes(data))
    lazy = make_table()
    de.checkpoint.load(path, tables={"t": lazy}, lazy=True)  # opening reads no rows
    first = RowsFile(str(rows_file)).ids[:1]
    with pytest.raises(de.CheckpointCorruptError, match="records: block 0"):
        lazy.find(first)
    with pytest.raises(de.CheckpointCorruptError, match="records"):
        de.checkpoint.load(path, tables={"t": make_table()})  # an eager load reads all


def test_flush_moves_the_unread_checkpoint_rows_into_the_store(saved, tmp_path):
    from dynembed.storage import RocksDBStore

    path, table = saved
    tiered = make_table(store=RocksDBStore(str(tmp_path / "store")), max_rows=100)
    de.checkpoint.load(path, tables={"t": tiered}, lazy=True)
    train(tiered, batches(2, 20_000, size=50, seed=3))
    tiered.flush()  # the store alone now holds the whole table
    assert tiered.base is None
    assert tiered.tier.store.size() == len(tiered.export().ids)
    assert tiered.tier.store.size() >= len(table)
    tiered.close()


def test_keys_erased_during_a_background_load_never_come_back(saved):
    path, table = saved
    lazy = make_table()
    de.checkpoint.load(path, tables={"t": lazy}, lazy=True, background_rows=500)
    ids = table.export().ids.numpy()
    train(lazy, [np.array([10**12])])  # the background load starts: a chunk is read
    lazy.erase(ids)  # every checkpoint key, most of them still in the read chunk
    while lazy.base is not None:
        train(lazy, [np.array([10**12])])
    assert not lazy.contains(ids).any()
    assert len(lazy) == 1


def test_a_failing_store_during_a_load_loses_no_row(saved, tmp_path):
    path, table = saved

    class Failing(de.storage.MemoryStore):
        fail = True

        def _put(self, ids, values):
            if Failing.fail:
                raise de.StoreUnavailableError("store down (test)")
            return super()._put(ids, values)

    lazy = make_table(store=Failing(), max_rows=100)
    de.checkpoint.load(path, tables={"t": lazy}, lazy=True)
    with pytest.raises(de.StoreUnavailableError):
        de.checkpoint.load_step(lazy)
    Failing.fail = False
    assert de.checkpoint.load_step(lazy)  # the retry loads everything
    assert lazy.tier.store.size() == len(table)
    assert_same_rows(table, lazy)


def test_a_damaged_block_met_by_a_background_load_keeps_raising(saved):
    path, _ = saved
    rows_file = next(path.glob("tables/t/*.rows"))
    layout = RowsFile(str(rows_file)).layout
    data = bytearray(rows_file.read_bytes())
    data[layout.offsets["records"][0] + layout.offsets["records"][1] - 10] ^= 0x01
    rows_file.write_bytes(bytes(data))
    lazy = make_table()
    de.checkpoint.load(path, tables={"t": lazy}, lazy=True)
    for _ in range(2):  # never mistaken for the end of the rows
        with pytest.raises(de.CheckpointCorruptError, match="records"):
            de.checkpoint.load_step(lazy)
        assert lazy.base is not None


def test_without_a_store_rows_evicted_unchanged_stay_in_the_checkpoint(saved):
    path, table = saved
    lazy = make_table(max_rows=1000, eviction=de.policy.LRU())
    de.checkpoint.load(path, tables={"t": lazy}, lazy=True, background_rows=3000)
    for step in range(20):
        train(lazy, [np.arange(step * 300, step * 300 + 300) + 10**12])  # new keys
    assert lazy.counters.discarded > 0  # new keys were discarded...
    ids = table.export().ids.numpy()
    assert lazy.contains(ids).all()  # ...but no checkpoint row was lost
    np.testing.assert_array_equal(lazy.find(ids).values, table.find(ids).values)


def test_rows_dropped_behind_a_background_load_are_kept_after_it_ends(tmp_path):
    """Rows the background load had brought in, then evicted unchanged (dropped: the
    checkpoint holds them), were lost when the load ended and let the checkpoint go; they
    counted as evicted, and the next delta disagreed with the table."""
    import torch

    def table():
        return make_table(max_rows=10, eviction=de.policy.LRU())

    source = table()
    source.insert_or_assign(np.arange(10), torch.ones(10, source.dim))
    de.checkpoint.save(tmp_path / "c0", tables={"t": source})
    lazy = table()
    de.checkpoint.load(tmp_path / "c0", tables={"t": lazy}, lazy=True, background_rows=4)
    train(lazy, [np.array([100])])  # the background load brings 4 rows in
    assert lazy.evict(4) == 4  # dropped from memory: the checkpoint holds them
    for key in (101, 102, 103):  # the load goes on to the end
        train(lazy, [np.array([key])])
    kept = np.arange(10)
    assert lazy.contains(kept).all()
    np.testing.assert_array_equal(lazy.find(kept).values, source.find(kept).values)
    de.checkpoint.save(tmp_path / "c1", tables={"t": lazy}, parent=tmp_path / "c0")
    restored = table()
    de.checkpoint.load(tmp_path / "c1", tables={"t": restored}, lazy=True)
    assert_same_rows(lazy, restored)


def test_rows_changed_then_saved_are_not_read_back_stale_after_eviction(tmp_path):
    """A save clears the changed marks, but the lazily opened checkpoint keeps the old
    copies: a changed (or new) row evicted after a delta save was once read back with its
    pre-delta value (or vanished uncounted), and later checkpoints disagreed with the table."""
    import torch

    def table():
        return make_table(max_rows=100, eviction=de.policy.LRU())

    original = table()
    original.insert_or_assign(np.arange(50), torch.zeros(50, original.dim))
    de.checkpoint.save(tmp_path / "c0", tables={"t": original})
    lazy = table()
    de.checkpoint.load(tmp_path / "c0", tables={"t": lazy}, lazy=True)
    lazy.insert_or_assign(np.array([7, 99]), torch.full((2, lazy.dim), 5.0))
    lazy.find_or_insert(np.array([3]))  # read back unchanged: may fall back on the checkpoint
    de.checkpoint.save(tmp_path / "c1", tables={"t": lazy}, parent=tmp_path / "c0")
    discarded = lazy.counters.discarded
    lazy.evict(len(lazy))
    assert lazy.counters.discarded - discarded == 2  # 7 and 99: gone, and counted
    assert not lazy.contains([7, 99]).any()
    assert lazy.contains([3]).all()  # unchanged: still in the checkpoint
    de.checkpoint.save(tmp_path / "c2", tables={"t": lazy}, parent=tmp_path / "c1")
    restored = table()
    de.checkpoint.load(tmp_path / "c2", tables={"t": restored})
    assert_same_rows(lazy, restored)  # the live table and its checkpoint agree


def test_a_long_job_over_a_lazy_checkpoint_remembers_only_the_checkpoints_ids(tmp_path,
                                                                              monkeypatch):
    """The ids a lazily restored table dropped (erased, discarded) or changed and saved were
    all remembered while the checkpoint stayed open, for its whole life: a job that kept
    discarding new rows grew those sets without bound. Only the checkpoint's own ids need
    remembering; the rest still never come back and are still counted as discarded."""
    from dynembed.checkpoint import lazy as lazy_rows
    monkeypatch.setattr(lazy_rows, "TRIM_FLOOR", 256)  # the sets trim past 256 ids

    def table():
        return make_table(max_rows=300, eviction=de.policy.LRU())

    original = table()
    train(original, [np.arange(200)])
    de.checkpoint.save(tmp_path / "c0", tables={"t": original})
    lazy = table()
    de.checkpoint.load(tmp_path / "c0", tables={"t": lazy}, lazy=True)
    train(lazy, [np.arange(50)])  # 50 of the checkpoint's rows change
    parent = tmp_path / "c0"
    for i in range(1, 6):  # 5,000 new rows, saved and discarded along the way
        train(lazy, np.split(np.arange(10**9 * i, 10**9 * i + 1000), 5))
        if i == 5:
            lazy.erase(np.arange(10**6, 10**6 + 4000))  # never there
            lazy.erase(np.arange(190, 200))
        de.checkpoint.save(tmp_path / f"c{i}", tables={"t": lazy}, parent=parent)
        parent = tmp_path / f"c{i}"
    assert lazy.counters.discarded >= 4000
    assert lazy.base._hidden.size <= 2 * 200 and lazy.base._outdated.size <= 2 * 200
    assert not lazy.contains(np.arange(10**9, 10**9 + 1000)).any()  # discarded for good
    assert not lazy.contains(np.arange(190, 200)).any()
    restored = table()
    de.checkpoint.load(parent, tables={"t": restored})
    assert_same_rows(lazy, restored)  # the live table and its checkpoint agree


def test_an_id_set_takes_room_for_its_distinct_ids_only():
    """Each add reserved room for every id it was given, also those already in the set:
    the hidden and outdated sets of a lazy checkpoint ended up a quarter full."""
    from dynembed.checkpoint.lazy import _IdSet
    from dynembed.table.index import buckets_for
    ids = _IdSet()
    for extra in range(0, 2_000, 100):  # 10,000 ids again and again, a few new each time
        ids.add(np.arange(10_000 + extra))
    assert ids.size == 11_900
    assert ids._index.buckets == buckets_for(11_900)


@pytest.mark.parametrize("rows", [2.5, 0, -1, True, "100"])
def test_load_step_refuses_a_bad_rows_by_name(saved, rows):
    """A fractional ``rows`` looped forever (each pass loaded int(rows left) = 0 rows);
    0 or less loaded nothing and reported rows left, so ``while not load_step(...)`` spun."""
    path, _ = saved
    lazy = make_table()
    de.checkpoint.load(path, tables={"t": lazy}, lazy=True)
    with pytest.raises(ValueError, match=r"rows must be None \(load every remaining row\) "
                                         r"or an int >= 1 .*got"):
        de.checkpoint.load_step(lazy, rows)
    with pytest.raises(ValueError, match=r"chunk_rows must be an int >= 1"):
        de.checkpoint.load_step(lazy, 10, chunk_rows=0)
    with pytest.raises(TypeError, match=r"table must be a DynamicTable .*got str"):
        de.checkpoint.load_step("t")
    assert len(lazy) == 0  # nothing was loaded by the refused calls
    assert de.checkpoint.load_step(lazy, np.int64(10)) is False  # numpy ints are ints
    assert len(lazy) == 10


def _files_open_under(folder) -> tuple[int, int]:
    """(descriptors, mappings) this process holds on files under ``folder``."""
    folder = str(folder.resolve())
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds += os.readlink(f"/proc/self/fd/{fd}").startswith(folder)
        except OSError:  # closed meanwhile (the listing's own descriptor)
            pass
    with open("/proc/self/maps") as f:
        maps = sum(folder in line for line in f)
    return fds, maps


def test_a_table_dropped_during_a_background_load_lets_its_files_go(saved):
    """The background load's generator held the LazyRows that holds it (a reference cycle):
    a table dropped in the middle of a load kept the checkpoint's descriptors and mappings
    (and the disk space of deleted checkpoints) until a full garbage collection."""
    path, _ = saved
    gc.collect()
    assert _files_open_under(path) == (0, 0)
    gc.disable()  # only reference counting: what a cycle would keep, stays
    try:
        lazy = make_table()
        de.checkpoint.load(path, tables={"t": lazy}, lazy=True, background_rows=100)
        train(lazy, [np.array([1])])  # the background load starts reading
        assert lazy.base.pending is not None
        # one chunk: no read-ahead still in flight on the reader thread (it holds the files
        # until it finishes, whatever happens to the table)
        assert len(list(lazy.base._steps(DEFAULT_CHUNK_ROWS))) == 1
        assert _files_open_under(path) != (0, 0)
        del lazy
        assert _files_open_under(path) == (0, 0)
    finally:
        gc.enable()


def _bytes_read() -> int:
    """Bytes this process has read with read()/pread() (not through memory maps)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_a_full_save_of_a_lazy_table_reads_the_checkpoint_ids_not_its_records(tmp_path):
    """The save's sort order took the ids of the rows left in the checkpoint from
    rows_below_memory(), which streams every record (most of a lazily opened table) only
    for their ids; the copy then read those records again."""
    import torch

    source = make_table(dim=64)
    source.insert_or_assign(np.arange(20_000), torch.randn(20_000, 64))
    de.checkpoint.save(tmp_path / "c0", tables={"t": source})
    lazy = make_table(dim=64)
    de.checkpoint.load(tmp_path / "c0", tables={"t": lazy}, lazy=True)
    train(lazy, [np.arange(100)])
    records = RowsFile(str(next((tmp_path / "c0").glob("tables/t/*.rows")))).layout \
        .offsets["records"][1]
    before = _bytes_read()
    de.checkpoint.save(tmp_path / "c1", tables={"t": lazy})  # full
    read = _bytes_read() - before
    assert read < records / 4  # the copy reads records through the map
    restored = make_table(dim=64)
    de.checkpoint.load(tmp_path / "c1", tables={"t": restored})
    assert_same_rows(lazy, restored)


class _CountingStore(de.storage.MemoryStore):
    """A MemoryStore that counts the rows read from it (all instances together)."""

    rows_read = 0

    def _get(self, ids):
        _CountingStore.rows_read += ids.shape[0]
        return super()._get(ids)


def test_moving_a_checkpoint_into_the_store_does_not_read_it_all_back(saved):
    """At the end of the stream, a check for rows dropped from memory behind it read every
    checkpoint row back from the store (one get each: a second pass over RocksDB or Redis),
    though with a store no row is dropped: each went to the store, or had a newer copy."""
    path, table = saved

    tiered = make_table(store=_CountingStore(), max_rows=100)
    de.checkpoint.load(path, tables={"t": tiered}, lazy=True)
    train(tiered, [np.arange(50)])
    _CountingStore.rows_read = 0
    tiered.flush()  # the unread checkpoint rows go to the store
    assert tiered.base is None
    assert _CountingStore.rows_read <= len(table)  # was twice: once more at the end
    assert tiered.tier.store.size() == len(tiered.export().ids) >= len(table)


def test_an_eager_load_into_a_store_reads_nothing_back_from_it(saved):
    """The restore empties the store first, yet each streamed row's key was looked up in
    it (a pass of gets over RocksDB or Redis as long as the table)."""
    path, table = saved

    tiered = make_table(store=_CountingStore(), max_rows=100)
    train(tiered, [np.arange(1000, 1050)])  # rows the load replaces
    _CountingStore.rows_read = 0
    de.checkpoint.load(path, tables={"t": tiered})
    assert _CountingStore.rows_read == 0
    got, want = tiered.export(), table.export()
    assert sorted(got.ids.tolist()) == sorted(want.ids.tolist())
