"""Real processes for integration tests: the server under uvicorn, and a Prometheus server scraping it.

Everything binds to 127.0.0.1 on free ports and is stopped (SIGTERM) when the context exits.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ok(url: str, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode} before {url} answered")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s")


@contextlib.contextmanager
def stopping(process: subprocess.Popen, log: Path) -> Iterator[None]:
    try:
        yield
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if os.environ.get("TTA_TEST_SHOW_LOGS"):
            print(log.read_text())


@contextlib.contextmanager
def running_server(
    env: dict[str, str] | None = None,
    log_level: str = "warning",
    log: Path | None = None,
    args: tuple[str, ...] = (),
    ready_timeout_s: float = 120,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`tta serve` in a subprocess, with `args` after its own flags; yields (base URL, process). Its output goes to
    `log` (a temporary file if None)."""
    port = free_port()
    log = log or Path(tempfile.mkdtemp(prefix="tta-server-")) / "server.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            log_level,
            *args,
        ],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    with stopping(process, log):
        wait_until_ok(f"{url}/readyz", ready_timeout_s, process)
        yield url, process


def prometheus_binary() -> str:
    """The `prometheus` binary; skipped with a reason where it cannot be had (fails under CI=true)."""
    binary = shutil.which("prometheus")
    if binary is None:
        reason = "Debian package 'prometheus' is not installed (make test installs it with apt-get where apt exists)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


@contextlib.contextmanager
def running_prometheus(target: str, rule_files: list[Path] = ()) -> Iterator[str]:
    """A Prometheus server scraping `target` (host:port) every second; yields its base URL."""
    binary = prometheus_binary()
    workdir = Path(tempfile.mkdtemp(prefix="tta-prometheus-"))
    rules = "".join(f"\n  - {p}" for p in rule_files)
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        + (f"rule_files:{rules}\n" if rule_files else "")
        + f"scrape_configs:\n  - job_name: tta\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    log = workdir / "prometheus.log"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    with stopping(process, log):
        wait_until_ok(f"{url}/-/ready", 60, process)
        yield url
    shutil.rmtree(workdir, ignore_errors=True)


def query(prometheus: str, promql: str) -> list[dict]:
    """An instant query's result vector."""
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@contextlib.asynccontextmanager
async def in_process_client(**settings: object) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """The app with its lifespan running, behind an httpx client that calls it in-process."""
    app = create_app(Settings(**settings))
    # asgi-lifespan's default 5 s per phase: a shutdown that settles a pending step and writes the snapshot took
    # longer on a CI machine running benchmarks beside the suite; the client's own timeout is 120 s.
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=120) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tta.test", timeout=120) as client:
            yield client, app


def metric_value(exposition: str, name: str, labels: str = "") -> float:
    """One sample from a Prometheus text exposition, e.g. metric_value(text, "tta_batch_size_count")."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in exposition.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    raise KeyError(f"{wanted} not in the exposition")
