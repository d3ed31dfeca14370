"""bench/domain_tracking.py's statistics: what they measure is what they claim, and they still fit norm.py's layer
(a change to `TestTimeBatchNorm.add_moments` or `norm.configure` that the research script no longer fits fails here)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from app.adaptation import norm
from bench.domain_tracking import TrackingBatchNorm, tracking_layers
from models.checkpoint import load_checkpoint


def _layer(layer: int, fast_layers: int, shift_horizon: int = 0) -> TrackingBatchNorm:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
    return TrackingBatchNorm(bn, True, 2560, 10, layer, fast_layers, 128, shift_horizon)


def test_a_fast_layer_follows_a_switch_within_its_horizon() -> None:
    layer = _layer(0, fast_layers=1)
    means = torch.full((128, 4), 2.0)  # a new domain: every channel's mean moved from 0 to 2, variance kept at 1
    layer.add_moments(means, means.square() + 1.0, torch.zeros(128, dtype=torch.long))
    reached = 1 - (1 - 1 / 128) ** 128  # 63% of the way after one horizon
    assert torch.allclose(layer.fast_mean, torch.full((4,), 2.0 * reached))
    scale, shift = layer.scale_and_shift()
    assert torch.allclose(-shift / scale, layer.fast_mean, atol=1e-5)  # it normalises with the fast moments
    # the class-balanced rows (what the other layers use) moved only the predicted class's row, and much less
    assert float(layer.class_mean.mean(0).max()) < 0.1


def test_the_shift_carries_a_switch_to_classes_not_seen_since() -> None:
    layer = _layer(5, fast_layers=1, shift_horizon=512)
    means = torch.full((64, 4), 1.0)  # 64 images of class 3 in a new domain
    layer.add_moments(means, means.square() + 1.0, torch.full((64,), 3))
    unseen = layer.class_mean[torch.arange(10) != 3]
    assert torch.allclose(unseen, torch.full_like(unseen, 1 - (1 - 1 / 512) ** 64))
    assert float(layer.class_mean[3, 0]) > float(unseen[0, 0])  # its own row moves further
    without = _layer(5, fast_layers=1)
    without.add_moments(means, means.square() + 1.0, torch.full((64,), 3))
    assert float(without.class_mean[torch.arange(10) != 3].abs().max()) == 0.0


def test_the_variant_builds_into_the_default_model(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(norm, "_replace_batchnorms", tracking_layers(7, 128, 512))
    source, card = load_checkpoint(model_path)
    configured = norm.configure(source, robust_stats=True, stats_horizon=2560, num_classes=card.num_classes)
    layers = [m for m in configured.model.modules() if isinstance(m, TrackingBatchNorm)]
    assert [m.fast for m in layers] == [True] * 7 + [False] * (len(layers) - 7)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad(), norm.recording(configured.model) as moments:
        logits = configured.model(x)
    before = [m.fast_mean.clone() for m in layers[:7]]
    moments.commit(logits.argmax(1))
    assert all(not torch.equal(b, m.fast_mean) for b, m in zip(before, layers[:7], strict=True))
