"""`tent`: test statistics and an entropy-minimisation step on the normalisation layers' affine parameters (Wang et
al. 2021), read as the official code: configure the model (norm's copy), collect its affine parameters, forward and
adapt, reset. With every guard off it is TENT as published; the guards (guards.py) act at their hooks.

A batch smaller than min_batch (the small-batch guard) is predicted without a gradient and buffered; the step is
taken on the buffered images once min_batch of them have been predicted. With `step_lag` (the default) that step is
computed on a twin and applied just before the stream's next step (lag.py): the predictions in between are one step
behind, and the step is off the request's path. A full batch steps at once on its own forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from app.adaptation import lag
from app.adaptation.guards import Predicted
from app.adaptation.methods.base import Forward, SharedForward
from app.adaptation.methods.norm import TestStatistics, rollback
from app.adaptation.norm import batch_correction, class_statistics, corrected_by, recording
from app.adaptation.signals import relative_drift, softmax_entropy

if TYPE_CHECKING:
    from app.adaptation.config import AdaptationConfig
    from app.adaptation.state import AdaptationState, Checkpoint, Source


@contextmanager
def corrected(source: Source, state: AdaptationState, x: torch.Tensor) -> Iterator[None]:
    """A full batch's passes with its own statistics correcting the class-balanced ones (norm.batch_correction),
    from a first pass's prediction without a gradient; as they are where the setting or the statistics are off."""
    prior = source.config.batch_stats_prior
    layer = class_statistics(state.model)
    if not prior or layer is None or len(x) < 2:
        yield
        return
    with torch.no_grad(), recording(state.model) as moments:  # only the pass after counts in the statistics
        logits = state.model(x)
    probabilities = logits.softmax(1)
    correcting = source.guards.corrects(Predicted(logits, logits.argmax(1), moments))
    if correcting is not None and not bool(correcting.any()):
        yield  # nothing plausible to correct with (noise)
        return
    correction = batch_correction(probabilities, len(layer.class_mean), prior, correcting)
    with corrected_by(state.model, correction):
        yield


class Tent(TestStatistics):
    name = "tent"

    def make_optimizer(self, params: list[nn.Parameter], config: AdaptationConfig) -> torch.optim.Optimizer:
        if config.optimizer == "sgd":
            return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
        return torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999))

    def predicts_without_grad(self, state: AdaptationState, images: int, source: Source) -> bool:
        return state.mixable and source.guards.buffers(images)

    def forward(self, source: Source, state: AdaptationState, x: torch.Tensor, shared: SharedForward | None) -> Forward:
        if source.guards.buffers(len(x)):
            return self.forward_without_grad(state, x, shared)
        state.settle()  # a pending buffered step lands before this batch's own step, which this pass begins
        with corrected(source, state, x), torch.enable_grad(), recording(state.model) as moments:
            logits = state.model(x)  # its graph: the batch's own entropy step reuses this pass
        return Forward(x, logits, moments)

    def adapt(self, source: Source, state: AdaptationState, forward: Forward) -> None:
        buffered = source.guards.buffers(len(forward.x))
        # A rollback point only for the step on this batch's own pass: a buffered batch's step (on the buffer, after
        # its statistics joined) takes its own, and before that nothing would need undoing.
        point = None if buffered else source.guards.rollback_point(state)
        logits = forward.logits.detach()
        admission = self.predicted(source, state, logits, forward.moments, point)
        admitted = admission.admitted if admission is not None else None
        if admission is not None:
            with torch.enable_grad():
                if buffered:
                    self._buffer_and_maybe_step(source, state, forward.x, admitted)
                else:
                    self._steps(source, state, forward, point, admitted)
        if torch.isfinite(logits).all():
            self._after_batch(source, state, logits, admitted)

    def _steps(
        self,
        source: Source,
        state: AdaptationState,
        forward: Forward,
        point: Checkpoint | None,
        admitted: torch.Tensor | None,
    ) -> None:
        """`steps_per_batch` entropy steps; the first reuses the prediction's forward pass. Only the images the
        statistics admitted enter the loss; the class-balance check reads the whole batch."""
        logits = forward.logits
        for i in range(source.config.steps_per_batch):
            if i > 0:
                with corrected(source, state, forward.x):  # not recorded: the batch is already in the statistics
                    logits = state.model(forward.x)
            if not self._step(source, state, logits, point, admitted):
                return

    def _buffer_and_maybe_step(
        self, source: Source, state: AdaptationState, x: torch.Tensor, admitted: torch.Tensor | None
    ) -> None:
        state.buffer.append((x, admitted))
        if state.buffer_fill < source.config.min_batch:
            state.counters.skipped["small_batch_buffered"] += 1
            return
        buffered = torch.cat([b for b, _ in state.buffer])
        masks = [m for _, m in state.buffer]
        admitted_all = None
        if any(m is not None for m in masks):
            admitted_all = torch.cat(
                [torch.ones(len(b), dtype=torch.bool, device=b.device) if m is None else m for b, m in state.buffer]
            )
        state.buffer = []
        state.settle()  # the previous buffered step lands before this one is computed from the state
        if source.config.step_lag:
            step = partial(self._buffered_steps, source, buffered=buffered, admitted=admitted_all)
            state.pending = lag.start(source, state, step)
        else:
            self._buffered_steps(source, state, buffered, admitted_all)

    def _buffered_steps(
        self, source: Source, state: AdaptationState, buffered: torch.Tensor, admitted: torch.Tensor | None
    ) -> None:
        point = source.guards.rollback_point(state)
        for _ in range(source.config.steps_per_batch):
            # not recorded: these images joined the statistics when they were predicted
            if not self._step(source, state, state.model(buffered), point, admitted):
                break

    def _step(
        self,
        source: Source,
        state: AdaptationState,
        logits: torch.Tensor,
        point: Checkpoint | None,
        admitted: torch.Tensor | None,
    ) -> bool:
        guards, counters = source.guards, state.counters
        if (reason := guards.skip_reason(state, logits)) is not None:
            counters.skipped[reason] += 1
            return False
        entropy = softmax_entropy(logits)
        weights = guards.weights(state, logits)
        if admitted is not None:
            # What the statistics held back (implausible, or paced) does not teach the parameters either.
            if not bool(admitted.any()):
                counters.skipped["held_back"] += 1
                return False
            entropy, weights = entropy[admitted], weights[admitted]
        entropy, weights, reason = guards.select(entropy, weights)
        if reason is not None:
            counters.skipped[reason] += 1
            return False
        loss = (weights * entropy).sum() / weights.sum()
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        guards.after_backward(state)
        if point is not None and not (torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in state.params)):
            rollback(state, point)
            return False
        state.optimizer.step()
        if point is not None and not all(torch.isfinite(p).all() for p in state.params):
            rollback(state, point)
            return False
        guards.after_step(state, source)
        counters.steps_total += 1
        counters.steps_since_reset += 1
        return True

    def _after_batch(
        self, source: Source, state: AdaptationState, logits: torch.Tensor, admitted: torch.Tensor | None
    ) -> None:
        state.monitor.observe(logits, softmax_entropy(logits), admitted)
        if state.drift_at_steps != state.counters.steps_total:  # the parameters change only with a step
            state.counters.drift = relative_drift(state.params, source.source_params)
            state.drift_at_steps = state.counters.steps_total
        if (reason := source.guards.reset_reason(state)) is not None:
            state.reset(reason, source)


METHOD = Tent
