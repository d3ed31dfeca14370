"""Every error is JSON `{"error": code, "detail": sentence}`; request metrics are taken here too.

The service's parts refuse with their own exceptions, which know nothing of HTTP: each holds a stable `code` and a
`detail` sentence, and REFUSAL_STATUS says what each is in HTTP. The API's own refusals (parsing, routes) are
ApiError, which holds its status.
"""

import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics.ledger import AlreadyLabelledError, InvalidLabelError, UnknownPredictionError
from app.serving.batcher import DeadlineExceededError, UnavailableError
from app.serving.preprocess import ImageLimitError, UnreadableImageError, UnsupportedFormatError

KNOWN_ROUTES = {"/predict", "/feedback", "/reset", "/v1/status", "/healthz", "/readyz", "/metrics"}

# The status a request is counted under when its client left before sending the whole body. No response is sent;
# 499 is nginx's "client closed request", which log tools and dashboards already know, and being 4xx it stays out
# of the 5xx alerts: the client went away, the server did not fail.
CLIENT_CLOSED_REQUEST = 499

REFUSAL_STATUS: dict[type[Exception], int] = {
    UnreadableImageError: 400,
    UnknownPredictionError: 404,
    AlreadyLabelledError: 409,
    ImageLimitError: 413,
    UnsupportedFormatError: 415,
    InvalidLabelError: 422,
    UnavailableError: 503,  # with its Retry-After: nothing was computed
    DeadlineExceededError: 504,
}

log = logging.getLogger("tta")


class ApiError(Exception):
    """A request the API refuses (malformed, unknown stream, not ready), with the HTTP status to answer."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def error_response(status: int, code: str, detail: str, retry_after_s: int = 1) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if status == 503 else None
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def refusal_response(error: Exception) -> JSONResponse:
    """The answer to one of the service's refusals (a key of REFUSAL_STATUS)."""
    return error_response(REFUSAL_STATUS[type(error)], error.code, error.detail, getattr(error, "retry_after_s", 1))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.code, error.detail)

    async def _refused(request: Request, error: Exception) -> JSONResponse:
        return refusal_response(error)

    for refusal in REFUSAL_STATUS:
        app.add_exception_handler(refusal, _refused)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error_response(422, "invalid_fields", f"{where}: {first['msg']}")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        response = error_response(error.status_code, code, str(error.detail))
        response.headers.update(error.headers or {})  # a 405 must say which methods are allowed (RFC 9110)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return error_response(500, "internal_error", f"the server failed on this request: {type(error).__name__}")

    app.add_middleware(RequestMetricsMiddleware)


class RequestMetricsMiddleware:
    """Counts requests by route and status and times them (pure ASGI: no body buffering).

    A client that disconnects mid-body ends here too: counted as 499 and logged in one line, without the traceback
    and the 500 that the outer error middleware would make of it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        status = 500

        async def send_and_remember(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_remember)
        except ClientDisconnect:
            status = CLIENT_CLOSED_REQUEST
            log.info("client disconnected before sending the whole request body (%s)", route)
        finally:
            service = getattr(scope["app"].state, "service", None)
            if service is not None:
                service.metrics.record_request(route, status, time.perf_counter() - started)
