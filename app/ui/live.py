"""GET /v1/live: the figures of the live page at /, sampled once a second on the server over the last minutes.

The page and the tests read this one JSON. Sampling happens here, not in each browser, so every viewer sees the
same history from the moment the server started, and a viewer that opens the page late still sees the minutes
before. Latency and batch size come from the same Prometheus histograms as /metrics, over a trailing window, the
way `histogram_quantile(q, rate(...[10s]))` reads them; prequential and adaptation figures are those of
/v1/status. Prometheus keeps the long history; this keeps five minutes.

Figures are per stream (`streams`: stream -> figures), for `default` and the most recently used others, eight in
all (GET /v1/streams lists every stream). The batcher and the model worker are shared by every stream, so their
figures sit apart, under `server`.
"""

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from prometheus_client import Counter, Histogram

from app.adaptation.streams import DEFAULT_STREAM
from app.metrics.ledger import PrequentialScore
from app.ui.schemas import LiveResponse, ServerFigures, ServerNow, StreamFigures, StreamNow

SAMPLE_INTERVAL_S = 1.0
HISTORY_POINTS = 300  # five minutes at one sample a second
WINDOW_S = 10.0  # latency quantiles and batch figures are over this trailing window
MAX_STREAMS_SHOWN = 8
SERVER_SERIES = ("latency_p50_s", "latency_p99_s", "batch_size_mean", "images_per_s", "queue_depth")
STREAM_SERIES = ("accuracy_adapted", "accuracy_source", "entropy_ema", "param_drift", "steps_total", "resets_total")


@dataclass(frozen=True)
class HistogramState:
    """A histogram's cumulative counts at one instant: (upper bound, count) with +Inf last, and its sum."""

    buckets: tuple[tuple[float, float], ...]
    total: float

    def minus(self, earlier: "HistogramState") -> "HistogramState":
        if not earlier.buckets:
            return self
        counts = tuple((le, n - m) for (le, n), (_, m) in zip(self.buckets, earlier.buckets, strict=True))
        return HistogramState(counts, self.total - earlier.total)

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0


def read_histogram(histogram: Histogram, labels: dict[str, str]) -> HistogramState:
    """The child of `histogram` with these labels, read through collect() so that no child is created by looking."""
    buckets, total = [], 0.0
    for family in histogram.collect():
        for sample in family.samples:
            if any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            if sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_sum"):
                total = sample.value
    return HistogramState(tuple(sorted(buckets)), total)


def _counter_value(counter: Counter) -> float:
    return next(s.value for family in counter.collect() for s in family.samples if s.name.endswith("_total"))


def histogram_quantile(q: float, state: HistogramState) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket holding rank q; the highest finite bound past it."""
    if state.count <= 0:
        return None
    rank, lower, below = q * state.count, 0.0, 0.0
    for upper, count in state.buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


class LiveHistory:
    """The sampled series of one server. sample() runs on the event loop, once a second."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.window: deque[tuple[float, HistogramState, HistogramState]] = deque()
        self.server = _columns(("t", *SERVER_SERIES))
        self.streams: dict[str, dict[str, deque[float | None]]] = {}

    def sample(self, now: float) -> None:
        metrics = self.service.metrics
        latency = read_histogram(metrics.request_duration, {"route": "/predict"})
        batches = read_histogram(metrics.batch_size, {})
        self.window.append((now, latency, batches))
        while now - self.window[0][0] > WINDOW_S:
            self.window.popleft()
        then, latency_then, batches_then = self.window[0]
        recent_latency, recent_batches = latency.minus(latency_then), batches.minus(batches_then)
        elapsed = now - then
        images = recent_batches.total
        _append(
            self.server,
            t=now,
            latency_p50_s=histogram_quantile(0.5, recent_latency),
            latency_p99_s=histogram_quantile(0.99, recent_latency),
            batch_size_mean=images / recent_batches.count if recent_batches.count else None,
            images_per_s=images / elapsed if elapsed > 0 else None,
            queue_depth=self.service.batcher.queued_images,
        )
        shown = self._shown_streams()
        for stream in set(self.streams) - set(shown):  # evicted, or crowded out: its history goes with it
            del self.streams[stream]
        for stream, snapshot in shown.items():
            point = stream_point(snapshot, self.service.ledger.stream_scores.get(stream, {}), self._models())
            _append(self.streams.setdefault(stream, _columns(("t", *STREAM_SERIES))), t=now, **point)

    def _shown_streams(self) -> dict[str, dict[str, Any]]:
        """The streams drawn: `default` and the most recently used others, MAX_STREAMS_SHOWN in all; /v1/streams
        lists every stream. Bounded, since a server may hold a thousand streams and this JSON is read every second."""
        snapshots = self.service.worker.stream_snapshots  # least recently used first
        others = [name for name in reversed(snapshots) if name != DEFAULT_STREAM]
        names = ([DEFAULT_STREAM] if DEFAULT_STREAM in snapshots else []) + others
        return {name: snapshots[name] for name in names[:MAX_STREAMS_SHOWN]}

    def _models(self) -> tuple[str, ...]:
        return ("adapted", "source") if self.service.settings.shadow_source else ("adapted",)

    def view(self) -> LiveResponse:
        service = self.service
        server_now = ServerNow(
            queue_depth=service.batcher.queued_images,
            max_queue_images=service.settings.max_queue_images,
            predictions_total=int(_counter_value(service.metrics.predictions)),
        )
        snapshots, scores = service.worker.stream_snapshots, service.ledger.stream_scores
        streams = {
            stream: StreamFigures(
                now=stream_now(snapshots[stream], scores.get(stream, {}), self._models()), series=_lists(series)
            )
            for stream, series in self.streams.items()
            if stream in snapshots  # evicted since the last sample: gone
        }
        return LiveResponse(
            method=service.settings.method,
            shadow_source=service.settings.shadow_source,
            interval_s=SAMPLE_INTERVAL_S,
            window_s=WINDOW_S,
            server=ServerFigures(now=server_now, series=_lists(self.server)),
            streams=streams,
        )


def stream_point(
    snapshot: dict[str, Any], scores: dict[str, PrequentialScore], models: tuple[str, ...]
) -> dict[str, float | None]:
    """One stream's sampled figures: its engine's snapshot and its prequential scores (none before a label)."""

    def accuracy(model: str) -> float | None:
        return scores[model].window_accuracy() if model in models and model in scores else None

    return {
        "accuracy_adapted": accuracy("adapted"),
        "accuracy_source": accuracy("source"),
        "entropy_ema": snapshot["entropy_ema"],
        "param_drift": snapshot["param_drift"],
        "steps_total": snapshot["steps_total"],
        "resets_total": sum(snapshot["resets"].values()),
    }


def stream_now(snapshot: dict[str, Any], scores: dict[str, PrequentialScore], models: tuple[str, ...]) -> StreamNow:
    return StreamNow(
        labels={m: scores[m].labels if m in scores else 0 for m in models},
        correct={m: scores[m].correct if m in scores else 0 for m in models},
        steps_total=snapshot["steps_total"],
        steps_since_reset=snapshot["steps_since_reset"],
        resets=snapshot["resets"],
        skipped=snapshot["skipped"],
        buffer_fill=snapshot["buffer_fill"],
    )


def _columns(names: Iterable[str]) -> dict[str, deque[float | None]]:
    return {name: deque(maxlen=HISTORY_POINTS) for name in names}


def _append(columns: dict[str, deque[float | None]], **values: float | None) -> None:
    for name, column in columns.items():
        column.append(values[name])


def _lists(columns: dict[str, deque[float | None]]) -> dict[str, list[float | None]]:
    return {name: list(column) for name, column in columns.items()}


async def _sample_forever(history: LiveHistory) -> None:
    while True:
        history.sample(time.time())
        await asyncio.sleep(SAMPLE_INTERVAL_S)


@contextlib.asynccontextmanager
async def live_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Runs inside the app's own lifespan (FastAPI nests an included router's), so the service exists here."""
    history = LiveHistory(app.state.service)
    app.state.live = history
    task = asyncio.create_task(_sample_forever(history))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


router = APIRouter(lifespan=live_lifespan)


@router.get(
    "/v1/live",
    response_model=LiveResponse,
    summary="The live page's figures: the last minutes, sampled every second, per stream",
)
async def live(request: Request) -> LiveResponse:
    return request.app.state.live.view()
