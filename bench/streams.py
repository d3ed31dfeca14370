"""Per-stream adaptation (issue #15): accuracy of interleaved streams, throughput over many streams, bytes per stream.

Five parts, each saved as JSON in bench/results/streams/ when it finishes (a part already saved is skipped unless
--force), and `report` gathers them into docs/streams/streams.json and streams.md:

- interleaved: 4 streams, each a continual CIFAR-10-C stream (bench.stream's quick profile: 500 images per
  corruption, severity 5) with the 15 corruptions in the standard order rotated by 0, 4, 8 and 12, posted to a
  real `tta serve` on loopback (default settings) by 4 concurrent clients, one per stream, each sending its
  stream's images in order, 16 per request with their labels. Three conditions, each on a fresh server:
  `per-stream` (each client sends X-TTA-Stream), `shared` (no header: every stream in `default`) and `alone`
  (each stream on its own, one after the other, under its own name: a fresh state that nothing else touches).
- throughput: saturated images/s through HTTP with 1, 8 and 64 active streams, the same total load (a closed
  loop of N clients; request i goes to stream i mod S), requests of 1 image and of 16.
- inprocess: the model thread's own work per batch (`ModelWorker._predict` + its snapshots), 64 images over 1, 8
  and 64 streams, and a cProfile of it with 64 streams.
- memory: the bytes of one stream's state for the default model and torchvision's resnet50 (1,000 classes).
- rss: the resident memory each new default-model stream adds, in-process (glibc's heap, with or without a
  MALLOC_ setting in the environment).

    python -m bench.streams interleaved
    python -m bench.streams throughput
    python -m bench.streams inprocess
    python -m bench.streams memory
    python -m bench.streams rss && MALLOC_MMAP_THRESHOLD_=65536 python -m bench.streams rss --name rss-mmap
    python -m bench.streams report --out docs/streams

Set OMP_NUM_THREADS=1 on a shared machine: the server inherits it, and this process uses one torch thread. The
server and the in-process engines are whatever code this file sits in: for a published run, a clean export of a
commit (`git archive <commit> | tar -x -C DIR`, the commit id in DIR/BENCH_COMMIT, bench/cache linked in, and
--results-dir and --data pointing back), so that others' unfinished edits in a working tree are not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench.corruptions import CORRUPTIONS, DEFAULT_DATA
from bench.load import _client, load_jpegs, multipart_body, percentile, scrape_batch_stats
from bench.speed import cpu_seconds, machine_busy_seconds, running
from bench.stream import (
    DEFAULT_CACHE,
    DEFAULT_MODEL,
    PROFILES,
    SHORT_NAMES,
    Pool,
    Stream,
    _media_type,
    batches,
    build_stream,
    ensure_corrupted,
    load_pool,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results" / "streams"
STREAM_HEADER = "X-TTA-Stream"
ROTATIONS = (0, 4, 8, 12)  # each stream's corruption order: the standard one rotated by this many
CONDITIONS = ("per-stream", "shared", "alone")
STREAM_COUNTS = (1, 8, 64)
SEVERITY = 5


def stream_name(index: int) -> str:
    return f"s{index}"


def machine_state() -> dict[str, Any]:
    """The load average now: the machine is shared, and every figure here should be read with it."""
    one, five, fifteen = os.getloadavg()
    return {"loadavg_1_5_15": [round(one, 2), round(five, 2), round(fifteen, 2)], "cpus": os.cpu_count()}


def code_version() -> dict[str, Any]:
    """The code measured: a commit, and whether the server's code (app/, models/) differed from it. Others edit the
    working tree while benchmarks run, so a published run is made from a clean export (`git archive`) of a commit,
    which carries that commit's id in BENCH_COMMIT."""
    import subprocess

    marker = REPO_ROOT / "BENCH_COMMIT"
    if marker.exists():
        return {"commit": marker.read_text().strip(), "tree": "clean export of the commit"}
    git = ["git", "-C", str(REPO_ROOT)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "app", "models"], capture_output=True, text=True)
    return {"commit": commit, "tree": "working tree", "uncommitted": dirty.stdout.split("\n")[:-1]}


def save(name: str, record: dict[str, Any]) -> Path:
    record = {**record, "code": code_version()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)  # a killed run leaves the whole record or none
    return path


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


@contextlib.contextmanager
def tta_server(workdir: Path) -> Iterator[Any]:
    """A fresh `tta serve` (python -m app.cli serve) with the default settings and model, on a free loopback port."""
    with running("ours-tent", DEFAULT_MODEL, pinned=False, workdir=workdir) as server:
        yield server


# ---------------------------------------------------------------------------------------------------------------
# Interleaved: 4 continual streams, different corruption orders, through one server
# ---------------------------------------------------------------------------------------------------------------


def rotated_streams(pool: Pool, seed: int, rotations: Sequence[int] = ROTATIONS) -> list[Stream]:
    """One continual stream per rotation. Within a corruption the images come in bench.stream's `continual` order
    (which depends only on the seed and the corruption), so stream 0 is exactly that scenario."""
    continual = build_stream("continual", pool, seed)
    per_domain = [continual.order[continual.domain == d] for d in range(len(pool.names))]
    streams = []
    for rotation in rotations:
        domains = [(d + rotation) % len(pool.names) for d in range(len(pool.names))]
        order = np.concatenate([per_domain[d] for d in domains])
        streams.append(Stream("continual", pool, order, [(0, len(order))]))
    return streams


@dataclass
class StreamRun:
    predictions: np.ndarray
    requests: int
    retries_503: int
    wall_s: float


async def post_stream(url: str, stream: Stream, name: str | None, images_per_request: int) -> StreamRun:
    """One client: the stream's images in order, `images_per_request` per request with their labels, one request
    in flight (so the server sees them in order); a 503 (overloaded) is sent again after its Retry-After."""
    headers = {STREAM_HEADER: name} if name is not None else {}
    predictions = np.full(len(stream), -1, dtype=np.int64)
    requests = retries = 0
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300.0, headers=headers, trust_env=False) as client:
        for start, end in batches((0, len(stream)), images_per_request):
            files = [
                ("files", (f"{start + i}.png", p, _media_type(p))) for i, p in enumerate(stream.payloads(start, end))
            ]
            data = {"labels": ",".join(str(int(label)) for label in stream.labels[start:end])}
            while True:
                response = await client.post("/predict", files=files, data=data)
                if response.status_code != 503:
                    break
                retries += 1
                await asyncio.sleep(float(response.headers.get("Retry-After") or 0.1))
            if response.status_code != 200:
                raise RuntimeError(f"POST /predict answered {response.status_code}: {response.text[:300]}")
            predictions[start:end] = [p["class_index"] for p in response.json()["predictions"]]
            requests += 1
    return StreamRun(predictions, requests, retries, time.perf_counter() - started)


def stream_errors(stream: Stream, predictions: np.ndarray) -> dict[str, Any]:
    correct = predictions == stream.labels
    domain = stream.domain
    order = [stream.pool.names[d] for d in dict.fromkeys(domain.tolist())]  # corruptions in this stream's order
    per_corruption = {
        name: round(100 * (1 - float(correct[domain == stream.pool.names.index(name)].mean())), 3) for name in order
    }
    return {
        "corruption_order": order,
        "per_corruption_error": per_corruption,
        "mean_error": round(float(np.mean(list(per_corruption.values()))), 3),
        "overall_error": round(100 * (1 - float(correct.mean())), 3),
        "predictions_u8": base64.b64encode(predictions.astype(np.uint8).tobytes()).decode(),
    }


def server_streams(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/streams", timeout=30, trust_env=False)
    response.raise_for_status()
    return {s["stream"]: s for s in response.json()["streams"]}


def run_condition(condition: str, streams: list[Stream], images_per_request: int, workdir: Path) -> dict[str, Any]:
    """One condition on a fresh server; what each stream's client saw and what the server says of each stream."""
    names = [stream_name(i) for i in range(len(streams))]
    before = machine_state()
    with tta_server(workdir) as server:
        url = server.url
        with httpx.Client(trust_env=False) as probe:
            batches_before = scrape_batch_stats(probe, url)
        cpu_before, busy_before = cpu_seconds(server.process.pid), machine_busy_seconds()
        started = time.perf_counter()
        if condition == "alone":
            runs = [
                asyncio.run(post_stream(url, s, n, images_per_request)) for s, n in zip(streams, names, strict=True)
            ]
        else:
            header = condition == "per-stream"

            async def together() -> list[StreamRun]:
                return await asyncio.gather(
                    *(
                        post_stream(url, s, n if header else None, images_per_request)
                        for s, n in zip(streams, names, strict=True)
                    )
                )

            runs = asyncio.run(together())
        wall_s = time.perf_counter() - started
        server_cpu = cpu_seconds(server.process.pid) - cpu_before
        busy = machine_busy_seconds() - busy_before
        with httpx.Client(trust_env=False) as probe:
            batches_after = scrape_batch_stats(probe, url)
        seen = server_streams(url)
    per_stream = {}
    for stream, name, run in zip(streams, names, runs, strict=True):
        own = seen.get(name if condition != "shared" else "default", {})
        per_stream[name] = {
            **stream_errors(stream, run.predictions),
            "requests": run.requests,
            "retries_503": run.retries_503,
            "client_wall_s": round(run.wall_s, 1),
            # the server's own figures for the stream the images went to (`default` for all four when shared)
            "server": {k: own.get(k) for k in ("steps_total", "resets", "skipped", "prequential")},
        }
    mean_batch = None
    if batches_before and batches_after and batches_after[1] > batches_before[1]:
        mean_batch = (batches_after[0] - batches_before[0]) / (batches_after[1] - batches_before[1])
    return {
        "condition": condition,
        "images_per_request": images_per_request,
        "clients": len(streams) if condition != "alone" else 1,
        "streams": per_stream,
        "mean_of_streams": round(float(np.mean([s["mean_error"] for s in per_stream.values()])), 3),
        "wall_s": round(wall_s, 1),
        "images_per_s": round(sum(len(s) for s in streams) / wall_s, 1),
        "mean_batch": round(mean_batch, 2) if mean_batch is not None else None,
        "server_cpu_cores": round(server_cpu / wall_s, 2),
        "other_cpu_cores": round(max(busy - server_cpu, 0.0) / wall_s, 2),  # this client included
        "machine_before": before,
        "machine_after": machine_state(),
    }


def interleaved(args: argparse.Namespace) -> None:
    per_class = args.limit_per_class if args.limit_per_class is not None else PROFILES[args.profile]
    paths = ensure_corrupted(list(CORRUPTIONS), SEVERITY, per_class, DEFAULT_CACHE, args.data)
    pool = load_pool(paths, per_class, with_payloads=True)
    streams = rotated_streams(pool, args.seed)
    print(f"{len(streams)} streams of {len(streams[0]):,} images", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        for condition in args.conditions.split(","):
            name = f"interleaved-{condition}"
            if load(name) is not None and not args.force:
                print(f"skip {name} (saved)", flush=True)
                continue
            record = run_condition(condition, streams, args.images_per_request, Path(tmp))
            record.update(profile=args.profile, images_per_class=per_class, severity=SEVERITY, seed=args.seed)
            record.update(rotations=list(ROTATIONS), images_per_stream=len(streams[0]))
            save(name, record)
            errors = ", ".join(f"{n} {s['mean_error']:.2f}" for n, s in record["streams"].items())
            print(
                f"{condition:>10}: {errors}; mean {record['mean_of_streams']:.2f}%  {record['wall_s']:.0f}s", flush=True
            )


# ---------------------------------------------------------------------------------------------------------------
# Throughput over HTTP: 1, 8, 64 streams, the same closed-loop load
# ---------------------------------------------------------------------------------------------------------------


async def closed_loop_streams(
    url: str, bodies: list[tuple[str, bytes]], streams: list[str], concurrency: int, duration_s: float
) -> tuple[int, Counter, list[float], float]:
    """`concurrency` clients back to back for `duration_s`; request i goes to streams[i % len(streams)].
    Returns (requests answered 200, statuses, their latencies in s, elapsed s)."""
    target = f"{url}/predict"
    statuses: Counter = Counter()
    latencies: list[float] = []
    issued = 0
    deadline = time.perf_counter() + duration_s
    started = time.perf_counter()

    async def one_client() -> None:
        nonlocal issued
        async with _client(60.0) as client:
            while time.perf_counter() < deadline:
                index, issued = issued, issued + 1
                content_type, body = bodies[index % len(bodies)]
                headers = {"content-type": content_type, STREAM_HEADER: streams[index % len(streams)]}
                sent = time.perf_counter()
                try:
                    response = await client.post(target, content=body, headers=headers)
                    await response.aread()
                    statuses[response.status_code] += 1
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - sent)
                except httpx.HTTPError as error:
                    statuses[type(error).__name__] += 1

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return statuses[200], statuses, latencies, time.perf_counter() - started


def measure_load(
    server: Any,
    bodies: list[tuple[str, bytes]],
    streams: list[str],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
) -> dict[str, Any]:
    images_per_request = bodies[0][1].count(b'name="files"')
    asyncio.run(closed_loop_streams(server.url, bodies, streams, concurrency, warmup_s))
    with httpx.Client(trust_env=False) as probe:
        batches_before = scrape_batch_stats(probe, server.url)
        cpu_before, busy_before, own_before = (
            cpu_seconds(server.process.pid),
            machine_busy_seconds(),
            time.process_time(),
        )
        ok, statuses, latencies, elapsed = asyncio.run(
            closed_loop_streams(server.url, bodies, streams, concurrency, duration_s)
        )
        server_cpu = cpu_seconds(server.process.pid) - cpu_before
        own_cpu = time.process_time() - own_before
        busy = machine_busy_seconds() - busy_before
        batches_after = scrape_batch_stats(probe, server.url)
    latencies.sort()
    mean_batch = None
    if batches_before and batches_after and batches_after[1] > batches_before[1]:
        mean_batch = (batches_after[0] - batches_before[0]) / (batches_after[1] - batches_before[1])
    return {
        "streams": len(streams),
        "images_per_request": images_per_request,
        "concurrency": concurrency,
        "images_per_s": round(ok * images_per_request / elapsed, 1),
        "requests_ok": ok,
        "errors": {str(k): v for k, v in statuses.items() if k != 200},
        "p50_ms": round(1000 * (percentile(latencies, 50) or 0), 1),
        "p99_ms": round(1000 * (percentile(latencies, 99) or 0), 1),
        "mean_batch": round(mean_batch, 2) if mean_batch is not None else None,
        "server_cpu_cores": round(server_cpu / elapsed, 2),
        "client_cpu_cores": round(own_cpu / elapsed, 2),
        "other_cpu_cores": round(max(busy - server_cpu - own_cpu, 0.0) / elapsed, 2),
        "loadavg_1": round(os.getloadavg()[0], 2),
    }


def throughput(args: argparse.Namespace) -> None:
    if load("throughput") is not None and not args.force:
        print("skip throughput (saved)", flush=True)
        return
    images = load_jpegs(args.data, limit=4096, seed=0)
    sizes = [int(s) for s in args.images_per_request.split(",")]
    bodies = {size: [multipart_body(images[i * size : (i + 1) * size]) for i in range(256)] for size in sizes}
    # The same images in flight for every request size (concurrency x images per request), two full batches.
    concurrency = {size: max(1, args.in_flight // size) for size in sizes}
    counts = [int(c) for c in args.stream_counts.split(",")]
    rows: list[dict[str, Any]] = []
    before = machine_state()
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp, tta_server(Path(tmp)) as server:
        # Every stream created and past its first entropy step (64 images each), so that no run pays for creation.
        every = [stream_name(i) for i in range(max(counts))]
        warm = [multipart_body(images[i * 16 : (i + 1) * 16]) for i in range(64)]
        rss_mb = {"ready": server_rss_mb(server)}
        asyncio.run(closed_loop_streams(server.url, warm, every, 8, args.first_warmup))
        rss_mb[f"after warm-up of {len(every)} streams"] = server_rss_mb(server)
        for round_index in range(args.rounds):
            # Alternate the order between rounds, so that a slow drift of the machine falls on every count alike.
            order = counts if round_index % 2 == 0 else counts[::-1]
            for size in sizes:
                for count in order:
                    row = measure_load(
                        server, bodies[size], every[:count], concurrency[size], args.warmup, args.duration
                    )
                    row["round"] = round_index
                    rows.append(row)
                    print(
                        f"round {round_index} {size:>2} img/req {count:>2} streams: {row['images_per_s']:7.1f} img/s "
                        f"batch {row['mean_batch']} p50 {row['p50_ms']} ms errors {row['errors']} "
                        f"other cpu {row['other_cpu_cores']} load {row['loadavg_1']}",
                        flush=True,
                    )
        rss_mb["end"] = server_rss_mb(server)
    summary = []
    for size in sizes:
        base = statistics.median(
            r["images_per_s"] for r in rows if r["images_per_request"] == size and r["streams"] == 1
        )
        for count in counts:
            same = [r for r in rows if r["images_per_request"] == size and r["streams"] == count]
            median = statistics.median(r["images_per_s"] for r in same)
            summary.append(
                {
                    "images_per_request": size,
                    "streams": count,
                    "concurrency": concurrency[size],
                    "images_per_s_runs": [r["images_per_s"] for r in same],
                    "images_per_s_median": round(median, 1),
                    "ratio_to_one_stream": round(median / base, 3),
                    "mean_batch": [r["mean_batch"] for r in same],
                }
            )
    save(
        "throughput",
        {
            "rows": rows,
            "summary": summary,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "server_rss_mb": rss_mb,
            "machine_before": before,
            "machine_after": machine_state(),
        },
    )


def server_rss_mb(server: Any) -> float:
    with open(f"/proc/{server.process.pid}/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return round(kb / 1024, 1)


# ---------------------------------------------------------------------------------------------------------------
# In-process: the model thread's work per batch, and where it goes with 64 streams
# ---------------------------------------------------------------------------------------------------------------


def default_worker() -> tuple[Any, Any]:
    """A ModelWorker over StreamEngines as build_service makes them (default settings and model), not started:
    its jobs are called here on this thread, as its own thread would."""
    from app.adaptation.engine import AdaptationEngine
    from app.adaptation.streams import StreamEngines
    from app.config import Settings
    from app.serving.worker import ModelWorker
    from models.checkpoint import load_checkpoint

    model, card = load_checkpoint(DEFAULT_MODEL)
    settings = Settings(model=DEFAULT_MODEL, device="cpu").calibrated(card.source_distance_q99())
    device = torch.device("cpu")
    model = model.to(device)
    engines = StreamEngines(lambda: AdaptationEngine(model, card.num_classes, settings, device), settings.max_streams)
    return ModelWorker(engines, card.mean, card.std, settings.top_k), card


def corrupted_images(per_class: int, data: Path) -> torch.Tensor:
    """The quick pool's images (every corruption), shuffled: shifted data, as the streams bring."""
    paths = ensure_corrupted(list(CORRUPTIONS), SEVERITY, per_class, DEFAULT_CACHE, data)
    pool = load_pool(paths, per_class, with_payloads=False)
    return pool.images[torch.as_tensor(np.random.default_rng(0).permutation(len(pool.labels)))]


class BatchFeed:
    """Batches of 64 images from the pool, image j of a batch in stream j mod S (S streams: round robin)."""

    def __init__(self, images: torch.Tensor, batch: int = 64) -> None:
        self.images, self.batch, self.position = images, batch, 0

    def next(self, count: int) -> tuple[list[torch.Tensor], list[str]]:
        if self.position + self.batch > len(self.images):
            self.position = 0
        x = self.images[self.position : self.position + self.batch]
        self.position += self.batch
        # one request per image, as single-image requests arrive; the worker concatenates them
        return list(x.split(1)), [stream_name(j % count) for j in range(self.batch)]


def worker_job(worker: Any, images: list[torch.Tensor], streams: list[str]) -> None:
    """What the model thread does for one batch: the step and the output, then the snapshots of the streams used."""
    worker._predict(images, streams)
    worker._take_snapshots()


def time_streams_step(worker: Any, images: list[torch.Tensor], streams: list[str]) -> float:
    """StreamEngines.step alone on the batch (normalised as the worker does), for comparison with the whole job."""
    from models.data import normalize

    x = normalize(torch.cat(images), worker.mean, worker.std)
    started = time.perf_counter()
    worker.streams.step(x, streams)
    return time.perf_counter() - started


def inprocess(args: argparse.Namespace) -> None:
    if load("inprocess") is not None and not args.force:
        print("skip inprocess (saved)", flush=True)
        return
    torch.set_num_threads(1)
    worker, _ = default_worker()
    feed = BatchFeed(corrupted_images(PROFILES["quick"], args.data))
    counts = [int(c) for c in args.stream_counts.split(",")]
    # Every stream past its first step (64 of its images), so that no measurement pays for creation or Adam's state.
    for _ in range(max(counts)):
        worker_job(worker, *feed.next(max(counts)))
    before = machine_state()
    job_s: dict[int, list[float]] = {c: [] for c in counts}
    step_s: dict[int, list[float]] = {c: [] for c in counts}
    # Blocks of `block` consecutive batches per count, a multiple of 64: every stream gets a multiple of 64 images
    # in a block, so each block holds exactly its share of entropy steps (with 64 streams of one image per batch, all
    # 64 streams step in the same batch, once per 64 batches). The counts alternate block by block and round by
    # round, so that the machine's drift falls on all of them alike.
    for round_index in range(args.rounds):
        for count in counts if round_index % 2 == 0 else counts[::-1]:
            for _ in range(args.block):
                images, streams = feed.next(count)
                started = time.perf_counter()
                worker_job(worker, images, streams)
                job_s[count].append(time.perf_counter() - started)
            for _ in range(args.block):
                step_s[count].append(time_streams_step(worker, *feed.next(count)))
    rows = []
    for count in counts:
        rows.append(
            {
                "streams": count,
                "batches": len(job_s[count]),
                "worker_job_images_per_s": round(64 * len(job_s[count]) / sum(job_s[count]), 1),
                "streams_step_images_per_s": round(64 * len(step_s[count]) / sum(step_s[count]), 1),
                "worker_job_ms_median": round(1000 * statistics.median(job_s[count]), 1),
            }
        )
        print(rows[-1], flush=True)
    profile = profile_worker(worker, feed, max(counts), args.profile_batches)
    save(
        "inprocess",
        {"rows": rows, "profile": profile, "machine_before": before, "machine_after": machine_state(), "threads": 1},
    )


# Functions whose cumulative time splits the 64-stream job into what it does (they do not nest in one another).
PHASES = {
    "shared forward pass (mixed_forward)": ("norm.py", "mixed_forward"),
    "entropy steps on buffered images (_buffer_and_maybe_step)": ("methods/tent.py", "_buffer_and_maybe_step"),
    "statistics commit (BatchMoments.commit)": ("adaptation/norm.py", "commit"),
    "admission guards: plausibility, class pace (Guards.admission)": ("adaptation/guards.py", "admission"),
    "rollback rows of the statistics (BatchMoments.rows)": ("adaptation/norm.py", "rows"),
    # (with the buffered steps' own points, and the lag's copy of the state into its twin: these nest in the steps)
    "rollback point clone (AdaptationState.checkpoint)": ("state.py", "checkpoint"),
    "collapse monitor and drift (_after_batch)": ("methods/tent.py", "_after_batch"),
    "per-stream snapshots after the batch (StreamEngines.snapshots)": ("streams.py", "snapshots"),
    "output: softmax, top-k, lists (rest of ModelWorker._answer)": None,
}


def profile_worker(worker: Any, feed: BatchFeed, count: int, batches_: int) -> dict[str, Any]:
    """cProfile of the worker's job with `count` streams over whole multiples of 64 batches."""
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for _ in range(batches_):
        worker_job(worker, *feed.next(count))
    profiler.disable()
    wall = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    entries = stats.stats  # type: ignore[attr-defined]  # {(file, line, function): (cc, nc, tottime, cumtime, ...)}
    total = sum(tt for _, _, tt, _, _ in entries.values())

    def cumulative(file_end: str, function: str) -> float:
        return sum(v[3] for k, v in entries.items() if k[0].endswith(file_end) and k[2] == function)

    job = cumulative("bench/streams.py", "worker_job")
    answer = cumulative("serving/worker.py", "_answer")
    predict = cumulative("adaptation/streams.py", "predict")
    phases = {}
    for label, where in PHASES.items():
        if where is None:
            phases[label] = answer - predict
        else:
            phases[label] = cumulative(*where)
    # what else StreamEngines.step does: creating the per-stream lists, indexing each stream's rows, engine.step's own
    phases["other (dispatch, indexing, the engines' own lines)"] = job - sum(phases.values())
    top = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)[:20]
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return {
        "streams": count,
        "batches": batches_,
        "wall_s": round(wall, 2),
        "profiled_images_per_s": round(64 * batches_ / wall, 1),
        "phases_pct": {k: round(100 * v / job, 1) for k, v in phases.items()},
        "top_tottime": [
            {
                "function": f"{Path(k[0]).name}:{k[1]}({k[2]})",
                "calls": v[1],
                "tottime_pct": round(100 * v[2] / total, 1),
                "cumtime_pct": round(100 * v[3] / job, 1),
            }
            for k, v in top
        ],
        "pstats_text": text.getvalue(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Bytes per stream
# ---------------------------------------------------------------------------------------------------------------


def _storages(tensors: Sequence[torch.Tensor]) -> dict[int, int]:
    """{storage address: bytes} of the tensors, each storage once (views share theirs)."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if torch.is_tensor(t)}


def _nested_tensors(value: Any) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _nested_tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _nested_tensors(v)]
    return []


# One per source, held by its `Source` and shared by all its streams (not per stream since they share it).
SHARED_RESET_POINT = "reset point (Source.initial: parameters + statistics), one per source"
SHARED_ANCHOR = "anchor's source parameters (Source.source_params), one per source"


def engine_parts(engine: Any) -> dict[str, list[torch.Tensor]]:
    """Every tensor an AdaptationEngine holds on its own, by what it is for (the frozen backbone is the source's)."""
    from app.adaptation.norm import TestTimeBatchNorm

    statistics = [
        b for m in engine.adapted.modules() if isinstance(m, TestTimeBatchNorm) for b in (m.class_mean, m.class_sqmean)
    ]
    monitor = engine.state.monitor
    return {
        "adapted parameters (norm weight and bias)": list(engine.params),
        "class-balanced statistics (2 moments x rows x channels)": statistics,
        "other tensors of the adapted copy": list(engine.adapted.parameters()) + list(engine.adapted.buffers()),
        SHARED_RESET_POINT: _nested_tensors(engine.shared.initial),
        SHARED_ANCHOR: list(engine.shared.source_params),
        "optimizer state (Adam exp_avg, exp_avg_sq)": _nested_tensors(engine.state.optimizer.state_dict()["state"])
        if engine.state.optimizer is not None
        else [],
        "small-batch buffer": [t for x, mask in engine.state.buffer for t in (x, mask) if t is not None],
        "collapse monitor (window of per-batch probability sums)": [s for s, _ in monitor._probability_sums]
        + [monitor._window_sum],
    }


def state_breakdown(engine: Any, source: torch.nn.Module) -> dict[str, int]:
    """Bytes per part, each storage counted once (in the first part that holds it) and none of the source's."""
    seen = set(_storages([*source.parameters(), *source.buffers()]))
    shared_with_source = len(seen)
    breakdown = {}
    for part, tensors in engine_parts(engine).items():
        own = {ptr: n for ptr, n in _storages(tensors).items() if ptr not in seen}
        seen.update(own)
        breakdown[part] = sum(own.values())
    breakdown["_shared_source_storages"] = shared_with_source
    return breakdown


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trimmed_rss_bytes() -> int:
    """RSS once glibc has handed its free memory back (malloc_trim): freed activations of earlier steps otherwise
    stay resident in the heap, and say nothing of what the streams themselves hold."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


def measure_model(
    name: str, source: torch.nn.Module, num_classes: int, input_size: int, step_size: int, rss_streams: int
) -> dict[str, Any]:
    """One stream's state at rest (after entropy steps, buffer empty, monitor window as 64-image batches leave it)
    and at its worst (the buffer one image short of a step at the model's input size, the monitor window made of
    single-image batches), plus the RSS growth per stream over `rss_streams` streams as a cross-check.

    The steps run at `step_size` pixels (a resnet50 takes any size): the state does not depend on the input size,
    except the buffer, which is filled at the model's own `input_size`."""
    from app.adaptation.engine import AdaptationEngine
    from app.config import Settings

    # Default settings but for three guards that hold no state: random inputs (and a resnet50's random weights) give
    # near-uniform predictions and features far from the source's, which the reliability, class-balance and
    # plausibility guards rightly refuse to step on, and Adam's state exists only after a step. The path is not read.
    settings = Settings(
        model=DEFAULT_MODEL, device="cpu", guard_reliable=False, guard_balance=False, guard_plausible=False
    )
    source = source.eval()
    generator = torch.Generator().manual_seed(0)

    first: list[Any] = []

    def new_stream() -> Any:
        # every stream after the first shares its Source (frozen model, reset point, anchor), as StreamEngines does
        engine = (
            first[0].sharing_source() if first else AdaptationEngine(source, num_classes, settings, torch.device("cpu"))
        )
        first[:1] = [first[0] if first else engine]
        for _ in range(2):  # two full batches: Adam's state exists, statistics and parameters moved
            engine.step(torch.randn(settings.min_batch, 3, step_size, step_size, generator=generator))
        if engine.stats.steps_since_reset != 2 or not engine.state.optimizer.state:
            raise RuntimeError(f"{name}: the two entropy steps did not happen ({engine.snapshot()['skipped']})")
        return engine

    # RSS per stream first, streams created and stepped one after another and all kept, after one stream made
    # beforehand (the allocator's arenas then already hold a step's activations, which every step reuses)
    kept = [new_stream()]
    rss_before = rss_bytes()
    trimmed_before = trimmed_rss_bytes()
    for _ in range(rss_streams):
        kept.append(new_stream())
    rss_per_stream = (rss_bytes() - rss_before) / rss_streams
    trimmed_per_stream = (trimmed_rss_bytes() - trimmed_before) / rss_streams
    engine = kept[-1]
    for _ in range(settings.diversity_window // settings.min_batch):  # the window full of 64-image batches
        engine.state.monitor.observe(torch.randn(settings.min_batch, num_classes, generator=generator), torch.zeros(1))
    at_rest = state_breakdown(engine, source)
    # worst case: 2,048 single-image batches fill the diversity window with one entry each, then 63 images buffered
    for _ in range(settings.diversity_window):
        engine.state.monitor.observe(torch.randn(1, num_classes, generator=generator), torch.zeros(1))
    engine.state.buffer.clear()
    engine.step(torch.randn(settings.min_batch - 1, 3, input_size, input_size, generator=generator))
    worst = state_breakdown(engine, source)
    shared = at_rest.pop("_shared_source_storages")
    worst.pop("_shared_source_storages")
    return {
        "model": name,
        "num_classes": num_classes,
        "input_size": input_size,
        "source_bytes": sum(p.numel() * p.element_size() for p in [*source.parameters(), *source.buffers()]),
        "source_storages_shared": shared,
        "adapted_parameters": sum(p.numel() for p in kept[0].params),
        "stat_rows": _stat_rows(kept[0]),
        "bn_channels": sum(p.numel() for p in kept[0].params) // 2,
        "at_rest_bytes": at_rest,
        "at_rest_total": sum(at_rest.values()),
        # what one more stream costs: all but the parts its Source holds once for every stream
        "at_rest_per_stream": sum(at_rest.values()) - at_rest[SHARED_RESET_POINT] - at_rest[SHARED_ANCHOR],
        "worst_per_stream": sum(worst.values()) - worst[SHARED_RESET_POINT] - worst[SHARED_ANCHOR],
        "worst_bytes": worst,
        "worst_total": sum(worst.values()),
        "rss_streams": rss_streams,
        "rss_per_stream_bytes": int(rss_per_stream),
        "trimmed_rss_per_stream_bytes": int(trimmed_per_stream),
    }


def _stat_rows(engine: Any) -> int:
    from app.adaptation.norm import TestTimeBatchNorm

    return next(len(m.class_mean) for m in engine.adapted.modules() if isinstance(m, TestTimeBatchNorm))


def memory(args: argparse.Namespace) -> None:
    if load("memory") is not None and not args.force:
        print("skip memory (saved)", flush=True)
        return
    import torchvision

    from models.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    default, card = load_checkpoint(DEFAULT_MODEL)
    rows = [measure_model("default (CIFAR-10 ResNet-20)", default, card.num_classes, 32, 32, 64)]
    print(json.dumps(rows[-1], indent=1), flush=True)
    torch.manual_seed(0)
    resnet50 = torchvision.models.resnet50(num_classes=1000)  # random weights: sizes are what is measured
    rows.append(measure_model("torchvision resnet50, 1,000 classes", resnet50, 1000, 224, 32, 8))
    print(json.dumps(rows[-1], indent=1), flush=True)
    save("memory", {"rows": rows, "machine": machine_state()})


def rss_growth(args: argparse.Namespace) -> None:
    """RSS of this process as default-model streams are created, each stepped twice (as the server does when new
    streams arrive between other streams' steps), from `--from` streams to `--to`; saved under the name given, so
    that a run with a malloc setting in the environment (MALLOC_MMAP_THRESHOLD_=65536) sits beside one without."""
    from app.adaptation.engine import AdaptationEngine
    from app.config import Settings
    from models.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    source, card = load_checkpoint(DEFAULT_MODEL)
    settings = Settings(model=DEFAULT_MODEL, device="cpu", guard_reliable=False, guard_balance=False)
    settings = settings.calibrated(card.source_distance_q99())
    source.eval()
    generator = torch.Generator().manual_seed(0)
    kept, rss = [], {}
    for count in range(1, args.to + 1):
        engine = AdaptationEngine(source, card.num_classes, settings, torch.device("cpu"))
        for _ in range(2):
            engine.step(torch.randn(settings.min_batch, 3, 32, 32, generator=generator))
        kept.append(engine)
        if count in (args.start, args.to):
            rss[count] = rss_bytes()
    per_stream = (rss[args.to] - rss[args.start]) / (args.to - args.start)
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"{malloc_env or 'no MALLOC_ setting'}: {per_stream / 1e6:.2f} MB of RSS per stream", flush=True)
    save(args.name, {"malloc_env": malloc_env, "rss_bytes": rss, "rss_per_stream_bytes": int(per_stream)})


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def markdown() -> str:
    lines: list[str] = []
    inter = {c: load(f"interleaved-{c}") for c in CONDITIONS}
    if all(inter.values()):
        first = inter["per-stream"]
        lines += [
            "### Interleaved: 4 streams through one server",
            "",
            f"Prequential error % (mean over the 15 corruptions, severity {first['severity']}, "
            f"{first['images_per_class']} images per class and corruption: {first['images_per_stream']:,} images per "
            f"stream), {first['images_per_request']} images per request with their labels.",
            "",
            "| stream | corruption order (rotation) | alone | per-stream | shared | per-stream - alone | target |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for index, name in enumerate(first["streams"]):
            alone = inter["alone"]["streams"][name]["mean_error"]
            own = inter["per-stream"]["streams"][name]["mean_error"]
            shared = inter["shared"]["streams"][name]["mean_error"]
            order = first["streams"][name]["corruption_order"]
            hit = abs(own - alone) <= 0.5 and own < shared
            lines.append(
                f"| {name} | {SHORT_NAMES[order[0]]} ... {SHORT_NAMES[order[-1]]} ({ROTATIONS[index]}) | {alone:.2f} "
                f"| **{own:.2f}** | {shared:.2f} | {own - alone:+.2f} | {'hit' if hit else 'miss'} |"
            )
        lines.append(
            f"| mean | | {inter['alone']['mean_of_streams']:.2f} | **{inter['per-stream']['mean_of_streams']:.2f}** "
            f"| {inter['shared']['mean_of_streams']:.2f} | "
            f"{inter['per-stream']['mean_of_streams'] - inter['alone']['mean_of_streams']:+.2f} | |"
        )
        lines += ["", "| condition | wall s | images/s | mean batch | server CPU | other CPU | load avg before/after |"]
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for condition, record in inter.items():
            lines.append(
                f"| {condition} | {record['wall_s']:.0f} | {record['images_per_s']:.1f} | {record['mean_batch']} "
                f"| {record['server_cpu_cores']} | {record['other_cpu_cores']} "
                f"| {record['machine_before']['loadavg_1_5_15'][0]} / {record['machine_after']['loadavg_1_5_15'][0]} |"
            )
        lines.append("")
    tput = load("throughput")
    if tput:
        lines += [
            "### Throughput through HTTP",
            "",
            "| images per request | concurrency | streams | images/s (median of rounds) | rounds | vs 1 stream "
            "| mean batch | target |",
            "| ---: | ---: | ---: | ---: | --- | ---: | --- | --- |",
        ]
        for row in tput["summary"]:
            target = ("hit" if row["ratio_to_one_stream"] >= 0.8 else "miss") if row["streams"] == 64 else ""
            lines.append(
                f"| {row['images_per_request']} | {row['concurrency']} | {row['streams']} | "
                f"**{row['images_per_s_median']:.1f}** | {' / '.join(str(v) for v in row['images_per_s_runs'])} "
                f"| {100 * row['ratio_to_one_stream']:.0f}% | {' / '.join(str(v) for v in row['mean_batch'])} "
                f"| {target} |"
            )
        lines.append("")
    inproc = load("inprocess")
    if inproc:
        lines += [
            "### In-process: the model thread's work per batch of 64 images",
            "",
            "| streams | worker job img/s | StreamEngines.step img/s | median job ms |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for row in inproc["rows"]:
            lines.append(
                f"| {row['streams']} | {row['worker_job_images_per_s']} | {row['streams_step_images_per_s']} "
                f"| {row['worker_job_ms_median']} |"
            )
        profile = inproc["profile"]
        lines += [
            "",
            f"Where the job's time goes with {profile['streams']} streams (cProfile, {profile['batches']} batches):",
            "",
        ]
        lines += ["| phase | % of the job |", "| --- | ---: |"]
        lines += [f"| {k} | {v} |" for k, v in profile["phases_pct"].items()]
        lines += [
            "",
            "| function (own time) | calls | own % | cumulative % of the job |",
            "| --- | ---: | ---: | ---: |",
        ]
        lines += [
            f"| `{e['function']}` | {e['calls']:,} | {e['tottime_pct']} | {e['cumtime_pct']} |"
            for e in profile["top_tottime"][:15]
        ]
        lines.append("")
    mem = load("memory")
    if mem:
        parts = list(mem["rows"][0]["at_rest_bytes"])
        lines += [
            "### Bytes per stream",
            "",
            "| part (MB) | " + " | ".join(f"{r['model']} at rest | worst" for r in mem["rows"]) + " |",
            "| --- |" + " ---: | ---: |" * len(mem["rows"]),
        ]
        for part in parts:
            cells = [f"{_mb(r['at_rest_bytes'][part])} | {_mb(r['worst_bytes'][part])}" for r in mem["rows"]]
            lines.append(f"| {part} | " + " | ".join(cells) + " |")
        totals = [f"**{_mb(r['at_rest_total'])}** | **{_mb(r['worst_total'])}**" for r in mem["rows"]]
        lines.append("| **total** | " + " | ".join(totals) + " |")
        if all("at_rest_per_stream" in r for r in mem["rows"]):
            each = [f"**{_mb(r['at_rest_per_stream'])}** | **{_mb(r['worst_per_stream'])}**" for r in mem["rows"]]
            lines.append("| **per stream** (the total less what the source holds once) | " + " | ".join(each) + " |")
        rss = [f"{_mb(r['rss_per_stream_bytes'])} ({r['rss_streams']} streams) | " for r in mem["rows"]]
        lines.append("| RSS growth per stream | " + " | ".join(rss) + " |")
        trimmed = [f"{_mb(r['trimmed_rss_per_stream_bytes'])} | " for r in mem["rows"]]
        lines.append("| RSS growth per stream after malloc_trim | " + " | ".join(trimmed) + " |")
        lines.append("")
    return "\n".join(lines)


def report(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    combined: dict[str, Any] = {}
    for name in [*(f"interleaved-{c}" for c in CONDITIONS), "throughput", "inprocess", "memory", "rss", "rss-mmap"]:
        record = load(name)
        if record is None:
            continue
        if name.startswith("interleaved"):  # the predictions stay in bench/results; the docs keep the figures
            record = json.loads(json.dumps(record))
            for stream in record["streams"].values():
                stream.pop("predictions_u8", None)
        if name == "inprocess":
            record = {**record, "profile": {k: v for k, v in record["profile"].items() if k != "pstats_text"}}
        combined[name] = record
    combined["agreement_per_stream_vs_alone"] = agreement()
    (args.out / "streams.json").write_text(json.dumps(combined, indent=1) + "\n")
    (args.out / "streams.md").write_text(markdown() + "\n")
    print(f"wrote {args.out / 'streams.json'} and {args.out / 'streams.md'}")


def agreement() -> dict[str, float] | None:
    """Share of images each stream predicts the same with per-stream state as alone (1.0: the same predictions)."""
    own, alone = load("interleaved-per-stream"), load("interleaved-alone")
    if own is None or alone is None:
        return None
    result = {}
    for name, stream in own["streams"].items():
        a = np.frombuffer(base64.b64decode(stream["predictions_u8"]), dtype=np.uint8)
        b = np.frombuffer(base64.b64decode(alone["streams"][name]["predictions_u8"]), dtype=np.uint8)
        result[name] = round(float((a == b).mean()), 5)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="clean CIFAR-10 test.zip")
    parser.add_argument("--force", action="store_true", help="run again what is saved")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where each part is saved")
    parts = parser.add_subparsers(dest="part", required=True)

    p = parts.add_parser("interleaved", help="4 streams, per-stream / shared / alone")
    p.add_argument("--profile", choices=list(PROFILES), default="quick")
    p.add_argument("--limit-per-class", type=int, default=None, help="override the profile's images per class")
    p.add_argument("--images-per-request", type=int, default=16)
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=interleaved)

    p = parts.add_parser("throughput", help="saturated images/s with 1, 8, 64 streams through HTTP")
    p.add_argument("--stream-counts", default=",".join(map(str, STREAM_COUNTS)))
    p.add_argument("--images-per-request", default="1,16")
    p.add_argument("--in-flight", type=int, default=128, help="images in flight: concurrency x images per request")
    p.add_argument("--duration", type=float, default=20.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=4.0, help="seconds of the same load before each run")
    p.add_argument("--first-warmup", type=float, default=40.0, help="seconds of 16-image requests to every stream")
    p.add_argument("--rounds", type=int, default=2)
    p.set_defaults(run=throughput)

    p = parts.add_parser("inprocess", help="the worker's job per batch with 1, 8, 64 streams, and its profile")
    p.add_argument("--stream-counts", default=",".join(map(str, STREAM_COUNTS)))
    p.add_argument("--block", type=int, default=64, help="consecutive batches per count (a multiple of 64)")
    p.add_argument("--rounds", type=int, default=2, help="blocks per count, the counts alternating")
    p.add_argument("--profile-batches", type=int, default=128)
    p.set_defaults(run=inprocess)

    p = parts.add_parser("memory", help="bytes of one stream's state: default model and resnet50")
    p.set_defaults(run=memory)

    p = parts.add_parser("rss", help="RSS per default-model stream created amid steps (heap fragmentation)")
    p.add_argument("--from", dest="start", type=int, default=16)
    p.add_argument("--to", type=int, default=64)
    p.add_argument("--name", default="rss", help="saved as <name>.json")
    p.set_defaults(run=rss_growth)

    p = parts.add_parser("report", help="docs/streams/streams.json and streams.md from the saved parts")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "streams")
    p.set_defaults(run=report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    global RESULTS
    RESULTS = args.results_dir  # save() and load() read it
    if "OMP_NUM_THREADS" not in os.environ:
        print("note: OMP_NUM_THREADS is unset; on a shared machine set it to 1 (the server inherits it)", flush=True)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
