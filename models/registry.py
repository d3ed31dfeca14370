"""Build a model from an architecture name or an import path; never downloads weights."""

import difflib
import importlib
import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import torchvision
from torch import nn

from models.card import ModelError
from models.cifar_resnet import CifarResNet

CIFAR_DEPTHS = (20, 26, 32, 44, 56)

# "resnet20_cifar" uses 1x1 projection shortcuts; "resnet20_cifar_a" the parameter-free
# zero-padding ones (the layout of the akamaster checkpoints).
_CIFAR_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}_cifar": partial(CifarResNet, depth=d, shortcut="B") for d in CIFAR_DEPTHS},
    **{f"resnet{d}_cifar_a": partial(CifarResNet, depth=d, shortcut="A") for d in CIFAR_DEPTHS},
}


class UnknownArchitectureError(ModelError):
    """Neither a registry name nor an importable nn.Module class; the message names the closest registry entries."""


def torchvision_architectures() -> list[str]:
    """Every torchvision image-classification model (not detection, segmentation, video...)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_architectures() -> list[str]:
    return sorted(_CIFAR_BUILDERS) + torchvision_architectures()


def closest_architectures(architecture: str, count: int = 4) -> list[str]:
    return difflib.get_close_matches(architecture, list_architectures(), n=count, cutoff=0.6)


def build_model(architecture: str, num_classes: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialised model; weights come from a checkpoint, never from the network.

    `architecture` is a registry name or `package.module:Class`; `kwargs` go to the constructor besides num_classes
    (which a class of one's own receives only when its constructor takes it)."""
    kwargs = kwargs or {}
    if architecture in _CIFAR_BUILDERS:
        return _CIFAR_BUILDERS[architecture](num_classes=num_classes, **kwargs)
    if architecture in torchvision_architectures():
        return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes, **kwargs)
    if ":" in architecture:
        cls = _import_class(architecture)
        if "num_classes" in inspect.signature(cls).parameters and "num_classes" not in kwargs:
            kwargs = {**kwargs, "num_classes": num_classes}
        return cls(**kwargs)
    close = closest_architectures(architecture)
    raise UnknownArchitectureError(
        f"unknown architecture {architecture!r}"
        + (f"; the closest registry entries: {', '.join(close)}" if close else "")
        + "; known: the project's CIFAR ResNets (resnet20_cifar, resnet20_cifar_a, ...), every torchvision "
        "classification model, or package.module:Class"
    )


def _import_class(path: str) -> type[nn.Module]:
    module_name, _, name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise UnknownArchitectureError(f"cannot import architecture {path!r}: {error}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UnknownArchitectureError(f"architecture {path!r} is not an nn.Module class")
    return cls
