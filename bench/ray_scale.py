"""Scale out on Ray Serve (app/ray_app.py): saturated images/s with 1 and 2 replicas, and the routing overhead per
request against the single server at one connection. Needs the `.[ray]` extra and ../shared's test JPEGs.

One local Ray cluster of `--cpus` CPUs (one per replica), the application redeployed with 1 then 2 replicas, in
`--rounds` interleaved rounds (the machine is shared: interleaving spreads its load over both); the load is
bench.load's closed loop, its clients spread over `--streams` streams, so rendezvous hashing spreads them over the
replicas. The single server is `tta serve` (bench.speed's "ours", TENT), measured beside Ray's 1 replica at one
connection, one image per request, in each round.

    python -m bench.ray_scale --json bench/results/ray_scale.json
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import httpx

from bench.load import DEFAULT_DATA, LoadReport, load_jpegs, run_load, table
from bench.speed import cpu_seconds, free_port, running

ROOT = Path(__file__).resolve().parent.parent


def replica_steps(url: str) -> dict[str, int]:
    """Adaptation steps each replica made (its own counter), from the aggregated /v1/status."""
    status = httpx.get(f"{url}/v1/status", timeout=30, trust_env=False).json()
    return {replica: s["adaptation"]["steps_total"] for replica, s in status["replicas"].items()}


ROLES = {"proxy": "ProxyActor", "ingress": "ServeReplica:tta:ingress", "replicas": "ServeReplica:tta:replica"}


def role_cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of the Ray processes of each role (by their process titles, `ray::ProxyActor`, ...)."""
    totals = dict.fromkeys(ROLES, 0.0)
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, ValueError):
            continue
        for role, marker in ROLES.items():
            if title.startswith("ray::") and marker in title:
                totals[role] += cpu_seconds(int(entry.name))
    return totals


def route_latency(url: str, requests: int) -> dict:
    """GET /v1/streams/default one after the other: a route that one replica answers without the model, so the
    time is the HTTP path's (through Ray: proxy, ingress, router, replica and back)."""
    timings = []
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        for _ in range(requests):
            started = time.perf_counter()
            client.get("/v1/streams/default").raise_for_status()
            timings.append(time.perf_counter() - started)
    timings.sort()
    return {q: 1000 * timings[int(f * (len(timings) - 1))] for q, f in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (one per replica)")
    parser.add_argument("--replicas", default="1,2", help="replica counts to measure, in this order each round")
    parser.add_argument("--rounds", type=int, default=2, help="each measurement this many times, interleaved")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--connections-per-replica", type=int, default=8, help="saturating closed-loop clients")
    parser.add_argument("--images-per-request", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--latency-requests", type=int, default=150, help="one connection, one image per request")
    parser.add_argument("--route-requests", type=int, default=300, help="GETs of a route without the model")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from app.config import DEFAULT_MODEL, Settings
    from app.ray_app import build

    images = load_jpegs(args.data, limit=4096)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    results.update(saturated=[], one_connection=[], route_ms=[])

    def measured(kind: str, label: str, **load) -> dict:
        before = os.getloadavg()[0]
        report = run_load(images=images, **load).as_dict()
        report.update(label=label, loadavg_before=before, loadavg_after=os.getloadavg()[0])
        print(label, table([run_report(report)]), sep="\n", flush=True)
        results[kind].append(report)
        return report

    workdir = Path(tempfile.mkdtemp(prefix="ray-scale-"))
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results["ray_start_s"] = time.perf_counter() - started
    url = f"http://127.0.0.1:{port}"
    settings = Settings(model=DEFAULT_MODEL, method="tent")
    counts = [int(n) for n in args.replicas.split(",")]
    latency = {"closed": 1, "requests": args.latency_requests, "duration_s": 120, "warmup": 20, "streams": 1}
    try:
        with running("ours", DEFAULT_MODEL, pinned=False, workdir=workdir) as single:
            for _ in range(args.rounds):
                for replicas in counts:
                    started = time.perf_counter()
                    serve.run(build(settings, replicas=replicas), name="tta", route_prefix="/")
                    results.setdefault("deploy_s", []).append(time.perf_counter() - started)
                    if replicas == 1:  # the routing overhead: the same request, one connection, both paths
                        measured("one_connection", "single server", url=single.url, **latency)
                        measured("one_connection", "ray, 1 replica", url=url, **latency)
                        for label, where in (("single server", single.url), ("ray, 1 replica", url)):
                            results["route_ms"].append({"label": label, **route_latency(where, args.route_requests)})
                            print(label, "GET /v1/streams/default", results["route_ms"][-1], flush=True)
                    before, cpu_before = replica_steps(url), role_cpu_seconds()
                    run = measured(
                        "saturated",
                        f"ray, {replicas} replica(s)",
                        url=url,
                        closed=args.connections_per_replica * replicas,
                        requests=10**6,
                        duration_s=args.duration,
                        images_per_request=args.images_per_request,
                        warmup=args.connections_per_replica * replicas * 2,
                        streams=args.streams,
                    )
                    after, cpu_after = replica_steps(url), role_cpu_seconds()
                    run["steps_per_replica"] = {r: after[r] - before.get(r, 0) for r in after}
                    # CPU ms per request of each role: the proxy's and the ingress's are the routing's cost
                    run["cpu_ms_per_request"] = {
                        role: 1000 * (cpu_after[role] - cpu_before[role]) / max(run["requests"], 1) for role in ROLES
                    }
                    print("CPU ms per request", run["cpu_ms_per_request"], flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    results["machine"] = {"cpus": os.cpu_count()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


def run_report(report: dict) -> LoadReport:
    return LoadReport(**{k: v for k, v in report.items() if k in LoadReport.__dataclass_fields__})


if __name__ == "__main__":
    raise SystemExit(main())
