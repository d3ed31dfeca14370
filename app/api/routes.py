"""HTTP routes: thin; they parse, hand images to the batcher, and shape the answer."""

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.adaptation.streams import DEFAULT_STREAM, STREAM_NAME, STREAM_RULE, valid_stream
from app.api.auth import require_admin, require_api_key, require_stream_access
from app.api.errors import ApiError
from app.api.parsing import STREAM_HEADER, parse_feedback, parse_predict
from app.api.schemas import (
    ERROR_RESPONSES,
    FeedbackItem,
    FeedbackResponse,
    PredictJSON,
    PredictResponse,
    ResetResponse,
    StatusResponse,
    StreamsResponse,
    StreamStatus,
)
from app.metrics.ledger import LedgerEntry

router = APIRouter()

# `labels` is described, not listed among the form's fields: Swagger UI (/docs) sends every listed text field, empty
# when left blank, and an empty `labels` is refused (422 invalid_labels), so a listed field made the form fail as it
# stood ("string" pre-filled, or sent empty). Listed as an array of integers, an empty item went out as label 0.
PREDICT_BODY = {
    "parameters": [
        {
            "name": STREAM_HEADER,
            "in": "header",
            "required": False,
            "description": "the stream (camera, tenant) whose adaptation state serves these images; absent: "
            f"'default' (or the body's `stream` field). {STREAM_RULE}",
            "schema": {"type": "string", "pattern": f"^{STREAM_NAME.pattern}$"},
        }
    ],
    "requestBody": {
        "required": True,
        "description": "Multipart: one `files` part per image and, optionally, their true class indices for "
        "prequential scoring in `labels` form fields: one field '3,5,1' (ASCII digits, spaces around each allowed) "
        "or one field per image, in the order of the files (`curl -F files=@a.jpg -F files=@b.png -F labels=3,5`). "
        "JSON: base64 images, optional integer labels.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "description": "one or more images (JPEG, PNG, WebP, GIF)",
                        },
                    },
                }
            },
            "application/json": {"schema": PredictJSON.model_json_schema()},
        },
    },
}


FEEDBACK_ITEM_SCHEMA = FeedbackItem.model_json_schema()
FEEDBACK_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"anyOf": [FEEDBACK_ITEM_SCHEMA, {"type": "array", "items": FEEDBACK_ITEM_SCHEMA}]}
            }
        },
    }
}


def _service(request: Request) -> Any:
    return request.app.state.service


@router.post(
    "/predict",
    response_model=PredictResponse,
    dependencies=[Depends(require_api_key)],
    responses=ERROR_RESPONSES,
    openapi_extra=PREDICT_BODY,
    summary="Classify one or more images (prediction first, then the model adapts on the batch)",
)
async def predict(request: Request) -> Response:
    service = _service(request)
    settings, card = service.settings, service.card
    started = time.monotonic()
    service.batcher.admit(1)  # before the body is read: no room even for one image, no need to parse it
    parsed = await parse_predict(request, settings)
    files, labels, stream = parsed.files, parsed.labels, parsed.stream
    require_stream_access(request, stream)
    service.batcher.admit(len(files))  # before decoding, the costly part; submit() checks again after it
    for label in labels or ():
        service.ledger.check_label(label)
    images = await service.decoder.decode(files)
    remaining = settings.request_timeout_s - (time.monotonic() - started)
    result = await service.batcher.submit(images, max(remaining, 0.001), stream)
    out, names = result.output, card.class_names
    step = out.step[result.offset]  # every image of a request is in its one stream
    predictions = []
    now = time.monotonic()
    for i in range(result.offset, result.offset + result.count):
        prediction_id = uuid.uuid4().hex
        source = out.source_class_index[i] if out.source_class_index is not None else None
        label = labels[i - result.offset] if labels is not None else None
        service.ledger.record(
            prediction_id, LedgerEntry(out.class_index[i], source, out.entropy[i], now, step, stream=stream), label
        )
        service.capture.offer(stream, prediction_id, images[i - result.offset], out.class_index[i], label)
        predictions.append(
            {
                "id": prediction_id,
                "class_index": out.class_index[i],
                "class_name": names[out.class_index[i]],
                "confidence": out.confidence[i],
                "entropy": out.entropy[i],
                "top_k": [
                    {"class_index": k, "class_name": names[k], "confidence": c}
                    for k, c in zip(out.top_k_index[i], out.top_k_confidence[i], strict=True)
                ],
            }
        )
    # Serialised here rather than validated against PredictResponse by FastAPI: the shape is fixed above, and that
    # validation was among the largest non-model costs in the saturation profile (docs/BENCHMARKS.md, speed).
    body = json.dumps({"predictions": predictions, "adaptation_step": step}, separators=(",", ":"))
    return Response(body, media_type="application/json")


@router.post(
    "/feedback",
    response_model=FeedbackResponse,
    dependencies=[Depends(require_api_key)],
    responses=ERROR_RESPONSES,
    openapi_extra=FEEDBACK_BODY,
    summary="Late labels for earlier predictions: one {id, label} or a list of them",
    description="All or nothing: every item of a list is checked first (known id, not labelled yet, label in "
    "range, no id twice in the list), and if one fails, none is applied and the error names it, so the corrected "
    "list can be sent again whole. The body is at most TTA_MAX_FEEDBACK_BYTES (1 MiB, ~18,000 labels).",
)
async def feedback(request: Request) -> dict[str, int]:
    service = _service(request)
    items = await parse_feedback(request, service.settings)
    for stream in service.ledger.streams_of([item.id for item in items]):
        require_stream_access(request, stream)
    outcomes = service.ledger.label_all([(item.id, item.label) for item in items])
    service.capture.label((item.id, item.label) for item in items)
    return {"labelled": len(outcomes), "correct": sum(outcomes)}


@router.post(
    "/reset",
    response_model=ResetResponse,
    dependencies=[Depends(require_admin)],
    responses=ERROR_RESPONSES,
    summary="Admin: return every stream's adaptation (or one stream's: ?stream=S) to the source, between two batches",
)
async def reset(
    request: Request, stream: str | None = Query(None, description="the one stream to reset; absent: all")
) -> dict[str, Any]:
    service = _service(request)
    if stream is not None and not valid_stream(stream):
        raise ApiError(422, "invalid_stream", f"stream name {stream[:80]!r} is not {STREAM_RULE}")
    names = await service.worker.reset("manual", stream)
    if stream is not None and not names:
        raise ApiError(404, "unknown_stream", f"no stream {stream!r} (never seen, or evicted)")
    shown = service.worker.stream_snapshots.get(stream or DEFAULT_STREAM, service.worker.snapshot)
    return {"reset": True, "adaptation_step": shown["steps_since_reset"], "streams": names}


@router.get("/v1/streams", response_model=StreamsResponse, summary="Every stream's adaptation and prequential figures")
async def streams(request: Request) -> dict[str, Any]:
    service = _service(request)
    await service.worker.settled()  # the adaptation of every batch answered before this request
    snapshots = service.worker.stream_snapshots
    return {
        "streams": [stream_status(service, name, snapshot) for name, snapshot in snapshots.items()],
        "max_streams": service.settings.max_streams,
        "evicted": service.worker.snapshot["streams"]["evicted"],
    }


@router.get(
    "/v1/streams/{stream}",
    response_model=StreamStatus,
    responses={404: ERROR_RESPONSES[404]},
    summary="One stream's adaptation and prequential figures",
)
async def one_stream(request: Request, stream: str) -> dict[str, Any]:
    service = _service(request)
    await service.worker.settled()  # the adaptation of every batch answered before this request
    snapshot = service.worker.stream_snapshots.get(stream)
    if snapshot is None:
        raise ApiError(404, "unknown_stream", f"no stream {stream[:80]!r} (never seen, or evicted)")
    return stream_status(service, stream, snapshot)


def stream_status(service: Any, name: str, snapshot: dict[str, Any]) -> dict[str, Any]:
    keys = ("steps_total", "steps_since_reset", "skipped", "resets", "entropy_ema", "param_drift", "buffer_fill")
    return {"stream": name, **{k: snapshot[k] for k in keys}, "prequential": service.ledger.stream_summary(name)}


@router.get("/v1/status", response_model=StatusResponse, summary="Method, model, adaptation and guard state, figures")
async def status(request: Request) -> dict[str, Any]:
    service = _service(request)
    await service.worker.settled()  # the adaptation of every batch answered before this request
    settings, card, snapshot = service.settings, service.card, service.worker.snapshot
    scores = service.ledger.scores
    prequential: dict[str, Any] = {
        model: {
            "labels": s.labels,
            "correct": s.correct,
            "accuracy": s.correct / s.labels if s.labels else None,
            "window_accuracy": s.window_accuracy(),
        }
        for model, s in scores.items()
        if model == "adapted" or settings.shadow_source
    }
    prequential["window"] = settings.prequential_window
    if settings.shadow_source:
        compared = service.ledger.shadow_compared
        prequential["source_agreement"] = service.ledger.shadow_agreed / compared if compared else None
    return {
        "method": settings.method,
        "device": str(service.device),
        "model": {
            **card.model_dump(exclude={"provenance"}),
            "path": str(settings.model),
            "test_top1": card.provenance.get("metrics", {}).get("test_top1"),
        },
        "adaptation": snapshot,
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "queue_depth": service.batcher.queued_images,
            "max_queue_images": settings.max_queue_images,
            "max_queue_delay_ms": settings.queue_delay_s() * 1000,
            "throughput_images_per_s": service.batcher.throughput.images_per_s,
            "expected_wait_s": service.batcher.expected_wait_s(0),
        },
        "prequential": prequential,
        "ledger_entries": len(service.ledger),
        "persistence": service.persistence.status(),
        "uptime_s": time.time() - service.started,
    }


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: model loaded and worker alive", responses={503: ERROR_RESPONSES[503]})
async def readyz(request: Request) -> Any:
    service = getattr(request.app.state, "service", None)
    if service is None or not service.worker.alive:
        raise ApiError(503, "not_ready", "the model worker is not running")
    return {"status": "ready", "method": service.settings.method}


@router.get("/metrics", summary="Prometheus exposition", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_service(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
