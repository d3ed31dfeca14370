"""Dynamic batching on the event loop.

A batch is dispatched when it holds `max_batch_size` images or when its oldest request has waited
`max_wait_s`. While the worker runs one batch the next one fills, so batches grow with load. A
request's images stay together and in order; the queue is bounded in images; a request past its
deadline is dropped from the queue (its images are never computed) and answered 504 by its route.
"""

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from app.serving.preprocess import InputError
from app.serving.worker import BatchOutput


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
    enqueued_at: float
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[list[torch.Tensor]], Awaitable[BatchOutput]],
        max_batch_size: int,
        max_wait_s: float,
        max_queue_images: int,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self._queue: deque[_Pending] = deque()
        self.queued_images = 0
        self._arrived = asyncio.Event()
        self._accepting = True
        self._task: asyncio.Task | None = None
        self.on_batch: Callable[[int, float], None] = lambda size, wait: None  # metrics hook

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
                pending.future.set_exception(InputError(503, "shutting_down", "the server is shutting down"))

    async def submit(self, images: torch.Tensor, timeout_s: float) -> RequestResult:
        if not self._accepting:
            raise InputError(503, "shutting_down", "the server is shutting down; retry on another instance")
        if self.queued_images + len(images) > self.max_queue_images:
            raise InputError(503, "queue_full", f"the queue holds {self.queued_images} images; retry shortly")
        pending = _Pending(images, time.monotonic())
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
        pending.future.set_exception(
            InputError(504, "timeout", f"no answer within {timeout_s:g} s; the server is overloaded")
        )

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
        size = sum(len(p.images) for p in batch)
        self.on_batch(size, dispatched - batch[0].enqueued_at)
        try:
            output = await self._run_batch([p.images for p in batch])
        except Exception as error:  # every request of the batch hears about it; the loop goes on
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        offset = 0
        for pending in batch:
            if not pending.future.done():
                pending.future.set_result(
                    RequestResult(output, offset, len(pending.images), size, dispatched - pending.enqueued_at)
                )
            offset += len(pending.images)
