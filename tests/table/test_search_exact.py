"""table.top_k against a brute-force numpy reference over many random tables (ties, zero
rows, k past the rows, every tier), and its argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynembed as de


def reference(ids: np.ndarray, rows: np.ndarray, queries: np.ndarray, k: int, metric: str):
    """(ids, scores, score of every id) per query, best first, ties by smallest id; a
    zero vector's cosine is 0. Computed in float64: the rows are small integers, so dot
    products are exact (cosines are not: rows of one direction may tie or not)."""
    rows, queries = rows.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-300)
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-300)
    scores = queries @ rows.T
    order = [np.lexsort((ids, -s))[:k] for s in scores]
    return [(ids[o], s[o], dict(zip(ids.tolist(), s))) for o, s in zip(order, scores)]


@pytest.mark.parametrize("seed", range(40))
def test_top_k_equals_a_brute_force_reference(seed, tmp_path):
    rng = np.random.default_rng(seed)
    n, dim, k = int(rng.integers(0, 120)), int(rng.integers(1, 6)), int(rng.integers(1, 30))
    metric = ("dot", "cosine")[seed % 2]
    ids = rng.choice(10**6, n, replace=False).astype(np.int64) - 500_000
    rows = rng.integers(-2, 3, (n, dim)).astype(np.float32)  # ties and zero rows
    queries = rng.integers(-2, 3, (int(rng.integers(1, 4)), dim)).astype(np.float32)
    tier = ("memory", "store", "lazy")[seed % 3]
    options = {"store": de.storage.MemoryStore(), "max_rows": 16} if tier == "store" else {}
    table = de.DynamicTable(de.TableConfig(dim=dim, seed=1, **options))
    table.insert_or_assign(ids, torch.from_numpy(rows))
    if tier == "lazy":
        de.checkpoint.save(tmp_path / "c", tables={"t": table})
        table = de.DynamicTable(de.TableConfig(dim=dim, seed=1))
        de.checkpoint.load(tmp_path / "c", tables={"t": table}, lazy=True)
    want = reference(ids, rows, queries, k, metric)
    for chunk_rows in (1, 7, 1 << 16):
        got = table.top_k(torch.from_numpy(queries), k, metric=metric, chunk_rows=chunk_rows)
        for (w_ids, w_scores, score_of), g_ids, g_scores in zip(want, got.ids, got.scores):
            m = w_ids.shape[0]
            if metric == "dot":
                assert g_ids[:m].tolist() == w_ids.tolist(), (tier, chunk_rows)
            else:  # the right scores, each the score of its id (ties may swap by rounding)
                mine = [score_of[i] for i in g_ids[:m].tolist()]
                np.testing.assert_allclose(mine, w_scores, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(g_scores[:m].numpy(), w_scores, rtol=1e-6, atol=1e-6)
            assert (g_ids[m:] == -1).all() and torch.isinf(g_scores[m:]).all()


def test_numpy_integers_are_ints():
    """k = np.int64(...) (e.g. a count computed with numpy) was refused with 'k must be an
    int >= 1, got np.int64(5)'."""
    table = de.DynamicTable(de.TableConfig(dim=4, seed=1))
    table.insert_or_assign(np.arange(20), torch.randn(20, 4, generator=torch.Generator()
                                                      .manual_seed(0)))
    query = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    want = table.top_k(query, 5)
    got = table.top_k(query, np.int64(5), chunk_rows=np.int32(3))
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.scores, want.scores)  # chunks round in their own way
    for bad in (True, 0, 2.0, np.float64(2)):
        with pytest.raises(ValueError, match=r"k must be an int >= 1, got"):
            table.top_k(query, bad)
