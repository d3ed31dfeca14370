"""Overload: 10x the saturated rate against `tta serve` (tent, default model, real CIFAR-10 JPEGs), one run.

1. saturated rate: a closed loop with enough clients to keep the batches full (images/s answered);
2. light load: an open loop at a quarter of that, for the normal latency;
3. overload: an open loop at 10x the saturated rate;
4. recovery: the light load again from the moment the overload stops, while the backlog it left drains.

Targets (issue 14, item 6): the 503s answered within 50 ms (p99), the admitted requests' p99 within the admission
budget (TTA_MAX_QUEUE_DELAY_MS, read from /v1/status), no 504, and the light load's latency back to normal (within
twice its p99 before the overload) within seconds of the overload's end. The server takes its TTA_ settings from
this process's environment. Requests hold `--images-per-request` images (16): 10x the saturated rate of single
images (~1,500 requests/s here) is more than the HTTP stack itself answers on one core, and the run would then
measure the event loop rather than admission. Latency counts from each request's scheduled arrival.

Writes docs/reliability/<name>.json and <name>.md with <name>.png; under two minutes.

    python -m bench.overload
    TTA_MAX_QUEUE_DELAY_MS=2000 python -m bench.overload --name overload-2s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.load import Sample, build_bodies, closed_loop, load_jpegs, open_loop, percentile
from bench.speed import cpu_seconds, machine_busy_seconds, running, wait_for_quiet

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "reliability"
LIGHT = 0.25  # light load, as a fraction of the saturated rate
NORMAL = 2.0  # a light-load latency within this many times its p99 before the overload is normal


def server_settings() -> str:
    """The server's TTA_ settings this process passes on (TTA_SHARED_DIR only says where the data is)."""
    return ", ".join(
        f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("TTA_") and k != "TTA_SHARED_DIR"
    )


async def poll_status(url: str, stop: asyncio.Event, every_s: float = 0.5) -> list[dict[str, Any]]:
    """/v1/status's batching figures every `every_s` until `stop`: the queue and the admission's view of it."""
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client:
        while not stop.is_set():
            with_time = {"t": time.perf_counter()}
            with contextlib.suppress(httpx.HTTPError):
                rows.append(with_time | (await client.get("/v1/status")).json()["batching"])
            await asyncio.sleep(every_s)
    return rows


async def phases(url: str, bodies: list, saturated_rps: float, args: argparse.Namespace) -> dict[str, Any]:
    """Light load, then the overload with the recovery's light load starting when it stops; every answer kept."""
    light, over, recovery = [], [], []
    counts: dict[str, Any] = {}

    async def run(name: str, rate: float, duration_s: float, samples: list[Sample], delay_s: float = 0) -> None:
        await asyncio.sleep(delay_s)
        _, statuses, _, _, lag = await open_loop(
            url, bodies, rate, int(rate * duration_s * 2) + 10, duration_s, 60, max_in_flight=4096, samples=samples
        )
        counts[name] = {"statuses": {str(k): v for k, v in statuses.items()}, "max_schedule_lag_ms": lag * 1000}

    await run("light", LIGHT * saturated_rps, args.light_s, light)
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_status(url, stop))
    overload_start = time.perf_counter()
    await asyncio.gather(
        run("overload", args.factor * saturated_rps, args.overload_s, over),
        run("recovery", LIGHT * saturated_rps, args.recovery_s, recovery, delay_s=args.overload_s),
    )
    stop.set()
    return {
        "samples": {"light": light, "overload": over, "recovery": recovery},
        "counts": counts,
        "overload_start": overload_start,
        "overload_end": overload_start + args.overload_s,
        "status": await poller,
    }


def latency_ms(samples: list[Sample]) -> dict[str, float | None]:
    ordered = sorted(s.latency_s * 1000 for s in samples)
    stats = {f"p{q}": percentile(ordered, q) for q in (50, 99)}
    return {
        k: round(v, 1) if v is not None else None
        for k, v in (stats | {"max": ordered[-1] if ordered else None}).items()
    }


def summarize(run: dict[str, Any], saturated: dict[str, Any], budget_ms: float, args: argparse.Namespace) -> dict:
    light, over, recovery = (run["samples"][k] for k in ("light", "overload", "recovery"))
    ok = [s for s in over if s.status == 200]
    refused = [s for s in over if s.status == 503]
    normal_ms = NORMAL * latency_ms([s for s in light if s.status == 200])["p99"]
    end = run["overload_end"]
    abnormal = [s for s in recovery if s.status != 200 or s.latency_s * 1000 > normal_ms]
    # from the overload's end to the last light-load request that was not answered normally
    recovered_s = max((s.scheduled - end for s in abnormal), default=0.0)
    timeouts = sum(1 for phase in run["samples"].values() for s in phase if s.status == 504)
    latency_503, latency_ok = latency_ms(refused), latency_ms(ok)
    # after the overload's first budget, every admitted request was admitted on a throughput measured under it
    steady = latency_ms([s for s in ok if s.scheduled >= run["overload_start"] + budget_ms / 1000])
    return {
        "saturated": saturated,
        "budget_ms": budget_ms,
        "offered_requests_per_s": round(args.factor * saturated["requests_per_s"], 1),
        "overload": {
            "answers": len(over),
            "client_overload": run["counts"]["overload"]["statuses"].get("client_overload", 0),
            "share_503": round(len(refused) / max(len(over), 1), 3),
            "admitted": len(ok),
            "admitted_images_per_s": round(len(ok) * args.images_per_request / args.overload_s, 1),
            "latency_503_ms": latency_503,
            "latency_admitted_ms": latency_ok,
            "latency_admitted_after_first_budget_ms": steady,
            "statuses": run["counts"]["overload"]["statuses"],
            "max_schedule_lag_ms": round(run["counts"]["overload"]["max_schedule_lag_ms"], 1),
        },
        "light_latency_ms": latency_ms([s for s in light if s.status == 200]),
        "recovery": {
            "normal_bound_ms": round(normal_ms, 1),
            "recovered_after_s": round(recovered_s, 2),
            "abnormal_requests": len(abnormal),
            "requests": len(recovery),
            "latency_ms": latency_ms([s for s in recovery if s.status == 200]),
        },
        "timeouts_504": timeouts,
        "targets": {
            "503_p99_within_50_ms": latency_503["p99"] is not None and latency_503["p99"] <= 50,
            "admitted_p99_within_budget": latency_ok["p99"] is not None and latency_ok["p99"] <= budget_ms,
            "no_504": timeouts == 0,
        },
    }


def measure_saturation(url: str, bodies: list, args: argparse.Namespace) -> dict[str, Any]:
    """Images/s answered with `clients` back to back, after a short warm-up (not counted)."""
    clients = max(2, 2 * 64 // args.images_per_request)  # two full batches waiting at any time
    asyncio.run(closed_loop(url, bodies, clients, 10_000, args.warmup_s, 60))
    latencies, statuses, elapsed, _ = asyncio.run(closed_loop(url, bodies, clients, 100_000, args.saturate_s, 60))
    answered = len(latencies)
    return {
        "clients": clients,
        "requests_per_s": round(answered / elapsed, 2),
        "images_per_s": round(answered * args.images_per_request / elapsed, 1),
        "errors": {str(k): v for k, v in statuses.items() if k != 200},
    }


def timeline(run: dict[str, Any], bin_s: float = 1.0) -> list[dict[str, Any]]:
    """Per `bin_s` of scheduled arrival, from the light load's end: answers by status and the admitted p99."""
    start = run["overload_start"]
    bins: dict[int, list[Sample]] = {}
    for phase in ("overload", "recovery"):
        for s in run["samples"][phase]:
            bins.setdefault(int((s.scheduled - start) // bin_s), []).append(s)
    rows = []
    for index in sorted(bins):
        group = bins[index]
        ok = sorted(s.latency_s * 1000 for s in group if s.status == 200)
        rows.append(
            {
                "t_s": index * bin_s,
                "200": len(ok),
                "503": sum(s.status == 503 for s in group),
                "other": sum(s.status not in (200, 503) for s in group),
                "p99_admitted_ms": percentile(ok, 99),
            }
        )
    return rows


def plot(run: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = run["overload_start"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for phase, colour in (("overload", "tab:red"), ("recovery", "tab:blue")):
        for status, marker in ((200, "."), (503, "x")):
            points = [s for s in run["samples"][phase] if s.status == status]
            top.scatter(
                [s.scheduled - start for s in points],
                [s.latency_s * 1000 for s in points],
                s=6,
                marker=marker,
                c=colour,
                alpha=0.5,
                label=f"{phase} {status}",
            )
    top.axhline(summary["budget_ms"], ls="--", c="k", lw=1, label="admission budget")
    top.axvline(run["overload_end"] - start, ls=":", c="grey", lw=1)
    top.set_yscale("log")
    top.set_ylabel("latency ms (from scheduled arrival)")
    top.legend(fontsize=7, ncol=3)
    status = run["status"]
    bottom.plot([r["t"] - start for r in status], [r["expected_wait_s"] or 0 for r in status], label="expected wait s")
    bottom.axhline(summary["budget_ms"] / 1000, ls="--", c="k", lw=1)
    bottom.axvline(run["overload_end"] - start, ls=":", c="grey", lw=1)
    bottom.set_xlabel("s since the overload started")
    bottom.set_ylabel("server's expected wait, s")
    fig.suptitle(
        f"{summary['offered_requests_per_s']:.0f} req/s offered (10x saturated) for "
        f"{run['overload_end'] - start:.0f} s, then {LIGHT:g}x"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary: dict[str, Any], meta: dict[str, Any], rows: list[dict[str, Any]], name: str) -> str:
    sat, over, rec = summary["saturated"], summary["overload"], summary["recovery"]
    l503, lok, light = over["latency_503_ms"], over["latency_admitted_ms"], summary["light_latency_ms"]
    steady = over["latency_admitted_after_first_budget_ms"]
    yes = {True: "met", False: "**missed**"}
    t = summary["targets"]
    lines = [
        f"## Overload: 10x the saturated rate ({name})",
        "",
        f"`{meta['command']}`: {meta['machine']}; placement {meta['placement']}; method tent, default model, "
        f"{meta['images_per_request']} CIFAR-10 test JPEGs per request; settings from the environment: "
        f"{meta['settings'] or 'defaults'}. Other work on the machine used {meta['other_cores']:.2f} cores on "
        "average during the run: it is shared, so absolute figures are noisy; the targets are ratios and budgets.",
        "",
        "| measure | value | target |",
        "| --- | ---: | --- |",
        f"| saturated rate (closed loop, {sat['clients']} clients) | {sat['images_per_s']:.0f} images/s "
        f"({sat['requests_per_s']:.1f} req/s) | |",
        f"| offered during the overload ({meta['overload_s']:.0f} s) | {summary['offered_requests_per_s']:.0f} "
        "req/s | 10x saturated |",
        f"| admission budget | {summary['budget_ms']:.0f} ms | |",
        f"| share answered 503 | {over['share_503']:.1%} of {over['answers']} | |",
        f"| 503 latency p50 / p99 / max | {l503['p50']} / {l503['p99']} / {l503['max']} ms | p99 <= 50 ms: "
        f"{yes[t['503_p99_within_50_ms']]} |",
        f"| admitted: requests, images/s | {over['admitted']}, {over['admitted_images_per_s']:.0f} | |",
        f"| admitted latency p50 / p99 / max | {lok['p50']} / {lok['p99']} / {lok['max']} ms | p99 <= budget: "
        f"{yes[t['admitted_p99_within_budget']]} |",
        f"| the same, arrived after the overload's first {summary['budget_ms'] / 1000:g} s | {steady['p50']} / "
        f"{steady['p99']} / {steady['max']} ms | |",
        f"| 504 (whole run) | {summary['timeouts_504']} | 0: {yes[t['no_504']]} |",
        f"| light load ({LIGHT:g}x) before: p50 / p99 | {light['p50']} / {light['p99']} ms | |",
        f"| back to normal (<= {rec['normal_bound_ms']:.0f} ms) after the overload stopped | "
        f"{rec['recovered_after_s']:.1f} s | within seconds |",
        "",
        f"All overload answers by status: {over['statuses']}; the generator's worst lateness "
        f"{over['max_schedule_lag_ms']:.0f} ms. Per second of scheduled arrival from the overload's start:",
        "",
        "| s | 200 | 503 | other | admitted p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        p99 = f"{r['p99_admitted_ms']:.0f}" if r["p99_admitted_ms"] is not None else "-"
        lines.append(f"| {r['t_s']:.0f} | {r['200']} | {r['503']} | {r['other']} | {p99} |")
    lines += ["", f"![latency along the run]({name}.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images-per-request", type=int, default=16)
    parser.add_argument("--factor", type=float, default=10.0, help="overload, as a multiple of the saturated rate")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--saturate-s", type=float, default=8.0)
    parser.add_argument("--light-s", type=float, default=6.0)
    parser.add_argument("--overload-s", type=float, default=20.0)
    parser.add_argument("--recovery-s", type=float, default=25.0)
    parser.add_argument("--placement", choices=("pinned", "unpinned"), default="pinned")
    parser.add_argument("--name", default="overload", help="output file names")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default" / "cifar10_resnet20.safetensors")
    args = parser.parse_args(argv)
    pinned = args.placement == "pinned" and (os.cpu_count() or 1) >= 2
    images = load_jpegs(limit=256 * args.images_per_request)
    bodies = build_bodies(images, args.images_per_request)
    with (
        tempfile.TemporaryDirectory(prefix="tta-overload-") as workdir,
        running("ours-tent", args.model, pinned, Path(workdir)) as server,
    ):
        if pinned:  # the server is on core 0 (bench.speed.running); the generator takes core 1
            os.sched_setaffinity(0, {1})
        wait_for_quiet(20, server.process.pid)
        busy, own, served = machine_busy_seconds(), time.process_time(), cpu_seconds(server.process.pid)
        started = time.perf_counter()
        saturated = measure_saturation(server.url, bodies, args)
        print(f"saturated: {saturated}", flush=True)
        budget_ms = httpx.get(server.url + "/v1/status", trust_env=False).json()["batching"]["max_queue_delay_ms"]
        run = asyncio.run(phases(server.url, bodies, saturated["requests_per_s"], args))
        elapsed = time.perf_counter() - started
        others = (
            machine_busy_seconds() - busy - (time.process_time() - own) - (cpu_seconds(server.process.pid) - served)
        )
    summary = summarize(run, saturated, budget_ms, args)
    meta = {
        "command": "python -m bench.overload" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "placement": "server on core 0 with one torch thread, generator on core 1" if pinned else "unpinned",
        "images_per_request": args.images_per_request,
        "overload_s": args.overload_s,
        "settings": server_settings(),
        "other_cores": max(others, 0.0) / elapsed,
        "elapsed_s": round(elapsed, 1),
    }
    rows = timeline(run)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "summary": summary, "timeline": rows}, indent=2))
    plot(run, summary, DOCS / f"{args.name}.png")
    (DOCS / f"{args.name}.md").write_text(markdown(summary, meta, rows, args.name))
    print(json.dumps(summary, indent=2))
    return 0 if all(summary["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
