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

    base = _fingerprint(table(), 4096)
    for field, options in {"read_only": {"read_only": True},
                           "default_value": {"default_value": 0.5},
                           "nonfinite_grads": {"nonfinite_grads": "skip"},
                           "eviction": {"eviction": de.policy.LFU(), "max_rows": 100},
                           "optimizer": {"optimizer": de.optim.SGD(lr=0.2)},
                           "padding key id": {"padding_key": "<pad>"}}.items():
        other = _fingerprint(table(**options), 4096)
        assert {k for k in base if base[k] != other.get(k)} == {field}, field
    # machines may differ: a rank's memory budget is its own
    assert _fingerprint(table(max_rows=100), 4096) == base
    assert _fingerprint(table(memory_budget="64MB"), 4096) == base

    # ... except a replica without a store, which discards what its limit evicts
    replica = _fingerprint(table(placement="replicated"), 4096)
    assert _fingerprint(table(placement="replicated", max_rows=100), 4096) != replica
    stored = [_fingerprint(table(placement="replicated", max_rows=rows,
                                 store=de.storage.MemoryStore()), 4096) for rows in (100, 200)]
    assert stored[0] == stored[1]  # evicted rows stay in the store: limits may differ
    assert _fingerprint(table(), 1024) != base  # key ownership


def test_a_job_group_without_cpu_collectives_still_shards_and_trains(tmp_path):
    """As with NCCL, the job's group serves no CPU objects ("cuda:gloo" on this CPU-only
    build fails any CPU collective): shard_model's checks and the row exchanges must use
    dynembed's own gloo group."""
    dist.init_process_group("cuda:gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        if not torch.cuda.is_available():
            with pytest.raises((AssertionError, RuntimeError)):  # no CUDA in this build
                dist.all_gather_object([None], "no CPU collective on this group")
        local, routed = _model(), _model()
        plan = shard_model(routed)
        batch = {"big": torch.tensor([5, 7, 5]), "small": ["a", "b", "a"]}
        for model in (local, routed):
            model(batch, concat=True).sum().backward()
        torch.testing.assert_close(routed.eval()(batch, concat=True),
                                   local.eval()(batch, concat=True))
        assert plan.traffic.exchanges > 0
    finally:
        dist.destroy_process_group()


def test_shard_model_names_bad_arguments(group_of_one):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        shard_model("model")
    for bad in (0, -5, None, "10", float("inf"), True):
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            shard_model(_model(), timeout=bad)


def test_a_checkpoint_of_other_key_buckets_is_refused_by_a_sharded_model(group_of_one,
                                                                          tmp_path):
    """Restored with other buckets than the router's, keys loaded on ranks never asked for
    them: their owners served defaults or made fresh rows."""
    source = _model()
    out = source({"big": torch.arange(50), "small": ["a"]})
    (out["big"].sum() + out["small"].sum()).backward()
    de.checkpoint.save(tmp_path / "c", source, num_buckets=4096)
    routed = _model()
    shard_model(routed, num_buckets=1024)
    with pytest.raises(de.errors.CheckpointError, match="num_buckets=4096"):
        de.checkpoint.load(tmp_path / "c", routed)
    assert routed.tables["big"].size() == 0


def test_a_half_set_launcher_environment_is_refused():
    from dynembed.distributed import JobEnv
    for env, given in (({"WORLD_SIZE": "2"}, "WORLD_SIZE"), ({"RANK": "1"}, "RANK")):
        with pytest.raises(ValueError, match=f"{given} is set but"):
            JobEnv.from_environ(env)
    assert JobEnv.from_environ({}).world_size == 1


@pytest.mark.parametrize("placement", ["sharded", "replicated"])
def test_a_routed_table_stepped_twice_in_one_backward_warns(group_of_one, placement):
    """The owner applies each routed lookup's update on its own, as a local fused table
    does, so a routed table looked up twice in one graph steps twice too."""
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), placement=placement)
    shard_model(emb)
    with pytest.warns(UserWarning, match="one backward\\(\\) stepped a dynembed table") as caught:
        (emb(torch.tensor([1, 2])) * emb(torch.tensor([2, 3]))).sum().backward()
    assert caught[0].filename == __file__
