"""Prometheus metrics read the tables' counters."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import dynembed as de


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
