"""The speed benchmark, one run: in-process limit, then every server under the same load, then the verdicts.

1. `bench.limit`: AdaptationEngine.step at B = 1, 8, 32, 64 for none and tent (median ms, after warm-up).
2. Servers, each a subprocess on a free loopback port, each driven by `bench.load` (itself a subprocess) in a
   closed loop at concurrency 1, 8, 32, 64, bounded in requests and seconds:
   ours (TTA_METHOD=none), ours (tent), ours (tent) on uvicorn's pure-Python stack (h11 + asyncio, what a
   plain `pip install` without uvloop/httptools runs), the plain FastAPI peer and the LitServe peer.
3. Open loop on ours (tent) at fractions of its saturated rate (latency vs offered load; 0.5 is the p99 check).
4. Optionally (`--profile`) py-spy on ours (tent) at saturation, its samples sorted into where the time goes.

Placement: `pinned` runs every server under `taskset -c 0` with one torch thread (OMP_NUM_THREADS=1) and the
load generator under `taskset -c 1`; `unpinned` lets the OS place both and torch use its default threads. The
in-process limit is measured the same way for each (1 thread on core 0, or default). The headline is `pinned`:
server and generator then cannot steal each other's core, and the ratio to the limit compares like with like.

Writes bench/results/speed/{speed.json, speed.md, throughput.png, latency_vs_load.png} and copies to docs/speed/.

    python -m bench.speed                       # the full run (about 20 minutes on 2 cores)
    python -m bench.speed --quick               # smoke: tiny bounds, a minute or two
    python -m bench.speed --placements pinned,unpinned --profile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "speed"
DOCS = ROOT / "docs" / "speed"
PY = sys.executable

SERVERS = ("ours-none", "ours-tent", "ours-tent-h11", "plain-fastapi", "litserve", "litserve-zmq")
LABELS = {
    "ours-none": "ours (none)",
    "ours-tent": "ours (tent)",
    "ours-tent-h11": "ours (tent, h11+asyncio)",
    "plain-fastapi": "plain FastAPI",
    "litserve": "LitServe",
    "litserve-zmq": "LitServe (fast_queue=True, ZeroMQ)",
}


# ----- processes -----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants, from /proc (0 where unreadable)."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / ticks  # utime, stime
        todo.extend(children.get(p, []))
    return total


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine has spent busy (all cores, from /proc/stat), to spot other work."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


QUIET_CORES = 0.2  # machine CPU, beyond what the benchmark itself uses, below which a run counts as clean


def wait_for_quiet(max_wait_s: float, own_pid: int | None = None) -> float:
    """Wait (at most `max_wait_s`) until the machine, less the server `own_pid`, uses < QUIET_CORES for 2 s in a
    row; returns the busy cores last seen. Other jobs on a shared machine would otherwise skew the numbers."""
    deadline, quiet = time.monotonic() + max_wait_s, 0
    busy = 0.0
    while time.monotonic() < deadline:
        b0, c0 = machine_busy_seconds(), cpu_seconds(own_pid) if own_pid else 0.0
        time.sleep(1.0)
        busy = machine_busy_seconds() - b0 - ((cpu_seconds(own_pid) - c0) if own_pid else 0.0)
        quiet = quiet + 1 if busy < QUIET_CORES else 0
        if quiet >= 2:
            return busy
    print(f"  (machine still busy, {busy:.2f} cores used by others, after {max_wait_s:.0f} s: going on)", flush=True)
    return busy


@dataclass
class Server:
    name: str
    url: str
    path: str
    process: subprocess.Popen
    log: Path
    batch_stats: Path | None = None  # LitServe's batch counter file
    extra: dict = field(default_factory=dict)


def server_command(name: str, port: int, model: Path, stats_file: Path | None) -> tuple[list[str], dict, str, str]:
    """(argv, extra env, readiness path, predict path) for one server."""
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if name.startswith("ours"):
        method = "none" if name == "ours-none" else "tent"
        env = {"TTA_MODEL": str(model), "TTA_METHOD": method}
        if name == "ours-tent-h11":
            code = (
                "import uvicorn; from app.config import Settings; from app.main import create_app; "
                f"uvicorn.run(create_app(Settings()), host='127.0.0.1', port={port}, log_level='warning', "
                "loop='asyncio', http='h11')"
            )
            return [PY, "-c", code], env, "/readyz", "/predict"
        return [PY, "-m", "app.cli", "serve", *host, "--log-level", "warning"], env, "/readyz", "/predict"
    if name == "plain-fastapi":
        return [PY, "-m", "bench.peers.plain_fastapi", *host, "--model", str(model)], {}, "/healthz", "/predict"
    if name in ("litserve", "litserve-zmq"):
        env = {"PEER_BATCH_STATS": str(stats_file)} if stats_file else {}
        argv = [PY, "-m", "bench.peers.litserve_peer", *host, "--model", str(model)]
        return argv + (["--fast-queue"] if name == "litserve-zmq" else []), env, "/health", "/predict"
    raise ValueError(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")


@contextlib.contextmanager
def running(name: str, model: Path, pinned: bool, workdir: Path, ready_timeout_s: float = 180) -> Iterator[Server]:
    """One server as a subprocess (its own session, so its workers stop with it); stopped on exit."""
    port = free_port()
    stats = workdir / f"{name}-batches.txt" if name.startswith("litserve") else None
    argv, env, ready, path = server_command(name, port, model, stats)
    env = {**os.environ, **env}
    if pinned:
        argv = ["taskset", "-c", "0", *argv]
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PEER_TORCH_THREADS="1")
    log = workdir / f"{name}.log"
    process = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; log:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + ready, timeout=2, trust_env=False).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready within {ready_timeout_s} s; log:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield Server(name, url, path, process, log, stats)
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the one we started), SIGKILL after 20 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# ----- one load run -----


def drive(server: Server, pinned: bool, workdir: Path, *, retries: int = 3, quiet_wait_s: float = 300, **kw) -> dict:
    """`_drive_once`, after the machine is quiet, again (up to `retries` times) when other work used more than
    QUIET_CORES during the run; the report says how many tries it took and whether it is still contended."""
    for attempt in range(1, retries + 2):
        wait_for_quiet(quiet_wait_s, server.process.pid)
        report = _drive_once(server, pinned, workdir, **kw)
        report["attempts"] = attempt
        report["contended"] = report["other_cpu"] > QUIET_CORES + 0.1  # + the generator's own start-up
        if not report["contended"]:
            break
        if attempt <= retries:
            print(f"  (other work used {report['other_cpu']:.2f} cores during the run: retrying)", flush=True)
    return report


def _drive_once(
    server: Server,
    pinned: bool,
    workdir: Path,
    *,
    closed: int | None = None,
    rate: float | None = None,
    requests: int,
    duration_s: float,
    warmup: int,
) -> dict:
    """`bench.load` in its own process (pinned to core 1 when `pinned`) against `server`: a warm-up run first
    (`warmup` requests, closed loop, not reported), then the measured run. Its report plus the server's CPU use
    over the measured run and, for LitServe, the mean batch size from the peer's batch counter."""
    from bench.load import mean_batch_size
    from bench.peers.litserve_peer import read_batch_stats

    def load(extra: list[str], out: Path, bound_s: float) -> None:
        argv = [PY, "-m", "bench.load", "--url", server.url, "--path", server.path, "--json", str(out), *extra]
        if pinned:
            argv = ["taskset", "-c", "1", *argv]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=bound_s + 120)
        if done.returncode != 0:
            raise RuntimeError(f"load generator failed ({done.returncode}):\n{done.stderr[-3000:]}")

    tag = f"{server.name}-{closed or rate}-{time.monotonic_ns()}"
    if warmup:
        warm = ["--closed", str(closed or 8), "--requests", str(warmup), "--duration", "30"]
        load(warm, workdir / f"warmup-{tag}.json", 30)

    def batches() -> tuple[float, float] | None:
        return (read_batch_stats(str(server.batch_stats)) or (0.0, 0.0)) if server.batch_stats else None

    before, cpu_before, busy_before = batches(), cpu_seconds(server.process.pid), machine_busy_seconds()
    out = workdir / f"load-{tag}.json"
    bounds = ["--requests", str(requests), "--duration", str(duration_s), "--timeout", "30"]
    load(bounds + (["--closed", str(closed)] if closed is not None else ["--open", f"{rate:.3f}"]), out, duration_s)
    cpu_after, after, busy_after = cpu_seconds(server.process.pid), batches(), machine_busy_seconds()
    report = json.loads(out.read_text())
    if server.batch_stats:
        batch = mean_batch_size(before, after)
        report["mean_batch_size"] = round(batch, 3) if batch is not None else None
        report["batch_size_source"] = "peer batch counter"
    # per second of the measured run (the generator's start-up, when the server idles, adds ~0 CPU)
    report["server_cpu"] = round((cpu_after - cpu_before) / max(report["elapsed_s"], 1e-9), 3)
    # everything else the machine did meanwhile (other jobs; ~0.1 is the generator's start-up and the kernel)
    busy = (busy_after - busy_before) / max(report["elapsed_s"], 1e-9)
    report["other_cpu"] = round(busy - report["server_cpu"] - report["client_cpu"], 3)
    report["server"] = server.name
    return report


# ----- the run -----


def run_limit(
    model: Path, pinned: bool, quick: bool, workdir: Path, quiet_wait_s: float = 300, retries: int = 2
) -> dict:
    out = workdir / f"limit-{'pinned' if pinned else 'unpinned'}.json"
    argv = [PY, "-m", "bench.limit", "--model", str(model), "--json", str(out)]
    argv += (
        ["--warmup", "2", "--repeats", "5"] if quick else ["--warmup", "10", "--repeats", "40", "--min-seconds", "3"]
    )
    if quick:
        argv += ["--batch-sizes", "1,8,64"]
    if pinned:
        argv = ["taskset", "-c", "0", *argv, "--threads", "1"]
    import resource

    for attempt in range(1, retries + 2):
        wait_for_quiet(quiet_wait_s)
        own0, busy0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_busy_seconds(), time.monotonic()
        subprocess.run(argv, cwd=ROOT, check=True, timeout=1800, capture_output=True)
        own1, busy1, t1 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_busy_seconds(), time.monotonic()
        own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
        other = (busy1 - busy0 - own) / (t1 - t0)
        result = json.loads(out.read_text())
        result.update(other_cpu=round(other, 3), attempts=attempt, contended=other > QUIET_CORES)
        if not result["contended"]:
            break
        if attempt <= retries:
            print(f"  (other work used {other:.2f} cores during the limit: retrying)", flush=True)
    return result


def run_placement(args: argparse.Namespace, pinned: bool, workdir: Path, model: Path) -> dict:
    placement = "pinned" if pinned else "unpinned"
    print(f"== {placement}: in-process limit", flush=True)
    limit = run_limit(model, pinned, args.quick, workdir, args.quiet_wait, args.retries)
    from bench.limit import table as limit_table

    print(limit_table(limit), flush=True)
    closed: list[dict] = []
    for name in args.servers:
        print(f"== {placement}: {name}", flush=True)
        with running(name, model, pinned, workdir) as server:
            for c in args.concurrencies:
                report = drive(
                    server,
                    pinned,
                    workdir,
                    quiet_wait_s=args.quiet_wait,
                    retries=args.retries,
                    closed=c,
                    requests=args.requests,
                    duration_s=args.duration,
                    warmup=args.warmup if c == args.concurrencies[0] else min(args.warmup, 8 * c),
                )
                report["placement"] = placement
                closed.append(report)
                print(_row(report), flush=True)
    if args.reuse:  # rows of servers not re-run here, from an earlier speed.json of the same placement
        earlier = json.loads(Path(args.reuse).read_text())
        for run in earlier["placements"]:
            if run["placement"] == placement:
                kept = [dict(r, reused_from=str(args.reuse)) for r in run["closed"] if r["server"] not in args.servers]
                closed.extend(kept)
                print(f"  reused {len(kept)} closed-loop rows from {args.reuse}", flush=True)
    open_runs: list[dict] = []
    saturated = max((r["images_per_s"] for r in closed if r["server"] == "ours-tent"), default=None)
    if saturated and args.open_fractions:
        print(f"== {placement}: open loop on ours-tent, saturated at {saturated:.1f} images/s", flush=True)
        with running("ours-tent", model, pinned, workdir) as server:
            for fraction in args.open_fractions:
                rate = fraction * saturated
                report = drive(
                    server,
                    pinned,
                    workdir,
                    quiet_wait_s=args.quiet_wait,
                    retries=args.retries,
                    rate=rate,
                    requests=max(10, int(rate * args.open_duration * 1.5)),
                    duration_s=args.open_duration,
                    warmup=args.warmup,
                )
                report.update(placement=placement, fraction=fraction, saturated_images_per_s=saturated)
                open_runs.append(report)
                print(f"  open {fraction:.2f} x sat = {rate:.1f}/s: " + _row(report), flush=True)
    return {"placement": placement, "limit": limit, "closed": closed, "open": open_runs}


def _row(r: dict) -> str:
    lat = r["latency_ms"]
    load = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['rate']:.0f}/s"
    return (
        f"  {r['server']:14} {load:>8} img/s {r['images_per_s']:8.1f}  p50 {lat['p50'] or 0:7.1f}  "
        f"p99 {lat['p99'] or 0:7.1f} ms  batch {r['mean_batch_size'] or 0:5.1f}  "
        f"srv cpu {r['server_cpu']:.2f}  cli cpu {r['client_cpu']:.2f}  other {r.get('other_cpu', 0):.2f}  "
        f"errors {r['errors'] or '-'}"
    )


# ----- verdicts -----


def verdicts(placement: dict, max_wait_ms: float, top: int) -> dict:
    """The three targets of issue 7 for one placement, with the numbers behind each."""
    from bench.limit import lookup

    limit, closed = placement["limit"], placement["closed"]

    def best(server: str) -> dict | None:
        rows = [r for r in closed if r["server"] == server]
        return max(rows, key=lambda r: r["images_per_s"]) if rows else None

    def at(server: str, c: int) -> dict | None:
        return next((r for r in closed if r["server"] == server and r["concurrency"] == c), None)

    out: dict = {"placement": placement["placement"]}
    ratios: dict = {}
    for method in ("none", "tent"):
        run = best(f"ours-{method}")
        if run and run["mean_batch_size"]:
            ref = lookup(limit, method, run["mean_batch_size"])
            ratios[f"ours_{method}_vs_limit"] = {
                "http_images_per_s": run["images_per_s"],
                "concurrency": run["concurrency"],
                "mean_batch_size": run["mean_batch_size"],
                "limit_images_per_s": round(ref["images_per_s"], 2),
                "limit_step_ms_mean": round(ref["step_ms"], 3),
                "ratio": round(run["images_per_s"] / ref["images_per_s"], 3),
            }
    none_top = at("ours-none", top)
    lit_runs = [r for r in (at("litserve", top), at("litserve-zmq", top)) if r]
    lit_top = max(lit_runs, key=lambda r: r["images_per_s"]) if lit_runs else None
    if none_top and lit_top:
        ratios["ours_none_vs_litserve"] = {  # against the faster of LitServe's two transports
            "concurrency": top,
            "ours_images_per_s": none_top["images_per_s"],
            "litserve_images_per_s": lit_top["images_per_s"],
            "litserve_config": lit_top["server"],
            "ratio": round(none_top["images_per_s"] / max(lit_top["images_per_s"], 1e-9), 3),
        }
    tent_top, none_best = best("ours-tent"), best("ours-none")
    if tent_top and none_best:
        ratios["tent_vs_none"] = {
            "tent_images_per_s": tent_top["images_per_s"],
            "none_images_per_s": none_best["images_per_s"],
            "ratio": round(tent_top["images_per_s"] / max(none_best["images_per_s"], 1e-9), 3),
        }
    out["ratios"] = ratios
    targets = {}
    if "ours_tent_vs_limit" in ratios:
        r = ratios["ours_tent_vs_limit"]["ratio"]
        targets["tent_http_vs_limit_ge_0.8"] = {"value": r, "met": r >= 0.8}
    if "ours_none_vs_litserve" in ratios:
        r = ratios["ours_none_vs_litserve"]["ratio"]
        targets["none_ge_litserve_at_c64"] = {"value": r, "met": r >= 1.0}
    half = next((o for o in placement["open"] if abs(o["fraction"] - 0.5) < 1e-9), None)
    full = next((r for r in limit["rows"] if r["method"] == "tent" and r["batch_size"] == max_batch(limit)), None)
    if half and full and half["latency_ms"]["p99"] is not None:
        bound = max_wait_ms + 3 * full["step_ms"]
        p99 = half["latency_ms"]["p99"]
        targets["open_p99_at_half_rate"] = {
            "p99_ms": p99,
            "bound_ms": round(bound, 3),
            "rate": half["rate"],
            "full_batch_step_ms": full["step_ms"],
            "met": p99 <= bound,
        }
    out["targets"] = targets
    return out


def max_batch(limit: dict) -> int:
    return max(r["batch_size"] for r in limit["rows"])


# ----- output -----


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']['summary']}", ""]
    for placement in result["placements"]:
        name = placement["placement"]
        lines += [f"### {name}", "", "In-process limit (`AdaptationEngine.step`, median):", ""]
        lines += [
            "| method | B | median ms/step | images/s (median) | mean ms/step | images/s (mean) | worker job ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in placement["limit"]["rows"]:
            lines.append(
                f"| {r['method']} | {r['batch_size']} | {r['step_ms']:.2f} | {r['images_per_s']:.0f} "
                f"| {r['step_ms_mean']:.2f} | {r['images_per_s_mean']:.0f} | {r['worker_ms']:.2f} |"
            )
        lines += ["", "Closed loop through HTTP (1 image per request):", ""]
        lines += [
            "| server | concurrency | images/s | p50 ms | p99 ms | mean batch | server CPU | client CPU | other CPU "
            "| errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in placement["closed"]:
            lat = r["latency_ms"]
            batch = f"{r['mean_batch_size']:.1f}" if r["mean_batch_size"] else "n/a"
            errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
            lines.append(
                f"| {LABELS[r['server']]} | {r['concurrency']} | {r['images_per_s']:.0f} | {lat['p50']:.1f} "
                f"| {lat['p99']:.1f} | {batch} | {r['server_cpu']:.2f} | {r['client_cpu']:.2f} "
                f"| {r.get('other_cpu', 0):.2f}{' (contended)' if r.get('contended') else ''}"
                f"{' (earlier run)' if r.get('reused_from') else ''} | {errors} |"
            )
        if placement["open"]:
            lines += ["", "Open loop, ours (tent), Poisson arrivals:", ""]
            lines += [
                "| fraction of saturated | offered req/s | images/s | p50 ms | p90 ms | p99 ms | max ms | mean batch |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for r in placement["open"]:
                lat = r["latency_ms"]
                batch = f"{r['mean_batch_size']:.1f}" if r["mean_batch_size"] else "n/a"
                lines.append(
                    f"| {r['fraction']:.2f} | {r['rate']:.0f} | {r['images_per_s']:.0f} | {lat['p50']:.1f} "
                    f"| {lat['p90']:.1f} | {lat['p99']:.1f} | {lat['max']:.1f} | {batch} |"
                )
        v = placement["verdicts"]
        lines += ["", "Ratios and targets:", "", "```", json.dumps(v, indent=2), "```", ""]
    if "profile" in result:
        prof = result["profile"]
        lines += [f"### profile: ours (tent), pinned, closed loop c={prof['concurrency']}", ""]
        lines += [
            f"{prof['images_per_s']} images/s, mean batch {prof['mean_batch_size']}, server CPU "
            f"{prof['server_cpu_cores']} cores, model step {prof['model_ms_per_batch']} ms per batch.",
            "",
            "| share of the server's core | % |",
            "| --- | ---: |",
        ]
        lines += [f"| {k} | {v} |" for k, v in prof["core_share_percent"].items()]
        for view in ("pyspy_all_threads", "pyspy_gil"):
            title = "all threads" if view == "pyspy_all_threads" else "GIL holder only"
            lines += ["", f"py-spy samples ({title}, {prof[view]['samples']} samples):", ""]
            lines += ["| where | % of samples |", "| --- | ---: |"]
            lines += [f"| {k} | {v} |" for k, v in prof[view]["percent"].items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    placements = result["placements"]
    if not placements:
        return written
    fig, axes = plt.subplots(1, len(placements), figsize=(6.5 * len(placements), 4.5), squeeze=False)
    for ax, placement in zip(axes[0], placements, strict=True):
        for server in SERVERS:
            rows = sorted((r for r in placement["closed"] if r["server"] == server), key=lambda r: r["concurrency"])
            if rows:
                ax.plot([r["concurrency"] for r in rows], [r["images_per_s"] for r in rows], "o-", label=LABELS[server])
        for method, style in (("none", ":"), ("tent", "--")):
            top = max((r for r in placement["limit"]["rows"] if r["method"] == method), key=lambda r: r["batch_size"])
            ax.axhline(top["images_per_s_mean"], ls=style, c="grey", lw=1)
            ax.annotate(
                f"in-process {method}, B={top['batch_size']}",
                (1, top["images_per_s_mean"]),
                fontsize=7,
                color="grey",
                va="bottom",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (closed loop, 1 image per request)")
        ax.set_ylabel("images/s")
        ax.set_title(f"throughput vs concurrency ({placement['placement']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "throughput.png"))

    with_open = [p for p in placements if p["open"]]
    if with_open:
        fig, axes = plt.subplots(1, len(with_open), figsize=(6.5 * len(with_open), 4.5), squeeze=False)
        for ax, placement in zip(axes[0], with_open, strict=True):
            rows = sorted(placement["open"], key=lambda r: r["rate"])
            rates = [r["rate"] for r in rows]
            for key, style in (("p50", "o-"), ("p90", "s-"), ("p99", "^-")):
                ax.plot(rates, [r["latency_ms"][key] for r in rows], style, label=key)
            target = placement["verdicts"]["targets"].get("open_p99_at_half_rate")
            if target:
                ax.axhline(target["bound_ms"], ls="--", c="red", lw=1, label="p99 target at 0.5 x saturated")
                ax.axvline(target["rate"], ls=":", c="grey", lw=1)
            ax.set_xlabel("offered load (requests/s, 1 image each, Poisson)")
            ax.set_ylabel("latency ms (from scheduled arrival)")
            ax.set_yscale("log")
            ax.set_title(f"ours (tent): latency vs offered load ({placement['placement']})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        written.append(_save(fig, out / "latency_vs_load.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----- profile -----

CATEGORIES = (  # the first category whose needle is in a frame wins, searching from the leaf frame upwards
    ("model (forward, backward, optimiser, guards)", ("engine.py", "torch/nn/", "torch/optim", "torch/autograd",
                                                      "norm.py", "cifar_resnet", "guards.py", "libtorch", "at::",
                                                      "c10::", "mkl", "dnnl", "gomp", "omp")),
    ("worker postprocess (softmax, top-k, tolist)", ("worker.py",)),
    ("image decode (PIL header + torchvision)", ("preprocess.py", "PIL/", "torchvision/", "libjpeg", "decode_jpeg")),
    ("multipart parsing", ("multipart", "formparsers", "parsing.py")),
    ("response building + JSON", ("jsonable_encoder", "serialize_response", "pydantic", "json/", "orjson",
                                  "encoders", "responses.py")),
    ("prometheus metrics", ("prometheus_client",)),
    ("route code (ids, ledger)", ("routes.py", "ledger.py", "uuid.py")),
    ("batcher", ("batcher.py",)),
    ("HTTP protocol (uvicorn/httptools/h11)", ("uvicorn/", "h11", "httptools")),
    ("framework (starlette/fastapi/anyio middleware)", ("starlette/", "fastapi/", "anyio/", "errors.py")),
    ("waiting for a lock / the GIL (thread hand-off)", ("threading.py", "concurrent/futures", "queue.py",
                                                        "pthread_cond", "take_gil", "drop_gil")),
    ("event loop (uvloop/asyncio: sockets, callbacks)", ("asyncio/", "uvloop", "selectors", "epoll", "runners.py")),
)  # fmt: skip


def classify(frames: list[str]) -> str:
    for frame in reversed(frames):  # py-spy's raw format puts the leaf last
        for category, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return category
    return "other"


def summarise_profile(raw: Path) -> dict:
    """py-spy's raw (collapsed) stacks -> percent of samples per category, overall and per thread."""
    totals: dict[str, int] = {}
    by_thread: dict[str, dict[str, int]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread") else "?"
        thread = "AnyIO worker thread (decode pool)" if thread.startswith("AnyIO") else thread
        category = classify(frames[1:])
        totals[category] = totals.get(category, 0) + int(count)
        by_thread.setdefault(thread, {})
        by_thread[thread][category] = by_thread[thread].get(category, 0) + int(count)
    total = sum(totals.values()) or 1

    def percent(counts: dict[str, int]) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}

    return {
        "samples": total,
        "percent": percent(totals),
        "by_thread_percent": {t: percent(c) for t, c in by_thread.items()},
    }


def scrape(url: str) -> dict[str, float]:
    """The batch-phase sums and counts from our /metrics."""
    wanted = {
        'tta_batch_duration_seconds_sum{phase="model"}': "model_s",
        'tta_batch_duration_seconds_sum{phase="postprocess"}': "postprocess_s",
        'tta_batch_duration_seconds_sum{phase="queue_wait"}': "queue_wait_s",
        "tta_batch_size_sum": "images",
        "tta_batch_size_count": "batches",
        "tta_adaptation_steps_total": "steps",
    }
    text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            values[wanted[name]] = float(value)
    return values


def profile(args: argparse.Namespace, workdir: Path, model: Path, out: Path) -> dict:
    """Ours (tent, pinned to core 0, 1 torch thread) kept saturated by the generator on core 1: the share of the
    server's core that the model step takes (from /metrics), the rest split by py-spy samples, plus flame graphs."""
    pyspy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    seconds = 4 if args.quick else 15
    c = max(args.concurrencies)
    print(f"== profile: ours-tent pinned at c={c}, py-spy {seconds} s per view", flush=True)
    result: dict = {"concurrency": c}
    with running("ours-tent", model, True, workdir) as server:
        warm = ["--closed", str(c), "--requests", str(args.warmup), "--duration", "30"]
        subprocess.run([PY, "-m", "bench.load", "--url", server.url, *warm], cwd=ROOT, capture_output=True, timeout=90)
        wait_for_quiet(args.quiet_wait, server.process.pid)
        total_s = 3 * seconds + 8
        load = subprocess.Popen(
            ["taskset", "-c", "1", PY, "-m", "bench.load", "--url", server.url, "--closed", str(c),
             "--requests", "10000000", "--duration", str(total_s), "--json", str(workdir / "profile-load.json")],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(3)
            before, cpu0, t0 = scrape(server.url), cpu_seconds(server.process.pid), time.monotonic()
            views = (
                ("all threads", ["--format", "raw"], "profile.raw.txt"),
                ("GIL holder only", ["--format", "raw", "--gil"], "profile.gil.raw.txt"),
                ("flame graph", ["--format", "flamegraph"], "profile.svg"),
            )
            for _, extra, name in views:
                subprocess.run(
                    [pyspy, "record", "--pid", str(server.process.pid), "--duration", str(seconds), "--rate", "250",
                     "--threads", "--nonblocking", *extra, "--output", str(out / name)],
                    check=True, capture_output=True, timeout=seconds + 60,
                )  # fmt: skip
            after, cpu1, t1 = scrape(server.url), cpu_seconds(server.process.pid), time.monotonic()
        finally:
            load.wait(timeout=total_s + 60)
    wall = t1 - t0
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    result["window_s"] = round(wall, 2)
    result["server_cpu_cores"] = round((cpu1 - cpu0) / wall, 3)
    result["images_per_s"] = round(delta["images"] / wall, 1)
    result["mean_batch_size"] = round(delta["images"] / max(delta["batches"], 1), 2)
    result["core_share_percent"] = {
        "model step (engine.step + normalise)": round(100 * delta["model_s"] / wall, 1),
        "worker postprocess": round(100 * delta["postprocess_s"] / wall, 1),
        "everything else (HTTP, parsing, decode, JSON, event loop, idle)": round(
            100 * (1 - (delta["model_s"] + delta["postprocess_s"]) / wall), 1
        ),
    }
    result["model_ms_per_batch"] = round(1000 * delta["model_s"] / max(delta["batches"], 1), 3)
    result["pyspy_all_threads"] = summarise_profile(out / "profile.raw.txt")
    result["pyspy_gil"] = summarise_profile(out / "profile.gil.raw.txt")
    result["load"] = json.loads((workdir / "profile-load.json").read_text())
    return result


# ----- main -----


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    import torch

    info = {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    with contextlib.suppress(ImportError):
        import litserve

        info["litserve"] = litserve.__version__
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        info["uvloop"] = True
    with contextlib.suppress(ImportError):
        import httptools  # noqa: F401

        info["httptools"] = True
    info["summary"] = (
        f"{info['nproc']} CPUs ({model}), Python {info['python']}, torch {info['torch']}, "
        f"CUDA {'yes' if info['cuda'] else 'no'}, LitServe {info.get('litserve', 'missing')}; "
        "the load generator runs on the same machine"
    )
    return info


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so every server started is stopped
    parser = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the committed default)")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--placements", default="pinned", help="pinned, unpinned or both (comma-separated)")
    parser.add_argument("--concurrencies", default="1,8,32,64")
    parser.add_argument("--requests", type=int, default=20000, help="bound per closed-loop run")
    parser.add_argument("--duration", type=float, default=15.0, help="bound per closed-loop run, s")
    parser.add_argument("--warmup", type=int, default=200, help="requests before each server's first run")
    parser.add_argument("--open-fractions", default="0.1,0.25,0.5,0.75,0.9")
    parser.add_argument("--open-duration", type=float, default=15.0)
    parser.add_argument("--quiet-wait", type=float, default=300, help="max s to wait for other jobs before a run")
    parser.add_argument("--reuse", type=Path, help="earlier speed.json: keep its rows for servers not run now")
    parser.add_argument("--retries", type=int, default=2, help="re-runs of a run that other jobs disturbed")
    parser.add_argument("--profile", action="store_true", help="py-spy ours (tent) at saturation")
    parser.add_argument("--quick", action="store_true", help="smoke: tiny bounds, concurrency 1 and 8")
    parser.add_argument("--out", type=Path, default=None, help=f"default {RESULTS} ({RESULTS}-quick with --quick)")
    parser.add_argument(
        "--docs", type=Path, default=None, help=f"copies of table and plots (default {DOCS}; none in quick)"
    )
    args = parser.parse_args(argv)
    args.servers = [s for s in args.servers.split(",") if s]
    args.concurrencies = [int(c) for c in args.concurrencies.split(",")]
    args.open_fractions = [float(f) for f in args.open_fractions.split(",") if f]
    if args.quick:
        args.concurrencies = args.concurrencies[:2] if len(args.concurrencies) > 2 else args.concurrencies
        args.requests, args.duration, args.warmup = min(args.requests, 200), min(args.duration, 3.0), 20
        args.open_fractions, args.open_duration = [0.5], min(args.open_duration, 3.0)
        args.quiet_wait = min(args.quiet_wait, 5)
    if args.out is None:
        args.out = RESULTS.with_name("speed-quick") if args.quick else RESULTS
    if args.docs is None:
        args.docs = None if args.quick else DOCS
    if not shutil.which("taskset") and "pinned" in args.placements:
        parser.error("taskset (util-linux) is needed for the pinned placement")

    from bench.limit import default_model

    model = (args.model or default_model()).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tta-speed-"))
    started = time.time()
    result: dict = {
        "machine": machine(),
        "model": str(model),
        "settings": {
            "max_batch_size": int(os.environ.get("TTA_MAX_BATCH_SIZE", 64)),
            "max_wait_ms": float(os.environ.get("TTA_MAX_WAIT_MS", 5.0)),
            "concurrencies": args.concurrencies,
            "requests_bound": args.requests,
            "duration_bound_s": args.duration,
            "warmup": args.warmup,
            "open_fractions": args.open_fractions,
            "open_duration_s": args.open_duration,
            "quick": args.quick,
        },
        "command": " ".join([Path(PY).name, "-m", "bench.speed", *(argv if argv is not None else sys.argv[1:])]),
        "placements": [],
    }
    top = max(args.concurrencies)
    for placement in [p for p in args.placements.split(",") if p]:
        run = run_placement(args, placement == "pinned", workdir, model)
        run["verdicts"] = verdicts(run, result["settings"]["max_wait_ms"], top)
        result["placements"].append(run)
        print(json.dumps(run["verdicts"], indent=2), flush=True)
    if args.profile:
        result["profile"] = profile(args, workdir, model, args.out)
        print(json.dumps({k: v for k, v in result["profile"].items() if k != "load"}, indent=2), flush=True)
    result["wall_s"] = round(time.time() - started, 1)
    (args.out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "speed.md").write_text(markdown(result))
    written = [args.out / "speed.json", args.out / "speed.md", *plots(result, args.out)]
    for name in ("profile.svg", "profile.raw.txt", "profile.gil.raw.txt"):
        if (args.out / name).is_file():
            written.append(args.out / name)
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        for path in written:
            if path.suffix != ".txt":
                shutil.copy2(path, args.docs / path.name)
    print(f"wrote {', '.join(str(p) for p in written)} (copies in {args.docs}); {result['wall_s']} s", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
