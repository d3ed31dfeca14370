"""Prequential evaluation of a stream of corrupted CIFAR-10 images, in-process or through a running server.

Every image is predicted first and scored against its label after (the prediction comes from the forward pass
made before the update its batch causes), so an adapting model is scored on data it has not yet adapted to.

Scenarios (CIFAR-10-C at one severity, 5 by default):

- reset:      each corruption on its own, the engine reset between corruptions (TENT's protocol);
- continual:  the 15 corruptions one after another in the standard order, never reset (CoTTA's protocol);
- correlated: continual, but within each corruption the classes come in bursts drawn from a Dirichlet
              process with gamma 0.1 (RoTTA's non-i.i.d. sampler);
- mixed:      all corruptions shuffled together into one stream;
- recurring:  domains of random lengths (200 to 5,000 images, uniform) that come back: every corruption twice, in
              a random order with no domain twice in a row, drawn from --seed. Each visit takes the domain's next
              images, classes balanced (within one image), from a per-class queue over the pool, so a domain seen
              before comes back with other images until its pool is used up (then the queue starts over).

Two modes that must agree:

- in-process: the AdaptationEngine the server uses, fed batches of B images normalised as the worker does;
  one run per method (none, norm, tent-faithful = tent with every guard off, default = tent with its guards);
- --http URL: a client posts the stream to a running server (the PNG bytes from the zips, labels in the
  `labels` form field) and reads the server's own prequential figures from GET /v1/status at the end. It
  evaluates one method: whatever the server runs. With --concurrency 1 and --images-per-request equal to the
  server's TTA_MAX_BATCH_SIZE, the server forms the same batches as in-process, so the predictions are identical.

Each (scenario, method, batch size) run is saved as JSON in bench/results/<profile>/runs/ when it finishes and
skipped on the next invocation, so a killed run resumes; the markdown table, CSV and plots are rebuilt from all
saved runs at the end::

    python -m bench.stream --profile quick --scenarios continual --batch-sizes 64
    python -m bench.stream --http http://127.0.0.1:8000 --profile quick --scenarios continual \\
        --batch-sizes 64 --images-per-request 64 --concurrency 1
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import csv
import hashlib
import json
import os
import shutil
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, DEFAULT_DATA
from bench.corruptions import main as generate_corruptions
from bench.peers.anchors import ANCHOR_METHODS, anchor_available, anchor_settings, run_anchor

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO_ROOT / "bench" / "cache"
DEFAULT_RESULTS = REPO_ROOT / "bench" / "results"
DEFAULT_MODEL = REPO_ROOT / "models" / "default" / "cifar10_resnet20.safetensors"

NUM_CLASSES = 10  # CIFAR-10
PROFILES: dict[str, int | None] = {"quick": 50, "full": None}  # images per class and corruption (None: all)
SCENARIOS = ("reset", "continual", "correlated", "mixed", "recurring")
DEFAULT_SCENARIOS = SCENARIOS[:4]  # recurring is long (about 78,000 images): asked for by name
RECURRING_LENGTHS = (200, 5_000)  # the recurring stream's domain lengths, drawn uniformly (inclusive)
RECURRING_VISITS = 2  # each domain comes this many times
METHODS = ("none", "norm", "tent-faithful", "default")
DIRICHLET_GAMMA = 0.1  # RoTTA's setting for CIFAR
STORED_WINDOW = 500  # images per entry of a run's stored error sequence
SWITCH_WINDOW = 500  # "after a switch": the first this many images of each domain
SCENARIO_RESET = "domain"  # the reason recorded for the resets the `reset` scenario itself makes
CORRUPTION_SEED = 0  # bench.corruptions' default; part of each cached zip's comment

SHORT_NAMES = {
    "gaussian_noise": "gauss",
    "shot_noise": "shot",
    "impulse_noise": "impul",
    "defocus_blur": "defoc",
    "glass_blur": "glass",
    "motion_blur": "motn",
    "zoom_blur": "zoom",
    "snow": "snow",
    "frost": "frost",
    "fog": "fog",
    "brightness": "brit",
    "contrast": "contr",
    "elastic_transform": "elast",
    "pixelate": "pixel",
    "jpeg_compression": "jpeg",
    # held out (bench.corruptions.HELD_OUT), for choosing settings off the benchmark
    "speckle_noise": "speck",
    "gaussian_blur": "gblur",
    "spatter": "spatt",
    "saturate": "satur",
}


# ---------------------------------------------------------------------------------------------------------------
# Data: cached corrupted zips -> one pool of images -> a stream (an order over the pool) per scenario
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Pool:
    """Every image of every corruption, concatenated in corruption order."""

    images: torch.Tensor  # uint8 N x 3 x 32 x 32
    labels: np.ndarray  # int64 N
    domain: np.ndarray  # index into `names` of each image
    names: list[str]  # corruptions, in the standard order
    class_names: list[str]
    payloads: list[bytes] | None  # encoded bytes as stored in the zips, for HTTP mode


@dataclass
class Stream:
    """A scenario's order over the pool; the engine is reset between segments (only the `reset` scenario has >1)."""

    scenario: str
    pool: Pool
    order: np.ndarray  # pool index of each stream position
    segments: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.order)

    @property
    def labels(self) -> np.ndarray:
        return self.pool.labels[self.order]

    @property
    def domain(self) -> np.ndarray:
        return self.pool.domain[self.order]

    def images(self, start: int, end: int) -> torch.Tensor:
        return self.pool.images[torch.as_tensor(self.order[start:end])]

    def payloads(self, start: int, end: int) -> list[bytes]:
        if self.pool.payloads is None:
            raise ValueError("the pool was loaded without the encoded images (HTTP mode needs them)")
        return [self.pool.payloads[i] for i in self.order[start:end]]

    def boundaries(self) -> list[tuple[int, str]]:
        """(position, corruption) where each domain starts; empty when domains are interleaved (mixed)."""
        if self.scenario == "mixed":
            return []
        domain = self.domain
        starts = [0, *np.flatnonzero(np.diff(domain) != 0) + 1]
        return [(int(s), self.pool.names[domain[s]]) for s in starts]


def _cached_per_class(path: Path, name: str, severity: int) -> int:
    """Images per class in a cached zip made by bench.corruptions for (name, severity); 0 when unusable."""
    try:
        with zipfile.ZipFile(path) as archive:
            comment = json.loads(archive.comment or b"{}")
            counts = Counter(m.split("/")[-2] for m in archive.namelist() if m.endswith(".png"))
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError):
        return 0
    if comment != {"corruption": name, "severity": severity, "seed": CORRUPTION_SEED} or not counts:
        return 0
    return min(counts.values())


def _source_per_class(data: Path) -> int:
    with zipfile.ZipFile(data) as archive:
        counts = Counter(m.split("/")[-2] for m in archive.namelist() if m.startswith("test/") and m.endswith(".jpg"))
    return min(counts.values())


def ensure_corrupted(
    names: Sequence[str], severity: int, per_class: int | None, cache_dir: Path, data: Path = DEFAULT_DATA
) -> dict[str, Path]:
    """The cached zip of each corruption, generated by bench.corruptions where missing or too small.

    A zip holding more images per class than asked is used as is (load_zip takes the first N of each class,
    which are exactly the images a smaller zip would hold), so quick and full runs do not overwrite each other.
    """
    needed = per_class if per_class is not None else (_source_per_class(data) if data.is_file() else 0)
    paths = {name: cache_dir / f"{name}-{severity}.zip" for name in names}
    missing = [name for name in names if _cached_per_class(paths[name], name, severity) < max(needed, 1)]
    if missing:
        argv = ["--corruptions", ",".join(missing), "--severities", str(severity), "--out-dir", str(cache_dir)]
        argv += ["--data", str(data), "--seed", str(CORRUPTION_SEED)]
        if per_class is not None:
            argv += ["--limit-per-class", str(per_class)]
        if generate_corruptions(argv) != 0:
            raise RuntimeError(f"bench.corruptions failed for {missing}")
    return paths


def load_pool(paths: dict[str, Path], per_class: int | None, with_payloads: bool) -> Pool:
    from models.data import load_zip

    images, labels, domains, payloads = [], [], [], []
    class_names: list[str] | None = None
    for index, path in enumerate(paths.values()):
        image_set = load_zip(path, per_class)
        if class_names is not None and image_set.class_names != class_names:
            raise ValueError(f"{path} has classes {image_set.class_names}, the other zips {class_names}")
        class_names = image_set.class_names
        images.append(image_set.images)
        labels.append(image_set.labels.numpy())
        domains.append(np.full(len(image_set), index))
        if with_payloads:
            with zipfile.ZipFile(path) as archive:
                payloads += [archive.read(member) for member in image_set.members]
    return Pool(
        torch.cat(images),
        np.concatenate(labels),
        np.concatenate(domains),
        list(paths),
        class_names or [],
        payloads if with_payloads else None,
    )


def dirichlet_order(labels: np.ndarray, gamma: float, rng: np.random.Generator) -> np.ndarray:
    """A permutation of range(len(labels)) in which classes come in bursts, as RoTTA's sampler orders a domain.

    There are as many time slots as classes. Each class spreads its images over the slots with proportions drawn
    from Dirichlet(gamma, ..., gamma); a small gamma puts nearly all of a class in one or two slots. The slots
    are played in order and, within a slot, the classes' chunks in random order, so a slot is a run of one
    class, then another. (RoTTA keeps each class's images in dataset order; they are shuffled here first so that
    the order does not depend on how the zip sorts its files.)
    """
    classes = np.unique(labels)
    slots: list[list[np.ndarray]] = [[] for _ in classes]
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet([gamma] * len(slots))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for slot, chunk in zip(slots, np.split(members, cuts), strict=True):
            slot.append(chunk)
    order = [slot[i] for slot in slots for i in rng.permutation(len(slot))]
    return np.concatenate(order).astype(np.int64)


def recurring_plan(domains: int, seed: int) -> list[tuple[int, int]]:
    """(domain, length) of each segment of the recurring stream: every domain RECURRING_VISITS times, shuffled
    until no domain follows itself, lengths uniform in RECURRING_LENGTHS; both drawn from the seed."""
    rng = np.random.default_rng([seed, 3_000])
    visits = np.repeat(np.arange(domains), RECURRING_VISITS)
    for _ in range(10_000):
        order = rng.permutation(visits)
        if domains == 1 or not (np.diff(order) == 0).any():
            break
    else:  # unreachable for 2+ domains in practice; stated rather than looped forever
        raise RuntimeError("could not order the recurring domains without a repeat")
    lengths = rng.integers(RECURRING_LENGTHS[0], RECURRING_LENGTHS[1] + 1, size=len(order))
    return [(int(d), int(n)) for d, n in zip(order, lengths, strict=True)]


def recurring_order(pool: Pool, plan: list[tuple[int, int]], seed: int) -> np.ndarray:
    """Pool indexes for the plan: each segment takes length // C images of every class, the remainder from as
    many randomly chosen classes, each class's images from its own shuffled queue for that domain (consumed in
    order across visits, starting over when used up); the segment is then shuffled."""
    rng = np.random.default_rng([seed, 3_001])
    classes = np.unique(pool.labels)
    queues = {
        (d, c): rng.permutation(np.flatnonzero((pool.domain == d) & (pool.labels == c)))
        for d in range(len(pool.names))
        for c in classes
    }
    taken: Counter = Counter()
    parts = []
    for domain, length in plan:
        counts = np.full(len(classes), length // len(classes))
        counts[rng.choice(len(classes), length % len(classes), replace=False)] += 1
        segment = []
        for c, count in zip(classes, counts, strict=True):
            queue = queues[(domain, c)]
            positions = (taken[(domain, c)] + np.arange(count)) % len(queue)
            segment.append(queue[positions])
            taken[(domain, c)] += count
        parts.append(rng.permutation(np.concatenate(segment)))
    return np.concatenate(parts).astype(np.int64)


def build_stream(scenario: str, pool: Pool, seed: int) -> Stream:
    """The scenario's order over the pool; each domain's order depends only on (seed, domain), not on the others,
    so `reset` and `continual` see exactly the same images in the same order and differ only in the resets."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {', '.join(SCENARIOS)}")
    if scenario == "mixed":
        order = np.random.default_rng([seed, 1_000]).permutation(len(pool.labels))
        return Stream(scenario, pool, order, [(0, len(order))])
    if scenario == "recurring":
        order = recurring_order(pool, recurring_plan(len(pool.names), seed), seed)
        return Stream(scenario, pool, order, [(0, len(order))])
    parts = []
    for d in range(len(pool.names)):
        members = np.flatnonzero(pool.domain == d)
        if scenario == "correlated":
            local = dirichlet_order(pool.labels[members], DIRICHLET_GAMMA, np.random.default_rng([seed, d, 1]))
        else:
            local = np.random.default_rng([seed, d]).permutation(len(members))
        parts.append(members[local])
    order = np.concatenate(parts)
    ends = np.cumsum([len(p) for p in parts])
    if scenario == "reset":
        segments = [(int(e - len(p)), int(e)) for p, e in zip(parts, ends, strict=True)]
    else:
        segments = [(0, len(order))]
    return Stream(scenario, pool, order, segments)


def batches(segment: tuple[int, int], size: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) slices of a segment; the last may be short. Batches never straddle a reset."""
    start, end = segment
    return [(b, min(b + size, end)) for b in range(start, end, size)]


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunOutput:
    predictions: np.ndarray  # class index predicted for each stream position
    resets: list[dict[str, Any]]  # {"position": first image after the reset, "reason": ...}
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def method_settings(method: str, model: Path, device: str) -> Any:
    """The Settings the server would run for `method` (TTA_ variables in the environment still apply), with the
    model card's plausibility scale as the server takes it."""
    from app.config import Settings
    from models.card import card_path, read_card

    served = {"none": "none", "norm": "norm", "default": "tent", "tent-faithful": "tent"}
    if method not in served:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    settings = Settings(model=model, device=device, method=served[method])
    if method == "tent-faithful":
        settings = settings.without_guards()
    return settings.calibrated(read_card(card_path(model)).source_distance_q99())


def run_in_process(stream: Stream, method: str, batch_size: int, model: Path, device: str = "auto") -> RunOutput:
    """Feed the stream to a fresh AdaptationEngine in batches of `batch_size`, exactly as the worker would."""
    from app.adaptation.engine import AdaptationEngine
    from app.main import resolve_device
    from models.checkpoint import load_checkpoint
    from models.data import normalize

    settings = method_settings(method, model, device)
    source, card = load_checkpoint(model)
    _check_classes(card.class_names, stream.pool.class_names)
    engine = AdaptationEngine(source, card.num_classes, settings, resolve_device(settings.device))
    predictions = np.empty(len(stream), dtype=np.int64)
    resets: list[dict[str, Any]] = []
    _warm_up(engine, stream, batch_size, card)
    started = time.perf_counter()
    for index, segment in enumerate(stream.segments):
        if index > 0:
            engine.reset(SCENARIO_RESET)
            resets.append({"position": segment[0], "reason": SCENARIO_RESET})
        for start, end in batches(segment, batch_size):
            before = Counter(engine.stats.resets)
            # the worker's own steps: move the uint8 batch to the device, then normalise there
            x = normalize(stream.images(start, end).to(engine.device, non_blocking=True), card.mean, card.std)
            result = engine.step(x)
            predictions[start:end] = result.logits.argmax(1).cpu().numpy()
            for reason, count in (engine.stats.resets - before).items():
                resets += [{"position": end, "reason": reason}] * count  # a guard reset acts from the next batch
    wall_s = time.perf_counter() - started
    snapshot = engine.snapshot()
    extra = {
        "mode": "in-process",
        "device": str(engine.device),
        "torch_threads": torch.get_num_threads(),
        "settings": _adaptation_settings(settings),
        "engine": {k: snapshot[k] for k in ("steps_total", "skipped", "resets", "param_drift", "adapted_layers")},
    }
    return RunOutput(predictions, resets, wall_s, extra)


def source_predictions(pool: Pool, model: Path, device: str = "auto", batch_size: int = 256) -> RunOutput:
    """`none` over the whole pool, once: the frozen source model keeps no state between batches, so its
    prediction for an image depends neither on the stream's order nor on the batch it arrives in, and every
    scenario and batch size can take its `none` run from this one pass (`stateless_run`)."""
    from app.adaptation.engine import AdaptationEngine
    from app.main import resolve_device
    from models.checkpoint import load_checkpoint
    from models.data import normalize

    settings = method_settings("none", model, device)
    source, card = load_checkpoint(model)
    _check_classes(card.class_names, pool.class_names)
    engine = AdaptationEngine(source, card.num_classes, settings, resolve_device(settings.device))
    predictions = np.empty(len(pool.labels), dtype=np.int64)
    started = time.perf_counter()
    for start, end in batches((0, len(predictions)), batch_size):
        x = normalize(pool.images[start:end].to(engine.device, non_blocking=True), card.mean, card.std)
        predictions[start:end] = engine.step(x).logits.argmax(1).cpu().numpy()
    wall_s = time.perf_counter() - started
    extra = {
        "mode": f"in-process, one pass over the pool at batch {batch_size} (stateless)",
        "device": str(engine.device),
        "torch_threads": torch.get_num_threads(),
        "settings": _adaptation_settings(settings),
    }
    return RunOutput(predictions, [], wall_s, extra)


def stateless_run(stream: Stream, pool_output: RunOutput) -> RunOutput:
    """A `none` run of `stream`, read off the pool-wide pass. Its wall time is that pass's, scaled to the stream."""
    share = len(stream) / len(pool_output.predictions)
    return RunOutput(pool_output.predictions[stream.order], [], pool_output.wall_s * share, pool_output.extra)


def _warm_up(engine: Any, stream: Stream, batch_size: int, card: Any) -> None:
    """One forward pass of the frozen source model (which changes no state), so that the wall time does not
    include the one-off start-up costs of the first convolution in the process."""
    from models.data import normalize

    with torch.inference_mode():
        engine.source(normalize(stream.images(0, min(batch_size, len(stream))).to(engine.device), card.mean, card.std))


def _check_classes(model_classes: list[str], data_classes: list[str]) -> None:
    if list(model_classes) != list(data_classes):
        raise ValueError(f"the model's classes {model_classes} are not the data's {data_classes} in the same order")


def _adaptation_settings(settings: Any) -> dict[str, Any]:
    serving = {"model", "device", "host", "port", "admin_token", "max_queue_images", "request_timeout_s"}
    # JSON values (paths as strings, tuples as lists), as a saved run holds them, so that the two compare equal
    return {k: v for k, v in settings.model_dump(mode="json").items() if k not in serving}


# ----- over HTTP -----


def server_method(status: dict[str, Any]) -> str:
    """Name the server's configuration like the in-process methods: tent with every guard on is `default`."""
    method = status["method"]
    if method != "tent":
        return method
    guards = [v for v in status["adaptation"]["guards"].values() if isinstance(v, bool)]
    if all(guards):
        return "default"
    return "tent-faithful" if not any(guards) else "tent-custom"


def fetch_status(url: str, timeout_s: float = 30.0) -> dict[str, Any]:
    import httpx

    response = httpx.get(f"{url.rstrip('/')}/v1/status", timeout=timeout_s)
    response.raise_for_status()
    return response.json()


def _media_type(payload: bytes) -> str:
    return "image/png" if payload.startswith(b"\x89PNG") else "image/jpeg"


class _HttpRun:
    """One stream through a server; predictions land in `predictions`, server resets in `resets`."""

    def __init__(self, client: Any, stream: Stream, admin_token: str | None) -> None:
        self.client = client
        self.stream = stream
        self.headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self.labels = stream.labels
        self.predictions = np.full(len(stream), -1, dtype=np.int64)
        self.resets: list[dict[str, Any]] = []
        self.requests = 0
        self._last_step = 0
        self._known_resets: Counter = Counter()

    async def status(self) -> dict[str, Any]:
        response = await self.client.get("/v1/status")
        response.raise_for_status()
        return response.json()

    async def reset(self) -> None:
        response = await self.client.post("/reset", headers=self.headers)
        if response.status_code in (401, 403):
            raise RuntimeError("POST /reset was refused: pass --admin-token (or TTA_ADMIN_TOKEN)")
        response.raise_for_status()
        await self.sync_resets(record_at=None)

    async def sync_resets(self, record_at: int | None) -> None:
        """Read the server's reset counters; resets it made since the last look are recorded at `record_at`."""
        status = await self.status()
        now = Counter(status["adaptation"]["resets"])
        if record_at is not None:
            for reason, count in (now - self._known_resets).items():
                self.resets += [{"position": record_at, "reason": reason}] * count
        self._known_resets = now
        self._last_step = status["adaptation"]["steps_since_reset"]

    async def predict(self, start: int, end: int) -> None:
        payloads = self.stream.payloads(start, end)
        files = [("files", (f"{start + i}.png", p, _media_type(p))) for i, p in enumerate(payloads)]
        data = {"labels": ",".join(str(int(label)) for label in self.labels[start:end])}
        for _attempt in range(600):
            response = await self.client.post("/predict", files=files, data=data)
            if response.status_code != 503:
                break
            await asyncio.sleep(float(response.headers.get("Retry-After", "0.1") or 0.1))  # queue full: back off
        if response.status_code != 200:
            raise RuntimeError(f"POST /predict answered {response.status_code}: {response.text[:500]}")
        body = response.json()
        self.predictions[start:end] = [p["class_index"] for p in body["predictions"]]
        self.requests += 1
        # adaptation_step counts steps since the last reset: when it goes down, a guard reset the server
        step = body["adaptation_step"]
        if step < self._last_step:
            await self.sync_resets(record_at=end)
        else:
            self._last_step = step

    async def segment(self, segment: tuple[int, int], images_per_request: int, concurrency: int) -> None:
        chunks = iter(batches(segment, images_per_request))

        async def sender() -> None:
            for start, end in chunks:  # one shared iterator: requests leave in stream order
                await self.predict(start, end)

        await asyncio.gather(*(sender() for _ in range(concurrency)))


async def _run_http(
    stream: Stream, url: str, images_per_request: int, concurrency: int, admin_token: str | None, initial_reset: bool
) -> RunOutput:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=300.0, limits=limits) as client:
        run = _HttpRun(client, stream, admin_token)
        before = await run.status()
        _check_classes(before["model"]["class_names"], stream.pool.class_names)
        if initial_reset:
            await run.reset()
        else:
            await run.sync_resets(record_at=None)
        started = time.perf_counter()
        for index, segment in enumerate(stream.segments):
            if index > 0:
                await run.reset()
                run.resets.append({"position": segment[0], "reason": SCENARIO_RESET})
            await run.segment(segment, images_per_request, concurrency)
        wall_s = time.perf_counter() - started
        after = await run.status()
    # the server's own reset counters; guard resets that the adaptation_step heuristic could not place in the
    # stream (possible with concurrency > 1) show as the difference
    server_resets = Counter(after["adaptation"]["resets"]) - Counter(before["adaptation"]["resets"])
    guard_resets = sum(v for k, v in server_resets.items() if k != "manual")
    placed = sum(1 for r in run.resets if r["reason"] != SCENARIO_RESET)
    extra = {
        "mode": "http",
        "url": url,
        "images_per_request": images_per_request,
        "concurrency": concurrency,
        "requests": run.requests,
        "server": {
            "method": after["method"],
            "device": after["device"],
            "max_batch_size": after["batching"]["max_batch_size"],
            "max_wait_ms": after["batching"]["max_wait_ms"],
            "guards": after["adaptation"]["guards"],
            "model": after["model"].get("path"),
            "resets_during_run": dict(server_resets),
            "guard_resets_not_placed": guard_resets - placed,
        },
        "server_prequential": _prequential_delta(before, after),
    }
    return RunOutput(run.predictions, run.resets, wall_s, extra)


def _prequential_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The server's own figures for this run: its cumulative counters now minus what they were at the start."""
    b, a = before["prequential"]["adapted"], after["prequential"]["adapted"]
    labels, correct = a["labels"] - b["labels"], a["correct"] - b["correct"]
    return {
        "labels": labels,
        "correct": correct,
        "accuracy": correct / labels if labels else None,
        "error_pct": 100 * (1 - correct / labels) if labels else None,
    }


def run_http(
    stream: Stream,
    url: str,
    images_per_request: int,
    concurrency: int = 1,
    admin_token: str | None = None,
    initial_reset: bool = True,
) -> RunOutput:
    """Post the stream to a running server; `initial_reset` first returns it to its source state (POST /reset)."""
    return asyncio.run(_run_http(stream, url, images_per_request, concurrency, admin_token, initial_reset))


# ---------------------------------------------------------------------------------------------------------------
# Records: one JSON per (scenario, method, batch size)
# ---------------------------------------------------------------------------------------------------------------


def summarize(stream: Stream, output: RunOutput, meta: dict[str, Any]) -> dict[str, Any]:
    correct = output.predictions == stream.labels
    domain = stream.domain
    per_corruption = {
        name: round(100 * (1 - float(correct[domain == d].mean())), 3)
        for d, name in enumerate(stream.pool.names)
        if (domain == d).any()
    }
    windows = [
        round(100 * (1 - float(correct[s : s + STORED_WINDOW].mean())), 3)
        for s in range(0, len(correct), STORED_WINDOW)
    ]
    return {
        **meta,
        "images": len(stream),
        "per_corruption_error": per_corruption,
        "mean_error": round(float(np.mean(list(per_corruption.values()))), 3),
        "overall_error": round(100 * (1 - float(correct.mean())), 3),
        "window": STORED_WINDOW,
        "window_errors": windows,
        "boundaries": stream.boundaries(),
        "resets": output.resets,
        "reset_counts": dict(Counter(r["reason"] for r in output.resets)),
        "wall_s": round(output.wall_s, 3),
        "images_per_s": round(len(stream) / output.wall_s, 1) if output.wall_s > 0 else None,
        # the whole sequence, compactly: enough to redraw any window later
        "correct_bits": base64.b64encode(np.packbits(correct).tobytes()).decode(),
        "predictions_u8": base64.b64encode(output.predictions.astype(np.uint8).tobytes()).decode(),
        **output.extra,
    }


def correct_sequence(record: dict[str, Any]) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(record["correct_bits"]), dtype=np.uint8))
    return bits[: record["images"]].astype(bool)


def record_predictions(record: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(record["predictions_u8"]), dtype=np.uint8)[: record["images"]].astype(int)


def switch_errors(record: dict[str, Any], window: int = SWITCH_WINDOW) -> tuple[float | None, float | None]:
    """Error % on the first `window` images of each domain (the stream's start counts: it switches from the
    source) and on the rest of it, each a mean over domains; None where there is none (mixed: no domains in
    order; rest: domains of `window` images or fewer)."""
    if not record.get("boundaries"):
        return None, None
    correct = correct_sequence(record)
    starts = [int(b[0]) for b in record["boundaries"]] + [len(correct)]
    first, rest = [], []
    for start, end in zip(starts[:-1], starts[1:], strict=True):
        first.append(1 - correct[start : min(start + window, end)].mean())
        if end - start > window:
            rest.append(1 - correct[start + window : end].mean())
    return 100 * float(np.mean(first)), (100 * float(np.mean(rest)) if rest else None)


def run_path(results_dir: Path, scenario: str, method: str, batch_size: int) -> Path:
    return results_dir / "runs" / f"{scenario}-b{batch_size}-{method}.json"


def save_record(path: Path, record: dict[str, Any]) -> None:
    """Write atomically, so that a killed run leaves either the whole record or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)


def load_records(results_dir: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted((results_dir / "runs").glob("*.json")):
        with contextlib.suppress(json.JSONDecodeError, OSError):
            records.append(json.loads(path.read_text()))
    return records


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Report: markdown table, CSV, plots
# ---------------------------------------------------------------------------------------------------------------


def _method_rank(method: str) -> tuple[int, str]:
    """Ours in METHODS order, then the anchors in ANCHOR_METHODS order, then anything else."""
    ranked = [*METHODS, *ANCHOR_METHODS]
    bare = method.removeprefix("http-")
    return (ranked.index(bare) if bare in ranked else len(ranked), method)


def _grouped(records: list[dict[str, Any]]) -> list[tuple[tuple[str, int], list[dict[str, Any]]]]:
    """Records by (scenario, batch size): scenarios in SCENARIOS order, larger batches first, methods ordered."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["scenario"], record["batch_size"]), []).append(record)
    keys = sorted(groups, key=lambda k: (SCENARIOS.index(k[0]) if k[0] in SCENARIOS else 99, -k[1]))
    return [(k, sorted(groups[k], key=lambda r: _method_rank(r["method"]))) for k in keys]


def _guard_resets(record: dict[str, Any]) -> int:
    return sum(1 for r in record["resets"] if r["reason"] != SCENARIO_RESET)


def markdown_table(records: list[dict[str, Any]]) -> str:
    lines = []
    for (scenario, batch_size), group in _grouped(records):
        names = list(group[0]["per_corruption_error"])
        first = group[0]
        lines += [
            f"### {scenario}, batch {batch_size}",
            "",
            f"{first['images']:,} images, {first['images_per_class']} per class and corruption, severity "
            f"{first['severity']}. Prequential error % (lower is better).",
            "",
            "| method | "
            + " | ".join(SHORT_NAMES.get(n, n) for n in names)
            + f" | **mean** | first {SWITCH_WINDOW} | rest | guard resets | time (s) |",
            "| --- |" + " ---: |" * (len(names) + 5),
        ]
        for r in group:
            cells = [f"{r['per_corruption_error'].get(n, float('nan')):.1f}" for n in names]
            switch = " | ".join("" if e is None else f"{e:.1f}" for e in switch_errors(r))
            lines.append(
                f"| {r['method']} | " + " | ".join(cells) + f" | **{r['mean_error']:.2f}** | {switch} "
                f"| {_guard_resets(r)} | {r['wall_s']:.0f} |"
            )
        lines.append("")
    legend = ", ".join(f"{short} = {name}" for name, short in SHORT_NAMES.items())
    switch = (
        f"first {SWITCH_WINDOW} / rest: error % on the first {SWITCH_WINDOW} images of each domain and on the rest "
        "of it, means over domains (the first domain counts: the stream switches from the source)"
    )
    return "\n".join(lines) + f"\nColumns: {legend}; {switch}.\n"


CSV_FIELDS = ["scenario", "batch_size", "method", "mode", "images", "mean_error", "overall_error", "guard_resets"]
CSV_SWITCH_FIELDS = [f"first_{SWITCH_WINDOW}_error", "rest_error"]


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    names = list(ALL_CORRUPTIONS)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_FIELDS, *names, *CSV_SWITCH_FIELDS, "wall_s", "images_per_s"])
        for _, group in _grouped(records):
            for r in group:
                row = [r["scenario"], r["batch_size"], r["method"], r.get("mode"), r["images"], r["mean_error"]]
                row += [r["overall_error"], _guard_resets(r)]
                row += [r["per_corruption_error"].get(n, "") for n in names]
                row += ["" if e is None else round(e, 3) for e in switch_errors(r)]
                writer.writerow([*row, r["wall_s"], r["images_per_s"]])


def default_window(records: list[dict[str, Any]]) -> int:
    """A fifth of a domain, between 20 and 1000 images: smooth enough to read, fine enough to see a collapse."""
    per_domain = min(r["images"] // max(len(r["per_corruption_error"]), 1) for r in records)
    return int(min(1000, max(20, per_domain // 5)))


def write_report(results_dir: Path, window: int | None = None) -> list[Path]:
    """accuracy.md, accuracy.csv and one <scenario>-b<B>.png per group, from every saved run."""
    from bench.plots import plot_stream

    records = load_records(results_dir)
    if not records:
        return []
    window = window or default_window(records)
    written = [results_dir / "accuracy.md", results_dir / "accuracy.csv"]
    written[0].write_text(markdown_table(records))
    write_csv(records, written[1])
    for (scenario, batch_size), group in _grouped(records):
        path = results_dir / f"{scenario}-b{batch_size}.png"
        plot_stream(group, path, window, title=f"{scenario}, batch {batch_size}")
        written.append(path)
    return written


def copy_report(paths: list[Path], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy2(path, target / path.name)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {', '.join(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.stream",
        description=(
            "Prequential error on CIFAR-10-C streams (scenarios reset, continual, correlated, mixed).\n"
            "In-process (default): the methods none, norm, tent-faithful and default (guarded tent) side by side.\n"
            "With --http URL: ONE method, whatever the running server is configured with (TTA_METHOD and its\n"
            "guards); --methods is then ignored and the run is saved as http-<method>. The server forms the batches\n"
            "(TTA_MAX_BATCH_SIZE); --batch-sizes names the run and sets --images-per-request when that is not given."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Results: bench/results/<profile>/runs/*.json (one per run, skipped when present), accuracy.md, "
        "accuracy.csv and <scenario>-b<B>.png.",
    )
    parser.add_argument(
        "--profile",
        choices=list(PROFILES),
        default="quick",
        help="quick: 50 images per class and corruption (7,500 per stream); full: all 10,000 per corruption",
    )
    parser.add_argument("--limit-per-class", type=int, default=None, help="override the profile's images per class")
    parser.add_argument(
        "--domain-length",
        type=int,
        default=None,
        help=f"images per domain, classes balanced (a multiple of {NUM_CLASSES}; overrides the profile and "
        "--limit-per-class; results in bench/results/length-N)",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated, of {', '.join(SCENARIOS)} (default: {', '.join(DEFAULT_SCENARIOS)})",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="in-process methods, comma-separated: ours (" + ", ".join(METHODS) + ") and the published methods' "
        "own code from ../shared/anchors (" + ", ".join(ANCHOR_METHODS) + "; bench/peers/anchors.py)",
    )
    parser.add_argument("--batch-sizes", default="64", help="comma-separated, e.g. 64,1")
    parser.add_argument(
        "--corruptions",
        default=",".join(CORRUPTIONS),
        help="subset, kept in the standard order (default: the 15; the held-out "
        + ", ".join(n for n in ALL_CORRUPTIONS if n not in CORRUPTIONS)
        + " come after them)",
    )
    parser.add_argument("--severity", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--seed", type=int, default=0, help="stream order")
    parser.add_argument("--model", type=Path, default=None, help=f"checkpoint (default: TTA_MODEL or {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto", help="in-process device: auto | cpu | cuda[:N]")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads in-process (default: torch's choice)"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="clean CIFAR-10 test.zip")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="corrupted zips (generated if missing)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: bench/results/<profile>")
    parser.add_argument("--window", type=int, default=None, help="moving window of the plots, in images")
    parser.add_argument("--force", action="store_true", help="rerun runs whose result exists")
    parser.add_argument("--report-only", action="store_true", help="only rebuild tables and plots from saved runs")
    parser.add_argument(
        "--copy-to", type=Path, default=None, help="also copy the tables and plots here, e.g. docs/accuracy/quick"
    )
    http = parser.add_argument_group("HTTP mode (evaluates the one method the server runs)")
    http.add_argument("--http", metavar="URL", default=None, help="base URL of a running server")
    http.add_argument("--images-per-request", type=int, default=None, help="default: the batch size")
    http.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    http.add_argument("--admin-token", default=os.environ.get("TTA_ADMIN_TOKEN"), help="for POST /reset")
    http.add_argument("--no-initial-reset", action="store_true", help="do not POST /reset before each run")
    return parser


@dataclass
class Plan:
    scenario: str
    method: str
    batch_size: int


def _config(args: argparse.Namespace, per_class: int | None, corruptions: list[str], model: Path) -> dict[str, Any]:
    """What a saved run must match to be reused."""
    return {
        "profile": args.profile,
        "images_per_class": per_class if per_class is not None else "all",
        "corruptions": corruptions,
        "severity": args.severity,
        "seed": args.seed,
        "domain_length": args.domain_length,
        "model_sha256": file_sha256(model) if model.is_file() else None,
    }


def _reusable(path: Path, config: dict[str, Any], settings: dict[str, Any] | None) -> bool:
    """Whether the saved run used this data, seed, model and (in-process) these adaptation settings."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if all(record.get(k) == v for k, v in config.items()) and (settings is None or record.get("settings") == settings):
        return True
    print(f"{path.name}: saved with other settings (data, seed, model or method); running again", flush=True)
    return False


def _line(record: dict[str, Any]) -> str:
    extra = ""
    if record.get("mode") == "http":
        server = record["server_prequential"]
        extra = f", server's own figure {server['error_pct']:.2f}% over {server['labels']} labels"
    return (
        f"{record['scenario']:>10} b{record['batch_size']:<3} {record['method']:<16} mean error "
        f"{record['mean_error']:6.2f}%  guard resets {_guard_resets(record):3d}  {record['wall_s']:7.1f}s{extra}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        scenarios = _parse_list(args.scenarios, SCENARIOS, "scenarios")
        methods = _parse_list(args.methods, [*METHODS, *ANCHOR_METHODS], "methods")
        chosen = set(_parse_list(args.corruptions, list(ALL_CORRUPTIONS), "corruptions"))
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except (argparse.ArgumentTypeError, ValueError) as error:
        parser.error(str(error))
    if any(b < 1 for b in batch_sizes):
        parser.error("batch sizes must be at least 1")
    corruptions = [name for name in ALL_CORRUPTIONS if name in chosen]
    per_class = args.limit_per_class if args.limit_per_class is not None else PROFILES[args.profile]
    results_dir = args.results_dir or DEFAULT_RESULTS / args.profile
    if args.domain_length is not None:
        if args.domain_length < NUM_CLASSES or args.domain_length % NUM_CLASSES:
            parser.error(f"--domain-length must be a positive multiple of {NUM_CLASSES} (classes balanced)")
        per_class = args.domain_length // NUM_CLASSES
        results_dir = args.results_dir or DEFAULT_RESULTS / f"length-{args.domain_length}"
    model = args.model or Path(os.environ.get("TTA_MODEL", DEFAULT_MODEL))
    if any(m in ANCHOR_METHODS for m in methods) and args.http is None and (missing := anchor_available()):
        parser.error(f"the published methods cannot run here: {missing}")
    if args.threads is not None:
        # on a shared machine, fewer threads than cores keeps a preempted thread from stalling every operation
        torch.set_num_threads(args.threads)

    if not args.report_only:
        if args.http is None and not model.is_file():
            parser.error(f"model {model} not found (pass --model)")
        if args.http is not None:
            status = fetch_status(args.http)
            model = Path(status["model"].get("path") or "")  # the server's, for the record
            config = _config(args, per_class, corruptions, model)
            plans = [Plan(s, f"http-{server_method(status)}", b) for s in scenarios for b in batch_sizes]
        else:
            config = _config(args, per_class, corruptions, model)
            plans = [Plan(s, m, b) for s in scenarios for b in batch_sizes for m in methods]
        run_plans(args, plans, config, per_class, corruptions, results_dir, model)

    written = write_report(results_dir, args.window)
    for path in written:
        print(f"wrote {path}")
    if args.copy_to is not None and written:
        copy_report(written, args.copy_to)
        print(f"copied {len(written)} files to {args.copy_to}")
    return 0


def run_plans(
    args: argparse.Namespace,
    plans: list[Plan],
    config: dict[str, Any],
    per_class: int | None,
    corruptions: list[str],
    results_dir: Path,
    model: Path,
) -> None:
    todo = []
    for plan in plans:
        path = run_path(results_dir, plan.scenario, plan.method, plan.batch_size)
        # `none` keeps no state, so only the data and the model make its run (the config); the others also depend
        # on every adaptation setting
        stateful = args.http is None and plan.method != "none"
        if plan.method in ANCHOR_METHODS:
            settings = anchor_settings(plan.method, plan.batch_size)
        else:
            settings = _adaptation_settings(method_settings(plan.method, model, args.device)) if stateful else None
        if path.exists() and not args.force and _reusable(path, config, settings):
            print(f"skip {path.name} (saved)", flush=True)
        else:
            todo.append((plan, path))
    if not todo:
        return
    started = time.perf_counter()
    paths = ensure_corrupted(corruptions, args.severity, per_class, args.cache_dir, args.data)
    pool = load_pool(paths, per_class, with_payloads=args.http is not None)
    print(f"loaded {len(pool.labels):,} images in {time.perf_counter() - started:.1f}s", flush=True)
    streams: dict[str, Stream] = {}
    pool_output: RunOutput | None = None
    for plan, path in todo:
        stream = streams.setdefault(plan.scenario, build_stream(plan.scenario, pool, args.seed))
        if args.http is not None:
            output = run_http(
                stream,
                args.http,
                args.images_per_request or plan.batch_size,
                args.concurrency,
                args.admin_token,
                initial_reset=not args.no_initial_reset,
            )
        elif plan.method in ANCHOR_METHODS:
            output = run_anchor(stream, plan.method, plan.batch_size, model)
        elif plan.method == "none":
            pool_output = pool_output or source_predictions(pool, model, args.device)
            output = stateless_run(stream, pool_output)
        else:
            output = run_in_process(stream, plan.method, plan.batch_size, model, args.device)
        meta = {"scenario": plan.scenario, "method": plan.method, "batch_size": plan.batch_size, **config}
        record = summarize(stream, output, {**meta, "model": str(model), "finished_at": time.time()})
        save_record(path, record)
        print(_line(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
