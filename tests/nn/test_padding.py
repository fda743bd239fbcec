"""The padding key (TableConfig.padding_key) against torch's padding_idx."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dynembed as de

V, D, PAD = 12, 4, 0


def _pair(module_cls, torch_cls, optimizer, **kwargs):
    """A dynembed module holding rows 1..V-1 of a torch module with padding_idx=PAD."""
    torch.manual_seed(0)
    ref = torch_cls(V, D, padding_idx=PAD, sparse=kwargs.get("mode") != "max", **kwargs)
    emb = module_cls(dim=D, optimizer=optimizer, padding_key=PAD, **kwargs)
    keys = torch.arange(1, V)
    emb.table.insert_or_assign(keys, ref.weight.detach()[1:].clone())
    return emb, ref


def _batches(seed: int, steps: int, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        keys = torch.randint(0, V, shape, generator=g)
        keys[:, -2:] = PAD  # padded tails, as in padded sequences
        out.append(keys)
    return out


@pytest.mark.parametrize("opt, torch_opt", [
    (de.optim.SGD(lr=0.3), lambda p: torch.optim.SGD(p, lr=0.3)),
    (de.optim.Adagrad(lr=0.3), lambda p: torch.optim.Adagrad(p, lr=0.3)),
], ids=["sgd", "adagrad"])
def test_padded_sequences_train_like_torch_padding_idx(opt, torch_opt):
    emb, ref = _pair(de.DynamicEmbedding, nn.Embedding, opt)
    topt = torch_opt(ref.parameters())
    target = torch.randn(6, 5, D, generator=torch.Generator().manual_seed(1))
    for keys in _batches(2, 5):
        out = emb(keys)
        expected = ref(keys)
        torch.testing.assert_close(out, expected)
        assert not out[:, -2:].any()  # the pads look up as zeros
        ((out - target) ** 2).sum().backward()
        topt.zero_grad()
        ((expected - target) ** 2).sum().backward()
        topt.step()
    torch.testing.assert_close(emb.table.find(torch.arange(1, V)).values, ref.weight[1:].detach())
    assert not emb.table.contains(torch.tensor([PAD])).any()  # the pad never got a row


def test_padding_keys_are_not_counted_and_never_inserted():
    emb = de.DynamicEmbedding(dim=D, padding_key="<pad>", key_log=True,
                              optimizer=de.optim.SGD(lr=0.1))
    out = emb(["a", "<pad>", "b", "<pad>", "<pad>"])
    assert out.shape == (5, D) and not out[[1, 3, 4]].any() and out[[0, 2]].all()
    totals = emb.stats().totals
    assert (totals.inserts, totals.hits, totals.misses) == (2, 0, 2)
    assert sorted(emb.table.keys_of(emb.table.export().ids)) == ["a", "b"]  # the key log too
    out.sum().backward()
    assert emb.table.size() == 2
    emb.eval()
    out = emb(["a", "<pad>", "never-seen"])
    assert not out[1].any() and emb.stats().last_call.defaults_served == 1  # only the unseen


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bags_leave_padding_out_like_torch(mode):
    emb, ref = _pair(de.DynamicEmbeddingBag, nn.EmbeddingBag, de.optim.SGD(lr=0.5), mode=mode)
    topt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for keys in _batches(3, 4):
        keys[0] = PAD  # a bag of pads only: zeros, as in torch
        out, expected = emb(keys), ref(keys)
        torch.testing.assert_close(out, expected)
        assert not out[0].any()
        (out ** 2).sum().backward()
        topt.zero_grad()
        (expected ** 2).sum().backward()
        topt.step()
    torch.testing.assert_close(emb.table.find(torch.arange(1, V)).values, ref.weight[1:].detach())


def test_bag_weights_of_padding_keys_are_dropped_with_them():
    emb, ref = _pair(de.DynamicEmbeddingBag, nn.EmbeddingBag, None, mode="sum")
    values = torch.tensor([3, PAD, 4, PAD, 5])
    offsets = torch.tensor([0, 2])
    weights = torch.tensor([1.0, 7.0, 2.0, 9.0, 3.0], requires_grad=True)
    out = emb(values, offsets, per_sample_weights=weights)
    torch.testing.assert_close(out, ref(values, offsets, per_sample_weights=weights))
    out.sum().backward()
    assert weights.grad[1] == 0 and weights.grad[3] == 0 and weights.grad[0] != 0


def test_collection_features_over_a_padded_table():
    coll = de.EmbeddingCollection(
        tables={"words": de.TableConfig(dim=D, padding_key=PAD, optimizer=de.optim.SGD(lr=1))},
        features={"title": de.FeatureConfig(table="words", pooling="mean"),
                  "last": "words"})
    inputs = {"title": torch.tensor([[5, 6, PAD], [PAD, PAD, PAD]]),
              "last": torch.tensor([7, PAD])}
    out = coll(inputs, concat=True)
    rows = coll.tables["words"].find(torch.tensor([5, 6, 7])).values
    torch.testing.assert_close(out[0], torch.cat([rows[:2].mean(0), rows[2]]))
    assert not out[1].any()
    out.sum().backward()
    assert sorted(coll.tables["words"].export().ids.tolist()) == [5, 6, 7]
    assert coll.stats()["words"].totals.inserts == 3
    weighted = de.EmbeddingCollection(
        tables={"words": de.TableConfig(dim=D, padding_key=PAD)},
        features={"title": de.FeatureConfig(table="words", pooling="sum")})
    got = weighted({"title": ([5, PAD, 6], torch.tensor([0]))},
                   per_sample_weights={"title": torch.tensor([2.0, 5.0, 1.0])})
    rows = weighted.tables["words"].find(torch.tensor([5, 6])).values
    torch.testing.assert_close(got["title"][0], 2 * rows[0] + rows[1])
    assert weighted.weights_given == {"title"}


@pytest.mark.parametrize("key, error, match", [
    (1.5, TypeError, "padding_key must be None or one key"),
    (True, TypeError, "padding_key must be None or one key"),
    ([0], TypeError, "padding_key must be None or one key"),
    (2**63, ValueError, "padding_key must be an int64 id"),
])
def test_bad_padding_keys_are_named(key, error, match):
    with pytest.raises(error, match=match):
        de.TableConfig(dim=D, padding_key=key)


def test_padding_key_ids():
    assert de.TableConfig(dim=D, padding_key=np.int64(-3)).padding_id() == -3
    seeded = de.TableConfig(dim=D, padding_key="<pad>", hash_seed=7)
    emb = de.DynamicEmbedding(dim=D, hash_seed=7)
    assert seeded.padding_id() == int(emb.table.ids_of(["<pad>"]).ids[0])
    assert seeded.padding_id() == de.TableConfig(dim=D, padding_key=b"<pad>",
                                                 hash_seed=7).padding_id()


def test_padded_string_sequences_as_nested_lists():
    """A (B, L) batch of padded token lists: it was refused (only int tensors kept a shape)
    with a hint to use bags, which pool the sequence away."""
    emb = de.DynamicEmbedding(dim=D, padding_key="<pad>", key_log=True, seed=0)
    out = emb([["a", "man", "runs"], ["a", "dog", "<pad>"]])
    assert out.shape == (2, 3, D) and not out[1, 2].any()
    torch.testing.assert_close(out[0, 0], out[1, 0])
    torch.testing.assert_close(out.reshape(-1, D)[[0, 1, 2, 4]], emb(["a", "man", "runs", "dog"]))
    assert sorted(emb.table.keys_of(emb.table.export().ids)) == ["a", "dog", "man", "runs"]
