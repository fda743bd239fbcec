"""de.clip_grad_norm_ in a distributed job: the shards' norms combine into the norm of one
process (two gloo ranks in spawned processes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.distributed import shard_model
from tests.distributed.helpers import run_ranks

WORLD, STEPS, BATCH = 2, 3, 12


def _model() -> de.EmbeddingCollection:
    opt = de.optim.Adagrad(lr=0.3)
    return de.EmbeddingCollection(tables={
        "big": de.TableConfig(dim=3, optimizer=opt, seed=1, update_mode="deferred"),
        "small": de.TableConfig(dim=2, optimizer=opt, seed=2, update_mode="deferred",
                                placement="replicated")})


def _batches(rank: int, step: int) -> list[dict]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return [{"big": torch.randint(0, 30, (BATCH,), generator=gen),
             "small": torch.randint(0, 5, (BATCH,), generator=gen)} for _ in range(2)]


def _loss(model, batch) -> torch.Tensor:
    out = model(batch, concat=True)
    return (out * torch.linspace(-1.0, 2.0, out.shape[1])).sum(1).pow(2).mean()


def _rows(model) -> dict:
    return {name: {int(i): w for i, w in zip(t.export().ids.tolist(), t.export().weights.numpy())}
            for name, t in model.tables.items()}


def _body(rank: int) -> tuple:
    model = _model()
    shard_model(model, timeout=30)
    norms = {}
    for p in (2.0, math.inf):
        norms[p] = []
        for step in range(STEPS):
            for batch in _batches(rank, step):
                _loss(model, batch).backward()
            norms[p].append(float(de.clip_grad_norm_(model, 0.01, p)))
            de.sparse_step(model)
    return norms, _rows(model)


def test_the_ranks_clip_with_the_norm_of_one_process(tmp_path):
    """Each rank's loss is averaged over the ranks (as DDP averages), so one process
    trains on the mean of the ranks' losses."""
    ranks = run_ranks(_body, tmp_path, WORLD)
    one = _model()
    for p in (2.0, math.inf):
        for step in range(STEPS):
            for micro in range(2):
                sum(_loss(one, _batches(r, step)[micro]) for r in range(WORLD)).div(
                    WORLD).backward()
            norm = float(de.clip_grad_norm_(one, 0.01, p))
            assert norm > 0.02  # it clips
            for norms, _ in ranks:
                assert norms[p][step] == pytest.approx(norm, rel=1e-5)
            de.sparse_step(one)
    expected = _rows(one)
    for name in ("big", "small"):
        got = {}
        for _, rows in ranks:
            got.update(rows[name])  # a replica's rows are the same on every rank
        assert sorted(got) == sorted(expected[name])
        for key, row in expected[name].items():
            np.testing.assert_allclose(got[key], row, rtol=1e-5, atol=1e-6)
