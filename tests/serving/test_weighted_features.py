"""Features trained with per_sample_weights, exported and served with their weights.

A model trained with weighted bags (e.g. idf-weighted title words) was served unweighted:
the package did not record the weights and a request could not carry them, so served
predictions silently differed from the trained model's.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import dynembed as de
from dynembed.errors import KeyInputError
from dynembed.serving import EmbeddingModelHandler, export_package, open_package
from dynembed.serving.handler import InputError
from dynembed.serving.inference_api import _v2_examples
from dynembed.serving.package import MANIFEST


def _model(weighted: bool = True):
    torch.manual_seed(0)
    coll = de.EmbeddingCollection(
        tables={"words": de.TableConfig(dim=3, seed=1), "user": de.TableConfig(dim=2, seed=2)},
        features={"title": de.FeatureConfig(table="words", pooling="sum", weighted=weighted),
                  "user": "user"})
    return coll, nn.Sequential(nn.Linear(5, 1), nn.Flatten(0))


def _batch():
    keys = [["red", "shoe", "red"], [], ["hat"]]
    weights = [[0.5, 2.0, 1.5], [], [3.0]]
    return keys, weights, ["u1", "u2", "u1"]


def test_a_weighted_feature_is_served_with_its_weights(tmp_path):
    coll, dense = _model()
    keys, weights, users = _batch()
    flat = torch.tensor([w for bag in weights for w in bag])
    coll({"title": keys, "user": users}, per_sample_weights={"title": flat})  # inserts
    path = export_package(tmp_path / "p", embeddings=coll, dense=dense, name="m")
    assert json.loads((path / MANIFEST).read_text())["features"]["title"]["weighted"] is True
    coll.eval()
    with torch.no_grad():
        want = dense(coll({"title": keys, "user": users}, concat=True,
                          per_sample_weights={"title": flat}))
        unweighted = dense(coll({"title": keys, "user": users}, concat=True,
                                per_sample_weights={"title": torch.ones(4)}))
    assert not torch.allclose(want, unweighted)  # the weights matter in this test
    handler = EmbeddingModelHandler(open_package(path))
    requests = [{"title": {"keys": k, "weights": w}, "user": u}
                for k, w, u in zip(keys, weights, users)]
    got = handler.predict(handler.validate(requests))
    assert got == pytest.approx(want.tolist(), rel=1e-6, abs=1e-7)
    one = handler.predict(handler.validate(requests[:1]))  # alone: the same answer
    assert one == pytest.approx(got[:1], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize(("value", "problem"), [
    (["red"], r"is weighted: give \{\"keys\": \[...\], \"weights\""),
    ({"keys": ["red"]}, "is weighted"),
    ({"keys": ["red", "hat"], "weights": [1.0]}, "2 keys but 1 weights"),
    ({"keys": ["red"], "weights": ["1"]}, "weights must be a list of finite numbers"),
    ({"keys": ["red"], "weights": [float("nan")]}, "finite numbers"),
    ({"keys": ["red"], "weights": [True]}, "finite numbers"),
    # float32's inf as weights gave inf or NaN predictions; a 400-digit int an OverflowError
    ({"keys": ["red"], "weights": [1e39]}, r"finite numbers \(within float32's range\)"),
    ({"keys": ["red"], "weights": [-(10**400)]}, "finite numbers"),
    ({"keys": [1], "weights": [1.0]}, r"\[0\] must be a string key"),
])
def test_bad_weighted_values_are_named(tmp_path, value, problem):
    coll, dense = _model()
    handler = EmbeddingModelHandler(open_package(
        export_package(tmp_path / "p", embeddings=coll, dense=dense, name="m")))
    with pytest.raises(InputError, match=r"example 0, feature 'title'.*" + problem):
        handler.validate([{"title": value, "user": "u"}])


def test_good_weighted_examples_take_the_fast_check_and_bad_ones_do_not(tmp_path):
    """Every weighted example went through the per-key checks that name what is wrong,
    a Python call per key and weight on the server's event loop."""
    coll, dense = _model()
    handler = EmbeddingModelHandler(open_package(
        export_package(tmp_path / "p", embeddings=coll, dense=dense, name="m")))
    good = {"title": {"keys": ["red", "hat"], "weights": [0.5, 2]}, "user": "u"}
    assert handler._plainly_valid(good)
    for title in ({"keys": ["red", "hat"], "weights": [0.5]}, {"keys": ["red"]},
                  {"keys": ["red"], "weights": [float("inf")]}, {"keys": [1], "weights": [1.0]},
                  ["red"]):
        assert not handler._plainly_valid({**good, "title": title})


def test_v2_requests_give_weights_as_their_own_input(tmp_path):
    coll, dense = _model()
    handler = EmbeddingModelHandler(open_package(
        export_package(tmp_path / "p", embeddings=coll, dense=dense, name="m")))
    entry = SimpleNamespace(handler=handler)
    body = {"inputs": [
        {"name": "title", "datatype": "BYTES", "shape": [2], "data": [["a", "b"], ["c"]]},
        {"name": "title.weights", "datatype": "FP32", "shape": [2], "data": [[1.0, 2.0], [3.0]]},
        {"name": "user", "datatype": "BYTES", "shape": [2], "data": ["u", "v"]}]}
    assert _v2_examples(body, entry) == [
        {"title": {"keys": ["a", "b"], "weights": [1.0, 2.0]}, "user": "u"},
        {"title": {"keys": ["c"], "weights": [3.0]}, "user": "v"}]
    body["inputs"].pop(1)
    with pytest.raises(Exception, match=r"missing inputs \['title.weights'\]"):
        _v2_examples(body, entry)


def test_weights_looked_up_but_not_declared_are_refused_at_export(tmp_path):
    coll, dense = _model(weighted=False)
    keys, weights, users = _batch()
    coll({"title": keys, "user": users}, per_sample_weights={"title": weights})
    with pytest.raises(ValueError, match=r"features \['title'\] were looked up with "
                                         r"per_sample_weights but are not declared weighted"):
        export_package(tmp_path / "p", embeddings=coll, dense=dense, name="m")
    assert not (tmp_path / "p").exists()


def test_a_weighted_feature_needs_its_weights_in_every_lookup():
    coll, _ = _model()
    keys, _, users = _batch()
    with pytest.raises(KeyInputError, match=r"no weights for features \['title'\], declared "
                                            "weighted=True"):
        coll({"title": keys, "user": users})
    assert all(len(t) == 0 for t in coll.tables.values())  # checked before any insert


def test_weighted_needs_sum_pooling_and_a_bool():
    with pytest.raises(ValueError, match="weighted=True needs pooling='sum'"):
        de.FeatureConfig(table="t", pooling="mean", weighted=True)
    with pytest.raises(TypeError, match="weighted must be True or False"):
        de.FeatureConfig(table="t", pooling="sum", weighted="yes")


def test_older_packages_without_the_field_read_as_unweighted(tmp_path):
    coll, dense = _model(weighted=False)
    path = export_package(tmp_path / "p", embeddings=coll, dense=dense, name="m")
    manifest = json.loads((path / MANIFEST).read_text())
    for feature in manifest["features"].values():
        del feature["weighted"]
    (path / MANIFEST).write_text(json.dumps(manifest))
    handler = EmbeddingModelHandler(open_package(path))
    assert handler.predict(handler.validate([{"title": ["a"], "user": "u"}]))


def test_feature_types_default_to_the_keys_the_features_were_looked_up_with(tmp_path):
    """An int-keyed feature exported with the default type "string" was served string keys
    hashing to other ids: every request got default vectors, counted but never refused."""
    coll = de.EmbeddingCollection(tables={"user": de.TableConfig(dim=2, seed=1),
                                          "word": de.TableConfig(dim=2, seed=2)},
                                  features={"user": "user", "word": "word"})
    dense = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    coll({"user": torch.tensor([269, 7]), "word": ["a", "b"]})
    path = export_package(tmp_path / "p", embeddings=coll, dense=dense, name="m")
    features = json.loads((path / MANIFEST).read_text())["features"]
    assert (features["user"]["type"], features["word"]["type"]) == ("int64", "string")
    handler = EmbeddingModelHandler(open_package(path))
    handler.predict(handler.validate([{"user": 269, "word": "a"}]))
    assert handler.table_stats()["user"]["defaults_served"] == 0
    with pytest.raises(ValueError, match=r"feature_types\['user'\] is 'string', but the "
                                         "feature was looked up with int keys"):
        export_package(tmp_path / "q", embeddings=coll, dense=dense, name="m",
                       feature_types={"user": "string"})
