"""Bucketed checkpoints: N shards save, M shards load, every key finds its vector."""

from __future__ import annotations

import numpy as np
import pytest

import dynembed as de
from dynembed.keys.buckets import buckets_of, rank_buckets, rank_of_bucket

from .helpers import batches, make_table, rows_by_id, train


def split(table: de.DynamicTable, world: int, num_buckets: int,
          **options) -> list[de.DynamicTable]:
    """The table's rows split over ``world`` shard tables by bucket owner."""
    rows = table.export()
    owner = rank_of_bucket(buckets_of(rows.ids.numpy(), num_buckets), world, num_buckets)
    shards = []
    for rank in range(world):
        mine = np.flatnonzero(owner == rank)
        shard = make_table(**options)
        shard.insert_or_assign(rows.ids[mine], rows.weights[mine],
                               optimizer_state=rows.optimizer_state[mine])
        shards.append(shard)
    return shards


@pytest.mark.parametrize("writers,readers", [(1, 3), (2, 1), (2, 3), (3, 2), (4, 4)])
@pytest.mark.parametrize("lazy", [False, True])
def test_n_shards_save_then_m_shards_load(tmp_path, writers, readers, lazy):
    buckets = 64
    whole = make_table()
    train(whole, batches(10, 5000))
    for rank, shard in enumerate(split(whole, writers, buckets)):
        done = de.checkpoint.save(tmp_path / "c", tables={"t": shard}, rank=rank,
                                  world_size=writers, num_buckets=buckets)
        assert (done is not None) == (rank == writers - 1)  # the last writer commits
    reference = rows_by_id(whole)
    seen = []
    for rank in range(readers):
        shard = make_table()
        de.checkpoint.load(tmp_path / "c", tables={"t": shard}, rank=rank,
                           world_size=readers, lazy=lazy)
        if lazy:
            de.checkpoint.load_step(shard)
        mine = rows_by_id(shard)
        owned = rank_buckets(rank, readers, buckets)
        assert np.isin(buckets_of(mine["ids"], buckets), owned).all()
        at = np.searchsorted(reference["ids"], mine["ids"])
        np.testing.assert_array_equal(reference["weights"][at], mine["weights"])
        np.testing.assert_array_equal(reference["state"][at], mine["state"])
        seen.append(mine["ids"])
    everything = np.concatenate(seen)
    assert everything.shape[0] == len(whole)
    np.testing.assert_array_equal(np.sort(everything), reference["ids"])


@pytest.mark.parametrize("writers,readers", [(2, 1), (1, 2), (2, 3)])
def test_counters_follow_a_change_of_world_size(tmp_path, writers, readers):
    """Each reader took one writer's counters: 2 -> 1 kept rank 0's keys only, 1 -> 2 gave
    both ranks the whole job's (their sum doubled). Now they sum to the job's, which the
    rank of bucket 0 holds."""
    whole = make_table()
    train(whole, batches(6, 400))
    shards = split(whole, writers, 64)
    for rank, shard in enumerate(shards):
        shard.counters.keys, shard.counters.updated_rows = 100 * (rank + 1), 7 * (rank + 1)
        de.checkpoint.save(tmp_path / "c", tables={"t": shard}, rank=rank,
                           world_size=writers, num_buckets=64)
    restored = []
    for rank in range(readers):
        shard = make_table()
        de.checkpoint.load(tmp_path / "c", tables={"t": shard}, rank=rank,
                           world_size=readers)
        restored.append(shard.counters)
    assert [c.keys for c in restored] == [sum(100 * (r + 1) for r in range(writers))] + \
        [0] * (readers - 1)
    assert sum(c.updated_rows for c in restored) == sum(7 * (r + 1) for r in range(writers))


def test_a_partial_multi_rank_save_is_not_a_checkpoint(tmp_path):
    shards = split(make_table(), 2, 16)
    assert de.checkpoint.save(tmp_path / "c", tables={"t": shards[0]}, rank=0,
                              world_size=2, num_buckets=16) is None
    assert not (tmp_path / "c").exists()
    with pytest.raises(de.CheckpointNotFoundError):
        de.checkpoint.load(tmp_path / "c", tables={"t": make_table()})


def test_a_shard_holding_another_ranks_keys_is_refused(tmp_path):
    whole = make_table()
    train(whole, batches(2, 1000))
    with pytest.raises(de.CheckpointError, match="owns buckets"):
        de.checkpoint.save(tmp_path / "c", tables={"t": whole}, rank=0, world_size=2,
                           num_buckets=16)


def test_ranks_that_disagree_on_the_checkpoint_fail_the_commit(tmp_path):
    whole = make_table()
    train(whole, batches(2, 500))
    shards = split(whole, 2, 16)
    de.checkpoint.save(tmp_path / "base", tables={"t": shards[0]}, rank=0, world_size=2,
                       num_buckets=16)
    de.checkpoint.save(tmp_path / "base", tables={"t": shards[1]}, rank=1, world_size=2,
                       num_buckets=16)
    de.checkpoint.save(tmp_path / "next", tables={"t": shards[0]}, rank=0, world_size=2,
                       num_buckets=16, parent=tmp_path / "base")  # a delta
    with pytest.raises(de.CheckpointError, match="all ranks must save the same checkpoint"):
        de.checkpoint.save(tmp_path / "next", tables={"t": shards[1]}, rank=1, world_size=2,
                           num_buckets=16)  # a full one
    assert not (tmp_path / "next").exists()


def test_a_table_missing_on_a_rank_fails_the_commit(tmp_path):
    shards = split(make_table(), 2, 16)
    de.checkpoint.save(tmp_path / "c", tables={"t": shards[0], "u": make_table()}, rank=0,
                       world_size=2, num_buckets=16)
    with pytest.raises(de.CheckpointError, match="every rank must save every sharded table"):
        de.checkpoint.save(tmp_path / "c", tables={"t": shards[1]}, rank=1, world_size=2,
                           num_buckets=16)


@pytest.mark.parametrize("policy", [de.policy.FrequencyAdmission(threshold=2, width=1024, depth=2),
                                    de.policy.BloomAdmission(expected_keys=1000)])
def test_admission_state_of_every_old_shard_reaches_the_rank_that_owns_its_keys(tmp_path,
                                                                               policy):
    """Restoring 2 shards on 1 once kept only the first shard's admission state: a key the
    second shard had seen once was refused again."""
    buckets = 16
    ids = np.arange(200, dtype=np.int64)
    owner = rank_of_bucket(buckets_of(ids, buckets), 2, buckets)
    seen = [ids[owner == rank][:5] for rank in range(2)]  # each shard sees its keys once
    for rank in range(2):
        shard = make_table(admission=policy)
        shard.lookup_slots(seen[rank], np.ones(5, dtype=np.int64), insert=True)
        assert len(shard) == 0  # not admitted yet
        de.checkpoint.save(tmp_path / "c", tables={"t": shard}, rank=rank, world_size=2,
                           num_buckets=buckets)
    whole = make_table(admission=policy)
    de.checkpoint.load(tmp_path / "c", tables={"t": whole})
    both = np.concatenate(seen)
    whole.lookup_slots(both, np.ones(10, dtype=np.int64), insert=True)  # the second sighting
    assert whole.contains(both).all()


def test_a_second_rank_that_finds_every_part_does_not_commit_again(tmp_path, monkeypatch):
    """Two ranks can both find every part written; the first commits. The commit marker was
    removed before the parts, so the second could take it and read parts being deleted (a
    2-to-3-rank torchrun job failed so)."""
    from dynembed.checkpoint import api
    shards = split(make_table(), 2, 16)
    de.checkpoint.save(tmp_path / "c", tables={"t": shards[0]}, rank=0, world_size=2,
                       num_buckets=16)
    staging, target = tmp_path / "c.partial", tmp_path / "c"
    late = []
    real_rmtree = api.shutil.rmtree

    def rmtree_then_late_rank(path, *args, **kwargs):
        if path == staging / "parts":  # the committer is between its manifest and rename
            info = {"id": "x", "world_size": 2, "num_buckets": 16, "parent": None,
                    "parent_path": None}
            late.append(api._commit(staging, target, info))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(api.shutil, "rmtree", rmtree_then_late_rank)
    done = de.checkpoint.save(target, tables={"t": shards[1]}, rank=1, world_size=2,
                              num_buckets=16)
    assert done == target and late == [None]
    assert sorted(p.name for p in target.iterdir() if p.is_file()) == ["MANIFEST.json"]
    de.checkpoint.load(target, tables={"t": make_table()})


def test_admission_counts_do_not_double_when_a_job_grows_and_shrinks_again(tmp_path):
    """Growing gave every rank the whole sketch; shrinking summed the copies: every 1 -> 2
    -> 1 round trip doubled the counts, and keys got rows before their threshold."""
    policy = de.policy.FrequencyAdmission(threshold=3, width=1024, depth=2)
    one = make_table(admission=policy)
    one.lookup_slots(np.array([5]), np.ones(1, dtype=np.int64), insert=True)  # seen once
    de.checkpoint.save(tmp_path / "w1", tables={"t": one})
    for trip in range(3):
        for rank in range(2):
            shard = make_table(admission=policy)
            de.checkpoint.load(tmp_path / "w1", tables={"t": shard}, rank=rank, world_size=2)
            de.checkpoint.save(tmp_path / f"w2-{trip}", tables={"t": shard}, rank=rank,
                               world_size=2)
        (tmp_path / "w1").rename(tmp_path / f"old-{trip}")
        back = make_table(admission=policy)
        de.checkpoint.load(tmp_path / f"w2-{trip}", tables={"t": back})
        de.checkpoint.save(tmp_path / "w1", tables={"t": back})
    back = make_table(admission=policy)
    de.checkpoint.load(tmp_path / "w1", tables={"t": back})
    back.lookup_slots(np.array([5]), np.ones(1, dtype=np.int64), insert=True)  # 2nd sighting
    assert not back.contains(np.array([5])).any()
    back.lookup_slots(np.array([5]), np.ones(1, dtype=np.int64), insert=True)  # the 3rd
    assert back.contains(np.array([5])).all()


def test_each_rank_restores_the_key_log_of_its_own_buckets(tmp_path):
    """Each rank logs the strings it asked for, whoever owns them, and a load merged every
    rank's log: each shard then held every key's string, and saved it again (W copies)."""
    buckets = 16
    keys = [f"word{i}" for i in range(200)]
    whole = make_table(key_log=True)
    whole.find_or_insert(keys)
    for rank, shard in enumerate(split(whole, 2, buckets, key_log=True)):
        shard.key_log.add(whole.ids_of(keys).ids, keys)  # as the router leaves it: all asked
        de.checkpoint.save(tmp_path / "c", tables={"t": shard}, rank=rank, world_size=2,
                           num_buckets=buckets)
    for readers in (1, 2, 3):
        logged = set()
        for rank in range(readers):
            shard = make_table(key_log=True)
            de.checkpoint.load(tmp_path / "c", tables={"t": shard}, rank=rank,
                               world_size=readers)
            ids = shard.export().ids.numpy()
            assert len(shard.key_log) == ids.shape[0]  # its own rows' strings, only
            assert None not in shard.keys_of(ids)
            logged |= set(shard.keys_of(ids))
        assert logged == set(keys)
