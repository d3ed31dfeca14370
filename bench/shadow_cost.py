"""What TTA_SHADOW_SOURCE costs: the median time of one engine step (tent) with and without the source shadow.

python -m bench.shadow_cost
"""

import copy
import statistics
import time

import torch

from app.adaptation.engine import AdaptationEngine
from app.config import DEFAULT_MODEL, Settings
from models.checkpoint import load_checkpoint


def median_step_ms(engine: AdaptationEngine, x: torch.Tensor, repeats: int = 60) -> float:
    for _ in range(5):
        engine.step(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.step(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    model, _ = load_checkpoint(DEFAULT_MODEL)
    for batch in (1, 64):
        x = torch.randn(batch, 3, 32, 32)
        plain, shadowed = (
            median_step_ms(
                AdaptationEngine(copy.deepcopy(model), 10, Settings(shadow_source=s), torch.device("cpu")), x
            )
            for s in (False, True)
        )
        print(
            f"batch {batch}: tent step {plain:.1f} ms, with the source shadow {shadowed:.1f} ms "
            f"(+{100 * (shadowed / plain - 1):.0f}%)"
        )


if __name__ == "__main__":
    main()
