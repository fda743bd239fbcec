"""A table with a padding key, exported and served: requests' pads are left out as in
training (the package records the padding id)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import dynembed as de
from dynembed.serving import EmbeddingModelHandler, export_package, open_package
from dynembed.serving.package import MANIFEST


def test_padding_is_served_as_trained(tmp_path):
    torch.manual_seed(0)
    coll = de.EmbeddingCollection(
        tables={"words": de.TableConfig(dim=3, seed=1, padding_key="<pad>")},
        features={"title": de.FeatureConfig(table="words", pooling="mean")})
    dense = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0))
    titles = [["red", "shoe", "<pad>", "<pad>"], ["hat", "<pad>", "<pad>", "<pad>"]]
    coll({"title": titles})  # inserts the words, never the pad
    path = export_package(tmp_path / "p", embeddings=coll, dense=dense, name="m")
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["tables"]["words"]["padding_id"] == coll.tables["words"].padding_id
    coll.eval()
    with torch.no_grad():
        want = dense(coll({"title": titles}, concat=True))
        unpadded = dense(coll({"title": [["red", "shoe"], ["hat"]]}, concat=True))
    torch.testing.assert_close(want, unpadded)  # mean over the words only
    handler = EmbeddingModelHandler(open_package(path))
    got = handler.predict(handler.validate([{"title": t} for t in titles]))
    assert got == pytest.approx(want.tolist(), rel=1e-6, abs=1e-7)
    assert handler.table_stats()["words"]["defaults_served"] == 0  # pads are not misses
