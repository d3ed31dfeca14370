"""Configure a model for test-time adaptation: which normalisation statistics it uses, which parameters train.

TENT's recipe (Wang et al. 2021): BatchNorm normalises with test statistics and only the
normalisation layers' affine weight and bias are trainable. BatchNorm layers are replaced by
`TestTimeBatchNorm`, which normalises either with the current batch alone (as published) or, when
the small-batch guard is on, with class-balanced running test statistics: one running estimate per
predicted class, averaged with equal weight (RoTTA's category-balanced memory, kept as moments).
A batch of one image is then never normalised by itself, and a stream that brings hundreds of
images of one class in a row does not turn the statistics into that class's. Each row also keeps how
fresh it is (the share of its moments that the last few thousand images of the stream brought), so
that the class-pace guard (guards.paced_admission) can keep one row from being refreshed far ahead of
the others; and each layer keeps the source's statistics, against which the plausibility guard
measures how far an image's features are from anything the model was trained on.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

AFFINE_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)

# The class-balanced statistics keep a row per class up to this many classes; beyond, classes share rows (class index
# modulo MAX_STAT_ROWS), so that their memory is bounded whatever the classes: ImageNet's 1,000 in a ResNet-50 take
# 20 MiB instead of 203 MiB, and a run of one class still moves no more than a hundredth of the statistics.
MAX_STAT_ROWS = 100


class TestTimeBatchNorm(nn.Module):
    """BatchNorm that normalises with test statistics: the batch's own, or class-balanced running ones."""

    def __init__(self, bn: _BatchNorm, robust: bool, stats_horizon: int, num_classes: int) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None or not bn.affine:
            raise ValueError("TestTimeBatchNorm needs a BatchNorm layer with running statistics and affine parameters")
        self.eps = bn.eps
        self.robust = robust
        rows = min(num_classes, MAX_STAT_ROWS)
        # stats_horizon counts images over all classes; each row's estimate sees about 1/rows of them.
        self.per_sample_momentum = min(1.0, rows / stats_horizon)
        self.update_stats = True
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
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
        # The source's statistics, constant (not state): what the plausibility guard measures an image against.
        self.register_buffer("source_mean", source_mean.clone(), persistent=False)
        self.register_buffer("source_var", bn.running_var.detach().float().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.robust:
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        if self.update_stats:
            # Which class each image belongs to is known only from the prediction this forward pass makes:
            # its moments wait for `commit`, and the batch is normalised with the statistics of the images before it.
            spatial = list(range(2, x.dim()))
            flat = x.detach().float()
            self._pending = (flat.mean(spatial), flat.square().mean(spatial))
        if self.mix is not None:  # several streams' images: each with its own stream's layer (see mixed_forward)
            layers, index = self.mix
            scales, shifts = zip(*(layer.scale_and_shift() for layer in layers), strict=True)
            shape = (len(x), -1) + (1,) * (x.dim() - 2)
            return x * torch.stack(scales)[index].view(shape) + torch.stack(shifts)[index].view(shape)
        scale, shift = self.scale_and_shift()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(shape) + shift.view(shape)

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalisation with the class-balanced statistics, then the affine parameters, as one map per channel."""
        mean = self.class_mean.mean(0)
        var = (self.class_sqmean.mean(0) - mean.square()).clamp_min(0.0)
        scale = self.weight / torch.sqrt(var + self.eps)
        return scale, self.bias - mean * scale

    @torch.no_grad()
    def source_distance(self) -> torch.Tensor | None:
        """Per image of the last forward pass: the sum over channels of (its mean - the source's mean)^2 / the
        source's variance, the squared distance of its features from the source's in the source's own units."""
        if self._pending is None:
            return None
        return ((self._pending[0] - self.source_mean).square() / (self.source_var + self.eps)).sum(1)

    @torch.no_grad()
    def commit(
        self, predicted: torch.Tensor, admitted: torch.Tensor | None = None, freshness: torch.Tensor | None = None
    ) -> None:
        """Average the last forward pass's images into the running moments of the classes they were predicted as:
        all of them, or those `admitted` (a mask); `freshness`, when given, is the rows' freshness after them."""
        if self._pending is None:
            return
        means, sqmeans = self._pending
        self._pending = None
        if freshness is not None:
            self.row_freshness.copy_(freshness)
        finite = torch.isfinite(means).all(1) & torch.isfinite(sqmeans).all(1)
        if admitted is not None:
            finite &= admitted.to(finite.device)
        predicted = predicted.to(means.device)[finite] % len(self.class_mean)
        counts = torch.bincount(predicted, minlength=len(self.class_mean)).to(means.dtype)
        seen = counts > 0
        share = (1.0 - (1.0 - self.per_sample_momentum) ** counts[seen]).unsqueeze(1)
        for running, batch in ((self.class_mean, means[finite]), (self.class_sqmean, sqmeans[finite])):
            sums = torch.zeros_like(running).index_add_(0, predicted, batch)
            running[seen] = torch.lerp(running[seen], sums[seen] / counts[seen].unsqueeze(1), share)


@dataclass
class ConfiguredModel:
    model: nn.Module
    params: list[nn.Parameter]
    norm_kind: str  # what is adapted, for /v1/status


def configure(source: nn.Module, robust_stats: bool, stats_horizon: int, num_classes: int) -> ConfiguredModel:
    """A copy of `source` ready for adaptation; `source` itself is never modified.

    Only the normalisation layers are copied: every other parameter and buffer (the frozen backbone) is the
    source's own tensor, so each stream's copy costs only what it adapts.
    """
    frozen = [
        tensor
        for module in source.modules()
        if not isinstance(module, (_BatchNorm, *AFFINE_NORMS))
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False))
    ]
    model = copy.deepcopy(source, memo={id(t): t for t in frozen}).eval()  # eval: dropout off; our norms ignore it
    model.requires_grad_(False)
    replaced = _replace_batchnorms(model, robust_stats, stats_horizon, num_classes)
    model.eval()  # the new layers too
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


def _replace_batchnorms(model: nn.Module, robust: bool, horizon: int, num_classes: int) -> list[TestTimeBatchNorm]:
    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm):
                layer = TestTimeBatchNorm(child, robust, horizon, num_classes).to(child.weight.device)
                setattr(parent, name, layer)
                replaced.append(layer)
    return replaced


def set_stats_update(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, TestTimeBatchNorm):
            module.update_stats = enabled


StatisticsRows = list[tuple[TestTimeBatchNorm, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def statistics_rows(model: nn.Module, predicted: torch.Tensor) -> StatisticsRows:
    """The rows of the running statistics that committing `predicted` will change, as they are now, and every row's
    freshness (a few numbers, all of which a commit changes): what a rollback puts back. Only those rows of the
    moments: the others do not change, and at 1,000 classes all of them are megabytes."""
    saved = []
    for module in model.modules():
        if isinstance(module, TestTimeBatchNorm) and module._pending is not None:
            rows = torch.unique(predicted.to(module.class_mean.device) % len(module.class_mean))
            moments = module.class_mean[rows].clone(), module.class_sqmean[rows].clone()
            saved.append((module, rows, *moments, module.row_freshness.clone()))
    return saved


@torch.no_grad()
def restore_rows(saved: StatisticsRows) -> None:
    for module, rows, mean, sqmean, freshness in saved:
        module.class_mean[rows] = mean
        module.class_sqmean[rows] = sqmean
        module.row_freshness.copy_(freshness)


def commit_statistics(
    model: nn.Module,
    predicted: torch.Tensor,
    admitted: torch.Tensor | None = None,
    freshness: torch.Tensor | None = None,
) -> None:
    """After a forward pass: its images (those `admitted`, when given) join the running statistics under their
    predicted classes."""
    for module in model.modules():
        if isinstance(module, TestTimeBatchNorm):
            module.commit(predicted, admitted, freshness)


def source_distance(model: nn.Module) -> torch.Tensor | None:
    """Per image of the last forward pass: the mean over every channel of every class-balanced layer of its
    source-normalised squared distance (`TestTimeBatchNorm.source_distance`); None without such layers."""
    sums, channels = None, 0
    for module in model.modules():
        if isinstance(module, TestTimeBatchNorm) and (distance := module.source_distance()) is not None:
            sums = distance if sums is None else sums + distance
            channels += module.class_mean.shape[1]
    return None if sums is None else sums / channels


def class_statistics(model: nn.Module) -> TestTimeBatchNorm | None:
    """The first layer with class-balanced statistics (all of them have the same rows and freshness), if any."""
    return next((m for m in model.modules() if isinstance(m, TestTimeBatchNorm) and m.robust), None)


def mixed_forward(models: list[nn.Module], rows: list[list[int]], x: torch.Tensor) -> torch.Tensor:
    """One forward pass over several streams' images: image i is normalised by the layers of models[s], the model of
    the stream whose `rows` hold i, so each image gets exactly the statistics and affine parameters of its own
    stream, as if its stream ran alone; the convolutions, shared by every stream, run once on the whole batch.
    Each model's layers are left holding the moments of its own images only, for its `commit_statistics`.
    For class-balanced (robust) statistics, which do not depend on the batch; `can_mix` says when that holds."""
    layers = [[m for m in model.modules() if isinstance(m, TestTimeBatchNorm)] for model in models]
    index = torch.empty(len(x), dtype=torch.long, device=x.device)
    for stream, stream_rows in enumerate(rows):
        index[stream_rows] = stream
    carrier = layers[0]  # every model has the same layers: the first's run the pass
    for position, layer in enumerate(carrier):
        layer.mix = ([stream_layers[position] for stream_layers in layers], index)
    try:
        logits = models[0](x)
    finally:
        for layer in carrier:
            layer.mix = None
    for position, layer in enumerate(carrier):
        if layer._pending is not None:
            means, sqmeans = layer._pending
            for stream_layers, stream_rows in zip(layers, rows, strict=True):
                stream_layers[position]._pending = (means[stream_rows], sqmeans[stream_rows])
    return logits


def can_mix(model: nn.Module) -> bool:
    """Whether `mixed_forward` gives this model's exact normalisation: only robust TestTimeBatchNorm layers adapt."""
    norms = [m for m in model.modules() if isinstance(m, (TestTimeBatchNorm, *AFFINE_NORMS))]
    return bool(norms) and all(isinstance(m, TestTimeBatchNorm) and m.robust for m in norms)
