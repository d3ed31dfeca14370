"""Per-stream adaptation: each stream adapts on its own state over one shared frozen backbone, with no cross-talk,
bounded in number, reset one by one, and served over HTTP under X-TTA-Stream or a `stream` field."""

import base64
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from app.adaptation.engine import AdaptationEngine
from app.adaptation.streams import StreamEngines
from app.config import Settings
from tests.conftest import shuffled_test_images
from tests.servers import in_process_client, metric_value

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(model_path: Path, test_zip: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """500 test images (50 per class), shuffled with a fixed seed, normalised as the server does."""
    x, y = shuffled_test_images(model_path, test_zip, 50)
    return x, y


def streams_of(source: tuple[nn.Module, Settings], max_streams: int = 16, **overrides: object) -> StreamEngines:
    model, settings = source
    settings = settings.model_copy(update=overrides)
    return StreamEngines(lambda: AdaptationEngine(model, 10, settings, CPU), max_streams)


def adapted_tensors(engine: AdaptationEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.adapted.state_dict().items()}


def test_the_frozen_backbone_is_shared_and_only_normalisation_is_per_stream(source) -> None:
    streams = streams_of(source)
    a, b = streams.engine("a"), streams.engine("b")
    shared = {p.data_ptr() for p in a.adapted.parameters()} & {p.data_ptr() for p in b.adapted.parameters()}
    trainable_a = {p.data_ptr() for p in a.params}
    assert shared, "the convolutions are one copy for all streams"
    assert not shared & trainable_a, "no adapted tensor is shared"
    assert all(not p.requires_grad for p in a.adapted.parameters() if p.data_ptr() in shared)


def test_a_mixed_batch_equals_the_streams_run_one_after_the_other(source, images) -> None:
    x, _ = images
    mixed, alone = streams_of(source), {name: streams_of(source) for name in ("a", "b", "c")}
    rng = np.random.default_rng(1)
    for start in range(0, 384, 96):
        batch = x[start : start + 96]
        names = [str(n) for n in rng.choice(["a", "b", "c"], len(batch), p=[0.7, 0.2, 0.1])]
        logits = torch.empty(len(batch), 10)
        for share, result in mixed.step(batch, names):
            logits[share.positions] = result.logits
        for name, engines in alone.items():
            rows = [i for i, n in enumerate(names) if n == name]
            ((share, result),) = engines.step(batch[rows], [name] * len(rows))
            assert torch.allclose(result.logits, logits[rows], atol=1e-5), name
    for name, engines in alone.items():
        expected, got = adapted_tensors(engines.engine(name)), adapted_tensors(mixed.engine(name))
        assert all(torch.allclose(expected[k], got[k], atol=1e-5) for k in expected), name
    assert mixed.engine("a").stats.steps_total > 0, "the 70% stream took steps"


def test_a_flood_of_one_class_in_another_stream_changes_nothing_in_this_one(source, images) -> None:
    x, y = images
    flood = x[y == 3].repeat(40, 1, 1, 1)[:2000]  # 2,000 images of one class (cats), as one client might send
    quiet, busy = streams_of(source), streams_of(source)
    answers = {"quiet": [], "busy": []}
    for i, start in enumerate(range(0, 320, 16)):
        batch = x[start : start + 16]
        ((_, result),) = quiet.step(batch, ["b"] * len(batch))
        answers["quiet"].append(result.logits)
        a_share = flood[i * 100 : (i + 1) * 100]
        both = torch.cat([a_share[:50], batch, a_share[50:]])  # stream b's images in the middle of a's
        for share, result in busy.step(both, ["a"] * 50 + ["b"] * len(batch) + ["a"] * 50):
            if share.name == "b":
                answers["busy"].append(result.logits)
    for q, b in zip(answers["quiet"], answers["busy"], strict=True):
        assert torch.equal(q, b), "stream b's predictions are bit-identical"
    assert adapted_tensors(quiet.engine("b")).keys() == adapted_tensors(busy.engine("b")).keys()
    for key, value in adapted_tensors(quiet.engine("b")).items():
        assert torch.equal(value, adapted_tensors(busy.engine("b"))[key]), key
    assert busy.engine("a").stats.steps_total + sum(busy.engine("a").stats.skipped.values()) > 0


def test_streams_are_bounded_and_the_least_recently_used_is_evicted(source, images) -> None:
    x, _ = images
    streams = streams_of(source, max_streams=2)
    streams.step(x[:8], ["one"] * 8)
    streams.step(x[8:16], ["two"] * 8)
    streams.step(x[16:24], ["one"] * 8)  # "one" is now the most recent: "two" goes next
    streams.step(x[24:32], ["three"] * 8)
    assert len(streams) == 2 and "two" not in streams and "one" in streams and "three" in streams
    assert streams.evicted == 1
    assert streams.totals(streams.snapshots({}))["skipped"]["small_batch_buffered"] == 4, "evicted counts stay"


def test_reset_of_one_stream_leaves_the_other_exactly_as_it_was(source, images) -> None:
    x, _ = images
    streams = streams_of(source)
    for start in range(0, 256, 64):
        streams.step(x[start : start + 64], ["a"] * 32 + ["b"] * 32)
        streams.step(x[start : start + 64], ["a"] * 64)
        streams.step(x[start : start + 64], ["b"] * 64)
    before_b = adapted_tensors(streams.engine("b"))
    steps_b = streams.engine("b").stats.steps_total
    assert streams.reset("manual", "a") == ["a"]
    fresh = adapted_tensors(streams_of(source).engine("x"))
    assert all(torch.equal(v, fresh[k]) for k, v in adapted_tensors(streams.engine("a")).items())
    assert all(torch.equal(v, before_b[k]) for k, v in adapted_tensors(streams.engine("b")).items())
    assert streams.engine("b").stats.steps_total == steps_b > 0
    assert streams.reset("manual", "never-seen") == []


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_streams_over_http(anyio_backend: str, model_path: Path, jpeg_images: list) -> None:
    picked = jpeg_images[::4] + jpeg_images[1::7]  # 16 images of every class
    files = [("files", (name, data)) for name, data, _ in picked]
    labels = ",".join(str(label) for _, _, label in picked)
    encoded = [base64.b64encode(data).decode() for _, data, _ in picked]
    # one step per 16-image request, whatever they are predicted as: this test is about streams, not guards
    settings = {"max_streams": 3, "min_batch": 16, "guard_balance": False, "guard_reliable": False}
    async with in_process_client(model=model_path, **settings) as (client, _):
        for _ in range(4):
            ok = await client.post("/predict", files=files, data={"labels": labels}, headers={"X-TTA-Stream": "cam-1"})
            assert ok.status_code == 200, ok.text
        by_field = await client.post("/predict", json={"images": encoded, "stream": "tenant:b"})
        assert by_field.status_code == 200 and by_field.json()["adaptation_step"] == 0, "predicted before its step"
        assert ok.json()["adaptation_step"] == 3, "cam-1's own steps: three before its fourth batch was answered"
        plain = await client.post("/predict", files=files)
        assert plain.json()["adaptation_step"] == 0, "the default stream has its own state"
        for bad in ("", "x" * 65, "has space", "ünï"):
            refused = await client.post("/predict", files=files, headers={"X-TTA-Stream": bad.encode()})
            assert (refused.status_code, refused.json()["error"]) == (422, "invalid_stream"), bad
        two = await client.post("/predict", json={"images": encoded, "stream": "a"}, headers={"X-TTA-Stream": "b"})
        assert (two.status_code, two.json()["error"]) == (422, "invalid_stream")

        listed = (await client.get("/v1/streams")).json()
        assert {s["stream"] for s in listed["streams"]} == {"cam-1", "tenant:b", "default"}
        cam = (await client.get("/v1/streams/cam-1")).json()
        assert cam["steps_total"] == 4 and cam["prequential"]["adapted"]["labels"] == 64
        assert (await client.get("/v1/streams/nope")).status_code == 404

        reset = await client.post("/reset", params={"stream": "cam-1"})
        assert reset.json() == {"reset": True, "adaptation_step": 0, "streams": ["cam-1"]}
        assert (await client.get("/v1/streams/tenant:b")).json()["steps_since_reset"] == 1, "untouched"
        assert (await client.post("/reset", params={"stream": "nope"})).status_code == 404

        await client.post("/predict", files=files, headers={"X-TTA-Stream": "fourth"})  # past max_streams=3
        status = (await client.get("/v1/status")).json()["adaptation"]  # waits for the batches' adaptation
        metrics = (await client.get("/metrics")).text  # read at scrape, without waiting: after the status
    assert metric_value(metrics, "tta_streams_active") == 3
    assert metric_value(metrics, "tta_streams_evicted_total") == 1
    assert status["streams"] == {"active": 3, "max": 3, "evicted": 1}
    assert status["steps_total"] == 4 + 1 + 1 + 1, "summed over every stream, the evicted one included"


def test_every_stream_survives_a_state_round_trip_exactly(source, images) -> None:
    x, _ = images
    before, after = streams_of(source), streams_of(source)
    for start in range(0, 192, 48):
        before.step(x[start : start + 48], ["a"] * 40 + ["b"] * 8)
    after.load_state_dicts(before.state_dicts())
    assert list(after.snapshots({})) == ["a", "b"]
    for start in range(192, 320, 64):
        batch, names = x[start : start + 64], ["b"] * 32 + ["a"] * 32
        for (share, ours), (_, theirs) in zip(before.step(batch, names), after.step(batch, names), strict=True):
            assert torch.equal(ours.logits, theirs.logits), share.name
    kept = {name: adapted_tensors(after.engine(name)) for name in ("a", "b")}
    broken = before.state_dicts()
    broken["b"]["tensors"] = {}
    with pytest.raises(ValueError):
        after.load_state_dicts(broken)
    for name, tensors in kept.items():
        assert all(torch.equal(v, adapted_tensors(after.engine(name))[k]) for k, v in tensors.items()), name


def test_a_snapshot_from_before_the_recent_residual_loads_with_it_empty(source, images) -> None:
    """Snapshots written before the recent residual was kept lack its tensors: the stream loads with the residual
    of a fresh stream (nothing recent), and the rest exactly as saved."""
    x, _ = images
    saved = streams_of(source)
    for start in range(0, 96, 16):
        saved.step(x[start : start + 16], ["a"] * 16)  # small batches: the residual is not empty
    state = saved.state_dicts()
    recent = [name for name in state["a"]["tensors"] if name.endswith(".recent_share")]
    assert recent and any(float(state["a"]["tensors"][name]) > 0 for name in recent)
    state["a"]["tensors"] = {k: v for k, v in state["a"]["tensors"].items() if ".recent_" not in k}
    loaded = streams_of(source)
    loaded.load_state_dicts(state)
    tensors, expected = adapted_tensors(loaded.engine("a")), adapted_tensors(saved.engine("a"))
    assert all(torch.equal(tensors[k], expected[k]) for k in state["a"]["tensors"] if k in expected)
    assert all(not bool(tensors[k].any()) for k in tensors if ".recent_" in k)
