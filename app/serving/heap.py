"""Hand the C heap's free pages back to the system when they pile up.

Each entropy step allocates and frees its activations (about 100 MB for the default model at 64 images); between them
live small, long-lived tensors (streams, the lag's twins, step outcomes), and glibc cannot give the freed memory back
around them. With 64 streams of 16-image requests the process grew from 1.0 to 2.7 GB for 72 MB of live tensors, and
`malloc_trim(0)` brought it back to 1.0 GB (docs/BENCHMARKS.md, "Resident memory").

A trim is not free: the pages it returns are faulted in again by the next step (about 0.1 s of CPU per trim here),
so trimming on a clock costs every server, and trimming after every step is MALLOC_MMAP_THRESHOLD_'s 2.8 times the
step's CPU. So the resident size is read (cheap) at most once per `check_interval_s`, after a job of the model thread
or a step of the step thread, and the heap is trimmed only once it has grown past `growth` times the baseline: the
resident size at the first check after the last trim, which holds one step's working set again. A server whose steps
reuse their memory (one stream, or a large model whose step needs gigabytes) then never trims. Where the C library is
not glibc this does nothing.
"""

import ctypes
import math
import os
import threading
import time
from collections.abc import Callable


def glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HeapTrimmer:
    def __init__(
        self,
        check_interval_s: float = 1.0,
        growth: float = 1.25,
        trim: Callable[[int], int] | None = None,
        resident: Callable[[], int] = resident_bytes,
    ) -> None:
        self.check_interval_s, self.growth = check_interval_s, growth
        self._trim = trim if trim is not None else glibc_malloc_trim()
        self._resident = resident
        self._lock = threading.Lock()  # the model thread and the step thread both call maybe_trim
        self._checked = -math.inf
        self.baseline: int | None = None  # None: to be read at the next check
        self.trims = 0

    def maybe_trim(self) -> None:
        """Called after each job and step; returns at once unless a check is due (and no other thread checks)."""
        if self._trim is None or time.monotonic() - self._checked < self.check_interval_s:
            return
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._checked = time.monotonic()
            resident = self._resident()
            if self.baseline is None:
                self.baseline = resident
            elif resident > self.growth * self.baseline:
                self._trim(0)
                self.trims += 1
                self.baseline = None
        finally:
            self._lock.release()
