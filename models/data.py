"""CIFAR-10 JPEG archives (`<split>/<class>/NNNN.jpg`, stored uncompressed), read without unpacking."""

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image

# The project's shared folder (data sets, pretrained weights) lies beside the clone; TTA_SHARED_DIR moves it, e.g.
# to a non-existent path to check that the suite passes on a fresh clone without it (.ci/run does).
SHARED_DIR = Path(os.environ.get("TTA_SHARED_DIR") or Path(__file__).resolve().parent.parent.parent / "shared")
SHARED_DATA = SHARED_DIR / "data" / "cifar10-jpeg"


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8, N x 3 x H x W
    labels: torch.Tensor  # int64, N
    class_names: list[str]
    members: list[str]  # archive member of each image, for provenance and debugging

    def __len__(self) -> int:
        return len(self.labels)


def list_members(archive: zipfile.ZipFile) -> tuple[list[str], list[int], list[str]]:
    """Image members, their class indices, and the class names in sorted (CIFAR) order."""
    members = sorted(n for n in archive.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png")))
    class_names = sorted({m.split("/")[-2] for m in members})
    index = {name: i for i, name in enumerate(class_names)}
    return members, [index[m.split("/")[-2]] for m in members], class_names


def load_zip(path: Path | str, limit_per_class: int | None = None) -> ImageSet:
    """Decode every image of the archive (or the first `limit_per_class` of each class)."""
    with zipfile.ZipFile(path) as archive:
        members, labels, class_names = list_members(archive)
        if limit_per_class is not None:
            seen = [0] * len(class_names)
            keep = []
            for i, label in enumerate(labels):
                if seen[label] < limit_per_class:
                    seen[label] += 1
                    keep.append(i)
            members, labels = [members[i] for i in keep], [labels[i] for i in keep]
        images = torch.stack(
            [
                decode_image(
                    torch.frombuffer(bytearray(archive.read(m)), dtype=torch.uint8),
                    mode=ImageReadMode.RGB,
                )
                for m in members
            ]
        )
    return ImageSet(images, torch.tensor(labels), class_names, members)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float, normalised per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def augment(images: torch.Tensor, generator: np.random.Generator, padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a uint8 batch: random crop with zero padding, horizontal flip."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = generator.integers(0, 2 * padding + 1, n)
    dx = generator.integers(0, 2 * padding + 1, n)
    rows = torch.as_tensor(dy)[:, None] + torch.arange(h)[None, :]  # N x H
    cols = torch.as_tensor(dx)[:, None] + torch.arange(w)[None, :]  # N x W
    flip = torch.as_tensor(generator.random(n) < 0.5)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_index = torch.arange(n)[:, None, None]
    # gather the crop for every image at once: N x H x W x C -> N x C x H x W
    crops = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()
