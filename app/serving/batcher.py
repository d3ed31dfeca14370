"""Dynamic batching on the event loop, and admission.

A batch is dispatched when it holds `max_batch_size` images or when its oldest request has waited
`max_wait_s`. While the worker runs one batch the next one fills, so batches grow with load. A
request's images stay together and in order; a request past its deadline is dropped from the queue
(its images are never computed) and fails with `DeadlineExceededError`.

Admission is by time as well as by count: a request is refused at once (`overloaded`) when its
images would not be computed within `max_queue_delay_s`, estimated from the images ahead of it and
the throughput measured over recent batches, and never less than two full batches at that
throughput. The queue bound in images (`queue_full`) still holds, and is the only bound before
the first batch has measured the throughput.

Refusals are this module's exceptions (UnavailableError, DeadlineExceededError), which app/api/errors.py answers
in HTTP. Every batch is reported once, when it ends, to the recorder given at construction (its size, queue wait
and output), whatever became of its requests.
"""

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from app.serving.worker import BatchOutput


class UnavailableError(Exception):
    """Nothing of the request was computed and it may be sent again after `retry_after_s`: the queue has no room
    (`queue_full`) or no time (`overloaded`) for it, or the server is stopping (`shutting_down`)."""

    def __init__(self, code: str, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.code, self.detail, self.retry_after_s = code, detail, retry_after_s


class DeadlineExceededError(Exception):
    """No answer within the request's time (`timeout`); its images may or may not have been computed."""

    code = "timeout"

    def __init__(self, timeout_s: float) -> None:
        self.detail = f"no answer within {timeout_s:g} s; the server is overloaded"
        super().__init__(self.detail)


class BatchRecorder(Protocol):
    def record_batch(self, size: int, queue_wait_s: float, output: BatchOutput | None) -> None:
        """One batch, once, when it ends: its images, its oldest request's wait, its output (None if it failed)."""


@dataclass
class Throughput:
    """Images per second the worker computes, over recent batches.

    Images and seconds are summed with a decay per batch, and their ratio is the estimate: each batch counts by
    its size and time, so a run of small batches under light load does not pass for the speed of full ones, and
    the estimate follows a change (load, a neighbour taking the CPU) within a few batches.
    """

    decay: float = 0.8
    images: float = 0.0
    seconds: float = 0.0

    def observe(self, images: int, seconds: float) -> None:
        self.images = self.decay * self.images + images
        self.seconds = self.decay * self.seconds + seconds

    @property
    def images_per_s(self) -> float | None:
        """None until a batch has been computed (cold start)."""
        return self.images / self.seconds if self.seconds > 0 else None


@dataclass
class RequestResult:
    output: BatchOutput
    offset: int  # where this request's images start in the batch
    count: int
    batch_size: int
    queue_seconds: float


@dataclass(eq=False)
class _Pending:
    images: torch.Tensor
    stream: str
    enqueued_at: float
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[list[torch.Tensor], list[str]], Awaitable[BatchOutput]],
        max_batch_size: int,
        max_wait_s: float,
        max_queue_images: int,
        max_queue_delay_s: float,
        recorder: BatchRecorder | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._recorder = recorder
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self.max_queue_delay_s = max_queue_delay_s
        self._queue: deque[_Pending] = deque()
        self.queued_images = 0
        self.computing_images = 0  # in the batch the worker is running
        self._computing_since: float | None = None  # when that batch's time started counting
        self.throughput = Throughput()
        self._busy_since: float | None = None  # when the last batch ended with work already waiting
        self._arrived = asyncio.Event()
        self._accepting = True
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._dispatch_forever(), name="batcher")

    async def stop(self, grace_s: float) -> None:
        """Refuse new requests, let the queued ones finish (bounded wait), then stop."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._queue and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(UnavailableError("shutting_down", "the server is shutting down"))

    def images_per_s(self) -> float | None:
        """The throughput to plan with: the measured one, or less while the running batch has already taken longer
        than that allows, so a stall (the worker starved of CPU) tightens admission at once, not when it ends."""
        rate = self.throughput.images_per_s
        if rate is None or self._computing_since is None:
            return rate
        running_s = time.monotonic() - self._computing_since
        return min(rate, self.computing_images / running_s) if running_s > 0 else rate

    def expected_wait_s(self, count: int) -> float | None:
        """Seconds until `count` more images would be computed: the running batch (whole) and the queue go first.

        None while the throughput is unknown. Accurate to about one batch: where the batches fall is not known.
        """
        rate = self.images_per_s()
        if rate is None:
            return None
        return (self.queued_images + self.computing_images + count) / rate

    def admit(self, count: int, within_s: float = math.inf) -> None:
        """Refuse (UnavailableError) a request of `count` images that the queue has no room or no time for.

        Called before a request's images are decoded, so an overloaded server does not pay for decoding what it
        refuses, and again when they are queued. `within_s` narrows the budget to the time the request has left.
        """
        if not self._accepting:
            raise UnavailableError("shutting_down", "the server is shutting down; retry on another instance")
        self._check_room(count)
        self._check_time(count, within_s)

    def _check_room(self, count: int) -> None:
        excess = self.queued_images + count - self.max_queue_images
        if excess > 0:
            # room is made at the measured rate; before it is known, retrying soon is all that can be said
            rate = self.images_per_s()
            raise UnavailableError(
                "queue_full",
                f"the queue holds {self.queued_images} images; retry shortly",
                _ceil(excess / rate if rate else 1),
            )

    def _check_time(self, count: int, within_s: float) -> None:
        rate = self.images_per_s()
        if rate is None or not (self.queued_images or self.computing_images):
            # Before the first batch, the count bound alone. With nothing ahead, the request goes straight into a
            # batch, which measures the throughput afresh: refusing on an old estimate could refuse for ever.
            return
        # Never under two full batches, one computing while the next forms: a shorter budget would refuse whatever
        # comes during a batch and leave the worker idle after it (a slow model, or one on a slower device).
        budget_s = min(max(self.max_queue_delay_s, 2 * self.max_batch_size / rate), within_s)
        wait = (self.queued_images + self.computing_images + count) / rate
        if wait > budget_s:
            raise UnavailableError(
                "overloaded",
                f"these images would be answered in about {wait:.1f} s, past the {budget_s:.1f} s this server allows",
                _ceil(wait - budget_s),  # once that much work is done, a request like this one fits again
            )

    async def submit(self, images: torch.Tensor, timeout_s: float, stream: str) -> RequestResult:
        self.admit(len(images), within_s=timeout_s)
        pending = _Pending(images, stream, time.monotonic())
        self._queue.append(pending)
        self.queued_images += len(images)
        self._arrived.set()
        # a timer on the loop, not wait_for(): no extra task per request, which counts at thousands per second
        timer = asyncio.get_running_loop().call_later(timeout_s, self._expire, pending, timeout_s)
        try:
            return await pending.future
        finally:
            timer.cancel()

    def _expire(self, pending: _Pending, timeout_s: float) -> None:
        if pending.future.done():
            return
        if pending in self._queue:  # not dispatched yet: its images are never computed
            self._queue.remove(pending)
            self.queued_images -= len(pending.images)
        pending.future.set_exception(DeadlineExceededError(timeout_s))

    async def _dispatch_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[_Pending]:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        oldest = self._queue[0]
        while self.queued_images < self.max_batch_size:
            remaining = oldest.enqueued_at + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        batch, size = [], 0
        while self._queue and (not batch or size + len(self._queue[0].images) <= self.max_batch_size):
            pending = self._queue.popleft()
            self.queued_images -= len(pending.images)
            if not pending.future.done():
                batch.append(pending)
                size += len(pending.images)
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        dispatched = time.monotonic()
        # Under load, the time from the previous batch's end counts too (handing out its results, forming this
        # batch): the rate the queue drains at is what admission needs, not only the model's speed.
        started = dispatched if self._busy_since is None else self._busy_since
        size = sum(len(p.images) for p in batch)
        self.computing_images, self._computing_since = size, started
        output: BatchOutput | None = None
        try:
            output = await self._run_batch([p.images for p in batch], [p.stream for p in batch])
        except Exception as error:  # every request of the batch hears about it; the loop goes on
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        finally:
            self.computing_images, self._computing_since = 0, None
            ended = time.monotonic()
            self._busy_since = ended if self._queue else None
            if self._recorder is not None:  # here, not per request: a request may have timed out meanwhile
                self._recorder.record_batch(size, dispatched - batch[0].enqueued_at, output)
        self.throughput.observe(size, ended - started)
        offset = 0
        for pending in batch:
            if not pending.future.done():
                pending.future.set_result(
                    RequestResult(output, offset, len(pending.images), size, dispatched - pending.enqueued_at)
                )
            offset += len(pending.images)


def _ceil(seconds: float) -> int:
    """Whole seconds for Retry-After, at least 1."""
    return max(1, math.ceil(seconds))
