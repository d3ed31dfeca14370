"""Slow clients against a real server (app/serving/http_timeouts.py and uvicorn's connection bound): a request
whose headers or body trickle in is cut off at its timeout, a prompt one is not, and connections past the bound
are answered 503."""

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import make_png
from tests.servers import running_server

TIMEOUT_S = 1.0
MAX_CONNECTIONS = 6
REQUEST_HEAD = b"POST /predict HTTP/1.1\r\nHost: tta\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[tuple[str, int]]:
    env = {
        "TTA_MODEL": str(model_path),
        "TTA_METHOD": "none",
        "TTA_HEADER_TIMEOUT_S": str(TIMEOUT_S),
        "TTA_BODY_TIMEOUT_S": str(TIMEOUT_S),
        "TTA_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    }
    with running_server(env) as (url, _):
        address = urlsplit(url)
        yield url, address.port


def trickle_until_closed(port: int, head: bytes, trickled: bytes, every_s: float = 0.1) -> tuple[bytes, float]:
    """Send `head` at once, then `trickled` a byte every `every_s`, reading meanwhile; returns (what the server
    sent, seconds from the connection until the server closed it). Fails if everything was sent first."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.monotonic()
        sock.sendall(head)
        received, sent = b"", 0
        while True:
            if select.select([sock], [], [], every_s)[0]:
                with contextlib.suppress(ConnectionResetError):
                    if chunk := sock.recv(65536):
                        received += chunk
                        continue
                return received, time.monotonic() - started
            assert sent < len(trickled), f"the server waited for all of it (got {received!r})"
            with contextlib.suppress(OSError):  # the server may close between select and send
                sock.send(trickled[sent : sent + 1])
            sent += 1


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(server: tuple[str, int]) -> None:
    with socket.create_connection(("127.0.0.1", server[1])) as sock:
        started = time.monotonic()
        sock.settimeout(10 * TIMEOUT_S)
        assert sock.recv(1) == b""
        seconds = time.monotonic() - started
    assert TIMEOUT_S * 0.9 <= seconds < TIMEOUT_S * 4


def test_headers_sent_a_byte_at_a_time_are_cut_off_without_an_answer(server: tuple[str, int]) -> None:
    received, seconds = trickle_until_closed(server[1], b"", REQUEST_HEAD)  # 9 s of headers at this pace
    assert received == b""
    assert TIMEOUT_S * 0.9 <= seconds < TIMEOUT_S * 4


def test_a_body_sent_a_byte_at_a_time_is_answered_408_and_closed(server: tuple[str, int]) -> None:
    received, seconds = trickle_until_closed(server[1], REQUEST_HEAD, b"x" * 200)  # 20 s of body at this pace
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"connection: close" in received.lower()
    assert TIMEOUT_S * 0.9 <= seconds < TIMEOUT_S * 4


def test_prompt_requests_on_a_kept_alive_connection_are_not_timed_while_answered(server: tuple[str, int]) -> None:
    with httpx.Client(base_url=server[0], timeout=30) as client:
        for _ in range(3):  # the same connection: the header deadline restarts after each answer
            response = client.post("/predict", files={"files": ("a.png", make_png(), "image/png")})
            assert response.status_code == 200
            time.sleep(TIMEOUT_S * 0.6)


def test_requests_past_the_connection_bound_are_answered_503(server: tuple[str, int]) -> None:
    idle = [socket.create_connection(("127.0.0.1", server[1])) for _ in range(MAX_CONNECTIONS)]
    try:
        response = httpx.get(f"{server[0]}/healthz", timeout=10)
    finally:
        for sock in idle:
            sock.close()
    assert response.status_code == 503
    time.sleep(0.2)  # the idle ones are gone: served again
    assert httpx.get(f"{server[0]}/healthz", timeout=10).status_code == 200
