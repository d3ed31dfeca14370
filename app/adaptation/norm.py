"""Configure a model for test-time adaptation: which normalisation statistics it uses, which parameters train.

TENT's recipe (Wang et al. 2021): BatchNorm normalises with test statistics and only the
normalisation layers' affine weight and bias are trainable. BatchNorm layers are replaced by
`TestTimeBatchNorm`, which normalises either with the current batch alone (as published) or, when
the small-batch guard is on, with a running estimate of the test statistics that each batch
updates in proportion to its size (so a batch of one image is never normalised by itself, and a
class-correlated batch moves the estimate only a little; compare RoTTA's robust BN).
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

AFFINE_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


class TestTimeBatchNorm(nn.Module):
    """BatchNorm that normalises with test statistics: the batch's own, or a size-weighted running mix."""

    def __init__(self, bn: _BatchNorm, robust: bool, stats_horizon: int) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None or not bn.affine:
            raise ValueError("TestTimeBatchNorm needs a BatchNorm layer with running statistics and affine parameters")
        self.eps = bn.eps
        self.robust = robust
        self.per_sample_momentum = 1.0 / stats_horizon
        self.update_stats = True
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        # The running test moments start at the source statistics: first and second moment,
        # so that images of any batch size can be averaged in exactly.
        self.register_buffer("test_mean", bn.running_mean.detach().clone().float())
        self.register_buffer("test_sqmean", (bn.running_var + bn.running_mean.square()).detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.robust:
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        dims = [0, *range(2, x.dim())]
        share = 1.0 - (1.0 - self.per_sample_momentum) ** x.shape[0]
        mean = torch.lerp(self.test_mean, x.mean(dims), share)
        sqmean = torch.lerp(self.test_sqmean, x.square().mean(dims), share)
        if self.update_stats:
            self.test_mean.copy_(mean.detach())
            self.test_sqmean.copy_(sqmean.detach())
        var = (sqmean - mean.square()).clamp_min(0.0)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = self.weight / torch.sqrt(var + self.eps)
        return x * scale.view(shape) + (self.bias - mean * scale).view(shape)


@dataclass
class ConfiguredModel:
    model: nn.Module
    params: list[nn.Parameter]
    norm_kind: str  # what is adapted, for /v1/status


def configure(source: nn.Module, robust_stats: bool, stats_horizon: int) -> ConfiguredModel:
    """A copy of `source` ready for adaptation; `source` itself is never modified."""
    model = copy.deepcopy(source).eval()  # eval: dropout off; our norm layers ignore the flag
    model.requires_grad_(False)
    replaced = _replace_batchnorms(model, robust_stats, stats_horizon)
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


def _replace_batchnorms(model: nn.Module, robust: bool, horizon: int) -> list[TestTimeBatchNorm]:
    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm):
                layer = TestTimeBatchNorm(child, robust, horizon).to(child.weight.device)
                setattr(parent, name, layer)
                replaced.append(layer)
    return replaced


def set_stats_update(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, TestTimeBatchNorm):
            module.update_stats = enabled
