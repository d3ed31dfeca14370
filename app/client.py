"""A Python client of the TTA server, sync (`TTAClient`) and async (`AsyncTTAClient`); `tta predict` uses it.

    from app.client import TTAClient

    with TTAClient("http://127.0.0.1:8000") as tta:
        answer = tta.predict(["a.jpg", "b.png"], labels=[3, 5])
        tta.feedback(answer.predictions[0].id, 3)

Results are the server's own response models (app/api/schemas.py), validated as they arrive. Many images are sent
`batch_size` per request, one request after another, so the server sees them in the order given (the order its
adaptation follows). A 503 (queue full, overloaded, shutting down: nothing was computed) is sent again after its
Retry-After, at most `retries` times and never waiting more than `max_retry_wait_s` at once; any other error
raises `TTAError` with the server's stable code and sentence. `stream` goes out as the `X-TTA-Stream` header, the
API key as `X-API-Key` (on /predict and /feedback only), the admin token as `Authorization: Bearer` (on /reset only).
`reset(stream)` resets one stream; `streams()` and `stream_status(name)` read GET /v1/streams.
"""

import asyncio
import base64
import mimetypes
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from app.api.schemas import (
    FeedbackResponse,
    PredictResponse,
    ResetResponse,
    StatusResponse,
    StreamsResponse,
    StreamStatus,
)
from app.ui.schemas import LiveResponse

DEFAULT_URL = "http://127.0.0.1:8000"
STREAM_HEADER = "X-TTA-Stream"
API_KEY_HEADER = "X-API-Key"
# The server's TTA_MAX_FILES_PER_REQUEST default: a larger request would be refused (413 too_many_files).
DEFAULT_BATCH_SIZE = 64

Image = str | os.PathLike[str] | bytes | tuple[str, bytes]  # a file, its bytes, or (name, bytes)
Model = TypeVar("Model", bound=BaseModel)


class TTAError(Exception):
    """The server refused a request: its HTTP status, stable error code and sentence (app/api/errors.py)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


@dataclass(frozen=True)
class Call:
    """One HTTP request, built once and sent by either client (again, on a 503)."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    data: dict[str, str] | None = None
    json: Any = None
    params: dict[str, str] | None = None

    def send_args(self) -> dict[str, Any]:
        return {
            "headers": self.headers,
            "files": self.files,
            "data": self.data,
            "json": self.json,
            "params": self.params,
        }


def named_image(image: Image, index: int) -> tuple[str, bytes]:
    if isinstance(image, tuple):
        return image
    if isinstance(image, bytes):
        return f"image-{index}", image
    path = Path(image)
    return path.name, path.read_bytes()


def retry_delay(response: httpx.Response, attempt: int, retries: int, max_wait_s: float) -> float | None:
    """Seconds to wait before sending again, or None: only a 503 is retried, after its Retry-After (bounded)."""
    if response.status_code != 503 or attempt >= retries:
        return None
    try:
        wanted = float(response.headers.get("Retry-After", "1"))
    except ValueError:  # an HTTP date, which this server never sends: wait the shortest sensible time
        wanted = 1.0
    return min(max(wanted, 0.0), max_wait_s)


def parsed(response: httpx.Response, model: type[Model]) -> Model:
    if response.is_success:
        return model.model_validate_json(response.content)
    try:
        body = response.json()
        code, detail = body["error"], body["detail"]
    except (ValueError, KeyError, TypeError):  # not this server's JSON error, e.g. a proxy's page
        code, detail = "http_error", response.text[:200] or response.reason_phrase
    raise TTAError(response.status_code, code, detail)


def merged(answers: list[PredictResponse]) -> PredictResponse:
    """One answer for images sent in several requests: every prediction in order, the last request's step."""
    predictions = [p for answer in answers for p in answer.predictions]
    return PredictResponse(predictions=predictions, adaptation_step=answers[-1].adaptation_step)


class _Calls:
    """What both clients send: the requests, built from the arguments; sending is theirs."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        admin_token: str | None,
        stream: str | None,
        batch_size: int,
        retries: int,
        max_retry_wait_s: float,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.url = url.rstrip("/")
        self.api_key, self.admin_token, self.stream = api_key, admin_token, stream
        self.batch_size, self.retries, self.max_retry_wait_s = batch_size, retries, max_retry_wait_s

    def _key_header(self) -> dict[str, str]:
        return {API_KEY_HEADER: self.api_key} if self.api_key else {}

    def _predict_headers(self, stream: str | None) -> dict[str, str]:
        stream = stream or self.stream
        return {**self._key_header(), **({STREAM_HEADER: stream} if stream else {})}

    def predict_calls(
        self, images: Sequence[Image], labels: Sequence[int] | None, stream: str | None, as_json: bool
    ) -> list[Call]:
        if not images:
            raise ValueError("no images to classify")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images: give one per image")
        named = [named_image(image, i) for i, image in enumerate(images)]
        headers = self._predict_headers(stream)
        calls = []
        for start in range(0, len(named), self.batch_size):
            chunk = named[start : start + self.batch_size]
            chunk_labels = list(labels[start : start + self.batch_size]) if labels is not None else None
            calls.append(predict_call(chunk, chunk_labels, headers, as_json))
        return calls

    def feedback_call(self, prediction: str | Sequence[tuple[str, int]], label: int | None) -> Call:
        if isinstance(prediction, str):
            if label is None:
                raise ValueError("feedback(prediction_id, label): the label is missing")
            body: Any = {"id": prediction, "label": label}
        else:
            body = [{"id": prediction_id, "label": lab} for prediction_id, lab in prediction]
        # No stream header: the server knows each prediction's stream.
        return Call("POST", "/feedback", self._key_header(), json=body)

    def reset_call(self, stream: str | None) -> Call:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        return Call("POST", "/reset", headers, params={"stream": stream} if stream else None)


def predict_call(
    named: list[tuple[str, bytes]], labels: list[int] | None, headers: dict[str, str], as_json: bool
) -> Call:
    if as_json:
        body: dict[str, Any] = {"images": [base64.b64encode(data).decode("ascii") for _, data in named]}
        if labels is not None:
            body["labels"] = labels
        return Call("POST", "/predict", headers, json=body)
    files = [
        ("files", (name, data, mimetypes.guess_type(name)[0] or "application/octet-stream")) for name, data in named
    ]
    data = {"labels": ",".join(str(label) for label in labels)} if labels is not None else None
    return Call("POST", "/predict", headers, files=files, data=data)


class TTAClient(_Calls):
    """The blocking client. Use it as a context manager, or call close()."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        admin_token: str | None = None,
        stream: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        retries: int = 3,
        max_retry_wait_s: float = 10.0,
        timeout_s: float = 60.0,
    ) -> None:
        super().__init__(url, api_key, admin_token, stream, batch_size, retries, max_retry_wait_s)
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def __enter__(self) -> "TTAClient":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def send(self, call: Call, retries: int | None = None) -> httpx.Response:
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            response = self.http.request(call.method, call.path, **call.send_args())
            delay = retry_delay(response, attempt, retries, self.max_retry_wait_s)
            if delay is None:
                break
            time.sleep(delay)
        return response

    def predict(
        self,
        images: Sequence[Image],
        labels: Sequence[int] | None = None,
        *,
        stream: str | None = None,
        as_json: bool = False,
    ) -> PredictResponse:
        """Classify images (paths, bytes or (name, bytes)), optionally with their true labels; `as_json` sends
        base64 JSON instead of multipart."""
        calls = self.predict_calls(images, labels, stream, as_json)
        return merged([parsed(self.send(call), PredictResponse) for call in calls])

    def feedback(self, prediction: str | Sequence[tuple[str, int]], label: int | None = None) -> FeedbackResponse:
        """A late label: feedback(id, label), or feedback([(id, label), ...]) for several, all or none."""
        return parsed(self.send(self.feedback_call(prediction, label)), FeedbackResponse)

    def reset(self, stream: str | None = None) -> ResetResponse:
        """Every stream back to the source model, or one stream (needs the admin token when the server has
        TTA_ADMIN_TOKEN)."""
        return parsed(self.send(self.reset_call(stream)), ResetResponse)

    def status(self) -> StatusResponse:
        return parsed(self.send(Call("GET", "/v1/status")), StatusResponse)

    def streams(self) -> StreamsResponse:
        """Every stream's adaptation and prequential figures."""
        return parsed(self.send(Call("GET", "/v1/streams")), StreamsResponse)

    def stream_status(self, name: str) -> StreamStatus:
        return parsed(self.send(Call("GET", f"/v1/streams/{quote(name, safe='')}")), StreamStatus)

    def live(self) -> LiveResponse:
        """The live page's figures: the last minutes per stream (GET /v1/live)."""
        return parsed(self.send(Call("GET", "/v1/live")), LiveResponse)

    def metrics(self) -> str:
        """The Prometheus exposition text."""
        response = self.send(Call("GET", "/metrics"))
        response.raise_for_status()
        return response.text

    def healthy(self) -> bool:
        """Liveness (/healthz); False when the server answers otherwise or not at all."""
        return self._answers_200("/healthz")

    def ready(self) -> bool:
        """Readiness (/readyz): model loaded and worker alive. Its 503 means "not ready", so it is not retried."""
        return self._answers_200("/readyz")

    def _answers_200(self, path: str) -> bool:
        try:
            return self.send(Call("GET", path), retries=0).status_code == 200
        except httpx.TransportError:
            return False


class AsyncTTAClient(_Calls):
    """The asyncio client: the same methods as TTAClient, awaited. Use it with `async with`, or await aclose()."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        admin_token: str | None = None,
        stream: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        retries: int = 3,
        max_retry_wait_s: float = 10.0,
        timeout_s: float = 60.0,
    ) -> None:
        super().__init__(url, api_key, admin_token, stream, batch_size, retries, max_retry_wait_s)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=timeout_s)

    async def __aenter__(self) -> "AsyncTTAClient":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def send(self, call: Call, retries: int | None = None) -> httpx.Response:
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            response = await self.http.request(call.method, call.path, **call.send_args())
            delay = retry_delay(response, attempt, retries, self.max_retry_wait_s)
            if delay is None:
                break
            await asyncio.sleep(delay)
        return response

    async def predict(
        self,
        images: Sequence[Image],
        labels: Sequence[int] | None = None,
        *,
        stream: str | None = None,
        as_json: bool = False,
    ) -> PredictResponse:
        calls = self.predict_calls(images, labels, stream, as_json)
        return merged([parsed(await self.send(call), PredictResponse) for call in calls])

    async def feedback(self, prediction: str | Sequence[tuple[str, int]], label: int | None = None) -> FeedbackResponse:
        return parsed(await self.send(self.feedback_call(prediction, label)), FeedbackResponse)

    async def reset(self, stream: str | None = None) -> ResetResponse:
        return parsed(await self.send(self.reset_call(stream)), ResetResponse)

    async def status(self) -> StatusResponse:
        return parsed(await self.send(Call("GET", "/v1/status")), StatusResponse)

    async def streams(self) -> StreamsResponse:
        return parsed(await self.send(Call("GET", "/v1/streams")), StreamsResponse)

    async def stream_status(self, name: str) -> StreamStatus:
        return parsed(await self.send(Call("GET", f"/v1/streams/{quote(name, safe='')}")), StreamStatus)

    async def live(self) -> LiveResponse:
        return parsed(await self.send(Call("GET", "/v1/live")), LiveResponse)

    async def metrics(self) -> str:
        response = await self.send(Call("GET", "/metrics"))
        response.raise_for_status()
        return response.text

    async def healthy(self) -> bool:
        return await self._answers_200("/healthz")

    async def ready(self) -> bool:
        return await self._answers_200("/readyz")

    async def _answers_200(self, path: str) -> bool:
        try:
            return (await self.send(Call("GET", path), retries=0)).status_code == 200
        except httpx.TransportError:
            return False
