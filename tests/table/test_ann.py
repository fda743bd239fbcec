"""ApproximateIndex (faiss): high recall against exact top_k, rebuilds as rows change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynembed as de

pytest.importorskip("faiss", reason="faiss-cpu is part of the test extra")


def table_with(n: int, dim: int = 16, **options) -> de.DynamicTable:
    table = de.DynamicTable(de.TableConfig(dim=dim, seed=1, optimizer=de.optim.SGD(lr=1.0),
                                           **options))
    rows = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    table.insert_or_assign(np.arange(n) * 7 + 3, rows)
    return table


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_recall_against_exact_top_k_is_high(kind, metric):
    table = table_with(20_000)
    index = de.ApproximateIndex(table, kind=kind, metric=metric, nprobe=128, ef_search=128)
    queries = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    assert index.recall(queries, 10) >= 0.9
    found = index.search(queries, 10).ids
    assert table.contains(found.reshape(-1).numpy()).all()


def test_the_index_follows_the_table_when_rebuilt():
    table = table_with(2_000)
    index = de.ApproximateIndex(table, kind="ivf", nprobe=64, rebuild_every=1)
    assert index.rebuild() == 2_000 and not index.stale
    query = torch.zeros(16)
    query[0] = 1.0
    table.insert_or_assign([10**9], 100 * query.reshape(1, -1))  # a new, best row
    assert index.stale
    assert index.search(query, 1).ids.item() != 10**9  # not rebuilt yet: no update applied
    table.apply_gradients(np.array([3]), table.index.find(np.array([3])),
                          torch.zeros(1, 16))  # one optimizer update
    assert index.search(query, 1).ids.item() == 10**9  # rebuilt before the search
    table.erase([10**9])
    index.rebuild()
    assert index.search(query, 1).ids.item() != 10**9


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_rows_erased_since_the_build_are_never_answered(kind):
    """The index answered erased ids until rebuilt, even with rebuild_every=1 (an erase
    is no optimizer update)."""
    table = table_with(500, key_log=True)
    index = de.ApproximateIndex(table, kind=kind, nprobe=64, ef_search=128, rebuild_every=1)
    queries = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    before = index.search(queries, 5)
    gone = before.ids[:, 0].unique()
    table.erase(gone.numpy())
    after = index.search(queries, 5)
    for row, old, scores, keys in zip(after.ids, before.ids, after.scores, after.keys):
        kept = old[~torch.isin(old, gone)]
        assert row[:kept.shape[0]].tolist() == kept.tolist()  # the rest, in score order
        assert row[kept.shape[0]:].eq(-1).all() and scores[kept.shape[0]:].isinf().all()
        assert keys[kept.shape[0]:] == [None] * (5 - kept.shape[0])
    assert not torch.isin(after.ids, gone).any()


def test_the_table_must_be_a_table():
    with pytest.raises(TypeError, match="table must be a DynamicTable.*got str"):
        de.ApproximateIndex("notatable")


def test_strings_and_bad_options():
    table = de.DynamicTable(de.TableConfig(dim=4, seed=1, key_log=True))
    table.insert_or_assign(["apple", "banana", "cherry"], torch.eye(3, 4))
    index = de.ApproximateIndex(table, kind="hnsw")
    got = index.search(torch.tensor([0.0, 0.0, 1.0, 0.0]), 5)
    assert got.keys[0] == "cherry" and got.ids[3:].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="kind"):
        de.ApproximateIndex(table, kind="lsh")
    with pytest.raises(ValueError, match="nprobe"):
        de.ApproximateIndex(table, nprobe=0)


def test_negative_ids_empty_tables_and_caller_queries_are_handled():
    table = de.DynamicTable(de.TableConfig(dim=8, seed=1))
    index = de.ApproximateIndex(table, metric="cosine")
    empty = index.search(torch.ones(8), 3)
    assert torch.isinf(empty.scores).all()
    keys = np.arange(-500, 500) * 1_000_003  # half the ids negative
    table.insert_or_assign(keys, torch.randn(1000, 8, generator=torch.Generator().manual_seed(5)))
    index = de.ApproximateIndex(table, metric="cosine", nlist=10_000, nprobe=10_000)
    query = torch.randn(2, 8, generator=torch.Generator().manual_seed(6))
    before = query.clone()
    assert index.recall(query, 10) == 1.0
    assert (index.search(query, 10).ids < 0).any()  # negative ids come back as results
    assert torch.equal(query, before)  # the caller's tensor is not normalised in place


def test_overwriting_rows_makes_the_index_stale():
    """insert_or_assign / assign of existing keys changed no counter the index looked at, so
    it kept serving the old vectors as fresh."""
    table = table_with(100)
    index = de.ApproximateIndex(table, kind="ivf", nprobe=64)
    index.rebuild()
    assert not index.stale
    table.assign([3], torch.zeros(1, 16))
    assert index.stale
    index.rebuild()
    table.insert_or_assign([4], torch.ones(1, 16))
    assert index.stale


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_queries_that_are_not_contiguous(metric):
    """A transposed, sliced or expanded query tensor failed in faiss ('array is not
    C-contiguous')."""
    table = table_with(300)
    index = de.ApproximateIndex(table, metric=metric, nlist=4, nprobe=4)
    queries = torch.randn(16, 6, generator=torch.Generator().manual_seed(7))
    want = index.search(queries.T.contiguous(), 4).ids
    assert torch.equal(index.search(queries.T, 4).ids, want)
    assert torch.equal(index.search(queries.T.numpy(), 4).ids, want)
    wide = torch.cat([queries.T, torch.zeros(6, 3)], 1)
    assert torch.equal(index.search(wide[:, :16], 4).ids, want)
    assert torch.equal(index.search(queries.T[0].expand(2, 16), 4).ids, want[[0, 0]])
    assert index.recall(queries.T, 4) == 1.0


def test_queries_of_any_float_dtype_and_a_wrong_width_named_as_given():
    table = de.DynamicTable(de.TableConfig(dim=4, seed=1, initializer=de.init.Normal(std=1)))
    table.find_or_insert(torch.arange(50))
    index = de.ApproximateIndex(table)
    queries = torch.randn(3, 4)
    want = index.search(queries, 5)
    got = index.search(queries.to(torch.bfloat16).to(torch.float32), 5)  # reference
    assert index.search(queries.to(torch.bfloat16), 5).ids.tolist() == got.ids.tolist()
    assert index.search(queries.double(), 5).ids.tolist() == want.ids.tolist()
    with pytest.raises(ValueError, match=r"got \(5,\)"):
        index.search(torch.randn(5), 5)


class _CountingStore(de.storage.MemoryStore):
    """A MemoryStore that counts the rows read from it."""

    reads = 0

    def _get(self, ids):
        self.reads += len(ids)
        return super()._get(ids)


def test_searches_after_evictions_read_nothing_from_the_store():
    """Any eviction (which removes no row) made every later search look every answer up
    again, reading the evicted ones back from the store."""
    store = _CountingStore()
    emb = de.DynamicEmbedding(dim=8, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=500,
                              store=store)
    emb.table.find_or_insert(torch.arange(4000))  # most rows evicted to the store
    index = de.ApproximateIndex(emb.table, kind="ivf", nprobe=64)
    index.rebuild()
    emb(torch.arange(10_000, 10_200)).sum().backward()  # evicts more rows
    store.reads = 0
    got = index.search(torch.randn(20, 8, generator=torch.Generator().manual_seed(3)), 10)
    assert store.reads == 0 and not got.scores.isinf().any()


def test_hnsw_with_one_link_per_node_is_refused():
    """m=1 was accepted and faiss's HNSW then crashed the process (segfault) at the first
    build."""
    table = table_with(100)
    with pytest.raises(ValueError, match=r"m must be an int >= 2, got 1"):
        de.ApproximateIndex(table, kind="hnsw", m=1)
    assert de.ApproximateIndex(table, kind="hnsw", m=2).rebuild() == 100


def test_numpy_integers_are_ints():
    """k, nprobe, ... computed with numpy (np.int64) were refused as 'must be an int'."""
    table = table_with(500)
    index = de.ApproximateIndex(table, kind="ivf", nlist=np.int64(4), nprobe=np.int64(4),
                                rebuild_every=np.int64(3))
    query = torch.randn(2, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(index.search(query, np.int64(5)).ids, index.search(query, 5).ids)
    assert index.recall(query, np.int32(5)) == 1.0  # 4 lists, 4 probed: exhaustive
    with pytest.raises(ValueError, match=r"k must be an int >= 1, got True"):
        index.search(query, True)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_rows_holding_nan_or_inf_are_left_out(kind):
    """One row holding NaN (a diverged row) made every build of an ivf index raise faiss's
    'input contains NaN's or Inf's'; hnsw indexed it. Such rows score NaN (top_k ranks
    them last): they are left out."""
    table = table_with(2_000)
    diverged = torch.from_numpy(table.index.find(np.array([3, 10])))  # as training left them
    table.arena.weights[diverged] = torch.tensor([[float("nan")] * 16, [float("inf")] + [0.0] * 15])
    index = de.ApproximateIndex(table, kind=kind, nlist=8, nprobe=8, ef_search=256)
    assert index.rebuild() == 1_998
    queries = torch.randn(20, 16, generator=torch.Generator().manual_seed(5))
    got = index.search(queries, 100)
    assert torch.isfinite(got.scores).all() and not torch.isin(got.ids, torch.tensor([3, 10])).any()
    assert index.recall(queries, 10) >= 0.95


def test_rebuild_every_rebuilds_after_a_load_or_a_clear():
    """A load (or clear) may set update_step back; counting updates from the build then
    waited for the old count, so the index kept answering from the rows before the load."""
    table = table_with(500)
    index = de.ApproximateIndex(table, kind="ivf", nprobe=64, rebuild_every=2)
    query = torch.zeros(16)
    query[0] = 1.0

    def one_update():
        table.apply_gradients(np.array([3]), table.index.find(np.array([3])),
                              torch.zeros(1, 16))

    for _ in range(10):
        one_update()
    index.search(query, 1)  # built at update_step 10
    other = table_with(500)
    other.insert_or_assign([10**9], 100 * query.reshape(1, -1))  # a new, best row
    table.load_state_dict(other.state_dict())  # update_step 0
    one_update()
    one_update()  # rebuild_every updates after the load
    assert index.search(query, 1).ids.item() == 10**9
    table.clear()
    table.insert_or_assign([7], query.reshape(1, -1))
    assert index.search(query, 1).ids.item() == 7  # every row replaced: rebuilt


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_recall_counts_rows_tied_at_the_cut_as_found(kind):
    """The exact search keeps the smallest ids of rows tied at the k-th score, the index
    any of them: an exhaustive index over equal vectors measured a recall of about 0.1."""
    generator = torch.Generator().manual_seed(6)
    query = torch.randn(16, generator=generator)
    rows = torch.randn(400, 16, generator=generator)
    rows[:100] = 5 * query + torch.randn(16, generator=generator)  # 100 equal best rows
    table = de.DynamicTable(de.TableConfig(dim=16, seed=1))
    table.insert_or_assign(np.random.default_rng(0).permutation(400) * 3 + 1, rows)
    for metric in ("cosine", "dot"):
        index = de.ApproximateIndex(table, kind=kind, metric=metric, nlist=2, nprobe=2,
                                    ef_search=512)
        assert index.recall(query, 10) == 1.0
        if kind == "ivf":  # exhaustive (hnsw is approximate past the tied rows)
            assert index.recall(query.expand(3, 16), 150) == 1.0
    # a tie is no free pass: the (dot) index, stale, misses three better rows
    table.insert_or_assign([-5, -6, -7], 10 * rows[:3])
    assert index.recall(query, 10) == pytest.approx(0.7)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_tune_searches_more_until_the_target_recall_and_keeps_it(kind):
    """Rows without cluster structure: the default settings fall short of 0.95."""
    table = table_with(20_000, dim=32)
    index = de.ApproximateIndex(table, kind=kind, ef_search=1)
    gen = torch.Generator().manual_seed(3)
    queries, fresh = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
    before = index.recall(queries, 10)
    setting = (index.nprobe, index.ef_search)
    assert before < 0.95
    reached = index.tune(queries, 10, target_recall=0.95)
    assert reached >= 0.95 and reached == index.recall(queries, 10)
    assert (index.nprobe, index.ef_search) != setting
    assert index.recall(fresh, 10) > before  # the setting carries to other queries
    index.rebuild()  # kept across a rebuild
    assert index.recall(queries, 10) >= 0.9


def test_tune_keeps_a_setting_that_reaches_the_target_and_stops_at_an_exhaustive_search():
    table = table_with(2_000)
    index = de.ApproximateIndex(table, nlist=16, nprobe=16)
    queries = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    assert index.tune(queries, 5, target_recall=0.5) == 1.0 and index.nprobe == 16
    small = de.ApproximateIndex(table, nlist=16, nprobe=1)
    assert small.tune(queries, 5, target_recall=1.0) == 1.0
    assert small.index.nprobe <= 16
    empty = de.ApproximateIndex(table_with(0))
    assert empty.tune(queries, 5) == 0.0


@pytest.mark.parametrize("target", [0, 1.5, float("nan"), "high"])
def test_tune_refuses_a_bad_target_naming_it(target):
    index = de.ApproximateIndex(table_with(100))
    with pytest.raises(ValueError, match="target_recall"):
        index.tune(torch.randn(2, 16), 5, target_recall=target)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_search_excludes_rows_per_query_as_top_k_does(kind):
    table = table_with(400)
    index = de.ApproximateIndex(table, kind=kind, nlist=4, nprobe=4, ef_search=400)
    queries = torch.randn(3, 16, generator=torch.Generator().manual_seed(6))
    best = table.top_k(queries, 5).ids
    exclude = [best[0, :2], [], best[2]]
    got = index.search(queries, 5, exclude=exclude)
    assert torch.equal(got.ids, table.top_k(queries, 5, exclude=exclude).ids)
    assert not np.isin(got.ids[2].numpy(), best[2].numpy()).any()
    one = index.search(queries[0], 5, exclude=best[0, :2])
    assert torch.equal(one.ids, got.ids[0])


def test_tune_rebuilds_an_index_of_older_rows_and_leaves_settings_without_queries():
    """Scored against the table's current rows, a stale index reached no target and was
    left searching everything."""
    table = table_with(5_000)
    index = de.ApproximateIndex(table, kind="hnsw", ef_search=64)
    index.rebuild()
    table.insert_or_assign(np.arange(5_000) * 7 + 3,
                           3 * torch.randn(5_000, 16, generator=torch.Generator().manual_seed(8)))
    queries = torch.randn(20, 16, generator=torch.Generator().manual_seed(9))
    assert index.tune(queries, 10, target_recall=0.9) >= 0.9
    assert index.ef_search < 5_000 and not index.stale
    setting = (index.nprobe, index.ef_search)
    assert index.tune(torch.empty(0, 16), 10) == 0.0
    assert (index.nprobe, index.ef_search) == setting
