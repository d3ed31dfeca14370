"""What one stream adapts, apart from what every stream shares.

`Source` is shared: the frozen source model (its backbone is every stream's too: `norm.configure` copies only the
normalisation layers), the configuration, the method and guards, and the state every stream starts from.
`AdaptationState` is one stream's: its model (its normalisation layers: adapted affine parameters and test
statistics, over the shared backbone), optimiser state, small-batch buffer, collapse monitor and counters. It is
created from the source, copied, checkpointed and restored exactly (the rollback point before a batch), reset to the
source, and saved as plain values (`state_dict`, what a snapshot file holds). A buffered step computed but not yet
applied (the one-step lag, lag.py) is part of it: `settle` applies it, a reset settles first, `state_dict` carries it.
"""

from __future__ import annotations

import queue
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from app.adaptation import guards, methods
from app.adaptation.config import AdaptationConfig
from app.adaptation.lag import Outcome, PendingStep, RunStep
from app.adaptation.methods.base import Method
from app.adaptation.norm import RECENT_RESIDUAL, STATISTICS, TestTimeBatchNorm, can_mix, restore_rows
from app.adaptation.signals import CollapseMonitor

Checkpoint = dict[str, Any]  # {"tensors": {name: tensor}, "optimizer": its state_dict or None[, "rows": ...]}


@dataclass
class Counters:
    steps_total: int = 0
    steps_since_reset: int = 0
    skipped: Counter = field(default_factory=lambda: Counter(dict.fromkeys(guards.reasons("skip"), 0)))
    resets: Counter = field(default_factory=lambda: Counter(dict.fromkeys(("manual", *guards.reasons("reset")), 0)))
    last_grad_norm: float | None = None
    drift: float = 0.0
    held_back: Counter = field(default_factory=lambda: Counter(dict.fromkeys(guards.reasons("held_back"), 0)))

    def state_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(Counters)}

    def add(self, step: Counters) -> None:
        """What a step computed elsewhere counted (lag.py), from zero: numbers and reasons added, a value it set
        (the gradient norm) taken."""
        unset = Counters()
        for f in fields(Counters):
            mine, theirs = getattr(self, f.name), getattr(step, f.name)
            if isinstance(theirs, Counter):
                mine.update(theirs)
            elif isinstance(theirs, int):
                setattr(self, f.name, mine + theirs)
            elif theirs != getattr(unset, f.name):
                setattr(self, f.name, theirs)

    @classmethod
    def from_state_dict(cls, values: dict[str, Any]) -> Counters:
        counters = cls()
        for f in fields(Counters):
            default = getattr(counters, f.name)
            value = values[f.name]
            # A reason this version counts that the state's did not starts at 0, as in a fresh engine.
            setattr(counters, f.name, Counter({**default, **value}) if isinstance(default, Counter) else value)
        return counters


class Source:
    """The frozen source model and all that every stream of it shares."""

    def __init__(self, model: nn.Module, num_classes: int, config: AdaptationConfig, device: torch.device) -> None:
        self.config = config.adaptation_config()
        self.num_classes = num_classes
        self.device = device
        self.model = model.to(device).eval()
        self.model.requires_grad_(False)
        self.method: Method = methods.create(self.config.method)
        self.guards = guards.Guards(self.config, num_classes)
        self.initial: Checkpoint = {}  # every stream's starting point, taken from the first state (all are equal)
        self.source_params: list[torch.Tensor] = []  # the adapted parameters at the source, in `params` order
        self.run_step: RunStep | None = None  # where a lagged buffered step is computed (lag.py); None: at once, here
        self.spare_twins: queue.SimpleQueue[AdaptationState] = queue.SimpleQueue()  # lag.py's twins not in use

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def new_monitor(self) -> CollapseMonitor:
        c = self.config
        return CollapseMonitor(self.num_classes, c.entropy_ema_decay, c.diversity_window, c.min_batch)


class AdaptationState:
    def __init__(self, source: Source) -> None:
        """A stream at the source: the method's copy of the model, a fresh optimiser, monitor and counters."""
        configured = source.method.configure(source.model, source.config, source.num_classes)
        self.model: nn.Module | None = configured.model if configured else None
        self.params: list[nn.Parameter] = configured.params if configured else []
        self.norm_kind = configured.norm_kind if configured else "none"
        self.mixable = self.model is not None and can_mix(self.model)  # see norm.mixed_forward
        # Each buffered batch with the mask of its images the admission guards let in (None: all of them).
        self.buffer: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.optimizer = source.method.make_optimizer(self.params, source.config)
        self.monitor = source.new_monitor()
        self.counters = Counters()
        self.pending: PendingStep | None = None  # a buffered step computed but not yet applied (lag.py)
        # counters.steps_total when counters.drift was last measured (None: not since made or loaded); a reset or a
        # load sets the drift itself, every other change to the parameters is a step (see Tent._after_batch).
        self.drift_at_steps: int | None = None
        if not source.initial:
            source.initial = self.checkpoint()
            source.source_params = [p.detach().clone() for p in self.params]

    @property
    def buffer_fill(self) -> int:
        return sum(len(x) for x, _ in self.buffer)

    def checkpoint(self, statistics: bool = True) -> Checkpoint:
        """Everything adaptation changes: adapted parameters, test statistics, optimiser state.

        Without the statistics for the rollback point taken before every batch: a batch changes only the rows of
        the classes it is predicted as, which the method saves (`BatchMoments.rows`; all of them were 203 MiB per
        batch for a ResNet-50 at 1,000 classes)."""
        if self.model is None:
            return {}
        tensors = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        for name, module in self.model.named_modules():
            if statistics and isinstance(module, TestTimeBatchNorm):
                tensors.update({f"{name}.{buffer}": getattr(module, buffer).clone() for buffer in STATISTICS})
        return {"tensors": tensors, "optimizer": _clone_optimizer_state(self.optimizer)}

    def restore(self, point: Checkpoint) -> None:
        if self.model is None:
            return
        current = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        with torch.no_grad():
            for name, value in point["tensors"].items():
                current[name].copy_(value)
        restore_rows(point.get("rows", []))
        if self.optimizer is not None and point["optimizer"] is not None:
            self.optimizer.load_state_dict(_clone_optimizer_state(point["optimizer"]))

    def settle(self) -> None:
        """Apply the pending buffered step, if any (waiting for it where it is being computed)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.apply_to(self)

    def reset(self, reason: str, source: Source) -> None:
        """Back to the source state exactly: parameters, statistics, optimiser, buffer, monitor; a pending step is
        applied first (its counts stay)."""
        self.settle()
        self.restore(source.initial)
        self.buffer = []
        self.monitor = source.new_monitor()
        self.optimizer = source.method.make_optimizer(self.params, source.config)
        self.counters.resets[reason] += 1
        self.counters.steps_since_reset = 0
        self.counters.drift = 0.0

    def copy(self, source: Source) -> AdaptationState:
        """Another stream in exactly this state (its own tensors, the same shared backbone)."""
        twin = AdaptationState(source)
        twin.load_state_dict(self.state_dict(), source)
        return twin

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly from here, in this process or another. Clones (on the state's device)
        and plain values, so that a snapshot file holds it without pickling. A pending step is waited for and saved
        as it is, still pending (applying it here would make the stream depend on when it was saved)."""
        point = self.checkpoint()
        optimizer = point.get("optimizer")
        masks = [m for _, m in self.buffer]
        return {
            "tensors": point.get("tensors", {}),
            # Per parameter, keyed by its position in `params`; the hyperparameters are the config's, not the state's.
            "optimizer_state": {str(i): s for i, s in optimizer["state"].items()} if optimizer else None,
            "buffer": torch.cat([x for x, _ in self.buffer]) if self.buffer else None,
            # The admitted mask of the buffered images (None: all of them), absent from snapshots before it was kept.
            "buffer_admitted": None
            if all(m is None for m in masks)
            else torch.cat([torch.ones(len(x), dtype=torch.bool) if m is None else m.cpu() for x, m in self.buffer]),
            "monitor": self.monitor.state_dict(),
            "stats": self.counters.state_dict(),
            "pending_step": self._pending_state_dict(),
        }

    def _pending_state_dict(self) -> dict[str, Any] | None:
        outcome = self.pending.outcome() if self.pending is not None else None
        if outcome is None:
            return None
        optimizer = _clone_optimizer_state(outcome.point["optimizer"])
        return {
            "tensors": {name: t.clone() for name, t in outcome.point["tensors"].items()},
            "optimizer_state": {str(i): s for i, s in optimizer["state"].items()} if optimizer else None,
            "stats": outcome.counters.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], source: Source) -> None:
        """Continue from a `state_dict()`, possibly another process's. Everything is checked before anything changes:
        a state that does not fit raises ValueError (or KeyError) and leaves this state as it was."""
        initial = source.initial.get("tensors", {})
        # The recent residual is absent from snapshots before it was kept: such a stream's starts empty.
        recent = {name: t for name, t in initial.items() if name.rsplit(".", 1)[-1] in RECENT_RESIDUAL}
        tensors = {**recent, **state["tensors"]}
        _check_tensors(tensors, initial)
        optimizer = self._optimizer_state_from(state["optimizer_state"])
        monitor = source.new_monitor()
        monitor.load_state_dict(state["monitor"])
        counters = Counters.from_state_dict(state["stats"])
        buffer = []
        if state["buffer"] is not None:
            images = state["buffer"].to(source.device, copy=True)
            mask = state.get("buffer_admitted")
            if mask is not None and mask.shape != (len(images),):
                raise ValueError(f"buffer mask of shape {tuple(mask.shape)} for {len(images)} buffered images")
            buffer = [(images, None if mask is None else mask.to(source.device, copy=True))]
        pending = self._pending_from(state.get("pending_step"), source)  # absent from snapshots before the lag
        self.restore({"tensors": tensors, "optimizer": optimizer})
        # A step pending here before is dropped with the state it was computed from (its twin finishes on its own).
        self.buffer, self.monitor, self.counters, self.pending = buffer, monitor, counters, pending

    def _pending_from(self, saved: dict[str, Any] | None, source: Source) -> PendingStep | None:
        if saved is None:
            return None
        params = {n for n, p in self.model.named_parameters() if p.requires_grad} if self.model is not None else set()
        _check_tensors(saved["tensors"], {n: t for n, t in source.initial.get("tensors", {}).items() if n in params})
        point = {
            "tensors": {name: t.to(source.device, copy=True) for name, t in saved["tensors"].items()},
            "optimizer": self._optimizer_state_from(saved["optimizer_state"]),
        }
        return PendingStep.computed(Outcome(point, Counters.from_state_dict(saved["stats"])))

    def _optimizer_state_from(self, saved: dict[str, dict[str, Any]] | None) -> dict[str, Any] | None:
        """The optimiser's own state_dict for per-parameter state saved by `state_dict()`, checked against `params`."""
        if self.optimizer is None:
            return None
        state = {}
        for key, values in saved.items():
            index = int(key)
            if not 0 <= index < len(self.params):
                raise ValueError(f"optimiser state for parameter {index}, the state adapts {len(self.params)}")
            shape = self.params[index].shape
            if any(torch.is_tensor(v) and v.dim() > 0 and v.shape != shape for v in values.values()):
                raise ValueError(f"optimiser state of parameter {index} does not have its shape {tuple(shape)}")
            state[index] = values
        return {"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]}


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Counter) else value


def _check_tensors(given: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    if given.keys() != expected.keys():
        missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
        raise ValueError(f"state tensors do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    wrong = sorted(k for k in given if (given[k].shape, given[k].dtype) != (expected[k].shape, expected[k].dtype))
    if wrong:
        raise ValueError(f"state tensors of another shape or type than the model's: {wrong[:3]}")


def _clone_optimizer_state(optimizer: torch.optim.Optimizer | dict | None) -> dict | None:
    if optimizer is None:
        return None
    state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    return {
        "state": {
            k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in state["state"].items()
        },
        "param_groups": [dict(g) for g in state["param_groups"]],
    }
