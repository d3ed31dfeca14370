"""Import a foreign checkpoint: build its architecture, load the weights strictly, check a forward pass, write a card.

`tta import` writes the result in our format (safetensors + card); `tta serve --model FILE --arch ...` does the same
in memory at start. Class names for CIFAR-10 and ImageNet come with the code (torchvision's weight metadata for
ImageNet), never from the network.
"""

import hashlib
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn
from torchvision.models import ResNet50_Weights

from models.card import ForeignModel, ModelCard, ModelError, file_format, one_line
from models.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    load_state_dict_strict,
    read_foreign_state_dict,
    state_dict_problems,
)
from models.registry import build_model, closest_architectures

# The order of the CIFAR-10 archive's batches.meta label_names (torchvision reads them from the download).
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_names(spec: str) -> list[str]:
    """`--classes`: a count (names "0".."N-1"), cifar10, imagenet, or a file with one name per line."""
    if spec == "cifar10":
        return list(CIFAR10_CLASSES)
    if spec == "imagenet":
        return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    if spec.isdigit():
        if int(spec) < 1:
            raise ModelError("--classes must be at least 1")
        return [str(i) for i in range(int(spec))]
    path = Path(spec)
    if not path.is_file():
        raise ModelError(f"--classes {spec!r} is neither a count, cifar10, imagenet nor a file of class names")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ModelError(f"class name file {path} lists no names")
    return names


def open_model(path: Path, foreign: ForeignModel) -> tuple[nn.Module, ModelCard]:
    """What `tta serve` serves: our checkpoint beside its card, or (`foreign.arch` set) a foreign file imported in
    memory."""
    if foreign.arch is None:
        return load_checkpoint(path)
    return import_checkpoint(path, foreign)


def import_checkpoint(path: Path, foreign: ForeignModel) -> tuple[nn.Module, ModelCard]:
    """The model and card of a foreign checkpoint, checked by a forward pass; ModelError says what does not fit."""
    card = make_card(path, foreign)
    state = read_foreign_state_dict(path)
    model = _build(card)
    if problems := state_dict_problems(model.state_dict(), state):
        raise CheckpointMismatchError(
            f"{path} does not fit {card.architecture} with {card.num_classes} classes: {problems}"
            + _suggestion(card, state)
        )
    load_state_dict_strict(model, state)
    check_forward(model.eval(), card)
    return model, card


def make_card(path: Path, foreign: ForeignModel) -> ModelCard:
    for flag, value in (("--arch", foreign.arch), ("--classes", foreign.classes), ("--input-size", foreign.input_size)):
        if value is None:
            raise ModelError(f"importing {path} needs {flag} (tta import --help)")
    names = class_names(foreign.classes)
    try:
        return ModelCard(
            architecture=foreign.arch,
            architecture_kwargs=foreign.arch_kwargs,
            num_classes=len(names),
            class_names=names,
            input_size=foreign.input_size,
            resize=foreign.resize,
            mean=foreign.mean,
            std=foreign.std,
            provenance={"imported_from": path.name, "format": file_format(path), "sha256": _sha256(path)},
        )
    except ValidationError as error:
        raise ModelError(f"cannot import {path}: {one_line(error)}") from None


def _build(card: ModelCard) -> nn.Module:
    try:
        return build_model(card.architecture, card.num_classes, card.architecture_kwargs)
    except TypeError as error:  # a keyword the constructor does not take
        raise ModelError(f"cannot build {card.architecture} with {card.architecture_kwargs}: {error}") from None


def _suggestion(card: ModelCard, state: dict[str, torch.Tensor]) -> str:
    """The registry entries close to the name given whose layout does fit the weights, or else the close names."""
    close = [name for name in closest_architectures(card.architecture, 6) if name != card.architecture]
    fitting = [name for name in close if not state_dict_problems(_layout(name, card.num_classes), state)]
    if fitting:
        return f". These registry entries fit the weights: {', '.join(fitting)}"
    return f". The closest registry entries: {', '.join(close)}" if close else ""


def _layout(architecture: str, num_classes: int) -> dict[str, torch.Tensor]:
    """The architecture's state_dict with shapes only (on the meta device: no memory, no initialisation cost)."""
    try:
        with torch.device("meta"):
            return build_model(architecture, num_classes).state_dict()
    except NotImplementedError:  # RegNets read tensor values while they are built
        return build_model(architecture, num_classes).state_dict()


def check_forward(model: nn.Module, card: ModelCard) -> None:
    """A forward pass on two random images of the card's input size gives finite logits, one per class."""
    x = torch.randn(2, 3, card.input_size, card.input_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            out = model(x)
    except Exception as error:  # any failure of the user's network is the import's answer, not a crash
        raise ModelError(
            f"a forward pass of {card.architecture} on a 2 x 3 x {card.input_size} x {card.input_size} batch failed: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, card.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"{card.architecture} answers a batch of 2 with {shape}, not logits of shape (2, {card.num_classes})"
        )
    if not torch.isfinite(out).all():
        raise ModelError(f"{card.architecture} gives non-finite logits on random inputs: the weights are broken")


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
