"""``dynembed export`` from a factory that builds its tables over stores.

Loading the checkpoint empties each table's store and writes the checkpoint's rows into it:
a factory reusing the training job's store path (the obvious reuse of a model builder) made
an export silently roll that job's store back to the checkpoint and set its clock to 0.
"""

from __future__ import annotations

import torch
from torch import nn

import dynembed as de
from dynembed import cli

STORE = {"path": None}
"""Where :func:`build_over_store` puts its store (set by the test)."""


class Model(nn.Module):
    def __init__(self, store=None) -> None:
        super().__init__()
        self.embeddings = de.EmbeddingCollection(
            tables={"item": de.TableConfig(dim=4, seed=1, max_rows=8,
                                           optimizer=de.optim.SGD(lr=0.1), store=store)},
            features={"item": de.FeatureConfig(table="item")})
        self.dense = nn.Linear(4, 1)


def build_over_store():
    return Model(de.storage.RocksDBStore(STORE["path"]))


def test_a_factory_over_stores_is_refused_and_the_store_left_as_it_was(tmp_path, capsys,
                                                                       monkeypatch):
    STORE["path"] = tmp_path / "store"
    model = build_over_store()
    table = model.embeddings.tables["item"]
    for start in (0, 5, 10, 15):  # 20 keys, 8 in memory: 12 in the store
        model.embeddings({"item": torch.arange(start, start + 5)})
    de.checkpoint.save(tmp_path / "ckpt", model, extra={"step": 1})
    for start in (20, 25):  # after the checkpoint
        model.embeddings({"item": torch.arange(start, start + 5)})
    table.close()
    before = build_over_store().embeddings.tables["item"]
    rows = sorted(before.export().ids.tolist())
    step = before.step
    before.close()
    monkeypatch.syspath_prepend(str(tmp_path))
    code = cli.main(["export", "--factory", f"{__name__}:build_over_store", "--checkpoint",
                     str(tmp_path / "ckpt"), "--name", "m", "--out", str(tmp_path / "m")])
    assert code == 1
    err = capsys.readouterr().err
    assert f"--factory {__name__}:build_over_store: builds tables ['embeddings.tables.item'] over " \
           "stores" in err and "without store=" in err, err
    after = build_over_store().embeddings.tables["item"]
    assert sorted(after.export().ids.tolist()) == rows == list(range(30))
    assert after.step == step
    after.close()
    assert not (tmp_path / "m").exists()
