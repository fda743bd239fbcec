"""table.top_k: exact, equal to brute force, bounded chunks, filters, every tier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynembed as de


def filled(n=3000, dim=8, **options) -> de.DynamicTable:
    table = de.DynamicTable(de.TableConfig(dim=dim, seed=1, **options))
    ids = np.arange(n) * 13 - 5000
    table.insert_or_assign(ids, torch.randn(n, dim, generator=torch.Generator().manual_seed(0)))
    return table


def brute(table, queries, k, metric):
    export = table.export()
    rows, q = export.weights, queries
    if metric == "cosine":
        rows, q = (torch.nn.functional.normalize(rows, dim=1),
                   torch.nn.functional.normalize(q, dim=1))
    scores, where = torch.topk(q @ rows.T, k, dim=1)
    return export.ids[where], scores


@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("chunk_rows", [1, 97, 1 << 16])
def test_top_k_equals_brute_force(metric, chunk_rows):
    table = filled()
    table.erase(np.arange(0, 3000, 7) * 13 - 5000)  # free slots in the middle are skipped
    queries = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    got = table.top_k(queries, 10, metric=metric, chunk_rows=chunk_rows)
    ids, scores = brute(table, queries, 10, metric)
    assert torch.equal(got.ids, ids)
    torch.testing.assert_close(got.scores, scores)


def test_top_k_searches_the_store_and_a_lazy_checkpoint(tmp_path):
    reference = filled(n=2000)
    queries = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    expected = brute(reference, queries, 7, "dot")[0]
    tiered = filled(n=2000, store=de.storage.MemoryStore(), max_rows=300)
    assert len(tiered) <= 300
    assert torch.equal(tiered.top_k(queries, 7).ids, expected)
    de.checkpoint.save(tmp_path / "c", tables={"t": reference})
    lazy = de.DynamicTable(de.TableConfig(dim=8, seed=1))
    de.checkpoint.load(tmp_path / "c", tables={"t": lazy}, lazy=True)
    assert torch.equal(lazy.top_k(queries, 7).ids, expected)


def test_top_k_among_given_keys_and_with_few_rows():
    table = filled(n=50)
    query = torch.randn(8, generator=torch.Generator().manual_seed(3))
    candidates = np.arange(0, 20) * 13 - 5000
    got = table.top_k(query, 3, keys=np.concatenate([candidates, [123456789]]))
    scores = table.find(candidates).values @ query
    assert got.ids.tolist() == candidates[torch.topk(scores, 3).indices.numpy()].tolist()
    short = table.top_k(query, 60)
    assert (short.ids[50:] == -1).all() and torch.isinf(short.scores[50:]).all()


def test_top_k_returns_strings_with_the_key_log():
    table = de.DynamicTable(de.TableConfig(dim=4, seed=1, key_log=True))
    words = ["apple", "banana", "cherry", "date"]
    table.insert_or_assign(words, torch.eye(4))
    got = table.top_k(torch.tensor([[0.0, 0.0, 1.0, 0.1]]), 2)
    assert got.keys == [["cherry", "date"]]


@pytest.mark.parametrize("queries,error,match", [
    ("abc", TypeError, "queries must be a float tensor or array.*got str"),
    (torch.ones(8, dtype=torch.bool), TypeError, "queries must be a float tensor.*bool"),
    (torch.tensor([float("nan")] + [0.0] * 7), ValueError, "queries hold NaN or inf"),
    (np.full((2, 8), np.inf), ValueError, "queries hold NaN or inf"),
])
def test_bad_queries_are_named(queries, error, match):
    """A str query was a bare torch error; a NaN query ranked rows at random."""
    table = filled(n=10)
    with pytest.raises(error, match=match):
        table.top_k(queries, 2)


@pytest.mark.parametrize("kwargs,match", [({"k": 0}, "k must"), ({"metric": "l2"}, "metric"),
                                          ({"chunk_rows": 0}, "chunk_rows")])
def test_bad_arguments_are_named(kwargs, match):
    table = filled(n=10)
    args = {"k": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        table.top_k(torch.zeros(8), **args)
    with pytest.raises(ValueError, match="queries must have shape"):
        table.top_k(torch.zeros(3), 2)
