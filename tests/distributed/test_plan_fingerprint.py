"""shard_model's table fingerprint on two gloo ranks (spawned processes): what it compares
must mean the same in every process (no object addresses), and it must cover every setting
that makes replicas without a store hold different rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.distributed import shard_model
from tests.distributed.helpers import run_ranks

WORLD = 2


def by_count(counts: np.ndarray, last_step: np.ndarray, step: int) -> np.ndarray:
    return counts.astype(np.float64)


def by_recency(counts: np.ndarray, last_step: np.ndarray, step: int) -> np.ndarray:
    return last_step.astype(np.float64)


def _emb(**options) -> de.DynamicEmbedding:
    return de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1, **options)


def _attempt(build) -> tuple[str | None, object]:
    """shard_model on ``build()``, then one training step; (the error, the table size)."""
    try:
        emb = build()
        shard_model(emb, timeout=30)
    except de.errors.ConfigMismatchError as e:
        return str(e), None
    emb(torch.tensor([1, 2, 3])).sum().backward()
    return None, emb.table.size()


def _body(rank: int) -> dict:
    return {
        "same_function": _attempt(lambda: _emb(
            max_rows=100, eviction=de.policy.ScoreFunction(fn=by_count))),
        "other_function": _attempt(lambda: _emb(
            max_rows=100, eviction=de.policy.ScoreFunction(fn=by_recency if rank else by_count))),
        "replica_sweeps": _attempt(lambda: _emb(
            placement="replicated", eviction=de.policy.TTL(steps=1),
            evict_every=1 if rank == 0 else None)),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_body, tmp_path_factory.mktemp("fingerprint"), WORLD)


def test_a_score_function_eviction_policy_is_the_same_on_every_rank(ranks):
    """The fingerprint compared the policy's repr, which holds the function's address: it
    differs in every process, so any job with a ScoreFunction failed to shard."""
    for result in ranks:
        assert result["same_function"][0] is None, result["same_function"][0]
    assert sum(result["same_function"][1] for result in ranks) == 3


def test_different_score_functions_are_still_refused(ranks):
    for result in ranks:
        error = result["other_function"][0]
        assert error is not None
        assert "by_count" in error and "by_recency" in error and "0x" not in error


def test_replicas_without_a_store_need_the_same_eviction_sweeps(ranks):
    """A replica that swept expired rows discarded what the others kept: one key read
    different vectors on different ranks."""
    for result in ranks:
        error = result["replica_sweeps"][0]
        assert error is not None
        assert "evict_every" in error and "is 1 on rank 0 but None on rank 1" in error
