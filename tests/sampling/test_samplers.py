"""Candidate samplers draw live rows with the probabilities they report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.sampling import InBatch, LogUniform, Uniform, Unigram, samplers


def counted_table(n: int = 40) -> de.DynamicTable:
    """Rows 0..n-1 where row i was looked up i + 1 times; every third row erased."""
    table = de.DynamicTable(de.TableConfig(dim=4, seed=1, optimizer=de.optim.SGD(lr=0.1)))
    ids = np.arange(n, dtype=np.int64)
    table.lookup_slots(ids, ids + 1, insert=True)
    table.erase(ids[::3])
    return table


def empirical(sampler, table, draws: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    ids = sampler.sample(table, draws, np.random.default_rng(0), np.empty(0, np.int64))
    assert ids.shape == (draws,)
    values, counts = np.unique(ids, return_counts=True)
    return values, counts / draws


def reported(sampler, table, ids, draws=200_000):
    return np.exp(sampler.log_expected_count(table, ids, draws)) / draws


@pytest.mark.parametrize("sampler,expected", [
    (Uniform(), lambda live, counts: np.full(live.shape[0], 1 / live.shape[0])),
    (Unigram(power=0.75), lambda live, counts: counts ** 0.75 / (counts ** 0.75).sum()),
    (Unigram(power=1.0), lambda live, counts: counts / counts.sum()),
    (LogUniform(), None),
])
def test_draws_follow_the_definition_and_the_reported_probabilities(sampler, expected):
    table = counted_table()
    live = np.sort(table.export().ids.numpy())
    counts = live + 1.0
    values, freq = empirical(sampler, table)
    assert np.isin(values, live).all()  # only live rows, never erased ones
    if expected is None:  # log-uniform over count ranks: rank 0 is the largest count
        rank = np.argsort(np.argsort(-counts, kind="stable"))
        p = np.log((rank + 2) / (rank + 1)) / np.log(live.shape[0] + 1)
    else:
        p = expected(live, counts)
    full = np.zeros(live.shape[0])
    full[np.searchsorted(live, values)] = freq
    assert 0.5 * np.abs(full - p).sum() < 0.01  # total variation distance
    np.testing.assert_allclose(reported(sampler, table, live), p, rtol=1e-9)


def test_uniform_sampling_costs_no_table_sized_work_and_handles_empty_tables():
    empty = de.DynamicTable(de.TableConfig(dim=2))
    assert Uniform().sample(empty, 10, np.random.default_rng(0), np.empty(0)).shape == (0,)
    table = counted_table(n=10_000)
    ids = Uniform().sample(table, 7, np.random.default_rng(1), np.empty(0))
    assert ids.shape == (7,) and table.contains(ids).all()


def test_in_batch_negatives_are_the_batch_positives_with_count_shares():
    table = counted_table()
    positives = np.array([1, 2, 2, 4])
    sampler = InBatch()
    assert sampler.sample(table, 0, np.random.default_rng(0), positives).tolist() == [1, 2, 4]
    live, counts = np.sort(table.export().ids.numpy()), None
    counts = live + 1.0
    got = np.exp(sampler.log_expected_count(table, np.array([2, 4]), 3))
    np.testing.assert_allclose(got, 3 * np.array([3.0, 5.0]) / counts.sum())


def test_snapshots_refresh_when_the_table_changes():
    table = counted_table()
    sampler = Unigram(refresh_every=5)
    before = sampler.snapshot(table)
    table.lookup_slots(np.array([1]), np.array([1000]), insert=True)  # one step later
    assert sampler.snapshot(table) is before
    for _ in range(5):
        table.lookup_slots(np.array([1]), np.array([1]), insert=True)
    assert sampler.snapshot(table) is not before


@pytest.mark.parametrize("make", [lambda: Unigram(power=2), lambda: Unigram(refresh_every=0),
                                  lambda: InBatch(refresh_every=0),
                                  lambda: InBatch(refresh_every="often")])
def test_bad_sampler_options_are_named(make):
    with pytest.raises(ValueError, match="power|refresh_every"):
        make()


def test_sampler_options_are_keywords():
    """Unigram(0.75) once set refresh_every (refused), and Unigram(1) a refresh every step."""
    with pytest.raises(TypeError, match="positional"):
        Unigram(1)
    assert Unigram(power=1.0).power == 1.0 and Unigram(power=1.0).refresh_every == 1000


def test_uniform_on_a_mostly_empty_arena_stays_cheap_and_live():
    table = de.DynamicTable(de.TableConfig(dim=2, seed=1))
    table.insert_or_assign(np.arange(200_000), torch.zeros(200_000, 2))
    table.erase(np.arange(1, 200_000))  # one live row, 200k slots
    ids = Uniform().sample(table, 512, np.random.default_rng(0), np.empty(0))
    assert ids.shape == (512,) and (ids == 0).all()


def test_one_sampler_can_serve_two_tables():
    a, b = counted_table(40), counted_table(40)
    b.erase(np.arange(2, 40))  # b keeps only id 1
    sampler = Unigram()
    sampler.sample(a, 10, np.random.default_rng(0), np.empty(0))
    drawn = sampler.sample(b, 50, np.random.default_rng(0), np.empty(0))
    assert drawn.tolist() == [1] * 50  # b's own snapshot, not a's


@pytest.mark.parametrize("make", [Unigram, LogUniform])
def test_snapshots_follow_rows_replaced_under_a_budget(make):
    """The size stays at the budget while eviction replaces rows: the snapshot once kept
    the evicted ids, whose draws were dropped, until no negative was left at all."""
    out = de.DynamicEmbedding(dim=4, seed=1, optimizer=de.optim.SGD(lr=0.1), max_rows=300,
                              store=de.storage.MemoryStore())
    sampler, rng = make(), np.random.default_rng(0)
    for step in range(20):
        labels = torch.arange(step * 50, step * 50 + 50)
        got = de.sampled_logits(out, torch.randn(50, 4), labels, num_sampled=64,
                                sampler=sampler, generator=rng).sampled_ids
        assert got.shape[0] == 64, step  # every draw is a row in memory
    assert out.table.stats().totals.evicted > 600


@pytest.mark.parametrize("make", [Unigram, InBatch])
def test_a_loaded_state_refreshes_the_snapshot(make):
    """A loaded state of the same size and step left the old snapshot in place: draws and
    probabilities described rows that were gone."""
    table = counted_table()
    sampler = make()
    sampler.log_expected_count(table, np.array([1]), 10)
    n = table.size()
    other = de.DynamicTable(de.TableConfig(dim=4, seed=1, optimizer=de.optim.SGD(lr=0.1)))
    other.lookup_slots(np.arange(1000, 1000 + n), np.full(n, 7), insert=True)
    assert (other.size(), other.step) == (n, table.step)
    table.load_state_dict(other.state_dict())
    got = reported(sampler, table, np.arange(1000, 1000 + n), draws=n)
    np.testing.assert_allclose(got, 1 / n)  # equal counts over the loaded rows
    if isinstance(sampler, Unigram):
        drawn = sampler.sample(table, 50, np.random.default_rng(0), np.empty(0, np.int64))
        assert set(drawn.tolist()) <= set(range(1000, 1000 + n))


@pytest.mark.parametrize("make", [Unigram, InBatch])
def test_reset_stats_does_not_hide_rows_that_left_from_the_snapshot(make):
    """Staleness was read from the counters, which reset_stats() zeroes: after it, erasing
    half the rows never refreshed the snapshot, and half the draws were erased keys."""
    table = counted_table()
    sampler = make()
    sampler.log_expected_count(table, np.array([1]), 10)  # the snapshot is taken
    table.reset_stats()
    live = np.array(sorted(set(range(40)) - set(range(0, 40, 3))))
    table.erase(live[: live.shape[0] // 2])
    kept = live[live.shape[0] // 2:]
    counts = (kept + 1).astype(float)
    got = reported(sampler, table, kept, draws=kept.shape[0])
    if isinstance(sampler, Unigram):
        np.testing.assert_allclose(got, counts ** 0.75 / (counts ** 0.75).sum(), rtol=1e-9)
        drawn = sampler.sample(table, 1000, np.random.default_rng(0), np.empty(0, np.int64))
        assert set(drawn.tolist()) <= set(kept.tolist())
    else:
        np.testing.assert_allclose(got, counts / counts.sum(), rtol=1e-9)


def test_rows_moved_survives_reset_stats():
    table = counted_table()
    moved = table.rows_moved
    assert moved == table.counters.inserts + table.counters.erased > 0
    table.reset_stats()
    assert table.rows_moved == moved
    table.erase(np.array([1, 2]))
    assert table.rows_moved == moved + 2


@pytest.mark.parametrize("make", [Unigram, LogUniform, InBatch])
def test_a_new_table_at_a_freed_tables_address_gets_its_own_snapshot(make, monkeypatch):
    """Snapshots were keyed by id(table): a table created after the sampler's last table
    was freed often has the same id (CPython reuses the address), and at the same step,
    with no wipe and few rows moved in between, it was served the freed table's snapshot:
    every draw was a key it does not have, and the probabilities were the old table's.
    Every object gets the same id here, as the freed table's and the new one's would."""
    monkeypatch.setattr(samplers, "id", lambda obj: 0, raising=False)
    sampler, rng = make(), np.random.default_rng(0)

    def table_of(first, rows):
        table = de.DynamicTable(de.TableConfig(dim=4, seed=1))
        ids = np.arange(first, first + rows, dtype=np.int64)
        table.lookup_slots(ids, np.ones_like(ids), insert=True)
        return table, ids

    old, old_ids = table_of(0, 100)
    sampler.log_expected_count(old, old_ids[:1], 10)  # a snapshot of the old table
    del old
    table, ids = table_of(1000, 101)  # the same step and wipes, one row more
    got = reported(sampler, table, ids, draws=ids.shape[0])
    np.testing.assert_allclose(got.sum(), 1.0, rtol=1e-9)  # over all its rows
    if not isinstance(sampler, InBatch):
        drawn = sampler.sample(table, 50, rng, np.empty(0, np.int64))
        assert table.contains(drawn).all()


@pytest.mark.parametrize("make", [Unigram, InBatch])
def test_a_sampler_with_a_snapshot_pickles_without_it(make):
    import pickle

    table = counted_table()
    sampler = make(refresh_every=7)
    sampler.log_expected_count(table, np.array([1]), 10)
    copy = pickle.loads(pickle.dumps(sampler))
    assert repr(copy) == repr(sampler)  # options kept; the snapshot is taken again on use
    np.testing.assert_allclose(copy.log_expected_count(table, np.array([1]), 10),
                               sampler.log_expected_count(table, np.array([1]), 10))
