"""Pickling a model (torch.save(model), copy.deepcopy): memory-only tables travel whole;
tables with rows elsewhere are refused by name."""

import copy
import io

import pytest
import torch

import dynembed as de


def _rows(emb, keys):
    return emb.table.read(emb.table.ids_of(keys).ids)


def test_a_memory_table_deep_copies_and_pickles_whole_and_independent():
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.5), seed=1,
                              initializer=de.init.Normal(std=1.0), key_log=True)
    emb(["a", "b"]).sum().backward()
    twin = copy.deepcopy(emb)
    assert torch.equal(_rows(twin, ["a", "b"]), _rows(emb, ["a", "b"]))
    twin(["a", "c"]).sum().backward()  # trains the copy only
    assert emb.table.size() == 2 and twin.table.size() == 3
    assert not torch.equal(_rows(twin, ["a"]), _rows(emb, ["a"]))

    buffer = io.BytesIO()
    torch.save(emb, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(_rows(loaded, ["a", "b"]), _rows(emb, ["a", "b"]))
    assert sorted(loaded.table.key_log.lookup(loaded.table.ids_of(["a", "b"]).ids)) == ["a",
                                                                                      "b"]


def test_a_table_over_a_store_is_refused_by_name_and_its_state_dict_has_every_row(tmp_path):
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), max_rows=4,
                              store=de.storage.RocksDBStore(tmp_path / "rows"))
    for i in range(5):
        emb(torch.arange(3 * i, 3 * i + 3))
    with pytest.raises(TypeError, match="with a store cannot be pickled or copied"):
        copy.deepcopy(emb)
    with pytest.raises(TypeError, match=r"de\.checkpoint\.save"):
        torch.save(emb, io.BytesIO())
    state = emb.state_dict()  # the way the error points to: rows in the store too
    assert state["table.ids"].shape[0] == 15
    emb.table.close()


def test_a_lazily_opened_table_is_refused_by_name(tmp_path):
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1))
    emb(torch.arange(10))
    de.checkpoint.save(tmp_path / "ck", tables={"t": emb.table})
    fresh = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1))
    de.checkpoint.load(tmp_path / "ck", tables={"t": fresh.table}, lazy=True)
    assert fresh.table.base is not None
    with pytest.raises(TypeError, match="a lazily opened checkpoint cannot be pickled"):
        copy.deepcopy(fresh)
