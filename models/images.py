"""Images from a folder or a zip, decoded, resized and centre-cropped as the server does for a model's card: what
finetuning trains on and calibration measures (uint8, N x 3 x H x W)."""

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import ImageReadMode, decode_image

from app.serving.preprocess import fit  # the server's own resize + centre crop: train on what will be served
from models.card import ModelCard, ModelError
from models.data import ImageSet, list_members


def evenly(count: int, limit: int) -> torch.Tensor:
    """At most `limit` indices spread evenly over `count` items (over every class of a class-sorted archive)."""
    return torch.linspace(0, count - 1, min(count, limit)).round().long().unique()


def _decode(data: bytes, card: ModelCard) -> torch.Tensor:
    image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return fit(image, card.input_size, card.resize)


def read_labelled(path: Path, card: ModelCard) -> ImageSet:
    """`<class>/<image>` under a directory (torchvision's ImageFolder), or a zip with members `[<prefix>/]<class>/
    <image>` (read member by member with zipfile, never unpacked: the CIFAR-10 archives' layout). Every image is
    decoded to RGB and resized and centre-cropped as the server does for this card."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members, labels, class_names = list_members(archive)
            images = [_decode(archive.read(m), card) for m in members]
    elif path.is_dir():
        folder = ImageFolder(str(path), loader=lambda p: _decode(Path(p).read_bytes(), card))
        members = [os.path.relpath(p, path) for p, _ in folder.samples]
        labels, class_names = [label for _, label in folder.samples], folder.classes
        images = [folder.loader(p) for p, _ in folder.samples]
    else:
        raise ModelError(f"{path} is neither a directory of class folders nor a zip of that layout")
    if not images:
        raise ModelError(f"{path} holds no images ({', '.join(IMG_EXTENSIONS)}) in class folders")
    return ImageSet(torch.stack(images), torch.tensor(labels), class_names, members)


def read_unlabelled(path: Path, card: ModelCard, limit: int | None = None) -> torch.Tensor:
    """Every image under a directory (any depth, any folder names: labels are not read) or in a zip; `limit`: at
    most that many, spread evenly over the sorted names (so over every class folder)."""

    def chosen(names: list[Any]) -> list[Any]:
        return names if limit is None else [names[i] for i in evenly(len(names), limit)]

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = sorted(n for n in archive.namelist() if n.lower().endswith(IMG_EXTENSIONS))
            images = [_decode(archive.read(n), card) for n in chosen(names)]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS))
        images = [_decode(p.read_bytes(), card) for p in chosen(files)]
    else:
        raise ModelError(f"{path} is neither a directory of images nor a zip")
    if not images:
        raise ModelError(f"{path} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return torch.stack(images)
