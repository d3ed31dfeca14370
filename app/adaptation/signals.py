"""Signals the stability guards (guards.py) decide on: entropy EMA, prediction diversity, drift, class pace."""

import copy
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


def paced_admission(
    freshness: torch.Tensor,
    rows: torch.Tensor,
    candidates: torch.Tensor,
    momentum: float,
    window: int,
    margin: float,
    binding: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the `candidates` (a mask) join the class-balanced statistics (the class-pace guard), and the rows'
    freshness after them.

    A row's freshness is the share of its running moments that the stream's recent images brought: each image of
    the stream multiplies every row's by 1 - 1/window (window: the statistics' horizon), and an image that joins
    row j moves it to (1 - momentum) f_j + momentum, as the image moves the row's moments (0 at the start: the
    source's statistics). While the pace is `binding` (the engine makes it so while one class takes most of the
    recent predictions), an image joins its row only if that leaves the row at most `margin` above the median row
    (the lower median). Class-balanced statistics let a run of one predicted class move only that class's row, but
    that row then stands for the run while the others still hold the source's mix, so their mean leans toward the
    run, more of the run is predicted as other classes and joins their rows, and the drift feeds itself. Held to
    the median, the run's row takes in about `margin` of itself whatever the run's length. Images are taken in
    order, so a batch is paced as the same images one by one; freshness is kept whether binding or not.
    """
    f = freshness.tolist()
    keep = 1.0 - 1.0 / window
    middle = (len(f) - 1) // 2
    admitted = []
    for row, candidate in zip(rows.tolist(), candidates.tolist(), strict=True):
        f = [value * keep for value in f]
        joined = (1.0 - momentum) * f[row] + momentum
        admit = candidate and (not binding or joined <= sorted(f)[middle] + margin)
        if admit:
            f[row] = joined
        admitted.append(admit)
    return (
        torch.tensor(admitted, dtype=torch.bool, device=rows.device),
        torch.tensor(f, dtype=freshness.dtype, device=freshness.device),
    )


# The windows below keep a probability sum per entry; entries are buckets of window / WINDOW_ENTRIES images (64 for
# the default window of 2,048), so that a window's memory does not depend on how small the batches are.
WINDOW_ENTRIES = 32


class CollapseMonitor:
    """Tracks the EMA of the prediction entropy (decay per `decay_images` images) and the entropy of the mean
    prediction over a window; and the mean prediction over a window of the admitted images only (those the
    adaptation learns from: the class pace can hold some back), whose class shares the re-weighting uses."""

    def __init__(self, num_classes: int, ema_decay: float, window: int, decay_images: int) -> None:
        self.num_classes = num_classes
        self.ema_decay = ema_decay
        self.decay_images = decay_images  # ema_decay applies per this many images, whatever the batch size
        self.window = window
        self.bucket = max(1, window // WINDOW_ENTRIES)  # images per entry of a window at least (see _push)
        self._bucket_images = 0  # images observed into the windows' last entries
        self.entropy_ema: float | None = None
        self._probability_sums: deque[tuple[torch.Tensor, int]] = deque()
        self._window_sum = torch.zeros(num_classes, dtype=torch.float64)
        self._window_count = 0
        self._admitted_sums: deque[tuple[torch.Tensor, int]] = deque()
        self._admitted_sum = torch.zeros(num_classes, dtype=torch.float64)
        self._admitted_count = 0

    def observe(self, logits: torch.Tensor, entropy: torch.Tensor, admitted: torch.Tensor | None = None) -> None:
        """`admitted`: a mask of the images the adaptation took in (None: all of them)."""
        batch_entropy = float(entropy.mean())
        if self.entropy_ema is None:
            self.entropy_ema = batch_entropy
        else:
            # Per image, not per batch: otherwise a stream of single images averages only the last ~10 and a few
            # confident images in a row look like collapse.
            decay = self.ema_decay ** (len(logits) / self.decay_images)
            self.entropy_ema = decay * self.entropy_ema + (1 - decay) * batch_entropy
        batch_sum = logits.softmax(1).sum(0).double().cpu()
        merge = self._bucket_images < self.bucket
        self._bucket_images = (self._bucket_images if merge else 0) + len(logits)
        self._window_count = self._push(
            self._probability_sums, self._window_sum, self._window_count, batch_sum, len(logits), merge
        )
        if admitted is None or bool(admitted.all()):  # the same sum, so that both windows agree exactly then
            admitted_sum, count = batch_sum, len(logits)
        else:
            admitted_sum, count = logits[admitted].softmax(1).sum(0).double().cpu(), int(admitted.sum())
        if count:
            self._admitted_count = self._push(
                self._admitted_sums, self._admitted_sum, self._admitted_count, admitted_sum, count, merge
            )

    def _push(
        self, sums: deque, total: torch.Tensor, count: int, batch_sum: torch.Tensor, images: int, merge: bool
    ) -> int:
        """Add a batch's probability sum to a window (in place), drop what falls out of it; the new count.

        Batches share an entry (`merge`) until `bucket` images have been observed into it (counted over every image,
        so that both windows keep the same entries, and batches of `bucket` or more an entry each, as they always
        did): the window forgets in steps of up to `bucket` images, and holds about WINDOW_ENTRIES entries however
        small the batches (one per batch was 2,048 entries of C float64 on single-image traffic: 16 MB per stream
        at 1,000 classes)."""
        entry = (batch_sum, images)
        if merge and sums:
            last, last_images = sums.pop()
            entry = (last + batch_sum, last_images + images)  # a new tensor: the other window may share `last`
        sums.append(entry)
        total += batch_sum
        count += images
        while count - sums[0][1] >= self.window:
            oldest, oldest_count = sums.popleft()
            total -= oldest
            count -= oldest_count
        return count

    def class_shares(self) -> torch.Tensor | None:
        """Mean prediction over the window so far: how often each class is being predicted."""
        if self._window_count == 0:
            return None
        return self._window_sum / self._window_count

    def class_shares_with(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean prediction over the window and a batch not yet observed: how often each class is predicted lately."""
        batch_sum = logits.detach().softmax(1).sum(0).double().cpu()
        return (self._window_sum + batch_sum) / (self._window_count + len(logits))

    def admitted_shares(self) -> torch.Tensor | None:
        """Mean prediction over the window of admitted images: how often each class is being learnt from."""
        if self._admitted_count == 0:
            return None
        return self._admitted_sum / self._admitted_count

    def diversity(self) -> float | None:
        """Entropy (nats) of the mean prediction, once the window is full."""
        mean = self.class_shares()
        if mean is None or self._window_count < self.window:
            return None
        return distribution_entropy(mean)

    def copy(self) -> "CollapseMonitor":
        """A monitor with these values that does not move when this one does (a lagged step reads it, lag.py). The
        windows' entries are never changed in place, so the copies share them."""
        twin = copy.copy(self)
        twin._probability_sums, twin._window_sum = deque(self._probability_sums), self._window_sum.clone()
        twin._admitted_sums, twin._admitted_sum = deque(self._admitted_sums), self._admitted_sum.clone()
        return twin

    @property
    def max_entropy(self) -> float:
        return math.log(self.num_classes)

    def state_dict(self) -> dict[str, Any]:
        """The EMA and the windows as they are (the windows' sums too: re-adding would round differently)."""
        return {
            "entropy_ema": self.entropy_ema,
            "bucket_images": self._bucket_images,
            **self._window_state(self._probability_sums, self._window_sum, self._window_count),
            "admitted": self._window_state(self._admitted_sums, self._admitted_sum, self._admitted_count),
        }

    def _window_state(self, sums: deque, total: torch.Tensor, count: int) -> dict[str, Any]:
        stacked = [batch_sum for batch_sum, _ in sums]
        return {
            "probability_sums": torch.stack(stacked)
            if stacked
            else torch.zeros(0, self.num_classes, dtype=torch.float64),
            "counts": [images for _, images in sums],
            "window_sum": total.clone(),
            "window_count": count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A state saved before the admitted window existed: every image was admitted then, so it is the same window.
        admitted = state.get("admitted", state)
        everything = self._window_from(state)
        held = self._window_from(admitted)
        self.entropy_ema = state["entropy_ema"]
        # A state saved before the buckets: an entry per batch, each closed.
        self._bucket_images = state.get("bucket_images", self.bucket)
        self._probability_sums, self._window_sum, self._window_count = everything
        self._admitted_sums, self._admitted_sum, self._admitted_count = held

    def _window_from(self, state: dict[str, Any]) -> tuple[deque, torch.Tensor, int]:
        sums, counts, window_sum = state["probability_sums"], state["counts"], state["window_sum"]
        if sums.shape != (len(counts), self.num_classes) or window_sum.shape != (self.num_classes,):
            raise ValueError(
                f"collapse monitor state of shape {tuple(sums.shape)}, the model has {self.num_classes} classes"
            )
        return (
            deque(zip(sums.double().clone().unbind(0), counts, strict=True)),
            window_sum.double().clone(),
            state["window_count"],
        )


def relative_drift(params: list[torch.Tensor], source: list[torch.Tensor]) -> float:
    """||theta - theta_source|| / ||theta_source|| over all adapted parameters."""
    diff = torch.sqrt(sum(((p.detach() - s) ** 2).sum() for p, s in zip(params, source, strict=True)))
    norm = torch.sqrt(sum((s**2).sum() for s in source))
    return float(diff / norm.clamp_min(1e-12))
