"""Capture (TTA_CAPTURE_DIR): a bounded, uniform sample of the images each stream served, for `tta finetune`.

Per stream, a reservoir (Vitter's algorithm R) of at most TTA_CAPTURE_MAX_IMAGES images: the n-th image served
replaces a random kept one with probability max_images / n, so what is kept is a uniform sample of everything the
stream served. Each image is stored as the model saw it (decoded, resized and centre-cropped: at most input_size² x 3
bytes before PNG compression), named by its prediction id and predicted class, in the layout `tta finetune` reads:

    <dir>/<stream>/unlabelled/<prediction id>_p<predicted class index>.png
    <dir>/<stream>/labelled/<class name>/<prediction id>_p<predicted class index>.png

An image moves from unlabelled/ to labelled/<class>/ when its label arrives (with the /predict request or later
through /feedback), so `tta finetune --train <dir>/<stream>/labelled` (an ImageFolder) and `--target-unlabeled
<dir>/<stream>/unlabelled` read it as it stands. At most TTA_CAPTURE_MAX_STREAMS streams are captured: the disk
holds at most max_streams x max_images images.

The request never waits for the disk: the sampling decision is a few dictionary operations on the event loop, and
the images it keeps go through a bounded queue to one writer thread, which writes each file atomically (a temporary
name in the same folder, then os.replace). When the queue is full the image is not captured and is counted as
dropped. A restart adopts what the folder holds (its ids, labels and each stream's served count in reservoir.json).
"""

import contextlib
import json
import logging
import os
import queue
import random
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from torchvision.io import encode_png

log = logging.getLogger("tta.capture")

# Items waiting for the writer: a 224 x 224 image is 150 KB, so the queue holds at most ~38 MB.
QUEUE_SIZE = 256
OUTCOMES = ("kept", "replaced", "not_sampled", "dropped", "stream_limit")
FILE_NAME = re.compile(r"^([0-9a-f]{32})_p(\d+)\.png$")
STATE_FILE = "reservoir.json"


def folder_name(name: str) -> str:
    """A stream or class name as one path component: '.' and '..' (valid stream names) and '/' cannot escape."""
    name = name.replace("/", "_").replace("\0", "_")
    return name.replace(".", "%2E") if name in ("", ".", "..") else name


def stream_of(folder: str) -> str:
    """folder_name's inverse for stream names ('%' is not in a stream name, so nothing else is changed)."""
    return folder.replace("%2E", ".") if folder in ("%2E", "%2E%2E") else folder


@dataclass
class _Reservoir:
    """One stream's sample as the event loop sees it: what will be on disk once the writer has caught up."""

    seen: int = 0
    ids: list[str] = field(default_factory=list)  # slot -> prediction id


@dataclass
class _Put:
    stream: str
    slot: int
    seen: int
    prediction_id: str
    image: torch.Tensor
    predicted: int
    label: int | None


@dataclass
class _Label:
    stream: str
    slot: int
    prediction_id: str
    label: int


class Capture(Collector):
    """Disabled (every call returns at once) when `directory` is None."""

    def __init__(
        self,
        directory: Path | None,
        class_names: list[str],
        max_images: int,
        max_streams: int,
        seed: int | None = None,
    ) -> None:
        self.directory = directory
        self.class_folders = [folder_name(name) for name in class_names]
        self.max_images, self.max_streams = max_images, max_streams
        self._rng = random.Random(seed)
        self._reservoirs: dict[str, _Reservoir] = {}
        self._kept: dict[str, tuple[str, int]] = {}  # prediction id -> (stream, slot), every stream's: one lookup
        self._queue: queue.Queue[_Put | _Label | None] = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.labels_dropped = 0
        self.write_errors = 0
        # the writer's view: slot -> file on disk, per stream; how many files are labelled and unlabelled
        self._files: dict[str, dict[int, Path]] = {}
        self.on_disk = {"labelled": 0, "unlabelled": 0}

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    # --- the event loop's side: decide, enqueue, never touch the disk ---

    def offer(self, stream: str, prediction_id: str, image: torch.Tensor, predicted: int, label: int | None) -> None:
        """One served image (uint8 C x H x W, as the model saw it)."""
        if not self.enabled:
            return
        reservoir = self._reservoirs.get(stream)
        if reservoir is None:
            if len(self._reservoirs) >= self.max_streams:
                self.outcomes["stream_limit"] += 1
                return
            reservoir = self._reservoirs[stream] = _Reservoir()
        reservoir.seen += 1
        if len(reservoir.ids) < self.max_images:
            slot, outcome = len(reservoir.ids), "kept"
        else:
            slot, outcome = self._rng.randrange(reservoir.seen), "replaced"
            if slot >= self.max_images:
                self.outcomes["not_sampled"] += 1
                return
        # clone: a view would keep the request's whole batch alive until the writer gets to it
        item = _Put(stream, slot, reservoir.seen, prediction_id, image.clone(), predicted, label)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.outcomes["dropped"] += 1
            return
        if outcome == "kept":
            reservoir.ids.append(prediction_id)
        else:
            del self._kept[reservoir.ids[slot]]
            reservoir.ids[slot] = prediction_id
        self._kept[prediction_id] = (stream, slot)
        self.outcomes[outcome] += 1

    def label(self, pairs: Iterable[tuple[str, int]]) -> None:
        """Late labels (prediction id, class index), already accepted by the ledger; those of kept images move."""
        if not self.enabled:
            return
        for prediction_id, label in pairs:
            if (kept := self._kept.get(prediction_id)) is not None:
                try:
                    self._queue.put_nowait(_Label(*kept, prediction_id, label))
                except queue.Full:
                    self.labels_dropped += 1

    # --- lifecycle ---

    def start(self) -> None:
        """Adopt what the folder holds (a restart), then start the writer."""
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for stream_dir in sorted(p for p in self.directory.iterdir() if p.is_dir()):
            self._adopt(stream_dir)
        self._thread = threading.Thread(target=self._write_all, name="tta-capture", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (within `timeout_s`), then end the writer."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            log.warning("capture: the writer did not drain its queue within %.0f s; what was queued is lost", timeout_s)
        self._thread.join(timeout_s)
        self._thread = None
        try:
            for stream, reservoir in self._reservoirs.items():  # the images passed over since the last kept one count
                self._save_seen(stream, reservoir.seen)
        except OSError as error:
            log.warning("capture: cannot write the served counts to %s: %s", self.directory, error)

    def flush(self) -> None:
        """Wait until every queued item is on disk."""
        self._queue.join()

    # --- the writer thread's side ---

    def _adopt(self, stream_dir: Path) -> None:
        stream = stream_of(stream_dir.name)
        found = [*stream_dir.glob("unlabelled/*.png"), *stream_dir.glob("labelled/*/*.png")]
        files = sorted(p for p in found if FILE_NAME.match(p.name) and p.is_file())
        self._rng.shuffle(files)
        for extra in files[self.max_images :]:  # the bound was lowered: a random subset stays, still uniform
            extra.unlink()
        files = files[: self.max_images]
        try:
            seen = json.loads((stream_dir / STATE_FILE).read_text())["seen"]
        except (OSError, ValueError, KeyError, TypeError):
            seen = len(files)
        ids = [FILE_NAME.match(p.name).group(1) for p in files]
        self._reservoirs[stream] = _Reservoir(max(seen, len(files)), ids)
        self._kept.update({prediction_id: (stream, slot) for slot, prediction_id in enumerate(ids)})
        self._files[stream] = dict(enumerate(files))
        for path in files:
            self.on_disk[self._state(path)] += 1

    def _write_all(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(item)
            except OSError as error:  # a full or read-only disk: the server goes on, the capture is counted
                self.write_errors += 1
                if self.write_errors == 1:
                    log.warning("capture: cannot write to %s: %s", self.directory, error)
            finally:
                self._queue.task_done()

    def _write(self, item: _Put | _Label) -> None:
        stream_dir = self.directory / folder_name(item.stream)
        files = self._files.setdefault(item.stream, {})
        if isinstance(item, _Label):
            old = files.get(item.slot)
            if old is None or not old.name.startswith(item.prediction_id):
                return  # replaced before its label came
            files[item.slot] = new = self._move(old, self._image_dir(stream_dir, item.label))
            self.on_disk[self._state(old)] -= 1
            self.on_disk[self._state(new)] += 1
            self._remove_if_empty(old.parent)
            return
        if (old := files.pop(item.slot, None)) is not None:
            old.unlink(missing_ok=True)
            self.on_disk[self._state(old)] -= 1
            self._remove_if_empty(old.parent)
        name = f"{item.prediction_id}_p{item.predicted}.png"
        target = self._image_dir(stream_dir, item.label) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{name}.tmp")
        temporary.write_bytes(encode_png(item.image).numpy().tobytes())
        os.replace(temporary, target)
        files[item.slot] = target
        self.on_disk[self._state(target)] += 1
        self._save_seen(item.stream, item.seen)

    def _save_seen(self, stream: str, seen: int) -> None:
        stream_dir = self.directory / folder_name(stream)
        stream_dir.mkdir(parents=True, exist_ok=True)
        temporary = stream_dir / f".{STATE_FILE}.tmp"
        temporary.write_text(json.dumps({"seen": seen}))
        os.replace(temporary, stream_dir / STATE_FILE)

    def _image_dir(self, stream_dir: Path, label: int | None) -> Path:
        if label is None:
            return stream_dir / "unlabelled"
        return stream_dir / "labelled" / self.class_folders[label]

    def _state(self, path: Path) -> str:
        # <stream>/labelled/<class>/<file> or <stream>/unlabelled/<file>: by depth, whatever the names
        return "labelled" if len(path.relative_to(self.directory).parts) == 4 else "unlabelled"

    def _remove_if_empty(self, folder: Path) -> None:
        """A class folder left empty goes: ImageFolder refuses a class folder without images."""
        if self._state(folder / "x") == "labelled":
            with contextlib.suppress(OSError):  # not empty
                folder.rmdir()

    @staticmethod
    def _move(old: Path, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        new = folder / old.name
        os.replace(old, new)
        return new

    # --- metrics, read at scrape time ---

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if not self.enabled:
            return
        images = CounterMetricFamily(
            "tta_capture_images",
            "served images offered to the capture: kept (a free slot), replaced (a kept one), not_sampled (the "
            "reservoir passed it over), dropped (the writer's queue was full), stream_limit (a stream past "
            "TTA_CAPTURE_MAX_STREAMS)",
            labels=["outcome"],
        )
        for outcome, count in self.outcomes.items():
            images.add_metric([outcome], count)
        yield images
        yield CounterMetricFamily(
            "tta_capture_labels_dropped", "labels not applied to kept images: the queue was full", self.labels_dropped
        )
        yield CounterMetricFamily(
            "tta_capture_write_errors", "captured images or labels the disk refused", self.write_errors
        )
        yield GaugeMetricFamily(
            "tta_capture_queued", "captured images and labels waiting for the writer", self._queue.unfinished_tasks
        )
        kept = GaugeMetricFamily("tta_capture_kept_images", "images in the capture (all streams)", labels=["state"])
        for state, count in self.on_disk.items():
            kept.add_metric([state], count)
        yield kept
