"""The interface every adaptation method implements (the package docstring, app/adaptation/methods/__init__.py, says
how the engine calls it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from app.adaptation.norm import BatchMoments, ConfiguredModel

if TYPE_CHECKING:
    from app.adaptation.config import AdaptationConfig
    from app.adaptation.state import AdaptationState, Source


@dataclass
class SharedForward:
    """A batch's forward pass already made, together with other streams' images (`norm.mixed_forward`)."""

    logits: torch.Tensor
    moments: BatchMoments
    source_logits: torch.Tensor | None


@dataclass
class Forward:
    """A prediction, made before any update it causes: what `adapt` then works from."""

    x: torch.Tensor
    logits: torch.Tensor  # may carry the graph of the forward pass, for the entropy step; the answer is detached
    moments: BatchMoments | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Method:
    name: ClassVar[str]

    def configure(self, model: nn.Module, config: AdaptationConfig, num_classes: int) -> ConfiguredModel | None:
        """A stream's model (None: the method keeps no state and predicts with the frozen source)."""
        return None

    def make_optimizer(self, params: list[nn.Parameter], config: AdaptationConfig) -> torch.optim.Optimizer | None:
        return None

    def predicts_without_grad(self, state: AdaptationState, images: int, source: Source) -> bool:
        return False

    def forward(self, source: Source, state: AdaptationState, x: torch.Tensor, shared: SharedForward | None) -> Forward:
        raise NotImplementedError

    def adapt(self, source: Source, state: AdaptationState, forward: Forward) -> None:
        """What the prediction causes; run after the answer and before the stream's next batch."""

    def adapts(self, forward: Forward) -> bool:
        """Whether `adapt` has anything to do for this forward (the worker then runs it as its own job)."""
        return True
