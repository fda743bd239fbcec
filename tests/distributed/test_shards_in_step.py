"""Two gloo ranks in spawned processes against one process on the concatenated batches:
steps where a shard gets no keys, and tables of two dims whose keys sit on different ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.distributed import shard_model
from dynembed.keys.buckets import NUM_BUCKETS, buckets_of, rank_of_bucket
from tests.distributed.helpers import run_ranks

WORLD = 2


def _owned_by(rank: int, n: int) -> list[int]:
    ids = np.arange(1000, dtype=np.int64)
    owner = rank_of_bucket(buckets_of(ids, NUM_BUCKETS), WORLD, NUM_BUCKETS)
    return ids[owner == rank][:n].tolist()


A, B = _owned_by(0, 4), _owned_by(1, 4)
# per step, each rank's keys: in steps 2 and 3 rank 1's shard gets no key at all
STEPS = [[[A[0], B[0]], [A[1], B[1]]], [[A[0]], [A[1]]], [[A[2]], [A[0]]], [[B[0]], [B[1]]]]


def _adam(mode: str) -> de.DynamicEmbedding:
    return de.DynamicEmbedding(dim=4, optimizer=de.optim.Adam(lr=0.1), seed=3, update_mode=mode)


def _mixed() -> de.EmbeddingCollection:
    return de.EmbeddingCollection(tables={
        "a": de.TableConfig(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1),
        "b": de.TableConfig(dim=3, optimizer=de.optim.SGD(lr=0.1), seed=2)})


def _coef(step: int, rows: int, dim: int) -> torch.Tensor:
    return torch.randn(16, dim, generator=torch.Generator().manual_seed(step))[:rows]


def _train_adam(emb, mode: str, keys_per_step, offsets, scale: float) -> None:
    """Loss: sum(rows * coef) * scale, linear: the ranks' gradients, averaged by the router
    (as DDP), equal one process's on all the keys with scale 1/W."""
    for step, keys in enumerate(keys_per_step):
        out = emb(torch.tensor(keys, dtype=torch.int64))
        coef = _coef(step, offsets[step] + len(keys), 4)[offsets[step]:]
        ((out * coef).sum() * scale).backward()
        if mode == "deferred":
            de.sparse_step(emb)


def _rows(table) -> dict:
    export = table.export()
    return {int(i): torch.cat([w, s]).numpy() for i, w, s in
            zip(export.ids, export.weights, export.optimizer_state)}


def _nonfinite_step(rank: int) -> dict:
    """Rank 0 sends a NaN gradient for a row rank 1 owns (nonfinite_grads='raise', the
    default); then both ranks take a finite step."""
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=5)
    shard_model(emb)
    keys = torch.tensor([B[0], A[1]] if rank == 0 else [A[0], B[1]])
    out = emb(keys)
    before = _rows(emb.table)
    grad = torch.ones_like(out)
    if rank == 0:
        grad[0, 1] = float("nan")
    try:
        out.backward(grad)
        raised = None
    except de.NonFiniteGradientError as e:
        raised = str(e)
    unchanged = _rows(emb.table)
    skipped = emb.table.counters.skipped_gradients
    emb(keys).sum().backward()  # the ranks are still in step: the job can go on
    return {"raised": raised, "before": before, "unchanged": unchanged,
            "after": _rows(emb.table), "counted": emb.table.counters.nonfinite_gradients,
            "skipped": skipped}


def _frozen_step(rank: int) -> dict:
    """Both ranks freeze a sharded table, train a dense weight on its rows, then unfreeze
    it and take a step (the collectives of a step stay paired on every rank)."""
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=5)
    shard_model(emb)
    keys = torch.tensor([A[0], B[0]] if rank == 0 else [A[1], B[1]])
    emb(keys)
    before = _rows(emb.table)
    emb.requires_grad_(False)
    weight = torch.ones(4, requires_grad=True)
    out = emb(keys)
    (out * weight).sum().backward()
    frozen = {"requires_grad": out.requires_grad, "rows": _rows(emb.table),
              "dense_grad": weight.grad is not None}
    emb.requires_grad_(True)
    emb(keys).sum().backward()
    return {"before": before, "frozen": frozen, "after": _rows(emb.table)}


def _scaled_steps(rank: int) -> dict:
    """Within de.loss_scale: a scaled step trains the sharded rows as an unscaled one, and
    an overflow on rank 0 alone skips the step on every rank, without raising."""
    keys = torch.tensor([A[0], B[0]] if rank == 0 else [A[1], B[1]])
    got = {}
    for scale in (None, 1024.0):
        emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=5)
        shard_model(emb)
        loss = (emb(keys) * _coef(rank, 2, 4)).sum()
        if scale is None:
            loss.backward()
        else:
            with de.loss_scale(scale):
                (loss * scale).backward()
        got[scale] = _rows(emb.table)
    before = _rows(emb.table)
    out = emb(keys)
    grad = torch.ones_like(out)
    if rank == 0:
        grad[1, 2] = float("inf")
    with de.loss_scale(1024.0):
        out.backward(grad)  # no NonFiniteGradientError on either rank
    # with a GradScaler each rank's scaler backs off, as each rank skipped: rank 1's own
    # gradient is finite, and without being told its scaler would keep its scale
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with de.loss_scale(scaler):
        scaler.scale((emb(keys) * grad).sum()).backward()
    scaler.update()
    return {"unscaled": got[None], "scaled": got[1024.0], "before": before,
            "after_overflow": _rows(emb.table), "scaler_after_overflow": scaler.get_scale()}


def _local_table_warnings(rank: int) -> dict:
    """A table trained without shard_model in a group of 2 (as under plain DDP) warns once;
    a sharded one does not."""
    import warnings
    out = {}
    for sharded in (False, True):
        emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1))
        if sharded:
            shard_model(emb)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(2):
                emb(torch.tensor([A[rank], B[rank]])).sum().backward()
        out[sharded] = [str(w.message) for w in seen if "trains on its own" in str(w.message)]
    return out


def _body(rank: int) -> dict:
    result = {"frozen": _frozen_step(rank), "scaled": _scaled_steps(rank),
              "local": _local_table_warnings(rank)}
    for mode in ("fused", "deferred"):
        emb = _adam(mode)
        shard_model(emb)
        offsets = [len(step[0]) if rank else 0 for step in STEPS]
        _train_adam(emb, mode, [step[rank] for step in STEPS], offsets, 1.0)
        result[mode] = (_rows(emb.table), emb.table.update_step)
    coll = _mixed()
    shard_model(coll)
    out_rows = coll({"a": torch.tensor([A[rank]]), "b": torch.tensor([B[rank]])}, concat=True)
    out_rows.sum().backward()
    result["mixed"] = {name: _rows(t) for name, t in coll.tables.items()}
    result["nonfinite"] = _nonfinite_step(rank)
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_body, tmp_path_factory.mktemp("ranks"), WORLD)


def _union(parts: list[dict]) -> dict:
    merged = {}
    for part in parts:
        assert not set(part) & set(merged), "a row on two ranks"
        merged.update(part)
    return merged


@pytest.mark.parametrize("mode", ["fused", "deferred"])
def test_shards_that_get_no_keys_keep_the_step_count(ranks, mode):
    """A shard without keys in a step once kept its update step, so Adam's bias correction
    (and Adagrad's lr decay) moved its rows differently from one process."""
    reference = _adam(mode)
    _train_adam(reference, mode, [step[0] + step[1] for step in STEPS], [0] * len(STEPS),
                1 / WORLD)
    assert [r[mode][1] for r in ranks] == [reference.table.update_step] * WORLD
    expected, got = _rows(reference.table), _union([r[mode][0] for r in ranks])
    assert set(got) == set(expected)
    for key, row in expected.items():
        np.testing.assert_allclose(got[key], row, rtol=1e-5, atol=1e-6)


def test_tables_of_two_dims_whose_keys_sit_on_different_ranks(ranks):
    """Each owner gets keys of one table only: its buffer holds one width, and the other
    table's empty part once reshaped it by the wrong dim (ValueError on both ranks)."""
    reference = _mixed()
    out = reference({"a": torch.tensor(A[:2]), "b": torch.tensor(B[:2])}, concat=True)
    (out.sum() / WORLD).backward()
    for name, table in reference.tables.items():
        got = _union([r["mixed"][name] for r in ranks])
        expected = _rows(table)
        assert set(got) == set(expected)
        for key, row in expected.items():
            np.testing.assert_allclose(got[key], row, rtol=1e-6)


def test_a_nonfinite_gradient_sent_to_another_owner_stops_every_rank(ranks):
    """Rank 0's NaN gradient is for a row rank 1 owns: both ranks raise (not only the
    owner), no row changed on either, the rank that computed it counts it, and the next
    step runs on both (no rank left waiting in a collective)."""
    for rank, result in enumerate(ranks):
        got = result["nonfinite"]
        assert got["raised"] is not None, f"rank {rank} did not raise"
        assert "rank 0 computed NaN or inf gradients" in got["raised"]
        assert "no row was updated on any rank" in got["raised"]
        assert got["unchanged"].keys() == got["before"].keys() and len(got["before"]) == 2
        for key, row in got["before"].items():
            np.testing.assert_array_equal(got["unchanged"][key], row)
            assert not np.array_equal(got["after"][key], row)  # the finite step applied
        assert got["counted"] == (1 if rank == 0 else 0)
        # each owner counts the rows it did not update (2 each: 4 in all, as one process
        # counts its 4 summed rows), so nothing is dropped silently
        assert got["skipped"] == 2


def test_a_frozen_sharded_table_keeps_its_rows_on_every_owner(ranks):
    """requires_grad_(False) on a sharded module: no owner updates a row (not even for
    another rank's keys), the dense part still trains, and unfreezing trains again."""
    for r in ranks:
        got = r["frozen"]
        assert not got["frozen"]["requires_grad"] and got["frozen"]["dense_grad"]
        assert set(got["frozen"]["rows"]) == set(got["before"])
        for key, row in got["before"].items():
            np.testing.assert_array_equal(got["frozen"]["rows"][key], row)
        assert any(not np.array_equal(got["after"][k], row)
                   for k, row in got["before"].items())


def test_loss_scaled_steps_train_as_unscaled_and_an_overflow_skips_every_rank(ranks):
    for r in ranks:
        got = r["scaled"]
        assert set(got["scaled"]) == set(got["unscaled"])
        for key, row in got["unscaled"].items():
            np.testing.assert_array_equal(got["scaled"][key], row)
        for key, row in got["before"].items():
            np.testing.assert_array_equal(got["after_overflow"][key], row)
        assert got["scaler_after_overflow"] == 512.0


def test_a_table_left_local_in_a_job_warns_once(ranks):
    """Under plain DistributedDataParallel every rank silently trained its own copy."""
    for rank, r in enumerate(ranks):
        assert len(r["local"][False]) == 1
        assert f"rank {rank} of 2" in r["local"][False][0] and "shard_model" in r["local"][False][0]
        assert r["local"][True] == []
