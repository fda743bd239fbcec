"""CheckpointManager.restore's fresh start (no checkpoint) over stores that hold rows.

A run that stopped before its first checkpoint leaves its evicted rows (and lookup counts)
in the stores; restore() returned None and the next run trained on them silently.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dynembed as de


class Stored(nn.Module):
    """A table of at most 16 rows in memory over a RocksDB store: training evicts."""

    def __init__(self, path, **options) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=5,
                                       store=de.storage.RocksDBStore(path), max_rows=16,
                                       **options)
        self.head = nn.Linear(4, 1)

    def forward(self, keys):
        return self.head(self.emb(keys)).squeeze(1)


def _run(tmp_path, steps: int, store: str = "db", **restore_options) -> Stored:
    """A run restored by a CheckpointManager over ``tmp_path / "ckpt"`` that trains ``steps``
    steps and stops before its first checkpoint (every_steps is larger); its table is
    closed (every row flushed to the store)."""
    manager = de.checkpoint.CheckpointManager(tmp_path / "ckpt", every_steps=1000)
    model = Stored(tmp_path / store)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        start = (manager.restore(model, opt, **restore_options) or {}).get("step", 0)
        rng = np.random.default_rng(3)
        for step in range(start, steps):
            keys = torch.from_numpy(rng.integers(0, 50, 8) * 7 - 100)
            model(keys).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            manager.maybe_save(step + 1, model, opt, extra={"step": step + 1})
    finally:
        model.emb.table.close()
    return model


def _rows(tmp_path, store: str = "db") -> dict:
    """Every row the store holds: id -> (weights, state, count)."""
    table = Stored(tmp_path / store).emb.table
    got = table.export()
    table.close()
    return {int(i): (w.tolist(), s.tolist(), int(c))
            for i, w, s, c in zip(got.ids, got.weights, got.optimizer_state, got.counts)}


def test_a_fresh_start_over_a_used_store_is_refused_by_name(tmp_path):
    _run(tmp_path, 3)
    with pytest.raises(RuntimeError, match=r"no checkpoint in .*ckpt, but the stores of "
                                           r"tables \['emb.table'\] hold rows.*"
                                           r"restore\(used_stores='clear'\).*"
                                           r"restore\(used_stores='keep'\)"):
        _run(tmp_path, 3)


def test_used_stores_clear_starts_as_over_an_empty_store(tmp_path):
    _run(tmp_path, 5, store="reference")
    _run(tmp_path, 3)  # stops before its first checkpoint: rows left in its store
    model = _run(tmp_path, 5, used_stores="clear")
    assert model.emb.table.step == 5  # not 8
    assert _rows(tmp_path) == _rows(tmp_path, "reference")


def test_used_stores_keep_trains_on_from_the_stored_rows(tmp_path):
    _run(tmp_path, 3)
    kept = _rows(tmp_path)
    model = _run(tmp_path, 3, used_stores="keep")
    assert model.emb.table.step == 6
    rows = _rows(tmp_path)
    assert set(kept) <= set(rows)
    assert sum(c for *_, c in rows.values()) == 2 * sum(c for *_, c in kept.values())


def test_a_restore_empties_the_stores_whatever_used_stores_says(tmp_path):
    """With a checkpoint there is no fresh start: used_stores changes nothing."""
    manager = de.checkpoint.CheckpointManager(tmp_path / "ckpt")
    model = Stored(tmp_path / "db")
    for start in (0, 10, 20):  # 30 keys, 16 in memory: the rest in the store
        model(torch.arange(start, start + 10)).sum().backward()
    manager.save(1, model, extra={"step": 1})
    model(torch.arange(30, 40)).sum().backward()  # after the checkpoint
    model.emb.table.close()
    model = Stored(tmp_path / "db")
    assert manager.restore(model, used_stores="refuse") == {"step": 1}
    assert sorted(model.emb.table.export().ids.tolist()) == list(range(30))
    model.emb.table.close()


def test_a_read_only_table_over_a_store_is_no_used_store(tmp_path):
    """A read-only table's store holds the rows it reads (frozen, pretrained ones)."""
    _run(tmp_path, 3, store="pretrained")
    model = Stored(tmp_path / "pretrained", read_only=True)
    assert de.checkpoint.CheckpointManager(tmp_path / "other").restore(model) is None
    assert model.emb.table.count_below_memory() > 0
    model.emb.table.close()


@pytest.mark.parametrize("bad", ["wipe", None, 1])
def test_used_stores_is_checked(tmp_path, bad):
    manager = de.checkpoint.CheckpointManager(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="used_stores must be one of"):
        manager.restore(nn.Linear(2, 2), used_stores=bad)
