"""The server's Prometheus metrics: requests, latencies, queueing, batches, tables.

Table counters are read from the live tables at scrape time (nothing is counted twice, and
a table swapped in by a checkpoint refresh is what the next scrape sees).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from dynembed.serving.batching import BatchStats

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                    5, 10)
_TABLE_COUNTERS = {"hits": "Keys whose row was in memory.",
                   "misses": "Keys whose row was not in memory.",
                   "defaults_served": "Keys answered with the default vector (unseen keys).",
                   "loaded": "Rows read from the store or the lazily opened checkpoint."}


class _TableCollector(Collector):
    def __init__(self, registry) -> None:
        self.models = registry

    def collect(self):
        families = {k: CounterMetricFamily(f"dynembed_serving_table_{k}", text,
                                           labels=["model", "version", "table"])
                    for k, text in _TABLE_COUNTERS.items()}
        for entry in self.models.all_versions():
            stats = getattr(entry.handler, "table_stats", None)
            for table, values in (stats() if callable(stats) else {}).items():
                for key, family in families.items():
                    family.add_metric([entry.name, entry.version, table], values[key])
        yield from families.values()


class ServingMetrics:
    """Metrics of one server, in a registry of their own.

    Args:
        models: the server's :class:`~dynembed.serving.registry.Registry` (read at scrape).
    """

    def __init__(self, models=None) -> None:
        self.registry = CollectorRegistry()
        labels = ["model", "version"]
        self.requests = Counter("dynembed_serving_requests", "Inference requests answered.",
                                ["model", "version", "status"], registry=self.registry)
        self.latency = Histogram("dynembed_serving_request_latency_seconds",
                                 "Time from a request's arrival to its response.", labels,
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue = Histogram("dynembed_serving_queue_seconds",
                               "Time a request waited for a worker.", labels,
                               buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("dynembed_serving_batch_size", "Examples per batch run.",
                               labels, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
                               registry=self.registry)
        self.inference = Histogram("dynembed_serving_inference_seconds",
                                   "Time the handler took per batch.", labels,
                                   buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.refreshes = Counter("dynembed_serving_checkpoint_refreshes",
                                 "Newer training checkpoints applied to live tables.",
                                 labels, registry=self.registry)
        self._children: dict = {}
        if models is not None:
            self.registry.register(_TableCollector(models))

    def on_batch(self, model: str, version: str, stats: BatchStats) -> None:
        """Records one batch (the batcher's callback)."""
        self.batch.labels(model, version).observe(stats.size)
        self.inference.labels(model, version).observe(stats.run_s)
        for waited in stats.queue_s:
            self.queue.labels(model, version).observe(waited)

    def on_request(self, model: str, version: str, status: int, seconds: float) -> None:
        """Records one inference request."""
        key = (model, version, status)
        children = self._children.get(key)
        if children is None:  # labels() costs a lock and a dict lookup per call: keep them
            children = self._children[key] = (self.requests.labels(model, version,
                                                                   str(status)),
                                              self.latency.labels(model, version))
        children[0].inc()
        children[1].observe(seconds)
