"""Scale out on Ray Serve: N replicas of the ordinary server, every stream's requests on one replica (`.[ray]`).

Each replica (`StreamReplica`) builds the ordinary FastAPI app from its Settings (`create_app`: worker, streams,
batcher, ledger, metrics) and calls it in-process, so it runs exactly the single server's code. An ingress
(`Ingress`, behind Ray Serve's HTTP proxy) reads a request's stream (the `X-TTA-Stream` header, else the body's
`stream` field, parsed as the server parses it), and sends the request to the stream's replica.

Routing: the stream is the request's multiplexed model id (`handle.options(multiplexed_model_id=stream)`), and a
custom request router (`StreamAffinityRouter`, Ray Serve's `request_router_config`) picks the replica by rendezvous
hashing of the stream over the running replicas' ids. Ray Serve's own multiplexing router is not strict enough for
adapted state: it prefers a replica that already holds the id, but when that replica stays busy for 1-2 s
(`RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S`) it sends the request to the replica with the fewest ids, then
to any, and a new id's first requests may go to several replicas before the replicas' loaded ids reach the router
(pushed every 0.1 s): each would then adapt on a share of the stream. Rendezvous hashing needs no shared table,
sends a stream to the same replica for as long as the set of replicas is the same (a busy replica makes its
requests wait, and its own admission answers 503), and when a replica is added or removed only the streams whose
first choice changed move (1/N of them).

A stream that moves (its replica removed or dead, or a new replica now its first choice) starts from the source on
its new replica, like an evicted stream; it is counted (`tta_ray_stream_moves_total`) in the application's table of
where each stream was served last (`Placements`, a named Ray actor). Its old state is not carried over (each
replica's snapshots, TTA_STATE_DIR, are its own; the Ray app does not use them).

Prediction ids: the ingress answers `<stream>/<id>` (a stream name has no `/`), so `/feedback` reaches the replica
that made the prediction without any table. `/reset` without `?stream`, `/v1/status`, `/v1/streams`, `/readyz` and
`/metrics` go to every replica (`DeploymentHandle.broadcast`) and are aggregated; the metrics get a `replica` label.
"""

import asyncio
import hashlib
import json
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from app.api.errors import install_error_handlers
from app.api.parsing import STREAM_HEADER, parse_feedback, parse_predict, read_body
from app.config import Settings
from app.main import create_app

REPLICA_HEADER = "X-TTA-Replica"  # on every answer that one replica made: which one
ID_SEPARATOR = "/"  # between the stream and the replica's own prediction id; never in a stream name
MAX_PLACEMENTS = 1 << 20  # streams whose last replica is remembered, to count moves
MOVES_HELP = (
    "streams served by another replica than their last (theirs removed, dead or outranked by a new one): they start "
    "again from the source there"
)
HOP_HEADERS = {b"host", b"content-length", b"connection", b"transfer-encoding"}


@dataclass
class Forwarded:
    """An HTTP request, as the ingress hands it to a replica."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    @classmethod
    def of(cls, request: Request, body: bytes = b"", path: str | None = None) -> "Forwarded":
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw if k not in HOP_HEADERS]
        return cls(request.method, path or request.url.path, request.url.query, headers, body)


@dataclass
class Answer:
    """A replica's HTTP answer, and which replica made it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    replica: str

    def json(self) -> Any:
        return json.loads(self.body)

    def response(self, body: bytes | None = None) -> Response:
        headers = {k: v for k, v in self.headers if k.lower() not in ("content-length", "content-encoding")}
        headers[REPLICA_HEADER] = self.replica
        return Response(self.body if body is None else body, self.status, headers)


# ----- routing -----


def rendezvous_weight(replica: str, stream: str) -> bytes:
    return hashlib.blake2b(f"{replica}\0{stream}".encode(), digest_size=8).digest()


def stream_replica(stream: str, replicas: Iterable[str]) -> str:
    """The replica a stream goes to: the one of highest weight (rendezvous hashing)."""
    return max(replicas, key=lambda replica: rendezvous_weight(replica, stream))


class StreamAffinityRouter(RequestRouter):
    """A request with a stream (its multiplexed model id) goes to its rendezvous replica only, however busy; a
    request without one to the least busy of all (Ray Serve probes each rank's queue lengths)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        stream = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not stream or not candidate_replicas:
            return [candidate_replicas]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        return [[by_id[stream_replica(stream, by_id)]]]


# ----- aggregating the replicas' answers -----


def aggregate_status(statuses: dict[str, dict[str, Any]], stream_moves: float) -> dict[str, Any]:
    """/v1/status over every replica: the counters summed, prequential accuracy from the summed counts, and each
    replica's own status under `replicas`."""
    first = next(iter(statuses.values()))
    adaptation = [s["adaptation"] for s in statuses.values()]
    prequential: dict[str, Any] = {}
    for model, score in first["prequential"].items():
        if isinstance(score, dict):
            labels = sum(s["prequential"][model]["labels"] for s in statuses.values())
            correct = sum(s["prequential"][model]["correct"] for s in statuses.values())
            prequential[model] = {
                "labels": labels,
                "correct": correct,
                "accuracy": correct / labels if labels else None,
            }
    return {
        "method": first["method"],
        "device": first["device"],
        "model": first["model"],
        "adaptation": {
            "steps_total": sum(a["steps_total"] for a in adaptation),
            "skipped": _sum_counts(a["skipped"] for a in adaptation),
            "resets": _sum_counts(a["resets"] for a in adaptation),
            "streams": dict(_sum_counts(a["streams"] for a in adaptation)),
        },
        "batching": {
            "queue_depth": sum(s["batching"]["queue_depth"] for s in statuses.values()),
            "max_queue_images": sum(s["batching"]["max_queue_images"] for s in statuses.values()),
        },
        "prequential": prequential,
        "ledger_entries": sum(s["ledger_entries"] for s in statuses.values()),
        "routing": {"replicas": len(statuses), "stream_moves": stream_moves},
        "replicas": statuses,
    }


def _sum_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter = Counter()
    for each in counts:
        total.update(each)
    return dict(total)


def with_replica_label(expositions: dict[str, str], own: list[Metric]) -> bytes:
    """Every replica's Prometheus exposition as one, each sample labelled with its replica, and the ingress's own."""
    families: dict[str, Metric] = {family.name: family for family in own}
    for replica, text in expositions.items():
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, "replica": replica}))

    class Merged:
        def collect(self) -> Iterable[Metric]:
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


# ----- a replica: the ordinary server, in-process -----


@serve.deployment(
    name="replica",
    request_router_config=RequestRouterConfig(request_router_class=StreamAffinityRouter),
    # The server batches concurrent requests and refuses with 503 when its queue is full: Ray Serve must not queue
    # them in front of it (a request waiting in the router's back-off is a request the batch does not see).
    max_ongoing_requests=1024,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=5,
)
class StreamReplica:
    async def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.app = create_app(self.settings)
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()  # loads the model, starts the worker and the batcher
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://replica", timeout=None
        )
        self.id = serve.get_replica_context().replica_id.unique_id

    async def call(self, request: Forwarded) -> Answer:
        url = f"{request.path}?{request.query}" if request.query else request.path
        response = await self.client.request(request.method, url, headers=request.headers, content=request.body)
        return Answer(response.status_code, list(response.headers.items()), response.content, self.id)

    async def check_health(self) -> None:
        answer = await self.call(Forwarded("GET", "/readyz", "", [], b""))
        if answer.status != 200:
            raise RuntimeError(f"replica not ready: {answer.body[:200]!r}")

    async def __del__(self) -> None:
        await self.client.aclose()
        await self.lifespan.__aexit__(None, None, None)  # drains the batcher, last snapshot, stops the worker


# ----- where each stream was served last: one table for the application -----


class Placements:
    """Which replica served each stream last, for the whole application (one named Ray actor, so that the count
    survives an ingress's restart and covers every ingress replica): a stream served by another replica than its
    last has moved, and started again from the source there."""

    def __init__(self, limit: int = MAX_PLACEMENTS) -> None:
        self.last: OrderedDict[str, str] = OrderedDict()
        self.limit = limit
        self.moves = 0

    def record(self, stream: str, replica: str) -> None:
        last = self.last.get(stream)
        if last is not None and last != replica:
            self.moves += 1
        self.last[stream] = replica
        self.last.move_to_end(stream)
        if len(self.last) > self.limit:
            self.last.popitem(last=False)

    def moved(self) -> int:
        return self.moves


def placements_table(app_name: str) -> Any:
    """The application's Placements actor, created by the first ingress replica that asks."""
    import ray

    table = ray.remote(num_cpus=0)(Placements)
    return table.options(
        name=f"tta-placements-{app_name}", namespace="serve", get_if_exists=True, lifetime="detached"
    ).remote()


# ----- the ingress: one service in front of the replicas -----
# Ray Serve pickles a deployment's class when it is decorated: what its methods use is defined above it.

api = FastAPI(title="TTA inference server (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(api)  # the server's own error answers (413 request_too_large, 422 invalid_stream, ...)


def replayed(request: Request, body: bytes) -> Request:
    """A request whose body can be read again (by the server's own parser)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


@serve.deployment(name="ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
@serve.ingress(api)
class Ingress:
    def __init__(self, replicas: DeploymentHandle, settings: Settings | None = None) -> None:
        self.replicas = replicas
        self.settings = settings or Settings()
        self.placements = placements_table(serve.get_replica_context().app_name)
        self.seen: OrderedDict[str, str] = OrderedDict()  # what this ingress told the table last, per stream

    async def one(self, forwarded: Forwarded, stream: str | None) -> Answer:
        handle = self.replicas.options(multiplexed_model_id=stream) if stream else self.replicas
        answer = await handle.call.remote(forwarded)
        if stream and answer.status < 400:  # a refused name (422 invalid_stream, of any length) is never kept
            self.placed(stream, answer.replica)
        return answer

    async def every(self, forwarded: Forwarded) -> list[Answer]:
        return sorted(await self.replicas.broadcast("call", forwarded).results_async(), key=lambda a: a.replica)

    def placed(self, stream: str, replica: str) -> None:
        """Tell the table when this ingress has not seen the stream on this replica (no answer awaited: the table's
        calls from one caller run in order)."""
        if self.seen.get(stream) != replica:
            self.placements.record.remote(stream, replica)
        self.seen[stream] = replica
        self.seen.move_to_end(stream)
        if len(self.seen) > MAX_PLACEMENTS:
            self.seen.popitem(last=False)

    @api.post("/predict")
    async def predict(self, request: Request) -> Response:
        body = await read_body(request, self.settings.max_request_bytes)
        stream = (
            request.headers.get(STREAM_HEADER) or (await parse_predict(replayed(request, body), self.settings)).stream
        )
        answer = await self.one(Forwarded.of(request, body), stream)
        if answer.status != 200:
            return answer.response()
        content = answer.json()
        for prediction in content["predictions"]:
            prediction["id"] = f"{stream}{ID_SEPARATOR}{prediction['id']}"
        return answer.response(json.dumps(content, separators=(",", ":")).encode())

    @api.post("/feedback")
    async def feedback(self, request: Request) -> Response:
        """Each stream's labels to its replica: all or nothing within a stream; a list over several streams is
        applied stream by stream, and the first refusal stops it (the earlier streams' labels stay)."""
        body = await read_body(request, self.settings.max_feedback_bytes)
        items = await parse_feedback(replayed(request, body), self.settings)
        by_stream: dict[str, list[dict[str, Any]]] = {}
        for item in items:
            stream, _, local = item.id.rpartition(ID_SEPARATOR)  # no separator: stream "", the replica says 404
            by_stream.setdefault(stream, []).append({"id": local or item.id, "label": item.label})
        labelled = correct = 0
        last: Answer | None = None
        for stream, labels in by_stream.items():
            last = await self.one(Forwarded.of(request, json.dumps(labels).encode()), stream)
            if last.status != 200:
                return last.response()
            labelled, correct = labelled + last.json()["labelled"], correct + last.json()["correct"]
        assert last is not None  # parse_feedback refuses an empty list
        return last.response(json.dumps({"labelled": labelled, "correct": correct}).encode())

    @api.post("/reset")
    async def reset(self, request: Request) -> Response:
        stream = request.query_params.get("stream")
        if stream is not None:
            return (await self.one(Forwarded.of(request), stream)).response()
        answers = await self.every(Forwarded.of(request))
        if refused := next((a for a in answers if a.status != 200), None):
            return refused.response()
        contents = [a.json() for a in answers]
        return JSONResponse(
            {
                "reset": True,
                "adaptation_step": max(c["adaptation_step"] for c in contents),
                "streams": sorted({name for c in contents for name in c["streams"]}),
            }
        )

    @api.get("/v1/streams")
    async def streams(self, request: Request) -> Response:
        answers = await self.every(Forwarded.of(request))
        if refused := next((a for a in answers if a.status != 200), None):
            return refused.response()
        contents = [(a.replica, a.json()) for a in answers]
        return JSONResponse(
            {
                "streams": [{**s, "replica": replica} for replica, c in contents for s in c["streams"]],
                "max_streams": sum(c["max_streams"] for _, c in contents),
                "evicted": sum(c["evicted"] for _, c in contents),
            }
        )

    @api.get("/v1/streams/{stream}")
    async def one_stream(self, request: Request, stream: str) -> Response:
        return (await self.one(Forwarded.of(request), stream)).response()

    @api.get("/v1/status")
    async def status(self, request: Request) -> Response:
        answers = await self.every(Forwarded.of(request))
        if refused := next((a for a in answers if a.status != 200), None):
            return refused.response()
        moves = await self.placements.moved.remote()
        return JSONResponse(aggregate_status({a.replica: a.json() for a in answers}, moves))

    @api.get("/readyz")
    async def readyz(self, request: Request) -> Response:
        answers = await self.every(Forwarded.of(request))
        return next((a for a in answers if a.status != 200), answers[0]).response()

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        answers = await self.every(Forwarded.of(request))
        moves = CounterMetricFamily("tta_ray_stream_moves", MOVES_HELP, value=await self.placements.moved.remote())
        text = with_replica_label({a.replica: a.body.decode() for a in answers}, [moves])
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def anything_else(self, request: Request, path: str) -> Response:
        """The live page, /docs, /openapi.json, unknown routes: any replica answers them as the server would."""
        return (await self.one(Forwarded.of(request, await request.body()), None)).response()


# ----- building and running it -----


def build(settings: Settings | None = None, replicas: int | None = None) -> serve.Application:
    """The application: `replicas` replicas (None: the deployment's default, or the config file's autoscaling)."""
    replica = StreamReplica.options(num_replicas=replicas) if replicas else StreamReplica
    return Ingress.bind(replica.bind(settings), settings)


def app_builder(args: dict[str, str]) -> serve.Application:
    """For `serve run` and config files (deploy/ray/serve.yaml): settings from the replicas' TTA_ variables."""
    return build(replicas=int(args["replicas"]) if "replicas" in args else None)


def serve_locally(settings: Settings, replicas: int, log_level: str = "info") -> None:
    """`tta serve --replicas N`: a local Ray cluster with one CPU per replica (one GPU each with TTA_DEVICE=cuda),
    the service on settings.host:port, until SIGINT or SIGTERM."""
    import signal

    import ray

    gpus = replicas if settings.device.startswith("cuda") else 0
    ray.init(num_cpus=replicas, num_gpus=gpus, include_dashboard=False, logging_level=log_level.upper())
    serve.start(http_options={"host": settings.host, "port": settings.port})
    replica = StreamReplica.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": 1, "num_gpus": 1 if gpus else 0}
    )
    serve.run(Ingress.bind(replica.bind(settings), settings), name="tta", route_prefix="/")
    stop = asyncio.Event()

    async def wait() -> None:
        loop = asyncio.get_running_loop()
        for each in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(each, stop.set)
        await stop.wait()

    asyncio.run(wait())
    serve.shutdown()
    ray.shutdown()
