"""The adaptation engine: one call per batch, `step(x) -> logits`, prediction first and adaptation after.

Only the worker thread calls it. Methods:
- none: the frozen source model in eval mode;
- norm: test-statistics normalisation, no gradient;
- tent: norm + one entropy-minimisation step on the normalisation layers' affine parameters.
With every guard off, `tent` is TENT as published; the guards are described in README.md.
"""

import time
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from app.adaptation.guards import (
    CollapseMonitor,
    paced_admission,
    predicted_class_entropy,
    relative_drift,
    softmax_entropy,
)
from app.adaptation.norm import (
    TestTimeBatchNorm,
    can_mix,
    class_statistics,
    commit_statistics,
    configure,
    restore_rows,
    set_stats_update,
    source_distance,
    statistics_rows,
)
from app.config import Settings

# Every reason the engine counts, so that each series exists (at 0) before its first event.
SKIP_REASONS = ("small_batch_buffered", "class_imbalanced", "held_back", "no_reliable_samples", "nonfinite")
RESET_REASONS = ("manual", "drift", "collapse_entropy", "collapse_diversity", "periodic")
HELD_BACK_REASONS = ("implausible", "class_pace")  # images kept out of the statistics and the entropy step

# Collapse checks start after this many steps: the entropy EMA needs a few batches to mean anything.
COLLAPSE_WARMUP_STEPS = 10


@dataclass
class StepResult:
    logits: torch.Tensor  # from the forward pass made before this batch's update
    source_logits: torch.Tensor | None  # the frozen source model's, when the shadow is on
    step: int  # adaptation steps since the last reset, after this batch


@dataclass
class MixedPrediction:
    logits: torch.Tensor  # of this stream's images, from a forward pass shared with other streams'
    source_logits: torch.Tensor | None


@dataclass
class EngineStats:
    steps_total: int = 0
    steps_since_reset: int = 0
    skipped: Counter = field(default_factory=lambda: Counter(dict.fromkeys(SKIP_REASONS, 0)))
    resets: Counter = field(default_factory=lambda: Counter(dict.fromkeys(RESET_REASONS, 0)))
    last_grad_norm: float | None = None
    drift: float = 0.0
    held_back: Counter = field(default_factory=lambda: Counter(dict.fromkeys(HELD_BACK_REASONS, 0)))


class AdaptationEngine:
    def __init__(self, source: nn.Module, num_classes: int, settings: Settings, device: torch.device) -> None:
        self.settings = settings
        self.num_classes = num_classes
        self.device = device
        self.source = source.to(device).eval()
        self.source.requires_grad_(False)
        self.stats = EngineStats()
        self.adapted: nn.Module | None = None
        self.params: list[nn.Parameter] = []
        self.norm_kind = "none"
        if settings.method != "none":
            configured = configure(
                self.source,
                robust_stats=settings.guard_min_batch,
                stats_horizon=settings.stats_horizon,
                num_classes=num_classes,
            )
            self.adapted, self.params, self.norm_kind = configured.model, configured.params, configured.norm_kind
        self.mixable = self.adapted is not None and can_mix(self.adapted)
        self._initial_state = self._adaptable_state()
        self._source_params = [p.detach().clone() for p in self.params]
        self._fresh_guard_state()

    # ----- the one call the worker makes -----

    def step(self, x: torch.Tensor, predicted: MixedPrediction | None = None) -> StepResult:
        """`predicted`: this batch's forward pass already made, in a `mixed_forward` with other streams' images
        (only where `predicts_without_grad` says the pass needs no gradient)."""
        x = x.to(self.device, non_blocking=True)
        source_logits = predicted.source_logits if predicted is not None else None
        if source_logits is None and (self.settings.shadow_source or self.adapted is None):
            with torch.inference_mode():
                source_logits = self.source(x)
        if self.adapted is None:
            return StepResult(source_logits, None, 0)
        shadow = source_logits if self.settings.shadow_source else None
        last_good = self._adaptable_state(statistics=False) if self.settings.guard_nonfinite else None
        if self.settings.method == "norm":
            logits = self._forward_without_grad(x, predicted)
            if self._predicted(logits, last_good):  # the recent predictions, which the class pace reads
                self.monitor.observe(logits, softmax_entropy(logits), self._admitted)
            return StepResult(logits, shadow, self.stats.steps_since_reset)

        small = self.settings.guard_min_batch and len(x) < self.settings.min_batch
        if small:
            logits = self._forward_without_grad(x, predicted)
            if self._predicted(logits, last_good):
                self._buffer_and_maybe_adapt(x)
        else:
            with torch.enable_grad():
                logits = self.adapted(x)
                if self._predicted(logits.detach(), last_good):
                    self._adapt(x, logits, last_good)
        logits = logits.detach()
        if torch.isfinite(logits).all():
            self._check_collapse_and_drift(logits)
        return StepResult(logits, shadow, self.stats.steps_since_reset)

    def predicts_without_grad(self, images: int) -> bool:
        """Whether a batch of this many images is predicted without a gradient, so that its forward pass may be
        shared with other streams' images (`norm.mixed_forward`)."""
        if self.adapted is None or not self.mixable:
            return False
        return self.settings.method == "norm" or (self.settings.guard_min_batch and images < self.settings.min_batch)

    def _forward_without_grad(self, x: torch.Tensor, predicted: MixedPrediction | None) -> torch.Tensor:
        if predicted is not None:
            return predicted.logits
        with torch.no_grad():
            return self.adapted(x)

    def reset(self, reason: str) -> None:
        """Back to the source state exactly: parameters, statistics, optimiser and guard state."""
        self._restore(self._initial_state)
        self._fresh_guard_state()
        self.stats.resets[reason] += 1
        self.stats.steps_since_reset = 0
        self.stats.drift = 0.0

    # ----- adaptation -----

    def _adapt(self, x: torch.Tensor, logits: torch.Tensor, last_good: dict | None) -> None:
        """`steps_per_batch` entropy steps; the first reuses the prediction's forward pass. Only the images the
        statistics admitted enter the loss; the class-balance check reads the whole batch."""
        admitted = self._admitted
        for i in range(self.settings.steps_per_batch):
            if i > 0:
                set_stats_update(self.adapted, False)  # the batch was already counted in the statistics
                try:
                    logits = self.adapted(x)
                finally:
                    set_stats_update(self.adapted, True)
            if not self._gradient_step(logits, last_good, admitted):
                return

    def _buffer_and_maybe_adapt(self, x: torch.Tensor) -> None:
        self._buffer.append(x)
        self._buffer_admitted.append((x, self._admitted))
        if sum(len(b) for b in self._buffer) < self.settings.min_batch:
            self.stats.skipped["small_batch_buffered"] += 1
            return
        buffered = torch.cat(self._buffer)
        admitted = self._buffered_admitted()
        self._buffer.clear()
        self._buffer_admitted.clear()
        last_good = self._adaptable_state(statistics=False) if self.settings.guard_nonfinite else None
        set_stats_update(self.adapted, False)  # these samples updated the statistics when they were predicted
        try:
            with torch.enable_grad():
                for _ in range(self.settings.steps_per_batch):
                    if not self._gradient_step(self.adapted(buffered), last_good, admitted):
                        break
        finally:
            set_stats_update(self.adapted, True)

    def _buffered_admitted(self) -> torch.Tensor | None:
        """The admitted mask of the buffered images (None: all of them). A buffer restored by `load_state_dict`
        comes without masks and counts as admitted."""
        pairs = self._buffer_admitted
        if len(pairs) != len(self._buffer) or any(x is not b for (x, _), b in zip(pairs, self._buffer, strict=True)):
            return None
        if all(mask is None for _, mask in pairs):
            return None
        return torch.cat([torch.ones(len(x), dtype=torch.bool, device=x.device) if m is None else m for x, m in pairs])

    def _gradient_step(
        self, logits: torch.Tensor, last_good: dict | None, admitted: torch.Tensor | None = None
    ) -> bool:
        if self.settings.guard_balance and predicted_class_entropy(logits) < self.settings.balance_threshold(
            self.num_classes, len(logits)
        ):
            # A batch of mostly one class (traffic sorted by class) is label shift, not domain shift: minimising
            # its entropy teaches the model to predict that class for everything, and the next class pays.
            self.stats.skipped["class_imbalanced"] += 1
            return False
        entropy = softmax_entropy(logits)
        weights = self._class_weights(logits)
        if admitted is not None:
            # What the statistics held back (implausible, or paced) does not teach the parameters either.
            if not bool(admitted.any()):
                self.stats.skipped["held_back"] += 1
                return False
            entropy, weights = entropy[admitted], weights[admitted]
        if self.settings.guard_reliable:
            reliable = entropy < self.settings.reliable_threshold(self.num_classes)
            if not bool(reliable.any()):
                self.stats.skipped["no_reliable_samples"] += 1
                return False
            entropy, weights = entropy[reliable], weights[reliable]
        loss = (weights * entropy).sum() / weights.sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.settings.guard_grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip_norm)
            self.stats.last_grad_norm = float(grad_norm)
        if last_good is not None and not (
            torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in self.params)
        ):
            self._rollback(last_good)
            return False
        self.optimizer.step()
        if last_good is not None and not all(torch.isfinite(p).all() for p in self.params):
            self._rollback(last_good)
            return False
        if self.settings.guard_anchor:
            # Entropy minimisation keeps pushing in the direction it found, and Adam's steps do not shrink as the
            # gradient does: left alone the parameters drift for as long as the stream lasts and errors pile up
            # (TENT's failure on long streams). A constant pull back makes the drift settle where the pull
            # balances the push, which is CoTTA's stochastic restore (p = 0.01) in expectation.
            with torch.no_grad():
                for param, source in zip(self.params, self._source_params, strict=True):
                    param.lerp_(source, self.settings.anchor_rate)
        self.stats.steps_total += 1
        self.stats.steps_since_reset += 1
        return True

    def _class_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Each sample's weight in the entropy loss: 1 / how often its predicted class is predicted lately.

        Entropy minimisation favours whichever class the model already over-predicts: the samples it pushes
        toward that class outnumber the others, so over a long stream one class takes over (DELTA, Zhao et al.
        ICLR 2023). Weighting by the inverse share makes every predicted class count equally in expectation.
        The shares are those of the images learnt from: a flood the class pace held back does not set them.
        """
        shares = self.monitor.admitted_shares() if self.settings.guard_reweight else None
        if shares is None:
            return torch.ones(len(logits), device=logits.device)
        # A floor of a tenth of an even share: a class predicted almost never cannot make one sample the whole loss.
        shares = shares.to(logits.device, logits.dtype).clamp_min(0.1 / self.num_classes)
        return 1.0 / shares[logits.detach().argmax(1)]

    def _predicted(self, logits: torch.Tensor, last_good: dict | None) -> bool:
        """After the prediction: a finite one lets the batch into the test statistics under its predicted classes;
        a non-finite one means the input or the state holds something non-finite, so roll back."""
        self._admitted = None
        if last_good is not None and not bool(torch.isfinite(logits).all()):
            self._rollback(last_good)
            return False
        predicted = logits.argmax(1)
        if last_good is not None:  # the rows of the statistics this batch changes, as they were: a rollback's
            last_good["rows"] = statistics_rows(self.adapted, predicted)
        self._admitted, freshness = self._admission(logits, predicted)
        commit_statistics(self.adapted, predicted, self._admitted, freshness)
        return True

    def _admission(
        self, logits: torch.Tensor, predicted: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Which of the batch's images the class-balanced statistics, and then the entropy step, take in (None: all
        of them), and the rows' freshness after them (None: not tracked, the class pace is off)."""
        s = self.settings
        layer = class_statistics(self.adapted)
        if layer is None or layer._pending is None or not (s.guard_plausible or s.guard_class_pace):
            return None, None
        admitted = torch.ones(len(predicted), dtype=torch.bool, device=predicted.device)
        if s.guard_plausible:
            # Features far from anything the model was trained on (noise): not a domain to adapt to.
            admitted = source_distance(self.adapted).to(predicted.device) <= s.plausible_distance
            self.stats.held_back["implausible"] += int((~admitted).sum())
        freshness = None
        if s.guard_class_pace:
            shares = self.monitor.class_shares_with(logits)
            binding = float(shares.max()) >= s.class_pace_trigger
            rows = predicted % len(layer.class_mean)
            momentum, window, margin = layer.per_sample_momentum, s.stats_horizon, s.class_pace_margin
            paced, freshness = paced_admission(layer.row_freshness, rows, admitted, momentum, window, margin, binding)
            self.stats.held_back["class_pace"] += int((admitted & ~paced).sum())
            admitted = paced
        return (None if bool(admitted.all()) else admitted), freshness

    # ----- guards -----

    def _rollback(self, last_good: dict) -> None:
        self._restore(last_good)
        self.stats.skipped["nonfinite"] += 1

    def _check_collapse_and_drift(self, logits: torch.Tensor) -> None:
        if self.settings.method != "tent":
            return
        s = self.settings
        self.monitor.observe(logits, softmax_entropy(logits), self._admitted)
        self.stats.drift = relative_drift(self.params, self._source_params)
        if s.guard_collapse and self.stats.steps_since_reset >= COLLAPSE_WARMUP_STEPS:
            diversity = self.monitor.diversity()
            if self.monitor.entropy_ema < s.collapse_entropy * self.monitor.max_entropy:
                return self.reset("collapse_entropy")
            if diversity is not None and diversity < s.collapse_diversity * self.monitor.max_entropy:
                return self.reset("collapse_diversity")
        if s.guard_drift and self.stats.drift > s.drift_max:
            return self.reset("drift")
        if s.reset_every_steps and self.stats.steps_since_reset >= s.reset_every_steps:
            return self.reset("periodic")

    # ----- state -----

    def _fresh_guard_state(self) -> None:
        self._buffer: list[torch.Tensor] = []
        # Each buffered batch with the mask of the images the class pace admitted (None: all), for its step.
        self._buffer_admitted: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._admitted: torch.Tensor | None = None  # of the batch just predicted
        self.monitor = self._new_monitor()
        self.optimizer = self._make_optimizer()

    def _new_monitor(self) -> CollapseMonitor:
        s = self.settings
        return CollapseMonitor(self.num_classes, s.entropy_ema_decay, s.diversity_window, s.min_batch)

    def _make_optimizer(self) -> torch.optim.Optimizer | None:
        if self.settings.method != "tent":
            return None
        if self.settings.optimizer == "sgd":
            return torch.optim.SGD(self.params, lr=self.settings.lr, momentum=self.settings.momentum)
        return torch.optim.Adam(self.params, lr=self.settings.lr, betas=(0.9, 0.999))

    def _adaptable_state(self, statistics: bool = True) -> dict[str, Any]:
        """Everything adaptation changes: adapted parameters, test statistics, optimiser state.

        Without the statistics for the rollback point taken before every batch: a batch changes only the rows of
        the classes it is predicted as, which `_predicted` saves (all of them were 203 MiB per batch for a ResNet-50
        at 1,000 classes)."""
        if self.adapted is None:
            return {}
        tensors = {n: p.detach().clone() for n, p in self.adapted.named_parameters() if p.requires_grad}
        for name, module in self.adapted.named_modules():
            if statistics and isinstance(module, TestTimeBatchNorm):
                tensors[f"{name}.class_mean"] = module.class_mean.clone()
                tensors[f"{name}.class_sqmean"] = module.class_sqmean.clone()
                tensors[f"{name}.row_freshness"] = module.row_freshness.clone()
        optimizer = getattr(self, "optimizer", None)
        return {"tensors": tensors, "optimizer": _clone_optimizer_state(optimizer)}

    def _restore(self, state: dict[str, Any]) -> None:
        if self.adapted is None:
            return
        current = {**dict(self.adapted.named_parameters()), **dict(self.adapted.named_buffers())}
        with torch.no_grad():
            for name, value in state["tensors"].items():
                current[name].copy_(value)
        restore_rows(state.get("rows", []))
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(_clone_optimizer_state(state["optimizer"]))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly from here, in this process or another: adapted parameters, test
        statistics, optimiser state, small-batch buffer, collapse monitor, counters. Clones (on the engine's
        device) and plain values, so that a snapshot file holds it without pickling. New adaptation state belongs
        in `_adaptable_state` or `EngineStats`, which this reads, or here."""
        adaptable = self._adaptable_state()
        optimizer = adaptable.get("optimizer")
        return {
            "method": self.settings.method,
            "optimizer": self.settings.optimizer if self.optimizer is not None else None,
            "tensors": adaptable.get("tensors", {}),
            # Per parameter, keyed by its position in `params`; the hyperparameters are the settings', not the state's.
            "optimizer_state": {str(i): s for i, s in optimizer["state"].items()} if optimizer else None,
            "buffer": torch.cat(self._buffer) if self._buffer else None,
            "monitor": self.monitor.state_dict(),
            "stats": {f.name: _plain(getattr(self.stats, f.name)) for f in fields(EngineStats)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`, possibly another process's. Everything is checked before anything changes:
        a state that does not fit this engine raises ValueError (or KeyError) and leaves the engine as it was."""
        kind = (self.settings.method, self.settings.optimizer if self.optimizer is not None else None)
        if (state["method"], state["optimizer"]) != kind:
            raise ValueError(
                f"state of method {state['method']} (optimiser {state['optimizer']}), this engine runs {kind[0]} "
                f"(optimiser {kind[1]})"
            )
        _check_tensors(state["tensors"], self._initial_state.get("tensors", {}))
        optimizer = self._optimizer_state_from(state["optimizer_state"])
        monitor = self._new_monitor()
        monitor.load_state_dict(state["monitor"])
        stats = _stats_from(state["stats"])
        buffer = [state["buffer"].to(self.device, copy=True)] if state["buffer"] is not None else []
        self._restore({"tensors": state["tensors"], "optimizer": optimizer})
        self._buffer, self.monitor, self.stats = buffer, monitor, stats

    def _optimizer_state_from(self, saved: dict[str, dict[str, Any]] | None) -> dict[str, Any] | None:
        """The optimiser's own state_dict for per-parameter state saved by `state_dict()`, checked against `params`."""
        if self.optimizer is None:
            return None
        state = {}
        for key, values in saved.items():
            index = int(key)
            if not 0 <= index < len(self.params):
                raise ValueError(f"optimiser state for parameter {index}, the engine adapts {len(self.params)}")
            shape = self.params[index].shape
            if any(torch.is_tensor(v) and v.dim() > 0 and v.shape != shape for v in values.values()):
                raise ValueError(f"optimiser state of parameter {index} does not have its shape {tuple(shape)}")
            state[index] = values
        return {"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]}

    def snapshot(self) -> dict[str, Any]:
        """Plain values for /v1/status and the metrics; safe to read from other threads."""
        s = self.settings
        return {
            "method": s.method,
            "adapted_layers": self.norm_kind,
            "adapted_parameters": sum(p.numel() for p in self.params),
            "steps_total": self.stats.steps_total,
            "steps_since_reset": self.stats.steps_since_reset,
            "skipped": dict(self.stats.skipped),
            "resets": dict(self.stats.resets),
            "entropy_ema": self.monitor.entropy_ema,
            "prediction_diversity": self.monitor.diversity(),
            "param_drift": self.stats.drift,
            "last_grad_norm": self.stats.last_grad_norm,
            "held_back": dict(self.stats.held_back),
            "buffer_fill": sum(len(b) for b in self._buffer),
            "guards": {
                **s.guards(),
                "reliable_entropy": s.reliable_entropy,
                "balance_entropy": s.balance_entropy,
                "min_batch_size": s.min_batch,
                "stats_horizon": s.stats_horizon,
                "plausible_distance": s.plausible_distance,
                "class_pace_trigger": s.class_pace_trigger,
                "class_pace_margin": s.class_pace_margin,
                "grad_clip_norm": s.grad_clip_norm,
                "anchor_rate": s.anchor_rate,
                "collapse_entropy": s.collapse_entropy,
                "collapse_diversity": s.collapse_diversity,
                "diversity_window": s.diversity_window,
                "drift_max": s.drift_max,
                "reset_every_steps": s.reset_every_steps,
            },
            "at": time.time(),
        }


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Counter) else value


def _stats_from(values: dict[str, Any]) -> EngineStats:
    stats = EngineStats()
    for f in fields(EngineStats):
        default = getattr(stats, f.name)
        value = values[f.name]
        # A reason this version counts that the state's did not starts at 0, as in a fresh engine.
        setattr(stats, f.name, Counter({**default, **value}) if isinstance(default, Counter) else value)
    return stats


def _check_tensors(given: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    if given.keys() != expected.keys():
        missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
        raise ValueError(f"state tensors do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    wrong = sorted(k for k in given if (given[k].shape, given[k].dtype) != (expected[k].shape, expected[k].dtype))
    if wrong:
        raise ValueError(f"state tensors of another shape or type than the model's: {wrong[:3]}")


def _clone_optimizer_state(optimizer: "torch.optim.Optimizer | dict | None") -> dict | None:
    if optimizer is None:
        return None
    state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    return {
        "state": {
            k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in state["state"].items()
        },
        "param_groups": [dict(g) for g in state["param_groups"]],
    }
