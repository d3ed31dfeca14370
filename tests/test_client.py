"""app/client.py, `tta predict` and `tta status` against a real `tta serve`: typed results, batching, labels,
feedback, API key and admin token, bounded retries on 503. Only what a server cannot be made to do on cue (a 503
then a 200, and the headers as sent) is checked against httpx's mock transport."""

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.api.schemas import Prediction, PredictResponse
from app.client import AsyncTTAClient, TTAClient, TTAError
from tests.conftest import make_png
from tests.servers import ROOT, free_port, metric_value, running_server

API_KEY = "client-test-api-key-0123456789"
ADMIN_TOKEN = "client-test-admin-token-0123456789"
QUEUE_IMAGES = 4  # TTA_MAX_QUEUE_IMAGES: a request of more images is refused with 503 queue_full, every time


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"{API_KEY}\n")
    env = {
        "TTA_MODEL": str(model_path),
        "TTA_METHOD": "none",  # the same image gets the same answer, however it is sent
        "TTA_API_KEYS": str(keys),
        "TTA_ADMIN_TOKEN": ADMIN_TOKEN,
        "TTA_MAX_QUEUE_IMAGES": str(QUEUE_IMAGES),
    }
    with running_server(env) as (url, _):
        yield url


@pytest.fixture
def client(server: str) -> Iterator[TTAClient]:
    with TTAClient(server, api_key=API_KEY, admin_token=ADMIN_TOKEN, batch_size=2) as tta:
        yield tta


def images(count: int) -> list[bytes]:
    return [make_png(36, 28, seed=seed) for seed in range(count)]


def labels_scored(client: TTAClient) -> int:
    return client.status().prequential["adapted"]["labels"]


def test_predict_batches_many_images_in_order_with_labels(client: TTAClient) -> None:
    before = labels_scored(client)
    one_by_one = [client.predict([image]).predictions[0] for image in images(5)]
    answer = client.predict(images(5), labels=[0, 1, 2, 3, 4])  # three requests of at most 2 images
    assert isinstance(answer, PredictResponse)
    assert all(isinstance(p, Prediction) for p in answer.predictions)
    assert [p.class_index for p in answer.predictions] == [p.class_index for p in one_by_one]
    assert len({p.id for p in answer.predictions}) == 5
    assert labels_scored(client) == before + 5


def test_files_bytes_and_json_give_the_same_answer(client: TTAClient, tmp_path: Path) -> None:
    image = images(1)[0]
    path = tmp_path / "made.png"
    path.write_bytes(image)
    answers = [
        client.predict([path]),
        client.predict([str(path)]),
        client.predict([("named.png", image)]),
        client.predict([image], as_json=True),
    ]
    assert len({(a.predictions[0].class_index, round(a.predictions[0].confidence, 6)) for a in answers}) == 1


def test_feedback_one_and_many(client: TTAClient) -> None:
    first, second, third = client.predict(images(3)).predictions
    assert client.feedback(first.id, first.class_index).model_dump() == {"labelled": 1, "correct": 1}
    wrong = (second.class_index + 1) % 10
    assert client.feedback([(second.id, wrong), (third.id, third.class_index)]).model_dump() == {
        "labelled": 2,
        "correct": 1,
    }
    with pytest.raises(TTAError) as refused:
        client.feedback(first.id, 0)
    assert (refused.value.status, refused.value.code) == (409, "already_labelled")


def test_api_key_and_admin_token(server: str, client: TTAClient) -> None:
    with TTAClient(server) as anonymous:
        with pytest.raises(TTAError) as no_key:
            anonymous.predict(images(1))
        assert (no_key.value.status, no_key.value.code) == (401, "unauthorized")
        with pytest.raises(TTAError) as no_token:
            anonymous.reset()
        assert no_token.value.status == 401
    with TTAClient(server, api_key="not-a-key-of-this-server", admin_token="not-the-token-0123") as wrong:
        with pytest.raises(TTAError) as wrong_key:
            wrong.predict(images(1))
        assert wrong_key.value.status == 403
    resets = client.status().adaptation["resets"]["manual"]
    assert client.reset().reset is True
    assert client.status().adaptation["resets"]["manual"] == resets + 1


def test_streams(server: str) -> None:
    with TTAClient(server, api_key=API_KEY, admin_token=ADMIN_TOKEN, stream="camera-7") as tta:
        tta.predict(images(1))
        tta.predict(images(2), stream="camera-8")  # the call's stream overrides the client's
        assert {"camera-7", "camera-8"} <= {s.stream for s in tta.streams().streams}
        assert tta.reset("camera-8").streams == ["camera-8"]
        assert (
            tta.stream_status("camera-8").resets["manual"] == 1 and tta.stream_status("camera-7").resets["manual"] == 0
        )


def refusals(tta: TTAClient) -> float:
    """503 answers to /predict so far (the series exists from the first one)."""
    try:
        return metric_value(tta.metrics(), "tta_requests_total", 'route="/predict",status="503"')
    except KeyError:
        return 0.0


def test_503_is_retried_a_bounded_number_of_times(server: str) -> None:
    too_many = images(QUEUE_IMAGES + 1)  # more than the queue can ever hold: queue_full on every try
    with TTAClient(server, api_key=API_KEY, batch_size=len(too_many), retries=2, max_retry_wait_s=0.2) as tta:
        refused_before = refusals(tta)
        with pytest.raises(TTAError) as refused:
            tta.predict(too_many)
        assert (refused.value.status, refused.value.code) == (503, "queue_full")
        refused_after = refusals(tta)
    assert refused_after - refused_before == 3  # the first try and two retries


def test_status_live_metrics_health(client: TTAClient) -> None:
    client.predict(images(1))
    assert client.status().method == "none"
    live = client.live()
    assert "default" in live.streams and live.streams["default"].series["t"]
    assert "tta_predictions_total" in client.metrics()
    assert client.healthy() and client.ready()
    with TTAClient(f"http://127.0.0.1:{free_port()}") as nobody:
        assert not nobody.healthy() and not nobody.ready()


def test_async_client(server: str) -> None:
    async def use() -> tuple[PredictResponse, int, str]:
        async with AsyncTTAClient(server, api_key=API_KEY, admin_token=ADMIN_TOKEN, batch_size=2) as tta:
            answer = await tta.predict(images(3), labels=[1, 2, 3])
            fresh = (await tta.predict(images(1))).predictions[0]
            labelled = (await tta.feedback(fresh.id, 4)).labelled
            await tta.reset()
            assert await tta.ready()
            return answer, labelled, (await tta.status()).method

    answer, labelled, method = asyncio.run(use())
    assert len(answer.predictions) == 3 and labelled == 1 and method == "none"


def mock_client(handler: object, **options: object) -> TTAClient:
    tta = TTAClient("http://tta.test", **options)
    tta.http = httpx.Client(base_url="http://tta.test", transport=httpx.MockTransport(handler))
    return tta


def test_retry_waits_retry_after_capped_then_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr("app.client.time.sleep", waits.append)
    answers = iter(
        [
            httpx.Response(503, headers={"Retry-After": "1"}, json={"error": "queue_full", "detail": "full"}),
            httpx.Response(503, headers={"Retry-After": "30"}, json={"error": "overloaded", "detail": "busy"}),
            httpx.Response(200, json={"labelled": 1, "correct": 0}),
        ]
    )
    with mock_client(lambda request: next(answers), retries=3, max_retry_wait_s=5) as tta:
        assert tta.feedback("some-id", 3).labelled == 1
    assert waits == [1.0, 5.0]  # Retry-After, but never more than max_retry_wait_s at once


def test_headers_sent() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    with mock_client(handler, api_key="k" * 20, admin_token="t" * 20, stream="north") as tta:
        tta.send(tta.predict_calls([b"not decoded here"], [3], None, as_json=False)[0])
        tta.send(tta.reset_call("north"))
    predict, reset = seen
    assert predict.headers["X-TTA-Stream"] == "north" and predict.headers["X-API-Key"] == "k" * 20
    assert "authorization" not in predict.headers  # the admin token goes to /reset only
    assert reset.headers["Authorization"] == "Bearer " + "t" * 20 and "x-api-key" not in reset.headers
    assert reset.url.params["stream"] == "north"


def tta_command(command: str, *args: str, key: str | None = API_KEY) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", **({"TTA_CLIENT_API_KEY": key} if key else {})}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", command, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def tta_predict(*args: str, key: str | None = API_KEY) -> subprocess.CompletedProcess:
    return tta_command("predict", *args, key=key)


def test_tta_predict_command(server: str, tmp_path: Path) -> None:
    paths = []
    for i, image in enumerate(images(3)):
        paths.append(tmp_path / f"image-{i}.png")
        paths[-1].write_bytes(image)
    done = tta_predict("--url", server, "--labels", "1,2,3", "--batch-size", "2", *map(str, paths))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(
        line.startswith(str(path)) and " id " in line for line, path in zip(lines, paths, strict=True)
    )

    as_json = tta_predict("--url", server, "--json", str(paths[0]))
    assert len(json.loads(as_json.stdout)["predictions"]) == 1

    refused = tta_predict("--url", server, str(paths[0]), key=None)
    assert refused.returncode == 1 and "401 unauthorized" in refused.stderr
    unreachable = tta_predict("--url", f"http://127.0.0.1:{free_port()}", str(paths[0]))
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def test_tta_status_command(server: str, client: TTAClient) -> None:
    client.predict(images(2), labels=[1, 2])
    client.predict(images(3), stream="status-cam")
    client.reset("status-cam")
    done = tta_command("status", "--url", server, key=None)  # /v1/status and /v1/streams need no credentials
    streams, status = client.streams(), client.status()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    model = f"cifar10_resnet20.safetensors ({status.model['architecture']}, 10 classes)"
    assert lines[0].startswith(f"{server}  none on cpu  {model}  up ")
    assert f"queue 0 of {QUEUE_IMAGES} images" in lines[1]
    adapted = status.prequential["adapted"]
    assert lines[2].startswith(f"prequential: adapted {adapted['accuracy']:.1%} of {adapted['labels']} labels")
    assert lines[3] == f"streams {len(streams.streams)} of 1024 (0 evicted)"
    start = lines.index("") + 1
    cells = [re.split(r" {2,}", line.strip()) for line in lines[start:]]  # cells are two or more spaces apart
    columns = ["STREAM", "STEPS", "SINCE RESET", "RESETS", "SKIPPED", "ENTROPY", "DRIFT", "BUFFER", "LABELS"]
    assert cells[0] == [*columns, "ADAPTED"]  # and SOURCE with the shadow
    rows = {row[0]: row for row in cells[1:]}
    assert set(rows) == {s.stream for s in streams.streams}
    camera = next(s for s in streams.streams if s.stream == "status-cam")
    assert rows["status-cam"][1:4] == [str(camera.steps_total), "0", "1 (manual 1)"]
    assert rows["status-cam"][-2:] == ["0", "-"]  # no labels in that stream
    default = next(s for s in streams.streams if s.stream == "default").prequential["adapted"]
    assert rows["default"][-2:] == [str(default["labels"]), f"{default['accuracy']:.1%}"]
    unreachable = tta_command("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
