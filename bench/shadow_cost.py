"""What TTA_SHADOW_SOURCE costs: the median time of one engine step (tent) with and without the source shadow.

Real CIFAR-10 test images (random noise would make the reliability filter skip most entropy steps), a different
batch every step, the two engines interleaved step by step, one torch thread (the server is measured pinned to one
core).

python -m bench.shadow_cost
"""

import copy
import math
import statistics
import time

import torch

from app.adaptation.engine import AdaptationEngine
from app.config import DEFAULT_MODEL, Settings
from bench.corruptions import DEFAULT_DATA
from models.checkpoint import load_checkpoint
from models.data import load_zip, normalize

WARMUP_STEPS, MEASURED_STEPS = 5, 60
BATCH_SIZES = (1, 64)


def median_step_ms(engines: list[AdaptationEngine], batches: list[torch.Tensor]) -> list[float]:
    """Median step of each engine on the same batches, the engines interleaved step by step, so that the machine's
    drift (frequency, neighbours) falls on all of them alike."""
    times: list[list[float]] = [[] for _ in engines]
    for i, x in enumerate(batches):
        for engine, engine_times in zip(engines, times, strict=True):
            started = time.perf_counter()
            engine.step(x)
            if i >= WARMUP_STEPS:
                engine_times.append(time.perf_counter() - started)
    return [statistics.median(t) * 1000 for t in times]


def main() -> None:
    torch.set_num_threads(1)
    model, card = load_checkpoint(DEFAULT_MODEL)
    per_class = math.ceil((WARMUP_STEPS + MEASURED_STEPS) * max(BATCH_SIZES) / card.num_classes)
    images = normalize(load_zip(DEFAULT_DATA, limit_per_class=per_class).images, card.mean, card.std)
    images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]
    for batch in BATCH_SIZES:
        batches = list(images[: (WARMUP_STEPS + MEASURED_STEPS) * batch].split(batch))
        engines = [
            AdaptationEngine(copy.deepcopy(model), card.num_classes, settings, torch.device("cpu"))
            for settings in (Settings(shadow_source=s).calibrated(card.source_distance_q99()) for s in (False, True))
        ]
        plain, shadowed = median_step_ms(engines, batches)
        print(
            f"batch {batch}: tent step {plain:.1f} ms, with the source shadow {shadowed:.1f} ms "
            f"(+{100 * (shadowed / plain - 1):.0f}%)"
        )


if __name__ == "__main__":
    main()
