"""Streams: every camera or tenant adapts on its own state, in one server.

A stream is a name; each has its own `AdaptationEngine` (adapted parameters, test statistics, optimiser, small-batch
buffer, guard signals, counters) over one `Source` that all share: the frozen backbone (`norm.configure` copies only
the normalisation layers), the reset point and the anchor's source parameters, so an extra stream costs only what it
adapts. At most `max_streams` are kept: beyond that,
the least recently used one is evicted and starts again from the source if it comes back.

A model batch may hold several streams' images: each stream's images go through its own engine, in the order the
streams first appear in the batch, so no stream's statistics, gradients or optimiser state ever see another's images;
the streams that only predict on this batch share one forward pass (see `StreamEngines.step`).
"""

import re
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from app.adaptation.engine import AdaptationEngine, Prediction, StepResult
from app.adaptation.methods.base import SharedForward
from app.adaptation.norm import mixed_forward

DEFAULT_STREAM = "default"
STREAM_NAME = re.compile(r"[A-Za-z0-9._:-]{1,64}")
STREAM_RULE = "1 to 64 characters: letters, digits and . _ - :"


def valid_stream(name: str) -> bool:
    return STREAM_NAME.fullmatch(name) is not None


@dataclass
class StreamBatch:
    """One stream's share of a model batch: where its images sit in the batch."""

    name: str
    positions: list[int]  # indices into the model batch, in order


class StreamEngines:
    def __init__(self, new_engine: Callable[[], AdaptationEngine], max_streams: int) -> None:
        """`new_engine` makes the first stream's engine; every later stream shares its `Source`."""
        self._new_engine = new_engine
        self._first: AdaptationEngine | None = None
        self.max_streams = max_streams
        self._engines: OrderedDict[str, AdaptationEngine] = OrderedDict()  # least recently used first
        self.evicted = 0
        # Counters of evicted streams, so that totals summed over streams never go down.
        self._evicted_totals: Counter = Counter()
        self._touched: set[str] = set()  # used or reset since the last snapshots()

    def __contains__(self, name: str) -> bool:
        return name in self._engines

    def __len__(self) -> int:
        return len(self._engines)

    def engine(self, name: str) -> AdaptationEngine:
        """The stream's engine, created from the source on first use; the stream becomes the most recent."""
        engine = self._engines.get(name)
        if engine is None:
            while len(self._engines) >= self.max_streams:
                _, oldest = self._engines.popitem(last=False)
                oldest.settle()  # its pending step counts in the totals
                self._evicted_totals.update(_totals(oldest.snapshot()))
                self.evicted += 1
            engine = self._engines[name] = self._new_stream()
        else:
            self._engines.move_to_end(name)
        self._touched.add(name)
        return engine

    def _new_stream(self) -> AdaptationEngine:
        if self._first is None:
            self._first = self._new_engine()
            return self._first
        return self._first.sharing_source()

    def step(self, x: torch.Tensor, streams: list[str]) -> list[tuple[StreamBatch, StepResult]]:
        """`predict`, then every stream's update: each result's step counts the steps after its update."""
        results = self.predict(x, streams)
        for _, prediction in results:
            if prediction.update is not None:
                prediction.update()
        return [
            (batch, StepResult(p.logits, p.source_logits, self._engines[batch.name].stats.steps_since_reset))
            for batch, p in results
        ]

    def predict(self, x: torch.Tensor, streams: list[str]) -> list[tuple[StreamBatch, Prediction]]:
        """Each stream's images of the batch through its own engine; `streams` names the stream of each image. Every
        prediction is made before any stream's update runs: the caller runs each prediction's `update` (in this
        order) after answering, before the next batch.

        The streams whose images are predicted without a gradient (small batches, buffered for a later step) share
        one forward pass (`norm.mixed_forward`), in which each image is normalised with its own stream's state:
        many streams of a few images each then cost what one stream costs, not one small pass per stream."""
        batches: dict[str, StreamBatch] = {}
        for position, name in enumerate(streams):
            batches.setdefault(name, StreamBatch(name, [])).positions.append(position)
        engines = {name: self.engine(name) for name in batches}
        shared = [b for b in batches.values() if engines[b.name].predicts_without_grad(len(b.positions))]
        predicted = self._predict_together(x, shared, engines) if len(shared) > 1 else {}
        results = []
        for batch in batches.values():
            rows = x if len(batches) == 1 else x[batch.positions]
            results.append((batch, engines[batch.name].predict(rows, predicted.get(batch.name))))
        return results

    @staticmethod
    def _predict_together(
        x: torch.Tensor, batches: list[StreamBatch], engines: dict[str, AdaptationEngine]
    ) -> dict[str, SharedForward]:
        together = x[[position for batch in batches for position in batch.positions]]
        rows, start = [], 0
        for batch in batches:
            rows.append(list(range(start, start + len(batch.positions))))
            start += len(batch.positions)
        first = engines[batches[0].name]
        for batch in batches:
            engines[batch.name].run_update()  # before their state is read (none is pending where the worker runs)
        with torch.no_grad():
            logits, moments = mixed_forward([engines[batch.name].adapted for batch in batches], rows, together)
        source = first.shared.predict(together) if first.config.shadow_source else None  # one frozen source for all
        return {
            batch.name: SharedForward(logits[r], m, source[r] if source is not None else None)
            for batch, r, m in zip(batches, rows, moments, strict=True)
        }

    def reset(self, reason: str, name: str | None = None) -> list[str]:
        """Reset one stream (or every stream, name None); returns the names reset."""
        names = list(self._engines) if name is None else [name] if name in self._engines else []
        for each in names:
            self._engines[each].reset(reason)
        self._touched.update(names)
        return names

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        return {name: engine.state_dict() for name, engine in self._engines.items()}

    def load_state_dicts(self, states: dict[str, dict[str, Any]]) -> None:
        """Every stream of `states`, in their order (least recently used first), in place of the current ones;
        all or none: the first that does not fit raises and the current streams stay."""
        engines: OrderedDict[str, AdaptationEngine] = OrderedDict()
        for name, state in list(states.items())[-self.max_streams :]:
            engines[name] = self._new_stream()
            engines[name].load_state_dict(state)
        self._engines = engines
        self._touched.update(engines)

    def snapshots(self, previous: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Every stream's snapshot, taken again only for the streams used or reset since `previous` was."""
        fresh = {
            name: engine.snapshot() if name in self._touched or name not in previous else previous[name]
            for name, engine in self._engines.items()
        }
        self._touched.clear()
        return fresh

    def totals(self, snapshots: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Counters summed over every stream there has been (evicted ones included): steps, skips, resets."""
        summed = Counter(self._evicted_totals)
        for snapshot in snapshots.values():
            summed.update(_totals(snapshot))
        return {
            "steps_total": summed["steps_total"],
            **{kind: {k.split(".", 1)[1]: v for k, v in summed.items() if k.startswith(f"{kind}.")} for kind in KINDS},
        }


KINDS = ("skipped", "resets")  # the counters by reason that a snapshot holds


def _totals(snapshot: dict[str, Any]) -> Counter:
    counts = Counter({"steps_total": snapshot["steps_total"]})
    for kind in KINDS:
        counts.update({f"{kind}.{reason}": n for reason, n in snapshot[kind].items()})
    return counts
