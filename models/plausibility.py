"""The plausibility guard's scale for a model: how far its own source images are from its source statistics.

The guard (app/adaptation/guards.py, `Plausible`) keeps an image out of the statistics and the entropy step when its
features are far from the source's: noise is not a domain to adapt to. Far is not the same number on every
architecture: the distance averages every BatchNorm channel's (image mean - source mean)^2 / source variance, and
where a stage is 1x1 (torchvision's resnet18 at 32x32) an image's channel mean is a single activation whose spread
is the whole variance, so clean images lie at 0.29 (median) there and at 0.115 on the CIFAR ResNet-20
(docs/BENCHMARKS.md, "Another architecture"). The card therefore records the distance's 99th percentile over
`SOURCE_IMAGES` of the model's own source images, and the guard's threshold is TTA_PLAUSIBLE_DISTANCE times it.
"""

from pathlib import Path

import torch
from torch import nn

from app.adaptation.norm import source_distances
from models.card import SOURCE_IMAGES, ModelCard, ModelError, SourceDistance
from models.checkpoint import load_checkpoint, write_card
from models.data import normalize
from models.images import evenly, read_unlabelled

FEWEST_IMAGES = 100  # a 99th percentile of fewer is one image's distance
BATCH = 250


def measure(model: nn.Module, card: ModelCard, images: torch.Tensor, data: str) -> SourceDistance:
    """The source distances of `images` (uint8, N x 3 x H x W, as the server feeds the model; at most SOURCE_IMAGES of
    them, spread evenly) under `model`."""
    images = images[evenly(len(images), SOURCE_IMAGES)]
    if len(images) < FEWEST_IMAGES:
        raise ModelError(f"{len(images)} source images are too few to calibrate on; give at least {FEWEST_IMAGES}")
    batches = (normalize(images[i : i + BATCH], card.mean, card.std) for i in range(0, len(images), BATCH))
    try:
        distances = source_distances(model.eval(), batches).double()
    except ValueError as error:
        raise ModelError(str(error)) from error
    q99, median = (float(torch.quantile(distances, q)) for q in (0.99, 0.5))
    return SourceDistance(q99=q99, median=median, images=len(distances), data=data)


def calibrate_checkpoint(weights_path: Path, images: Path) -> SourceDistance:
    """`tta calibrate`: measure our checkpoint on source images (a folder or a zip) and write it into its card."""
    model, card = load_checkpoint(weights_path)
    measured = measure(model, card, read_unlabelled(images, card, SOURCE_IMAGES), images.name)
    write_card(card.model_copy(update={"source_distance": measured}), weights_path)
    return measured
