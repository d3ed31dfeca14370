"""Persistence of the adapted state: the engine's exact round trip, the file format's refusals, the service's
restore and snapshots in-process, and kill -9 under load against the real server."""

import copy
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from app.adaptation.engine import AdaptationEngine
from app.config import Settings
from app.metrics.ledger import LedgerEntry, PredictionLedger
from app.serving import persistence
from app.serving.persistence import (
    FILE_NAME,
    SnapshotError,
    SnapshotFile,
    decode,
    ledger_entries_from_tensors,
    ledger_entries_to_tensors,
    model_digest,
)
from models.checkpoint import load_checkpoint
from tests.conftest import shuffled_test_images
from tests.servers import in_process_client, metric_value, running_server
from tests.test_docker_static import compose, dockerfile_instructions

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(model_path: Path, test_zip: Path) -> torch.Tensor:
    """400 test images (40 per class), shuffled with a fixed seed, normalised as the server does."""
    return shuffled_test_images(model_path, test_zip, 40)[0]


def engine(source: tuple[nn.Module, Settings], **overrides: object) -> AdaptationEngine:
    model, settings = source
    return AdaptationEngine(copy.deepcopy(model), 10, settings.model_copy(update=overrides), CPU)


def feed(e: AdaptationEngine, x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    logits, start = [], 0
    for size in sizes:
        logits.append(e.step(x[start : start + size]).logits)
        start += size
    return logits


def assert_trees_equal(a: Any, b: Any, path: str = "") -> None:
    """Exactly equal: tensors bit for bit (and dtype), numbers and structure as they are."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, a.keys() ^ b.keys())
        for key in a:
            assert_trees_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_trees_equal(x, y, f"{path}/{i}")
    else:
        assert a == b or (a != a and b != b), (path, a, b)  # NaN equals NaN here


def engine_state_from_file(path: Path, model_sha256: str) -> dict[str, Any]:
    return decode(path, model_sha256)[0]["streams"]["default"]["engine"]


# ----- the engine -----

# Sizes of the batches before the snapshot: steps on full batches, small ones buffered (60 images are waiting at
# the end), so parameters, statistics, optimiser, buffer and monitor all hold something. Then the batches after:
# the first completes the buffer to 64, which makes a step on the buffered images.
BEFORE = [64, 64, 20, 30, 64, 10]
AFTER = [4, 64, 16, 1, 64]


@pytest.mark.parametrize(
    "overrides", [{}, {"optimizer": "sgd", "lr": 2.5e-4}, {"method": "norm"}], ids=["tent-adam", "tent-sgd", "norm"]
)
def test_engine_state_round_trip_through_the_file_is_exact(source, images, tmp_path: Path, overrides: dict) -> None:
    """Saved after a few batches, loaded into a fresh engine: both give bit-identical logits and states after."""
    x = images
    adapted = engine(source, **overrides)
    feed(adapted, x, BEFORE)
    if adapted.config.method == "tent":
        assert adapted.stats.steps_total >= 2 and adapted.state.optimizer.state_dict()["state"]
    assert adapted.state.buffer_fill == 60 or adapted.config.method == "norm"

    file = SnapshotFile(tmp_path, "model-hash")
    file.write({"streams": {"default": {"engine": adapted.state_dict()}}}, created_at=time.time())
    restored = engine(source, **overrides)
    restored.load_state_dict(engine_state_from_file(file.path, "model-hash"))
    assert_trees_equal(restored.state_dict(), adapted.state_dict())

    rest = x[sum(BEFORE) :]
    for a, b in zip(feed(adapted, rest, AFTER), feed(restored, rest, AFTER), strict=True):
        assert torch.equal(a, b), "a restored engine predicts differently"
    assert_trees_equal(restored.state_dict(), adapted.state_dict())


def test_engine_refuses_a_state_that_does_not_fit_and_stays_as_it_was(source, images) -> None:
    adapted = engine(source)
    feed(adapted, images, [64, 64])
    state = adapted.state_dict()
    fresh = engine(source)
    before = fresh.state_dict()
    wrong_method, wrong_shape = dict(state, method="norm"), copy.deepcopy(state)
    name = next(iter(wrong_shape["tensors"]))
    wrong_shape["tensors"][name] = wrong_shape["tensors"][name][:1]
    for bad, message in ((wrong_method, "method norm"), (wrong_shape, "another shape")):
        with pytest.raises(ValueError, match=message):
            fresh.load_state_dict(bad)
        assert_trees_equal(fresh.state_dict(), before)
    other_optimizer = engine(source, optimizer="sgd")
    with pytest.raises(ValueError, match="optimiser adam"):
        other_optimizer.load_state_dict(state)


# ----- the ledger -----


def test_ledger_state_round_trips_through_tensors() -> None:
    ledger = PredictionLedger(num_classes=10, max_size=1000, max_age_s=3600, window=4)
    now = time.monotonic()
    for i in range(12):
        source = None if i % 3 == 0 else (i + 1) % 10
        label = i % 10 if i % 2 else None
        ledger.record(f"id{i:02d}", LedgerEntry(i % 10, source, 0.1 * i, now - 60 + i, i // 4), label)
    state = ledger.state_dict()
    entries = ledger_entries_from_tensors(ledger_entries_to_tensors(state["entries"]))
    assert entries == state["entries"]
    restored = PredictionLedger(num_classes=10, max_size=1000, max_age_s=3600, window=4)
    restored.load_state_dict({"prequential": state["prequential"], "entries": entries})
    again = restored.state_dict()
    assert again["prequential"] == state["prequential"]
    assert {k: v for k, v in again["entries"].items() if k != "created_at"} == {
        k: v for k, v in state["entries"].items() if k != "created_at"
    }
    assert np.allclose(again["entries"]["created_at"], state["entries"]["created_at"], rtol=0, atol=0.1)
    score, restored_score = ledger.scores["adapted"], restored.scores["adapted"]
    assert restored_score.window_accuracy() == score.window_accuracy() and restored_score.labels == 6
    smaller = PredictionLedger(num_classes=10, max_size=5, max_age_s=52.5, window=2)
    smaller.load_state_dict(state)  # the bounds apply at once: the newest 5, and of these none older than 52.5 s
    assert smaller.state_dict()["entries"]["ids"] == ["id08", "id09", "id10", "id11"]
    assert len(smaller.scores["adapted"].state_dict()["recent"]) == 2


# ----- the file -----


def snapshot_bytes(tmp_path: Path, model_sha256: str = "model-hash") -> bytes:
    file = SnapshotFile(tmp_path / "made", model_sha256)
    ledger = PredictionLedger(10, 10, 60, 4).state_dict()
    state = {
        "streams": {"default": {"engine": {"tensor": torch.arange(6.0), "step": torch.tensor(3.0)}}},
        "ledger": {"entries": ledger_entries_to_tensors(ledger["entries"])},
    }
    file.write(state, created_at=1.0)
    return file.path.read_bytes()


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


CORRUPTIONS = {
    "empty": lambda d: b"",
    "truncated header": lambda d: d[:40],
    "truncated data": lambda d: d[:-5],
    "bit flip in a tensor": lambda d: flip(d, len(d) - 3),
    "bit flip in the header's JSON": lambda d: d.replace(b'\\"created_at\\":1.0', b'\\"created_at\\":1.5'),
    "bit flip in the checksum": lambda d: flip(d, d.index(b'"sha256":"') + 12),
    "not a snapshot": lambda d: b"PK\x03\x04" + bytes(200),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_or_truncated_files_are_refused(tmp_path: Path, corruption: str) -> None:
    data = snapshot_bytes(tmp_path)
    broken = CORRUPTIONS[corruption](data)
    assert broken != data
    (tmp_path / FILE_NAME).write_bytes(broken)
    with pytest.raises(SnapshotError):
        decode(tmp_path / FILE_NAME, "model-hash")


def test_a_snapshot_of_another_model_is_refused(tmp_path: Path, model_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(snapshot_bytes(tmp_path, model_sha256="another-model"))
    with pytest.raises(SnapshotError, match="another model"):
        decode(tmp_path / FILE_NAME, model_digest(model_path))
    assert len(model_digest(model_path)) == 64


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / f"{FILE_NAME}.x1y2.tmp").write_bytes(b"left by a kill -9 mid-write")
    file = SnapshotFile(tmp_path, "model-hash")
    assert not list(tmp_path.glob("*.tmp")), "a stale temporary file is removed at start"
    file.write({"value": torch.ones(3)}, created_at=1.0)
    good = file.path.read_bytes()

    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(persistence.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        file.write({"value": torch.zeros(3)}, created_at=2.0)
    assert file.path.read_bytes() == good and not list(tmp_path.glob("*.tmp"))
    assert file.path.stat().st_mode & 0o077 == 0, "prediction ids are in it: readable by the server's user only"


# ----- the service, in-process -----


def labelled(jpeg_images: list, count: int, start: int = 0) -> dict:
    """`count` images with their labels, every class in turn (jpeg_images holds four per class, sorted by class)."""
    picked = [jpeg_images[(i % 10) * 4 + (i // 10) % 4] for i in range(start, start + count)]
    return {
        "files": [("files", (name, data)) for name, data, _ in picked],
        "data": {"labels": ",".join(str(label) for _, _, label in picked)},
    }


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_shutdown_snapshot_is_restored_with_scores_and_late_labels(
    anyio_backend: str, model_path: Path, jpeg_images: list, tmp_path: Path
) -> None:
    settings = {"model": model_path, "state_dir": tmp_path, "snapshot_interval_s": 3600}
    async with in_process_client(**settings) as (client, app):
        assert (await client.get("/v1/status")).json()["persistence"]["restored_from"] is None
        for _ in range(3):
            assert (await client.post("/predict", **labelled(jpeg_images, 40))).status_code == 200
        unlabelled = (await client.post("/predict", files=labelled(jpeg_images, 3)["files"])).json()["predictions"]
        before = (await client.get("/v1/status")).json()
        first = app.state.service.worker.engine
    # 120 images: one step at 80 (the second would be at 160), computed and not yet applied: the snapshot carries it
    assert before["adaptation"]["step_pending"] and before["prequential"]["adapted"]["labels"] == 120
    assert (tmp_path / FILE_NAME).is_file(), "no snapshot on shutdown"

    async with in_process_client(**settings) as (client, app):
        after = (await client.get("/v1/status")).json()
        assert_trees_equal(app.state.service.worker.engine.state_dict(), first.state_dict())
        late = await client.post("/feedback", json={"id": unlabelled[0]["id"], "label": jpeg_images[0][2]})
        exposition = (await client.get("/metrics")).text
    assert late.status_code == 200, "a prediction made before the restart takes its late label"
    assert after["persistence"]["restored_from"] == str(tmp_path / FILE_NAME)
    assert after["persistence"]["restored_snapshot_at"] <= time.time()
    for key in ("steps_total", "steps_since_reset", "skipped", "resets", "entropy_ema", "buffer_fill", "step_pending"):
        assert after["adaptation"][key] == before["adaptation"][key], key
    assert after["prequential"]["adapted"] == before["prequential"]["adapted"]
    assert after["ledger_entries"] == before["ledger_entries"] == 123
    assert metric_value(exposition, "tta_state_restores_total", 'result="restored"') == 1
    assert metric_value(exposition, "tta_state_restores_total", 'result="refused"') == 0


def make_refusable(kind: str, tmp_path: Path, model_path: Path) -> None:
    path = tmp_path / FILE_NAME
    if kind == "another model":
        path.write_bytes(snapshot_bytes(tmp_path, model_sha256="another-model"))
    elif kind == "truncated":
        path.write_bytes(snapshot_bytes(tmp_path, model_sha256=model_digest(model_path))[:-100])


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("kind", ["truncated", "another model", "another method"])
async def test_a_refused_snapshot_logs_one_line_and_the_source_state_serves(
    anyio_backend: str,
    kind: str,
    model_path: Path,
    jpeg_images: list,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = {"model": model_path, "state_dir": tmp_path, "snapshot_interval_s": 3600}
    if kind == "another method":  # a whole, valid snapshot with a ledger, which the engine refuses: nothing loads
        async with in_process_client(**settings, method="norm") as (client, _):
            await client.post("/predict", **labelled(jpeg_images, 40))
    else:
        make_refusable(kind, tmp_path, model_path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tta"):
        async with in_process_client(**settings) as (client, app):
            status = (await client.get("/v1/status")).json()
            served = app.state.service.worker.engine.state_dict()
            exposition = (await client.get("/metrics")).text
    refusals = [r for r in caplog.records if r.levelno >= logging.WARNING]  # from any logger
    assert len(refusals) == 1 and refusals[0].exc_info is None and "\n" not in refusals[0].getMessage()
    assert refusals[0].name == "tta.persistence" and "refused" in refusals[0].getMessage()
    assert status["persistence"]["restored_from"] is None and status["persistence"]["restore_refused"]
    assert status["prequential"]["adapted"]["labels"] == 0 and status["ledger_entries"] == 0
    assert_trees_equal(served, engine((load_checkpoint(model_path)[0], Settings(model=model_path))).state_dict())
    assert (tmp_path / f"{FILE_NAME}.refused").is_file(), "the refused file is kept for a look"
    assert metric_value(exposition, "tta_state_restores_total", 'result="refused"') == 1


def failing_fsync(descriptor: int) -> None:
    raise OSError("I/O error")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_failed_snapshot_is_counted_and_keeps_the_previous_one(
    anyio_backend: str, model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with in_process_client(model=model_path, state_dir=tmp_path, snapshot_interval_s=3600) as (client, app):
        keeper = app.state.service.persistence
        await keeper.snapshot()
        good = (tmp_path / FILE_NAME).read_bytes()
        with monkeypatch.context() as patch:
            patch.setattr(persistence.os, "fsync", failing_fsync)
            await keeper.snapshot()
        status = (await client.get("/v1/status")).json()["persistence"]
        exposition = (await client.get("/metrics")).text
    assert status["snapshots"] == 1 and status["failures"] == 1 and "I/O error" in status["last_error"]
    assert status["last_snapshot_bytes"] == len(good) and status["last_pause_s"] <= status["last_snapshot_s"]
    assert metric_value(exposition, "tta_state_snapshots_total") == 1
    assert metric_value(exposition, "tta_state_snapshot_failures_total") == 1
    assert (tmp_path / FILE_NAME).read_bytes() != good, "the shutdown snapshot replaced it"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_without_a_state_dir_nothing_is_written(anyio_backend: str, model_path: Path) -> None:
    async with in_process_client(model=model_path) as (client, _):
        status = (await client.get("/v1/status")).json()
        exposition = (await client.get("/metrics")).text
    assert status["persistence"] == {"enabled": False}
    assert "tta_state_snapshots_total" not in exposition


# ----- the real server: kill -9 under load -----


def post_until_stopped(url: str, request: dict, stop: threading.Event) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            try:
                client.post(f"{url}/predict", **request)
            except httpx.HTTPError:  # the server was killed
                return


def test_kill_9_under_load_then_restart_loses_nothing_older_than_one_snapshot_interval(
    model_path: Path, jpeg_images: list, tmp_path: Path
) -> None:
    interval = 1.0
    env = {"TTA_MODEL": str(model_path), "TTA_STATE_DIR": str(tmp_path), "TTA_SNAPSHOT_INTERVAL_S": str(interval)}
    path, model_sha256 = tmp_path / FILE_NAME, model_digest(model_path)
    with running_server(env) as (url, process):
        stop = threading.Event()
        load = [
            threading.Thread(target=post_until_stopped, args=(url, labelled(jpeg_images, 16, 16 * i), stop))
            for i in range(2)
        ]
        for thread in load:
            thread.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status = httpx.get(f"{url}/v1/status", timeout=30).json()
            if status["adaptation"]["steps_total"] >= 3 and status["persistence"]["snapshots"] >= 3:
                break
            time.sleep(0.3)
        assert status["persistence"]["snapshots"] >= 3, status
        taken = status["persistence"]["snapshots"]  # that many, some perhaps before the third step: one more after it
        while (
            time.monotonic() < deadline
            and httpx.get(f"{url}/v1/status", timeout=30).json()["persistence"]["snapshots"] <= taken
        ):
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        killed_at = time.time()
        process.wait(timeout=30)
        stop.set()
        for thread in load:
            thread.join(timeout=60)
    state, snapshot_at = decode(path, model_sha256)
    # The loss bound: one interval, plus the snapshot itself (it waits for the batch the worker is running).
    assert killed_at - snapshot_at < interval + 5.0
    engine_state, scores = state["streams"]["default"]["engine"], state["ledger"]["prequential"]
    assert engine_state["stats"]["steps_total"] >= 3 and scores["scores"]["adapted"]["labels"] > 0

    # No snapshot but the one on SIGTERM, which, with no traffic since the restore, holds the state restored.
    with running_server({**env, "TTA_SNAPSHOT_INTERVAL_S": "3600"}) as (url, process):
        status = httpx.get(f"{url}/v1/status", timeout=30).json()
    restored_state, shutdown_snapshot_at = decode(path, model_sha256)
    assert shutdown_snapshot_at > snapshot_at, "no snapshot on SIGTERM"

    assert status["persistence"]["restored_from"] == str(path)
    assert status["persistence"]["restored_snapshot_at"] == snapshot_at
    stats = engine_state["stats"]
    for key in ("steps_total", "steps_since_reset", "skipped", "resets", "last_grad_norm"):
        assert status["adaptation"][key] == stats[key], key
    assert status["adaptation"]["param_drift"] == stats["drift"]
    assert status["adaptation"]["entropy_ema"] == engine_state["monitor"]["entropy_ema"]
    assert status["prequential"]["adapted"]["labels"] == scores["scores"]["adapted"]["labels"]
    assert status["prequential"]["adapted"]["correct"] == scores["scores"]["adapted"]["correct"]
    assert status["ledger_entries"] == len(state["ledger"]["entries"]["ids_lengths"])
    # Everything exactly, but the ledger's creation times: wall clock -> monotonic -> wall clock moves them by how
    # far the two clocks drift apart meanwhile (5 ms/s seen here); they only decide when an entry is an hour old.
    created, recreated = (
        state["ledger"]["entries"].pop("created_at"),
        restored_state["ledger"]["entries"].pop("created_at"),
    )
    assert torch.allclose(created, recreated, rtol=0, atol=1.0)
    assert_trees_equal(restored_state, state)


# ----- the image and the compose stack -----


def test_the_image_and_the_compose_servers_keep_their_state_in_a_volume_each() -> None:
    instructions = dockerfile_instructions()
    env = " ".join(value for name, value in instructions if name == "ENV")
    assert "TTA_STATE_DIR=/var/lib/tta" in env
    assert ("VOLUME", '["/var/lib/tta"]') in instructions
    volumes = []
    for name in ("tta", "tta-gpu"):
        service = compose()["services"][name]
        state_dir = service["environment"]["TTA_STATE_DIR"]
        mounts = [v.split(":") for v in service["volumes"] if v.split(":")[1] == state_dir]
        assert len(mounts) == 1 and mounts[0][0] in compose()["volumes"], f"{name}: {state_dir} is not a named volume"
        volumes.append(mounts[0][0])
    assert len(set(volumes)) == 2, "two servers must not share one state directory"
