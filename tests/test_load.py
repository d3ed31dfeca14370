"""The load generator (bench/load.py) against a real server: consistent counts, batch size read from /metrics,
and both loops stop at their bounds. Tiny bounds: the whole module takes a few seconds after the server is up."""

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.requests import Request

from bench.load import check_loopback, load_jpegs, main, multipart_body, percentile, run_load
from tests.servers import running_server


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[str]:
    with running_server({"TTA_MODEL": str(model_path), "TTA_METHOD": "tent"}) as (url, _):
        yield url


@pytest.fixture(scope="module")
def images(test_zip: Path) -> list[tuple[str, bytes]]:
    return load_jpegs(test_zip, limit=64)


def assert_consistent(report, images_per_request: int) -> None:
    assert report.requests == report.successes + sum(report.errors.values())
    assert report.images == report.requests * images_per_request
    assert report.images_ok == report.successes * images_per_request
    assert report.successes > 0, report.errors
    lat = report.latency_ms
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


def test_closed_loop_counts_and_batch_size(server: str, images: list) -> None:
    report = run_load(server, closed=4, requests=24, duration_s=30, images_per_request=2, images=images)
    assert report.mode == "closed" and report.concurrency == 4
    assert report.stopped_by == "requests"
    assert report.requests == 24 and report.successes == 24, report.errors
    assert_consistent(report, 2)
    assert report.mean_batch_size is not None and report.mean_batch_size >= 2  # two images per request
    assert report.images_per_s > 0 and report.requests_per_s > 0


def test_closed_loop_stops_at_its_duration(server: str, images: list) -> None:
    started = time.monotonic()
    report = run_load(server, closed=2, requests=10**6, duration_s=1.0, images=images)
    assert report.stopped_by == "duration"
    assert 0 < report.requests < 10**6
    assert_consistent(report, 1)
    assert time.monotonic() - started < 15  # 1 s of issuing + in-flight answers + two /metrics scrapes


def test_open_loop_counts_and_batch_size(server: str, images: list) -> None:
    report = run_load(server, rate=60, requests=30, duration_s=30, images=images)
    assert report.mode == "open" and report.rate == 60
    assert report.stopped_by == "requests"
    assert report.requests == 30
    assert_consistent(report, 1)
    assert report.mean_batch_size is not None and report.mean_batch_size > 0
    assert report.max_schedule_lag_ms is not None


def test_open_loop_stops_at_its_duration(server: str, images: list) -> None:
    started = time.monotonic()
    report = run_load(server, rate=20, requests=10**6, duration_s=1.0, images=images)
    assert report.stopped_by == "duration"
    assert 0 < report.requests < 100  # about 20 arrivals in 1 s
    assert_consistent(report, 1)
    assert time.monotonic() - started < 15


def test_server_without_batch_metrics_reports_na(server: str, images: list) -> None:
    report = run_load(server, closed=1, requests=3, duration_s=10, metrics_path="/no-such-page", images=images)
    assert report.mean_batch_size is None
    assert report.successes == 3


def test_errors_are_counted_by_status(server: str, images: list) -> None:
    report = run_load(server, closed=2, requests=6, duration_s=10, path="/no-such-route", images=images)
    assert report.successes == 0 and report.errors == {"404": 6}
    assert report.requests == 6 and report.latency_ms["p50"] is None


def test_cli_writes_json(server: str, test_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "load.json"
    argv = ["--url", server, "--closed", "2", "--requests", "8", "--duration", "20", "--data", str(test_zip)]
    assert main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["requests"] == 8 and report["successes"] == 8
    assert "img/s" in capsys.readouterr().out


def test_refuses_non_loopback_targets() -> None:
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://192.168.1.2"):
        with pytest.raises(ValueError, match="loopback"):
            check_loopback(url)
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000", "http://127.0.0.2"):
        check_loopback(url)
    with pytest.raises(ValueError, match="loopback"):
        run_load("http://10.0.0.1:8000", closed=1, requests=1, duration_s=1, images=[("a.jpg", b"x")])


def test_multipart_body_parses_as_files(images: list) -> None:
    content_type, body = multipart_body(images[:3])

    async def parse() -> list[tuple[str, bytes]]:
        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode())]}
        form = await Request(scope, receive).form()
        return [(f.filename, await f.read()) for f in form.getlist("files")]

    parsed = asyncio.run(parse())
    assert parsed == [(name.rsplit("/", 1)[-1], data) for name, data in images[:3]]
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([], 99) is None
