"""The model worker: exactly one thread owns the model and runs every batch and every reset, in order."""

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from app.adaptation.engine import AdaptationEngine
from app.adaptation.guards import softmax_entropy
from models.data import normalize


@dataclass
class BatchOutput:
    """Plain per-image values for a whole batch, ready to be sliced per request."""

    class_index: list[int]
    confidence: list[float]
    entropy: list[float]
    top_k_index: list[list[int]]
    top_k_confidence: list[list[float]]
    source_class_index: list[int] | None
    step: int
    seconds: dict[str, float]  # duration of each phase


class ModelWorker:
    def __init__(self, engine: AdaptationEngine, mean: tuple[float, ...], std: tuple[float, ...], top_k: int) -> None:
        self.engine = engine
        self.top_k = min(top_k, engine.num_classes)
        self.mean, self.std = mean, std
        self._jobs: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self.snapshot: dict[str, Any] = engine.snapshot()  # replaced (never mutated) after every job

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def predict(self, images: list[torch.Tensor]) -> BatchOutput:
        """Run one batch (a list of uint8 N_i x 3 x S x S tensors, one per request) on the worker thread."""
        return await self._submit(lambda: self._predict(images))

    async def reset(self, reason: str) -> None:
        await self._submit(lambda: self.engine.reset(reason))

    async def capture_state(self) -> dict[str, Any]:
        """The engine's state_dict(), cloned between two batches: serving pauses only for the clone."""
        return await self._submit(self.engine.state_dict)

    async def load_state(self, state: dict[str, Any]) -> None:
        await self._submit(lambda: self.engine.load_state_dict(state))

    async def _submit(self, job: Callable[[], Any]) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((job, future))
        return await asyncio.wrap_future(future)

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            result, error = None, None
            try:
                result = job()
            except BaseException as caught:  # the worker must outlive any one bad batch
                error = caught
            # Before the future resolves: whoever awaited the job (a reset, then GET /v1/status) reads its effect.
            self.snapshot = self.engine.snapshot()
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _predict(self, images: list[torch.Tensor]) -> BatchOutput:
        started = time.perf_counter()
        x = normalize(torch.cat(images).to(self.engine.device, non_blocking=True), self.mean, self.std)
        result = self.engine.step(x)
        stepped = time.perf_counter()
        with torch.inference_mode():
            probabilities = result.logits.float().softmax(1)
            top_conf, top_index = probabilities.topk(self.top_k, dim=1)
            entropy = softmax_entropy(result.logits.float())
            source = result.source_logits.argmax(1).tolist() if result.source_logits is not None else None
            output = BatchOutput(
                class_index=top_index[:, 0].tolist(),
                confidence=top_conf[:, 0].tolist(),
                entropy=entropy.tolist(),
                top_k_index=top_index.tolist(),
                top_k_confidence=top_conf.tolist(),
                source_class_index=source,
                step=result.step,
                seconds={},
            )
        output.seconds = {"model": stepped - started, "postprocess": time.perf_counter() - stepped}
        return output
