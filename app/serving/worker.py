"""The model worker: exactly one thread owns the model and runs every batch and every reset, in order.

A batch is two jobs on that thread: the prediction, whose answer resolves the batch's requests at once, then the
adaptation it causes (the statistics, a full batch's entropy step, guard resets), run straight after, before the next
job. No update ever runs inside a prediction, and every prediction is made before any update it causes (the
prequential contract).

A buffered step (the adaptation batch that small batches complete) is not run there: with `step_lag` (the default,
app/adaptation/lag.py) it is computed on the stream's twin by a second thread, the step thread (one for every
stream, first in first out, below the model thread's priority), and applied by the model thread just before that
stream's next step or reset, waiting for it only then. The next requests, of that stream too, are answered meanwhile
with the parameters before the step (one step behind); the predictions are those of the same stream run in-process,
whatever the threads' timing. Without the lag the buffered step runs on the model thread after the answer.

After every job and every step the heap trimmer (app/serving/heap.py) may hand the C heap's free pages back."""

import asyncio
import concurrent.futures
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from app.adaptation.signals import softmax_entropy
from app.adaptation.streams import DEFAULT_STREAM, StreamEngines
from app.serving.heap import HeapTrimmer
from models.data import normalize

# The model thread runs below the event loop's priority: where the two share a core, the loop then answers at once
# (a 503 in milliseconds rather than after the batch's time slice) and takes little from the batch. Under a 10x
# overload on a 2-core machine busy with other work, 503 p99 was 0.16-1.9 s at equal priority, 0.03-0.14 s at +5/+10.
MODEL_THREAD_NICE = 5
# The step thread runs further below: on a shared core the predictions go first and the step takes what they leave
# (CFS weights 335 against 36: about a tenth of the core while the model thread wants it all).
STEP_THREAD_NICE = 15

log = logging.getLogger(__name__)
Job = Callable[[], tuple[Any, Callable[[], None] | None]]  # its result, and what runs after the result is given


def lower_this_threads_priority(by: int = MODEL_THREAD_NICE) -> None:
    if sys.platform == "linux":  # a thread's own nice value; elsewhere the call would name a whole process
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + by)


@dataclass
class BatchOutput:
    """Plain per-image values for a whole batch, ready to be sliced per request."""

    class_index: list[int]
    confidence: list[float]
    entropy: list[float]
    top_k_index: list[list[int]]
    top_k_confidence: list[list[float]]
    source_class_index: list[int] | None
    step: list[int]  # of each image's stream: its adaptation steps since its last reset when it was predicted
    seconds: dict[str, float]  # duration of each phase


class ModelWorker:
    def __init__(self, streams: StreamEngines, mean: tuple[float, ...], std: tuple[float, ...], top_k: int) -> None:
        self.streams = streams
        self.engine = streams.engine(DEFAULT_STREAM)  # the stream of every request that names none
        self.top_k = min(top_k, self.engine.num_classes)
        self.mean, self.std = mean, std
        # Each job returns its result and what runs after its future resolves (None: nothing).
        self._jobs: queue.Queue[tuple[Job, concurrent.futures.Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self._steps = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptation-step")
        self.heap = HeapTrimmer()
        # Both replaced (never mutated) after every job, so other threads read them without a lock.
        self._fresh = self.engine.snapshot()  # what a stream with no state yet looks like
        self.stream_snapshots: dict[str, dict[str, Any]] = {DEFAULT_STREAM: self._fresh}
        self.snapshot: dict[str, Any] = self._summary(self.stream_snapshots)

    def start(self) -> None:
        # The executor's one thread starts with its first job, here (so from this thread's priority, not the model
        # thread's), and that job lowers its priority for good.
        self._steps.submit(lower_this_threads_priority, STEP_THREAD_NICE).result()
        self.engine.shared.run_step = self._run_step  # every stream's: they share the default stream's Source
        self._thread.start()

    def _run_step(self, step: Callable[[], Any]) -> concurrent.futures.Future:
        def step_then_trim() -> Any:
            try:
                return step()
            finally:
                self.heap.maybe_trim()

        return self._steps.submit(step_then_trim)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
        self._steps.shutdown(wait=False, cancel_futures=True)  # a step still wanted later is computed where wanted

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def predict(self, images: list[torch.Tensor], streams: list[str]) -> BatchOutput:
        """Run one batch (uint8 N_i x 3 x S x S tensors and the stream of each request) on the worker thread."""
        return await self._submit_job(lambda: self._answer(images, streams))

    async def reset(self, reason: str, stream: str | None = None) -> list[str]:
        """Reset one stream, or every stream (None); returns the streams reset."""
        return await self._submit(lambda: self.streams.reset(reason, stream))

    async def capture_state(self) -> dict[str, dict[str, Any]]:
        """Every stream's state_dict(), cloned between two batches: serving pauses only for the clone."""
        return await self._submit(self.streams.state_dicts)

    async def load_state(self, states: dict[str, dict[str, Any]]) -> None:
        """Every stream's state, all or none (a state that does not fit raises and changes nothing)."""
        await self._submit(lambda: self._load(states))

    def _load(self, states: dict[str, dict[str, Any]]) -> None:
        self.streams.load_state_dicts(states)
        self.engine = self.streams.engine(DEFAULT_STREAM)

    async def settled(self) -> None:
        """Returns once every job submitted before it, and the adaptation each caused, has run: a reader of the
        snapshots after this sees the effect of every batch answered before it."""
        await self._submit(lambda: None)

    async def _submit(self, job: Callable[[], Any]) -> Any:
        return await self._submit_job(lambda: (job(), None))

    async def _submit_job(self, job: "Job") -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((job, future))
        return await asyncio.wrap_future(future)

    def _run(self) -> None:
        lower_this_threads_priority()
        while (item := self._jobs.get()) is not None:
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            result, error, after = None, None, None
            try:
                result, after = job()
            except BaseException as caught:  # the worker must outlive any one bad batch
                error = caught
            if after is None:
                # Before the future resolves: whoever awaited the job (a reset, then GET /v1/status) reads its effect.
                self._take_snapshots()
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
            if after is not None:  # the adaptation the answered batch causes, before the next job
                try:
                    after()
                except Exception:
                    log.exception("the adaptation after a batch failed; the stream keeps its state as it was left")
                self._take_snapshots()
            self.heap.maybe_trim()

    def _take_snapshots(self) -> None:
        self.stream_snapshots = self.streams.snapshots(self.stream_snapshots)
        self.snapshot = self._summary(self.stream_snapshots)

    def _summary(self, streams: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """/v1/status's view: the default stream's state, with counters summed over every stream there has been."""
        return {
            **streams.get(DEFAULT_STREAM, self._fresh),
            **self.streams.totals(streams),
            "streams": {"active": len(streams), "max": self.streams.max_streams, "evicted": self.streams.evicted},
        }

    def _predict(self, images: list[torch.Tensor], streams: list[str]) -> BatchOutput:
        """The whole batch, answer and adaptation, at once (what `bench.limit` times as the worker's job)."""
        output, adapt = self._answer(images, streams)
        if adapt is not None:
            adapt()
        return output

    def _answer(self, images: list[torch.Tensor], streams: list[str]) -> tuple[BatchOutput, Callable[[], None] | None]:
        """The batch's answer, and the adaptation it causes (to run after the answer, before the next batch)."""
        started = time.perf_counter()
        x = normalize(torch.cat(images).to(self.engine.device, non_blocking=True), self.mean, self.std)
        per_image = [stream for batch, stream in zip(images, streams, strict=True) for _ in range(len(batch))]
        results = self.streams.predict(x, per_image)
        updates = [result.update for _, result in results if result.update is not None]
        logits = _in_batch_order(len(x), [(share.positions, result.logits) for share, result in results])
        shadowed = all(result.source_logits is not None for _, result in results)
        source_logits = (
            _in_batch_order(len(x), [(share.positions, result.source_logits) for share, result in results])
            if shadowed
            else None
        )
        steps = [0] * len(x)
        for share, result in results:
            for position in share.positions:
                steps[position] = result.step
        stepped = time.perf_counter()
        with torch.inference_mode():
            probabilities = logits.float().softmax(1)
            top_conf, top_index = probabilities.topk(self.top_k, dim=1)
            entropy = softmax_entropy(logits.float())
            source = source_logits.argmax(1).tolist() if source_logits is not None else None
            output = BatchOutput(
                class_index=top_index[:, 0].tolist(),
                confidence=top_conf[:, 0].tolist(),
                entropy=entropy.tolist(),
                top_k_index=top_index.tolist(),
                top_k_confidence=top_conf.tolist(),
                source_class_index=source,
                step=steps,
                seconds={},
            )
        output.seconds = {"model": stepped - started, "postprocess": time.perf_counter() - stepped}
        if not updates:
            return output, None

        def adapt() -> None:
            for update in updates:  # each stream's own, in the order the streams first appear in the batch
                update()

        return output, adapt


def _in_batch_order(size: int, parts: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """One tensor of `size` rows from each stream's rows and their positions in the batch."""
    if len(parts) == 1:
        return parts[0][1]  # one stream: its rows are the batch, in order
    first = parts[0][1]
    out = first.new_empty((size, *first.shape[1:]))
    for positions, rows in parts:
        out[positions] = rows
    return out
