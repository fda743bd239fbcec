"""Failures inside a routed lookup on two gloo ranks (spawned processes): an owner whose
lookup raises, a replica whose lookup raises, ranks that make different lookups, and NaN
gradients on keys their owner did not admit."""

from __future__ import annotations

import datetime
import os
import pickle
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dynembed as de
from dynembed.distributed import shard_model
from dynembed.errors import StoreError
from dynembed.keys.buckets import NUM_BUCKETS, buckets_of, rank_of_bucket

WORLD = 2
COLLECTIVE_TIMEOUT = 20  # seconds a collective may wait: a rank left waiting fails by then
DEADLINE = 120  # seconds for all ranks of one scenario, start-up included


def _owned_by(rank: int, n: int) -> list[int]:
    ids = np.arange(5000, dtype=np.int64)
    owner = rank_of_bucket(buckets_of(ids, NUM_BUCKETS), WORLD, NUM_BUCKETS)
    return ids[owner == rank][:n].tolist()


A, B = _owned_by(0, 120), _owned_by(1, 120)


def _error(call) -> tuple[str, str] | None:
    """(type name, message) of what ``call()`` raised, or None."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - reported to the test
        return type(e).__name__, str(e)
    return None


def _step(model, keys) -> None:
    out = model(keys)
    out = torch.cat(list(out.values()), dim=1) if isinstance(out, dict) else out
    out.sum().backward()


# ---------------------------------------------------------------- scenarios, run per rank
def _owner_over_budget(rank: int) -> dict:
    """Rank 0's row limit (2) is below what rank 1 asks of it at once (4 rows)."""
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=1.0), seed=1,
                              max_rows=2 if rank == 0 else None)
    shard_model(emb, timeout=COLLECTIVE_TIMEOUT)
    keys = torch.tensor(A[:4] if rank == 1 else B[:1])
    first = _error(lambda: _step(emb, keys))
    # the job catches the error and goes on with a batch that fits: still in step
    second = _error(lambda: _step(emb, torch.tensor([A[5]] if rank == 1 else [B[5]])))
    return {"first": first, "second": second}


class _FailingStore(de.storage.MemoryStore):
    """A store whose reads fail while ``fail`` is set."""

    fail = False

    def _get(self, ids):
        if self.fail:
            raise StoreError("store read failed (injected by the test)")
        return super()._get(ids)


def _owner_store_fails(rank: int) -> dict:
    """Table "b" (the second of the lookup, dim 3) of rank 1 cannot read its store."""
    stores = {"a": _FailingStore(), "b": _FailingStore()}
    coll = de.EmbeddingCollection(tables={
        "a": de.TableConfig(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1, store=stores["a"]),
        "b": de.TableConfig(dim=3, optimizer=de.optim.SGD(lr=0.1), seed=2, store=stores["b"])})
    shard_model(coll, timeout=COLLECTIVE_TIMEOUT)
    stores["b"].fail = rank == 1
    keys = {"a": torch.tensor([A[rank], B[rank]]), "b": torch.tensor([A[rank], B[rank]])}
    first = _error(lambda: _step(coll, keys))
    stores["b"].fail = False
    second = _error(lambda: _step(coll, keys))
    return {"first": first, "second": second}


def _admission_model() -> de.EmbeddingCollection:
    """A table whose keys need two sightings (dim 3, first in the lookup: its trailer
    entries are 3 floats wide) next to one of another dim without admission."""
    return de.EmbeddingCollection(tables={
        "a": de.TableConfig(dim=3, optimizer=de.optim.SGD(lr=0.1), seed=1,
                            admission=de.policy.FrequencyAdmission(threshold=2)),
        "b": de.TableConfig(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=2)})


def _admission_keys(rank: int) -> dict[str, torch.Tensor]:
    """Per owner, 15 keys seen twice (admitted) and 15 seen once (not admitted: they read
    the zero default) for table "a", shuffled; 30 distinct ids per owner is 4 bytes of
    admitted bits, more than one trailer entry."""
    keys = []
    for owned in (A, B):
        mine = owned[rank * 30:(rank + 1) * 30]
        keys += mine[:15] * 2 + mine[15:]
    keys = np.random.default_rng(rank).permutation(keys)
    return {"a": torch.tensor(keys), "b": torch.tensor(keys[:20])}


def _normalized_loss(out: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """x / |x| per row: NaN (0/0) on the zero default row of a key that was not admitted."""
    return sum((o / o.norm(dim=1, keepdim=True)).sum() for o in out.values()) * scale


def _rows(table) -> dict[int, np.ndarray]:
    export = table.export()
    return {int(i): w.numpy() for i, w in zip(export.ids, export.weights)}


def _totals(table) -> tuple[int, int, int]:
    t = table.stats().totals
    return t.updated_rows, t.unadmitted_gradients, t.nonfinite_gradients


def _nan_on_unadmitted(rank: int) -> dict:
    """NaN gradients only on keys that were not admitted; then a NaN on an admitted key."""
    coll = _admission_model()
    shard_model(coll, timeout=COLLECTIVE_TIMEOUT)
    error = _error(lambda: _normalized_loss(coll(_admission_keys(rank)), 1.0).backward())
    result = {"error": error, "rows": {n: _rows(t) for n, t in coll.tables.items()},
              "totals": {n: _totals(t) for n, t in coll.tables.items()}}
    # rank 0's NaN for a key that rank 1 owns and admitted (seen twice, now in memory)
    out = coll({"a": torch.tensor([B[0], A[rank]]), "b": torch.tensor([B[0]])})
    grad = torch.ones_like(out["a"])
    if rank == 0:
        grad[0, 0] = float("nan")
    result["admitted_nan"] = _error(lambda: out["a"].backward(grad))
    return result


BIG = 2.5e38  # below float32's largest (3.4e38), above half of it


def _large_finite_gradients(rank: int) -> dict:
    """Both ranks' gradients of one key are BIG / 2 * 2 each: finite, and so is their
    average (the one-process gradient of the global batch)."""
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=1e-40), seed=1)
    shard_model(emb, timeout=COLLECTIVE_TIMEOUT)
    out = emb(torch.tensor([A[0], A[0]]))
    error = _error(lambda: (out.sum(1) * BIG).mean().backward())
    then = _error(lambda: _step(emb, torch.tensor([A[1], B[1]])))  # still in step
    return {"error": error, "then": then, "totals": _totals(emb.table)}


def _replica_store_fails(rank: int) -> dict:
    """A replicated table (after a sharded one in the same lookup) whose store fails on
    rank 1 only."""
    store = _FailingStore()
    coll = de.EmbeddingCollection(tables={
        "s": de.TableConfig(dim=3, optimizer=de.optim.SGD(lr=0.1), seed=1),
        "r": de.TableConfig(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=2, store=store,
                            placement="replicated")})
    shard_model(coll, timeout=COLLECTIVE_TIMEOUT)
    store.fail = rank == 1
    keys = {"s": torch.tensor([A[rank], B[rank]]), "r": torch.tensor([A[rank], B[rank]])}
    first = _error(lambda: _step(coll, keys))
    store.fail = False
    second = _error(lambda: _step(coll, keys))
    return {"first": first, "second": second}


class _Model(torch.nn.Module):
    """Sharded modules "a" and "b" (alike but for the seed), "c" of another dim, and a
    replicated "r" of the same dim."""

    def __init__(self) -> None:
        super().__init__()
        sgd = de.optim.SGD(lr=0.1)
        self.a = de.DynamicEmbedding(dim=4, optimizer=sgd, seed=1)
        self.b = de.DynamicEmbedding(dim=4, optimizer=sgd, seed=2)
        self.c = de.DynamicEmbedding(dim=3, optimizer=sgd, seed=3)
        self.r = de.DynamicEmbedding(dim=4, optimizer=sgd, seed=4, placement="replicated")


def _different_lookups(rank: int) -> dict:
    """Rank 0 looks up "a" in training mode each time; rank 1 another module, or "a" in
    eval mode. Then both take the same step."""
    model = _Model()
    shard_model(model, timeout=COLLECTIVE_TIMEOUT)
    keys = torch.tensor([A[rank], B[rank]])
    out = {}
    for case, other in (("same dim", model.b), ("other dim", model.c),
                        ("replicated", model.r), ("eval", model.a)):
        module = model.a if rank == 0 else other
        module.train(case != "eval" or rank == 0)
        out[case] = _error(lambda m=module: _step(m, keys) if m.training else m(keys))
        module.train()
    out["rows"] = {name: getattr(model, name).table.size() for name in "abcr"}
    out["then"] = _error(lambda: _step(model.a, keys))  # still in step
    return out


SCENARIOS = {"owner_over_budget": _owner_over_budget, "owner_store_fails": _owner_store_fails,
             "nan_on_unadmitted": _nan_on_unadmitted,
             "large_finite_gradients": _large_finite_gradients,
             "replica_store_fails": _replica_store_fails,
             "different_lookups": _different_lookups}


def _worker(rank: int, scenario: str, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                            world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
    try:
        result, error = SCENARIOS[scenario](rank), None
    except BaseException:  # noqa: BLE001 - reported to the test
        result, error = None, traceback.format_exc()
    with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump((result, error), f)
    dist.destroy_process_group()


def _run(scenario: str, folder) -> list[dict]:
    """Runs a scenario on WORLD ranks; fails (and kills them) past DEADLINE seconds."""
    context = mp.start_processes(_worker, args=(scenario, str(folder / "init"), str(folder)),
                                 nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise AssertionError(f"{scenario}: ranks still running after {DEADLINE}s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = []
    for rank in range(WORLD):
        with open(folder / f"rank{rank}.pkl", "rb") as f:
            result, error = pickle.load(f)
        assert error is None, f"rank {rank}:\n{error}"
        results.append(result)
    return results


# ---------------------------------------------------------------------------- tests
def test_an_owner_over_its_budget_raises_on_every_rank(tmp_path):
    """The owner's MemoryBudgetError once left rank 1 waiting in the rows all-to-all (a gloo
    error later), and rank 0's next lookup paired with the wrong collective."""
    owner, requester = _run("owner_over_budget", tmp_path)
    assert owner["first"][0] == "MemoryBudgetError", owner["first"]
    assert requester["first"][0] == "DistributedError", requester["first"]
    assert "rank 0 (table 0 of this lookup, dim 2)" in requester["first"][1]
    assert owner["second"] is None and requester["second"] is None, "the ranks left step"


def test_a_failing_store_on_one_owner_names_its_rank_and_table(tmp_path):
    """Rank 1's store of table "b" fails: rank 1 raises the StoreError, rank 0 a
    DistributedError naming rank 1 and table 1 (dim 3); the retry runs on both."""
    requester, owner = _run("owner_store_fails", tmp_path)
    assert owner["first"] == ("StoreError", "store read failed (injected by the test)")
    assert requester["first"][0] == "DistributedError", requester["first"]
    assert "rank 1 (table 1 of this lookup, dim 3)" in requester["first"][1]
    assert owner["second"] is None and requester["second"] is None, "the ranks left step"


def test_nan_gradients_of_unadmitted_keys_are_dropped_as_in_one_process(tmp_path):
    """The requester flagged every row's NaN before the owner dropped the rows it did not
    admit, so both ranks raised NonFiniteGradientError where one process drops and counts
    them (unadmitted_gradients) and applies the rest. A NaN on an admitted key still
    raises on every rank."""
    ranks = _run("nan_on_unadmitted", tmp_path)
    reference = _admission_model()
    both = [_admission_keys(rank) for rank in range(WORLD)]
    keys = {n: torch.cat([k[n] for k in both]) for n in both[0]}
    _normalized_loss(reference(keys), 1 / WORLD).backward()
    assert reference.tables["a"].stats().totals.unadmitted_gradients == 60  # as designed
    for rank, result in enumerate(ranks):
        assert result["error"] is None, f"rank {rank}: {result['error']}"
    for name, table in reference.tables.items():
        expected, got = _rows(table), {}
        for result in ranks:
            got.update(result["rows"][name])
        assert set(got) == set(expected), name
        for key, row in expected.items():
            np.testing.assert_allclose(got[key], row, rtol=1e-5, atol=1e-6)
        totals = np.sum([result["totals"][name] for result in ranks], axis=0)
        assert tuple(totals) == _totals(table), name
    for rank, result in enumerate(ranks):
        assert result["admitted_nan"] is not None, f"rank {rank} did not raise"
        kind, message = result["admitted_nan"]
        assert kind == "NonFiniteGradientError" and "rank 0 computed" in message, message


def test_large_finite_gradients_update_as_in_one_process(tmp_path):
    """The owner summed the ranks' parts before scaling them by 1/W: the sum overflowed to
    inf, and the owner alone raised NonFiniteGradientError while the other rank went on
    (one process sees no inf)."""
    reference = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=1e-40), seed=1)
    (reference(torch.tensor([A[0]] * 4)).sum(1) * BIG).mean().backward()  # no error
    owner, other = _run("large_finite_gradients", tmp_path)
    for result in (owner, other):
        assert result["error"] is None and result["then"] is None, result
    assert owner["totals"][2] == 0  # no nonfinite gradient anywhere


def test_a_failing_store_on_one_replica_raises_on_every_rank(tmp_path):
    """Rank 1's replica raised its StoreError while rank 0 went on to the backward's
    all-gather, which rank 1 paired with its next lookup: gloo aborted both processes."""
    requester, replica = _run("replica_store_fails", tmp_path)
    assert replica["first"] == ("StoreError", "store read failed (injected by the test)")
    assert requester["first"][0] == "DistributedError", requester["first"]
    assert "replica of a replicated table: rank 1 (table 0 of this lookup, dim 4)" in \
        requester["first"][1]
    assert requester["second"] is None and replica["second"] is None, "the ranks left step"


def test_ranks_that_make_different_lookups_raise_on_every_rank(tmp_path):
    """Another module of the same dim silently took the other rank's keys into the wrong
    table; another dim, a replicated module or eval mode on one rank aborted the processes
    (gloo: payloads of other sizes). Now every rank raises at the first collective, before
    any row changes, and the next step runs."""
    ranks = _run("different_lookups", tmp_path)
    for rank, result in enumerate(ranks):
        for case in ("same dim", "other dim", "replicated", "eval"):
            kind, message = result[case] or (None, None)
            assert kind == "DistributedError", f"rank {rank}, {case}: {result[case]}"
            assert f"ranks [{1 - rank}] made a different lookup than rank {rank}" in message
        assert result["rows"] == {"a": 0, "b": 0, "c": 0, "r": 0}, "rows changed"
        assert result["then"] is None, f"rank {rank}: {result['then']}"
    assert "looked up sharded tables 'a.table' (dim 4) in training mode" in \
        ranks[0]["eval"][1]
    assert "looked up sharded tables 'a.table' (dim 4) in eval mode" in ranks[1]["eval"][1]
    assert "replicated tables 'r.table' (dim 4)" in ranks[1]["replicated"][1]
