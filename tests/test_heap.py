"""The heap trimmer (app/serving/heap.py): glibc's free pages handed back once the resident size has grown past the
baseline, checked at most once per interval, from the model thread and the step thread."""

import json
import subprocess
import sys

import pytest

from app.serving.heap import HeapTrimmer, glibc_malloc_trim


class Heap:
    """A resident size the test sets, and the trims asked of it: the rule's inputs and outputs, without glibc (the
    real trim is the next test's)."""

    def __init__(self) -> None:
        self.size = 1000
        self.trims = 0

    def trim(self, pad: int) -> int:
        self.trims += 1
        self.size = 1000
        return 1


def test_trims_only_past_the_growth_over_the_baseline_read_after_the_last_trim() -> None:
    heap = Heap()
    trimmer = HeapTrimmer(check_interval_s=0, growth=1.25, trim=heap.trim, resident=lambda: heap.size)
    trimmer.maybe_trim()
    assert trimmer.baseline == 1000 and heap.trims == 0  # the first check reads the baseline
    heap.size = 1250
    trimmer.maybe_trim()
    assert heap.trims == 0  # not past 1.25 x the baseline
    heap.size = 1251
    trimmer.maybe_trim()
    assert heap.trims == 1 and trimmer.baseline is None
    heap.size = 3000  # the next step's working set faulted in again: the new baseline, not a reason to trim
    trimmer.maybe_trim()
    assert heap.trims == 1 and trimmer.baseline == 3000
    heap.size = 3700
    trimmer.maybe_trim()
    assert heap.trims == 1
    heap.size = 3800
    trimmer.maybe_trim()
    assert heap.trims == 2


def test_checks_at_most_once_per_interval() -> None:
    heap = Heap()
    trimmer = HeapTrimmer(check_interval_s=3600, growth=1.25, trim=heap.trim, resident=lambda: heap.size)
    trimmer.maybe_trim()  # the baseline
    heap.size = 5000
    for _ in range(100):
        trimmer.maybe_trim()
    assert heap.trims == 0  # the next check is an hour away


# Run in a fresh interpreter: in the test process, what earlier tests freed (and glibc's heap state after them) decides
# where the allocations land, so the same code measured nothing there once (the 196 MB came from resident free memory).
FRAGMENT_AND_TRIM = """
import json, torch
from app.serving.heap import HeapTrimmer, resident_bytes
trimmer = HeapTrimmer(check_interval_s=0, growth=0.0)  # every check after a baseline trims
before = resident_bytes()
kept, freed = [], []
for _ in range(3000):
    freed.append(torch.empty(16 * 1024).fill_(1.0))  # 64 kB, touched: resident
    kept.append(torch.ones(8))
del freed
fragmented = resident_bytes()
trimmer.maybe_trim()  # the baseline
trimmer.maybe_trim()
print(json.dumps({"before": before, "fragmented": fragmented, "trimmed": resident_bytes(), "trims": trimmer.trims}))
"""


@pytest.mark.skipif(glibc_malloc_trim() is None, reason=f"no glibc malloc_trim on {sys.platform}")
def test_a_real_trim_gives_back_the_pages_freed_among_live_allocations() -> None:
    """Real glibc: 64 kB tensors (below the mmap threshold, so from the heap) freed among small ones that stay, as a
    step's activations among the streams' tensors; the freed pages stay resident until the trimmer trims."""
    run = subprocess.run([sys.executable, "-c", FRAGMENT_AND_TRIM], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    sizes = json.loads(run.stdout.strip().splitlines()[-1])
    assert sizes["fragmented"] > sizes["before"] + 150e6, f"the 196 MB freed are not resident: {sizes}"
    assert sizes["trims"] == 1
    assert sizes["trimmed"] < sizes["fragmented"] - 150e6, sizes
