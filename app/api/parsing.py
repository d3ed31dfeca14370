"""Turn a /predict request (multipart or JSON) into named image bytes and optional labels, and a /feedback request
into its items, within limits."""

import base64
import binascii
import re
from dataclasses import dataclass
from typing import TypeVar

from pydantic import TypeAdapter, ValidationError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from app.adaptation.streams import DEFAULT_STREAM, STREAM_RULE, valid_stream
from app.api.errors import ApiError
from app.api.schemas import FeedbackItem, PredictJSON
from app.config import Settings

T = TypeVar("T")

PREDICT_JSON = TypeAdapter(PredictJSON)
FEEDBACK_ITEM = TypeAdapter(FeedbackItem)
FEEDBACK_LIST = TypeAdapter(list[FeedbackItem])

# A multipart label is ASCII digits: int() alone would also read "+3", "3_0" and other scripts' digits ("٣").
# 18 at most: any class index fits, and int() never reads a number of thousands of digits.
STREAM_HEADER = "X-TTA-Stream"

ASCII_LABEL = re.compile(r"[0-9]{1,18}")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "request_too_large", f"the request is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "request_too_large", f"the request passes the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(content_type: str) -> str:
    """The content type without its parameters, lower-cased (media types are case-insensitive, RFC 9110)."""
    return content_type.partition(";")[0].strip().lower()


@dataclass
class PredictRequest:
    files: list[tuple[str, bytes]]  # (name, encoded image)
    labels: list[int] | None
    stream: str


async def parse_predict(request: Request, settings: Settings) -> PredictRequest:
    content_type = request.headers.get("content-type", "")
    body = await read_body(request, settings.max_request_bytes)
    kind = media_type(content_type)
    if kind == "multipart/form-data":
        files, labels, stream = _parse_multipart(body, content_type, settings.max_files_per_request)
    elif kind == "application/json":
        files, labels, stream = _parse_json(body)
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            'send multipart/form-data (files=...) or application/json ({"images": [...]}), '
            f"not {content_type or 'no content type'}",
        )
    if not files:
        raise ApiError(422, "no_images", "the request holds no image: send one or more 'files' parts or 'images'")
    if len(files) > settings.max_files_per_request:
        raise ApiError(
            413, "too_many_files", f"{len(files)} images in one request; the limit is {settings.max_files_per_request}"
        )
    if labels is not None and len(labels) != len(files):
        raise ApiError(422, "labels_mismatch", f"{len(labels)} labels for {len(files)} images: send one per image")
    return PredictRequest(files, labels, request_stream(request.headers.get(STREAM_HEADER), stream))


def request_stream(header: str | None, field: str | None) -> str:
    """The stream a request names: its `stream` field or its X-TTA-Stream header (not two different ones),
    or `default`."""
    if header is not None and field is not None and header != field:
        raise ApiError(422, "invalid_stream", f"the {STREAM_HEADER} header and the stream field name two streams")
    name = field if field is not None else header
    if name is None:
        return DEFAULT_STREAM
    if not valid_stream(name):
        raise ApiError(422, "invalid_stream", f"stream name {name[:80]!r} is not {STREAM_RULE}")
    return name


async def parse_feedback(request: Request, settings: Settings) -> list[FeedbackItem]:
    """The items of a /feedback body: one {id, label} object or a JSON list of them."""
    content_type = request.headers.get("content-type", "")
    if media_type(content_type) != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f'send application/json ({{"id": ..., "label": ...}} or a list), not {content_type or "no content type"}',
        )
    body = await read_body(request, settings.max_feedback_bytes)
    # The first character says which shape it is, so an error names the item's place ("2.label") instead of
    # listing one failure per branch of a union.
    if body.lstrip(b" \t\r\n").startswith(b"["):
        return _validate_json(FEEDBACK_LIST, body)
    return [_validate_json(FEEDBACK_ITEM, body)]


def split_multipart(body: bytes, content_type: str, max_files: int) -> list[tuple[str, str | None, bytes]]:
    """(field name, filename or None for a text field, content) of each part of a multipart/form-data body.

    The body is already in memory (read under the size limit), so it is split on its boundary directly (RFC 2046:
    the delimiter never occurs inside a part): a few microseconds, against hundreds for a streaming parser that
    spools each file to a temporary file, which is what request.form() would cost on every request.
    """
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "malformed_multipart", "the multipart/form-data content type names no boundary")
    delimiter = b"--" + boundary
    first = body.find(delimiter)
    if first < 0:
        raise ApiError(400, "malformed_multipart", "the body does not contain the boundary its content type names")
    *sections, closing = body[first + len(delimiter) :].split(b"\r\n" + delimiter)
    if not closing.startswith(b"--"):
        raise ApiError(400, "malformed_multipart", "the multipart body ends before its closing boundary")
    if len(sections) > 2 * max_files + 16:  # files, one labels field per file, and a few more
        raise ApiError(
            413, "too_many_fields", f"{len(sections)} parts in one request; the limit is {2 * max_files + 16}"
        )
    parts = [_part(section) for section in sections]
    files = sum(filename is not None for _, filename, _ in parts)
    if files > max_files:
        raise ApiError(413, "too_many_files", f"{files} images in one request; the limit is {max_files}")
    return parts


def _part(section: bytes) -> tuple[str, str | None, bytes]:
    head, separator, content = section.partition(b"\r\n\r\n")
    if not separator or not head.startswith(b"\r\n"):
        raise ApiError(400, "malformed_multipart", "a multipart part has no header block")
    disposition = b""
    for line in head[2:].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition":
            disposition = value
    _, options = parse_options_header(disposition)
    if b"name" not in options:
        raise ApiError(400, "malformed_multipart", "a multipart part has no Content-Disposition name")
    filename = options.get(b"filename")
    decoded = filename.decode("utf-8", "replace") if filename is not None else None
    return options[b"name"].decode("utf-8", "replace"), decoded, content


def _parse_multipart(
    body: bytes, content_type: str, max_files: int
) -> tuple[list[tuple[str, bytes]], list[int] | None, str | None]:
    parts = split_multipart(body, content_type, max_files)
    files, raw_labels, stream = [], [], None
    for name, filename, content in parts:
        if name == "files":
            if filename is None:
                raise ApiError(422, "files_not_files", "'files' must be file parts, not text fields")
            files.append((filename or f"files[{len(files)}]", content))
        elif name == "labels" and filename is None:
            raw_labels.append(content.decode("utf-8", "replace"))
        elif name == "stream" and filename is None:
            if stream is not None:
                raise ApiError(422, "invalid_stream", "the request names its stream twice: send one 'stream' field")
            stream = content.decode("utf-8", "replace")
    return files, _parse_labels(raw_labels) if raw_labels else None, stream


def _parse_labels(fields: list[str]) -> list[int]:
    """Class indices from 'labels' fields, comma-separated: ASCII digits, spaces or tabs around each allowed."""
    pieces = [p.strip(" \t") for value in fields for p in value.split(",")]
    for piece in pieces:
        if not ASCII_LABEL.fullmatch(piece):
            detail = f"labels are class indices in ASCII digits separated by commas, not {piece[:40]!r}"
            raise ApiError(422, "invalid_labels", detail)
    return [int(p) for p in pieces]


def _parse_json(body: bytes) -> tuple[list[tuple[str, bytes]], list[int] | None, str | None]:
    payload = _validate_json(PREDICT_JSON, body)
    files = []
    for index, encoded in enumerate(payload.images):
        try:
            files.append((f"images[{index}]", base64.b64decode(encoded, validate=True)))
        except (binascii.Error, ValueError):
            raise ApiError(400, "bad_base64", f"images[{index}] is not valid base64") from None
    return files, payload.labels, payload.stream


def _validate_json(adapter: TypeAdapter[T], body: bytes) -> T:
    """400 invalid_json for a body that is not JSON, 422 invalid_fields for JSON of the wrong shape."""
    try:
        return adapter.validate_json(body)
    except ValidationError as error:
        if any(e["type"] == "json_invalid" for e in error.errors()):
            raise ApiError(400, "invalid_json", "the body is not valid JSON") from error
        raise ApiError(422, "invalid_fields", _first_error(error)) from error


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]
