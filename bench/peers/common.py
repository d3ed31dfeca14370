"""What every peer shares with the TTA server: the checkpoint, and bytes -> normalised tensor preprocessing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torch import nn
from torchvision.io import ImageReadMode, decode_image

from models.checkpoint import ModelCard, load_checkpoint


@dataclass
class LoadedModel:
    model: nn.Module
    card: ModelCard
    mean: torch.Tensor  # 1 x 3 x 1 x 1
    std: torch.Tensor


def load(path: Path | str) -> LoadedModel:
    """The checkpoint in eval mode, gradients off, torch threads from PEER_TORCH_THREADS when set."""
    threads = os.environ.get("PEER_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    model, card = load_checkpoint(path)
    model.eval().requires_grad_(False)
    mean = torch.tensor(card.mean).view(1, -1, 1, 1)
    std = torch.tensor(card.std).view(1, -1, 1, 1)
    return LoadedModel(model, card, mean, std)


def decode(data: bytes, size: int) -> torch.Tensor:
    """Encoded image -> uint8 3 x S x S: torchvision decode_image, shorter side to S, centre crop (as ours)."""
    image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if image.shape[-2:] != (size, size):
        image = TF.center_crop(TF.resize(image, [size], antialias=True), [size, size])
    return image


def normalise(images: torch.Tensor, loaded: LoadedModel) -> torch.Tensor:
    """uint8 N x 3 x S x S -> float, normalised with the card's mean and std."""
    return (images.float() / 255.0 - loaded.mean) / loaded.std


def predictions(logits: torch.Tensor, class_names: list[str]) -> list[dict]:
    """One {class_index, class_name, confidence} per row."""
    confidence, index = logits.float().softmax(1).max(1)
    return [
        {"class_index": i, "class_name": class_names[i], "confidence": c}
        for i, c in zip(index.tolist(), confidence.tolist(), strict=True)
    ]
