"""What TTA_SHADOW_SOURCE costs: the median time of one engine step (tent) with and without the source shadow.

Real CIFAR-10 test images (random noise would make the reliability filter skip most entropy steps), a different
batch every step, one torch thread (the server is measured pinned to one core).

python -m bench.shadow_cost
"""

import copy
import statistics
import time

import torch

from app.adaptation.engine import AdaptationEngine
from app.config import DEFAULT_MODEL, Settings
from bench.corruptions import DEFAULT_DATA
from models.checkpoint import load_checkpoint
from models.data import load_zip, normalize

WARMUP_STEPS, MEASURED_STEPS = 5, 60


def median_step_ms(engine: AdaptationEngine, batches: list[torch.Tensor]) -> float:
    for x in batches[:WARMUP_STEPS]:
        engine.step(x)
    times = []
    for x in batches[WARMUP_STEPS:]:
        started = time.perf_counter()
        engine.step(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    torch.set_num_threads(1)
    model, card = load_checkpoint(DEFAULT_MODEL)
    images = normalize(load_zip(DEFAULT_DATA, limit_per_class=420).images, card.mean, card.std)
    images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]
    for batch in (1, 64):
        batches = list(images[: (WARMUP_STEPS + MEASURED_STEPS) * batch].split(batch))
        plain, shadowed = (
            median_step_ms(
                AdaptationEngine(copy.deepcopy(model), 10, Settings(shadow_source=s), torch.device("cpu")), batches
            )
            for s in (False, True)
        )
        print(
            f"batch {batch}: tent step {plain:.1f} ms, with the source shadow {shadowed:.1f} ms "
            f"(+{100 * (shadowed / plain - 1):.0f}%)"
        )


if __name__ == "__main__":
    main()
