"""Model packages: export and open round trip, and every refusal naming its problem."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dynembed.serving import (
    EmbeddingModelHandler,
    PackageError,
    export_package,
    open_package,
)
from dynembed.serving.handler import InputError
from dynembed.serving.package import (
    BUILTIN_HANDLER,
    FORMAT,
    FORMAT_VERSION,
    read_manifest,
)
from tests.serving.helpers import examples, expected, make_model


@pytest.fixture(scope="module")
def model():
    return make_model(seed=3)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    coll, dense = model
    return export_package(tmp_path_factory.mktemp("package") / "ctr-1.0", embeddings=coll,
                          dense=dense, name="ctr", version="1.0", output="sigmoid",
                          description="click-through", feature_types={"user": "string"})


def test_export_and_open_round_trip(model, exported):
    coll, dense = model
    package = open_package(exported)
    assert (package.name, package.version, package.handler) == ("ctr", "1.0",
                                                                 BUILTIN_HANDLER)
    manifest = package.manifest
    assert manifest["format"] == FORMAT and manifest["format_version"] == FORMAT_VERSION
    assert manifest["model"]["description"] == "click-through"
    assert manifest["features"] == {
        "user": {"table": "user", "pooling": None, "type": "string", "weighted": False},
        "item": {"table": "item", "pooling": None, "type": "string", "weighted": False},
        "tags": {"table": "tags", "pooling": "mean", "type": "string", "weighted": False}}
    assert {name: t["dim"] for name, t in manifest["tables"].items()} == \
        {"user": 4, "item": 4, "tags": 3}
    assert manifest["dense"] == {"file": "dense.pt2", "input_dim": 11, "output_shape": []}
    assert manifest["output"] == {"transform": "sigmoid"}
    assert sorted(p.name for p in exported.iterdir()) == ["MANIFEST.json", "dense.pt2",
                                                          "tables"]
    assert not exported.with_name("ctr-1.0.partial").exists()
    batch = examples(30, seed=4) + examples(5, seed=5, unseen=True)
    got = EmbeddingModelHandler(package).predict(batch)
    assert got == pytest.approx(expected(coll, dense, batch), rel=1e-6, abs=1e-7)
    # read-only tables: serving inserts nothing, not even for unseen keys
    sizes = {name: len(t) for name, t in package.embeddings.tables.items()}
    EmbeddingModelHandler(package).predict(examples(5, seed=6, unseen=True))
    assert {name: len(t) for name, t in package.embeddings.tables.items()} == sizes
    assert dense.training  # export left the caller's module as it was


def test_preloaded_tables_answer_from_memory_like_lazy_ones(model, exported):
    coll, _ = model
    lazy, eager = open_package(exported), open_package(exported, preload=True)
    assert not lazy.preloaded and eager.preloaded
    for name, table in eager.embeddings.tables.items():
        assert lazy.embeddings.tables[name].base is not None  # rows still in the files
        assert table.base is None and len(table) == len(coll.tables[name])  # all in memory
    batch = examples(30, seed=4) + examples(5, seed=5, unseen=True)
    lazy_handler, eager_handler = EmbeddingModelHandler(lazy), EmbeddingModelHandler(eager)
    assert eager_handler.predict(batch) == lazy_handler.predict(batch)
    stats = eager_handler.table_stats()["user"]
    assert (stats["hits"], stats["defaults_served"], stats["loaded"]) == (30, 5, 0)
    assert lazy_handler.table_stats()["user"]["loaded"] > 0  # read from the checkpoint


def test_int64_features_and_softmax_output(tmp_path):
    import dynembed as de

    coll = de.EmbeddingCollection(tables={"user": de.TableConfig(dim=3, seed=1)},
                                  features={"user": "user"})
    dense = nn.Linear(3, 4)
    path = export_package(tmp_path / "p", embeddings=coll, dense=dense, name="ids",
                          feature_types={"user": "int64"}, output="softmax")
    package = open_package(path)
    assert package.manifest["features"]["user"]["type"] == "int64"
    assert package.manifest["dense"]["output_shape"] == [4]
    assert package.version == "1.0"
    rows = EmbeddingModelHandler(package).predict([{"user": 5}, {"user": -(2**63)}])
    assert len(rows) == 2 and all(len(r) == 4 and sum(r) == pytest.approx(1) for r in rows)


def test_export_refuses_an_existing_path(model, exported):
    coll, dense = model
    before = sorted(p.name for p in exported.iterdir())
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_package(exported, embeddings=coll, dense=dense, name="ctr")
    assert sorted(p.name for p in exported.iterdir()) == before
    assert open_package(exported).name == "ctr"


@pytest.mark.parametrize("arg, value", [
    ("name", ""), ("name", "../evil"), ("name", "-x"), ("name", "a b"), ("name", "a" * 129),
    ("name", "x/y"), ("version", "1/0"), ("version", ".."), ("version", ""),
    ("name", 5)])
def test_export_refuses_bad_names(model, tmp_path, arg, value):
    coll, dense = model
    kwargs = {"name": "ctr", "version": "1.0", arg: value}
    with pytest.raises(ValueError, match=rf"^{arg} must be"):
        export_package(tmp_path / "p", embeddings=coll, dense=dense, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_bad_arguments(model, tmp_path):
    coll, dense = model
    target = tmp_path / "p"
    with pytest.raises(ValueError, match="output must be one of"):
        export_package(target, embeddings=coll, dense=dense, name="c", output="relu")
    with pytest.raises(ValueError, match=r"feature_types\['user'\]"):
        export_package(target, embeddings=coll, dense=dense, name="c",
                       feature_types={"user": "float"})
    with pytest.raises(ValueError, match="age"):
        export_package(target, embeddings=coll, dense=dense, name="c",
                       feature_types={"age": "int64"})
    with pytest.raises(TypeError, match="embeddings"):
        export_package(target, embeddings=dense, dense=dense, name="c")
    with pytest.raises(TypeError, match="dense"):
        export_package(target, embeddings=coll, dense=lambda x: x, name="c")
    assert list(tmp_path.iterdir()) == []


class _DataDependent(nn.Module):
    """Branches on a value: torch.export cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            return x.sum(1)
        return -x.sum(1)


def test_export_refuses_a_dense_module_that_does_not_export(model, tmp_path):
    coll, _ = model
    dense = _DataDependent()
    with pytest.raises(ValueError, match=r"torch.export \(input \(B, 11\)\)"):
        export_package(tmp_path / "p", embeddings=coll, dense=dense, name="ctr")
    assert list(tmp_path.iterdir()) == []  # no package, no partial directory
    assert dense.training


def _edit(manifest: dict, path: str, value=None, *, delete: bool = False) -> None:
    *parents, last = path.split(".")
    node = manifest
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value


@pytest.mark.parametrize("path, value, delete, problem", [
    ("format", "torchserve-mar", False, "format must be 'dynembed-model-package'"),
    ("format", None, True, "format must be"),
    ("format_version", 2, False, "format_version 2 is not supported"),
    ("format_version", "1", False, "format_version '1' is not supported"),
    ("format_version", None, True, "format_version None is not supported"),
    ("model", None, True, "missing field 'model'"),
    ("model.name", None, True, "missing field 'name'"),
    ("model.version", None, True, "missing field 'version'"),
    ("model.handler", None, True, "missing field 'handler'"),
    ("features", None, True, "missing field 'features'"),
    ("tables", None, True, "missing field 'tables'"),
    ("output", None, True, "missing field 'output'"),
    ("dense", None, True, "missing field 'dense'"),
    ("dense.input_dim", None, True, "missing field 'input_dim'"),
    ("checkpoint", None, True, "missing field 'checkpoint'"),
    ("features.tags.pooling", None, True, "missing field 'pooling'"),
    ("model.name", "../evil", False, "model.name must be"),
    ("model.version", "1 0", False, "model.version must be"),
    ("model.handler", ["x"], False, "model.handler must be a string"),
    ("features", {}, False, "features is empty"),
    ("features", ["user"], False, "malformed"),
    ("features.user.table", "nope", False, "feature 'user' is malformed"),
    ("features.user.type", "float", False, "feature 'user' is malformed"),
    ("features.tags.pooling", 3, False, "feature 'tags' is malformed"),
    ("output.transform", "relu", False, "output.transform 'relu'"),
    ("dense.input_dim", "eleven", False, "eleven"),
    ("dense.output_shape", None, True, "missing field 'output_shape'"),  # a 500 later, once
    ("dense.output_shape", [0], False, "dense.output_shape must be a list of positive ints"),
    ("dense.output_shape", "1", False, "dense.output_shape must be a list of positive ints"),
    ("dense.file", "../other/dense.pt2", False, "dense.file must be a path inside"),
    ("dense.file", "/etc/hostname", False, "dense.file must be a path inside"),
    ("checkpoint", "/tmp", False, "checkpoint must be a path inside"),
    ("checkpoint", 5, False, "checkpoint must be a path inside"),
    ("tables.user.optimizer.type", "Evil", False, "unknown optimizer type 'Evil'"),
    ("tables.user.optimizer.fields", {"lr": 0.1, "bogus": 1}, False, "optimizer Adagrad"),
    ("tables.user.dim", None, True, "table 'user' of the manifest is malformed"),
])
def test_manifest_errors_name_the_problem(exported, tmp_path, path, value, delete, problem):
    target = tmp_path / "p"
    shutil.copytree(exported, target)
    manifest = json.loads((target / "MANIFEST.json").read_text())
    _edit(manifest, path, value, delete=delete)
    (target / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError) as raised:
        open_package(target)
    assert problem in str(raised.value)


def test_not_a_package(tmp_path, exported):
    with pytest.raises(PackageError, match="is not a model package"):
        open_package(tmp_path)
    target = tmp_path / "p"
    shutil.copytree(exported, target)
    (target / "MANIFEST.json").write_text('{"format": ')
    with pytest.raises(PackageError, match="is not valid JSON"):
        read_manifest(target)
    (target / "MANIFEST.json").write_text("[1, 2]")
    with pytest.raises(PackageError, match="format must be"):
        read_manifest(target)


def test_damaged_files_are_package_errors(exported, tmp_path):
    target = tmp_path / "p"
    shutil.copytree(exported, target)
    (target / "dense.pt2").write_bytes(b"not a zip")
    with pytest.raises(PackageError, match="dense.pt2"):
        open_package(target)
    (target / "dense.pt2").unlink()
    with pytest.raises(PackageError, match="dense.pt2"):
        open_package(target)
    shutil.copy(exported / "dense.pt2", target / "dense.pt2")
    assert torch.equal(open_package(target).dense(torch.ones(2, 11)),
                       open_package(exported).dense(torch.ones(2, 11)))


@pytest.fixture(scope="module")
def mixed_handler(tmp_path_factory):
    """A handler of int64 and string features, pooled and not."""
    import dynembed as de

    coll = de.EmbeddingCollection(
        tables={"user": de.TableConfig(dim=2, seed=1), "word": de.TableConfig(dim=2, seed=2)},
        features={"user": "user", "seen": de.FeatureConfig(table="user", pooling="sum"),
                  "word": "word", "query": de.FeatureConfig(table="word", pooling="mean")})
    path = export_package(tmp_path_factory.mktemp("mixed") / "p", embeddings=coll,
                          dense=nn.Linear(8, 1), name="mixed",
                          feature_types={"user": "int64", "seen": "int64"})
    return EmbeddingModelHandler(open_package(path))


_KEYS = st.one_of(st.integers(-(2**64), 2**64), st.sampled_from([-(2**63), 2**63 - 1, 2**63]),
                  st.booleans(), st.floats(allow_nan=False), st.text(max_size=3), st.none())
_VALUES = st.one_of(_KEYS, st.lists(_KEYS, max_size=4), st.lists(st.lists(_KEYS, max_size=2),
                                                                   max_size=2))


@settings(max_examples=400, deadline=None)
@given(example=st.dictionaries(st.sampled_from(["user", "seen", "word", "query", "extra"]),
                               _VALUES, max_size=5))
def test_the_fast_validation_accepts_exactly_what_the_detailed_one_does(mixed_handler,
                                                                         example):
    try:
        mixed_handler._check(0, example)
        detailed = True
    except InputError:
        detailed = False
    assert mixed_handler._plainly_valid(example) == detailed


def test_validate_names_the_bad_example_and_feature(mixed_handler):
    good = {"user": 1, "seen": [2, -(2**63)], "word": "a", "query": ["b", "c"]}
    assert mixed_handler.validate([good, good]) == [good, good]
    with pytest.raises(InputError, match=r"example 1, feature 'seen'\[1\]"):
        mixed_handler.validate([good, {**good, "seen": [2, 2**63]}])
    with pytest.raises(InputError, match=r"example 0, feature 'user'"):
        mixed_handler.validate([{**good, "user": True}])


def test_table_counters_go_on_across_a_refresh(exported):
    """A refresh swapped in tables whose counters started at 0: Prometheus saw the
    table counters go back (a reset, or an undercount once past the old value)."""
    handler = EmbeddingModelHandler(open_package(exported))
    handler.predict(examples(10, seed=7) + examples(4, seed=8, unseen=True))
    before = handler.table_stats()
    assert before["user"]["misses"] == 14 and before["user"]["defaults_served"] > 0
    handler.refresh(exported / "tables")
    assert handler.table_stats() == before
    handler.predict(examples(10, seed=7))
    after = handler.table_stats()
    assert after["user"]["misses"] == 24  # lazily opened: every lookup reads the files
    assert all(after[t][k] >= before[t][k] for t in before for k in before[t])


def test_a_batch_still_running_on_swapped_out_tables_is_counted(exported):
    """A refresh took a copy of the old tables' counters: what a batch in flight on them
    counted afterwards was lost (0.3% of the keys over 60 refreshes under load)."""
    handler = EmbeddingModelHandler(open_package(exported))
    in_flight = handler.embeddings  # a batch took these tables just before the refresh
    handler.refresh(exported / "tables")
    in_flight(handler._columns(examples(6, seed=9))[0], concat=True)  # ... and ends now
    assert handler.table_stats()["user"]["misses"] == 6
    handler.refresh(exported / "tables")  # a second refresh keeps them
    assert handler.table_stats()["user"]["misses"] == 6


def test_tables_that_admitted_keys_open_and_refresh_without_a_warning(tmp_path):
    """Every open and every followed checkpoint of a model whose tables had an admission
    policy warned that the tables were 'built without ... an admission policy?': serving
    tables are built without one on purpose (they admit nothing), so the warning blamed the
    user for the library's choice."""
    import dynembed as de

    coll = de.EmbeddingCollection(tables={"t": de.TableConfig(
        dim=2, seed=1, optimizer=de.optim.SGD(lr=0.1), key_log=True,
        admission=de.policy.BloomAdmission(expected_keys=100))})
    for _ in range(2):  # admitted when seen again
        coll({"t": ["a", "b"]})
    assert len(coll.tables["t"]) == 2
    path = export_package(tmp_path / "m-1.0", embeddings=coll, dense=nn.Linear(2, 1),
                          name="m", version="1.0")
    de.checkpoint.save(tmp_path / "job", nn.ModuleDict({"embeddings": coll}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lazy, eager = open_package(path), open_package(path, preload=True)
        handler = EmbeddingModelHandler(eager)
        handler.refresh(tmp_path / "job")  # a followed training checkpoint
    assert len(eager.embeddings.tables["t"]) == 2
    assert len(handler.embeddings.tables["t"]) == 2
    assert handler.predict([{"t": "a"}]) == EmbeddingModelHandler(lazy).predict([{"t": "a"}])



def _damaged_copy(checkpoint, to):
    """A copy of ``checkpoint`` with one byte flipped in the middle of every table's
    records: the size stays, only the block checksums can tell."""
    from dynembed.checkpoint.rows_file import RowsFile
    shutil.copytree(checkpoint, to)
    for rows in to.rglob("*.rows"):
        offset, size = RowsFile(str(rows)).layout.offsets["records"]
        data = bytearray(rows.read_bytes())
        data[offset + size // 2] ^= 0x01
        rows.write_bytes(bytes(data))
    return to


def test_a_refreshed_checkpoint_found_damaged_falls_back_to_the_tables_before(
        exported, tmp_path):
    """A lazily opened checkpoint checks a block when a lookup first reads it: a damaged
    followed checkpoint answered 500 to every request that touched the block (naming the
    server's file), for as long as it was the newest."""
    handler = EmbeddingModelHandler(open_package(exported))
    batch = examples(20, seed=7)
    want = handler.predict(batch)
    served = handler.embeddings
    handler.refresh(_damaged_copy(exported / "tables", tmp_path / "damaged"))
    assert handler.predict(batch) == want  # this batch too, on the tables before
    assert handler.embeddings is served and handler.fallbacks == 1
    assert handler.predict(batch) == want
    handler.refresh(exported / "tables")  # a newer sound checkpoint is taken as usual
    assert handler.predict(batch) == want and handler.embeddings is not served


def test_a_damaged_package_checkpoint_has_nothing_to_fall_back_to(exported, tmp_path):
    from dynembed.errors import CheckpointCorruptError
    package = tmp_path / "ctr-1.0"
    shutil.copytree(exported, package, ignore=shutil.ignore_patterns("tables"))
    _damaged_copy(exported / "tables", package / "tables")
    handler = EmbeddingModelHandler(open_package(package))
    with pytest.raises(CheckpointCorruptError, match="checksum"):
        handler.predict(examples(20, seed=7))
    assert handler.fallbacks == 0


def test_a_package_records_its_source_step_and_a_follower_moves_only_past_it(
        model, tmp_path):
    """A package exported from step 80 of a training job, following the job's directory,
    took its step 25 at startup: older tables than its own."""
    import types

    from dynembed.serving.package import source_step
    from dynembed.serving.server import _moves_to
    coll, dense = model
    path = export_package(tmp_path / "p", embeddings=coll, dense=dense, name="ctr",
                          source_step=80)
    assert source_step(read_manifest(path)) == 80
    handler = EmbeddingModelHandler(open_package(path))
    fresh = types.SimpleNamespace(checkpoint=None, handler=handler)  # serves the package's
    assert not _moves_to(fresh, tmp_path / "ckpt" / "step-0000000025")
    assert not _moves_to(fresh, tmp_path / "ckpt" / "step-0000000080")
    assert _moves_to(fresh, tmp_path / "ckpt" / "step-0000000081")
    unknown = export_package(tmp_path / "q", embeddings=coll, dense=dense, name="ctr")
    assert source_step(read_manifest(unknown)) is None
    fresh.handler = EmbeddingModelHandler(open_package(unknown))
    assert _moves_to(fresh, tmp_path / "ckpt" / "step-0000000025")  # as before
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="source_step must be an int >= 0"):
            export_package(tmp_path / "r", embeddings=coll, dense=dense, name="ctr",
                           source_step=bad)
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["source"] = {"step": "80"}
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="source.step must be an int >= 0"):
        read_manifest(path)
