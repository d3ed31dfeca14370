"""Secure defaults: no open admin route on the network, optional API keys, and secrets that never leak."""

import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.api.auth import KeyFileError, load_api_keys
from app.cli import open_admin_problem
from app.config import Settings, is_loopback
from tests.conftest import make_png
from tests.servers import ROOT, free_port, in_process_client, running_server

pytestmark = pytest.mark.anyio

ALL_STREAMS_KEY = "all-streams-" + secrets.token_urlsafe(16)
DEFAULT_KEY = "default-only-" + secrets.token_urlsafe(16)
OTHER_STREAMS_KEY = "other-streams-" + secrets.token_urlsafe(16)
KEY_FILES_KEYS = (ALL_STREAMS_KEY, DEFAULT_KEY, OTHER_STREAMS_KEY)
SHORT_KEY = "short-" + secrets.token_hex(2)
ODD_KEY = "key:with;odd*chars-" + secrets.token_hex(8)
KEY_FILE = f"""# API keys of the test: key, then the streams it may use (none: every stream)
{ALL_STREAMS_KEY}
  {DEFAULT_KEY}   default          # a comment after a key
{OTHER_STREAMS_KEY} cameras-north,cameras-south

"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    path.write_text(KEY_FILE)
    return path


def serve(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`tta serve` that is expected to refuse to start (a timeout here means it started)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port()), *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_refused_in_one_paragraph(result: subprocess.CompletedProcess, *needed: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert "Traceback" not in result.stderr and "\n\n" not in message, message
    for text in needed:
        assert text in message, message


# ----------------------------------------------------------------------------------------------- binding


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("LocalHost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("128.0.0.1", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_loopback_is_127_0_0_0_8_ipv6_1_and_localhost(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_only_a_non_loopback_address_without_token_or_explicit_consent_is_refused(model_path: Path) -> None:
    def problem(**settings: object) -> str | None:
        return open_admin_problem(Settings(model=model_path, **settings))

    assert "TTA_ADMIN_TOKEN" in problem(host="0.0.0.0") and "TTA_ALLOW_OPEN_ADMIN" in problem(host="0.0.0.0")
    assert problem(host="0.0.0.0", admin_token="a-token") is None
    assert problem(host="0.0.0.0", allow_open_admin=True) is None
    assert problem(host="127.0.0.1") is None and problem(host="localhost") is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_serve_refuses_a_public_address_without_a_token_exit_2_no_traceback(host: str) -> None:
    result = serve(["--host", host], {})
    assert_refused_in_one_paragraph(result, f"refusing to listen on {host}", "TTA_ADMIN_TOKEN", "TTA_ALLOW_OPEN_ADMIN")


def test_serve_refuses_a_token_that_cannot_travel_in_a_header_without_echoing_it() -> None:
    token = "two words-" + secrets.token_hex(8)
    result = serve(["--host", "127.0.0.1"], {"TTA_ADMIN_TOKEN": token})
    assert_refused_in_one_paragraph(result, "invalid configuration", "printable ASCII without spaces")
    assert token not in result.stderr + result.stdout


# ----------------------------------------------------------------------------------------------- key file


def test_key_file_format_keys_with_and_without_streams(key_file: Path) -> None:
    keys = load_api_keys(key_file)
    by_digest = {key.digest: key for key in keys}
    assert len(keys) == 3
    all_streams, default, other = (by_digest[hashlib.sha256(k.encode()).digest()] for k in KEY_FILES_KEYS)
    assert all_streams.streams is None and all_streams.allows("default") and all_streams.allows("anything")
    assert default.streams == {"default"} and default.allows("default") and not default.allows("cameras-north")
    assert other.streams == {"cameras-north", "cameras-south"} and not other.allows("default")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{ALL_STREAMS_KEY}\n{SHORT_KEY}\n", "line 2: a key is at least 16 characters"),
        (f"{ODD_KEY}\n", "line 1: a key is at least 16 characters of A-Z a-z 0-9"),
        (f"# c\n{ALL_STREAMS_KEY} default extra\n", "line 2: a key and one comma-separated list of streams"),
        (f"{ALL_STREAMS_KEY} default,,north\n", "line 1: stream name '' is not"),
        (f"{ALL_STREAMS_KEY} nörth\n", "line 1: stream name 'nörth' is not"),
        (f"{ALL_STREAMS_KEY}\n\n{ALL_STREAMS_KEY} default\n", "line 3: the same key as line 1"),
        ("# only comments\n\n", "holds no key"),
    ],
)
def test_a_bad_key_file_names_the_line_but_never_a_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(KeyFileError) as refused:
        load_api_keys(path)
    assert message in str(refused.value)
    for key in (ALL_STREAMS_KEY, SHORT_KEY, ODD_KEY):
        assert key not in str(refused.value)


def test_serve_refuses_a_bad_key_file_exit_2_no_traceback(tmp_path: Path, model_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{ALL_STREAMS_KEY}\n{SHORT_KEY}\n")
    result = serve(["--host", "127.0.0.1"], {"TTA_API_KEYS": str(path), "TTA_MODEL": str(model_path)})
    assert_refused_in_one_paragraph(result, f"TTA_API_KEYS {path}, line 2")
    assert SHORT_KEY not in result.stderr + result.stdout and ALL_STREAMS_KEY not in result.stderr


def test_a_missing_key_file_is_a_configuration_error(tmp_path: Path, model_path: Path) -> None:
    with pytest.raises(ValueError, match="API key file .* does not exist"):
        Settings(model=model_path, api_keys=tmp_path / "absent")


# ----------------------------------------------------------------------------------------------- API keys


async def test_api_keys_guard_predict_and_feedback_for_stream_default(model_path: Path, key_file: Path) -> None:
    image = [("files", ("a.png", make_png(), "image/png"))]
    sent = {
        "no key": {},
        "wrong key": {"X-API-Key": "wrong-" + secrets.token_urlsafe(16)},
        "wrong bearer": {"Authorization": "Bearer " + secrets.token_urlsafe(16)},
        "not a bearer": {"Authorization": f"Basic {ALL_STREAMS_KEY}"},
        "non-ASCII bearer": {"Authorization": b"Bearer caf\xe9-" + DEFAULT_KEY.encode()},
        "non-ASCII X-API-Key": {"X-API-Key": b"\xff\xfe" + DEFAULT_KEY.encode()},
        "key of other streams": {"X-API-Key": OTHER_STREAMS_KEY},
        "bearer, every stream": {"Authorization": f"Bearer {ALL_STREAMS_KEY}"},
        "X-API-Key, stream default": {"X-API-Key": DEFAULT_KEY},
    }
    async with in_process_client(model=model_path, method="none", api_keys=key_file) as (client, app):
        predict = {name: await client.post("/predict", files=image, headers=h) for name, h in sent.items()}
        prediction_id = predict["bearer, every stream"].json()["predictions"][0]["id"]
        feedback = {
            name: await client.post("/feedback", json={"id": prediction_id, "label": 3}, headers=h)
            for name, h in sent.items()
        }
        open_routes = [(await client.get(path)).status_code for path in ("/healthz", "/readyz", "/v1/status")]
        schemes = (await client.get("/openapi.json")).json()["components"]["securitySchemes"]
        credentials = repr(app.state.credentials)
    expected = {
        "no key": (401, "unauthorized"),
        "wrong key": (403, "forbidden"),
        "wrong bearer": (403, "forbidden"),
        "not a bearer": (401, "unauthorized"),
        "non-ASCII bearer": (400, "invalid_header"),
        "non-ASCII X-API-Key": (400, "invalid_header"),
        "key of other streams": (403, "forbidden"),
        "bearer, every stream": (200, None),
        "X-API-Key, stream default": (200, None),
    }
    got = {name: (r.status_code, r.json().get("error")) for name, r in predict.items()}
    assert got == expected
    # The second key's feedback comes after the first one labelled the prediction: 409, past authentication.
    expected_feedback = {**expected, "X-API-Key, stream default": (409, "already_labelled")}
    assert {name: (r.status_code, r.json().get("error")) for name, r in feedback.items()} == expected_feedback
    assert predict["no key"].headers["WWW-Authenticate"] == "Bearer"
    assert "stream 'default'" in predict["key of other streams"].json()["detail"]
    assert open_routes == [200, 200, 200]
    assert {"admin_token", "api_key_bearer", "api_key_header"} <= schemes.keys()  # documented in /docs
    for key in KEY_FILES_KEYS:  # only digests are kept
        assert key not in credentials


async def test_without_a_key_file_predict_needs_no_key(model_path: Path) -> None:
    async with in_process_client(model=model_path, method="none") as (client, _):
        response = await client.post("/predict", files=[("files", ("a.png", make_png(), "image/png"))])
    assert response.status_code == 200, response.text


# ----------------------------------------------------------------------------------------------- no leaks


def test_real_server_never_shows_the_token_or_a_key_in_logs_status_metrics_or_errors(
    model_path: Path, key_file: Path, tmp_path: Path
) -> None:
    """Real uvicorn at its most verbose log level, right and wrong secrets on every guarded route."""
    token = "admin-" + secrets.token_urlsafe(24)
    wrong = {"token": "wrong-admin-" + secrets.token_urlsafe(16), "key": "wrong-key-" + secrets.token_urlsafe(16)}
    log = tmp_path / "server.log"
    env = {"TTA_MODEL": str(model_path), "TTA_METHOD": "none", "TTA_ADMIN_TOKEN": token, "TTA_API_KEYS": str(key_file)}
    bodies = []
    with running_server(env, log_level="trace", log=log) as (url, _), httpx.Client(base_url=url, timeout=30) as client:

        def call(method: str, path: str, expected: int, **kwargs: object) -> httpx.Response:
            response = client.request(method, path, **kwargs)
            assert response.status_code == expected, (path, response.text)
            bodies.append(response.text)
            return response

        image = {"files": [("files", ("a.png", make_png(), "image/png"))]}
        call("POST", "/predict", 401, **image)
        call("POST", "/predict", 403, headers={"X-API-Key": wrong["key"]}, **image)
        call("POST", "/predict", 403, headers={"Authorization": f"Bearer {wrong['key']}"}, **image)
        call("POST", "/predict", 403, headers={"X-API-Key": OTHER_STREAMS_KEY}, **image)
        answer = call("POST", "/predict", 200, headers={"Authorization": f"Bearer {ALL_STREAMS_KEY}"}, **image)
        labelled = {"id": answer.json()["predictions"][0]["id"], "label": 1}
        call("POST", "/feedback", 403, headers={"X-API-Key": wrong["key"]}, json=labelled)
        call("POST", "/feedback", 200, headers={"X-API-Key": DEFAULT_KEY}, json=labelled)
        call("POST", "/feedback", 404, headers={"X-API-Key": DEFAULT_KEY}, json={"id": "f" * 32, "label": 1})
        call("POST", "/reset", 401)
        call("POST", "/reset", 401, headers={"X-API-Key": token})  # the token is no API key, and vice versa
        call("POST", "/reset", 403, headers={"Authorization": f"Bearer {wrong['token']}"})
        call("POST", "/reset", 403, headers={"Authorization": f"Bearer {ALL_STREAMS_KEY}"})
        call("POST", "/reset", 200, headers={"Authorization": f"Bearer {token}"})
        status = call("GET", "/v1/status", 200).text
        metrics = call("GET", "/metrics", 200).text
    text = log.read_text()
    assert "POST /reset" in text, "the log holds no access lines: the check below would prove nothing"
    outputs = {"log": text, "status": status, "metrics": metrics, **{f"body {i}": b for i, b in enumerate(bodies)}}
    secret_values = [token, *KEY_FILES_KEYS, *wrong.values()]
    for secret in secret_values + [hashlib.sha256(s.encode()).hexdigest() for s in secret_values]:
        leaks = [where for where, output in outputs.items() if secret in output]
        assert not leaks, f"a secret appears in {leaks}"
    assert json.loads(status)["method"] == "none"
