"""The one-step lag of buffered entropy steps (`AdaptationConfig.step_lag`, on by default).

A stream of small batches takes its entropy step once min_batch of its images are buffered (methods/tent.py). With
the lag that step is computed from exactly what it reads at that moment (the buffered images and their admitted mask,
the stream's parameters, optimiser state, statistics and collapse monitor) on a twin: a copy of the stream's
normalisation layers over the shared frozen backbone with its own optimiser, refreshed in place from the stream. Its
outcome (parameters, optimiser state, what the step counted: steps, skips, the gradient norm) is applied to the
stream at a point that depends only on the stream's batches: just before the stream's next step is computed (its
next buffer fill, or a full batch's own step) or before it is reset. Predictions in between use the parameters before
the step (one step behind), so no prediction depends on when or where the step was computed. `state_dict` carries a
pending step, so a copy or a restored snapshot continues exactly as the original would.

Where it is computed is the source's `run_step`: None computes it at once on the caller's thread (in-process use:
`bench.stream`, `bench.limit`); the server hands it to its step thread (app/serving/worker.py), so that the model
thread answers the next requests meanwhile and waits for the step only where it must be applied. The predictions are
the same either way.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from app.adaptation.state import AdaptationState, Checkpoint, Counters, Source

log = logging.getLogger(__name__)

RunStep = Callable[[Callable[[], "Outcome"]], Future]  # e.g. a one-thread executor's submit


@dataclass
class Outcome:
    """What a step computed on a twin changes in the stream: its parameters and optimiser state, and its counts."""

    point: Checkpoint  # the twin's `checkpoint(statistics=False)` after the step: what `restore` puts in the stream
    counters: Counters  # only what the step counted (the twin's counters start at zero)


class PendingStep:
    """A stream's buffered step, computed (or being computed) on a twin, not yet applied to the stream."""

    def __init__(self, future: Future, job: Callable[[], Outcome] | None = None) -> None:
        self._future, self._job = future, job
        self._outcome: Outcome | None = None
        self._waited = False

    @classmethod
    def computed(cls, outcome: Outcome) -> PendingStep:
        """One already computed (read back from a `state_dict`)."""
        future: Future = Future()
        future.set_result(outcome)
        return cls(future)

    def outcome(self) -> Outcome | None:
        """The step's outcome, waiting for it if need be; computed here if it has not started yet (its place in the
        step thread's queue is then given up). None if it failed: the stream then keeps its state as it is."""
        if not self._waited:
            self._waited = True
            try:
                stolen = self._job is not None and self._future.cancel()
                self._outcome = self._job() if stolen else self._future.result()
            except Exception:
                log.exception("a buffered adaptation step failed; the stream keeps its state as it was")
        return self._outcome

    def apply_to(self, state: AdaptationState) -> None:
        if (outcome := self.outcome()) is not None:
            state.restore(outcome.point)
            state.counters.add(outcome.counters)


def start(source: Source, state: AdaptationState, compute: Callable[[AdaptationState], None]) -> PendingStep:
    """`compute(twin)` (the step, as it would run on the stream) on a twin of `state` as it is now."""
    twin = _spare_twin(source, state)
    twin.restore(state.checkpoint())  # parameters, statistics, optimiser state
    twin.monitor = state.monitor.copy()
    twin.counters = type(state.counters)()

    def job() -> Outcome:
        try:
            with torch.enable_grad():  # grad mode is per thread
                compute(twin)
            return Outcome(twin.checkpoint(statistics=False), twin.counters)
        finally:
            source.spare_twins.put(twin)  # refreshed in full at its next use

    if source.run_step is None:
        return PendingStep(_run_now(job))
    return PendingStep(source.run_step(job), job)


def _spare_twin(source: Source, state: AdaptationState) -> AdaptationState:
    """A twin not in use: one is made when every twin is busy, so there are as many as steps in flight at once."""
    try:
        return source.spare_twins.get_nowait()
    except queue.Empty:
        return type(state)(source)


def _run_now(job: Callable[[], Outcome]) -> Future:
    future: Future = Future()
    try:
        future.set_result(job())
    except Exception as error:
        future.set_exception(error)
    return future
