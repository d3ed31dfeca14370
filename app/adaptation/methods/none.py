"""`none`: the frozen source model in eval mode; no state, nothing to adapt."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from app.adaptation.methods.base import Forward, Method, SharedForward

if TYPE_CHECKING:
    from app.adaptation.state import AdaptationState, Source


class NoAdaptation(Method):
    name = "none"

    def forward(self, source: Source, state: AdaptationState, x: torch.Tensor, shared: SharedForward | None) -> Forward:
        return Forward(x, source.predict(x))

    def adapts(self, forward: Forward) -> bool:
        return False


METHOD = NoAdaptation
