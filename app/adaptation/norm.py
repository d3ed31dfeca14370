"""Configure a model for test-time adaptation: which normalisation statistics it uses, which parameters train.

TENT's recipe (Wang et al. 2021): BatchNorm normalises with test statistics and only the
normalisation layers' affine weight and bias are trainable. BatchNorm layers are replaced by
`TestTimeBatchNorm`, which normalises either with the current batch alone (as published) or, when
the small-batch guard is on, with class-balanced running test statistics: one running estimate per
predicted class, averaged with equal weight (RoTTA's category-balanced memory, kept as moments).
A batch of one image is then never normalised by itself, and a stream that brings hundreds of
images of one class in a row does not turn the statistics into that class's. Each row also keeps how
fresh it is (the share of its moments that the last few thousand images of the stream brought), so
that the class-pace guard (signals.paced_admission) can keep one row from being refreshed far ahead of
the others; and each layer keeps the source's statistics, against which the plausibility guard
measures how far an image's features are from anything the model was trained on.

Which class an image belongs to is known only from the prediction its forward pass makes, so its moments cannot join
the statistics during that pass. The protocol is explicit: a forward pass made inside `recording(model)` returns the
batch's moments (`BatchMoments`), and `BatchMoments.commit(predicted, ...)` averages them in afterwards. A forward
pass outside `recording` (a repeated entropy step, the buffered step) records nothing.

A domain switch moves every class's statistics at once, and the running ones take thousands of images to follow it.
A full batch is normalised with them moved by its own residual from them (`batch_correction`, `corrected_by`). A
smaller batch cannot be (it may be predicted with other streams' images, and a few images are no estimate): the
stream's recent small batches play its part, as the recent residual every layer keeps (`ClassStatistics.add_recent`),
which its map (`scale_and_shift`) always applies.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

AFFINE_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)

# The class-balanced statistics keep a row per class up to this many classes, and no more rows than the stream's
# memory budget for them holds (AdaptationConfig.stats_memory_mb); beyond, classes share rows (class index modulo the
# rows), so that their memory is bounded whatever the classes: ImageNet's 1,000 in a ResNet-50 take 56 rows (11.9 MB)
# at the default budget instead of 1,000 (212 MB), and a run of one class still moves no more than 1/56 of them.
MAX_STAT_ROWS = 100
BYTES_PER_ROW_CHANNEL = 2 * 4  # two moments, float32


def statistics_rows(num_classes: int, channels: int, budget_bytes: float | None) -> int:
    """Rows per layer of the class-balanced statistics for `channels` BatchNorm channels in all: one per class, at
    most MAX_STAT_ROWS and what `budget_bytes` holds (None: no budget), at least one (plain running statistics)."""
    if budget_bytes is None or channels == 0:  # no budget, or no BatchNorm layer to keep statistics for
        return min(num_classes, MAX_STAT_ROWS)
    affordable = int(budget_bytes // (channels * BYTES_PER_ROW_CHANNEL))
    return max(1, min(num_classes, MAX_STAT_ROWS, affordable))


class TestTimeBatchNorm(nn.Module):
    """BatchNorm that normalises with test statistics: the batch's own, or class-balanced running ones."""

    def __init__(self, bn: _BatchNorm, robust: bool, stats_horizon: int, rows: int) -> None:
        """`rows`: of the class-balanced statistics (`statistics_rows`); class c's images join row c modulo rows."""
        super().__init__()
        if bn.running_mean is None or bn.running_var is None or not bn.affine:
            raise ValueError("TestTimeBatchNorm needs a BatchNorm layer with running statistics and affine parameters")
        self.eps = bn.eps
        self.robust = robust
        # stats_horizon counts images over all classes; each row's estimate sees about 1/rows of them.
        self.per_sample_momentum = min(1.0, rows / stats_horizon)
        self.recorder: BatchMoments | None = None  # set only inside `recording`
        self.correction: BatchCorrection | None = None  # set only inside `corrected_by`
        self.mix: tuple[list[TestTimeBatchNorm], torch.Tensor] | None = None  # set only during mixed_forward
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        # First and second moments per class, starting at the source statistics: moments, so that any number of
        # images can be averaged in exactly, and their mean over classes is the moments of a class-balanced mix.
        source_mean = bn.running_mean.detach().float()
        source_sqmean = (bn.running_var + bn.running_mean.square()).detach().float()
        self.register_buffer("class_mean", source_mean.repeat(rows, 1))
        self.register_buffer("class_sqmean", source_sqmean.repeat(rows, 1))
        # Per row: the share of its moments brought by the recent stream (0: still the source's); see guards.py.
        self.register_buffer("row_freshness", torch.zeros(rows, dtype=torch.float64))
        # The stream's recent small batches (ClassStatistics.add_recent): their moments and their mean prediction
        # folded onto the rows, averaged over about recent_window images, how many images that average holds, and
        # the share of their residual that moves the statistics (0 until a small batch has been seen: the map is
        # then exactly the running statistics').
        self.register_buffer("recent_mean", torch.zeros_like(source_mean))
        self.register_buffer("recent_sqmean", torch.zeros_like(source_mean))
        self.register_buffer("recent_rows", torch.zeros(rows))
        self.register_buffer("recent_count", torch.zeros(1))
        self.register_buffer("recent_share", torch.zeros(1))
        # The source's statistics, constant (not state): what the plausibility guard measures an image against. The
        # source's own tensors (float32: no copy), which `configure` gives `bn`: every stream shares them.
        self.register_buffer("source_mean", source_mean, persistent=False)
        self.register_buffer("source_var", bn.running_var.detach().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.robust:
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        if self.recorder is not None:
            # The batch is normalised with the statistics of the images before it; its own moments wait for commit.
            spatial = list(range(2, x.dim()))
            flat = x.detach().float()
            self.recorder.moments[self] = (flat.mean(spatial), flat.square().mean(spatial))
        if self.mix is not None:  # several streams' images: each with its own stream's layer (see mixed_forward)
            layers, index = self.mix
            # Every stream's map at once, from its layer's tensors stacked (the same numbers as layer by layer).
            scales, shifts = _scale_and_shift(
                *(torch.stack([getattr(layer, name) for layer in layers]) for name in _SCALE_AND_SHIFT_OF), self.eps
            )
            shape = (len(x), -1) + (1,) * (x.dim() - 2)
            return x * scales[index].view(shape) + shifts[index].view(shape)
        if self.correction is not None:
            scale, shift = self.corrected_scale_and_shift(x, self.correction)
        else:
            scale, shift = self.scale_and_shift()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(shape) + shift.view(shape)

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalisation with the class-balanced statistics corrected by the recent residual, then the affine
        parameters, as one map per channel."""
        return _scale_and_shift(*(getattr(self, name) for name in _SCALE_AND_SHIFT_OF), self.eps)

    def corrected_scale_and_shift(
        self, x: torch.Tensor, correction: BatchCorrection
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The map with the class-balanced statistics moved by the batch's own: by `correction.share` of how far the
        batch's moments are from what its predicted classes' rows expect (`correction.composition`). A domain switch
        moves every class's moments, so the batch's residual carries it at once; a batch of a few classes is compared
        with those classes' own rows, so its classes do not become the statistics (and `share` is small for it)."""
        flat = x.detach().float()
        if correction.images is not None:
            flat = flat[correction.images.to(flat.device)]
        spatial = [0, *range(2, x.dim())]
        mean_residual = flat.mean(spatial) - correction.composition @ self.class_mean
        sqmean_residual = flat.square().mean(spatial) - correction.composition @ self.class_sqmean
        mean = self.class_mean.mean(0) + correction.share * mean_residual
        sqmean = self.class_sqmean.mean(0) + correction.share * sqmean_residual
        var = (sqmean - mean.square()).clamp_min(0.0)
        scale = self.weight / torch.sqrt(var + self.eps)
        return scale, self.bias - mean * scale

    @torch.no_grad()
    def source_distance(self, means: torch.Tensor) -> torch.Tensor:
        """Per image (`means`: its channel means): the sum over channels of (its mean - the source's mean)^2 / the
        source's variance, the squared distance of its features from the source's in the source's own units."""
        return ((means - self.source_mean).square() / (self.source_var + self.eps)).sum(1)

    @torch.no_grad()
    def add_moments(
        self,
        means: torch.Tensor,
        sqmeans: torch.Tensor,
        predicted: torch.Tensor,
        admitted: torch.Tensor | None = None,
        freshness: torch.Tensor | None = None,
    ) -> None:
        """Average a batch's images (their moments) into the running moments of the classes they were predicted as:
        all of them, or those `admitted` (a mask); `freshness`, when given, is the rows' freshness after them."""
        _average_in(self, means, sqmeans, predicted, admitted, freshness, None)


# What a layer's map is made of.
_SCALE_AND_SHIFT_OF = (
    "class_mean",
    "class_sqmean",
    "weight",
    "bias",
    "recent_mean",
    "recent_sqmean",
    "recent_rows",
    "recent_share",
)


def _scale_and_shift(
    class_mean: torch.Tensor,
    class_sqmean: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    recent_mean: torch.Tensor,
    recent_sqmean: torch.Tensor,
    recent_rows: torch.Tensor,
    recent_share: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`TestTimeBatchNorm.scale_and_shift` of one layer (rows x channels of moments), or of several streams' copies of
    it stacked (streams x rows x channels; weight and bias streams x channels). The class-balanced moments move by a
    share of the recent residual, as `corrected_scale_and_shift` moves them by a batch's (no recent images: share 0,
    and exactly the class-balanced map)."""
    expected_mean, expected_sqmean = ((recent_rows.unsqueeze(-2) @ m).squeeze(-2) for m in (class_mean, class_sqmean))
    mean = class_mean.mean(-2) + recent_share * (recent_mean - expected_mean)
    sqmean = class_sqmean.mean(-2) + recent_share * (recent_sqmean - expected_sqmean)
    var = (sqmean - mean.square()).clamp_min(0.0)
    scale = weight / torch.sqrt(var + eps)
    return scale, bias - mean * scale


class ClassStatistics:
    """Every class-balanced layer's statistics of one model, side by side: (rows x all the layers' channels) per
    moment, and (layers x rows) of freshness, of which the layers' own `class_mean`, `class_sqmean` and `row_freshness`
    are views. A batch is then committed, and its rows saved for a rollback, in a few operations for all the layers
    instead of a dozen per layer (with 64 streams of one image per batch, 19 layers x 64 streams of them a batch)."""

    def __init__(self, layers: list[TestTimeBatchNorm]) -> None:
        self.layers = layers  # in module order
        self.per_sample_momentum = layers[0].per_sample_momentum  # every layer has the same rows and horizon
        self.class_mean = torch.cat([layer.class_mean for layer in layers], 1)
        self.class_sqmean = torch.cat([layer.class_sqmean for layer in layers], 1)
        self.row_freshness = torch.stack([layer.row_freshness for layer in layers])
        self.recent_mean = torch.cat([layer.recent_mean for layer in layers])
        self.recent_sqmean = torch.cat([layer.recent_sqmean for layer in layers])
        # The same in every layer (a layer's map reads its own: a few numbers, and mixed_forward stacks layers).
        self.recent_rows = torch.stack([layer.recent_rows for layer in layers])
        self.recent_count = torch.stack([layer.recent_count for layer in layers])
        self.recent_share = torch.stack([layer.recent_share for layer in layers])
        widths = [layer.class_mean.shape[1] for layer in layers]
        self.layer_of_channel = torch.repeat_interleave(
            torch.arange(len(layers), device=self.class_mean.device),
            torch.tensor(widths, device=self.class_mean.device),
        )
        start = 0
        for index, (layer, width) in enumerate(zip(layers, widths, strict=True)):
            layer.class_mean = self.class_mean[:, start : start + width]
            layer.class_sqmean = self.class_sqmean[:, start : start + width]
            layer.row_freshness = self.row_freshness[index]
            layer.recent_mean = self.recent_mean[start : start + width]
            layer.recent_sqmean = self.recent_sqmean[start : start + width]
            layer.recent_rows = self.recent_rows[index]
            layer.recent_count = self.recent_count[index]
            layer.recent_share = self.recent_share[index]
            start += width

    @torch.no_grad()
    def add_moments(
        self,
        means: torch.Tensor,
        sqmeans: torch.Tensor,
        predicted: torch.Tensor,
        admitted: torch.Tensor | None = None,
        freshness: torch.Tensor | None = None,
    ) -> None:
        """`TestTimeBatchNorm.add_moments` of every layer at once: `means` and `sqmeans` hold the layers' side by
        side (images x all channels, in layer order)."""
        _average_in(self, means, sqmeans, predicted, admitted, freshness, self.layer_of_channel)

    @torch.no_grad()
    def add_recent(
        self,
        means: torch.Tensor,
        sqmeans: torch.Tensor,
        probabilities: torch.Tensor,
        images: torch.Tensor | None,
        window: int,
        prior_images: int,
    ) -> None:
        """Average a small batch's images (those in `images`, a mask; None: all) into the recent residual's moments
        and composition, each image weighing 1 / `window` (an average over about the last `window` images), and
        weigh the residual as `batch_correction` weighs a batch's: count / (count + `prior_images`) times how evenly
        the recent images spread over the rows."""
        kept = torch.isfinite(means).all(1) & torch.isfinite(sqmeans).all(1)
        if images is not None:
            kept &= images.to(kept.device)
        count = int(kept.sum())
        if count == 0:
            return
        weight = 1.0 - (1.0 - 1.0 / window) ** count
        spread = probabilities[kept.to(probabilities.device)].float().mean(0).to(self.recent_rows.device)
        composition = _folded(spread, self.recent_rows.shape[1])
        self.recent_mean.lerp_(means[kept].mean(0), weight)
        self.recent_sqmean.lerp_(sqmeans[kept].mean(0), weight)
        self.recent_rows.lerp_(composition.expand_as(self.recent_rows), weight)
        self.recent_count.lerp_(torch.full_like(self.recent_count, float(window)), weight)
        count = float(self.recent_count[0])
        self.recent_share.fill_(_evenness(self.recent_rows[0], count) * count / (count + prior_images))


def _average_in(
    statistics: TestTimeBatchNorm | ClassStatistics,
    means: torch.Tensor,
    sqmeans: torch.Tensor,
    predicted: torch.Tensor,
    admitted: torch.Tensor | None,
    freshness: torch.Tensor | None,
    layer_of_channel: torch.Tensor | None,
) -> None:
    """Average images' moments (images x channels) into the running moments of their predicted classes' rows: an
    image joins a layer's rows if it is admitted and all its moments in that layer are finite (`layer_of_channel`:
    the layer of each channel; None: all channels are one layer's). Adding 0 for an image that does not join, and
    reading only the rows some image joined, gives bit for bit what averaging in only the others would."""
    if freshness is not None:
        statistics.row_freshness.copy_(freshness)
    finite = torch.isfinite(means) & torch.isfinite(sqmeans)
    if layer_of_channel is None:
        kept = finite.all(1, keepdim=True)  # images x 1 layer
    else:
        broken = torch.zeros(len(means), len(statistics.row_freshness), dtype=means.dtype, device=means.device)
        kept = broken.index_add_(1, layer_of_channel, (~finite).to(means.dtype)) == 0  # images x layers
    if admitted is not None:
        kept &= admitted.to(kept.device).unsqueeze(1)
    rows = predicted.to(means.device) % len(statistics.class_mean)
    counts = kept.new_zeros(len(statistics.class_mean), kept.shape[1], dtype=means.dtype)
    counts.index_add_(0, rows, kept.to(means.dtype))  # rows x layers
    share = 1.0 - (1.0 - statistics.per_sample_momentum) ** counts
    if layer_of_channel is not None:  # per channel
        kept, counts, share = kept[:, layer_of_channel], counts[:, layer_of_channel], share[:, layer_of_channel]
    seen = (counts > 0).expand_as(statistics.class_mean)
    share = share.expand_as(statistics.class_mean)[seen]
    for running, batch in ((statistics.class_mean, means), (statistics.class_sqmean, sqmeans)):
        sums = torch.zeros_like(running).index_add_(0, rows, torch.where(kept, batch, 0.0))
        running[seen] = torch.lerp(running[seen], (sums / counts)[seen], share)


# The stacked statistics of the models `configure` made (a model whose layers average their own way, as
# bench/domain_tracking.py's, keeps them per layer): what a batch's commit and rollback use, found without walking
# the model's modules.
_STACKED: weakref.WeakKeyDictionary[nn.Module, ClassStatistics] = weakref.WeakKeyDictionary()


@dataclass
class ConfiguredModel:
    model: nn.Module
    params: list[nn.Parameter]
    norm_kind: str  # what is adapted, for /v1/status


def configure(
    source: nn.Module, robust_stats: bool, stats_horizon: int, num_classes: int, stats_memory_mb: float | None = None
) -> ConfiguredModel:
    """A copy of `source` ready for adaptation; `source` itself is never modified.

    Only the normalisation layers are copied: every other parameter and buffer (the frozen backbone, and the
    BatchNorm layers' source statistics) is the source's own tensor, so each stream's copy costs only what it adapts.
    `stats_memory_mb` bounds the class-balanced statistics (`statistics_rows`; None: MAX_STAT_ROWS rows at most).
    """
    frozen = [t for t in _shared_tensors(source) if t is not None]
    model = copy.deepcopy(source, memo={id(t): t for t in frozen}).eval()  # eval: dropout off; our norms ignore it
    model.requires_grad_(False)
    channels = sum(m.num_features for m in source.modules() if isinstance(m, _BatchNorm))
    budget = None if stats_memory_mb is None else stats_memory_mb * 1e6
    replaced = _replace_batchnorms(model, robust_stats, stats_horizon, statistics_rows(num_classes, channels, budget))
    model.eval()  # the new layers too
    if robust_stats and replaced and all(type(m).add_moments is TestTimeBatchNorm.add_moments for m in replaced):
        _STACKED[model] = ClassStatistics(replaced)
    others = [m for m in model.modules() if isinstance(m, AFFINE_NORMS) and getattr(m, "weight", None) is not None]
    if not replaced and not others:
        raise ValueError(
            f"{type(source).__name__} has no normalisation layer with affine parameters "
            "(BatchNorm, LayerNorm, GroupNorm): methods 'norm' and 'tent' cannot adapt it; use TTA_METHOD=none"
        )
    params = []
    for module in replaced + others:
        for p in (module.weight, module.bias):
            if p is not None:
                p.requires_grad_(True)
                params.append(p)
    kinds = sorted({"BatchNorm" if isinstance(m, TestTimeBatchNorm) else type(m).__name__ for m in replaced + others})
    return ConfiguredModel(model, params, "+".join(kinds))


def _shared_tensors(source: nn.Module) -> Iterator[torch.Tensor | None]:
    """The source's tensors that a stream's copy shares instead of copying: all but the normalisation layers' own,
    and of BatchNorm layers their source statistics (constants; `TestTimeBatchNorm.source_mean` and `source_var`)."""
    for module in source.modules():
        if isinstance(module, _BatchNorm):
            yield from (module.running_mean, module.running_var, module.num_batches_tracked)
        elif not isinstance(module, AFFINE_NORMS):
            yield from (*module.parameters(recurse=False), *module.buffers(recurse=False))


def _replace_batchnorms(model: nn.Module, robust: bool, horizon: int, rows: int) -> list[TestTimeBatchNorm]:
    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm):
                layer = TestTimeBatchNorm(child, robust, horizon, rows).to(child.weight.device)
                setattr(parent, name, layer)
                replaced.append(layer)
    return replaced


# A layer's test statistics, by buffer name: the class-balanced running moments and their freshness, and the recent
# residual (what a snapshot, a copy and a reset carry; a rollback point, taken before a full batch, needs only the
# rows that batch changes: only small batches change the recent residual).
RECENT_RESIDUAL = ("recent_mean", "recent_sqmean", "recent_rows", "recent_count", "recent_share")
STATISTICS = ("class_mean", "class_sqmean", "row_freshness", *RECENT_RESIDUAL)

StatisticsRows = list[
    tuple[TestTimeBatchNorm | ClassStatistics, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
]


@dataclass
class BatchMoments:
    """One forward pass's images' moments per class-balanced layer (channel means and mean squares, per image), in
    the model's module order: what `commit` averages into the running statistics once the images' classes are known."""

    layers: list[TestTimeBatchNorm]  # every layer that records, in module order
    statistics: ClassStatistics | None = None  # the layers' statistics, when they are stacked
    moments: dict[TestTimeBatchNorm, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    side_by_side: tuple[torch.Tensor, torch.Tensor] | None = None  # every layer's moments, images x all channels
    # These images' rows of a larger batch's moments (mixed_forward), whose source distance is computed once for all.
    rows_of: tuple[BatchMoments, list[int]] | None = None
    distance: torch.Tensor | None = None  # `source_distance`, once computed

    @classmethod
    def of_images(
        cls,
        layers: list[TestTimeBatchNorm],
        statistics: ClassStatistics | None,
        batch: BatchMoments,
        rows: list[int],
    ) -> BatchMoments:
        """These rows of `batch`'s moments, for `layers` (another model's copy of the same layers, in order)."""
        means, sqmeans = (moments[rows] for moments in batch.stacked())
        widths = [layer.class_mean.shape[1] for layer in layers]
        moments = dict(zip(layers, zip(means.split(widths, 1), sqmeans.split(widths, 1), strict=True), strict=True))
        return cls(layers, statistics, moments, (means, sqmeans), (batch, rows))

    def recorded(self) -> list[tuple[TestTimeBatchNorm, torch.Tensor, torch.Tensor]]:
        return [(layer, *self.moments[layer]) for layer in self.layers if layer in self.moments]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's moments side by side: images x all the layers' channels, in layer order (computed once)."""
        if self.side_by_side is None:
            recorded = self.recorded()
            self.side_by_side = torch.cat([m for _, m, _ in recorded], 1), torch.cat([s for _, _, s in recorded], 1)
        return self.side_by_side

    def __bool__(self) -> bool:
        return bool(self.moments)

    def rows(self, predicted: torch.Tensor) -> StatisticsRows:
        """The rows of the running statistics that committing `predicted` will change, as they are now, and every
        row's freshness (a few numbers, all of which a commit changes): what a rollback puts back. Only those rows of
        the moments: the others do not change, and at 1,000 classes all of them are megabytes."""
        saved = []
        holders = [self.statistics] if self.statistics is not None else [layer for layer, _, _ in self.recorded()]
        for statistics in holders:
            rows = torch.unique(predicted.to(statistics.class_mean.device) % len(statistics.class_mean))
            moments = statistics.class_mean[rows].clone(), statistics.class_sqmean[rows].clone()
            saved.append((statistics, rows, *moments, statistics.row_freshness.clone()))
        return saved

    def commit(
        self, predicted: torch.Tensor, admitted: torch.Tensor | None = None, freshness: torch.Tensor | None = None
    ) -> None:
        """The images (those `admitted`, when given) join the running statistics under their predicted classes."""
        if self.statistics is not None:  # every layer at once (a forward pass records at every layer)
            self.statistics.add_moments(*self.stacked(), predicted, admitted, freshness)
            return
        for layer, means, sqmeans in self.recorded():
            layer.add_moments(means, sqmeans, predicted, admitted, freshness)

    def join_recent(
        self, probabilities: torch.Tensor, images: torch.Tensor | None, window: int, prior_images: int
    ) -> None:
        """A small batch's images (those in `images`; None: all) join the recent residual
        (`ClassStatistics.add_recent`); of a model whose statistics are not stacked, nothing."""
        if self.statistics is not None and self.moments:
            self.statistics.add_recent(*self.stacked(), probabilities, images, window, prior_images)

    def source_distance(self) -> torch.Tensor | None:
        """Per image: the mean over every channel of every layer of its source-normalised squared distance
        (`TestTimeBatchNorm.source_distance`); None when nothing was recorded. Of a few rows of a batch: the
        batch's, computed once (the source's statistics are every stream's; per image, the same numbers)."""
        if self.rows_of is not None:
            batch, rows = self.rows_of
            distance = batch.source_distance()
            return None if distance is None else distance[rows]
        if self.distance is None and self.moments:
            sums, channels = None, 0
            for layer, means, _ in self.recorded():
                distance = layer.source_distance(means)
                sums = distance if sums is None else sums + distance
                channels += layer.class_mean.shape[1]
            self.distance = sums / channels
        return self.distance


def recording_layers(model: nn.Module) -> list[TestTimeBatchNorm]:
    stacked = _STACKED.get(model)
    if stacked is not None:
        return stacked.layers
    return [m for m in model.modules() if isinstance(m, TestTimeBatchNorm) and m.robust]


@contextmanager
def recording(model: nn.Module) -> Iterator[BatchMoments]:
    """Forward passes made inside record their images' moments (class-balanced layers only) into what it yields."""
    moments = BatchMoments(recording_layers(model), _STACKED.get(model))
    for layer in moments.layers:
        layer.recorder = moments
    try:
        yield moments
    finally:
        for layer in moments.layers:
            layer.recorder = None


@torch.no_grad()
def source_distances(source: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Every image's source distance (`BatchMoments.source_distance`, the plausibility guard's measure) under the
    source model itself, its statistics the source's: what the guard's threshold is scaled by, measured on the
    model's own source images (models/plausibility.py)."""
    model = configure(source, robust_stats=True, stats_horizon=1, num_classes=1).model
    distances = []
    for x in batches:
        with recording(model) as moments:
            model(x)
        distance = moments.source_distance()
        if distance is None:
            raise ValueError(f"{type(source).__name__} has no BatchNorm layer: the source distance is not defined")
        distances.append(distance)
    return torch.cat(distances)


@dataclass(frozen=True)
class BatchCorrection:
    """How a batch's own statistics correct the class-balanced ones in its pass (`TestTimeBatchNorm.forward`)."""

    composition: torch.Tensor  # per row of the statistics: the share of the batch predicted as its classes
    share: float  # of the batch's residual that moves the statistics, in [0, 1)
    images: torch.Tensor | None  # which images' moments make the residual (None: all)


def _evenness(composition: torch.Tensor, images: float) -> float:
    """How evenly `images` predicted as `composition` (their mean prediction) spread over its classes: the effective
    number of classes (exp of its entropy) from 1 (one class: 0) to min(classes, images) (1)."""
    composition = composition.double()
    effective = torch.exp(-(composition * composition.clamp_min(1e-12).log()).sum())
    return float(((effective - 1) / max(1.0, min(len(composition), images) - 1)).clamp(0.0, 1.0))


def _folded(spread: torch.Tensor, rows: int) -> torch.Tensor:
    """A mean prediction over classes as shares of the statistics' rows (class c's share goes to row c modulo rows)."""
    folded = torch.zeros(rows, dtype=torch.float32, device=spread.device)
    return folded.index_add_(0, torch.arange(len(spread), device=spread.device) % rows, spread.float())


def batch_correction(
    probabilities: torch.Tensor, rows: int, prior_images: int, images: torch.Tensor | None = None
) -> BatchCorrection:
    """The correction for a batch predicted as `probabilities` (images x classes) by a first pass, from the `images`
    (a mask; None: all) that may make it: their residual weighs as their number against `prior_images` of the
    running statistics, times how many classes they spread over (the effective number of classes of their mean
    prediction, from 1: none, to min(classes, images): all), so that class-sorted traffic, whose batches hold one or
    two classes, keeps the running statistics."""
    if images is not None:
        probabilities = probabilities[images.to(probabilities.device)]
    count = len(probabilities)
    spread = probabilities.double().mean(0)
    evenness = _evenness(spread, count)
    return BatchCorrection(_folded(spread, rows), evenness * count / (count + prior_images), images)


@contextmanager
def corrected_by(model: nn.Module, correction: BatchCorrection) -> Iterator[None]:
    """Forward passes made inside normalise with the class-balanced statistics corrected by the batch's own."""
    layers = recording_layers(model)
    for layer in layers:
        layer.correction = correction
    try:
        yield
    finally:
        for layer in layers:
            layer.correction = None


@torch.no_grad()
def restore_rows(saved: StatisticsRows) -> None:
    for statistics, rows, mean, sqmean, freshness in saved:
        statistics.class_mean[rows] = mean
        statistics.class_sqmean[rows] = sqmean
        statistics.row_freshness.copy_(freshness)


def class_statistics(model: nn.Module) -> TestTimeBatchNorm | None:
    """The first layer with class-balanced statistics (all of them have the same rows and freshness), if any."""
    return next(iter(recording_layers(model)), None)


def mixed_forward(
    models: list[nn.Module], rows: list[list[int]], x: torch.Tensor
) -> tuple[torch.Tensor, list[BatchMoments]]:
    """One forward pass over several streams' images: image i is normalised by the layers of models[s], the model of
    the stream whose `rows` hold i, so each image gets exactly the statistics and affine parameters of its own
    stream, as if its stream ran alone; the convolutions, shared by every stream, run once on the whole batch.
    Returns the logits and each model's moments of its own images only, for its commit.
    For class-balanced (robust) statistics, which do not depend on the batch; `can_mix` says when that holds (every
    normalisation layer records)."""
    layers = [recording_layers(model) for model in models]
    index = torch.empty(len(x), dtype=torch.long, device=x.device)
    for stream, stream_rows in enumerate(rows):
        index[stream_rows] = stream
    carrier = layers[0]  # every model has the same layers: the first's run the pass
    for position, layer in enumerate(carrier):
        layer.mix = ([stream_layers[position] for stream_layers in layers], index)
    try:
        with recording(models[0]) as moments:
            logits = models[0](x)
    finally:
        for layer in carrier:
            layer.mix = None
    return logits, [
        BatchMoments.of_images(model_layers, _STACKED.get(model), moments, r)
        for model, model_layers, r in zip(models, layers, rows, strict=True)
    ]


def can_mix(model: nn.Module) -> bool:
    """Whether `mixed_forward` gives this model's exact normalisation: only robust TestTimeBatchNorm layers adapt, each
    with the plain map (it computes every stream's at once)."""
    norms = [m for m in model.modules() if isinstance(m, (TestTimeBatchNorm, *AFFINE_NORMS))]
    return bool(norms) and all(
        isinstance(m, TestTimeBatchNorm) and m.robust and type(m).scale_and_shift is TestTimeBatchNorm.scale_and_shift
        for m in norms
    )
