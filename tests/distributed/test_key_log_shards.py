"""The key log of a distributed table with admission keeps only the keys that got a row,
as in one process (two gloo ranks in spawned processes)."""

from __future__ import annotations

import dynembed as de
from dynembed.distributed import shard_model
from tests.distributed.helpers import run_ranks

WORLD = 2
ONCE = [f"rare{i}" for i in range(40)]  # seen once: refused
TWICE = [f"kept{i}" for i in range(20)]  # seen twice in one step: admitted


def _table(placement: str) -> de.DynamicEmbedding:
    return de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1, key_log=True,
                               admission=de.policy.FrequencyAdmission(threshold=2),
                               placement=placement)


def _body(rank: int) -> dict:
    logged = {}
    for placement in ("sharded", "replicated"):
        emb = _table(placement)
        shard_model(emb, timeout=30)
        emb(ONCE[rank::WORLD] + TWICE[rank::WORLD] * 2).sum().backward()
        log = emb.table.key_log
        logged[placement] = {
            "entries": len(log),
            "rare": sum(k is not None for k in log.lookup(emb.table.ids_of(ONCE).ids)),
            "kept": [k for k in log.lookup(emb.table.ids_of(TWICE).ids) if k is not None],
            "owned": [k for k, mine in zip(TWICE, emb.table.owned(TWICE).tolist()) if mine],
            "exported": sorted(emb.table.to_numpy()["key"].tolist())}
        emb.train(False)  # an eval lookup ships nothing (and joins no exchange)
        emb(TWICE[:3])
    logged["readmitted"] = _readmitted(rank)
    return logged


def _readmitted(rank: int) -> list:
    """Rank 0 asks for keys the other rank holds; their rows expire there and come back:
    the owner's log forgot the strings with the rows, and rank 0, which had sent them
    once, did not send them again."""
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1, key_log=True,
                              eviction=de.policy.TTL(steps=1), evict_every=1)
    shard_model(emb, timeout=30)
    keys = [f"k{i}" for i in range(40)]
    theirs = [k for k, mine in zip(keys, emb.table.owned(keys).tolist()) if not mine][:4]
    asked = theirs if rank == 0 else []
    emb(asked + ["z"]).sum().backward()
    for _ in range(4):  # their rows expire at the owner
        emb(["z"]).sum().backward()
    emb(asked + ["z"]).sum().backward()  # and come back
    return emb.table.to_numpy()["key"].tolist()


def test_refused_keys_stay_out_of_the_key_log_and_owners_get_the_strings(tmp_path):
    """Each rank logged every string it asked for: one process logs 20 keys, each rank
    logged its 30, the refused long tail included (the log grew without bound). And only
    the rank that asked logged a string: a live export of the shard (or replica) that held
    the row listed its key as None."""
    one = _table("sharded")
    one(ONCE + TWICE * 2).sum().backward()
    assert len(one.table.key_log) == one.table.size() == 20
    ranks = run_ranks(_body, tmp_path, WORLD)
    for placement in ("sharded", "replicated"):
        for rank, result in enumerate(ranks):
            got = result[placement]
            assert got["rare"] == 0, (placement, rank)
            # the strings of the rows it holds, whoever asked for them
            held = got["owned"] if placement == "sharded" else TWICE
            assert sorted(got["kept"]) == sorted(held), (placement, got)
            assert got["entries"] == len(held), (placement, got)
            assert got["exported"] == sorted(held), (placement, rank)  # no None key
    assert sorted(ranks[0]["sharded"]["owned"] + ranks[1]["sharded"]["owned"]) == sorted(TWICE)
    assert 0 < len(ranks[0]["sharded"]["owned"]) < len(TWICE)
    readmitted = ranks[1]["readmitted"]  # the owner of rank 0's keys
    assert len(readmitted) >= 4 and None not in readmitted
