"""Prometheus metrics. Request and batch metrics are observed as they happen; adaptation and
prequential figures are read at scrape time from the worker's snapshot and the ledger, so
/metrics and /v1/status always show the same numbers."""

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.metrics.ledger import PredictionLedger

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256, 512, 1024)
ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


class ServiceMetrics:
    def __init__(
        self,
        ledger: PredictionLedger,
        engine_snapshot: Callable[[], dict[str, Any]],
        queue_depth: Callable[[], int],
        queue_capacity: int,
        shadow: bool,
    ) -> None:
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "tta_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "tta_request_duration_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("tta_batch_size", "images per model batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_duration = Histogram(
            "tta_batch_duration_seconds",
            "time per batch by phase: queue_wait (oldest request), model (predict + adapt), postprocess",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter("tta_predictions", "images predicted", registry=r)
        self.prediction_entropy = Histogram(
            "tta_prediction_entropy", "softmax entropy (nats) of each prediction", buckets=ENTROPY_BUCKETS, registry=r
        )
        queue = Gauge("tta_queue_depth", "images waiting for a batch", registry=r)
        queue.set_function(lambda: queue_depth())
        Gauge("tta_queue_capacity_images", "TTA_MAX_QUEUE_IMAGES: the queue bound", registry=r).set(queue_capacity)
        r.register(_AdaptationCollector(ledger, engine_snapshot, shadow))

    def watch_persistence(self, status: Callable[[], dict[str, Any]]) -> None:
        """State snapshot figures, read at scrape time from the persistence status that /v1/status shows."""
        self.registry.register(_PersistenceCollector(status))


class _PersistenceCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status()
        if not s["enabled"]:
            return
        yield CounterMetricFamily("tta_state_snapshots", "adapted-state snapshots written", value=s["snapshots"])
        yield CounterMetricFamily(
            "tta_state_snapshot_failures", "adapted-state snapshots that failed", value=s["failures"]
        )
        restores = CounterMetricFamily(
            "tta_state_restores", "snapshots restored or refused at start, by result", labels=["result"]
        )
        restores.add_metric(["restored"], int(s["restored_from"] is not None))
        restores.add_metric(["refused"], int(s["restore_refused"] is not None))
        yield restores
        if s["snapshot_at"] is not None:
            yield GaugeMetricFamily(
                "tta_state_snapshot_timestamp_seconds", "when the last snapshot was taken", value=s["snapshot_at"]
            )
            yield GaugeMetricFamily(
                "tta_state_snapshot_duration_seconds", "the last snapshot: clone and write", value=s["last_snapshot_s"]
            )
            yield GaugeMetricFamily(
                "tta_state_snapshot_pause_seconds",
                "the last snapshot's clone on the model worker, the pause in serving",
                value=s["last_pause_s"],
            )
            yield GaugeMetricFamily(
                "tta_state_snapshot_bytes", "size of the last snapshot file", value=s["last_snapshot_bytes"]
            )


class _AdaptationCollector(Collector):
    def __init__(self, ledger: PredictionLedger, engine_snapshot: Callable[[], dict[str, Any]], shadow: bool) -> None:
        self.ledger = ledger
        self.engine_snapshot = engine_snapshot
        self.models = ("adapted", "source") if shadow else ("adapted",)

    def collect(self) -> Iterator[Metric]:
        s = self.engine_snapshot()
        labels = CounterMetricFamily("tta_labels", "labelled predictions, by model", labels=["model"])
        correct = CounterMetricFamily(
            "tta_correct", "labelled predictions that were correct when made", labels=["model"]
        )
        accuracy = GaugeMetricFamily(
            "tta_prequential_accuracy", "accuracy over the last N labels (TTA_PREQUENTIAL_WINDOW)", labels=["model"]
        )
        for model in self.models:
            score = self.ledger.scores[model]
            labels.add_metric([model], score.labels)
            correct.add_metric([model], score.correct)
            window = score.window_accuracy()
            if window is not None:
                accuracy.add_metric([model], window)
        yield from (labels, correct, accuracy)
        if len(self.models) == 2:
            yield CounterMetricFamily(
                "tta_shadow_compared",
                "predictions also made by the frozen source model",
                value=self.ledger.shadow_compared,
            )
            yield CounterMetricFamily(
                "tta_shadow_agreed",
                "predictions where adapted and source models agree",
                value=self.ledger.shadow_agreed,
            )
        yield GaugeMetricFamily("tta_streams_active", "streams with an adaptation state", value=s["streams"]["active"])
        yield CounterMetricFamily(
            "tta_streams_evicted",
            "least recently used streams evicted past TTA_MAX_STREAMS",
            value=s["streams"]["evicted"],
        )
        yield CounterMetricFamily("tta_adaptation_steps", "optimiser steps taken", value=s["steps_total"])
        skipped = CounterMetricFamily(
            "tta_adaptation_skipped", "batches not used for a step, by reason", labels=["reason"]
        )
        for reason, count in s["skipped"].items():
            skipped.add_metric([reason], count)
        yield skipped
        resets = CounterMetricFamily("tta_resets", "returns to the source state, by reason", labels=["reason"])
        for reason, count in s["resets"].items():
            resets.add_metric([reason], count)
        yield resets
        if s["entropy_ema"] is not None:
            yield GaugeMetricFamily(
                "tta_entropy_ema", "EMA of the batch-mean prediction entropy (nats)", value=s["entropy_ema"]
            )
        yield GaugeMetricFamily(
            "tta_param_drift",
            "||theta - theta_source|| / ||theta_source|| of adapted parameters",
            value=s["param_drift"],
        )
        yield GaugeMetricFamily(
            "tta_adaptation_buffer_images", "small-batch images waiting for a step", value=s["buffer_fill"]
        )
        yield GaugeMetricFamily("tta_ledger_entries", "predictions remembered for late labels", value=len(self.ledger))
