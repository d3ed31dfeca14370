"""Prequential ledger, /feedback, the source shadow, and the metrics as a real Prometheus server sees them."""

import asyncio
import re
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client import generate_latest

from app.metrics.ledger import LedgerEntry, PredictionLedger, UnknownPredictionError
from app.metrics.prometheus import METRIC_STREAMS, OTHER_STREAMS, ServiceMetrics
from app.serving.batcher import Batcher, DeadlineExceededError
from app.serving.worker import BatchOutput
from models.checkpoint import load_checkpoint
from models.data import list_members, load_zip
from models.evaluate import accuracy
from tests.conftest import make_png
from tests.servers import in_process_client, metric_value, query, running_prometheus, running_server


def entry(predicted: int, created: float | None = None) -> LedgerEntry:
    return LedgerEntry(predicted, None, 0.1, time.monotonic() if created is None else created, 0)


def test_ledger_memory_is_bounded_by_size_and_age() -> None:
    ledger = PredictionLedger(num_classes=10, max_size=100, max_age_s=60, window=10)
    for i in range(10_000):
        ledger.record(f"id{i}", entry(i % 10), None)
    assert len(ledger) == 100
    with pytest.raises(UnknownPredictionError):
        ledger.label_all([("id0", 0)])
    ledger = PredictionLedger(num_classes=10, max_size=100, max_age_s=60, window=10)
    ledger.record("old", entry(1, created=time.monotonic() - 61), None)
    ledger.record("new", entry(1), None)
    assert len(ledger) == 1
    with pytest.raises(UnknownPredictionError, match="unknown or expired"):
        ledger.label_all([("old", 1)])
    assert ledger.label_all([("new", 1)]) == [True]


def test_prequential_window_and_totals() -> None:
    ledger = PredictionLedger(num_classes=10, max_size=1000, max_age_s=60, window=4)
    for i, (predicted, label) in enumerate([(1, 1), (2, 3), (4, 4), (5, 5), (6, 0), (7, 0)]):
        ledger.record(str(i), entry(predicted), label)
    score = ledger.scores["adapted"]
    assert (score.labels, score.correct) == (6, 3)
    assert score.window_accuracy() == pytest.approx(2 / 4)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_batch_is_recorded_once_when_its_first_request_timed_out(anyio_backend: str) -> None:
    """The real batcher and metrics; the model worker is a stand-in (the one fake here), since the test needs a batch
    that outlasts one of its requests' timeouts, which the real worker on a small model never does."""
    release = asyncio.Event()

    async def model(images: list[torch.Tensor], streams: list[str]) -> BatchOutput:
        await release.wait()
        n = sum(len(x) for x in images)
        seconds = {"model": 0.25, "postprocess": 0.01}
        return BatchOutput([0] * n, [1.0] * n, [0.5] * n, [[0]] * n, [[1.0]] * n, None, [0] * n, seconds)

    metrics = ServiceMetrics()
    batcher = Batcher(model, 8, 0.05, max_queue_images=64, max_queue_delay_s=5, recorder=metrics)
    batcher.start()
    first = asyncio.create_task(batcher.submit(torch.zeros(2, 3, 4, 4), timeout_s=1, stream="a"))
    second = asyncio.create_task(batcher.submit(torch.zeros(3, 3, 4, 4), timeout_s=5, stream="b"))
    await asyncio.sleep(1.3)  # one batch of both dispatched at 0.05 s; the first request's time ran out at 1 s
    release.set()
    with pytest.raises(DeadlineExceededError):
        await first
    assert (await second).offset == 2
    await batcher.stop(1)
    text = generate_latest(metrics.registry).decode()
    assert (metric_value(text, "tta_batch_size_count"), metric_value(text, "tta_batch_size_sum")) == (1, 5)
    for phase in ("queue_wait", "model", "postprocess"):
        assert metric_value(text, "tta_batch_duration_seconds_count", f'phase="{phase}"') == 1
    assert metric_value(text, "tta_batch_duration_seconds_sum", 'phase="model"') == 0.25
    assert metric_value(text, "tta_predictions_total") == metric_value(text, "tta_prediction_entropy_count") == 5


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_per_stream_series_are_bounded_to_the_busiest_streams(anyio_backend: str, model_path: Path) -> None:
    count = METRIC_STREAMS + 3
    settings = {"method": "norm", "shadow_source": True, "guard_min_batch": False}  # norm: the shadow differs
    async with in_process_client(model=model_path, **settings) as (client, _):
        for i in range(count):  # stream s<i> gets i + 1 labelled images: the busiest are the last METRIC_STREAMS
            files = [("files", (f"{i}-{j}.png", make_png(seed=100 * i + j), "image/png")) for j in range(i + 1)]
            labels = ",".join(str((i + j) % 10) for j in range(i + 1))
            answer = await client.post(
                "/predict", files=files, data={"labels": labels}, headers={"X-TTA-Stream": f"s{i}"}
            )
            assert answer.status_code == 200, answer.text
        streams = {s["stream"]: s for s in (await client.get("/v1/streams")).json()["streams"]}
        text = (await client.get("/metrics")).text
    named = {value for line in text.splitlines() for value in re.findall(r'stream="([^"]*)"', line)}
    assert named == {f"s{i}" for i in range(3, count)} | {OTHER_STREAMS}
    for i in range(3, count):
        figures = streams[f"s{i}"]["prequential"]
        for model in ("adapted", "source"):
            value = metric_value(text, "tta_stream_prequential_accuracy", f'model="{model}",stream="s{i}"')
            assert value == pytest.approx(figures[model]["window_accuracy"])
        assert metric_value(text, "tta_stream_param_drift", f'stream="s{i}"') == streams[f"s{i}"]["param_drift"]
    quiet = [streams[f"s{i}"]["prequential"]["adapted"] for i in range(3)]  # 1 + 2 + 3 labels
    pooled = metric_value(text, "tta_stream_prequential_accuracy", f'model="adapted",stream="{OTHER_STREAMS}"')
    assert pooled == pytest.approx(sum(q["correct"] for q in quiet) / 6)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_feedback_scores_late_labels(anyio_backend: str, model_path: Path, jpeg_images: list) -> None:
    files = [("files", (name, data)) for name, data, _ in jpeg_images[:6]]
    labels = [label for _, _, label in jpeg_images[:6]]
    async with in_process_client(model=model_path, ledger_max_age_s=1) as (client, _):
        predictions = (await client.post("/predict", files=files)).json()["predictions"]
        first = await client.post("/feedback", json={"id": predictions[0]["id"], "label": labels[0]})
        rest = await client.post(
            "/feedback", json=[{"id": p["id"], "label": y} for p, y in zip(predictions[1:5], labels[1:5], strict=True)]
        )
        again = await client.post("/feedback", json={"id": predictions[0]["id"], "label": labels[0]})
        unknown = await client.post("/feedback", json={"id": "nope", "label": 1})
        out_of_range = await client.post("/feedback", json={"id": predictions[5]["id"], "label": 10})
        not_a_label = await client.post("/feedback", json={"id": predictions[5]["id"]})
        status = (await client.get("/v1/status")).json()["prequential"]["adapted"]
        time.sleep(1.1)
        expired = await client.post("/feedback", json={"id": predictions[5]["id"], "label": labels[5]})
    expected = sum(p["class_index"] == y for p, y in zip(predictions[:5], labels[:5], strict=True))
    assert first.status_code == rest.status_code == 200
    assert first.json()["labelled"] + rest.json()["labelled"] == 5
    assert first.json()["correct"] + rest.json()["correct"] == expected
    assert (again.status_code, again.json()["error"]) == (409, "already_labelled")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_prediction")
    assert (out_of_range.status_code, out_of_range.json()["error"]) == (422, "label_out_of_range")
    assert not_a_label.status_code == 422
    assert (expired.status_code, expired.json()["error"]) == (404, "unknown_prediction")
    assert (status["labels"], status["correct"]) == (5, expected)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_source_shadow_scores_both_models(anyio_backend: str, model_path: Path, jpeg_images: list) -> None:
    files = [("files", (name, data)) for name, data, _ in jpeg_images]
    labels = ",".join(str(label) for _, _, label in jpeg_images)
    async with in_process_client(model=model_path, shadow_source=True, method="norm", guard_min_batch=False) as (
        client,
        _,
    ):
        response = await client.post("/predict", files=files, data={"labels": labels})
        status = (await client.get("/v1/status")).json()["prequential"]
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 200
    assert status["adapted"]["labels"] == status["source"]["labels"] == 40
    model, card = load_checkpoint(model_path)
    assert status["source"]["correct"] == metric_value(metrics, "tta_correct_total", 'model="source"')
    assert status["adapted"]["correct"] == metric_value(metrics, "tta_correct_total", 'model="adapted"')
    assert 0 <= status["source_agreement"] <= 1
    assert metric_value(metrics, "tta_shadow_compared_total") == 40


def post_labelled(url: str, images: list[tuple[str, bytes, int]], per_request: int) -> list[tuple[int, int]]:
    """(predicted, label) of every image, posted in order, `per_request` images a request."""
    pairs = []
    with httpx.Client(timeout=60) as client:
        for start in range(0, len(images), per_request):
            chunk = images[start : start + per_request]
            response = client.post(
                f"{url}/predict",
                files=[("files", (name, data)) for name, data, _ in chunk],
                data={"labels": ",".join(str(label) for _, _, label in chunk)},
            )
            assert response.status_code == 200, response.text
            pairs += [(p["class_index"], y) for p, (_, _, y) in zip(response.json()["predictions"], chunk, strict=True)]
    return pairs


def wait_for_scrape(prometheus: str, promql: str, expected: float, timeout_s: float = 20) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        result = query(prometheus, promql)
        value = float(result[0]["value"][1]) if result else None
        if value is not None and value == pytest.approx(expected, abs=1e-9) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_clean_test_set_through_http_matches_offline_accuracy_in_prometheus(model_path: Path, test_zip: Path) -> None:
    """Acceptance: all 10,000 clean test images, labelled, batches of 64, TTA_METHOD=none."""
    with zipfile.ZipFile(test_zip) as archive:
        members, labels, _ = list_members(archive)
        images = [(m, archive.read(m), y) for m, y in zip(members, labels, strict=True)]
    model, card = load_checkpoint(model_path)
    offline = accuracy(model, load_zip(test_zip), card.mean, card.std)
    env = {"TTA_MODEL": str(model_path), "TTA_METHOD": "none", "TTA_PREQUENTIAL_WINDOW": "1000"}
    with running_server(env) as (url, _), running_prometheus(url.removeprefix("http://")) as prometheus:
        wait_for_scrape(prometheus, "up", 1)
        pairs = post_labelled(url, images, 64)
        status = httpx.get(f"{url}/v1/status").json()["prequential"]["adapted"]
        total = wait_for_scrape(prometheus, 'tta_labels_total{model="adapted"}', 10_000)
        ratio = wait_for_scrape(prometheus, "tta_correct_total / tta_labels_total", status["accuracy"])
        window = wait_for_scrape(prometheus, "tta_prequential_accuracy", status["window_accuracy"])
    assert status["labels"] == total == 10_000
    assert status["accuracy"] == pytest.approx(offline, abs=0.001)
    assert status["correct"] == sum(p == y for p, y in pairs)
    assert ratio == pytest.approx(status["accuracy"], abs=1e-9)
    assert window == pytest.approx(sum(p == y for p, y in pairs[-1000:]) / 1000, abs=1e-9)


def test_prometheus_sees_adaptation_and_prequential_rates(model_path: Path, jpeg_images: list) -> None:
    env = {"TTA_MODEL": str(model_path), "TTA_METHOD": "tent", "TTA_PREQUENTIAL_WINDOW": "100"}
    with running_server(env) as (url, _), running_prometheus(url.removeprefix("http://")) as prometheus:
        wait_for_scrape(prometheus, "up", 1)
        pairs = post_labelled(url, jpeg_images * 4, 16)  # 160 labelled images, 10 batches of 16
        status = httpx.get(f"{url}/v1/status").json()
        correct = sum(p == y for p, y in pairs)
        recent = sum(p == y for p, y in pairs[-100:]) / 100
        steps = wait_for_scrape(prometheus, "tta_adaptation_steps_total", status["adaptation"]["steps_total"])
        window = wait_for_scrape(prometheus, 'tta_prequential_accuracy{model="adapted"}', recent)
        rate = wait_for_scrape(prometheus, "rate(tta_correct_total[1m]) / rate(tta_labels_total[1m])", correct / 160)
    assert status["adaptation"]["steps_total"] == steps > 0
    assert window == pytest.approx(recent, abs=1e-9)
    assert rate == pytest.approx(correct / 160, abs=1e-9)
