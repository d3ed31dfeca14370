"""The one-step lag of buffered steps (app/adaptation/lag.py): a step computed on the stream's twin, off the model
thread in the server, applied just before the stream's next step; the predictions are those of the in-process
engine whatever the threads' timing, and without the lag the step is applied at once as before."""

import asyncio
import itertools
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from app.adaptation.engine import AdaptationEngine
from app.adaptation.streams import StreamEngines
from app.config import Settings
from app.serving import persistence
from app.serving.worker import STEP_THREAD_NICE, ModelWorker
from models.checkpoint import load_checkpoint
from models.data import load_zip, normalize

CPU = torch.device("cpu")
# Steps on 16 images; the guards that judge a batch's classes or confidence would skip some of so few, and every
# step taken is what these tests look at.
STEPPING = {"min_batch": 16, "guard_balance": False, "guard_reliable": False, "guard_plausible": False}


@pytest.fixture(scope="module")
def pixels(model_path: Path, test_zip: Path) -> tuple[torch.Tensor, tuple, tuple]:
    """300 test images (30 per class) as the worker takes them (uint8), shuffled with a fixed seed; mean and std."""
    _, card = load_checkpoint(model_path)
    data = load_zip(test_zip, limit_per_class=30)
    order = torch.as_tensor(np.random.default_rng(0).permutation(len(data)))
    return data.images[order], card.mean, card.std


def engine_of(source: tuple[nn.Module, Settings], **overrides: object) -> AdaptationEngine:
    model, settings = source
    return AdaptationEngine(model, 10, settings.model_copy(update={**STEPPING, **overrides}), CPU)


def worker_of(source: tuple[nn.Module, Settings], pixels: tuple, **overrides: object) -> ModelWorker:
    _, mean, std = pixels
    return ModelWorker(StreamEngines(lambda: engine_of(source, **overrides), 8), mean, std, top_k=3)


def hold_steps(engine: AdaptationEngine, before_step) -> None:
    """Run `before_step(buffered images)` on the thread that computes each buffered step, just before it (a test's
    gate)."""
    method = engine.shared.method
    steps = method._buffered_steps

    def held(*args: object, **kwargs: torch.Tensor) -> None:
        before_step(kwargs["buffered"])
        steps(*args, **kwargs)

    method._buffered_steps = held


def normalised(pixels: tuple, start: int, end: int) -> torch.Tensor:
    images, mean, std = pixels
    return normalize(images[start:end], mean, std)


def test_the_step_lands_one_step_later_and_is_the_step_taken_without_the_lag(source, pixels) -> None:
    lagged, direct = engine_of(source), engine_of(source, step_lag=False)
    for start in range(0, 16, 8):
        assert torch.equal(
            lagged.step(normalised(pixels, start, start + 8)).logits,
            direct.step(normalised(pixels, start, start + 8)).logits,
        )
    assert direct.stats.steps_total == 1 and not direct.snapshot()["step_pending"], "without the lag: at once"
    assert lagged.stats.steps_total == 0 and lagged.snapshot()["step_pending"], "with it: computed, not applied"
    assert all(torch.equal(p, q) for p, q in zip(lagged.params, lagged.shared.source_params, strict=True))
    lagged.settle()
    # the twin's step is exactly the step the stream would have taken itself (the drift is measured after a batch,
    # from the parameters it then has: before the step here)
    counts = [{k: v for k, v in e.stats.state_dict().items() if k != "drift"} for e in (lagged, direct)]
    assert counts[0] == counts[1]
    assert all(torch.equal(p, q) for p, q in zip(lagged.params, direct.params, strict=True))
    assert str(lagged.state.optimizer.state_dict()) == str(direct.state.optimizer.state_dict())


def test_a_reset_applies_the_pending_step_first_and_state_dict_carries_it_unapplied(source, pixels, tmp_path) -> None:
    e = engine_of(source)
    for start in range(0, 16, 8):
        e.step(normalised(pixels, start, start + 8))
    saved = e.state_dict()
    assert saved["pending_step"] is not None and saved["pending_step"]["stats"]["steps_total"] == 1
    assert e.snapshot()["step_pending"] and e.stats.steps_total == 0, "saving does not apply it"
    # through the snapshot file, a restored stream continues exactly as the original
    digest = "0" * 64
    restored_state, _ = persistence.decode(_written(tmp_path, persistence.encode(saved, digest, 0.0)), digest)
    restored = engine_of(source)
    restored.load_state_dict(restored_state)
    for start in range(16, 64, 8):
        x = normalised(pixels, start, start + 8)
        assert torch.equal(e.step(x).logits, restored.step(x).logits)
    assert e.stats.state_dict() == restored.stats.state_dict() and e.stats.steps_total >= 1
    pending = e.snapshot()["step_pending"]
    steps = e.stats.steps_total
    e.reset("manual")
    assert e.stats.steps_total == steps + pending and e.stats.steps_since_reset == 0 and e.stats.resets["manual"] == 1
    assert not e.snapshot()["step_pending"]
    assert all(torch.equal(p, q) for p, q in zip(e.params, e.shared.source_params, strict=True))


def _written(directory: Path, data: bytes) -> Path:
    path = directory / persistence.FILE_NAME
    path.write_bytes(data)
    return path


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_streams_next_request_is_answered_while_its_step_is_computed(anyio_backend, source, pixels) -> None:
    """The step thread holds the stream's step on a gate the test opens only after the stream's next request was
    answered; the model thread waits for the step only where it applies it (the stream's next buffer fill)."""
    images = pixels[0]
    worker = worker_of(source, pixels)
    computing, gate, on_thread = threading.Event(), threading.Event(), []

    def gated(_: torch.Tensor) -> None:
        on_thread.append(threading.current_thread().name)
        computing.set()
        assert gate.wait(timeout=60)

    hold_steps(worker.engine, gated)
    worker.start()
    try:
        for start in (0, 8):  # the second completes the 16-image buffer
            await asyncio.wait_for(worker.predict([images[start : start + 8]], ["default"]), timeout=30)
        assert await asyncio.to_thread(computing.wait, 30), "the step was handed to the step thread"
        answered = await asyncio.wait_for(worker.predict([images[16:24]], ["default"]), timeout=30)
        assert not gate.is_set() and answered.step == [0] * 8, "answered while its step is still computed"
        await worker.settled()
        assert worker.snapshot["steps_total"] == 0 and worker.snapshot["step_pending"], "the step shows when applied"
        gate.set()
        await asyncio.wait_for(worker.predict([images[24:32]], ["default"]), timeout=30)  # the next buffer fill
        await worker.settled()
        assert worker.snapshot["steps_total"] == 1 and worker.snapshot["step_pending"], "applied, the next one pending"
        assert on_thread and all(name.startswith("adaptation-step") for name in on_thread)
    finally:
        gate.set()
        worker.stop()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_server_predicts_exactly_as_in_process_whatever_the_step_threads_speed(
    anyio_backend, source, pixels
) -> None:
    """A started worker (the step thread, slowed down here) and one never started (each step computed at once on
    the caller's thread, as bench.limit and bench.stream run): the same answers to the last bit, two streams in
    requests of 1 to 8 images."""
    images = pixels[0]
    in_process, served = worker_of(source, pixels), worker_of(source, pixels)
    hold_steps(served.engine, lambda _: time.sleep(0.2))
    served.start()
    try:
        sizes, start, applied = itertools.cycle([5, 8, 3, 1, 7, 6]), 0, 0
        for request in itertools.count():
            if start >= 240:
                break
            size = next(sizes)
            batch = [images[start : start + size], images[start + size : start + 2 * size]]
            streams = ["default", "b"] if request % 3 == 0 else ["default", "default"]
            expected = in_process._predict(batch, streams)
            answered = await asyncio.wait_for(served.predict(batch, streams), timeout=60)
            for field in ("class_index", "confidence", "entropy", "top_k_confidence", "step"):
                assert getattr(answered, field) == getattr(expected, field), (field, start)
            applied = max(applied, *answered.step)
            start += 2 * size
        assert applied >= 3, "steps were applied along the stream"
    finally:
        served.stop()


def test_a_pending_step_of_one_stream_never_changes_another(source, pixels) -> None:
    """Stream a's first step is held on the step thread while stream b is predicted and steps (b's steps, queued
    behind it, are computed where b applies them): b's answers are those of b alone."""
    gate, held, a_first = threading.Event(), [], normalised(pixels, 0, 16)
    together, alone = StreamEngines(lambda: engine_of(source), 4), StreamEngines(lambda: engine_of(source), 4)

    def hold_a_first_step(buffered: torch.Tensor) -> None:
        if torch.equal(buffered, a_first):
            held.append(threading.current_thread().name)
            assert gate.wait(timeout=60)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="step") as step_thread:
        together.engine("a").shared.run_step = step_thread.submit
        hold_steps(together.engine("a"), hold_a_first_step)
        for i in range(15):  # a: 2 images a batch, its first buffer fills at i = 7; b: 8, filling at every odd i
            a, b = normalised(pixels, 2 * i, 2 * i + 2), normalised(pixels, 150 + 8 * i, 158 + 8 * i)
            results = together.step(torch.cat([a, b]), ["a"] * 2 + ["b"] * 8)
            assert torch.equal(results[1][1].logits, alone.step(b, ["b"] * 8)[0][1].logits), i
        assert held and held[0].startswith("step") and together.engine("a").snapshot()["step_pending"]
        assert together.engine("b").stats.steps_total == alone.engine("b").stats.steps_total >= 3
        gate.set()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_failed_step_leaves_the_stream_as_it_was_and_the_step_thread_goes_on(
    anyio_backend, source, pixels, caplog
) -> None:
    images = pixels[0]
    worker = worker_of(source, pixels)
    failures = [RuntimeError("a step that fails")]

    def fail_once(_: torch.Tensor) -> None:
        if failures:
            raise failures.pop()

    hold_steps(worker.engine, fail_once)
    worker.start()
    try:
        for start in range(0, 32, 8):  # two buffer fills: the first step fails, its stream is settled at the second
            await asyncio.wait_for(worker.predict([images[start : start + 8]], ["default"]), timeout=30)
        await worker.settled()
        assert worker.snapshot["steps_total"] == 0 and worker.snapshot["step_pending"]
        engine = worker.engine
        assert all(torch.equal(p, q) for p, q in zip(engine.params, engine.shared.source_params, strict=True))
        assert "a buffered adaptation step failed" in caplog.text
        for start in range(32, 48, 8):  # the next fill applies the second step, computed by the same thread
            await asyncio.wait_for(worker.predict([images[start : start + 8]], ["default"]), timeout=30)
        await worker.settled()
        assert worker.snapshot["steps_total"] == 1 and worker.alive
    finally:
        worker.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own priority is Linux's")
def test_the_step_thread_runs_below_the_model_thread(source, pixels) -> None:
    worker = worker_of(source, pixels)
    worker.start()
    try:
        step_thread = next(t for t in threading.enumerate() if t.name.startswith("adaptation-step"))
        nice = os.getpriority(os.PRIO_PROCESS, step_thread.native_id)
    finally:
        worker.stop()
    assert nice == min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + STEP_THREAD_NICE)


def test_copies_share_the_monitors_entries_but_not_its_sums(source, pixels) -> None:
    e = engine_of(source)
    e.step(normalised(pixels, 0, 8))
    frozen = e.state.monitor.copy()
    shares, ema = frozen.admitted_shares().clone(), frozen.entropy_ema
    e.step(normalised(pixels, 8, 16))
    assert torch.equal(frozen.admitted_shares(), shares) and frozen.entropy_ema == ema
    assert not torch.equal(e.state.monitor.admitted_shares(), shares)
