"""Persistence of the adapted state: a snapshot in TTA_STATE_DIR at an interval and on shutdown, restored at start.

One file, `state.safetensors`, holds what serving would need to continue exactly: per stream (only `default` until
streams have their own state) the engine's `state_dict()` (adapted parameters, test statistics, optimiser state,
small-batch buffer, collapse monitor, counters) and the prequential scores; and the ledger's remembered predictions,
so that a late label for a prediction made before a restart still scores instead of answering 404.

Format: safetensors (the project's checkpoint format) with a JSON header in its metadata, rather than torch.save:
reading it cannot run code whatever the file holds, where torch.load, even with weights_only=True, runs a pickle
machine behind an allow-list that has had bypasses; the library refuses a truncated or malformed layout; and any
safetensors tool can inspect the file. In the header every tensor is `{"$tensor": name}`; `sha256` covers the header
and every tensor's bytes, so a flipped bit anywhere is found; `model_sha256` is the checkpoint's and its card's, so
a snapshot of another model is refused.

A write is atomic: a temporary file in the same directory, fsync, rename over the previous snapshot, fsync of the
directory, so a crash at any moment leaves the previous snapshot or the new one. The state is cloned by a job on the
model worker (the only pause in serving) and encoded and written on another thread.
"""

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from app.metrics.ledger import PredictionLedger
from app.serving.worker import ModelWorker
from models.checkpoint import card_path

FORMAT = "tta-state/1"
FILE_NAME = "state.safetensors"
TENSOR = "$tensor"  # {"$tensor": name} in the header stands for the tensor of that name

# The ledger's columns go into tensors: 100,000 remembered predictions are ~6 MB this way, and as JSON text would
# approach safetensors' 100 MB header limit at a million.
LEDGER_COLUMNS = {
    "class_index": torch.int64,
    "source_class_index": torch.int64,
    "entropy": torch.float64,
    "created_at": torch.float64,
    "step": torch.int64,
    "labelled": torch.bool,
}
NO_SOURCE = -1  # source_class_index of a prediction made without the shadow model

log = logging.getLogger("tta.persistence")


class SnapshotError(Exception):
    """A snapshot that cannot be used: corrupt, truncated, of another format or of another model."""


def model_digest(weights: Path) -> str:
    """sha256 over the checkpoint's and its model card's bytes: what a snapshot must have been taken with."""
    parts = []
    for path in (weights, card_path(weights)):
        with path.open("rb") as file:
            parts.append(hashlib.file_digest(file, "sha256").digest())
    return hashlib.sha256(b"".join(parts)).hexdigest()


# ----- the file format -----


def encode(state: dict[str, Any], model_sha256: str, created_at: float) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, (), tensors)
    header = json.dumps(
        {"format": FORMAT, "created_at": created_at, "model_sha256": model_sha256, "state": tree},
        separators=(",", ":"),
    )
    return save(tensors, metadata={"header": header, "sha256": _digest(header, tensors)})


def decode(path: Path, model_sha256: str) -> tuple[dict[str, Any], float]:
    """(state, created_at) of a snapshot file; SnapshotError says why a file cannot be used."""
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:  # the library's SafetensorError, or an OSError
        raise SnapshotError(f"truncated or not a snapshot ({_one_line(error)})") from None
    header = metadata.get("header")
    if header is None or metadata.get("sha256") != _digest(header, tensors):
        raise SnapshotError("checksum mismatch: the file is corrupt")
    content = json.loads(header)
    if content.get("format") != FORMAT:
        raise SnapshotError(f"format {content.get('format')!r}, this server reads {FORMAT!r}")
    if content["model_sha256"] != model_sha256:
        raise SnapshotError(
            f"taken with another model (sha256 {content['model_sha256'][:12]}, this server's {model_sha256[:12]})"
        )
    return _join(content["state"], tensors), content["created_at"]


def _split(tree: Any, path: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> Any:
    """`tree` with each tensor moved (to the CPU) into `tensors` under its path, and a reference left in its place."""
    if torch.is_tensor(tree):
        name = "/".join(path)
        tensors[name] = tree.detach().cpu().contiguous()
        return {TENSOR: name}
    if isinstance(tree, dict):
        return {key: _split(value, (*path, key), tensors) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [_split(value, (*path, str(i)), tensors) for i, value in enumerate(tree)]
    return tree


def _join(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if tree.keys() == {TENSOR}:
            return tensors[tree[TENSOR]]
        return {key: _join(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_join(value, tensors) for value in tree]
    return tree


def _digest(header: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(header.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


STRING_COLUMNS = ("ids", "stream")  # stored as their UTF-8 bytes end to end, and the length of each


def ledger_entries_to_tensors(entries: dict[str, list]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in STRING_COLUMNS:
        encoded = [value.encode() for value in entries[name]]
        tensors[name] = torch.from_numpy(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy())
        tensors[f"{name}_lengths"] = torch.tensor([len(e) for e in encoded], dtype=torch.int64)
    for name, dtype in LEDGER_COLUMNS.items():
        values = entries[name]
        if name == "source_class_index":
            values = [NO_SOURCE if value is None else value for value in values]
        tensors[name] = torch.tensor(values, dtype=dtype)
    return tensors


def ledger_entries_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    entries = {}
    for name in STRING_COLUMNS:
        data, ends = tensors[name].numpy().tobytes(), tensors[f"{name}_lengths"].cumsum(0).tolist()
        entries[name] = [data[start:end].decode() for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    for name in LEDGER_COLUMNS:
        entries[name] = tensors[name].tolist()
    entries["source_class_index"] = [None if v == NO_SOURCE else v for v in entries["source_class_index"]]
    return entries


# ----- the file -----


class SnapshotFile:
    """`state.safetensors` in one directory (one server per directory), written atomically."""

    def __init__(self, directory: Path, model_sha256: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(f"TTA_STATE_DIR {directory} is not writable by this user (uid {os.getuid()})")
        self.path = directory / FILE_NAME
        self.model_sha256 = model_sha256
        for stale in directory.glob(f"{FILE_NAME}.*.tmp"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)

    def write(self, state: dict[str, Any], created_at: float) -> int:
        """Encode and write atomically; returns the file's size in bytes."""
        data = encode(state, self.model_sha256, created_at)
        descriptor, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f"{FILE_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as file:  # mkstemp: mode 0600, as the prediction ids are capabilities
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)  # the rename itself is durable only once the directory is
        finally:
            os.close(directory)
        return len(data)

    def read(self) -> tuple[dict[str, Any], float]:
        return decode(self.path, self.model_sha256)

    def set_aside(self) -> Path:
        """Move a refused snapshot out of the way of the next one, for whoever wants to look at it."""
        refused = self.path.with_name(f"{FILE_NAME}.refused")
        self.path.replace(refused)
        return refused


# ----- the service's side -----


class Persistence:
    """Restores the state at start, snapshots it every `interval_s` and at shutdown; off without a directory."""

    def __init__(
        self, file: SnapshotFile | None, worker: ModelWorker, ledger: PredictionLedger, interval_s: float
    ) -> None:
        self.file = file
        self.worker = worker
        self.ledger = ledger
        self.interval_s = interval_s
        self._lock = asyncio.Lock()  # one snapshot at a time: the interval's and the shutdown's
        self._task: asyncio.Task | None = None
        self._status: dict[str, Any] = {"enabled": file is not None}
        if file is not None:
            self._status.update(
                file=str(file.path),
                interval_s=interval_s,
                model_sha256=file.model_sha256,
                restored_from=None,
                restored_snapshot_at=None,
                restore_refused=None,
                snapshots=0,
                failures=0,
                last_error=None,
                snapshot_at=None,
                last_snapshot_s=None,
                last_pause_s=None,
                last_snapshot_bytes=None,
            )

    def status(self) -> dict[str, Any]:
        """Plain values for /v1/status and the metrics."""
        return dict(self._status)

    async def restore(self) -> None:
        """At start, before the first batch: continue from the snapshot when there is a usable one."""
        if self.file is None or not self.file.path.exists():
            return
        try:
            state, created_at = self.file.read()
            await self._load(state)
        except Exception as error:  # whatever is wrong with the file, the server starts from the source state
            reason = _one_line(error)
            refused = self.file.set_aside()
            self._status["restore_refused"] = reason
            log.warning(
                "state snapshot %s refused (%s); kept as %s, serving the source state",
                self.file.path,
                reason,
                refused.name,
            )
            return
        self._status.update(restored_from=str(self.file.path), restored_snapshot_at=created_at)
        log.info("adapted state restored from %s (snapshot of %s)", self.file.path, time.ctime(created_at))

    async def _load(self, state: dict[str, Any]) -> None:
        """All or nothing: the ledger goes back to how it was if the engine refuses its part."""
        entries = ledger_entries_from_tensors(state["ledger"]["entries"])
        before = self.ledger.state_dict()
        self.ledger.load_state_dict({"prequential": state["ledger"]["prequential"], "entries": entries})
        try:
            await self.worker.load_state({name: stream["engine"] for name, stream in state["streams"].items()})
        except Exception:
            self.ledger.load_state_dict(before)
            raise

    def start(self) -> None:
        if self.file is not None:
            self._task = asyncio.create_task(self._every_interval(), name="state-snapshots")

    async def stop(self) -> None:
        """At shutdown, once the batcher has drained: the last snapshot."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.snapshot()

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            # Shielded: a shutdown cancelling this loop lets the snapshot being written finish before the last one.
            await asyncio.shield(self.snapshot())

    async def snapshot(self) -> None:
        """Clone the state on the worker (serving pauses for this only), then encode and write it on a thread."""
        if self.file is None:
            return
        async with self._lock:
            started = time.perf_counter()
            try:
                engine_state = await self.worker.capture_state()
                created_at, paused = time.time(), time.perf_counter() - started
                size = await asyncio.to_thread(self._write, engine_state, created_at)
            except Exception as error:  # a full disk must not take serving down; the next interval tries again
                self._status.update(failures=self._status["failures"] + 1, last_error=_one_line(error))
                log.warning("state snapshot to %s failed: %s", self.file.path, _one_line(error))
                return
            self._status.update(
                snapshots=self._status["snapshots"] + 1,
                snapshot_at=created_at,
                last_snapshot_s=time.perf_counter() - started,
                last_pause_s=paused,
                last_snapshot_bytes=size,
            )

    def _write(self, engine_state: dict[str, Any], created_at: float) -> int:
        ledger = self.ledger.state_dict()
        state = {
            "streams": {name: {"engine": stream_state} for name, stream_state in engine_state.items()},
            "ledger": {"prequential": ledger["prequential"], "entries": ledger_entries_to_tensors(ledger["entries"])},
        }
        return self.file.write(state, created_at)


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())
