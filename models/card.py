"""The model card (`<name>.json` beside `<name>.safetensors`) and the description of a foreign checkpoint to import.

Nothing here imports torch: `tta serve` checks the model file and its card with this module before the slow imports,
so that a wrong path or a broken card is a one-line error within a second instead of a traceback after a minute.
"""

import json
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# torchvision's ImageNet normalisation, which most published checkpoints (the third-party CIFAR ResNets too) use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FileFormat = Literal["safetensors", "torchscript", "pytorch", "unknown"]


class ModelError(ValueError):
    """A model file, card or import the server refuses; the message is one line, meant for the user as it is."""


SOURCE_IMAGES = 2000  # source images the plausibility guard's scale is measured on (EATA's count for its Fisher)


class SourceDistance(BaseModel):
    """How far the model's own source images are from its source statistics, in the plausibility guard's measure
    (app/adaptation/norm.py, `BatchMoments.source_distance`): its threshold is TTA_PLAUSIBLE_DISTANCE times `q99`.
    Measured by `tta calibrate` (and by training and finetuning, on their training images)."""

    model_config = ConfigDict(extra="forbid")

    q99: float = Field(gt=0, description="the 99th percentile of the source distance over the images measured")
    median: float = Field(gt=0, description="its median")
    images: int = Field(gt=0, description="how many source images were measured")
    data: str = Field(description="where they came from")


class ModelCard(BaseModel):
    """What the server needs besides the weights: how to build the network, its classes and its preprocessing."""

    # forbid: a misspelt field ("input_sise") is an error naming it, not a silently ignored line.
    model_config = ConfigDict(extra="forbid", title="TTA model card")

    architecture: str = Field(
        description="a name of models.registry.list_architectures() (the project's CIFAR ResNets, every torchvision "
        "classifier) or the import path package.module:Class of an nn.Module"
    )
    architecture_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments the architecture is built with, besides num_classes"
    )
    num_classes: int = Field(gt=0, description="outputs of the classifier")
    class_names: list[str] = Field(description="one name per class, in the order of the classifier's outputs")
    input_size: int = Field(gt=0, description="side in pixels of the square the model sees: the centre crop")
    resize: int | None = Field(
        None,
        gt=0,
        description="side in pixels the shorter side of an image is resized to before the centre crop (e.g. 256 for "
        "a 224 crop); absent: input_size, so only the longer side is cropped",
    )
    mean: tuple[float, float, float] = Field(description="per-channel (RGB) mean of the inputs scaled to [0, 1]")
    std: tuple[float, float, float] = Field(description="per-channel (RGB) standard deviation, after the mean")
    provenance: dict[str, Any] = Field(
        default_factory=dict, description="free-form: where the weights come from (data, recipe, command, metrics)"
    )
    source_distance: SourceDistance | None = Field(
        None,
        description="the plausibility guard's scale for these weights (`tta calibrate`); absent: the guard admits "
        "every image",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "ModelCard":
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"card lists {len(self.class_names)} class names for {self.num_classes} classes")
        if self.resize is not None and self.resize < self.input_size:
            raise ValueError(f"resize {self.resize} is smaller than the input size {self.input_size} it is cropped to")
        if min(self.std) <= 0:
            raise ValueError(f"std {self.std} must be positive in every channel")
        return self

    def source_distance_q99(self) -> float | None:
        return None if self.source_distance is None else self.source_distance.q99

    def resize_side(self) -> int:
        return self.resize or self.input_size


class ForeignModel(BaseModel):
    """How to turn a foreign checkpoint into a model and its card: the flags of `tta import`, and the settings with
    which `tta serve` imports a foreign TTA_MODEL at start (TTA_ARCH etc.; TTA_ARCH unset: TTA_MODEL is our format)."""

    arch: str | None = Field(
        None,
        description="architecture of a foreign checkpoint: a registry name (resnet20_cifar_a, resnet50, ...) or "
        "package.module:Class",
    )
    arch_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="JSON keyword arguments for the architecture, besides num_classes"
    )
    classes: str | None = Field(
        None, description="class names: a count N, a file of names (one per line), cifar10 or imagenet"
    )
    input_size: int | None = Field(None, gt=0, description="side in pixels of the centre crop the model sees")
    resize: int | None = Field(
        None, gt=0, description="side the shorter side is resized to before the crop; unset: the input size"
    )
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="per-channel input mean, as 0.5,0.5,0.5")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="per-channel input std, as 0.25,0.25,0.25")

    @field_validator("arch", "classes", "input_size", "resize", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # docker compose passes `TTA_ARCH: ${TTA_ARCH:-}` as an empty variable when TTA_ARCH is not set
        return None if value == "" else value


def card_path(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def card_schema() -> dict[str, Any]:
    return ModelCard.model_json_schema()


def field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "card"


def one_line(error: ValidationError, label: Callable[[tuple[int | str, ...]], str] = field_path) -> str:
    """A pydantic error as `field: why; field: why`, without its input echo and documentation links."""
    return "; ".join(f"{label(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors())


def read_card(path: Path) -> ModelCard:
    """The card at `path`, or a ModelError naming what is wrong with it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ModelError(f"model card {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelError(f"cannot read model card {path}: {error}") from None
    try:
        return ModelCard.model_validate(json.loads(text))
    except json.JSONDecodeError as error:
        raise ModelError(f"model card {path} is not JSON: {error}") from None
    except ValidationError as error:
        raise ModelError(f"model card {path} is invalid: {one_line(error)}") from None


def file_format(path: Path) -> FileFormat:
    """What a checkpoint file is, from its first bytes: safetensors, a TorchScript archive or a PyTorch pickle."""
    if zipfile.is_zipfile(path):  # torch.save's format since PyTorch 1.6, and torch.jit.save's
        with zipfile.ZipFile(path) as archive:
            return "torchscript" if any("/code/" in name for name in archive.namelist()) else "pytorch"
    with path.open("rb") as file:
        head = file.read(9)
    if head[:1] == pickle.PROTO:  # torch.save's legacy format: a bare pickle
        return "pytorch"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100 * 2**20:
        return "safetensors"  # a little-endian header length, then the JSON header
    return "unknown"


FORMAT_NAMES = {
    "torchscript": "a TorchScript archive",
    "pytorch": "a PyTorch checkpoint (torch.save)",
    "unknown": "no checkpoint format this server knows",
}


def check_model_file(path: Path, imported: bool) -> None:
    """Before torch is imported: the file is readable and, when it is served as our format, is safetensors with a
    valid card beside it. Raises ModelError with a message for the user (two lines at most: what, then how)."""
    try:
        kind = file_format(path)
    except OSError as error:
        raise ModelError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    if imported:
        if kind == "unknown":
            raise ModelError(f"{path} is {FORMAT_NAMES[kind]} (safetensors, PyTorch, TorchScript)")
        return
    how = (
        f"import it first (tta import {path} --arch NAME --classes N|FILE|cifar10|imagenet --input-size S "
        "--out DIR/NAME.safetensors), or give tta serve the same flags to import it at start"
    )
    if kind != "safetensors":
        raise ModelError(f"{path} is {FORMAT_NAMES[kind]}, not a checkpoint of this server's format\n{how}")
    if not card_path(path).is_file():
        raise ModelError(f"model card {card_path(path)} is missing beside {path}\n{how}")
    read_card(card_path(path))
