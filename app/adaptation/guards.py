"""The stability guards: small objects, each with its own settings (TTA_GUARD_<NAME> and the settings beside it),
each acting through one or two hooks of an adaptation batch. The methods call the hooks through `Guards`, which holds
the guards a configuration turns on, in the order of `GUARD_TYPES`; what a guard counts (a step skipped, a reset, an
image held back) it names in its class, so the counters know every reason without the engine listing them.

Hooks (each a no-op unless a guard defines it), in the order a batch meets them:
- `corrects`: on a full batch's first pass, which of its images may correct the statistics it is normalised with;
- `admit`: after the prediction, which of the batch's images join the class-balanced statistics and the step;
- `rollback_point`: before anything changes, what a non-finite value rolls back to;
- `skip_reason`: before an entropy step, a reason not to take it;
- `weights` and `select`: the images' weights in the entropy loss, and which images enter it;
- `after_backward`, `after_step`: on the gradient, on the parameters just stepped;
- `reset_reason`: after the batch, a reason to reset the stream to the source.
The signals they decide on are in signals.py; README, "Methods and guards", says why each exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from app.adaptation.norm import BatchMoments, class_statistics
from app.adaptation.signals import paced_admission, predicted_class_entropy

if TYPE_CHECKING:
    from app.adaptation.config import AdaptationConfig
    from app.adaptation.state import AdaptationState, Source

# Collapse checks start after this many steps: the entropy EMA needs a few batches to mean anything.
COLLAPSE_WARMUP_STEPS = 10


@dataclass
class Admission:
    """Which of a batch's images the statistics and the entropy step take in (None: all of them), and the rows'
    freshness after them (None: not tracked)."""

    admitted: torch.Tensor | None = None
    freshness: torch.Tensor | None = None


class Guard:
    name: ClassVar[str]  # TTA_GUARD_<NAME> turns it on; its key in the status
    skip_reasons: ClassVar[tuple[str, ...]] = ()  # what it counts in `skipped`
    reset_reasons: ClassVar[tuple[str, ...]] = ()  # in `resets`
    held_back_reasons: ClassVar[tuple[str, ...]] = ()  # in `held_back` (images kept out of statistics and step)

    def __init__(self, config: AdaptationConfig, num_classes: int) -> None:
        self.config, self.num_classes = config, num_classes

    @classmethod
    def enabled(cls, config: AdaptationConfig) -> bool:
        return bool(getattr(config, f"guard_{cls.name}"))

    def corrects(self, batch: Predicted) -> torch.Tensor | None:
        return None

    def admit(self, state: AdaptationState, batch: Predicted, admission: Admission) -> None:
        pass

    def rollback_point(self, state: AdaptationState) -> dict[str, Any] | None:
        return None

    def skip_reason(self, state: AdaptationState, logits: torch.Tensor) -> str | None:
        return None

    def weights(self, state: AdaptationState, logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def select(self, entropy: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_backward(self, state: AdaptationState) -> None:
        pass

    def after_step(self, state: AdaptationState, source: Source) -> None:
        pass

    def reset_reason(self, state: AdaptationState) -> str | None:
        return None


@dataclass
class Predicted:
    """A batch just predicted: its logits (detached), predicted classes and recorded moments."""

    logits: torch.Tensor
    classes: torch.Tensor
    moments: BatchMoments


class Reliable(Guard):
    """Entropy minimisation on confident samples only (EATA): uncertain samples' gradients are noise."""

    name, skip_reasons = "reliable", ("no_reliable_samples",)

    def select(self, entropy: torch.Tensor) -> torch.Tensor:
        return entropy < self.config.reliable_threshold(self.num_classes)


class Reweight(Guard):
    name = "reweight"

    def weights(self, state: AdaptationState, logits: torch.Tensor) -> torch.Tensor | None:
        """Each sample's weight in the entropy loss: 1 / how often its predicted class is predicted lately.

        Entropy minimisation favours whichever class the model already over-predicts: the samples it pushes
        toward that class outnumber the others, so over a long stream one class takes over (DELTA, Zhao et al.
        ICLR 2023). Weighting by the inverse share makes every predicted class count equally in expectation.
        The shares are those of the images learnt from: a flood the class pace held back does not set them.
        """
        shares = state.monitor.admitted_shares()
        if shares is None:
            return None
        # A floor of a tenth of an even share: a class predicted almost never cannot make one sample the whole loss.
        shares = shares.to(logits.device, logits.dtype).clamp_min(0.1 / self.num_classes)
        return 1.0 / shares[logits.detach().argmax(1)]


class Balance(Guard):
    name, skip_reasons = "balance", ("class_imbalanced",)

    def skip_reason(self, state: AdaptationState, logits: torch.Tensor) -> str | None:
        # A batch of mostly one class (traffic sorted by class) is label shift, not domain shift: minimising
        # its entropy teaches the model to predict that class for everything, and the next class pays.
        threshold = self.config.balance_threshold(self.num_classes, len(logits))
        return "class_imbalanced" if predicted_class_entropy(logits) < threshold else None


class MinBatch(Guard):
    """Class-balanced statistics instead of the batch's own (norm.configure), and entropy steps on min_batch images:
    smaller batches are predicted, then buffered until that many have been (the methods ask `buffers`)."""

    name, skip_reasons = "min_batch", ("small_batch_buffered",)

    def buffers(self, images: int) -> bool:
        return images < self.config.min_batch


class Plausible(Guard):
    """Features far from anything the model was trained on (noise): not a domain to adapt to."""

    name, skip_reasons, held_back_reasons = "plausible", ("held_back",), ("implausible",)

    def corrects(self, batch: Predicted) -> torch.Tensor:
        # Measured before the correction: noise normalised with its own statistics would look plausible after it.
        return self._plausible(batch)

    def admit(self, state: AdaptationState, batch: Predicted, admission: Admission) -> None:
        admitted = self._plausible(batch)
        state.counters.held_back["implausible"] += int((~admitted).sum())
        admission.admitted = admitted if admission.admitted is None else admission.admitted & admitted

    def _plausible(self, batch: Predicted) -> torch.Tensor:
        distance = batch.moments.source_distance().to(batch.classes.device)
        scale = self.config.source_distance_q99
        if scale is None:  # a model not calibrated: no threshold can be told from its statistics alone
            return torch.ones_like(distance, dtype=torch.bool)
        return distance <= self.config.plausible_distance * scale


class ClassPace(Guard):
    """While one class takes most of the recent predictions, no class's statistics may run ahead of the others'
    (signals.paced_admission)."""

    name, skip_reasons, held_back_reasons = "class_pace", ("held_back",), ("class_pace",)

    def admit(self, state: AdaptationState, batch: Predicted, admission: Admission) -> None:
        c = self.config
        layer = class_statistics(state.model)
        shares = state.monitor.class_shares_with(batch.logits)
        binding = float(shares.max()) >= c.class_pace_trigger
        rows = batch.classes % len(layer.class_mean)
        candidates = admission.admitted
        if candidates is None:
            candidates = torch.ones(len(batch.classes), dtype=torch.bool, device=batch.classes.device)
        momentum, window, margin = layer.per_sample_momentum, c.stats_horizon, c.class_pace_margin
        paced, admission.freshness = paced_admission(
            layer.row_freshness, rows, candidates, momentum, window, margin, binding
        )
        state.counters.held_back["class_pace"] += int((candidates & ~paced).sum())
        admission.admitted = paced


class GradClip(Guard):
    name = "grad_clip"

    def after_backward(self, state: AdaptationState) -> None:
        grad_norm = torch.nn.utils.clip_grad_norm_(state.params, self.config.grad_clip_norm)
        state.counters.last_grad_norm = float(grad_norm)


class Nonfinite(Guard):
    """A non-finite prediction, loss, gradient or parameter rolls the state back to before the batch."""

    name, skip_reasons = "nonfinite", ("nonfinite",)

    def rollback_point(self, state: AdaptationState) -> dict[str, Any] | None:
        return state.checkpoint(statistics=False)


class Anchor(Guard):
    name = "anchor"

    def after_step(self, state: AdaptationState, source: Source) -> None:
        # Entropy minimisation keeps pushing in the direction it found, and Adam's steps do not shrink as the
        # gradient does: left alone the parameters drift for as long as the stream lasts and errors pile up
        # (TENT's failure on long streams). A constant pull back makes the drift settle where the pull
        # balances the push, which is CoTTA's stochastic restore (p = 0.01) in expectation.
        with torch.no_grad():
            for param, initial in zip(state.params, source.source_params, strict=True):
                param.lerp_(initial, self.config.anchor_rate)


class Collapse(Guard):
    name, reset_reasons = "collapse", ("collapse_entropy", "collapse_diversity")

    def reset_reason(self, state: AdaptationState) -> str | None:
        if state.counters.steps_since_reset < COLLAPSE_WARMUP_STEPS:
            return None
        monitor, max_entropy = state.monitor, math.log(self.num_classes)
        diversity = monitor.diversity()
        if monitor.entropy_ema < self.config.collapse_entropy * max_entropy:
            return "collapse_entropy"
        if diversity is not None and diversity < self.config.collapse_diversity * max_entropy:
            return "collapse_diversity"
        return None


class Drift(Guard):
    name, reset_reasons = "drift", ("drift",)

    def reset_reason(self, state: AdaptationState) -> str | None:
        return "drift" if state.counters.drift > self.config.drift_max else None


class Periodic(Guard):
    """A reset every reset_every_steps steps (0: off): not a guard_ flag, its own setting turns it on."""

    name, reset_reasons = "periodic", ("periodic",)

    @classmethod
    def enabled(cls, config: AdaptationConfig) -> bool:
        return config.reset_every_steps > 0

    def reset_reason(self, state: AdaptationState) -> str | None:
        return "periodic" if state.counters.steps_since_reset >= self.config.reset_every_steps else None


GUARD_TYPES: tuple[type[Guard], ...] = (
    Reliable,
    Reweight,
    Balance,
    MinBatch,
    Plausible,
    ClassPace,
    GradClip,
    Nonfinite,
    Anchor,
    Collapse,
    Drift,
    Periodic,
)


def reasons(kind: str) -> tuple[str, ...]:
    """Every reason the guards count of `kind` (skip, reset, held_back), each once, in GUARD_TYPES' order."""
    attribute = {"skip": "skip_reasons", "reset": "reset_reasons", "held_back": "held_back_reasons"}[kind]
    return tuple(dict.fromkeys(r for guard in GUARD_TYPES for r in getattr(guard, attribute)))


class Guards:
    """The guards a configuration turns on, and each hook over all of them."""

    def __init__(self, config: AdaptationConfig, num_classes: int) -> None:
        self.active = [guard(config, num_classes) for guard in GUARD_TYPES if guard.enabled(config)]
        self.min_batch = next((g for g in self.active if isinstance(g, MinBatch)), None)
        self._admitting = [g for g in self.active if type(g).admit is not Guard.admit]
        # Whether a non-finite value rolls back (and a non-finite prediction skips the batch).
        self.rolls_back = any(type(g).rollback_point is not Guard.rollback_point for g in self.active)

    def buffers(self, images: int) -> bool:
        """Whether a batch of this many images is buffered for a later step rather than stepped on alone."""
        return self.min_batch is not None and self.min_batch.buffers(images)

    def corrects(self, batch: Predicted) -> torch.Tensor | None:
        """Which images of a first pass may correct the batch's statistics (None: all of them)."""
        masks = [m for g in self.active if (m := g.corrects(batch)) is not None]
        return None if not masks else torch.stack(masks).all(0)

    def admission(self, state: AdaptationState, batch: Predicted) -> Admission:
        admission = Admission()
        if not self._admitting or not batch.moments:
            return admission
        for guard in self._admitting:
            guard.admit(state, batch, admission)
        if admission.admitted is not None and bool(admission.admitted.all()):
            admission.admitted = None
        return admission

    def rollback_point(self, state: AdaptationState) -> dict[str, Any] | None:
        return next((p for g in self.active if (p := g.rollback_point(state)) is not None), None)

    def skip_reason(self, state: AdaptationState, logits: torch.Tensor) -> str | None:
        return next((r for g in self.active if (r := g.skip_reason(state, logits)) is not None), None)

    def weights(self, state: AdaptationState, logits: torch.Tensor) -> torch.Tensor:
        weights = torch.ones(len(logits), device=logits.device)
        for guard in self.active:
            if (w := guard.weights(state, logits)) is not None:
                weights = w
        return weights

    def select(self, entropy: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str | None]:
        """The entropies and weights that enter the loss, or the reason none does."""
        for guard in self.active:
            if (kept := guard.select(entropy)) is not None:
                if not bool(kept.any()):
                    return entropy, weights, guard.skip_reasons[0]
                entropy, weights = entropy[kept], weights[kept]
        return entropy, weights, None

    def after_backward(self, state: AdaptationState) -> None:
        for guard in self.active:
            guard.after_backward(state)

    def after_step(self, state: AdaptationState, source: Source) -> None:
        for guard in self.active:
            guard.after_step(state, source)

    def reset_reason(self, state: AdaptationState) -> str | None:
        return next((r for g in self.active if (r := g.reset_reason(state)) is not None), None)
