"""Delta checkpoints: only changed rows and deletions, chained to a base; compaction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.storage import MemoryStore

from .helpers import assert_same_counters, assert_same_rows, batches, make_table, train


def manifest(path):
    from dynembed.checkpoint import manifest as mf
    return mf.read(path)


def test_a_delta_holds_exactly_the_changed_rows_and_the_deletions(tmp_path):
    table = make_table()
    table.insert_or_assign(np.arange(10_000), torch.zeros(10_000, 8))
    de.checkpoint.save(tmp_path / "c0", tables={"t": table})
    table.assign(np.arange(100, 300), torch.ones(200, 8))  # 200 changed
    table.insert_or_assign(np.arange(20_000, 20_050), torch.ones(50, 8))  # 50 new
    table.erase(np.arange(5_000, 5_030))  # 30 deleted
    table.erase(np.arange(20_000, 20_010))  # new then deleted: a deletion, harmless
    de.checkpoint.save(tmp_path / "c1", tables={"t": table}, parent=tmp_path / "c0")
    entry = manifest(tmp_path / "c1")["tables"]["t"]
    assert manifest(tmp_path / "c1")["kind"] == "delta"
    assert entry["rows"] == 240 and entry["deleted"] == 40
    assert entry["live_rows"] == len(table) == 10_000 + 40 - 30
    restored = make_table()
    de.checkpoint.load(tmp_path / "c1", tables={"t": restored})
    assert_same_rows(table, restored)


def test_a_delta_keeps_its_parents_buckets_and_refuses_other_ones(tmp_path):
    table = make_table()
    table.insert_or_assign(np.arange(1_000), torch.zeros(1_000, 8))
    de.checkpoint.save(tmp_path / "c0", tables={"t": table}, num_buckets=64)
    table.assign(np.arange(10), torch.ones(10, 8))
    with pytest.raises(ValueError, match=r"num_buckets=4096 differs from the parent's 64"):
        de.checkpoint.save(tmp_path / "c1", tables={"t": table}, parent=tmp_path / "c0",
                           num_buckets=4096)
    assert not (tmp_path / "c1").exists()
    de.checkpoint.save(tmp_path / "c1", tables={"t": table}, parent=tmp_path / "c0")
    assert manifest(tmp_path / "c1")["num_buckets"] == 64
    de.checkpoint.save(tmp_path / "c2", tables={"t": table})  # a full one: the default
    assert manifest(tmp_path / "c2")["num_buckets"] == 4096
    restored = make_table()
    de.checkpoint.load(tmp_path / "c1", tables={"t": restored})
    assert_same_rows(table, restored)


@pytest.mark.parametrize("lazy", [False, True])
def test_a_chain_of_deltas_restores_like_the_live_table(tmp_path, lazy):
    table = make_table()
    train(table, batches(10, 5000))
    de.checkpoint.save(tmp_path / "c0", tables={"t": table})
    rng = np.random.default_rng(3)
    for k in range(1, 6):
        train(table, batches(3, 8000, seed=k))
        table.erase(rng.integers(-5000, 5000, 300))
        table.insert_or_assign(rng.integers(-9000, 9000, 100), torch.randn(100, 8))
        de.checkpoint.save(tmp_path / f"c{k}", tables={"t": table},
                           parent=tmp_path / f"c{k - 1}")
        assert manifest(tmp_path / f"c{k}")["chain_length"] == k + 1
        assert manifest(tmp_path / f"c{k}")["tables"]["t"]["live_rows"] == len(table)
    restored = make_table()
    de.checkpoint.load(tmp_path / "c5", tables={"t": restored}, lazy=lazy)
    assert_same_rows(table, restored)
    assert_same_counters(table, restored)
    compacted = de.checkpoint.compact(tmp_path / "c5", tmp_path / "c5-full", chunk_rows=500)
    assert manifest(compacted)["kind"] == "full"
    assert manifest(compacted)["id"] == manifest(tmp_path / "c5")["id"]
    again = make_table()
    de.checkpoint.load(compacted, tables={"t": again})
    assert_same_rows(table, again)
    # the table's changes are tracked since that id: a delta can follow the compacted one
    train(table, batches(2, 100, seed=11))
    de.checkpoint.save(tmp_path / "c6", tables={"t": table}, parent=compacted)
    latest = make_table()
    de.checkpoint.load(tmp_path / "c6", tables={"t": latest})
    assert_same_rows(table, latest)


@pytest.mark.parametrize("deferred", [False, True])
def test_an_update_after_a_checkpoint_taken_between_lookup_and_backward_is_in_the_delta(
        tmp_path, deferred):
    """The lookup marks its rows changed, and backward skips marking them again; a
    checkpoint taken in between clears the marks, so backward must set them."""
    emb = de.DynamicEmbedding(dim=8, optimizer=de.optim.SGD(lr=0.5), seed=7,
                              update_mode="deferred" if deferred else "fused")
    keys = torch.tensor([3, 5, 3, 9])
    emb(keys).sum().backward()
    emb.table.step_optimizer()
    out = emb(keys)  # marks rows 3, 5, 9 changed
    de.checkpoint.save(tmp_path / "c0", tables={"t": emb.table})  # clears the marks
    out.sum().backward()  # fused: updates the rows now
    emb.table.step_optimizer()  # deferred: now
    de.checkpoint.save(tmp_path / "c1", tables={"t": emb.table}, parent=tmp_path / "c0")
    assert manifest(tmp_path / "c1")["tables"]["t"]["rows"] == 3
    restored = make_table(optimizer=de.optim.SGD(lr=0.5))
    de.checkpoint.load(tmp_path / "c1", tables={"t": restored})
    assert_same_rows(emb.table, restored)


def test_a_training_step_marks_its_rows_changed_once(monkeypatch):
    """The lookup's metadata kernel marks the rows; the update in backward does not mark
    them a second time (unless a checkpoint cleared the marks in between, above)."""
    emb = de.DynamicEmbedding(dim=8, optimizer=de.optim.SGD(lr=0.5), seed=7)
    emb(torch.arange(100)).sum().backward()
    marked = []
    real = emb.table.changes.mark
    monkeypatch.setattr(emb.table.changes, "mark",
                        lambda slots: (marked.append(slots), real(slots)))
    emb(torch.tensor([0, 1, 1, 2])).sum().backward()
    assert marked == []
    assert emb.table.changes.changed(emb.table.index.find(np.arange(3))).all()
    assert emb.table.counters.updated_rows == 103


def test_delta_size_is_proportional_to_the_changed_rows(tmp_path):
    table = make_table()
    table.insert_or_assign(np.arange(50_000), torch.zeros(50_000, 8))
    parent = tmp_path / "base"
    de.checkpoint.save(parent, tables={"t": table})
    sizes = {}
    for k in (1_000, 4_000, 16_000):
        table.assign(np.arange(k), torch.full((k, 8), float(k)))
        path = tmp_path / f"d{k}"
        de.checkpoint.save(path, tables={"t": table}, parent=parent)
        parent = path
        sizes[k] = manifest(path)["tables"]["t"]["rows"]
        files = manifest(path)["files"]
        sizes[k] = sum(v["bytes"] for n, v in files.items() if n.endswith(".rows"))
    per_row = [(sizes[b] - sizes[a]) / (b - a) for a, b in ((1_000, 4_000), (4_000, 16_000))]
    assert abs(per_row[0] - per_row[1]) / per_row[1] < 0.05
    assert per_row[1] < 8 * (8 + 8) + 32  # weights + state + id/count/step, little more


def test_rows_evicted_to_the_store_or_discarded_are_in_the_delta(tmp_path):
    for store in (MemoryStore(), None):
        table = make_table(store=store, max_rows=200, eviction=de.policy.LRU())
        train(table, batches(5, 1000))
        de.checkpoint.save(tmp_path / f"a{store is None}", tables={"t": table})
        train(table, batches(20, 3000, seed=4))  # changes, evictions, discards
        de.checkpoint.save(tmp_path / f"b{store is None}", tables={"t": table},
                           parent=tmp_path / f"a{store is None}")
        restored = make_table(store=MemoryStore() if store else None)
        de.checkpoint.load(tmp_path / f"b{store is None}", tables={"t": restored})
        assert_same_rows(table, restored)


@pytest.mark.parametrize("store", [MemoryStore, None])
def test_ids_that_left_memory_are_kept_only_as_far_as_a_delta_needs_them(tmp_path, store):
    """The ids of rows that left memory were listed once per departure for as long as the
    table went unsaved: a job that never checkpoints grew by 8 bytes per row that ever left
    memory (a row read back from the store and evicted again, once more each time). A table
    never saved lists none (its next save is full); a saved one lists each id about once."""
    from dynembed.table.changes import DEDUP_FLOOR

    def listed(table):
        return sum(a.shape[0] for a in (*table.changes.moved, *table.changes.removed))

    table = make_table(store=store() if store else None, max_rows=100,
                       eviction=de.policy.LRU())
    train(table, [np.arange(i * 100, i * 100 + 100) for i in range(50)])
    assert listed(table) == 0  # 4,900 rows left memory before any save
    de.checkpoint.save(tmp_path / "c0", tables={"t": table})
    cycle = [np.arange(j, j + 100) for j in range(0, 1000, 100)]
    for _ in range(80):  # the same 1,000 ids through memory 80 times: 80,000 departures
        train(table, cycle)
    assert listed(table) <= DEDUP_FLOOR < 80_000
    de.checkpoint.save(tmp_path / "c1", tables={"t": table}, parent=tmp_path / "c0")
    restored = make_table(store=store() if store else None)
    de.checkpoint.load(tmp_path / "c1", tables={"t": restored})
    assert_same_rows(table, restored)


def test_a_delta_needs_the_checkpoint_the_changes_are_tracked_since(tmp_path):
    table = make_table()
    train(table, batches(2, 100))
    de.checkpoint.save(tmp_path / "a", tables={"t": table})
    de.checkpoint.save(tmp_path / "b", tables={"t": table})
    with pytest.raises(de.CheckpointError, match="parent=None"):
        de.checkpoint.save(tmp_path / "c", tables={"t": table}, parent=tmp_path / "a")
    table.clear()
    with pytest.raises(de.CheckpointError, match="full checkpoint"):
        de.checkpoint.save(tmp_path / "c", tables={"t": table}, parent=tmp_path / "b")


def test_a_delta_whose_parent_is_gone_is_refused_by_name(tmp_path):
    import shutil

    table = make_table()
    train(table, batches(2, 100))
    de.checkpoint.save(tmp_path / "a", tables={"t": table})
    de.checkpoint.save(tmp_path / "b", tables={"t": table}, parent=tmp_path / "a")
    shutil.rmtree(tmp_path / "a")
    with pytest.raises(de.CheckpointNotFoundError, match="needs its parent"):
        de.checkpoint.load(tmp_path / "b", tables={"t": make_table()})


def test_compact_names_a_bad_path_or_out(tmp_path):
    """Path(123) raised "expected str, bytes or os.PathLike object, not int" without saying
    which argument; an ``out`` under a file failed with a bare OS error on a .partial path."""
    table = make_table()
    train(table, batches(1, 100))
    de.checkpoint.save(tmp_path / "c", tables={"t": table})
    with pytest.raises(TypeError, match=r"^path must be a str or os.PathLike .*got int"):
        de.checkpoint.compact(123, tmp_path / "out")
    with pytest.raises(TypeError, match=r"^out must be a str or os.PathLike .*got NoneType"):
        de.checkpoint.compact(tmp_path / "c", None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"^out: .*file is a file"):
        de.checkpoint.compact(tmp_path / "c", tmp_path / "file" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "file"]


def test_an_eager_load_of_a_chain_reserves_memory_for_the_live_rows_only(tmp_path):
    """The eager load sized memory by the rows of every layer of the chain: rows changed in
    each delta counted once per layer, so a chain of 5 reserved 5 times the table."""
    table = make_table()
    table.insert_or_assign(np.arange(5_000), torch.zeros(5_000, 8))
    de.checkpoint.save(tmp_path / "c0", tables={"t": table})
    for k in range(1, 5):
        table.assign(np.arange(5_000), torch.full((5_000, 8), float(k)))  # every row
        table.erase(np.arange(k * 10))
        de.checkpoint.save(tmp_path / f"c{k}", tables={"t": table},
                           parent=tmp_path / f"c{k - 1}")
    restored = make_table()
    de.checkpoint.load(tmp_path / "c4", tables={"t": restored})
    assert_same_rows(table, restored)
    assert len(restored) == 5_000 - 40
    assert restored.capacity() < 1.5 * len(restored)  # was 24,900: 5,000 per layer
