"""Prometheus metrics read the tables' counters."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import (
    generate_latest as openmetrics_latest,
)
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

import dynembed as de
from dynembed.table import CallStats, Counters


def samples(registry) -> dict[tuple[str, str], float]:
    text = generate_latest(registry).decode()
    return {(s.name, s.labels.get("table", "")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_follow_the_counters():
    bounded = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), max_rows=4)
    gated = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1),
                                admission=de.policy.FrequencyAdmission(threshold=2))
    registry = CollectorRegistry()
    de.metrics.register_tables({"bounded": bounded.table, "gated": gated.table}, registry)
    bounded(torch.arange(4)).sum().backward()
    bounded(torch.arange(4, 8)).sum().backward()  # evicts 4 rows, discarded: no store
    gated(torch.tensor([1, 2, 2])).sum().backward()  # 2 seen twice: admitted
    got = samples(registry)
    totals = bounded.table.stats().totals
    assert got[("dynembed_table_discarded_rows_total", "bounded")] == totals.discarded >= 4
    assert got[("dynembed_table_lookups_keys_total", "bounded")] == 8
    assert got[("dynembed_table_rows", "bounded")] == bounded.table.size()
    assert got[("dynembed_table_not_admitted_total", "gated")] == 1
    assert got[("dynembed_table_defaults_served_total", "gated")] == 1
    assert got[("dynembed_table_inserts_total", "gated")] == 1
    bounded(torch.arange(8, 12)).sum().backward()
    assert samples(registry)[("dynembed_table_lookups_keys_total", "bounded")] == 12


def test_only_tables_are_accepted():
    with pytest.raises(TypeError, match="tables\\['x'\\]"):
        de.metrics.TableCollector({"x": object()})


def openmetrics(registry) -> dict[str, object]:
    """The registry's families as a strict OpenMetrics parser reads them, by name."""
    text = openmetrics_latest(registry).decode()
    return {family.name: family for family in openmetrics_families(text)}


def test_every_counter_and_size_matches_what_the_tables_did():
    """A scripted run with duplicates, refused admissions, evictions to a store and back,
    a NaN gradient skipped, unseen keys in eval, an erase, discards and zero_grad: every
    counter, in stats() and in the metrics, is what the tables did (counted by hand)."""
    tiered = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), max_rows=4,
                                 store=de.storage.MemoryStore(), nonfinite_grads="skip",
                                 admission=de.policy.FrequencyAdmission(threshold=2))
    lossy = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), max_rows=2,
                                update_mode="deferred")
    registry = CollectorRegistry()
    de.metrics.register_tables({"tiered": tiered.table, "lossy": lossy.table}, registry)

    tiered(torch.tensor([1, 1, 2, 3])).sum().backward()  # 1 admitted (seen twice); 2, 3 not
    tiered(torch.tensor([2, 3, 4, 5, 6])).sum().backward()  # 2, 3 admitted; 4, 5, 6 not
    tiered(torch.tensor([7, 7, 8, 8, 9, 9])).sum().backward()  # 6 rows > 4: 2 evicted (1, 2|3)
    assert tiered.stats().last_call.inserts == 3
    out = tiered(torch.tensor([1]))  # read back from the store; 1 more row evicted for it
    out.backward(torch.full_like(out, float("nan")))  # skipped, counted
    tiered.eval()
    tiered(torch.tensor([1, 100, 100]))  # unseen in eval: default vector, not inserted
    assert tiered.table.erase(torch.tensor([1, 7, 555])) == 2  # 7 in memory or the store
    lossy(torch.tensor([1, 2])).sum().backward()
    de.sparse_step(lossy)
    lossy(torch.tensor([3, 3])).sum().backward()  # 3 rows > 2 without a store: 1 discarded
    lossy.table.zero_grad()

    expected = {
        "tiered": Counters(lookup_calls=5, keys=19, hits=1, misses=18, inserts=6,
                           defaults_served=7, not_admitted=5, loaded=1, evicted=3,
                           discarded=0, store_writes=3, updated_rows=6, skipped_gradients=1,
                           unadmitted_gradients=5, nonfinite_gradients=1,
                           zeroed_gradients=0, erased=2),
        "lossy": Counters(lookup_calls=2, keys=4, hits=0, misses=4, inserts=3,
                          defaults_served=0, not_admitted=0, loaded=0, evicted=0, discarded=1,
                          store_writes=0, updated_rows=2, skipped_gradients=0,
                          unadmitted_gradients=0, nonfinite_gradients=0, zeroed_gradients=1,
                          erased=0)}
    got = samples(registry)
    for table, counts in expected.items():
        stats = (tiered if table == "tiered" else lossy).stats()
        assert stats.totals == counts, table
        for suffix, (field, _) in de.metrics.COUNTERS.items():
            assert got[(f"dynembed_table_{suffix}_total", table)] == getattr(counts, field), \
                suffix
        assert got[("dynembed_table_rows", table)] == stats.rows
        assert got[("dynembed_table_capacity_rows", table)] == stats.capacity
        assert got[("dynembed_table_used_bytes", table)] == stats.bytes_used
        assert got[("dynembed_table_allocated_bytes", table)] == stats.bytes_allocated
    assert tiered.stats().last_call == CallStats(keys=3, hits=1, misses=2,
                                                          defaults_served=2)


def test_metric_names_follow_prometheus_conventions_and_cover_every_counter():
    """Once: the lookup-call counter was not exported, and the allocated bytes were
    ``dynembed_table_bytes_allocated`` (the unit must end the name)."""
    emb = de.DynamicEmbedding(dim=2)
    registry = CollectorRegistry()
    de.metrics.register_tables({"t": emb.table}, registry)
    emb(torch.arange(3))
    families = openmetrics(registry)  # strict: a unit must end its metric's name
    exported = {field for field, _ in de.metrics.COUNTERS.values()}
    assert exported == {f.name for f in dataclasses.fields(Counters)}
    assert samples(registry)[("dynembed_table_lookup_calls_total", "t")] == 1
    for name, family in families.items():
        assert name.startswith("dynembed_table_"), name
        if family.type == "counter":
            assert {s.name for s in family.samples} == {f"{name}_total"}, name
        assert "bytes" not in name or (name.endswith("_bytes") and family.unit == "bytes")
        assert all(set(s.labels) == {"table"} for s in family.samples), name
    assert {"dynembed_table_allocated_bytes", "dynembed_table_used_bytes",
            "dynembed_table_rows", "dynembed_table_capacity_rows"} <= set(families)


def test_a_second_registration_is_refused_instead_of_exporting_every_family_twice():
    """Once: a custom registry took a second register_tables call and exported every
    family twice (strict parsers refuse such a scrape), and the default registry refused
    it with a list of 50 metric names."""
    a = de.DynamicEmbedding(dim=2)
    b = de.DynamicEmbedding(dim=2)
    registry = CollectorRegistry()
    first = de.metrics.register_tables({"a": a.table}, registry)
    with pytest.raises(ValueError, match=r"register every table in one call"):
        de.metrics.register_tables({"b": b.table}, registry)
    assert {s.labels["table"] for s in openmetrics(registry)["dynembed_table_rows"].samples} \
        == {"a"}
    registry.unregister(first)
    de.metrics.register_tables({"a": a.table, "b": b.table}, registry)
    rows = openmetrics(registry)["dynembed_table_rows"].samples
    assert sorted(s.labels["table"] for s in rows) == ["a", "b"]
