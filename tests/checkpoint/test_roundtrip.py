"""save() then load(): bit-exact tables, dense state and user state; clear errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.storage import RocksDBStore

from .helpers import (
    assert_same_counters,
    assert_same_rows,
    batches,
    make_table,
    rows_by_id,
    train,
)


@pytest.mark.parametrize("optimizer", [de.optim.SGD(lr=0.1), de.optim.Adagrad(lr=0.1),
                                       de.optim.Adam(lr=0.01), de.optim.FTRL(lr=0.1)])
@pytest.mark.parametrize("lazy", [False, True])
def test_round_trip_is_bit_exact_with_optimizer_state(tmp_path, optimizer, lazy):
    table = make_table(optimizer=optimizer)
    train(table, batches(20, 3000))
    de.checkpoint.save(tmp_path / "c", tables={"t": table})
    restored = make_table(optimizer=optimizer, seed=99)
    de.checkpoint.load(tmp_path / "c", tables={"t": restored}, lazy=lazy)
    assert (len(restored) == 0) == lazy  # lazily: nothing is in memory yet
    assert_same_rows(table, restored)
    assert_same_counters(table, restored)
    ids = np.arange(-3000, 3000)
    np.testing.assert_array_equal(restored.find(ids).values, table.find(ids).values)


def test_admission_and_key_log_state_round_trip(tmp_path):
    options = {"admission": de.policy.FrequencyAdmission(threshold=3), "key_log": True}
    table = make_table(**options)
    keys = [f"user-{i % 50}" for i in range(400)]
    for start in range(0, 400, 40):
        emb_ids = table.ids_of(keys[start:start + 40])
        unique = np.unique(emb_ids.ids)
        table.lookup_slots(unique, np.ones_like(unique), insert=True,
                           strings=emb_ids.strings, string_ids=emb_ids.ids)
    de.checkpoint.save(tmp_path / "c", tables={"t": table})
    restored = make_table(**options, seed=1)
    de.checkpoint.load(tmp_path / "c", tables={"t": restored})
    for name, tensor in table.admitter.state_dict().items():
        assert torch.equal(tensor, restored.admitter.state_dict()[name]), name
    ids = table.export().ids.numpy()
    assert restored.keys_of(ids) == table.keys_of(ids)
    assert all(k.startswith("user-") for k in restored.keys_of(ids))


def test_model_dense_state_optimizer_and_extra_round_trip(tmp_path):
    torch.manual_seed(0)

    def model():
        m = torch.nn.Module()
        m.emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1)
        m.bag = de.DynamicEmbeddingBag(dim=4, mode="sum", optimizer=de.optim.SGD(lr=0.1),
                                       seed=2)
        m.head = torch.nn.Linear(8, 1)
        return m

    a = model()
    opt = torch.optim.Adam(a.head.parameters(), lr=0.01)
    for _ in range(3):
        x = torch.randint(0, 100, (16,))
        out = a.head(torch.cat([a.emb(x), a.bag(x.view(8, 2))[:8].repeat(2, 1)], 1))
        out.sum().backward()
        opt.step()
        opt.zero_grad()
    extra = {"step": 3, "data": {"epoch": 1, "offset": 1234}, "rng": torch.arange(4)}
    de.checkpoint.save(tmp_path / "c", a, opt, extra=extra)
    b = model()
    opt_b = torch.optim.Adam(b.head.parameters(), lr=0.01)
    got = de.checkpoint.load(tmp_path / "c", b, opt_b)
    assert got["step"] == 3 and got["data"] == {"epoch": 1, "offset": 1234}
    assert torch.equal(got["rng"], torch.arange(4))
    assert torch.equal(a.head.weight, b.head.weight)
    assert opt.state_dict()["state"][0]["exp_avg"].equal(opt_b.state_dict()["state"][0]["exp_avg"])
    assert_same_rows(a.emb.table, b.emb.table)
    assert_same_rows(a.bag.table, b.bag.table)


def _emb_and_head() -> torch.nn.Module:
    """A table and a dense layer."""
    m = torch.nn.Module()
    m.emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1)
    m.head = torch.nn.Linear(4, 1)
    return m


def test_dense_state_saved_on_a_gpu_this_machine_lacks_loads(tmp_path):
    """A GPU job's rank 0 saves its dense state from its own GPU. Loaded where saved, every
    rank of a restarted job put it on that one GPU, and a machine without that GPU (a
    notebook's one GPU, or none) could not load it. Saved here as from the first GPU index
    this machine does not have: it loads, extra's tensors on the CPU."""
    from unittest import mock
    torch.manual_seed(0)

    a = _emb_and_head()
    opt = torch.optim.Adam(a.head.parameters(), lr=0.01)
    a.head(a.emb(torch.arange(8))).sum().backward()
    opt.step()
    missing_gpu = f"cuda:{torch.cuda.device_count()}"
    tag = torch.serialization.location_tag
    with mock.patch.object(torch.serialization, "location_tag",
                           lambda s: missing_gpu if tag(s) == "cpu" else tag(s)):
        de.checkpoint.save(tmp_path / "c", a, opt, extra={"seen": torch.arange(3)})
    b = _emb_and_head()
    opt_b = torch.optim.Adam(b.head.parameters(), lr=0.01)
    got = de.checkpoint.load(tmp_path / "c", b, opt_b)
    assert got["seen"].device.type == "cpu" and torch.equal(got["seen"], torch.arange(3))
    assert torch.equal(a.head.weight, b.head.weight)
    state = opt_b.state_dict()["state"][0]
    assert state["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert_same_rows(a.emb.table, b.emb.table)
    assert de.checkpoint.describe(tmp_path / "c")["extra"]["seen"]


def test_shared_tables_of_a_collection_are_saved_once(tmp_path):
    def model():
        return de.EmbeddingCollection(
            tables={"words": de.TableConfig(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1)},
            features={"title": "words", "query": "words"})

    a = model()
    out = a({"title": torch.arange(10), "query": torch.arange(5, 15)})
    sum(v.sum() for v in out.values()).backward()
    de.checkpoint.save(tmp_path / "c", a)
    info = de.checkpoint.describe(tmp_path / "c", top=0)
    assert list(info["tables"]) == ["tables.words"] and info["tables"]["tables.words"]["rows"] == 15
    b = model()
    de.checkpoint.load(tmp_path / "c", b)
    assert_same_rows(a.tables["words"], b.tables["words"])


@pytest.mark.parametrize("lazy", [False, True])
def test_tiered_table_round_trip_replaces_newer_stored_rows(tmp_path, lazy):
    def tiered(path):
        return make_table(store=RocksDBStore(str(path)), max_rows=300)

    table = tiered(tmp_path / "a")
    train(table, batches(10, 2000))
    assert table.tier.store.size() > 0  # rows were evicted to the store
    de.checkpoint.save(tmp_path / "c", tables={"t": table})
    reference = rows_by_id(table)
    train(table, batches(5, 2000, seed=9))  # changes after the checkpoint, partly stored
    table.flush()
    de.checkpoint.load(tmp_path / "c", tables={"t": table}, lazy=lazy)
    now = rows_by_id(table)
    for name in reference:
        np.testing.assert_array_equal(now[name], reference[name], err_msg=name)
    assert len(table) <= 300
    table.close()


def test_eager_load_into_a_tiered_table_streams_rows_into_the_store(tmp_path):
    table = make_table()
    train(table, batches(20, 5000))
    de.checkpoint.save(tmp_path / "c", tables={"t": table})
    small = make_table(store=RocksDBStore(str(tmp_path / "s")), max_rows=100)
    de.checkpoint.load(tmp_path / "c", tables={"t": small}, chunk_rows=64)
    assert small.base is None and len(small) == 0  # memory untouched, the store has them
    assert small.tier.store.size() == len(table)
    assert_same_rows(table, small)
    small.close()


def test_save_refuses_values_that_would_not_load_with_weights_only(tmp_path):
    """Subclasses of plain types pickle as their own class: such a checkpoint was committed
    and then could not be loaded (weights_only=True)."""
    import collections
    import enum

    class Phase(enum.IntEnum):
        TRAIN = 1

    table = make_table()
    for name, value in [("loss", np.float64(0.5)), ("phase", Phase.TRAIN),
                        ("pair", collections.namedtuple("P", "a b")(1, 2)),
                        ("counts", collections.defaultdict(int, a=1))]:
        with pytest.raises(TypeError, match=rf"extra\['{name}'\] is a .*convert it first"):
            de.checkpoint.save(tmp_path / name, tables={"t": table}, extra={name: value})
        assert not (tmp_path / name).exists()
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=np.float64(0.1))  # e.g. from a scheduler
    with pytest.raises(TypeError, match=r"optimizer.state_dict\(\)\['param_groups'\]"):
        de.checkpoint.save(tmp_path / "o", model, opt)
    extra = {"ordered": collections.OrderedDict(a=1), "size": torch.Size([2]), "t": (1, 2.0)}
    de.checkpoint.save(tmp_path / "ok", model, extra=extra)
    assert de.checkpoint.load(tmp_path / "ok", model) == extra


@pytest.mark.parametrize("name", [".", "..", "", "a/b", 3])
def test_a_table_name_that_is_no_folder_name_is_refused(tmp_path, name):
    """Once "." and ".." were taken: the rows file went into the checkpoint (or its parent)
    itself, and compacting it failed with FileExistsError."""
    table = make_table()
    with pytest.raises(ValueError, match="names without '/', other than '.' and '..'"):
        de.checkpoint.save(tmp_path / "x", tables={name: table})
    assert not (tmp_path / "x").exists()


def test_numpy_ints_count_as_ints(tmp_path):
    table = make_table()
    train(table, batches(2, 100))
    de.checkpoint.save(tmp_path / "c", tables={"t": table}, chunk_rows=np.int64(64))
    loaded = make_table()
    de.checkpoint.load(tmp_path / "c", tables={"t": loaded}, chunk_rows=np.int32(64),
                       lazy=True, background_rows=np.int64(10))
    assert sorted(loaded.export().ids.tolist()) == sorted(table.export().ids.tolist())
    de.checkpoint.compact(tmp_path / "c", tmp_path / "d", chunk_rows=np.int64(64))


def test_bad_arguments_and_mismatches_are_named(tmp_path):
    table = make_table()
    train(table, batches(2, 100))
    with pytest.raises(ValueError, match="nothing to save"):
        de.checkpoint.save(tmp_path / "x")
    with pytest.raises(TypeError, match=r"extra\['f'\]"):
        de.checkpoint.save(tmp_path / "x", tables={"t": table}, extra={"f": object()})
    # the fix named for an array works (list(x) once named: numpy scalars, refused again)
    with pytest.raises(TypeError, match=r"x\.tolist\(\) or torch\.from_numpy\(x\)"):
        de.checkpoint.save(tmp_path / "x", tables={"t": table}, extra={"a": np.arange(3)})
    de.checkpoint.save(tmp_path / "a", tables={"t": table}, extra={"a": np.arange(3).tolist()})
    with pytest.raises(ValueError, match="rank"):
        de.checkpoint.save(tmp_path / "x", tables={"t": table}, rank=2, world_size=2)
    for chunk_rows in (None, 0, -5, 2.0):
        with pytest.raises(ValueError, match="chunk_rows must be an int >= 1"):
            de.checkpoint.save(tmp_path / "x", tables={"t": table}, chunk_rows=chunk_rows)
    with pytest.raises(ValueError, match="num_buckets"):
        de.checkpoint.save(tmp_path / "x", tables={"t": table}, num_buckets=1000)
    de.checkpoint.save(tmp_path / "c", tables={"t": table})
    with pytest.raises(FileExistsError, match="never overwritten"):
        de.checkpoint.save(tmp_path / "c", tables={"t": table})
    for chunk_rows in (None, -5):  # checked before the table is cleared
        with pytest.raises(ValueError, match="chunk_rows must be an int >= 1"):
            de.checkpoint.load(tmp_path / "c", tables={"t": table}, chunk_rows=chunk_rows)
        with pytest.raises(ValueError, match="chunk_rows must be an int >= 1"):
            de.checkpoint.compact(tmp_path / "c", tmp_path / "y", chunk_rows=chunk_rows)
    assert len(table) > 0 and not (tmp_path / "y").exists()
    with pytest.raises(de.CheckpointError, match="dim 8.*dim=8"):
        de.checkpoint.load(tmp_path / "c", tables={"t": make_table(dim=4)})
    with pytest.raises(de.CheckpointError, match="optimizer"):
        de.checkpoint.load(tmp_path / "c", tables={"t": make_table(optimizer=de.optim.SGD(lr=1))})
    with pytest.raises(de.CheckpointError, match="hash_seed=0"):
        de.checkpoint.load(tmp_path / "c", tables={"t": make_table(hash_seed=5)})
    with pytest.raises(de.CheckpointError, match="trained with Adagrad"):
        de.checkpoint.load(tmp_path / "c", tables={"t": make_table(
            optimizer=de.optim.SGD(lr=1, momentum=0.9))})  # the same state width
    with pytest.raises(de.CheckpointError, match="no table 'u'"):
        de.checkpoint.load(tmp_path / "c", tables={"u": make_table()})
    with pytest.raises(de.CheckpointNotFoundError, match="MANIFEST"):
        de.checkpoint.load(tmp_path / "nothing", tables={"t": make_table()})


def test_deferred_gradients_must_be_applied_before_a_save(tmp_path):
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), update_mode="deferred")
    emb(torch.arange(5)).sum().backward()
    with pytest.raises(de.CheckpointError, match="sparse_step"):
        de.checkpoint.save(tmp_path / "c", emb)
    de.sparse_step(emb)
    de.checkpoint.save(tmp_path / "c", emb)


class _TwoTables(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=1)
        self.b = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=2,
                                     admission=de.policy.FrequencyAdmission(threshold=1,
                                                                            width=width))
        self.lin = torch.nn.Linear(4, 1)


def test_a_load_that_does_not_fit_changes_nothing(tmp_path):
    """The second table's admission state (another sketch width) once failed only after
    the dense weights and the first table were replaced; a dense optimizer of another
    shape, after the model's weights were."""
    src = _TwoTables(1024)
    for module in (src.a, src.b):
        module(torch.arange(10)).sum().backward()
    opt = torch.optim.Adam(src.lin.parameters())
    src.lin(torch.ones(1, 4)).sum().backward()
    opt.step()
    de.checkpoint.save(tmp_path / "c", src, opt)

    dst = _TwoTables(2048)
    dst.a(torch.arange(100, 105)).sum().backward()
    lin, rows = dst.lin.weight.detach().clone(), sorted(dst.a.table.export().ids.tolist())
    with pytest.raises(de.CheckpointError, match=r"table 'b.table' .*sketch has shape"):
        de.checkpoint.load(tmp_path / "c", dst)
    assert torch.equal(dst.lin.weight, lin) and sorted(dst.a.table.export().ids.tolist()) == rows

    fits = _TwoTables(1024)
    lin = fits.lin.weight.detach().clone()
    other = torch.optim.Adam([fits.lin.weight])  # one parameter where the saved group had two
    with pytest.raises(de.CheckpointError, match="parameter group.*left as they were") as info:
        de.checkpoint.load(tmp_path / "c", fits, other)
    assert isinstance(info.value.__cause__, ValueError)  # torch's, naming the groups
    assert torch.equal(fits.lin.weight, lin) and len(fits.a.table) == 0
    assert other.state_dict()["state"] == {}


def test_a_load_warns_about_state_the_table_has_no_place_for(tmp_path):
    """A key log or admission state the table was built without was dropped silently; it
    is still dropped (a job may resume with an option turned off), with a warning."""
    logged = de.DynamicEmbedding(dim=2, key_log=True,
                                 admission=de.policy.BloomAdmission(expected_keys=1000))
    for _ in range(3):  # admitted once seen again
        logged(["cat", "dog"])
    assert len(logged.table) == 2
    de.checkpoint.save(tmp_path / "c", logged)
    plain = de.DynamicEmbedding(dim=2)
    with pytest.warns(UserWarning, match=r"holds \['admission', 'key_log'\] state .*not loaded"):
        de.checkpoint.load(tmp_path / "c", plain)
    assert len(plain.table) == 2


def test_load_with_dropped_is_quiet_only_about_the_state_it_names(tmp_path):
    """The library's own loads into tables built without admission on purpose (serving's)
    drop that state quietly; any other unused state still warns."""
    logged = de.DynamicEmbedding(dim=2, key_log=True,
                                 admission=de.policy.BloomAdmission(expected_keys=1000))
    for _ in range(3):
        logged(["cat", "dog"])
    de.checkpoint.save(tmp_path / "c", logged)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = de.DynamicEmbedding(dim=2, key_log=True)
        de.checkpoint.load(tmp_path / "c", quiet, dropped=("admission",))
    assert len(quiet.table) == 2
    plain = de.DynamicEmbedding(dim=2)
    with pytest.warns(UserWarning, match=r"holds \['key_log'\] state .*not loaded"):
        de.checkpoint.load(tmp_path / "c", plain, dropped=("admission",))
    with pytest.raises(ValueError, match="dropped must name state among"):
        de.checkpoint.load(tmp_path / "c", plain, dropped=("rows",))


def test_a_table_built_over_a_store_object_takes_it_over(tmp_path):
    """Two live tables over one store object once overwrote each other's rows silently.
    The newer one owns it (rebuilding a model over the same store works, and sees the rows);
    the older one fails on its next store call."""
    store = RocksDBStore(tmp_path / "db")
    first = de.DynamicEmbedding(dim=2, store=store, max_rows=4)
    for start in range(0, 12, 3):
        first(torch.arange(start, start + 3))
    first.table.flush()
    rows = first.table.find(torch.arange(12)).values
    second = de.DynamicEmbedding(dim=2, store=store, max_rows=4)
    assert torch.equal(second.table.find(torch.arange(12)).values, rows)
    with pytest.raises(de.StoreError, match="taken over by a table built later"):
        first(torch.arange(20, 30, 3))  # would evict into the second table's store
    for start in range(12, 18, 3):  # the second table trains on
        second(torch.arange(start, start + 3))
    assert bool(second.table.contains(torch.arange(18)).all())
    first.table.close()  # leaves the store to its owner
    assert not store.closed
    with pytest.raises(ValueError, match="not in tables"):  # a failed collection ...
        de.EmbeddingCollection(tables={"t": de.TableConfig(dim=2, store=store)},
                               features={"f": "nope"})
    with pytest.raises(ValueError, match="memory_budget"):  # a failed construction ...
        de.DynamicEmbedding(dim=2, store=store, memory_budget="10B")
    second(torch.arange(18, 21))  # ... takes nothing from the live table
    second.table.close()
    assert store.closed


def test_paths_and_arguments_of_the_wrong_kind_are_named(tmp_path):
    table = make_table()
    afile = tmp_path / "afile"
    afile.write_text("not a checkpoint")
    with pytest.raises(NotADirectoryError, match=r"path: .*afile is a file"):
        de.checkpoint.save(afile / "ck", tables={"t": table})
    with pytest.raises(de.CheckpointNotFoundError, match="no committed checkpoint"):
        de.checkpoint.load(afile, tables={"t": table})
    with pytest.raises(NotADirectoryError, match="directory: .*not a directory"):
        de.checkpoint.CheckpointManager(afile / "x")
    with pytest.raises(TypeError, match="tables must be a dict"):
        de.checkpoint.save(tmp_path / "c", tables=[table])
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        de.checkpoint.save(None, tables={"t": table})
    de.checkpoint.save(tmp_path / "c", tables={"t": table})
    with pytest.raises(TypeError, match="lazy must be True or False"):
        de.checkpoint.load(tmp_path / "c", tables={"t": table}, lazy="no")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "c"]


class _LazyDense(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = de.DynamicEmbedding(dim=4, seed=1)
        self.head = torch.nn.LazyLinear(1)
        self.note = {"kind": "ctr"}

    def get_extra_state(self):
        return self.note  # not a tensor

    def set_extra_state(self, state):
        self.note = state


def test_a_model_whose_state_cannot_be_copied_first_still_loads(tmp_path):
    """The rollback copy of the dense state once failed on a LazyLinear not yet run (the
    usual build-restore-train resume) and on non-tensor extra state."""
    src = _LazyDense()
    src.head(src.emb([1, 2]))
    src.note = {"kind": "saved"}
    de.checkpoint.save(tmp_path / "c", src)
    dst = _LazyDense()
    de.checkpoint.load(tmp_path / "c", dst)
    assert torch.equal(dst.head.weight, src.head.weight) and dst.note == {"kind": "saved"}
    assert torch.equal(dst.emb([1, 2]), src.emb([1, 2]))


def test_a_table_taken_over_never_gets_the_store_back():
    """Once the newer table was gone, the older one counted as the owner again and wrote its
    stale rows over the newer ones."""
    import gc
    store = de.storage.MemoryStore()
    first = de.DynamicTable(de.TableConfig(dim=2, store=store))
    first.insert_or_assign([1], torch.ones(1, 2))
    first.flush()
    second = de.DynamicTable(de.TableConfig(dim=2, store=store))
    second.insert_or_assign([1], torch.full((1, 2), 2.0))
    second.flush()
    del second
    gc.collect()
    first.insert_or_assign([1], torch.full((1, 2), 3.0))
    with pytest.raises(de.StoreError, match="taken over"):
        first.flush()
    third = de.DynamicTable(de.TableConfig(dim=2, store=store))
    assert torch.equal(third.find([1]).values, torch.full((1, 2), 2.0))


def test_a_strict_load_refuses_a_checkpoint_without_the_models_dense_state(tmp_path):
    """A checkpoint saved with tables= only (or with extra= but no model=) once loaded into
    a model with dense weights under strict=True without a word: its tables were restored,
    its Linear kept its random initialisation (and `dynembed export` packaged that)."""
    torch.manual_seed(0)

    src = _emb_and_head()
    src.emb(torch.arange(10)).sum().backward()
    de.checkpoint.save(tmp_path / "tables-only", tables={"emb.table": src.emb.table})
    de.checkpoint.save(tmp_path / "extra-only", tables={"emb.table": src.emb.table},
                       extra={"step": 1})
    for name in ("tables-only", "extra-only"):
        dst = _emb_and_head()
        head = dst.head.weight.detach().clone()
        with pytest.raises(de.CheckpointError,
                           match=rf"{name} holds no dense model state .*\['head.bias', "
                                 r"'head.weight'\].*strict=False"):
            de.checkpoint.load(tmp_path / name, dst)
        assert torch.equal(dst.head.weight, head) and len(dst.emb.table) == 0  # untouched
        with pytest.raises(de.CheckpointError, match=rf"{name} holds no optimizer state"):
            de.checkpoint.load(tmp_path / name, tables={"emb.table": dst.emb.table},
                               optimizer=torch.optim.SGD(dst.head.parameters(), lr=0.1))
        # not strict: the tables load, the dense weights stay as they are
        de.checkpoint.load(tmp_path / name, dst, strict=False)
        assert torch.equal(dst.head.weight, head)
        assert_same_rows(src.emb.table, dst.emb.table)
    only_tables = torch.nn.Module()  # no dense state to miss: loads strictly
    only_tables.emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1)
    de.checkpoint.load(tmp_path / "tables-only", only_tables)
    assert_same_rows(src.emb.table, only_tables.emb.table)


def test_a_table_missing_from_the_model_names_the_models_unmatched_tables(tmp_path):
    """A renamed table was reported only as the checkpoint's table the model lacks; the
    model's own name for it makes the rename plain."""
    def model(name):
        return de.EmbeddingCollection(tables={name: de.TableConfig(dim=2)},
                                      features={"t": de.FeatureConfig(table=name)})

    saved = model("words")
    saved({"t": ["a"]})
    de.checkpoint.save(tmp_path / "c", saved)
    with pytest.raises(de.errors.CheckpointError,
                       match=r"has tables \['tables.words'\] .*the model's tables "
                             r"\['tables.tokens'\] are not in it \(renamed\?\)"):
        de.checkpoint.load(tmp_path / "c", model("tokens"))
