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


def _insert_diverged(table, ids, weights):
    """Rows as training may leave them, NaN included (insert_or_assign refuses NaN)."""
    table.insert_or_assign(ids, torch.nan_to_num(weights))
    table.arena.weights[torch.from_numpy(table.index.find(np.asarray(ids)))] = weights


def test_nan_scores_never_outrank_real_ones():
    """torch.topk ranks NaN as the largest value: a row holding NaN came first for every
    query. It now ranks as -inf (below every real score)."""
    table = de.DynamicTable(de.TableConfig(dim=4, seed=1))
    weights = torch.arange(40, dtype=torch.float32).reshape(10, 4) / 40
    weights[3] = float("nan")
    _insert_diverged(table, np.arange(10), weights)
    for chunk_rows in (1, 4, 1 << 16):
        got = table.top_k(torch.ones(2, 4), 3, chunk_rows=chunk_rows)
        assert got.ids.tolist() == [[9, 8, 7]] * 2
        assert torch.isfinite(got.scores).all()
        last = table.top_k(torch.ones(4), 10, chunk_rows=chunk_rows)
        assert last.ids[-1] == 3 and last.scores[-1] == float("-inf")


def test_ties_are_broken_by_id_whatever_the_chunk_size():
    """The order of tied scores came from torch.topk and changed with chunk_rows."""
    table = de.DynamicTable(de.TableConfig(dim=4, seed=1))
    ids = np.random.default_rng(0).permutation(50) * 7 - 100  # slot order is not id order
    weights = torch.ones(50, 4)
    weights[ids.argsort()[:5]] = 2.0  # the five smallest ids score highest
    table.insert_or_assign(ids, weights)
    by_id = np.sort(ids)
    want = [by_id[:5].tolist() + by_id[5:12].tolist()]
    for chunk_rows in (1, 3, 7, 16, 1 << 16):
        got = table.top_k(torch.ones(1, 4), 12, chunk_rows=chunk_rows)
        assert got.ids.tolist() == want, chunk_rows
        among = table.top_k(torch.ones(1, 4), 12, keys=ids, chunk_rows=chunk_rows)
        assert among.ids.tolist() == want, chunk_rows


def test_ties_and_nan_match_a_lexicographic_brute_force_per_query():
    """Queries of one call that tie at the cut and queries that do not, NaN rows among them:
    every chunking gives the (score desc, id asc) order."""
    table = de.DynamicTable(de.TableConfig(dim=2, seed=1))
    ids = np.random.default_rng(1).permutation(60) * 5 - 150
    weights = torch.tensor(np.random.default_rng(2).integers(0, 3, (60, 2)), dtype=torch.float32)
    weights[:4, 0] = float("nan")
    _insert_diverged(table, ids, weights)
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -0.25]])
    export = table.export()
    scores = torch.nan_to_num(queries @ export.weights.T, nan=float("-inf")).numpy()
    for chunk_rows in (1, 6, 13, 1 << 16):
        got = table.top_k(queries, 9, chunk_rows=chunk_rows)
        for row, query_scores in enumerate(scores):
            order = np.lexsort((export.ids.numpy(), -query_scores))[:9]
            assert got.ids[row].tolist() == export.ids.numpy()[order].tolist(), chunk_rows
            assert got.scores[row].tolist() == query_scores[order].tolist()


def reference_excluding(table, queries, k, exclude):
    """Brute force: per query, drop the excluded ids, then best score first, ties by id."""
    export = table.export()
    scores = (queries @ export.weights.T).numpy()
    out_ids, out_scores = [], []
    for i, row in enumerate(scores):
        banned = np.isin(export.ids.numpy(), np.asarray(exclude[i], dtype=np.int64))
        order = np.lexsort((export.ids.numpy(), -row))
        order = order[~banned[order]][:k]
        pad = k - order.shape[0]
        out_ids.append(np.concatenate([export.ids.numpy()[order], np.full(pad, -1)]))
        out_scores.append(np.concatenate([row[order], np.full(pad, -np.inf)]))
    return np.stack(out_ids), np.stack(out_scores).astype(np.float32)


@pytest.mark.parametrize("chunk_rows", [7, 1 << 16])
def test_top_k_excluding_rows_per_query_equals_brute_force(chunk_rows):
    table = filled(n=60)
    queries = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    best = table.top_k(queries, 10).ids.numpy()
    exclude = [best[0, :3],                      # the three best
               [],                               # nothing
               list(best[2, ::2]) + [987654321],  # every other one, and an absent key
               np.arange(60) * 13 - 5000]        # every row: all padding
    got = table.top_k(queries, 10, exclude=exclude, chunk_rows=chunk_rows)
    ids, scores = reference_excluding(table, queries, 10, exclude)
    assert torch.equal(got.ids, torch.from_numpy(ids))
    torch.testing.assert_close(got.scores, torch.from_numpy(scores))
    assert not np.isin(got.ids[0].numpy(), best[0, :3]).any()
    assert got.ids[3].tolist() == [-1] * 10


def test_top_k_excludes_string_keys_for_one_query_and_reports_the_rest():
    table = de.DynamicTable(de.TableConfig(dim=4, seed=1, key_log=True))
    words = ["cat", "dog", "emu", "fox", "gnu"]
    table.insert_or_assign(words, torch.eye(5, 4) * torch.arange(5, 0, -1).unsqueeze(1))
    query = torch.ones(4)
    assert table.top_k(query, 2).keys == ["cat", "dog"]
    got = table.top_k(query, 2, exclude=["cat", "emu"])
    assert got.keys == ["dog", "fox"]
    assert got.ids.tolist() == table.ids_of(["dog", "fox"]).ids.tolist()


def test_bad_exclusions_are_named():
    table = filled(n=20)
    queries = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"exclude must hold one collection of keys per "
                                         r"query \(2 queries\), got list of length 1"):
        table.top_k(queries, 3, exclude=[[1, 2]])
    with pytest.raises(ValueError, match="exclude must hold"):
        table.top_k(queries, 3, exclude="ab")
    with pytest.raises(de.KeyInputError, match=r"exclude\[1\]"):
        table.top_k(queries, 3, exclude=[[1], [1.5]])


def test_exclusions_in_every_collection_form_agree():
    table = filled(n=60)
    queries = torch.randn(3, 8, generator=torch.Generator().manual_seed(6))
    best = table.top_k(queries, 6).ids
    as_lists = [best[0, :2].tolist(), [], best[2, 1:4].tolist()]
    expected = table.top_k(queries, 6, exclude=as_lists).ids
    forms = [
        [best[0, :2], torch.tensor([], dtype=torch.int64), best[2, 1:4]],  # int tensors
        [best[0, :2].numpy(), np.array([]), best[2, 1:4].numpy()],  # an empty float array
        [set(as_lists[0]), set(), frozenset(as_lists[2])],  # sets, as "seen items" are
        tuple(as_lists),
        [as_lists[0] + [10**15, 10**15], [-(2**63)], as_lists[2]],  # absent keys, repeats
    ]
    for form in forms:
        assert torch.equal(table.top_k(queries, 6, exclude=form).ids, expected), form


def test_one_key_per_query_is_refused_as_not_a_collection():
    """A 1-D tensor of q ids was read as one id per query; a list of ints as a bad key."""
    table = filled(n=20)
    queries = torch.randn(3, 8)
    for exclude in (torch.tensor([1, 2, 3]), [1, 2, 3], np.array([1, 2, 3])):
        with pytest.raises(TypeError, match=r"exclude\[0\] must be a collection of keys"):
            table.top_k(queries, 3, exclude=exclude)


def test_a_long_exclusion_list_of_one_query_leaves_the_others_as_they_were():
    table = filled(n=300)
    queries = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    ids = table.export().ids.numpy()
    exclude = [ids[:250], [], [], np.arange(10**12, 10**12 + 100_000)]  # most: absent
    got = table.top_k(queries, 5, exclude=exclude, chunk_rows=64)
    plain = table.top_k(queries, 5)
    assert torch.equal(got.ids[1:], plain.ids[1:])
    expected = reference_excluding(table, queries[:1], 5, [ids[:250]])[0]
    assert got.ids[0].tolist() == expected[0].tolist()
