"""The adaptation engine of one stream: `predict(x)` answers a batch and returns the update it causes, which the
caller runs before the stream's next batch; `step(x)` is both at once. Prediction first, adaptation after.

An engine is a `Source` (the frozen model, the configuration, the method and guards, shared by every stream of the
source) and one `AdaptationState` (state.py). The method (app/adaptation/methods/, by the config's name) does the
work: none (the frozen source), norm (test statistics), tent (test statistics + an entropy step). Only the worker
thread calls it. A buffered step may be pending (computed, or being computed, on the stream's twin: lag.py): it is
applied just before the stream's next step and before a reset; `settle` applies it now.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from app.adaptation.config import AdaptationConfig
from app.adaptation.methods.base import SharedForward
from app.adaptation.state import AdaptationState, Counters, Source


@dataclass
class StepResult:
    logits: torch.Tensor  # from the forward pass made before this batch's update
    source_logits: torch.Tensor | None  # the frozen source model's, when the shadow is on
    step: int  # adaptation steps since the last reset: when predicted (`predict`), after the update (`step`)


@dataclass
class Prediction(StepResult):
    update: Callable[[], None] | None  # what the prediction causes, to run before the stream's next batch


class AdaptationEngine:
    def __init__(
        self, model: nn.Module | Source, num_classes: int = 0, config: AdaptationConfig | None = None, device=None
    ) -> None:
        """`model`: the source model (with num_classes, config and device), or a `Source` another engine shares."""
        self.shared = model if isinstance(model, Source) else Source(model, num_classes, config, device)
        self.state = AdaptationState(self.shared)
        self._update: Callable[[], None] | None = None  # of the last prediction, not yet run

    def sharing_source(self) -> "AdaptationEngine":
        """A new stream at the source, over this engine's shared frozen model and reset point."""
        return AdaptationEngine(self.shared)

    # ----- the calls the worker makes -----

    def predict(self, x: torch.Tensor, shared: SharedForward | None = None) -> Prediction:
        """This batch's prediction, before any update it causes; `update` (None: nothing to do) must run before the
        stream's next batch (a prediction runs any update still pending first). `shared`: this batch's forward pass
        already made with other streams' images (only where `predicts_without_grad` says it needs no gradient)."""
        self.run_update()
        source, state = self.shared, self.state
        x = x.to(source.device, non_blocking=True)
        source_logits = shared.source_logits if shared is not None else None
        if source_logits is None and source.config.shadow_source and state.model is not None:
            source_logits = source.predict(x)
        forward = source.method.forward(source, state, x, shared)
        steps = state.counters.steps_since_reset
        if not source.method.adapts(forward):
            return Prediction(forward.logits, source_logits, steps, None)
        self._update = lambda: source.method.adapt(source, state, forward)
        return Prediction(forward.logits.detach(), source_logits, steps, self.run_update)

    def run_update(self) -> None:
        update, self._update = self._update, None
        if update is not None:
            update()

    def step(self, x: torch.Tensor, shared: SharedForward | None = None) -> StepResult:
        """Predict and adapt: the prediction's logits, and the steps since the last reset after the update."""
        prediction = self.predict(x, shared)
        self.run_update()
        return StepResult(prediction.logits, prediction.source_logits, self.state.counters.steps_since_reset)

    def predicts_without_grad(self, images: int) -> bool:
        """Whether a batch of this many images is predicted without a gradient, so that its forward pass may be
        shared with other streams' images (`norm.mixed_forward`)."""
        return self.state.model is not None and self.shared.method.predicts_without_grad(
            self.state, images, self.shared
        )

    def reset(self, reason: str) -> None:
        """Back to the source state exactly: parameters, statistics, optimiser and guard state."""
        self.run_update()
        self.state.reset(reason, self.shared)

    def settle(self) -> None:
        """Run the pending update and apply a pending buffered step: the state as it will be at the next step."""
        self.run_update()
        self.state.settle()

    # ----- what the rest of the server reads -----

    @property
    def source(self) -> nn.Module:
        """The frozen source model (eval mode, no gradient), shared with every stream of it."""
        return self.shared.model

    @property
    def config(self) -> AdaptationConfig:
        return self.shared.config

    @property
    def num_classes(self) -> int:
        return self.shared.num_classes

    @property
    def device(self) -> torch.device:
        return self.shared.device

    @property
    def adapted(self) -> nn.Module | None:
        """The stream's model: its own normalisation layers over the shared frozen backbone (None for `none`)."""
        return self.state.model

    @property
    def params(self) -> list[nn.Parameter]:
        return self.state.params

    @property
    def stats(self) -> Counters:
        return self.state.counters

    def state_dict(self) -> dict[str, Any]:
        """The stream's state (`AdaptationState.state_dict`) with the method and optimiser it was made under."""
        self.run_update()
        return {
            "method": self.config.method,
            "optimizer": self.config.optimizer if self.state.optimizer is not None else None,
            **self.state.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`, possibly another process's; one that does not fit raises ValueError (or
        KeyError) and leaves the engine as it was."""
        kind = (self.config.method, self.config.optimizer if self.state.optimizer is not None else None)
        if (state["method"], state["optimizer"]) != kind:
            raise ValueError(
                f"state of method {state['method']} (optimiser {state['optimizer']}), this engine runs {kind[0]} "
                f"(optimiser {kind[1]})"
            )
        self._update = None
        self.state.load_state_dict(state, self.shared)

    def snapshot(self) -> dict[str, Any]:
        """Plain values for /v1/status and the metrics; safe to read from other threads."""
        state, counters = self.state, self.state.counters
        return {
            "method": self.config.method,
            "adapted_layers": state.norm_kind,
            "adapted_parameters": sum(p.numel() for p in state.params),
            "steps_total": counters.steps_total,
            "steps_since_reset": counters.steps_since_reset,
            "skipped": dict(counters.skipped),
            "resets": dict(counters.resets),
            "entropy_ema": state.monitor.entropy_ema,
            "prediction_diversity": state.monitor.diversity(),
            "param_drift": counters.drift,
            "last_grad_norm": counters.last_grad_norm,
            "held_back": dict(counters.held_back),
            "buffer_fill": state.buffer_fill,
            "step_pending": state.pending is not None,  # computed, not yet applied (counted in steps once applied)
            "guards": self.config.guard_status(),
            "at": time.time(),
        }
