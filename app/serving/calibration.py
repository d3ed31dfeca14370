"""The request timeout's default, scaled to the model: a model whose full batch takes a minute gets minutes.

TTA_REQUEST_TIMEOUT_S defaults to 30 s, which a small model's batch of 64 takes a fraction of a second of; an
ImageNet ResNet-50 takes over a minute for the same batch on two CPU cores, so every full request would be a 504
while the worker keeps computing it. Unless the timeout is set, `tta serve` measures the model at start and raises
the default to FULL_BATCHES times a full batch's expected duration.
"""

import copy
import logging
import time

import torch
from torch import nn

from app.adaptation.engine import AdaptationEngine
from app.config import Settings
from app.main import resolve_device
from models.card import ModelCard

log = logging.getLogger("tta")

# Four: the admission budget, never under two full batches (app/serving/batcher.py), then covers a full request
# queued behind a full batch being computed, and that request still has as long again before its 504.
FULL_BATCHES = 4
PROBE_IMAGES = 8
MAX_TIMEOUT_S = 3600.0  # the setting's own upper bound


def batch_seconds(model: nn.Module, card: ModelCard, settings: Settings) -> float:
    """Seconds one full batch (max_batch_size images) of the configured method is expected to take.

    Measured by one step of a throwaway engine with every guard off (so the step is always taken) on PROBE_IMAGES
    random images, scaled linearly: larger batches cost less per image, so this errs on the long side. The served
    model is not touched."""
    probe = min(PROBE_IMAGES, settings.max_batch_size)
    device = resolve_device(settings.device)
    engine = AdaptationEngine(copy.deepcopy(model), card.num_classes, settings.without_guards(), device)
    images = torch.randn(probe, 3, card.input_size, card.input_size)
    start = time.perf_counter()
    engine.step(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * settings.max_batch_size / probe


def scaled_timeout(settings: Settings, model: nn.Module, card: ModelCard) -> Settings:
    """The settings, with request_timeout_s raised to FULL_BATCHES full batches when it was not set and is shorter."""
    if "request_timeout_s" in settings.model_fields_set:
        return settings
    seconds = batch_seconds(model, card, settings)
    timeout = min(MAX_TIMEOUT_S, FULL_BATCHES * seconds)
    if timeout <= settings.request_timeout_s:
        return settings
    log.warning(
        "request timeout %.0f s instead of %.0f s: %d x the %.1f s a batch of %d images is expected to take "
        "(set TTA_REQUEST_TIMEOUT_S to choose)",
        timeout,
        settings.request_timeout_s,
        FULL_BATCHES,
        seconds,
        settings.max_batch_size,
    )
    return settings.model_copy(update={"request_timeout_s": timeout})
