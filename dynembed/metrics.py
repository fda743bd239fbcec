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
    # metric suffix (+ _total)   counter field           help
    "lookup_calls":             ("lookup_calls",
                                 "Lookup calls (module calls, find, find_or_insert)."),
    "lookups_keys":             ("keys", "Keys looked up (with duplicates)."),
    "hits":                     ("hits", ("Keys whose row was in memory (per key; a lazily "
                                 "opened table's reads keep no row in memory).")),
    "misses":                   ("misses", ("Keys whose row was not in memory (per key, "
                                 "duplicates included).")),
    "inserts":                  ("inserts", "Rows created."),
    "defaults_served":          ("defaults_served", "Keys answered with the default vector."),
    "not_admitted":             ("not_admitted", "Keys refused a row by admission."),
    "loaded_rows":              ("loaded",
                                 ("Rows read from the store or a lazily opened checkpoint "
                                 "(per distinct row, where misses count keys).")),
    "evicted_rows":             ("evicted",
                                 "Rows evicted, kept in the store or a lazily opened checkpoint."),
    "discarded_rows":           ("discarded", "Rows evicted with no store (lost)."),
    "expired_rows":             ("expired", "Rows expired by the eviction policy (removed)."),
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
"""Every field of :class:`~dynembed.table.stats.Counters`, as a counter."""

GAUGES = {
    # metric name suffix  (TableStats field, unit, help); the unit ends the name, as
    # Prometheus' naming conventions ask (dynembed_table_allocated_bytes)
    "rows":             ("rows", "", "Rows in memory."),
    "capacity_rows":    ("capacity", "", "Rows the arena holds before it grows."),
    "used":             ("bytes_used", "bytes", "Bytes of the rows in memory and the index."),
    "allocated":        ("bytes_allocated", "bytes",
                         "Bytes allocated for rows and index (capacity, not only rows)."),
    "key_log":          ("key_log_bytes", "bytes",
                         "Bytes of the key log (outside memory_budget)."),
}
"""The sizes of :class:`~dynembed.table.stats.TableStats`, as gauges."""


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

    def _families(self) -> Iterator[tuple]:
        """(family without samples, its value in a TableStats) of every metric."""
        for suffix, (field, text) in COUNTERS.items():
            yield (CounterMetricFamily(f"dynembed_table_{suffix}", text, labels=["table"]),
                   lambda s, field=field: getattr(s.totals, field))
        for suffix, (field, unit, text) in GAUGES.items():
            yield (GaugeMetricFamily(f"dynembed_table_{suffix}", text, labels=["table"],
                                     unit=unit),
                   lambda s, field=field: getattr(s, field))

    def describe(self) -> Iterator:
        """The families :meth:`collect` yields, for the registry to refuse a second
        collector of them: a custom registry (which does not call :meth:`collect` to find
        out) otherwise exported every family twice, which Prometheus' formats forbid."""
        for family, _ in self._families():
            yield family

    def collect(self) -> Iterator:
        stats = {name: table.stats() for name, table in self.tables.items()}
        for family, read in self._families():
            for name, s in stats.items():
                family.add_metric([name], read(s))
            yield family


def register_tables(tables: Mapping[str, DynamicTable],
                    registry: CollectorRegistry = REGISTRY) -> TableCollector:
    """Registers a :class:`TableCollector` for ``tables``; returns it (to unregister).

    Register every table of a registry in one call (merge the dicts:
    ``{**model_a.tables, **model_b.tables}``): each metric family may appear once per
    scrape.

    Raises:
        TypeError: a value of ``tables`` is not a DynamicTable.
        ValueError: the registry exports ``dynembed_table_*`` metrics already.
    """
    collector = TableCollector(tables)
    try:
        registry.register(collector)
    except ValueError as e:
        raise ValueError(
            "this registry exports dynembed_table_* metrics already (an earlier "
            "register_tables call?): Prometheus takes each metric family once per scrape, "
            "so register every table in one call, e.g. register_tables({**a.tables, "
            "**b.tables}), or registry.unregister() the earlier collector first") from e
    return collector
