"""Signals the stability guards decide on: entropy EMA, prediction diversity, parameter drift."""

import math
from collections import deque
from typing import Any

import torch


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy (nats) of softmax(logits)."""
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def distribution_entropy(shares: torch.Tensor) -> float:
    """Entropy (nats) of a distribution over classes: ln C when spread evenly, 0 for one class."""
    return float(-(shares * shares.clamp_min(1e-12).log()).sum())


def predicted_class_entropy(logits: torch.Tensor) -> float:
    """Entropy (nats) of the histogram of the batch's predicted classes."""
    return distribution_entropy(torch.bincount(logits.argmax(1), minlength=logits.shape[1]).double() / len(logits))


class CollapseMonitor:
    """Tracks the EMA of the prediction entropy (decay per `decay_images` images) and the entropy of the mean
    prediction over a window."""

    def __init__(self, num_classes: int, ema_decay: float, window: int, decay_images: int) -> None:
        self.num_classes = num_classes
        self.ema_decay = ema_decay
        self.decay_images = decay_images  # ema_decay applies per this many images, whatever the batch size
        self.window = window
        self.entropy_ema: float | None = None
        self._probability_sums: deque[tuple[torch.Tensor, int]] = deque()
        self._window_sum = torch.zeros(num_classes, dtype=torch.float64)
        self._window_count = 0

    def observe(self, logits: torch.Tensor, entropy: torch.Tensor) -> None:
        batch_entropy = float(entropy.mean())
        if self.entropy_ema is None:
            self.entropy_ema = batch_entropy
        else:
            # Per image, not per batch: otherwise a stream of single images averages only the last ~10 and a few
            # confident images in a row look like collapse.
            decay = self.ema_decay ** (len(logits) / self.decay_images)
            self.entropy_ema = decay * self.entropy_ema + (1 - decay) * batch_entropy
        batch_sum = logits.softmax(1).sum(0).double().cpu()
        self._probability_sums.append((batch_sum, len(logits)))
        self._window_sum += batch_sum
        self._window_count += len(logits)
        while self._window_count - self._probability_sums[0][1] >= self.window:
            oldest, count = self._probability_sums.popleft()
            self._window_sum -= oldest
            self._window_count -= count

    def class_shares(self) -> torch.Tensor | None:
        """Mean prediction over the window so far: how often each class is being predicted."""
        if self._window_count == 0:
            return None
        return self._window_sum / self._window_count

    def diversity(self) -> float | None:
        """Entropy (nats) of the mean prediction, once the window is full."""
        mean = self.class_shares()
        if mean is None or self._window_count < self.window:
            return None
        return distribution_entropy(mean)

    @property
    def max_entropy(self) -> float:
        return math.log(self.num_classes)

    def state_dict(self) -> dict[str, Any]:
        """The EMA and the window as they are (the window's sum too: re-adding would round differently)."""
        sums = [batch_sum for batch_sum, _ in self._probability_sums]
        return {
            "entropy_ema": self.entropy_ema,
            "probability_sums": torch.stack(sums) if sums else torch.zeros(0, self.num_classes, dtype=torch.float64),
            "counts": [count for _, count in self._probability_sums],
            "window_sum": self._window_sum.clone(),
            "window_count": self._window_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sums, counts, window_sum = state["probability_sums"], state["counts"], state["window_sum"]
        if sums.shape != (len(counts), self.num_classes) or window_sum.shape != (self.num_classes,):
            raise ValueError(
                f"collapse monitor state of shape {tuple(sums.shape)}, the model has {self.num_classes} classes"
            )
        self.entropy_ema = state["entropy_ema"]
        self._probability_sums = deque(zip(sums.double().clone().unbind(0), counts, strict=True))
        self._window_sum = window_sum.double().clone()
        self._window_count = state["window_count"]


def relative_drift(params: list[torch.Tensor], source: list[torch.Tensor]) -> float:
    """||theta - theta_source|| / ||theta_source|| over all adapted parameters."""
    diff = torch.sqrt(sum(((p.detach() - s) ** 2).sum() for p, s in zip(params, source, strict=True)))
    norm = torch.sqrt(sum((s**2).sum() for s in source))
    return float(diff / norm.clamp_min(1e-12))
