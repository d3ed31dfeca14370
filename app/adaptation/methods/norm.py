"""`norm`: test-statistics normalisation, no gradient (TENT's "norm" baseline; with the small-batch guard, the
class-balanced running statistics of norm.py instead of each batch's own).

`TestStatistics` is also the first half of `tent`: configure the copy, predict, then commit the batch's moments
under its predicted classes, for the images the admission guards let in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from app.adaptation.guards import Admission, Predicted
from app.adaptation.methods.base import Forward, Method, SharedForward
from app.adaptation.norm import BatchMoments, ConfiguredModel, configure, recording
from app.adaptation.signals import softmax_entropy

if TYPE_CHECKING:
    from app.adaptation.config import AdaptationConfig
    from app.adaptation.state import AdaptationState, Checkpoint, Source


class TestStatistics(Method):
    name = "norm"

    def configure(self, model: nn.Module, config: AdaptationConfig, num_classes: int) -> ConfiguredModel:
        return configure(
            model,
            robust_stats=config.guard_min_batch,
            stats_horizon=config.stats_horizon,
            num_classes=num_classes,
            stats_memory_mb=config.stats_memory_mb,
        )

    def predicts_without_grad(self, state: AdaptationState, images: int, source: Source) -> bool:
        return state.mixable

    def forward(self, source: Source, state: AdaptationState, x: torch.Tensor, shared: SharedForward | None) -> Forward:
        return self.forward_without_grad(state, x, shared)

    @staticmethod
    def forward_without_grad(state: AdaptationState, x: torch.Tensor, shared: SharedForward | None) -> Forward:
        if shared is not None:
            return Forward(x, shared.logits, shared.moments)
        with torch.no_grad(), recording(state.model) as moments:
            logits = state.model(x)
        return Forward(x, logits, moments)

    def adapt(self, source: Source, state: AdaptationState, forward: Forward) -> None:
        admission = self.predicted(source, state, forward.logits, forward.moments, None)  # no step to roll back
        if admission is not None:  # the recent predictions, which the class pace reads
            state.monitor.observe(forward.logits, softmax_entropy(forward.logits), admission.admitted)

    @staticmethod
    def predicted(
        source: Source, state: AdaptationState, logits: torch.Tensor, moments: BatchMoments, point: Checkpoint | None
    ) -> Admission | None:
        """After the prediction: a finite one lets the batch into the test statistics under its predicted classes
        (the images the admission guards let in); a non-finite one means the input or the state holds something
        non-finite, so the batch is skipped (None), with nothing to roll back: nothing has changed since the
        prediction. `point`: the rollback point of a step this batch takes, which the rows it changes join."""
        if source.guards.rolls_back and not bool(torch.isfinite(logits).all()):
            state.counters.skipped["nonfinite"] += 1
            return None
        predicted = logits.argmax(1)
        if point is not None:  # the rows of the statistics this batch changes, as they were: a rollback's
            point["rows"] = moments.rows(predicted)
        batch = Predicted(logits, predicted, moments)
        admission = source.guards.admission(state, batch)
        moments.commit(predicted, admission.admitted, admission.freshness)
        window = source.config.recent_window
        if window and source.config.batch_stats_prior and source.guards.buffers(len(logits)):
            # A small batch is too small to correct itself: it joins the recent residual that corrects the next ones.
            moments.join_recent(
                logits.softmax(1), source.guards.corrects(batch), window, source.config.batch_stats_prior
            )
        return admission


def rollback(state: AdaptationState, point: Checkpoint) -> None:
    state.restore(point)
    state.counters.skipped["nonfinite"] += 1


METHOD = TestStatistics
