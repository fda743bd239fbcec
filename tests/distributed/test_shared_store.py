"""A sharded table whose ranks share one Redis namespace (``RedisStore`` with the same
namespace on every machine): each shard scans, saves and clears only its own rows of it."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.distributed as dist

import dynembed as de
from dynembed.distributed import shard_model
from dynembed.keys.buckets import NUM_BUCKETS, buckets_of, rank_of_bucket
from tests.distributed.helpers import run_ranks

WORLD = 2


def _table(url: str) -> de.DynamicEmbedding:
    store = de.storage.RedisStore(url, namespace="shared-ns:users")
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=64,
                              store=store)
    shard_model(emb, timeout=30)
    return emb


def _rows(emb) -> dict[int, list[float]]:
    export = emb.table.export()
    return dict(zip(export.ids.tolist(), export.weights.tolist()))


def _body(url: str, folder: str, rank: int) -> dict:
    emb = _table(url)
    for step in range(5):  # 300 keys over both owners, most of them evicted to Redis
        keys = torch.arange(step * 30, step * 30 + 30) + (0 if rank == 0 else 1000)
        emb(keys).sum().backward()
    emb.table.flush()
    trained = _rows(emb)
    de.checkpoint.save(f"{folder}/ck", emb, rank=rank, world_size=WORLD)
    dist.barrier()
    # a fresh model over the same namespace: the restore empties each shard's own rows of
    # the store only (and in any order), then loads them
    restored = _table(url)
    de.checkpoint.load(f"{folder}/ck", restored, rank=rank, world_size=WORLD)
    dist.barrier()
    after_load = _rows(restored)
    # restored before shard_model (eagerly, into memory and the store): each rank clears
    # only its own rows of the namespace then too
    early = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=64,
                                store=de.storage.RedisStore(url, namespace="shared-ns:users"))
    for turn in range(WORLD):  # one after the other: rank 1's clear follows rank 0's load
        if turn == rank:
            de.checkpoint.load(f"{folder}/ck", early, rank=rank, world_size=WORLD)
        dist.barrier()
    shard_model(early, timeout=30)
    dist.barrier()
    early_rows = _rows(early)
    dist.barrier()
    if rank == 0:
        restored.table.clear_store()  # rank 1's rows stay in the namespace
    dist.barrier()
    return {"trained": trained, "restored": after_load, "after_clear": _rows(restored),
            "in_memory": restored.table.size(), "restored_early": early_rows}


def test_shards_over_one_redis_namespace_save_restore_and_clear_their_own_rows(
        redis_server, tmp_path):
    """Each rank saw every shard's rows in the shared namespace: the first checkpoint
    failed ("the table holds keys of buckets ... but this rank owns ..."), and a restore
    or clear_store emptied the other shards' rows too."""
    results = run_ranks(functools.partial(_body, redis_server.url, str(tmp_path)), tmp_path,
                        WORLD)
    everything = {}
    for rank, got in enumerate(results):
        ids = np.array(sorted(got["trained"]), dtype=np.int64)
        owners = rank_of_bucket(buckets_of(ids, NUM_BUCKETS), WORLD, NUM_BUCKETS)
        assert (owners == rank).all()  # a shard lists only the rows it owns
        assert got["restored"] == got["restored_early"] == got["trained"]
        everything.update(got["trained"])
    assert len(everything) == 300  # every key once, on its owner
    assert len(results[0]["after_clear"]) == results[0]["in_memory"] < 150
    assert results[1]["after_clear"] == results[1]["trained"]
