"""Slow clients: how many connections trickling one byte a second `tta serve` holds while it serves others.

For each step, a separate process holds N connections that send a request one byte a second (its headers, or a
body after prompt headers) and opens a new one whenever the server closes one, so N stay open whatever the read
timeouts; meanwhile one normal client posts one real CIFAR-10 JPEG at a time to /predict and times it. Past
TTA_MAX_CONNECTIONS (uvicorn's limit_concurrency) the normal client is answered 503: the bound keeps the server's
resources bounded, and the read timeouts (TTA_HEADER_TIMEOUT_S, TTA_BODY_TIMEOUT_S) are what make each slow
connection cost at most that long. The server takes its TTA_ settings from this process's environment.

Writes docs/reliability/<name>.json and <name>.md.

    python -m bench.slow_clients
    python -m bench.slow_clients --headers 0,250,500,1000,2000 --bodies 500,1000 --measure-s 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from bench.load import build_bodies, closed_loop, load_jpegs, percentile
from bench.overload import server_settings
from bench.speed import cpu_seconds, machine_busy_seconds, running

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "reliability"
HEAD = b"POST /predict HTTP/1.1\r\nHost: tta\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"


async def _until_closed(reader: asyncio.StreamReader) -> None:
    """Returns when the server closes the connection (it may reset it: the rest of the request is unread)."""
    with contextlib.suppress(ConnectionError):
        await reader.read()


async def _hold(port: int, count: int, mode: str, opened: Synchronized, closed: Synchronized) -> None:
    """`count` connections, each sending a byte a second (starts spread over a second), each reopened when the
    server closes it."""

    async def one(offset_s: float) -> None:
        await asyncio.sleep(offset_s)
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(1)
                continue
            opened.value += 1
            if mode == "body":
                writer.write(HEAD)
            payload = HEAD if mode == "headers" else b"{" * 100_000
            with_eof = asyncio.create_task(_until_closed(reader))
            for byte in payload:
                if with_eof.done():
                    break
                writer.write(bytes([byte]))
                await asyncio.wait([with_eof], timeout=1.0)
            writer.close()
            closed.value += 1

    await asyncio.gather(*(one(i / count) for i in range(count)))


def hold(port: int, count: int, mode: str, opened: Synchronized, closed: Synchronized) -> None:
    asyncio.run(_hold(port, count, mode, opened, closed))


def step(url: str, port: int, bodies: list, count: int, mode: str, args: argparse.Namespace, pid: int) -> dict:
    """One measurement: `count` slow connections held (after a ramp), the normal client's latency meanwhile."""
    opened, closed = multiprocessing.Value("q", 0, lock=False), multiprocessing.Value("q", 0, lock=False)
    holder = multiprocessing.Process(target=hold, args=(port, count, mode, opened, closed), daemon=True)
    if count:
        holder.start()
        deadline = time.monotonic() + 30
        while opened.value < count and time.monotonic() < deadline:
            time.sleep(0.2)
    time.sleep(args.ramp_s)
    held = opened.value - closed.value
    busy, served, closed_before = machine_busy_seconds(), cpu_seconds(pid), closed.value
    latencies, statuses, elapsed, _ = asyncio.run(closed_loop(url, bodies, 1, 100_000, args.measure_s, 30))
    row = {
        "mode": mode,
        "slow_connections": count,
        "held_at_start": held,
        "held_at_end": opened.value - closed.value,
        "closed_by_server_per_s": round((closed.value - closed_before) / elapsed, 1),
        "normal_requests": sum(statuses.values()),
        "normal_statuses": {str(k): v for k, v in Counter(statuses).items()},
        "normal_latency_ms": {f"p{q}": _ms(percentile(sorted(latencies), q)) for q in (50, 99)},
        "server_cpu": round((cpu_seconds(pid) - served) / elapsed, 2),
        "machine_cpu": round((machine_busy_seconds() - busy) / elapsed, 2),
    }
    if count:
        holder.kill()
        holder.join()
        time.sleep(args.ramp_s)  # the server notices the closed connections
    print(row, flush=True)
    return row


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 1) if seconds is not None else None


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], name: str) -> str:
    lines = [
        f"## Slow clients ({name})",
        "",
        f"`{meta['command']}`: {meta['machine']}; placement {meta['placement']}; settings from the environment: "
        f"{meta['settings'] or 'defaults'} (header timeout 10 s, body timeout 20 s, 1,024 connections by default). "
        "Each slow connection sends one byte a second and is reopened when the server closes it; a normal client "
        "posts one JPEG at a time meanwhile. The machine is shared: absolute latencies are noisy.",
        "",
        "| slow connections | sending | held (start / end) | closed by the server /s | normal requests | "
        "normal p50 ms | normal p99 ms | normal answers | server CPU |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        lat = r["normal_latency_ms"]
        lines.append(
            f"| {r['slow_connections']} | {r['mode']} | {r['held_at_start']} / {r['held_at_end']} | "
            f"{r['closed_by_server_per_s']} | {r['normal_requests']} | {lat['p50']} | {lat['p99']} | "
            f"{r['normal_statuses']} | {r['server_cpu']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_clients", description=__doc__.split("\n\n")[0])
    parser.add_argument("--headers", default="0,250,500,1000,2000", help="slow-header connection counts")
    parser.add_argument("--bodies", default="500,1000", help="slow-body connection counts")
    parser.add_argument("--measure-s", type=float, default=8.0)
    parser.add_argument("--ramp-s", type=float, default=2.0)
    parser.add_argument("--placement", choices=("pinned", "unpinned"), default="pinned")
    parser.add_argument("--name", default="slow_clients")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default" / "cifar10_resnet20.safetensors")
    args = parser.parse_args(argv)
    pinned = args.placement == "pinned" and (os.cpu_count() or 1) >= 2
    plan = [(int(n), "headers") for n in args.headers.split(",") if n] + [
        (int(n), "body") for n in args.bodies.split(",") if n
    ]
    bodies = build_bodies(load_jpegs(limit=256), 1)
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="tta-slow-") as workdir,
        running("ours-tent", args.model, pinned, Path(workdir)) as server,
    ):
        if pinned:  # the server is on core 0 (bench.speed.running); the clients take core 1
            os.sched_setaffinity(0, {1})
        port = int(server.url.rsplit(":", 1)[1])
        asyncio.run(closed_loop(server.url, bodies, 1, 50, 10, 30))  # warm-up
        for count, mode in plan:
            rows.append(step(server.url, port, bodies, count, mode, args, server.process.pid))
    meta = {
        "command": "python -m bench.slow_clients"
        + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "placement": "server on core 0 with one torch thread, clients on core 1" if pinned else "unpinned",
        "settings": server_settings(),
    }
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (DOCS / f"{args.name}.md").write_text(markdown(rows, meta, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
