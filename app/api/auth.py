"""Who may call what: the admin token guards POST /reset, optional API keys guard /predict and /feedback.

Secrets are kept only as SHA-256 digests and compared as bytes in constant time, and no message, log line or
metric ever holds one. The API key file (TTA_API_KEYS) has one key per line, optionally followed by the streams
that key may use; `#` starts a comment:

    # key                               streams (comma-separated; none = every stream)
    Zt4v0Hq8w1Xb9yKp2LmN7cRd5sJ3fGa6
    camera-fleet-7f3a9c2e51d04b8e19aa   default,cameras-north

A key's stream list is checked against the stream each /predict request names (X-TTA-Stream or its `stream` field)
and, on /feedback, against the stream of each prediction labelled.
"""

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.adaptation.streams import STREAM_RULE, valid_stream
from app.api.errors import error_response
from app.config import Settings

# RFC 6750's token68, what `Authorization: Bearer` can carry, at least 16 characters: a short key is guessable.
KEY_PATTERN = re.compile(r"[A-Za-z0-9._~+/-]{16,}=*")
API_KEY_HEADER = "X-API-Key"

# Security schemes: they parse the headers and document them in /docs; the checks are below.
admin_bearer = HTTPBearer(
    scheme_name="admin_token", description="TTA_ADMIN_TOKEN (only when it is set)", auto_error=False
)
api_key_bearer = HTTPBearer(
    scheme_name="api_key_bearer", description="an API key of TTA_API_KEYS (only when it is set)", auto_error=False
)
api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    scheme_name="api_key_header",
    description="an API key of TTA_API_KEYS (only when it is set)",
    auto_error=False,
)


class AuthError(Exception):
    """401 (no credentials), 403 (wrong ones) or 400 (a header that cannot hold any)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class KeyFileError(ValueError):
    """A TTA_API_KEYS file the server refuses to start with; the message names the line, never a key."""


def digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


@dataclass(frozen=True)
class ApiKey:
    digest: bytes
    streams: frozenset[str] | None  # None: every stream

    def allows(self, stream: str) -> bool:
        return self.streams is None or stream in self.streams


def parse_key_line(line: str, where: str) -> ApiKey | None:
    """One line of the key file: None for a blank or comment line."""
    fields = line.split("#", 1)[0].split()
    if not fields:
        return None
    if len(fields) > 2:
        raise KeyFileError(f"{where}: a key and one comma-separated list of streams expected, found more fields")
    if not KEY_PATTERN.fullmatch(fields[0]):
        raise KeyFileError(
            f"{where}: a key is at least 16 characters of A-Z a-z 0-9 - . _ ~ + / (then optional '=' padding)"
        )
    if len(fields) == 1:
        return ApiKey(digest(fields[0].encode()), None)
    streams = fields[1].split(",")
    for stream in streams:
        if not valid_stream(stream):
            raise KeyFileError(f"{where}: stream name {stream!r} is not {STREAM_RULE}")
    return ApiKey(digest(fields[0].encode()), frozenset(streams))


def load_api_keys(path: Path) -> tuple[ApiKey, ...]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise KeyFileError(f"TTA_API_KEYS: cannot read {path}: {error}") from None
    keys: dict[bytes, int] = {}
    parsed = []
    for number, line in enumerate(lines, start=1):
        key = parse_key_line(line, f"TTA_API_KEYS {path}, line {number}")
        if key is None:
            continue
        if key.digest in keys:
            raise KeyFileError(f"TTA_API_KEYS {path}, line {number}: the same key as line {keys[key.digest]}")
        keys[key.digest] = number
        parsed.append(key)
    if not parsed:
        raise KeyFileError(f"TTA_API_KEYS {path} holds no key: every request would be refused")
    return tuple(parsed)


@dataclass(frozen=True)
class Credentials:
    """What the server accepts, built once from the settings."""

    admin_digest: bytes | None  # None: POST /reset is open
    api_keys: tuple[ApiKey, ...] | None  # None: /predict and /feedback are open

    @classmethod
    def from_settings(cls, settings: Settings) -> "Credentials":
        token = settings.admin_token
        return cls(
            digest(token.get_secret_value().encode()) if token is not None else None,
            load_api_keys(settings.api_keys) if settings.api_keys is not None else None,
        )

    def find_key(self, presented: bytes) -> ApiKey | None:
        """The key whose digest matches; every key is compared, so the time says nothing about which one."""
        presented_digest = digest(presented)
        found = None
        for key in self.api_keys or ():
            if hmac.compare_digest(key.digest, presented_digest):
                found = key
        return found


def install_auth(app: FastAPI, settings: Settings) -> None:
    """Load the credentials (KeyFileError for a bad key file), answer AuthError as a JSON error, and document only
    the credentials that are configured."""
    app.state.credentials = Credentials.from_settings(settings)
    _document_open_routes(app, app.state.credentials)

    async def _refused(request: Request, error: AuthError) -> JSONResponse:
        response = error_response(error.status, error.code, error.detail)
        if error.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    app.add_exception_handler(AuthError, _refused)


def _document_open_routes(app: FastAPI, credentials: Credentials) -> None:
    """Without TTA_ADMIN_TOKEN (or TTA_API_KEYS) its routes are open, so /openapi.json must not ask for it: a client
    generated from the document, or schemathesis' ignored_auth check, would take the route for a protected one."""
    unset = set()
    if credentials.admin_digest is None:
        unset.add(admin_bearer.scheme_name)
    if credentials.api_keys is None:
        unset |= {api_key_bearer.scheme_name, api_key_header.scheme_name}
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # cached by FastAPI after the first call; the edit below is idempotent
        for path_item in schema["paths"].values():
            for operation in path_item.values():
                # Alternatives (OR) of scheme sets (AND): one made only of unset schemes is no requirement at all.
                if any(set(requirement) <= unset for requirement in operation.get("security", ())):
                    del operation["security"]
        return schema

    app.openapi = openapi


def _refuse_non_ascii(request: Request, header: str) -> None:
    """Refuse a credential header that is not ASCII: no token or key is, so the header is broken (400, not 500)."""
    value = request.headers.get(header)
    if value is not None and not value.isascii():
        raise AuthError(400, "invalid_header", f"the {header} header holds non-ASCII bytes")


async def require_admin(request: Request, bearer: HTTPAuthorizationCredentials | None = Depends(admin_bearer)) -> None:
    expected = request.app.state.credentials.admin_digest
    if expected is None:
        return
    _refuse_non_ascii(request, "Authorization")
    if bearer is None:
        raise AuthError(401, "unauthorized", "POST /reset needs 'Authorization: Bearer <TTA_ADMIN_TOKEN>'")
    if not hmac.compare_digest(digest(bearer.credentials.encode()), expected):
        raise AuthError(403, "forbidden", "the admin token is wrong")


async def require_api_key(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Depends(api_key_bearer),
    header_key: str | None = Depends(api_key_header),
) -> None:
    credentials: Credentials = request.app.state.credentials
    if credentials.api_keys is None:
        return
    _refuse_non_ascii(request, "Authorization")
    _refuse_non_ascii(request, API_KEY_HEADER)
    presented = bearer.credentials if bearer is not None else header_key
    if not presented:
        detail = f"this route needs an API key: 'Authorization: Bearer <key>' or '{API_KEY_HEADER}: <key>'"
        raise AuthError(401, "unauthorized", detail)
    key = credentials.find_key(presented.encode())
    if key is None:
        raise AuthError(403, "forbidden", "the API key is wrong")
    request.state.api_key = key  # the streams it may use are checked once the request's stream is known


def require_stream_access(request: Request, stream: str) -> None:
    """403 when the request's API key (if keys are on) may not use `stream`."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    if key is not None and not key.allows(stream):
        raise AuthError(403, "forbidden", f"this API key may not use stream {stream!r}")
