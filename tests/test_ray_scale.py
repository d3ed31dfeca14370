"""Scale out on Ray Serve (app/ray_app.py): a real local Ray cluster on loopback, 2 replicas, 8 streams of real
CIFAR-10 test JPEGs. Slow (Ray's start and two replicas loading torch: about a minute): marked `ray`, left out of
`make test`, run by `make test-ray` (which installs the `.[ray]` extra)."""

import asyncio
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
import torch

from app.config import Settings
from tests.servers import free_port, in_process_client, metric_value

pytestmark = pytest.mark.ray

STREAMS = [f"cam-{i}" for i in range(8)]
REQUESTS, IMAGES = 4, 8  # per stream; the last request's labels come later, through /feedback
# min_batch = a request's images: each stream's share of a batch then steps on its own (no forward pass shared
# with other streams' buffered images, which is exact only to 1e-5), and 8 streams x 8 images fit one batch of 64,
# so no request is split: the replicas' batches compute exactly what a server fed one stream alone computes.
SETTINGS = {"min_batch": IMAGES, "max_batch_size": 64}


def ray_or_skip() -> ModuleType:
    """Ray, imported here only (so that `make test` never imports it); skipped without it, failed under CI=true
    (where `make test-ray` has installed it, and a skip would hide a broken install)."""
    try:
        import ray
    except ImportError:
        reason = "Ray Serve is not installed: pip install -e '.[ray]' (make test-ray does)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so this is an error rather than a skip")
        pytest.skip(reason)
    return ray


@pytest.fixture(scope="module")
def deployed(model_path: Path) -> Settings:
    """The replicas' settings: the same object when the application is deployed again (a changed replica count
    then scales the running replicas instead of replacing them)."""
    return Settings(model=model_path, **SETTINGS)


@pytest.fixture(scope="module")
def cluster(deployed: Settings) -> Iterator[str]:
    """The Ray Serve application on a local cluster of 2 CPUs (one per replica); yields its base URL."""
    ray = ray_or_skip()
    from ray import serve

    from app.ray_app import build

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(deployed, replicas=2), name="tta", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def stream_requests(jpeg_images: list[tuple[str, bytes, int]]) -> dict[str, list[list[tuple[bytes, int]]]]:
    """Each stream's requests: the real test JPEGs in an order of its own."""
    plan = {}
    for seed, stream in enumerate(STREAMS):
        order = np.random.default_rng(seed).permutation(len(jpeg_images))[: REQUESTS * IMAGES]
        picked = [(jpeg_images[i][1], jpeg_images[i][2]) for i in order]
        plan[stream] = [picked[r * IMAGES : (r + 1) * IMAGES] for r in range(REQUESTS)]
    return plan


async def feed(client: httpx.AsyncClient, stream: str, requests: list[list[tuple[bytes, int]]]) -> list[httpx.Response]:
    """One stream's requests one after the other (labels with all but the last)."""
    answers = []
    for r, images in enumerate(requests):
        data = {"labels": ",".join(str(label) for _, label in images)} if r < len(requests) - 1 else {}
        files = [("files", (f"{i}.jpg", io.BytesIO(jpeg), "image/jpeg")) for i, (jpeg, _) in enumerate(images)]
        answer = await client.post("/predict", files=files, data=data, headers={"X-TTA-Stream": stream})
        assert answer.status_code == 200, answer.text
        answers.append(answer)
    return answers


def without_ids(answer: httpx.Response) -> dict:
    content = answer.json()
    for prediction in content["predictions"]:
        del prediction["id"]
    return content


def test_streams_stay_on_their_replica_and_predict_as_one_server(
    cluster: str, model_path: Path, jpeg_images: list[tuple[str, bytes, int]]
) -> None:
    torch.set_num_threads(1)  # as each replica runs (Ray gives a 1-CPU actor one thread): the same float sums
    plan = stream_requests(jpeg_images)

    async def through_ray() -> dict[str, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=cluster, timeout=120) as client:
            answers = await asyncio.gather(*(feed(client, s, plan[s]) for s in STREAMS))  # the streams at once
            late = [
                {"id": p["id"], "label": label}
                for s, stream_answers in zip(STREAMS, answers, strict=True)
                for p, (_, label) in zip(stream_answers[-1].json()["predictions"], plan[s][-1], strict=True)
            ]
            feedback = await client.post("/feedback", json=late)
            assert feedback.status_code == 200, feedback.text
            assert feedback.json()["labelled"] == len(STREAMS) * IMAGES
            return dict(zip(STREAMS, answers, strict=True))

    async def alone() -> dict[str, list[httpx.Response]]:
        """The single server, in-process, fed each stream by itself."""
        async with in_process_client(model=model_path, **SETTINGS) as (client, _):
            return {s: await feed(client, s, plan[s]) for s in STREAMS}

    served, expected = asyncio.run(through_ray()), asyncio.run(alone())
    for stream in STREAMS:
        assert [without_ids(a) for a in served[stream]] == [without_ids(a) for a in expected[stream]], stream
    replica_of = {s: {a.headers["x-tta-replica"] for a in served[s]} for s in STREAMS}
    assert all(len(replicas) == 1 for replicas in replica_of.values()), replica_of

    # Every stream in one replica's own table only, with all its labels (the late ones reached it too).
    listed = httpx.get(f"{cluster}/v1/streams", timeout=30).json()["streams"]
    for stream in STREAMS:
        entries = [entry for entry in listed if entry["stream"] == stream]
        assert [entry["replica"] for entry in entries] == list(replica_of[stream]), (stream, entries)
        assert entries[0]["prequential"]["adapted"]["labels"] == REQUESTS * IMAGES
        assert entries[0]["steps_total"] == REQUESTS

    # A reset of one stream reaches its replica and no other stream.
    reset = httpx.post(f"{cluster}/reset", params={"stream": "cam-3"}, timeout=30)
    assert reset.status_code == 200 and reset.json()["streams"] == ["cam-3"], reset.text
    assert reset.headers["x-tta-replica"] == next(iter(replica_of["cam-3"]))
    after = {e["stream"]: e for e in httpx.get(f"{cluster}/v1/streams", timeout=30).json()["streams"]}
    assert after["cam-3"]["steps_since_reset"] == 0 and after["cam-3"]["resets"].get("manual") == 1
    others = [after[s] for s in STREAMS if s != "cam-3"]
    assert all(e["steps_since_reset"] == REQUESTS and not any(e["resets"].values()) for e in others), others

    # The aggregated status adds up: over the replicas' own statuses, and to what was sent.
    status = httpx.get(f"{cluster}/v1/status", timeout=30).json()
    replicas = status["replicas"]
    assert status["routing"]["replicas"] == len(replicas) == 2
    assert status["adaptation"]["steps_total"] == sum(r["adaptation"]["steps_total"] for r in replicas.values())
    assert status["adaptation"]["steps_total"] == len(STREAMS) * REQUESTS
    assert {reason: n for reason, n in status["adaptation"]["resets"].items() if n} == {"manual": 1}
    assert status["prequential"]["adapted"]["labels"] == len(STREAMS) * REQUESTS * IMAGES
    assert status["adaptation"]["streams"]["active"] == sum(
        r["adaptation"]["streams"]["active"] for r in replicas.values()
    )
    assert status["routing"]["stream_moves"] == 0

    # /metrics: every replica's series, labelled with it, summing to what was sent.
    exposition = httpx.get(f"{cluster}/metrics", timeout=30).text
    predicted = sum(metric_value(exposition, "tta_predictions_total", f'replica="{r}"') for r in replicas)
    assert predicted == len(STREAMS) * REQUESTS * IMAGES

    # A reset without ?stream reaches every replica.
    everything = httpx.post(f"{cluster}/reset", timeout=30)
    assert everything.status_code == 200 and set(STREAMS) <= set(everything.json()["streams"]), everything.text
    assert httpx.get(f"{cluster}/v1/status", timeout=30).json()["adaptation"]["resets"]["manual"] == 1 + len(
        listed
    )  # every stream each replica holds (its `default` too), once, plus cam-3's first reset


def test_the_stream_in_the_body_routes_as_the_header_and_errors_are_the_servers(
    cluster: str, jpeg_images: list[tuple[str, bytes, int]]
) -> None:
    files = [("files", ("a.jpg", jpeg_images[0][1], "image/jpeg"))]
    in_body = [httpx.post(f"{cluster}/predict", files=files, data={"stream": "cam-body"}, timeout=60) for _ in "ab"]
    in_header = httpx.post(f"{cluster}/predict", files=files, headers={"X-TTA-Stream": "cam-body"}, timeout=60)
    assert all(a.status_code == 200 for a in [*in_body, in_header])
    assert len({a.headers["x-tta-replica"] for a in [*in_body, in_header]}) == 1
    assert in_body[0].json()["predictions"][0]["id"].startswith("cam-body/")

    invalid = httpx.post(f"{cluster}/predict", files=files, headers={"X-TTA-Stream": "a b"}, timeout=60)
    assert invalid.status_code == 422 and invalid.json()["error"] == "invalid_stream", invalid.text
    unknown = httpx.post(f"{cluster}/feedback", json={"id": "0123456789abcdef", "label": 1}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_prediction", unknown.text


def test_the_config_files_are_serve_configs_ray_accepts() -> None:
    """deploy/ray/serve.yaml and the KubeRay manifest's serveConfigV2, read by Ray Serve's own schema (which keeps
    unknown autoscaling keys, so those are checked against its AutoscalingConfig's fields), and built."""
    ray_or_skip()
    import yaml
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from app.ray_app import app_builder

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    manifest = yaml.safe_load((deploy / "kuberay" / "rayservice.yaml").read_text())
    for config in (
        yaml.safe_load((deploy / "ray" / "serve.yaml").read_text()),
        yaml.safe_load(manifest["spec"]["serveConfigV2"]),
    ):
        parsed = ServeDeploySchema.model_validate(config)
        for deployment in parsed.applications[0].deployments:
            if isinstance(deployment.autoscaling_config, dict):
                assert set(deployment.autoscaling_config) <= set(AutoscalingConfig.model_fields)
                AutoscalingConfig.model_validate(deployment.autoscaling_config)
    assert app_builder({}) is not None and app_builder({"replicas": "3"}) is not None


def test_a_removed_replicas_streams_move_start_from_the_source_and_are_counted(
    cluster: str, deployed: Settings, jpeg_images: list[tuple[str, bytes, int]]
) -> None:
    """Last: it scales the application down to one replica."""
    from ray import serve

    from app.ray_app import build

    one_per_class = jpeg_images[::4][:IMAGES]  # 8 classes: the class-balance guard lets each request step
    files = [("files", (f"{i}.jpg", jpeg, "image/jpeg")) for i, (_, jpeg, _) in enumerate(one_per_class)]

    def predict(stream: str) -> httpx.Response:
        answer = httpx.post(f"{cluster}/predict", files=files, headers={"X-TTA-Stream": stream}, timeout=60)
        assert answer.status_code == 200, answer.text
        return answer

    streams, replicas = list(STREAMS), {predict(s).headers["x-tta-replica"] for s in STREAMS}
    while len(replicas) < 2 and len(streams) < 64:  # so that the removed replica surely holds a stream
        streams.append(f"probe-{len(streams)}")
        replicas.add(predict(streams[-1]).headers["x-tta-replica"])
    assert len(replicas) == 2
    before = {e["stream"]: e for e in httpx.get(f"{cluster}/v1/streams", timeout=30).json()["streams"]}

    serve.run(build(deployed, replicas=1), name="tta", route_prefix="/")
    deadline = time.monotonic() + 60
    while len((status := httpx.get(f"{cluster}/v1/status", timeout=30).json())["replicas"]) > 1:
        assert time.monotonic() < deadline, "the ingress still sees 2 replicas a minute after the scale-down"
        time.sleep(0.5)
    (survivor,) = status["replicas"]
    assert all(predict(s).headers["x-tta-replica"] == survivor for s in streams)
    after = {e["stream"]: e for e in httpx.get(f"{cluster}/v1/streams", timeout=30).json()["streams"]}
    moved = [s for s in streams if before[s]["replica"] != survivor]
    for stream in streams:  # moved: from the source; stayed: its state goes on
        assert after[stream]["steps_total"] == (1 if stream in moved else before[stream]["steps_total"] + 1), stream
    counted = httpx.get(f"{cluster}/v1/status", timeout=30).json()["routing"]["stream_moves"]
    exposition = httpx.get(f"{cluster}/metrics", timeout=30).text
    assert counted == metric_value(exposition, "tta_ray_stream_moves_total") == len(moved) > 0
