"""Prometheus metrics of dynamic tables, read from their counters at scrape time.

    from prometheus_client import REGISTRY, start_http_server
    de.metrics.register_tables({"query": emb.table}, registry=REGISTRY)
    start_http_server(8000)          # /metrics now shows dynembed_table_* series

Nothing is counted twice: the collector reads ``table.stats()`` when Prometheus scrapes, so
tables keep their single source of truth and training pays nothing per lookup.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dynembed.table.table import DynamicTable

COUNTERS = {
    # metric suffix              counter field           help
    "lookups_keys":             ("keys", "Keys looked up (with duplicates)."),
    "hits":                     ("hits", "Keys whose row was in memory."),
    "misses":                   ("misses", "Keys whose row was not in memory."),
    "inserts":                  ("inserts", "Rows created."),
    "defaults_served":          ("defaults_served", "Keys answered with the default vector."),
    "not_admitted":             ("not_admitted", "Keys refused a row by admission."),
    "loaded_rows":              ("loaded", "Rows read from the store."),
    "evicted_rows":             ("evicted", "Rows evicted from memory to the store."),
    "discarded_rows":           ("discarded", "Rows evicted with no store (lost)."),
    "store_written_rows":       ("store_writes", "Rows written to the store."),
    "updated_rows":             ("updated_rows", "Row updates applied by the optimizer."),
    "skipped_gradients":        ("skipped_gradients", "Gradient rows not applied."),
    "unadmitted_gradients":     ("unadmitted_gradients",
                                 "Gradient rows dropped: key not admitted."),
    "nonfinite_gradients":      ("nonfinite_gradients", "Gradient rows with NaN or inf."),
    "zeroed_gradients":         ("zeroed_gradients",
                                 "Deferred gradient rows dropped by zero_grad()."),
    "erased_rows":              ("erased", "Rows removed by erase or clear."),
}


class TableCollector(Collector):
    """Exports the counters and sizes of named tables (label ``table``).

    Args:
        tables: table name -> DynamicTable (e.g. ``collection.tables``).
    """

    def __init__(self, tables: Mapping[str, DynamicTable]) -> None:
        for name, table in tables.items():
            if not isinstance(table, DynamicTable):
                raise TypeError(f"tables[{name!r}] must be a DynamicTable, got "
                                f"{type(table).__name__}")
        self.tables = dict(tables)

    def collect(self) -> Iterator:
        stats = {name: table.stats() for name, table in self.tables.items()}
        for suffix, (field, text) in COUNTERS.items():
            family = CounterMetricFamily(f"dynembed_table_{suffix}", text, labels=["table"])
            for name, s in stats.items():
                family.add_metric([name], getattr(s.totals, field))
            yield family
        for suffix, text, read in (
                ("rows", "Rows in memory.", lambda s: s.rows),
                ("bytes_allocated", "Bytes allocated for rows and index.",
                 lambda s: s.bytes_allocated)):
            family = GaugeMetricFamily(f"dynembed_table_{suffix}", text, labels=["table"])
            for name, s in stats.items():
                family.add_metric([name], read(s))
            yield family


def register_tables(tables: Mapping[str, DynamicTable],
                    registry: CollectorRegistry = REGISTRY) -> TableCollector:
    """Registers a :class:`TableCollector` for ``tables``; returns it (to unregister)."""
    collector = TableCollector(tables)
    registry.register(collector)
    return collector
