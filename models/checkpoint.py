"""Checkpoint I/O: our format (`<name>.safetensors` + model card `<name>.json`) and foreign files.

Foreign files are PyTorch pickles (a bare state_dict, or one nested under "state_dict"/"model",
keys possibly prefixed "module." by DataParallel) and TorchScript archives. Every load is strict:
a key or shape mismatch is an error that names the keys, never a silent partial load.
"""

import zipfile
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from torch import nn

from models.registry import build_model


class ModelCard(BaseModel):
    architecture: str
    num_classes: int = Field(gt=0)
    class_names: list[str]
    input_size: int = Field(gt=0, description="square side in pixels the model expects")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    provenance: dict[str, Any] = Field(default_factory=dict, description="data, recipe, command, metrics")

    def model_post_init(self, __context: Any) -> None:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"card lists {len(self.class_names)} class names for {self.num_classes} classes")


class CheckpointMismatchError(ValueError):
    """The weights do not fit the architecture; the message names the offending keys."""


def card_path(weights_path: Path) -> Path:
    return weights_path.with_suffix(".json")


def save_checkpoint(model: nn.Module, card: ModelCard, weights_path: Path) -> None:
    weights_path = Path(weights_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path), metadata={"architecture": card.architecture})
    card_path(weights_path).write_text(card.model_dump_json(indent=2) + "\n")


def load_checkpoint(weights_path: Path | str) -> tuple[nn.Module, ModelCard]:
    """Our format: build the card's architecture and load the safetensors weights strictly."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint {weights_path} does not exist")
    if not card_path(weights_path).is_file():
        raise FileNotFoundError(f"model card {card_path(weights_path)} is missing beside {weights_path}")
    card = ModelCard.model_validate_json(card_path(weights_path).read_text())
    model = build_model(card.architecture, card.num_classes)
    load_state_dict_strict(model, load_file(str(weights_path)))
    return model.eval(), card


def read_foreign_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch pickle or TorchScript archive, unwrapped and un-prefixed."""
    path = Path(path)
    if _is_torchscript(path):
        state: Any = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{path} holds no state_dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    # checkpoints from PyTorch < 0.4.1 predate BatchNorm's num_batches_tracked; keep the model's own
    state = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        parts = [
            f"{label}: {', '.join(_first(keys))}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", wrong_shape),
            )
            if keys
        ]
        raise CheckpointMismatchError(f"checkpoint does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _first(keys: list[str], limit: int = 12) -> list[str]:
    return keys[:limit] + ([f"... {len(keys) - limit} more"] if len(keys) > limit else [])


def load_foreign_checkpoint(path: Path | str, architecture: str, num_classes: int) -> nn.Module:
    model = build_model(architecture, num_classes)
    load_state_dict_strict(model, read_foreign_state_dict(path))
    return model.eval()
