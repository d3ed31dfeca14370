"""The in-process limit: what one model step costs with no HTTP, no batching queue and no event loop.

A batch of B preprocessed images (real CIFAR-10 JPEGs, decoded and normalised once, up front) goes through
`AdaptationEngine.step`, exactly the call the server's worker makes, for each method (default: none and tent,
every other setting at its default) and each B. Reported per (method, B): the median over repeats, after a
warm-up, of the milliseconds per step and the images per second it implies. Each repeat feeds the next slice of
the image pool, so tent adapts on real data as it would in the server.

Also timed: the worker's whole job for that batch (`ModelWorker._predict`: normalise + step + softmax, top-k and
the conversion to Python lists), so that the HTTP numbers can be split into model and non-model time.

    python -m bench.limit --methods none,tent --batch-sizes 1,8,32,64 --threads 1 --json limit.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from app.adaptation.engine import AdaptationEngine
from app.adaptation.streams import DEFAULT_STREAM, StreamEngines
from app.config import DEFAULT_MODEL, Settings
from app.main import resolve_device
from app.serving.worker import ModelWorker
from models.checkpoint import load_checkpoint
from models.data import normalize

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg" / "test.zip"
FALLBACK_MODEL = Path("/tmp/aka/aka.safetensors")


def default_model() -> Path:
    """The committed default checkpoint, or the stand-in of the same architecture while it is not there yet."""
    return DEFAULT_MODEL if DEFAULT_MODEL.is_file() else FALLBACK_MODEL


def image_pool(data: Path, count: int, size: int) -> torch.Tensor:
    """`count` real test images as uint8 N x 3 x S x S, decoded the way the server decodes them."""
    from app.serving.preprocess import ImageLimits, decode_all
    from bench.load import load_jpegs

    files = load_jpegs(data, limit=count)
    return decode_all(files, size, ImageLimits(8 * 2**20, 4096 * 4096, 2**40))


def time_step(
    model_path: Path,
    method: str,
    batch_size: int,
    pool: torch.Tensor,
    warmup: int,
    repeats: int,
    device: str = "cpu",
) -> dict:
    """Median ms per `engine.step` (and per worker job) for one method and batch size, a fresh engine each."""
    model, card = load_checkpoint(model_path)
    settings = Settings(model=model_path, method=method, device=device).calibrated(card.source_distance_q99())
    engine = AdaptationEngine(model, card.num_classes, settings, resolve_device(device))
    # its thread is never started: called here, on the one stream whose engine is measured above
    worker = ModelWorker(StreamEngines(lambda: engine, 1), card.mean, card.std, settings.top_k)
    n = len(pool)

    def batch(i: int) -> torch.Tensor:
        start = (i * batch_size) % max(1, n - batch_size)
        return pool[start : start + batch_size]

    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    step_s, job_s = [], []
    for i in range(warmup + repeats):
        uint8 = batch(i)
        x = normalize(uint8.to(engine.device), card.mean, card.std)
        sync()
        t0 = time.perf_counter()
        engine.step(x)
        sync()
        t1 = time.perf_counter()
        if i >= warmup:
            step_s.append(t1 - t0)
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        worker._predict([batch(i)], [DEFAULT_STREAM])
        sync()
        t1 = time.perf_counter()
        if i >= warmup:
            job_s.append(t1 - t0)
    step_ms = statistics.median(step_s) * 1000
    mean_ms = statistics.fmean(step_s) * 1000
    job_ms = statistics.median(job_s) * 1000
    return {
        "method": method,
        "batch_size": batch_size,
        "step_ms": round(step_ms, 4),
        "step_ms_p90": round(sorted(step_s)[int(0.9 * (len(step_s) - 1))] * 1000, 4),
        "images_per_s": round(batch_size / step_ms * 1000, 2),
        # tent below min_batch buffers images and steps on every ~16th image: the median then hides that step,
        # the mean does not, so throughput comparisons use the mean
        "step_ms_mean": round(mean_ms, 4),
        "images_per_s_mean": round(batch_size / mean_ms * 1000, 2),
        "worker_ms": round(job_ms, 4),
        "worker_ms_mean": round(statistics.fmean(job_s) * 1000, 4),
        "worker_images_per_s": round(batch_size / job_ms * 1000, 2),
        "repeats": repeats,
        "warmup": warmup,
        "adaptation_steps": engine.stats.steps_total,
    }


def run_limit(
    model_path: Path | None = None,
    methods: tuple[str, ...] = ("none", "tent"),
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64),
    warmup: int = 10,
    repeats: int = 50,
    min_seconds: float = 0.0,
    threads: int | None = None,
    device: str = "cpu",
    data: Path = DEFAULT_DATA,
) -> dict:
    """Every (method, B) in one process; `threads` sets torch's intra-op threads (None: torch's default)."""
    model_path = Path(model_path or default_model())
    if threads:
        torch.set_num_threads(threads)
    _, card = load_checkpoint(model_path)
    pool = image_pool(data, max(512, 4 * max(batch_sizes)), card.input_size)
    rows = []
    for method in methods:
        for b in batch_sizes:
            # small batches are fast: give them more repeats so each row takes a comparable, stable time
            reps = repeats
            if min_seconds:
                probe = time_step(model_path, method, b, pool, 2, 3, device)
                reps = max(repeats, int(min_seconds / (probe["step_ms"] / 1000)))
            rows.append(time_step(model_path, method, b, pool, warmup, reps, device))
    return {
        "model": str(model_path),
        "architecture": card.architecture,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "rows": rows,
    }


def lookup(limit: dict, method: str, batch_size: float, key: str = "step_ms_mean") -> dict | None:
    """The in-process step at a (possibly fractional) batch size: ms per step (`key`: the mean by default, see
    time_step) interpolated linearly between the two measured batch sizes around it (clamped to the measured
    range), and the images/s that implies at that size. None when the method was not measured."""
    rows = sorted((r for r in limit["rows"] if r["method"] == method), key=lambda r: r["batch_size"])
    if not rows:
        return None
    low = max((r for r in rows if r["batch_size"] <= batch_size), key=lambda r: r["batch_size"], default=rows[0])
    high = min((r for r in rows if r["batch_size"] >= batch_size), key=lambda r: r["batch_size"], default=rows[-1])
    b = min(max(batch_size, rows[0]["batch_size"]), rows[-1]["batch_size"])
    if high["batch_size"] == low["batch_size"]:
        ms = low[key]
    else:
        frac = (b - low["batch_size"]) / (high["batch_size"] - low["batch_size"])
        ms = low[key] + frac * (high[key] - low[key])
    return {
        "batch_size": b,
        "step_ms": ms,
        "images_per_s": b / ms * 1000,
        "between": [low["batch_size"], high["batch_size"]],
    }


def table(limit: dict) -> str:
    header = (
        f"{'method':6} {'B':>4} {'ms/step':>9} {'img/s':>9} {'mean ms':>9} {'img/s@mean':>10} {'worker ms':>10} "
        f"{'worker img/s':>12}"
    )
    rows = [f"torch threads: {limit['torch_threads']}, device: {limit['device']}", header, "-" * len(header)]
    for r in limit["rows"]:
        rows.append(
            f"{r['method']:6} {r['batch_size']:>4} {r['step_ms']:>9.3f} {r['images_per_s']:>9.1f} "
            f"{r['step_ms_mean']:>9.3f} {r['images_per_s_mean']:>10.1f} {r['worker_ms']:>10.3f} "
            f"{r['worker_images_per_s']:>12.1f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the committed default)")
    parser.add_argument("--methods", default="none,tent")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--min-seconds", type=float, default=0.0, help="raise repeats so a row takes this long")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = run_limit(
        args.model,
        tuple(args.methods.split(",")),
        tuple(int(b) for b in args.batch_sizes.split(",")),
        args.warmup,
        args.repeats,
        args.min_seconds,
        args.threads,
        args.device,
        args.data,
    )
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
