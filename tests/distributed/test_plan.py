"""shard_model in one process (a gloo group of one): routing, traffic, guards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

import dynembed as de
from dynembed.distributed import shard_model, unshard_model


@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def _model():
    return de.EmbeddingCollection(
        tables={"big": de.TableConfig(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=1),
                "small": de.TableConfig(dim=2, optimizer=de.optim.Adagrad(lr=0.1), seed=2,
                                        placement="replicated")})


def test_a_routed_model_trains_like_the_local_one(group_of_one):
    local, routed = _model(), _model()
    plan = shard_model(routed)
    assert sorted(plan.sharded) == ["tables.big"] and sorted(plan.replicated) == ["tables.small"]
    batch = {"big": torch.tensor([5, 7, 5, -1]), "small": ["a", "b", "a", "c"]}
    for model in (local, routed):
        for _ in range(3):
            out = model(batch, concat=True)
            (out * torch.arange(6.0)).sum().backward()
    for name in ("big", "small"):
        ids = local.tables[name].export().ids.numpy()
        np.testing.assert_allclose(routed.tables[name].find(ids).values.numpy(),
                                   local.tables[name].find(ids).values.numpy(), rtol=1e-6)
    assert plan.traffic.exchanges > 0
    assert plan.traffic.sent == 0  # alone: nothing leaves the rank
    routed.eval()
    torch.testing.assert_close(routed(batch, concat=True), local.eval()(batch, concat=True))
    unshard_model(routed)
    assert all(t.router is None for t in routed.tables.values())


def test_sampled_softmax_refuses_a_distributed_output_table(group_of_one):
    items = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1))
    shard_model(items)
    with pytest.raises(ValueError, match="distributed job"):
        de.sampled_softmax_loss(items, torch.randn(2, 4), [1, 2], num_sampled=4)


def test_shard_model_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_model(_model())


def test_placement_is_validated():
    with pytest.raises(ValueError, match="placement must be one of"):
        de.TableConfig(dim=4, placement="everywhere")


def test_the_fingerprint_compares_what_changes_what_rows_mean_but_not_budgets():
    from dynembed.distributed.plan import _fingerprint

    def table(**options):
        config = {"dim": 4, "optimizer": de.optim.SGD(lr=0.1), "seed": 1, **options}
        return de.DynamicTable(de.TableConfig(**config))

    base = _fingerprint(table())
    for field, options in {"read_only": {"read_only": True},
                           "default_value": {"default_value": 0.5},
                           "nonfinite_grads": {"nonfinite_grads": "skip"},
                           "eviction": {"eviction": de.policy.LFU(), "max_rows": 100},
                           "optimizer": {"optimizer": de.optim.SGD(lr=0.2)}}.items():
        other = _fingerprint(table(**options))
        assert {k for k in base if base[k] != other.get(k)} == {field}, field
    # machines may differ: a rank's memory budget is its own
    assert _fingerprint(table(max_rows=100)) == base
    assert _fingerprint(table(memory_budget="64MB")) == base
