"""The prediction ledger: predictions wait here for their label; labels score them prequentially.

A prediction is scored with what the model said when it made it, before adapting on that batch.
Memory is bounded by `max_size` entries and `max_age_s` seconds, whatever the traffic.
"""

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class LedgerEntry:
    class_index: int
    source_class_index: int | None
    entropy: float
    created: float  # time.monotonic()
    step: int
    labelled: bool = False
    stream: str = "default"  # whose adaptation state made the prediction: its label is scored there too


class LabelError(Exception):
    """A label the ledger refuses: `code` names why, stable for clients; `detail` says it in a sentence. What it is
    in HTTP is the API's to say (app/api/errors.py), by the subclass."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class UnknownPredictionError(LabelError):
    """No such prediction id, or it expired: `unknown_prediction`."""


class AlreadyLabelledError(LabelError):
    """The prediction has its label already: `already_labelled`."""


class InvalidLabelError(LabelError):
    """A label outside the classes (`label_out_of_range`), or one id twice in a request (`duplicate_id`)."""


class PrequentialScore:
    """Cumulative and sliding-window accuracy of one model ("adapted" or "source")."""

    def __init__(self, window: int) -> None:
        self.labels = 0
        self.correct = 0
        self._recent: deque[bool] = deque(maxlen=window)
        self._recent_correct = 0

    def add(self, correct: bool) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._recent_correct -= self._recent[0]
        self._recent.append(correct)
        self._recent_correct += correct
        self.labels += 1
        self.correct += correct

    def window_accuracy(self) -> float | None:
        return self._recent_correct / len(self._recent) if self._recent else None

    def window_counts(self) -> tuple[int, int]:
        """(correct, labels) over the window: windows of several scores pool by summing them."""
        return self._recent_correct, len(self._recent)

    def summary(self) -> dict[str, Any]:
        accuracy = self.correct / self.labels if self.labels else None
        return {
            "labels": self.labels,
            "correct": self.correct,
            "accuracy": accuracy,
            "window_accuracy": self.window_accuracy(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "correct": self.correct, "recent": list(self._recent)}

    def loaded(self, state: dict[str, Any]) -> "PrequentialScore":
        """A new score with this one's window, holding `state` (from `state_dict()`)."""
        score = PrequentialScore(self._recent.maxlen)
        score.labels, score.correct = state["labels"], state["correct"]
        score._recent.extend(state["recent"])  # a smaller window than the state's keeps the newest
        score._recent_correct = sum(score._recent)
        return score


class PredictionLedger:
    def __init__(self, num_classes: int, max_size: int, max_age_s: float, window: int, max_streams: int = 1024) -> None:
        self.num_classes = num_classes
        self.window = window
        self.max_streams = max_streams
        # Per stream, the least recently scored first; bounded like the streams themselves.
        self.stream_scores: OrderedDict[str, dict[str, PrequentialScore]] = OrderedDict()
        self.max_size = max_size
        self.max_age_s = max_age_s
        self._entries: OrderedDict[str, LedgerEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.scores = {"adapted": PrequentialScore(window), "source": PrequentialScore(window)}
        self.shadow_compared = 0
        self.shadow_agreed = 0

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, prediction_id: str, entry: LedgerEntry, label: int | None) -> None:
        with self._lock:
            if entry.source_class_index is not None:
                self.shadow_compared += 1
                self.shadow_agreed += entry.source_class_index == entry.class_index
            if label is not None:
                self._score(entry, label)
            self._entries[prediction_id] = entry
            self._evict(time.monotonic())

    def label_all(self, labels: Sequence[tuple[str, int]]) -> list[bool]:
        """Score late (prediction id, label) pairs, all or none; returns whether each prediction was correct.

        Every pair is checked (label in range, id known, not labelled yet, not twice here) before any is scored,
        so a request refused for one bad pair can be corrected and sent again whole.
        """
        try:
            for _, label in labels:
                self.check_label(label)
            with self._lock:
                self._evict(time.monotonic())
                entries = self._unlabelled_entries([prediction_id for prediction_id, _ in labels])
                return [self._score(entry, label) for entry, (_, label) in zip(entries, labels, strict=True)]
        except LabelError as error:
            if len(labels) < 2:
                raise
            raise type(error)(error.code, f"{error.detail}; none of these labels was applied") from None

    def _unlabelled_entries(self, prediction_ids: list[str]) -> list[LedgerEntry]:
        entries, seen = [], set()
        for prediction_id in prediction_ids:
            if prediction_id in seen:
                raise InvalidLabelError(
                    "duplicate_id", f"prediction {prediction_id!r} is labelled twice in one request"
                )
            seen.add(prediction_id)
            entry = self._entries.get(prediction_id)
            if entry is None:
                raise UnknownPredictionError(
                    "unknown_prediction", f"no prediction {prediction_id!r} (unknown or expired)"
                )
            if entry.labelled:
                raise AlreadyLabelledError("already_labelled", f"prediction {prediction_id!r} already has a label")
            entries.append(entry)
        return entries

    def check_label(self, label: int) -> None:
        if not 0 <= label < self.num_classes:
            raise InvalidLabelError("label_out_of_range", f"label {label} is outside 0..{self.num_classes - 1}")

    def _score(self, entry: LedgerEntry, label: int) -> bool:
        entry.labelled = True
        correct = entry.class_index == label
        for scores in (self.scores, self._scores_of(entry.stream)):
            scores["adapted"].add(correct)
            if entry.source_class_index is not None:
                scores["source"].add(entry.source_class_index == label)
        return correct

    def _scores_of(self, stream: str) -> dict[str, PrequentialScore]:
        scores = self.stream_scores.get(stream)
        if scores is None:
            if len(self.stream_scores) >= self.max_streams:
                self.stream_scores.popitem(last=False)
            scores = self.stream_scores[stream] = {m: PrequentialScore(self.window) for m in ("adapted", "source")}
        else:
            self.stream_scores.move_to_end(stream)
        return scores

    def streams_of(self, prediction_ids: Sequence[str]) -> set[str]:
        """The streams of those predictions that are remembered (an unknown id is label_all's to refuse)."""
        with self._lock:
            return {entry.stream for i in prediction_ids if (entry := self._entries.get(i)) is not None}

    def stream_windows(self) -> dict[str, dict[str, tuple[int, int, int]]]:
        """Per stream and model: (labels in all, correct in the window, labels in the window)."""
        with self._lock:
            return {
                stream: {model: (s.labels, *s.window_counts()) for model, s in scores.items()}
                for stream, scores in self.stream_scores.items()
            }

    def stream_summary(self, stream: str) -> dict[str, dict[str, Any]]:
        """A stream's prequential figures per model, for GET /v1/streams."""
        with self._lock:
            scores = self.stream_scores.get(stream)
            if scores is None:
                return {}
            return {model: score.summary() for model, score in scores.items() if score.labels}

    def _evict(self, now: float) -> None:
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.created <= self.max_age_s:
                break
            self._entries.popitem(last=False)

    def state_dict(self) -> dict[str, Any]:
        """Scores and remembered predictions (as columns, oldest first) in plain values, for a snapshot file.
        Creation times are wall-clock (`created_at`): the monotonic clock means nothing to another process."""
        with self._lock:
            # What later requests change, copied together; an entry's other fields never change after record().
            # Keys and values as two lists, not items(): 100,000 new tuples would cost a garbage collection pass.
            ids, remembered = list(self._entries), list(self._entries.values())
            labelled = [entry.labelled for entry in remembered]
            prequential = {
                "scores": {name: score.state_dict() for name, score in self.scores.items()},
                "streams": {
                    stream: {name: score.state_dict() for name, score in scores.items()}
                    for stream, scores in self.stream_scores.items()
                },
                "shadow_compared": self.shadow_compared,
                "shadow_agreed": self.shadow_agreed,
            }
        to_wall = time.time() - time.monotonic()
        entries = {
            "ids": ids,
            "class_index": [entry.class_index for entry in remembered],
            "source_class_index": [entry.source_class_index for entry in remembered],
            "entropy": [entry.entropy for entry in remembered],
            "created_at": [entry.created + to_wall for entry in remembered],
            "step": [entry.step for entry in remembered],
            "labelled": labelled,
            "stream": [entry.stream for entry in remembered],
        }
        return {"prequential": prequential, "entries": entries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take over a `state_dict()`, possibly another process's; the size and age bounds apply at once. A state
        that does not fit raises (KeyError, ValueError) before anything changes."""
        prequential, columns = state["prequential"], state["entries"]
        to_monotonic = time.monotonic() - time.time()
        rows = zip(
            columns["ids"],
            columns["class_index"],
            columns["source_class_index"],
            columns["entropy"],
            columns["created_at"],
            columns["step"],
            columns["labelled"],
            columns["stream"],
            strict=True,
        )
        entries = OrderedDict(
            (prediction_id, LedgerEntry(index, source, entropy, created_at + to_monotonic, step, labelled, stream))
            for prediction_id, index, source, entropy, created_at, step, labelled, stream in rows
        )
        scores = {name: score.loaded(prequential["scores"][name]) for name, score in self.scores.items()}
        stream_scores = OrderedDict(
            (stream, {name: PrequentialScore(self.window).loaded(state) for name, state in saved.items()})
            for stream, saved in list(prequential["streams"].items())[-self.max_streams :]
        )
        with self._lock:
            self._entries, self.scores, self.stream_scores = entries, scores, stream_scores
            self.shadow_compared, self.shadow_agreed = prequential["shadow_compared"], prequential["shadow_agreed"]
            self._evict(time.monotonic())
