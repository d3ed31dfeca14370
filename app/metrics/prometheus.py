"""Prometheus metrics, in two ways only.

What happens is recorded as it happens, by the one who sees it whole: the HTTP middleware records each request
(`record_request`), the batcher each batch when it ends (`record_batch`, once, whatever became of its requests).
What is a state (the queue, adaptation, prequential scores, snapshots) is read at scrape time by the collectors
below, from the objects that hold it, so /metrics and /v1/status always show the same numbers.

Series per stream are bounded however many streams there are: the METRIC_STREAMS streams with the most labels have
their own, the others' prequential accuracy is pooled under stream="(other)" (a name no stream can have), and every
stream's full figures are in GET /v1/streams.
"""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.metrics.ledger import PredictionLedger
from app.serving.batcher import Batcher
from app.serving.persistence import Persistence
from app.serving.worker import BatchOutput, ModelWorker

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256, 512, 1024)
ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
METRIC_STREAMS = 10
OTHER_STREAMS = "(other)"  # parentheses are outside the stream names' alphabet, so no stream is called this


class ServiceMetrics:
    def __init__(self) -> None:
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

    def record_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_duration.labels(route).observe(seconds)

    def record_batch(self, size: int, queue_wait_s: float, output: BatchOutput | None) -> None:
        """The batcher's BatchRecorder: one call per batch, when it ends (output None: the batch failed)."""
        self.batch_size.observe(size)
        self.batch_duration.labels("queue_wait").observe(queue_wait_s)
        if output is None:
            return
        for phase, seconds in output.seconds.items():
            self.batch_duration.labels(phase).observe(seconds)
        self.predictions.inc(len(output.entropy))
        for entropy in output.entropy:
            self.prediction_entropy.observe(entropy)

    def read_at_scrape(
        self, batcher: Batcher, worker: ModelWorker, ledger: PredictionLedger, persistence: Persistence, shadow: bool
    ) -> None:
        """Register the collectors of the states these objects hold."""
        for collector in (
            _QueueCollector(batcher),
            _AdaptationCollector(ledger, worker, shadow),
            _StreamCollector(ledger, worker, shadow),
            _PersistenceCollector(persistence),
        ):
            self.registry.register(collector)


class _QueueCollector(Collector):
    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("tta_queue_depth", "images waiting for a batch", value=self.batcher.queued_images)
        yield GaugeMetricFamily(
            "tta_queue_capacity_images", "TTA_MAX_QUEUE_IMAGES: the queue bound", value=self.batcher.max_queue_images
        )


class _PersistenceCollector(Collector):
    def __init__(self, persistence: Persistence) -> None:
        self.persistence = persistence

    def collect(self) -> Iterator[Metric]:
        s = self.persistence.status()
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
    def __init__(self, ledger: PredictionLedger, worker: ModelWorker, shadow: bool) -> None:
        self.ledger = ledger
        self.worker = worker
        self.models = ("adapted", "source") if shadow else ("adapted",)

    def collect(self) -> Iterator[Metric]:
        s = self.worker.snapshot
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


class _StreamCollector(Collector):
    """Per-stream series for the busiest streams only (see the module's docstring)."""

    def __init__(self, ledger: PredictionLedger, worker: ModelWorker, shadow: bool) -> None:
        self.ledger = ledger
        self.worker = worker
        self.models = ("adapted", "source") if shadow else ("adapted",)

    def collect(self) -> Iterator[Metric]:
        windows = self.ledger.stream_windows()
        busiest = set(sorted(windows, key=lambda name: (-windows[name]["adapted"][0], name))[:METRIC_STREAMS])
        accuracy = GaugeMetricFamily(
            "tta_stream_prequential_accuracy",
            f"accuracy over each stream's last N labels, for the {METRIC_STREAMS} streams with the most labels; "
            f'the others pooled as stream="{OTHER_STREAMS}"',
            labels=["stream", "model"],
        )
        pooled = dict.fromkeys(self.models, (0, 0))
        for name, scores in windows.items():
            for model in self.models:
                _, correct, count = scores[model]
                if name in busiest:
                    if count:
                        accuracy.add_metric([name, model], correct / count)
                else:
                    pooled[model] = (pooled[model][0] + correct, pooled[model][1] + count)
        for model, (correct, count) in pooled.items():
            if count:
                accuracy.add_metric([OTHER_STREAMS, model], correct / count)
        yield accuracy
        snapshots = self.worker.stream_snapshots
        drift = GaugeMetricFamily(
            "tta_stream_param_drift", "tta_param_drift of each of the busiest streams", labels=["stream"]
        )
        entropy = GaugeMetricFamily(
            "tta_stream_entropy_ema", "tta_entropy_ema of each of the busiest streams", labels=["stream"]
        )
        for name in sorted(busiest & snapshots.keys()):
            drift.add_metric([name], snapshots[name]["param_drift"])
            if snapshots[name]["entropy_ema"] is not None:
                entropy.add_metric([name], snapshots[name]["entropy_ema"])
        yield from (drift, entropy)
