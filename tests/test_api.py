"""The HTTP API in-process (lifespan on, real worker thread and batcher), and once as a real uvicorn process."""

import asyncio
import base64
import io
import signal
import struct
import zlib
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from app.api.parsing import split_multipart
from app.api.schemas import PredictResponse
from app.serving.preprocess import ImageLimits, decode_all
from models.checkpoint import load_checkpoint
from models.data import normalize
from tests.conftest import make_png
from tests.servers import in_process_client, metric_value, running_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def multipart(images: list[tuple[str, bytes]], labels: str | None = None) -> dict:
    files = [("files", (name.rsplit("/", 1)[-1], data, "application/octet-stream")) for name, data in images]
    return {"files": files, "data": {"labels": labels} if labels is not None else {}}


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height; only the header is real (no pixel data follows)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


async def test_predict_matches_the_model_called_directly(model_path: Path, jpeg_images: list) -> None:
    picked = jpeg_images[:5]
    async with in_process_client(model=model_path, method="none") as (client, _):
        response = await client.post("/predict", **multipart([(n, d) for n, d, _ in picked]))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    # the route serialises its answer itself: it must still be exactly the documented PredictResponse
    assert PredictResponse.model_validate(response.json(), strict=True).model_dump() == response.json()
    predictions = response.json()["predictions"]
    model, card = load_checkpoint(model_path)
    images = decode_all([(n, d) for n, d, _ in picked], card.input_size, ImageLimits(10**7, 10**7, 10**9))
    with torch.inference_mode():
        probabilities = model(normalize(images, card.mean, card.std)).softmax(1)
    assert [p["class_index"] for p in predictions] == probabilities.argmax(1).tolist()
    for prediction, row in zip(predictions, probabilities, strict=True):
        assert prediction["confidence"] == pytest.approx(float(row.max()), abs=1e-6)
        assert prediction["class_name"] == card.class_names[prediction["class_index"]]
        assert [k["class_index"] for k in prediction["top_k"]] == row.argsort(descending=True)[:5].tolist()
    assert len({p["id"] for p in predictions}) == len(predictions)


async def test_json_and_multipart_give_the_same_predictions_in_order(model_path: Path, jpeg_images: list) -> None:
    picked = jpeg_images[::7]
    async with in_process_client(model=model_path, method="none") as (client, _):
        as_multipart = await client.post("/predict", **multipart([(n, d) for n, d, _ in picked]))
        as_json = await client.post("/predict", json={"images": [base64.b64encode(d).decode() for _, d, _ in picked]})
        singles = [await client.post("/predict", **multipart([(n, d)])) for n, d, _ in picked]
    multi = [p["class_index"] for p in as_multipart.json()["predictions"]]
    assert multi == [p["class_index"] for p in as_json.json()["predictions"]]
    assert multi == [s.json()["predictions"][0]["class_index"] for s in singles]
    assert sum(m == label for m, (_, _, label) in zip(multi, picked, strict=True)) >= len(picked) * 0.7


async def test_formats_and_colour_modes_are_accepted(model_path: Path) -> None:
    def encoded(mode: str, fmt: str, size: tuple[int, int] = (48, 64)) -> bytes:
        buffer = io.BytesIO()
        Image.new(mode, size, 120).save(buffer, format=fmt)
        return buffer.getvalue()

    images = [
        ("gray.png", encoded("L", "PNG")),
        ("rgba.png", encoded("RGBA", "PNG")),
        ("image.webp", encoded("RGB", "WEBP")),
        ("image.gif", encoded("P", "GIF")),
        ("big.jpg", encoded("RGB", "JPEG", (640, 480))),
    ]
    async with in_process_client(model=model_path) as (client, _):
        response = await client.post("/predict", **multipart(images))
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 5


BAD_INPUTS = {
    "not_an_image": ({"files": [("files", ("notes.txt", b"hello, I am text", "text/plain"))]}, 400, "invalid_image"),
    "zero_bytes": ({"files": [("files", ("empty.jpg", b"", "image/jpeg"))]}, 400, "empty_image"),
    "too_many_pixels": (
        {"files": [("files", ("huge.png", png_declaring(50_000, 50_000), "image/png"))]},
        413,
        "too_many_pixels",
    ),
    "wrong_content_type": (
        {"content": b"raw bytes", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    "bad_base64": ({"json": {"images": ["not base64 at all!!"]}}, 400, "bad_base64"),
    "invalid_json": ({"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    "no_images": ({"json": {"images": []}}, 422, "invalid_fields"),
    "labels_out_of_range": (
        {"json": {"images": [base64.b64encode(make_png()).decode()], "labels": [10]}},
        422,
        "label_out_of_range",
    ),
    "labels_not_one_per_image": (
        {"json": {"images": [base64.b64encode(make_png()).decode()], "labels": [1, 2]}},
        422,
        "labels_mismatch",
    ),
    "labels_not_integers": ({**multipart([("a.png", make_png())], labels="cat")}, 422, "invalid_labels"),
    "too_many_files": ({**multipart([(f"{i}.png", make_png(seed=i)) for i in range(5)])}, 413, "too_many_files"),
    "files_as_text_fields": (
        {"files": [("other", ("a.png", make_png(), "image/png"))], "data": {"files": "not a file"}},
        422,
        "files_not_files",
    ),
    "multipart_without_boundary": (
        {"content": b"--x\r\n\r\n--x--\r\n", "headers": {"content-type": "multipart/form-data"}},
        400,
        "malformed_multipart",
    ),
    "multipart_cut_short": (
        {
            "content": b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + make_png(),
            "headers": {"content-type": "multipart/form-data; boundary=x"},
        },
        400,
        "malformed_multipart",
    ),
    "too_many_bytes": ({**multipart([("big.png", make_png(400, 400))])}, 413, "request_too_large"),
}


def test_multipart_split_follows_rfc_2046() -> None:
    # a preamble, a quoted boundary, a filename with a semicolon, an epilogue, and a part that contains CRLFs
    body = (
        b"ignored preamble\r\n--b0\r\n"
        b'Content-Disposition: form-data; name="files"; filename="a;b.png"\r\nContent-Type: image/png\r\n\r\n'
        b"\x89PNG\r\n\r\nbytes\r\n--b0\r\n"
        b'content-disposition: form-data; name="labels"\r\n\r\n3\r\n--b0--\r\nepilogue'
    )
    parts = split_multipart(body, 'multipart/form-data; boundary="b0"', max_files=4)
    assert parts == [("files", "a;b.png", b"\x89PNG\r\n\r\nbytes"), ("labels", None, b"3")]


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
async def test_bad_input_gets_a_clear_error_and_harms_nothing(case: str, model_path: Path, jpeg_images: list) -> None:
    request, status, code = BAD_INPUTS[case]
    name, data, _ = jpeg_images[0]
    async with in_process_client(model=model_path, max_files_per_request=4, max_request_bytes=200_000) as (client, _):
        before = (await client.get("/v1/status")).json()["adaptation"]
        response = await client.post("/predict", **request)
        after = (await client.get("/v1/status")).json()["adaptation"]
        still_serving = await client.post("/predict", **multipart([(name, data)]))
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == code and len(body["detail"]) > 10
    assert before["steps_total"] == after["steps_total"] and before["buffer_fill"] == after["buffer_fill"]
    assert still_serving.status_code == 200


async def test_truncated_jpeg_in_a_multi_image_request_is_named_and_nothing_is_queued(
    model_path: Path, jpeg_images: list
) -> None:
    (good, good_bytes, _), (bad, bad_bytes, _) = jpeg_images[0], jpeg_images[1]
    async with in_process_client(model=model_path) as (client, _):
        response = await client.post(
            "/predict", **multipart([(good, good_bytes), (bad, bad_bytes[: len(bad_bytes) // 2])])
        )
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_image"
    assert bad.rsplit("/", 1)[-1] in response.json()["detail"]
    assert metric_value(metrics, "tta_predictions_total") == 0


async def test_full_queue_answers_503_at_once_with_retry_after(model_path: Path) -> None:
    async with in_process_client(model=model_path, max_queue_images=2) as (client, _):
        response = await client.post("/predict", **multipart([(f"{i}.png", make_png(seed=i)) for i in range(3)]))
    assert response.status_code == 503
    assert response.json()["error"] == "queue_full"
    assert response.headers["retry-after"] == "1"


async def test_request_past_its_deadline_gets_504_and_its_images_are_never_computed(model_path: Path) -> None:
    # The batcher waits up to 2 s for a fuller batch; the request gives up after 0.2 s.
    async with in_process_client(model=model_path, max_wait_ms=2000, request_timeout_s=0.2) as (client, _):
        response = await client.post("/predict", **multipart([("a.png", make_png())]))
        await asyncio.sleep(2.2)
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 504
    assert response.json()["error"] == "timeout"
    assert metric_value(metrics, "tta_batch_size_count") == 0
    assert metric_value(metrics, "tta_queue_depth") == 0


async def test_200_concurrent_requests_are_all_answered_in_shared_batches(model_path: Path, jpeg_images: list) -> None:
    async with in_process_client(model=model_path, max_wait_ms=20) as (client, _):
        requests = [client.post("/predict", **multipart([jpeg_images[i % 40][:2]])) for i in range(200)]
        responses = await asyncio.gather(*requests)
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in responses] == [200] * 200
    assert len({r.json()["predictions"][0]["id"] for r in responses}) == 200
    batches = metric_value(metrics, "tta_batch_size_count")
    assert metric_value(metrics, "tta_batch_size_sum") == 200
    assert batches < 100, f"200 concurrent images ran in {batches:.0f} batches: batching did not happen"


async def test_status_health_ready_and_docs(model_path: Path) -> None:
    async with in_process_client(model=model_path) as (client, _):
        status = (await client.get("/v1/status")).json()
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).status_code == 200
        openapi = (await client.get("/openapi.json")).json()
        unknown = await client.get("/nope")
    assert status["method"] == "tent" and status["device"] == "cpu"
    assert status["model"]["num_classes"] == 10
    predict = openapi["paths"]["/predict"]["post"]
    assert {"multipart/form-data", "application/json"} <= set(predict["requestBody"]["content"])
    assert {"400", "413", "415", "422", "503", "504"} <= set(predict["responses"])
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"


def test_real_server_over_http_and_graceful_sigterm(model_path: Path, jpeg_images: list) -> None:
    """uvicorn in its own process on a loopback port; SIGTERM lets in-flight requests finish, then exits 0."""
    with running_server({"TTA_MODEL": str(model_path), "TTA_MAX_WAIT_MS": "300"}) as (url, process):
        name, data, label = jpeg_images[0]
        first = httpx.post(f"{url}/predict", files=[("files", (name, data))], data={"labels": str(label)}, timeout=30)
        assert first.status_code == 200, first.text
        assert "tta_requests_total" in httpx.get(f"{url}/metrics").text

        async def in_flight_then_sigterm() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                pending = [
                    asyncio.create_task(client.post(f"{url}/predict", files=[("files", (name, data))]))
                    for _ in range(8)
                ]
                await asyncio.sleep(0.1)  # the requests wait in the batcher (max wait 300 ms)
                process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*pending)

        answers = asyncio.run(in_flight_then_sigterm())
        assert [a.status_code for a in answers] == [200] * 8
        assert process.wait(timeout=30) == 0
