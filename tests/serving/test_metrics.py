"""The serving metrics' histograms against prometheus_client's own Histogram."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dynembed.serving.batching import BatchStats
from dynembed.serving.metrics import _LATENCY_BUCKETS, ArrayHistogram, ServingMetrics
from dynembed.serving.replicas import merged_metrics


def _samples(registry: CollectorRegistry, name: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() if family.name == name for s in family.samples}


@pytest.mark.parametrize("count", [0, 1, 7, ArrayHistogram.FOLD_AT - 1,
                                   ArrayHistogram.FOLD_AT, 3 * ArrayHistogram.FOLD_AT + 5])
def test_array_histogram_matches_prometheus_histogram(count):
    rng = np.random.default_rng(count)
    # values on the bounds too: a bound's bucket includes it (le = "less or equal")
    values = np.concatenate([rng.exponential(0.01, count), rng.choice(_LATENCY_BUCKETS, count)])
    ours_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    ours = ArrayHistogram("h", "help", _LATENCY_BUCKETS, ours_registry)
    reference = Histogram("h", "help", ["model", "version"], buckets=_LATENCY_BUCKETS,
                          registry=reference_registry)
    for i, value in enumerate(values):
        labels = ("m", "1") if i % 3 else ("n", "2")
        reference.labels(*labels).observe(value)
        if i % 2:
            ours.add(labels, float(value))
        else:
            ours.add_many(labels, [float(value)])
    got = _samples(ours_registry, "h")
    want = {k: v for k, v in _samples(reference_registry, "h").items()
            if not k[0].endswith("_created")}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key


def test_serving_metrics_count_requests_and_batches():
    metrics = ServingMetrics()
    for status in (200, 200, 400):
        metrics.on_request("ctr", "1.0", status, 0.002)
    metrics.on_batch("ctr", "1.0", BatchStats(size=5, requests=2, queue_s=[0.001, 0.003],
                                              run_s=0.004))
    requests = _samples(metrics.registry, "dynembed_serving_requests")
    assert requests[("dynembed_serving_requests_total", (("model", "ctr"), ("status", "200"),
                                                         ("version", "1.0")))] == 2
    queue = _samples(metrics.registry, "dynembed_serving_queue_seconds")
    labels = (("model", "ctr"), ("version", "1.0"))
    assert queue[("dynembed_serving_queue_seconds_count", labels)] == 2
    assert queue[("dynembed_serving_queue_seconds_sum", labels)] == pytest.approx(0.004)
    size = _samples(metrics.registry, "dynembed_serving_batch_size")
    assert size[("dynembed_serving_batch_size_bucket", (("le", "4.0"), *labels))] == 0
    assert size[("dynembed_serving_batch_size_bucket", (("le", "8.0"), *labels))] == 1


def test_merged_metrics_label_each_process_and_keep_every_series():
    texts = {}
    for process, requests in ((0, 3), (2, 5)):  # process 1 is down: not in the scrape
        metrics = ServingMetrics()
        for _ in range(requests):
            metrics.on_request("ctr", "1.0", 200, 0.002)
        texts[process] = generate_latest(metrics.registry)
    families = {f.name: f for f in text_string_to_metric_families(
        merged_metrics(texts).decode())}
    counts = {s.labels["process"]: s.value
              for s in families["dynembed_serving_requests"].samples
              if s.name.endswith("_total")}
    assert counts == {"0": 3, "2": 5}
    latency = families["dynembed_serving_request_latency_seconds"]
    assert {s.labels["process"] for s in latency.samples} == {"0", "2"}


def test_a_request_that_ends_after_its_version_was_unregistered_brings_back_no_series():
    """A request that found its version before an unregister and ended after it counted
    itself, and the version's series came back for good."""
    class Models:  # the registry's part the metrics read
        def __init__(self) -> None:
            self.models = {"ctr": {"1.0": object(), "2.0": object()}}

        def all_versions(self):
            return []

    registry = Models()
    metrics = ServingMetrics(registry)
    stats = BatchStats(size=2, requests=1, queue_s=[0.001], run_s=0.002)
    for version in ("1.0", "2.0"):
        metrics.on_request("ctr", version, 200, 0.002)
        metrics.on_batch("ctr", version, stats)
    del registry.models["ctr"]["1.0"]
    metrics.forget("ctr", "1.0")
    metrics.on_request("ctr", "1.0", 404, 0.001)  # in flight during the unregister
    metrics.on_batch("ctr", "1.0", stats)
    text = generate_latest(metrics.registry).decode()
    assert 'version="1.0"' not in text and 'version="2.0"' in text
