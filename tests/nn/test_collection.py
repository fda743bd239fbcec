"""EmbeddingCollection: named features, shared tables, one fused lookup per table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.errors import KeyInputError, KeyValueError


def _collection(optimizer=None):
    opt = optimizer or de.optim.Adagrad(lr=0.1)
    return de.EmbeddingCollection(
        tables={"words": de.TableConfig(dim=4, optimizer=opt, seed=1),
                "user": de.TableConfig(dim=3, optimizer=opt, seed=2)},
        features={"title": de.FeatureConfig(table="words", pooling="sum"),
                  "query": de.FeatureConfig(table="words", pooling="mean"),
                  "user_id": "user"})


BATCH = {"title": [["red", "shoe"], ["blue"]], "query": [["shoe"], ["red", "hat"]],
         "user_id": [7, 8]}


def test_dict_and_concat_outputs():
    coll = _collection()
    out = coll(BATCH)
    assert list(out) == ["title", "query", "user_id"]
    assert out["title"].shape == (2, 4) and out["user_id"].shape == (2, 3)
    cat = coll(BATCH, concat=True)
    assert cat.shape == (2, 11)
    torch.testing.assert_close(cat, torch.cat(list(out.values()), dim=1))
    assert coll.tables["words"].size() == 4 and coll.tables["user"].size() == 2


def test_shared_table_is_looked_up_once_and_gradients_combine():
    coll = _collection(de.optim.Adagrad(lr=0.1))
    # Reference: the same rows through one DynamicEmbedding call per table.
    words = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=1)
    users = de.DynamicEmbedding(dim=3, optimizer=de.optim.Adagrad(lr=0.1), seed=2)
    out = coll(BATCH)
    calls = coll.tables["words"].stats().totals.lookup_calls
    assert calls == 1  # title and query in one call
    loss = sum((v ** 2).sum() for v in out.values())
    loss.backward()
    w = words(["red", "shoe", "blue", "shoe", "red", "hat"])
    u = users([7, 8])
    title = torch.stack([w[0] + w[1], w[2]])
    query = torch.stack([w[3], (w[4] + w[5]) / 2])
    ((title ** 2).sum() + (query ** 2).sum() + (u ** 2).sum()).backward()
    keys = ["red", "shoe", "blue", "hat"]
    torch.testing.assert_close(coll.tables["words"].find(keys).values,
                               words.table.find(keys).values)
    torch.testing.assert_close(coll.tables["user"].find([7, 8]).values,
                               users.table.find([7, 8]).values)


def test_values_offsets_input_and_per_sample_weights():
    coll = _collection()
    a = coll({"title": (["red", "shoe", "blue"], torch.tensor([0, 2])),
              "query": [["shoe"], ["red", "hat"]], "user_id": [7, 8]})
    b = coll(BATCH)
    torch.testing.assert_close(a["title"], b["title"])
    weighted = coll(BATCH, per_sample_weights={"title": torch.tensor([2.0, 0.0, 1.0])})
    torch.testing.assert_close(weighted["title"][0], 2 * coll.tables["words"].find(
        ["red"]).values[0])


@pytest.mark.parametrize("weights, error, match", [
    ({"titel": torch.ones(3)}, KeyInputError, r"per_sample_weights\['titel'\]: no such"),
    ({"user_id": torch.ones(2)}, ValueError, r"per_sample_weights\['user_id'\]: .*not pooled"),
    ({"query": torch.ones(3)}, ValueError, r"per_sample_weights\['query'\] needs pooling='sum'"),
    ({"title": torch.ones(4)}, ValueError, r"per_sample_weights\['title'\] must have shape"),
    ({"title": [[1.0], [2.0]]}, ValueError, r"per_sample_weights\['title'\]\[0\] has 1 weights"),
    ([torch.ones(3)], TypeError, "per_sample_weights must be a dict"),
    ({"title": torch.tensor([1.0, float("nan"), 1.0])}, ValueError,
     r"per_sample_weights\['title'\] holds 1 NaN or inf"),
])
def test_bad_per_sample_weights_name_the_feature(weights, error, match):
    """Weights under a misspelled or unpooled feature were once dropped silently; bad
    weights are found before any table changes."""
    coll = _collection()
    with pytest.raises(error, match=match):
        coll(BATCH, per_sample_weights=weights)
    assert coll.tables["words"].size() == 0 and coll.tables["user"].size() == 0


def test_per_sample_weights_as_lists_shaped_like_the_bags():
    coll = _collection()
    flat = coll(BATCH, per_sample_weights={"title": torch.tensor([2.0, 0.0, 1.0])})
    lists = coll(BATCH, per_sample_weights={"title": [[2, 0], [1]]})
    torch.testing.assert_close(lists["title"], flat["title"])


def test_features_must_name_one_at_least():
    """An empty dict was accepted; concat=True then failed inside torch.cat."""
    with pytest.raises(ValueError, match="features must name at least one feature"):
        de.EmbeddingCollection(tables={"t": de.TableConfig(dim=2)}, features={})


def test_one_table_under_two_names_is_refused():
    """Each name was looked up and updated on its own: two optimizer steps per step, and
    the state dict held the table twice."""
    table = de.DynamicTable(de.TableConfig(dim=2, optimizer=de.optim.Adagrad(lr=0.1)))
    with pytest.raises(ValueError, match=r"tables\['a'\] and tables\['b'\] are the same"):
        de.EmbeddingCollection(tables={"a": table, "b": table})
    coll = de.EmbeddingCollection(tables={"a": table}, features={"x": "a", "y": "a"})
    coll({"x": [1, 2], "y": [2, 3]})["x"].sum().backward()
    assert table.update_step == 1


def test_two_tables_over_one_store_object_are_refused(tmp_path):
    """One TableConfig (with its store) under two names built two tables over one store
    object: the second took it over, and the first failed at its first lookup with an error
    naming neither table."""
    config = de.TableConfig(dim=2, store=de.storage.MemoryStore())
    with pytest.raises(ValueError, match=r"tables\['a'\] and tables\['b'\] use the same store"):
        de.EmbeddingCollection(tables={"a": config, "b": config})
    table = de.DynamicTable(de.TableConfig(dim=2, store=de.storage.RocksDBStore(tmp_path / "s")))
    with pytest.raises(ValueError, match=r"tables\['t'\] and tables\['u'\] use the same store"):
        de.EmbeddingCollection(tables={"t": table, "u": table.config})
    table.find_or_insert([1])  # the table given keeps its store
    coll = de.EmbeddingCollection(tables={"a": config, "b": de.TableConfig(dim=2)})
    assert coll({"a": [1], "b": [1]})["a"].shape == (1, 2)


@pytest.mark.parametrize("name", [1, "", None])
def test_feature_names_must_be_non_empty_str(name):
    with pytest.raises(ValueError, match="feature names must be non-empty str"):
        de.EmbeddingCollection(tables={"a": de.TableConfig(dim=2)}, features={name: "a"})


def test_concat_must_be_a_bool():
    with pytest.raises(TypeError, match="concat must be True or False, got 'yes'"):
        _collection()(BATCH, concat="yes")


def test_features_must_be_a_dict():
    with pytest.raises(TypeError, match="features must be a dict"):
        de.EmbeddingCollection(tables={"w": de.TableConfig(dim=2)}, features=["w"])


def test_state_dict_round_trip():
    coll = _collection()
    coll(BATCH)["title"].sum().backward()
    state = coll.state_dict()
    assert "tables.words.weights" in state and "tables.user.ids" in state
    other = _collection()
    other.load_state_dict(state)
    for name in ("words", "user"):
        for x, y in zip(coll.tables[name].export(), other.tables[name].export()):
            assert torch.equal(x, y)


def test_errors():
    coll = _collection()
    with pytest.raises(KeyInputError, match="missing features"):
        coll({"title": [["a"]]})
    with pytest.raises(KeyInputError, match="unknown features"):
        coll({**BATCH, "other": [1]})
    with pytest.raises(KeyInputError, match="inputs\\['user_id'\\]"):
        coll({**BATCH, "user_id": [1.5, 2.5]})
    with pytest.raises(ValueError, match="concat"):
        coll({**BATCH, "user_id": [7, 8, 9]}, concat=True)
    # every error above came before the lookup: no table changed
    assert coll.tables["words"].size() == coll.tables["user"].size() == 0
    assert coll.tables["words"].stats().totals.lookup_calls == 0
    with pytest.raises(ValueError, match="not in tables"):
        de.EmbeddingCollection(tables={"a": de.TableConfig(dim=2)}, features={"f": "b"})
    with pytest.raises(ValueError, match="pooling"):
        de.FeatureConfig(table="a", pooling="median")
    with pytest.raises(ValueError, match="table names"):
        de.EmbeddingCollection(tables={"a.b": de.TableConfig(dim=2)})


def test_default_features_one_per_table():
    coll = de.EmbeddingCollection(tables={"item": de.TableConfig(dim=2)})
    assert coll({"item": [1, 2, 3]})["item"].shape == (3, 2)


def test_key_log_on_a_shared_table_records_every_feature():
    coll = de.EmbeddingCollection(
        tables={"words": de.TableConfig(dim=2, key_log=True)},
        features={"title": de.FeatureConfig(table="words", pooling="sum"),
                  "query": de.FeatureConfig(table="words", pooling="sum")})
    coll({"title": [["red", "shoe"]], "query": [["hat"]]})
    table = coll.tables["words"]
    assert sorted(table.keys_of(table.export().ids)) == ["hat", "red", "shoe"]


def test_key_log_keeps_the_strings_beside_an_empty_or_int_feature():
    """An empty bag list (no strings) or an int feature on the same table once kept every
    string of the call out of the key log."""
    coll = de.EmbeddingCollection(
        tables={"words": de.TableConfig(dim=2, key_log=True)},
        features={"title": de.FeatureConfig(table="words", pooling="mean"),
                  "query": de.FeatureConfig(table="words", pooling="mean"),
                  "raw": "words"})
    coll({"title": [["red", "shoe"]], "query": [[]], "raw": [7]})
    table = coll.tables["words"]
    ids = table.export().ids
    assert sorted(map(str, table.keys_of(ids))) == ["None", "red", "shoe"]
    assert table.keys_of(np.array([7])) == [None]  # the int key has no string


@pytest.mark.parametrize("offsets", [np.array([0, 2]), torch.tensor([0, 2])])
def test_values_and_offsets_with_offsets_as_an_array(offsets):
    coll = _collection()
    out = coll({"title": ([10, 11, 12], offsets), "query": [[1], [2]], "user_id": [7, 8]})
    bag = de.DynamicEmbeddingBag(table=coll.tables["words"], mode="sum")
    torch.testing.assert_close(out["title"], bag([[10, 11], [12]]))
    assert sorted(coll.tables["words"].export().ids.tolist()) == [1, 2, 10, 11, 12]


def test_torchrec_style_offsets_with_include_last_offset():
    """TorchRec's offsets end with the number of values: read as starts they gave B + 1
    bags, the last one empty, silently (the collection had no include_last_offset)."""
    coll = _collection()
    out = coll({"title": ([10, 11, 12], torch.tensor([0, 2, 3])), "query": [[1], [2]],
                "user_id": [7, 8]}, include_last_offset=True, concat=True)
    bag = de.DynamicEmbeddingBag(table=coll.tables["words"], mode="sum")
    torch.testing.assert_close(out[:, :4], bag([[10, 11], [12]]))
    with pytest.raises(KeyValueError, match=r"inputs\['title'\] offsets: with include_last_offset"
                                            r"=True the last offset must equal"):
        coll({"title": ([10, 11, 12], torch.tensor([0, 2])), "query": [[1], [2]],
              "user_id": [7, 8]}, include_last_offset=True)
    with pytest.raises(TypeError, match="include_last_offset must be True or False"):
        coll(BATCH, include_last_offset=1)


def test_a_tuple_of_two_flat_int_lists_is_refused_as_ambiguous():
    """(values, [0, 2]) was once read as two bags, training the offsets as keys; read as
    (values, offsets) it silently re-cut a two-sample batch made with zip(*samples)."""
    coll = _collection()
    with pytest.raises(KeyInputError, match=r"inputs\['title'\]: a tuple of two flat int "
                                            "lists is ambiguous"):
        coll({"title": ([10, 11, 12], [0, 2]), "query": [[1], [2]], "user_id": [7, 8]})
    assert coll.tables["words"].size() == 0
    # bags that cannot be offsets stay bags, tuple or not
    out = coll({"title": (["red", "shoe"], ["hat"]), "query": [[1], [2]], "user_id": [7, 8]})
    assert out["title"].shape == (2, 4)
    out = coll({"title": ([10, 11], []), "query": [[1], [2]], "user_id": [7, 8]})
    assert out["title"].shape == (2, 4)  # an empty second bag


@pytest.mark.parametrize("values", [np.array([10, 11, 12]), torch.tensor([10, 11, 12]),
                                    ["a", "b", "c"], np.array(["a", "b", "c"])], ids=repr)
def test_values_with_offsets_as_a_list(values):
    """Values that cannot be a bag beside an int list: (values, offsets), never two bags
    (which trained the offsets as keys)."""
    coll = _collection()
    out = coll({"title": (values, [0, 2]), "query": [[1], [2]], "user_id": [7, 8]})
    bag = de.DynamicEmbeddingBag(table=coll.tables["words"], mode="sum")
    keys = list(values.tolist() if hasattr(values, "tolist") else values)
    torch.testing.assert_close(out["title"], bag([keys[:2], keys[2:]]))
    assert 0 not in coll.tables["words"].export().ids.tolist()


def test_stats_by_table_name():
    coll = _collection()
    coll(BATCH)
    stats = coll.stats()
    assert set(stats) == {"words", "user"}
    assert stats["words"].rows == 4 and stats["user"].rows == 2


def test_eval_reads_every_key_without_inserting_and_counts_each_occurrence():
    coll = _collection()
    coll(BATCH)  # training: the rows exist
    with torch.no_grad():
        trained = coll(BATCH)  # the training path (dedup, one call per table)
    coll.eval()
    batch = {**BATCH, "query": [["shoe", "unseen"], ["red", "hat"]], "user_id": [7, 99]}
    before = {name: t.stats().totals for name, t in coll.named_tables().items()}
    out = coll(batch)
    torch.testing.assert_close(out["title"], trained["title"])
    torch.testing.assert_close(out["query"][1], trained["query"][1])
    words = coll.tables["words"].stats().totals
    shoe = coll.tables["words"].find(["shoe"]).values[0]
    torch.testing.assert_close(out["query"][0], shoe / 2)  # the unseen key adds zeros
    torch.testing.assert_close(out["user_id"][1], torch.zeros(3))
    assert coll.tables["words"].size() == 4 and coll.tables["user"].size() == 2
    assert words.hits - before["tables.words"].hits == 6  # per occurrence: shoe twice
    assert words.defaults_served - before["tables.words"].defaults_served == 1
    users = coll.tables["user"].stats().totals
    assert users.defaults_served - before["tables.user"].defaults_served == 1


def test_a_load_that_fails_on_one_table_changes_none():
    src = de.EmbeddingCollection(tables={"t1": de.TableConfig(dim=2), "t2": de.TableConfig(dim=3)})
    src({"t1": [1, 2, 3], "t2": [1]})
    dst = de.EmbeddingCollection(tables={"t1": de.TableConfig(dim=2), "t2": de.TableConfig(dim=5)})
    dst({"t1": [100], "t2": [1]})
    with pytest.raises(de.StateDictError, match="table 'tables.t2': .*dim 3"):
        dst.load_state_dict(src.state_dict())
    assert dst.tables["t1"].export().ids.tolist() == [100]


def test_table_tensors_nothing_loads_are_reported_as_unexpected():
    """A key log saved by a table with one, loaded into a table without, was dropped
    silently; so was any stray tensor under a table's name."""
    logged = de.DynamicEmbedding(dim=2, key_log=True)
    logged(["cat"])
    state = dict(logged.state_dict(), **{"table.bogus": torch.zeros(1)})
    plain = de.DynamicEmbedding(dim=2)
    result = plain.load_state_dict(state, strict=False)
    assert sorted(result.unexpected_keys) == [
        "table.bogus", "table.key_log.ids", "table.key_log.lengths", "table.key_log.raw",
        "table.key_log.raw_ids", "table.key_log.raw_lengths", "table.key_log.utf8"]
    assert torch.equal(plain(["cat"]), logged(["cat"]))  # the rows loaded all the same
    with pytest.raises(RuntimeError, match="Unexpected key"):
        de.DynamicEmbedding(dim=2).load_state_dict(state)
    assert logged.load_state_dict(logged.state_dict()).unexpected_keys == []


def test_a_torch_compiled_collection_trains_as_an_eager_one():
    """torch.compile traced into the lookup's numba kernels and failed."""
    def run(compiled: bool):
        coll = _collection()
        step = lambda batch: coll(batch, concat=True).pow(2).sum()
        if compiled:
            step = torch.compile(step, backend="eager")
        step(BATCH).backward()
        return coll.tables["words"].find(["red", "shoe", "blue", "hat"]).values

    torch.testing.assert_close(run(True), run(False))


@pytest.mark.parametrize("order", [("words", "raw"), ("raw", "words")])
def test_key_log_of_a_table_shared_by_a_str_and_a_bytes_feature(order, tmp_path):
    """One feature's keys str, another's bytes, on one logged table: the lookup raised after
    inserting the rows (bytes first), or the log took the bytes as str and the state dict
    could not be saved."""
    coll = de.EmbeddingCollection(
        tables={"t": de.TableConfig(dim=2, key_log=True)},
        features={name: de.FeatureConfig(table="t", pooling="sum") for name in order})
    coll({"words": [["cat", "dog"]], "raw": [[b"fish", b"\xff\xfe"]]})
    table = coll.tables["t"]
    keys = ["cat", "dog", "fish", b"\xff\xfe"]
    wanted = np.concatenate([table.ids_of([k]).ids for k in keys])
    assert table.keys_of(wanted) == keys
    assert table.stats().totals.inserts == 4
    torch.save(coll.state_dict(), tmp_path / "coll.pt")
    fresh = de.EmbeddingCollection(tables={"t": de.TableConfig(dim=2, key_log=True)},
                                   features={name: "t" for name in order})
    fresh.load_state_dict(torch.load(tmp_path / "coll.pt", weights_only=True))
    assert fresh.tables["t"].keys_of(wanted) == keys


@pytest.mark.parametrize("value", [([10, 11], [0, 1]), (["a", "b"], torch.tensor([0, 1]))],
                         ids=["two-int-lists", "values-offsets"])
def test_an_unpooled_feature_refuses_a_values_offsets_pair(value):
    """(B, L) keys may come as B lists; a pair that a pooled feature reads as (values,
    offsets) was taken as two rows, training the offsets as keys."""
    coll = de.EmbeddingCollection(tables={"t": de.TableConfig(dim=2)}, features={"ids": "t"})
    with pytest.raises(KeyInputError, match=r"inputs\['ids'\]: the feature is not pooled"):
        coll({"ids": value})
    assert coll.tables["t"].size() == 0
    assert coll({"ids": (["a", "b"], ["c", "d"])})["ids"].shape == (2, 2, 2)  # two rows
