"""The server's Prometheus metrics: requests, latencies, queueing, batches, tables.

Table counters are read from the live tables at scrape time (nothing is counted twice, and
a table swapped in by a checkpoint refresh is what the next scrape sees). The histograms
take many values per call (a batch's queue times; request latencies gathered and folded in
with numpy), since one ``prometheus_client`` observation per request, each taking locks,
was a tenth of the event loop's time under load.
"""

from __future__ import annotations

import collections
import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
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


class ResponseCounter(Collector):
    """HTTP responses by API and status, of every request an API answered: also those
    that named no model (404), lacked the token (401) or used a wrong method (405), which
    the per-model request counter never sees. Counted on the event loop (no lock)."""

    def __init__(self, registry) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        registry.register(self)

    def collect(self):
        family = CounterMetricFamily("dynembed_serving_http_responses",
                                     "HTTP responses by API and status code.",
                                     labels=["api", "status"])
        for labels, count in sorted(self.counts.items()):
            family.add_metric(list(labels), count)
        yield family

    def describe(self):
        return [CounterMetricFamily("dynembed_serving_http_responses", "",
                                    labels=["api", "status"])]


class CountResponses:
    """ASGI middleware: counts every response of an API by status (see
    :class:`ResponseCounter`)."""

    def __init__(self, app, counts, api: str) -> None:
        self.app, self.counts, self.api = app, counts, api

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message):
            if message["type"] == "http.response.start":
                self.counts[(self.api, str(message["status"]))] += 1
            await send(message)

        await self.app(scope, receive, counted)


class ArrayHistogram(Collector):
    """A Prometheus histogram per (model, version), observed many values at a time.

    Values given to :meth:`add` and :meth:`add_many` wait in a list and are counted into
    the buckets with numpy when :data:`FOLD_AT` of them have gathered, or at a scrape.
    Thread-safe.

    Args:
        name: metric name (exposed as ``name_bucket``, ``name_count``, ``name_sum``).
        documentation: help text.
        buckets: upper bounds, increasing (``+Inf`` is added).
        registry: where to register.
    """

    FOLD_AT = 1024

    def __init__(self, name: str, documentation: str, buckets, registry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._counts: dict[tuple[str, str], np.ndarray] = {}  # per bucket, not cumulative
        self._sums: dict[tuple[str, str], float] = {}
        self._pending: dict[tuple[str, str], list[float]] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def add(self, labels: tuple[str, str], value: float) -> None:
        """Observes one value (counted at the next fold)."""
        self.add_many(labels, (value,))

    def add_many(self, labels: tuple[str, str], values) -> None:
        """Observes every value of ``values`` (a sequence of floats)."""
        with self._lock:
            pending = self._pending.setdefault(labels, [])
            pending.extend(values)
            if len(pending) >= self.FOLD_AT:
                self._fold(labels, pending)

    def _fold(self, labels: tuple[str, str], values) -> None:
        values = np.asarray(values, dtype=np.float64)
        counts = self._counts.get(labels)
        if counts is None:
            counts = self._counts[labels] = np.zeros(len(self.bounds) + 1, dtype=np.int64)
            self._sums[labels] = 0.0
        # side="left": a value equal to a bound is in that bucket (le means <=)
        counts += np.bincount(np.searchsorted(self.bounds, values, side="left"),
                              minlength=len(counts))
        self._sums[labels] += float(values.sum())
        self._pending[labels] = []

    def forget(self, labels: tuple[str, str]) -> None:
        """Drops the histogram of ``labels`` (an unregistered version)."""
        with self._lock:
            for values in (self._counts, self._sums, self._pending):
                values.pop(labels, None)

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation,
                                       labels=["model", "version"])
        with self._lock:
            for labels, pending in list(self._pending.items()):
                if pending:
                    self._fold(labels, pending)
            for labels, counts in self._counts.items():
                cumulative = np.cumsum(counts)
                buckets = [(repr(float(b)), int(c)) for b, c in zip(self.bounds, cumulative)]
                buckets.append(("+Inf", int(cumulative[-1])))
                family.add_metric(list(labels), buckets, self._sums[labels])
        yield family

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation, labels=["model",
                                                                            "version"])]


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
        self.latency = ArrayHistogram("dynembed_serving_request_latency_seconds",
                                      "Time from a request's arrival to its response.",
                                      _LATENCY_BUCKETS, self.registry)
        self.queue = ArrayHistogram("dynembed_serving_queue_seconds",
                                    "Time a request waited for a worker.", _LATENCY_BUCKETS,
                                    self.registry)
        self.batch = ArrayHistogram("dynembed_serving_batch_size", "Examples per batch run.",
                                    (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
                                    self.registry)
        self.inference = ArrayHistogram("dynembed_serving_inference_seconds",
                                        "Time the handler took per batch.", _LATENCY_BUCKETS,
                                        self.registry)
        self.refreshes = Counter("dynembed_serving_checkpoint_refreshes",
                                 "Newer training checkpoints applied to live tables.",
                                 labels, registry=self.registry)
        self.refresh_failures = Counter(
            "dynembed_serving_checkpoint_refresh_failures",
            "Attempts to apply a followed checkpoint that failed (the model keeps serving "
            "as it was).", ["model"], registry=self.registry)
        self.responses = ResponseCounter(self.registry)
        self._request_counters: dict = {}
        self.models = models
        if models is not None:
            self.registry.register(_TableCollector(models))

    def forget(self, model: str, version: str) -> None:
        """Drops the series of an unregistered version (and the model's refresh failures
        once it has no version left): a server that rotates versions kept 67 series of
        every version it ever served."""
        for histogram in (self.latency, self.queue, self.batch, self.inference):
            histogram.forget((model, version))
        for key in [k for k in self._request_counters if k[:2] == (model, version)]:
            del self._request_counters[key]
            self.requests.remove(model, version, str(key[2]))
        _remove_child(self.refreshes, model, version)
        if self.models is not None and model not in self.models.models:
            _remove_child(self.refresh_failures, model)

    def _registered(self, model: str, version: str) -> bool:
        """Whether the version is registered: a batch or request that ends after its
        version was unregistered (and forgotten) would bring its series back for good."""
        return self.models is None or version in self.models.models.get(model, ())

    def on_batch(self, model: str, version: str, stats: BatchStats) -> None:
        """Records one batch (the batcher's callback)."""
        if not self._registered(model, version):
            return
        labels = (model, version)
        self.batch.add(labels, stats.size)
        self.inference.add(labels, stats.run_s)
        self.queue.add_many(labels, stats.queue_s)

    def on_request(self, model: str, version: str, status: int, seconds: float) -> None:
        """Records one inference request (of a registered version)."""
        if not self._registered(model, version):
            return
        key = (model, version, status)
        counter = self._request_counters.get(key)
        if counter is None:  # labels() costs a lock and a dict lookup per call: keep them
            counter = self._request_counters[key] = self.requests.labels(model, version,
                                                                         str(status))
        counter.inc()
        self.latency.add((model, version), seconds)


def _remove_child(metric, *labels: str) -> None:
    """Removes a labelled child of a prometheus_client metric, if it has one."""
    try:
        metric.remove(*labels)
    except KeyError:  # never counted
        pass
