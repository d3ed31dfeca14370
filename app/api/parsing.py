"""Turn a /predict request (multipart or JSON) into named image bytes and optional labels, within limits."""

import base64
import binascii

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from app.api.schemas import PredictJSON
from app.config import Settings
from app.serving.preprocess import InputError


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError(413, "request_too_large", f"the request is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(413, "request_too_large", f"the request passes the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # so that request.form() parses what was already read
    return body


async def parse_predict(request: Request, settings: Settings) -> tuple[list[tuple[str, bytes]], list[int] | None]:
    content_type = request.headers.get("content-type", "")
    body = await read_body(request, settings.max_request_bytes)
    if content_type.startswith("multipart/form-data"):
        files, labels = await _parse_multipart(request, settings)
    elif content_type.startswith("application/json"):
        files, labels = _parse_json(body)
    else:
        raise InputError(
            415,
            "unsupported_media_type",
            'send multipart/form-data (files=...) or application/json ({"images": [...]}), '
            f"not {content_type or 'no content type'}",
        )
    if not files:
        raise InputError(422, "no_images", "the request holds no image: send one or more 'files' parts or 'images'")
    if len(files) > settings.max_files_per_request:
        raise InputError(
            413, "too_many_files", f"{len(files)} images in one request; the limit is {settings.max_files_per_request}"
        )
    if labels is not None and len(labels) != len(files):
        raise InputError(422, "labels_mismatch", f"{len(labels)} labels for {len(files)} images: send one per image")
    return files, labels


async def _parse_multipart(request: Request, settings: Settings) -> tuple[list[tuple[str, bytes]], list[int] | None]:
    try:
        form = await request.form(
            max_files=settings.max_files_per_request + 1, max_fields=settings.max_files_per_request + 16
        )
    except Exception as error:  # starlette raises several types for malformed multipart bodies
        raise InputError(400, "malformed_multipart", f"the multipart body cannot be parsed: {error}") from error
    files = []
    for index, part in enumerate(form.getlist("files")):
        if not isinstance(part, UploadFile):
            raise InputError(422, "files_not_files", "'files' must be file parts, not text fields")
        files.append((part.filename or f"files[{index}]", await part.read()))
    raw_labels = [value for value in form.getlist("labels") if isinstance(value, str)]
    labels = None
    if raw_labels:
        pieces = [p.strip() for value in raw_labels for p in value.split(",") if p.strip()]
        try:
            labels = [int(p) for p in pieces]
        except ValueError:
            raise InputError(422, "invalid_labels", f"labels must be integers, got {', '.join(raw_labels)!r}") from None
    return files, labels


def _parse_json(body: bytes) -> tuple[list[tuple[str, bytes]], list[int] | None]:
    try:
        payload = PredictJSON.model_validate_json(body)
    except ValidationError as error:
        if any(e["type"] == "json_invalid" for e in error.errors()):
            raise InputError(400, "invalid_json", "the body is not valid JSON") from error
        raise InputError(422, "invalid_fields", _first_error(error)) from error
    files = []
    for index, encoded in enumerate(payload.images):
        try:
            files.append((f"images[{index}]", base64.b64decode(encoded, validate=True)))
        except (binascii.Error, ValueError):
            raise InputError(400, "bad_base64", f"images[{index}] is not valid base64") from None
    return files, payload.labels


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]
