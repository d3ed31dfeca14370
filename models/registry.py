"""Build a model from an architecture name; never downloads weights."""

from collections.abc import Callable
from functools import partial

import torchvision
from torch import nn

from models.cifar_resnet import CifarResNet

CIFAR_DEPTHS = (20, 26, 32, 44, 56)

# "resnet20_cifar" uses 1x1 projection shortcuts; "resnet20_cifar_a" the parameter-free
# zero-padding ones (the layout of the akamaster checkpoints).
_CIFAR_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}_cifar": partial(CifarResNet, depth=d, shortcut="B") for d in CIFAR_DEPTHS},
    **{f"resnet{d}_cifar_a": partial(CifarResNet, depth=d, shortcut="A") for d in CIFAR_DEPTHS},
}


def torchvision_architectures() -> list[str]:
    """Every torchvision image-classification model (not detection, segmentation, video...)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_architectures() -> list[str]:
    return sorted(_CIFAR_BUILDERS) + torchvision_architectures()


def build_model(architecture: str, num_classes: int) -> nn.Module:
    """A freshly initialised model; weights come from a checkpoint, never from the network."""
    if architecture in _CIFAR_BUILDERS:
        return _CIFAR_BUILDERS[architecture](num_classes=num_classes)
    if architecture in torchvision_architectures():
        return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
    raise ValueError(
        f"unknown architecture {architecture!r}; known: the project's {sorted(_CIFAR_BUILDERS)} "
        "and every torchvision classification model (torchvision.models.list_models())"
    )
