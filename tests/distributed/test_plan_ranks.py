"""shard_model's checks on two gloo ranks (spawned processes): what one rank alone got
wrong fails on every rank, with one message, and the job can still go on."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

import dynembed as de
from dynembed.distributed import shard_model
from tests.distributed.helpers import run_ranks

WORLD = 2


def _emb(**options) -> de.DynamicEmbedding:
    return de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1, **options)


def _attempt(build) -> str | None:
    """shard_model on what ``build()`` returns; the error it raised on this rank, if any."""
    try:
        shard_model(build(), timeout=30)
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _warm(rank: int) -> de.DynamicEmbedding:
    emb = _emb()
    if rank == 0:  # a lookup before sharding, on rank 0 only
        emb(torch.arange(100)).sum().backward()
    return emb


def _lazily_restored(folder: str, rank: int) -> de.DynamicEmbedding:
    """A checkpoint of one process (every bucket) opened lazily before sharding."""
    if rank == 0:
        whole = _emb()
        whole(torch.arange(100)).sum().backward()
        de.checkpoint.save(f"{folder}/whole", whole)
    dist.barrier()
    emb = _emb()
    de.checkpoint.load(f"{folder}/whole", emb, lazy=True)
    return emb


def _failure(call) -> str | None:
    try:
        call()
    except ValueError as e:
        return str(e)
    return None


def _table_verbs_on_a_shard() -> dict:
    emb = _emb()
    shard_model(emb, timeout=30)
    keys = torch.arange(100)
    foreign = _failure(lambda: emb.table.insert_or_assign(keys, torch.ones(100, 2)))
    created = _failure(lambda: emb.table.find_or_insert(keys))
    erased = _failure(lambda: emb.table.erase(keys))
    mine = keys[emb.table.owned(keys)]
    emb.table.insert_or_assign(mine, torch.ones(mine.shape[0], 2))
    return {"foreign_write": foreign, "foreign_create": created, "foreign_erase": erased,
            "owned": mine.tolist(),
            "size": emb.table.size(),
            "top_k": _failure(lambda: emb.table.top_k(torch.ones(2), 3))}


def _body(folder: str, rank: int) -> dict:
    result = {
        "foreign_rows": _attempt(lambda: _warm(rank)),
        "lazy_checkpoint": _attempt(lambda: _lazily_restored(folder, rank)),
        "replica_limits": _attempt(lambda: _emb(placement="replicated",
                                                max_rows=100 if rank else 200)),
    }
    try:
        shard_model(_emb(), num_buckets=4096 if rank == 0 else 1024, timeout=30)
        result["num_buckets"] = None
    except de.errors.ConfigMismatchError as e:
        result["num_buckets"] = str(e)
    result.update(_table_verbs_on_a_shard())
    emb = _emb()  # after all that, the ranks are still in step
    shard_model(emb, timeout=30)
    emb(torch.tensor([rank, 10 + rank])).sum().backward()
    result["then"] = emb.table.size()
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan_ranks")
    return run_ranks(functools.partial(_body, str(folder)), folder, WORLD)


def test_rows_of_other_ranks_on_one_rank_fail_on_every_rank(ranks):
    """Only rank 0 raised; rank 1 went on and timed out in its first lookup."""
    for result in ranks:
        assert result["foreign_rows"] is not None
        assert "already hold rows of other ranks' buckets (rank 0: ['table'])" in \
            result["foreign_rows"]


def test_a_checkpoint_opened_lazily_before_sharding_is_refused(ranks):
    """Only memory was checked: each rank then answered and saved every row of the lazy
    checkpoint, and the first save failed."""
    for result in ranks:
        assert "already hold rows of other ranks' buckets (rank 0: ['table']; rank 1: " \
            "['table'])" in result["lazy_checkpoint"]


def test_different_num_buckets_fail_on_every_rank(ranks):
    """Ranks disagreed on who owns a key, and a key got a row on two ranks."""
    for result in ranks:
        assert result["num_buckets"] is not None
        assert "num_buckets is 4096 on rank 0 but 1024 on rank 1" in result["num_buckets"]


def test_replicas_without_a_store_need_one_row_limit(ranks):
    """A replica with a smaller limit discarded rows the others kept: one key read
    different vectors on different ranks."""
    for result in ranks:
        assert "row limit (max_rows / memory_budget) of a replica without a store is 200 " \
               "on rank 0 but 100 on rank 1" in result["replica_limits"]


def test_the_job_goes_on_after_the_refusals(ranks):
    assert sum(result["then"] for result in ranks) == 4


def test_table_level_writes_on_a_shard_take_only_its_keys(ranks):
    """insert_or_assign of every key on every rank kept foreign copies that never trained,
    and the first checkpoint then failed; top_k searched only the local shard."""
    owned = [set(result["owned"]) for result in ranks]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(100))
    for result in ranks:
        assert result["size"] == len(result["owned"])
        for verb in ("foreign_write", "foreign_create", "foreign_erase"):
            assert "keys belong to other ranks' shards" in result[verb]
            assert "keys[table.owned(keys)]" in result[verb]
        assert "top_k: this table is sharded across the ranks" in result["top_k"]
