"""HTTP load generator for POST /predict (ours or a peer): real CIFAR-10 JPEGs as multipart `files` parts.

Two loops, both bounded in requests and in time, both loopback-only by default:

- closed: N clients, each sends its next request as soon as the previous one is answered;
- open: Poisson arrivals at a given rate (requests/s), whatever the server's speed. Latency is measured from
  the *scheduled* arrival, so a generator that falls behind shows up as latency, not as a lower offered load
  (no coordinated omission); arrivals that find `--max-in-flight` requests outstanding are not sent and are
  counted as errors under "client_overload".

Reported: requests/s, images/s (answered 2xx), latency p50/p90/p99/max, errors by status (or exception name),
the mean batch size from the server's /metrics (delta of tta_batch_size_sum / tta_batch_size_count over the run;
n/a for a server without them) and the generator's own CPU use (a generator near 1.0 core is the bottleneck).

    python -m bench.load --url http://127.0.0.1:8000 --closed 32 --requests 2000 --duration 30
    python -m bench.load --url http://127.0.0.1:8000 --open 200 --requests 4000 --duration 20 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import random
import ssl
import sys
import time
import uuid
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg" / "test.zip"


# ----- payloads -----


def load_jpegs(archive: Path | str = DEFAULT_DATA, limit: int = 1000, seed: int = 0) -> list[tuple[str, bytes]]:
    """`limit` JPEG members of the archive (test/<class>/NNNN.jpg), shuffled with `seed`, as (name, bytes)."""
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith((".jpg", ".jpeg")))
        if not names:
            raise ValueError(f"{archive} holds no JPEG member")
        random.Random(seed).shuffle(names)
        return [(n, zf.read(n)) for n in names[:limit]]


def multipart_body(files: list[tuple[str, bytes]], field_name: str = "files") -> tuple[str, bytes]:
    """(content type, body) of a multipart/form-data request with one file part per image.

    Encoded once, up front, so the generator spends its CPU on sending and not on re-encoding the same bytes.
    """
    boundary = uuid.uuid4().hex
    chunks = []
    for name, data in files:
        filename = name.rsplit("/", 1)[-1]
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode()
        )
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(chunks)


def build_bodies(images: list[tuple[str, bytes]], images_per_request: int, count: int = 256) -> list[tuple[str, bytes]]:
    """`count` distinct request bodies (or fewer when there are too few images), cycled through by the loops."""
    count = max(1, min(count, len(images) // images_per_request))
    return [multipart_body(images[i * images_per_request : (i + 1) * images_per_request]) for i in range(count)]


# ----- the server's batch-size histogram -----


def scrape_batch_stats(client: httpx.Client, url: str, metrics_path: str = "/metrics") -> tuple[float, float] | None:
    """(tta_batch_size_sum, tta_batch_size_count) from the server's Prometheus page; None when it has none."""
    try:
        response = client.get(url.rstrip("/") + metrics_path, timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("tta_batch_size_sum", "tta_batch_size_count"):
            values[name] = float(value.split()[0])
    if len(values) != 2:
        return None
    return values["tta_batch_size_sum"], values["tta_batch_size_count"]


def mean_batch_size(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


# ----- statistics -----


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 100]."""
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass
class LoadReport:
    mode: str  # closed | open
    url: str
    path: str
    concurrency: int | None  # closed loop
    rate: float | None  # open loop: offered requests/s
    images_per_request: int
    requests: int  # sent (or, open loop, scheduled): successes + errors
    successes: int
    errors: dict[str, int]
    images: int  # requests x images_per_request
    images_ok: int
    elapsed_s: float
    requests_per_s: float
    images_per_s: float  # answered (2xx) images per second
    latency_ms: dict[str, float | None]
    mean_batch_size: float | None
    stopped_by: str  # requests | duration
    client_cpu: float  # cores the generator itself used, on average
    max_schedule_lag_ms: float | None = None  # open loop: how late the generator sent its worst arrival
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def make_report(
    mode: str,
    args: dict,
    latencies: list[float],
    statuses: Counter,
    elapsed: float,
    stopped_by: str,
    batch: float | None,
    cpu: float,
    lag: float | None = None,
) -> LoadReport:
    successes = sum(n for s, n in statuses.items() if isinstance(s, int) and 200 <= s < 300)
    errors = {str(s): n for s, n in sorted(statuses.items(), key=str) if not (isinstance(s, int) and 200 <= s < 300)}
    requests = sum(statuses.values())
    ipr = args["images_per_request"]
    ordered = sorted(latencies)
    latency = {f"p{q}": percentile(ordered, q) for q in (50, 90, 99)}
    latency["max"] = ordered[-1] if ordered else None
    latency["mean"] = sum(ordered) / len(ordered) if ordered else None
    latency = {k: (round(v * 1000, 3) if v is not None else None) for k, v in latency.items()}
    elapsed = max(elapsed, 1e-9)
    return LoadReport(
        mode=mode,
        url=args["url"],
        path=args["path"],
        concurrency=args.get("concurrency"),
        rate=args.get("rate"),
        images_per_request=ipr,
        requests=requests,
        successes=successes,
        errors=errors,
        images=requests * ipr,
        images_ok=successes * ipr,
        elapsed_s=round(elapsed, 4),
        requests_per_s=round(requests / elapsed, 2),
        images_per_s=round(successes * ipr / elapsed, 2),
        latency_ms=latency,
        mean_batch_size=round(batch, 3) if batch is not None else None,
        stopped_by=stopped_by,
        client_cpu=round(cpu / elapsed, 3),
        max_schedule_lag_ms=round(lag * 1000, 3) if lag is not None else None,
        settings={k: v for k, v in args.items() if k not in ("url", "path")},
    )


# ----- the loops -----


def check_loopback(url: str) -> None:
    """Refuse any target but this machine: the generator is for loopback benchmarks only."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"refusing to send load to {host!r}: only loopback addresses (127.0.0.0/8, ::1) are allowed")


async def _send(
    client: httpx.AsyncClient, target: str, body: tuple[str, bytes], stream: str | None = None
) -> int | str:
    headers = {"content-type": body[0], **({"X-TTA-Stream": stream} if stream else {})}
    try:
        response = await client.post(target, content=body[1], headers=headers)
        await response.aread()
        return response.status_code
    except httpx.HTTPError as error:
        return type(error).__name__


_SSL_CONTEXT: ssl.SSLContext | None = None


def _client(timeout_s: float) -> httpx.AsyncClient:
    """One keep-alive connection per client. httpx's shared pool costs O(connections) CPU per request: with 64
    connections in one pool the generator burned ~13 ms of CPU per request (a saturated core at ~75 req/s) where
    64 single-connection clients spend ~1.5 ms each, so every simulated user gets its own client. They share one
    SSL context: httpx builds (and loads CA certificates into) a new one per client otherwise, ~20-40 ms of CPU
    each, which made the open loop's generator the bottleneck whenever it had to add clients."""
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.AsyncClient(limits=limits, timeout=timeout_s, trust_env=False, verify=_SSL_CONTEXT)


@dataclass
class Sample:
    """One answer of the open loop: when it was scheduled (time.perf_counter()), its status, its latency in s."""

    scheduled: float
    status: int | str
    latency_s: float


def _tally(status: int | str, since: float, statuses: Counter, latencies: list[float]) -> None:
    """Count the answer's status; a 2xx answer also gives a latency, from `since`."""
    statuses[status] += 1
    if isinstance(status, int) and 200 <= status < 300:
        latencies.append(time.perf_counter() - since)


async def closed_loop(
    url: str,
    bodies: list[tuple[str, bytes]],
    concurrency: int,
    max_requests: int,
    duration_s: float,
    timeout_s: float = 30.0,
    path: str = "/predict",
    streams: int = 0,
) -> tuple[list[float], Counter, float, str]:
    """`concurrency` clients back to back; stops issuing at `max_requests` or `duration_s`, whichever first.
    With `streams`, client k sends its requests in stream `stream-{k % streams}` (X-TTA-Stream).

    Returns (latencies of 2xx answers in s, statuses, elapsed s, what stopped it).
    """
    target = url.rstrip("/") + path
    latencies: list[float] = []
    statuses: Counter = Counter()
    issued = 0
    stopped = {"by": "requests"}
    start = time.perf_counter()
    deadline = start + duration_s

    async def one_client(k: int) -> None:
        nonlocal issued
        stream = f"stream-{k % streams}" if streams else None
        async with _client(timeout_s) as client:
            while issued < max_requests:
                if time.perf_counter() >= deadline:
                    stopped["by"] = "duration"
                    return
                body = bodies[issued % len(bodies)]
                issued += 1
                sent = time.perf_counter()
                _tally(await _send(client, target, body, stream), sent, statuses, latencies)

    await asyncio.gather(*(one_client(k) for k in range(concurrency)))
    return latencies, statuses, time.perf_counter() - start, stopped["by"]


async def open_loop(
    url: str,
    bodies: list[tuple[str, bytes]],
    rate: float,
    max_requests: int,
    duration_s: float,
    timeout_s: float = 30.0,
    path: str = "/predict",
    max_in_flight: int = 512,
    seed: int = 0,
    samples: list[Sample] | None = None,
) -> tuple[list[float], Counter, float, str, float]:
    """Poisson arrivals at `rate`/s; at most `max_requests` arrivals, none scheduled after `duration_s`.

    Each arrival takes an idle single-connection client (a new one when none is idle, up to `max_in_flight`).
    Returns (latencies of 2xx answers from the scheduled arrival, statuses, elapsed s, what stopped it,
    worst lateness of a send in s). With `samples`, every answer is also appended to it, whatever its status.
    """
    target = url.rstrip("/") + path
    rng = random.Random(seed)
    latencies: list[float] = []
    statuses: Counter = Counter()
    in_flight: set[asyncio.Task] = set()
    idle: list[httpx.AsyncClient] = []
    clients: list[httpx.AsyncClient] = []
    max_lag = 0.0
    stopped = "requests"

    async def one(client: httpx.AsyncClient, scheduled: float, body: tuple[str, bytes]) -> None:
        try:
            status = await _send(client, target, body)
        finally:
            idle.append(client)
        _tally(status, scheduled, statuses, latencies)
        if samples is not None:
            samples.append(Sample(scheduled, status, time.perf_counter() - scheduled))

    start = time.perf_counter()
    try:
        offset = 0.0
        for i in range(max_requests):
            offset += rng.expovariate(rate)
            if offset > duration_s:
                stopped = "duration"
                break
            scheduled = start + offset
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            max_lag = max(max_lag, time.perf_counter() - scheduled)
            if len(in_flight) >= max_in_flight:
                statuses["client_overload"] += 1
                continue
            if not idle:
                clients.append(_client(timeout_s))
                idle.append(clients[-1])
            task = asyncio.create_task(one(idle.pop(), scheduled, bodies[i % len(bodies)]))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.gather(*in_flight)
    finally:
        for client in clients:
            await client.aclose()
    return latencies, statuses, time.perf_counter() - start, stopped, max_lag


def run_load(
    url: str,
    *,
    closed: int | None = None,
    rate: float | None = None,
    requests: int = 1000,
    duration_s: float = 30.0,
    images_per_request: int = 1,
    path: str = "/predict",
    metrics_path: str = "/metrics",
    timeout_s: float = 30.0,
    warmup: int = 0,
    max_in_flight: int = 512,
    data: Path | str = DEFAULT_DATA,
    images: list[tuple[str, bytes]] | None = None,
    seed: int = 0,
    streams: int = 0,
) -> LoadReport:
    """One bounded run (closed loop when `closed` is given, open loop when `rate` is) and its report."""
    if (closed is None) == (rate is None):
        raise ValueError("give exactly one of closed (concurrency) or rate (open loop)")
    if closed is not None and closed < 1:
        raise ValueError("closed-loop concurrency must be >= 1")
    if rate is not None and rate <= 0:
        raise ValueError("open-loop rate must be > 0")
    if requests < 1 or duration_s <= 0:
        raise ValueError("requests must be >= 1 and duration > 0: every run is bounded")
    if streams and closed is None:
        raise ValueError("streams are for the closed loop only")
    check_loopback(url)
    images = images if images is not None else load_jpegs(data, limit=max(1000, 256 * images_per_request), seed=seed)
    bodies = build_bodies(images, images_per_request)
    args = {
        "url": url,
        "path": path,
        "concurrency": closed,
        "rate": rate,
        "images_per_request": images_per_request,
        "max_requests": requests,
        "duration_s": duration_s,
        "timeout_s": timeout_s,
        "warmup": warmup,
        "streams": streams,
    }
    if warmup:
        asyncio.run(closed_loop(url, bodies, closed or 8, warmup, max(duration_s, 10.0), timeout_s, path, streams))
    with httpx.Client(trust_env=False) as sync_client:
        before = scrape_batch_stats(sync_client, url, metrics_path)
        cpu = time.process_time()
        lag = None
        if closed is not None:
            latencies, statuses, elapsed, stopped = asyncio.run(
                closed_loop(url, bodies, closed, requests, duration_s, timeout_s, path, streams)
            )
        else:
            args["max_in_flight"] = max_in_flight
            latencies, statuses, elapsed, stopped, lag = asyncio.run(
                open_loop(url, bodies, rate, requests, duration_s, timeout_s, path, max_in_flight, seed)
            )
        cpu = time.process_time() - cpu
        after = scrape_batch_stats(sync_client, url, metrics_path)
    mode = "closed" if closed is not None else "open"
    return make_report(mode, args, latencies, statuses, elapsed, stopped, mean_batch_size(before, after), cpu, lag)


# ----- output -----


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(reports: list[LoadReport]) -> str:
    """A plain-text table, one row per run."""
    header = (
        f"{'mode':6} {'load':>8} {'reqs':>6} {'ok':>6} {'req/s':>8} {'img/s':>8} {'p50 ms':>8} {'p90 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8} {'batch':>6} {'cli cpu':>7}  errors"
    )
    rows = [header, "-" * len(header)]
    for r in reports:
        load = f"c={r.concurrency}" if r.mode == "closed" else f"{r.rate:g}/s"
        lat = r.latency_ms
        errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "-"
        rows.append(
            f"{r.mode:6} {load:>8} {r.requests:>6} {r.successes:>6} {r.requests_per_s:>8.1f} {r.images_per_s:>8.1f} "
            f"{_fmt(lat['p50']):>8} {_fmt(lat['p90']):>8} {_fmt(lat['p99']):>8} {_fmt(lat['max']):>8} "
            f"{_fmt(r.mean_batch_size):>6} {r.client_cpu:>7.2f}  {errors}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    parser.add_argument("--path", default="/predict", help="route that takes the multipart POST")
    parser.add_argument("--metrics-path", default="/metrics", help="Prometheus page with tta_batch_size_*")
    loop = parser.add_mutually_exclusive_group(required=True)
    loop.add_argument("--closed", type=int, metavar="N", help="closed loop with N concurrent clients")
    loop.add_argument("--open", type=float, metavar="RATE", help="open loop, Poisson arrivals at RATE requests/s")
    parser.add_argument("--requests", type=int, default=2000, help="at most this many requests (bound)")
    parser.add_argument("--duration", type=float, default=30.0, help="stop issuing after this many seconds (bound)")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s")
    parser.add_argument("--warmup", type=int, default=0, help="requests sent (closed loop) before measuring")
    parser.add_argument("--max-in-flight", type=int, default=512, help="open loop: outstanding requests cap")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="zip of test/<class>/NNNN.jpg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--streams", type=int, default=0, help="closed loop: client k sends in stream k mod N")
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    try:
        report = run_load(
            args.url,
            closed=args.closed,
            rate=args.open,
            requests=args.requests,
            duration_s=args.duration,
            images_per_request=args.images_per_request,
            path=args.path,
            metrics_path=args.metrics_path,
            timeout_s=args.timeout,
            warmup=args.warmup,
            max_in_flight=args.max_in_flight,
            data=args.data,
            seed=args.seed,
            streams=args.streams,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table([report]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
