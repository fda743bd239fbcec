"""A fresh start (no checkpoint to restore) over stores that hold rows already.

A restore empties the stores and loads the checkpoint's rows; a fresh start left them as
they were, so a job restarted before its first checkpoint trained on the rows its failed
attempt had evicted (and their lookup counts), and a new job on an earlier one's, silently.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynembed as de
from dynembed.train.runtime import Runtime


class Stored(nn.Module):
    """A table of at most 16 rows in memory over a RocksDB store: training evicts."""

    def __init__(self, path) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=5,
                                       store=de.storage.RocksDBStore(path), max_rows=16)
        self.head = nn.Linear(4, 1)

    def forward(self, keys):
        return self.head(self.emb(keys)).squeeze(1)


def _attempt(tmp_path, steps: int, store: str = "db", **options):
    """An attempt of the job: a Runtime over ``tmp_path / "ckpt"``, restored, then ``steps``
    steps trained; it fails in its last step, before its first checkpoint (a loop that ends
    saves its last step). Returns the model."""
    rt = Runtime(tmp_path / "ckpt", every_steps=1000, **options).start()
    model = Stored(tmp_path / store)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        rt.prepare(model)
        rt.restore(opt)
        for step in rt.steps(steps):
            keys = torch.from_numpy(rt.batch_indices(step, 8, 50) * 7 - 100)
            model(keys).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if step == steps - 1:
                raise _Failed
    except _Failed:
        pass
    finally:
        rt.close()
        model.emb.table.close()  # flushes: every row to the store
    return model


class _Failed(Exception):
    """A worker's failure."""


def _rows(tmp_path, store: str) -> dict:
    """Every row the store of a closed table holds: id -> (weights, state, count)."""
    table = Stored(tmp_path / store).emb.table
    got = table.export()
    table.close()
    return {int(i): (w.tolist(), s.tolist(), int(c))
            for i, w, s, c in zip(got.ids, got.weights, got.optimizer_state, got.counts)}


def test_a_restart_before_the_first_checkpoint_starts_over_empty_stores(tmp_path, monkeypatch):
    _attempt(tmp_path, 5, store="reference")
    _attempt(tmp_path, 3)  # fails before its first checkpoint: rows left in its store
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("TORCHELASTIC_RESTART_COUNT", "1")):
        monkeypatch.setenv(name, value)  # torchrun's restart of a job of one worker
    _attempt(tmp_path, 5)
    assert _rows(tmp_path, "db") == _rows(tmp_path, "reference")  # counts of 8 steps once


def test_a_new_job_over_a_used_store_is_refused_by_name(tmp_path):
    _attempt(tmp_path, 3)
    with pytest.raises(RuntimeError, match=r"tables \['emb.table'\] hold rows.*"
                                           r"used_stores='clear'.*used_stores='keep'"):
        _attempt(tmp_path, 3)


def test_used_stores_clear_empties_them_and_their_clock(tmp_path):
    _attempt(tmp_path, 5, store="reference")
    _attempt(tmp_path, 3)
    model = _attempt(tmp_path, 5, used_stores="clear")
    assert model.emb.table.step == 5 and model.emb.table.update_step == 5  # not 8
    assert _rows(tmp_path, "db") == _rows(tmp_path, "reference")


def test_used_stores_keep_starts_from_them_and_checkpoints_step_0(tmp_path):
    _attempt(tmp_path, 3, store="earlier")  # the rows a job starts from on purpose
    (tmp_path / "earlier").rename(tmp_path / "db")
    kept = _rows(tmp_path, "db")
    _attempt(tmp_path, 4, used_stores="keep")  # fails before its first checkpoint
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-0000000000"]
    assert _rows(tmp_path, "db") != kept  # trained on
    rt = Runtime(tmp_path / "ckpt").start()  # the restart: from the same rows again
    model = Stored(tmp_path / "db")
    rt.prepare(model)
    rt.restore(torch.optim.SGD(model.parameters(), lr=0.1))
    assert rt.step == 0
    de.checkpoint.load_step(model.emb.table)  # every row of the checkpoint into the store
    rt.close()
    model.emb.table.close()
    assert _rows(tmp_path, "db") == kept


def test_used_stores_is_checked(tmp_path):
    with pytest.raises(ValueError, match="used_stores must be one of"):
        Runtime(tmp_path, used_stores="wipe")


def test_an_empty_store_needs_nothing(tmp_path):
    model = _attempt(tmp_path, 2)
    assert model.emb.table.step == 2 and not list((tmp_path / "ckpt").glob("step-*"))
    assert len(_rows(tmp_path, "db")) == 16  # 2 steps of 8 keys


def test_a_read_only_table_over_a_store_is_no_used_store(tmp_path):
    """A read-only table's store holds the rows it reads (frozen, pretrained ones)."""
    _attempt(tmp_path, 3, store="pretrained")
    rt = Runtime(tmp_path / "ckpt2").start()
    model = nn.Module()
    model.emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), read_only=True,
                                    store=de.storage.RocksDBStore(tmp_path / "pretrained"))
    rt.prepare(model)
    rt.restore()
    assert model.emb.table.count_below_memory() > 0  # kept
    rt.close()
    model.emb.table.close()
