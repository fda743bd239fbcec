"""A package exported with its training model serves each followed checkpoint's dense
layers with its tables: one model that training had, never new tables under old layers."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from torch import nn

import dynembed as de
from dynembed.checkpoint.api import read_dense_model
from dynembed.errors import CheckpointCorruptError, CheckpointError
from dynembed.serving import (
    EmbeddingModelHandler,
    PackageError,
    export_package,
    open_package,
)
from dynembed.serving.dense_source import FIELD
from tests.serving.helpers import Trained, columns, examples, expected, make_model


def _train(coll, dense, steps: int = 3) -> None:
    """Moves both the tables and the dense layers, as a training job does."""
    opt = torch.optim.SGD(dense.parameters(), lr=0.5)
    coll.train()
    for step in range(steps):
        batch = examples(16, seed=40 + step)
        (dense(coll(columns(batch), concat=True)) - 1).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture
def job(tmp_path):
    """(package path, model, dense as exported): a package exported with its model."""
    coll, dense = make_model(seed=5)
    model = Trained(coll, dense)
    path = export_package(tmp_path / "ctr-1.0", embeddings=coll, dense=dense, name="ctr",
                          output="sigmoid", model=model)
    return path, model, copy.deepcopy(dense)


def test_export_records_where_each_dense_weight_lives_in_the_model(job):
    path, model, _ = job
    names = json.loads((path / "MANIFEST.json").read_text())["dense"][FIELD]
    assert names == {name: f"dense.{name}" for name in model.dense.state_dict()}


def test_a_refresh_serves_the_checkpoints_dense_layers_with_its_tables(job, tmp_path):
    """A followed checkpoint changed the tables only: answers came from step N's tables
    under the export's dense layers, a model no training step had."""
    path, model, exported_dense = job
    handler = EmbeddingModelHandler(open_package(path))
    assert handler.follows_dense
    _train(model.embeddings, model.dense)
    de.checkpoint.save(tmp_path / "step-1", model)
    batch = examples(20, seed=7)
    want = expected(model.embeddings, model.dense, batch)
    tables_only = expected(model.embeddings, exported_dense, batch)
    assert want != pytest.approx(tables_only, rel=1e-4)  # the dense layers did move
    handler.refresh(tmp_path / "step-1")
    assert handler.predict(batch) == pytest.approx(want, rel=1e-6)
    # the package's program is kept as it was: the next refresh starts from it again
    assert open_package(path).dense(torch.ones(2, 11)).tolist() == \
        handler.package.dense(torch.ones(2, 11)).tolist()


def test_following_many_checkpoints_reuses_a_few_copies_of_the_dense_program(job, tmp_path):
    """Every refresh deep-copied the exported program (twice, with its float64 twin); each
    copy of a torch.export program compiles its code again into caches torch never frees
    (torch.fx's and linecache), so a server following a job grew with every checkpoint,
    and with every retry of one it could not apply. Now a few copies go round, each
    refresh writing its checkpoint's weights into one nothing serves any more."""
    import gc
    import linecache
    path, model, _ = job
    handler = EmbeddingModelHandler(open_package(path))
    batch = examples(20, seed=7)
    want = []
    for i in range(2):  # two checkpoints of different weights, served in turn
        _train(model.embeddings, model.dense)
        de.checkpoint.save(tmp_path / f"step-{i}", model)
        want.append(expected(model.embeddings, model.dense, batch))
    for i in range(4):  # warm-up: the copies are made
        handler.refresh(tmp_path / f"step-{i % 2}")
    gc.collect()
    cached = len(linecache.cache)
    for i in range(40):
        handler.refresh(tmp_path / f"step-{i % 2}")
        assert handler.predict(batch) == pytest.approx(want[i % 2], rel=1e-6)
    gc.collect()
    assert len(linecache.cache) == cached
    assert handler._dense_copies.made <= 3


def test_a_wrapped_dense_part_maps_the_models_weights_and_keeps_its_own(tmp_path):
    """serving_parts() may wrap the model's layers in a new module; the new module's own
    weights are not the model's: they stay as exported (and the export says so)."""
    coll, dense = make_model(seed=6)
    model = Trained(coll, dense)
    # the model's own layers, then a head built for serving
    head = nn.Sequential(dense, nn.Unflatten(0, (-1, 1)), nn.Linear(1, 1), nn.Flatten(0))
    with pytest.warns(UserWarning, match=r"\['2.weight', '2.bias'\] is not model's own"):
        path = export_package(tmp_path / "m-1.0", embeddings=coll, dense=head, name="m",
                              model=model)
    names = json.loads((path / "MANIFEST.json").read_text())["dense"][FIELD]
    assert names == {f"0.{n}": f"dense.{n}" for n in dense.state_dict()}
    handler = EmbeddingModelHandler(open_package(path))
    _train(coll, dense)
    de.checkpoint.save(tmp_path / "step-1", model)
    handler.refresh(tmp_path / "step-1")
    batch = examples(8, seed=2)
    coll.eval()
    with torch.no_grad():
        want = head(coll(columns(batch), concat=True)).tolist()
    assert handler.predict(batch) == pytest.approx(want, rel=1e-6)


def test_a_checkpoint_without_dense_state_is_refused_and_nothing_changes(job, tmp_path):
    path, model, _ = job
    handler = EmbeddingModelHandler(open_package(path))
    batch = examples(10, seed=3)
    before = handler.predict(batch)
    _train(model.embeddings, model.dense)
    de.checkpoint.save(tmp_path / "tables-only", tables={
        f"embeddings.tables.{n}": t for n, t in model.embeddings.tables.items()})
    with pytest.raises(CheckpointError, match="holds no dense model state .* with model="):
        handler.refresh(tmp_path / "tables-only")
    assert handler.predict(batch) == before and handler.refreshes == 0


def test_a_checkpoint_of_a_changed_model_is_refused_naming_the_weight(job, tmp_path):
    path, model, _ = job
    handler = EmbeddingModelHandler(open_package(path))
    batch = examples(10, seed=3)
    before = handler.predict(batch)
    wider = Trained(model.embeddings, nn.Sequential(nn.Linear(11, 16), nn.ReLU(),
                                                    nn.Linear(16, 1), nn.Flatten(0)))
    de.checkpoint.save(tmp_path / "wider", wider)
    with pytest.raises(CheckpointError, match=r"dense.0.weight has shape \(16, 11\), the "
                                              r"package's dense 0.weight \(8, 11\)"):
        handler.refresh(tmp_path / "wider")
    renamed = Trained(model.embeddings, nn.Sequential(nn.Linear(11, 8)))
    de.checkpoint.save(tmp_path / "renamed", renamed)
    with pytest.raises(CheckpointError, match=r"lacks \['dense.2.bias'"):
        handler.refresh(tmp_path / "renamed")
    assert handler.predict(batch) == before and handler.refreshes == 0


def test_a_damaged_refresh_falls_back_to_the_dense_layers_before_too(job, tmp_path):
    """The fall-back to the tables before a damaged checkpoint must bring their dense
    layers back with them, not keep the damaged checkpoint's."""
    from tests.serving.test_package import _damaged_copy
    path, model, _ = job
    handler = EmbeddingModelHandler(open_package(path))
    batch = examples(20, seed=7)
    want = handler.predict(batch)
    _train(model.embeddings, model.dense)
    de.checkpoint.save(tmp_path / "step-1", model)
    handler.refresh(_damaged_copy(tmp_path / "step-1", tmp_path / "damaged"))
    assert handler.predict(batch) == want and handler.fallbacks == 1


def test_a_malformed_mapping_is_refused_at_open(job, tmp_path):
    path, _, _ = job
    for bad in ({"nope.weight": "dense.0.weight"}, ["0.weight"], {"0.weight": 3}):
        copy_path = tmp_path / "bad"
        shutil.rmtree(copy_path, ignore_errors=True)
        shutil.copytree(path, copy_path)
        manifest = json.loads((copy_path / "MANIFEST.json").read_text())
        manifest["dense"][FIELD] = bad
        (copy_path / "MANIFEST.json").write_text(json.dumps(manifest))
        with pytest.raises(PackageError, match=f"dense.{FIELD}"):
            open_package(copy_path)


def test_read_dense_model_checks_the_file_and_says_none_without_one(tmp_path):
    coll, dense = make_model(seed=1)
    de.checkpoint.save(tmp_path / "with", Trained(coll, dense))
    saved = read_dense_model(tmp_path / "with")
    assert saved["dense.0.weight"].equal(dense[0].weight)
    de.checkpoint.save(tmp_path / "without", tables=dict(coll.tables))
    assert read_dense_model(tmp_path / "without") is None
    file = tmp_path / "with" / "dense.pt"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="dense.pt: its CRC-32 does not match"):
        read_dense_model(tmp_path / "with")


def test_dense_state_a_gpu_job_saved_loads_on_a_server_without_one(job, tmp_path):
    """torch.save tags a cuda tensor's storage 'cuda:0'; a CPU-only server could not load
    a GPU job's dense state, and called the checkpoint damaged."""
    from unittest import mock
    path, model, _ = job
    handler = EmbeddingModelHandler(open_package(path))
    _train(model.embeddings, model.dense)
    tag = torch.serialization.location_tag
    with mock.patch.object(torch.serialization, "location_tag",
                           lambda s: "cuda:0" if tag(s) == "cpu" else tag(s)):
        torch.save({"model": model.state_dict(), "optimizer": None, "extra": None},
                   tmp_path / "cuda-tagged.pt")
    de.checkpoint.save(tmp_path / "step-1", model)
    shutil.copyfile(tmp_path / "cuda-tagged.pt", tmp_path / "step-1" / "dense.pt")
    _fix_manifest_sizes(tmp_path / "step-1")
    assert read_dense_model(tmp_path / "step-1")["dense.0.weight"].device.type == "cpu"
    handler.refresh(tmp_path / "step-1")
    batch = examples(10, seed=1)
    assert handler.predict(batch) == pytest.approx(
        expected(model.embeddings, model.dense, batch), rel=1e-6)


def _fix_manifest_sizes(folder) -> None:
    """Rewrites a checkpoint's manifest for its dense file as it now is."""
    from dynembed.checkpoint import manifest as mf
    manifest = mf.read(folder)
    file = folder / manifest["dense"]
    manifest["files"][manifest["dense"]] = {"bytes": file.stat().st_size,
                                            "crc32": mf.file_crc(file)}
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    mf.write_atomic(folder / mf.MANIFEST, mf.encode(body))


@pytest.mark.parametrize("wrap", ["compiled", "ddp-like"])
def test_a_checkpoint_saved_from_a_wrapped_model_gives_its_weights(job, tmp_path, wrap):
    """A job that saved its torch.compile'd model (names under _orig_mod.) or a model
    holding its dense part in DDP (dense.module.*) was refused: 'export a new package',
    which could never help."""
    path, model, _ = job
    handler = EmbeddingModelHandler(open_package(path))
    _train(model.embeddings, model.dense)
    saved = model.state_dict()
    if wrap == "compiled":
        renamed = {f"_orig_mod.{k}": v for k, v in saved.items()}
    else:
        renamed = {k.replace("dense.", "dense.module.", 1): v for k, v in saved.items()}
    de.checkpoint.save(tmp_path / "step-1", model)
    torch.save({"model": renamed, "optimizer": None, "extra": None},
               tmp_path / "step-1" / "dense.pt")
    _fix_manifest_sizes(tmp_path / "step-1")
    handler.refresh(tmp_path / "step-1")
    batch = examples(10, seed=1)
    assert handler.predict(batch) == pytest.approx(
        expected(model.embeddings, model.dense, batch), rel=1e-6)


def test_a_copy_as_the_dense_part_warns_that_it_will_not_follow(tmp_path):
    coll, dense = make_model(seed=7)
    with pytest.warns(UserWarning, match="shares no weight with model .* will serve dense as "
                                         "exported"):
        path = export_package(tmp_path / "m-1.0", embeddings=coll, dense=copy.deepcopy(dense),
                              name="m", model=Trained(coll, dense))
    assert FIELD not in json.loads((path / "MANIFEST.json").read_text())["dense"]
    assert not EmbeddingModelHandler(open_package(path)).follows_dense


def test_the_export_does_not_copy_the_tables_to_map_the_dense_part(job, monkeypatch):
    """Naming the model's weights took model.state_dict(), which exports every table's
    rows (1M rows: 1.3 s and 450 MB) only to drop them."""
    from dynembed.serving.dense_source import dense_state_names
    _, model, _ = job
    table = model.embeddings.tables["user"]
    monkeypatch.setattr(type(table), "export", lambda *a, **k: pytest.fail("rows copied"))
    assert dense_state_names(model.dense, model)[0]
