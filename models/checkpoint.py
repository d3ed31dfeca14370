"""Checkpoint I/O: our format (`<name>.safetensors` + model card `<name>.json`) and foreign files.

Foreign files are PyTorch pickles (a bare state_dict, or one nested under "state_dict"/"model",
keys possibly prefixed "module." by DataParallel), TorchScript archives and safetensors files without a card.
Every load is strict: a key or shape mismatch is an error that names the keys, never a silent partial load.
"""

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.card import FORMAT_NAMES, ModelCard, ModelError, card_path, file_format, read_card
from models.registry import build_model

__all__ = [
    "CheckpointMismatchError",
    "ModelCard",
    "card_path",
    "load_checkpoint",
    "load_foreign_checkpoint",
    "load_state_dict_strict",
    "read_foreign_state_dict",
    "save_checkpoint",
    "write_card",
]

# rw-r--r--: a checkpoint mounted into a container is read by the container's user, not the file's owner.
CHECKPOINT_MODE = 0o644


class CheckpointMismatchError(ModelError):
    """The weights do not fit the architecture; the message names the offending keys."""


def save_checkpoint(model: nn.Module, card: ModelCard, weights_path: Path) -> None:
    weights_path = Path(weights_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path), metadata={"architecture": card.architecture})
    os.chmod(weights_path, CHECKPOINT_MODE)  # whatever the umask: both files are meant to be read by other users
    write_card(card, weights_path)


def write_card(card: ModelCard, weights_path: Path) -> None:
    """The card beside its checkpoint (a changed card alone: `tta calibrate`)."""
    card_path(weights_path).write_text(card.model_dump_json(indent=2, exclude_defaults=True) + "\n")
    os.chmod(card_path(weights_path), CHECKPOINT_MODE)


def load_checkpoint(weights_path: Path | str) -> tuple[nn.Module, ModelCard]:
    """Our format: build the card's architecture and load the safetensors weights strictly."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint {weights_path} does not exist")
    if not card_path(weights_path).is_file():
        raise FileNotFoundError(f"model card {card_path(weights_path)} is missing beside {weights_path}")
    card = read_card(card_path(weights_path))
    model = build_model(card.architecture, card.num_classes, card.architecture_kwargs)
    load_state_dict_strict(model, _load_safetensors(weights_path))
    return model.eval(), card


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except SafetensorError as error:
        kind = file_format(path)
        what = FORMAT_NAMES[kind] if kind != "safetensors" else "a damaged safetensors file"
        raise ModelError(f"{path} is {what} ({error}); a foreign file needs tta import") from None


def read_foreign_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch pickle, TorchScript archive or safetensors file, unwrapped and un-prefixed."""
    path = Path(path)
    kind = file_format(path)
    if kind == "safetensors":
        state: Any = _load_safetensors(path)
    elif kind == "torchscript":
        with warnings.catch_warnings():  # deprecated for new models; reading one is what was asked for
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = _torch_load(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{path} holds no state_dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def _torch_load(path: Path) -> Any:
    # weights_only: a checkpoint from elsewhere must not run code when it is read.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelError(
            f"{path} is not a plain state_dict (torch.load with weights_only refused it: "
            f"{str(error).splitlines()[0]}); save model.state_dict() or a TorchScript archive instead"
        ) from None
    except (RuntimeError, EOFError) as error:
        raise ModelError(f"{path} is not a PyTorch checkpoint torch.load can read: {error}") from None


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    problems = state_dict_problems(model.state_dict(), state)
    if problems:
        raise CheckpointMismatchError(f"checkpoint does not match {type(model).__name__}: {problems}")
    expected = model.state_dict()
    model.load_state_dict({**_batch_counters(expected), **state}, strict=True)


def state_dict_problems(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """The missing, unexpected and mis-shaped keys of `state` against a model's `expected` state_dict; '' if none."""
    state = {**_batch_counters(expected), **state}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape))
    return "; ".join(f"{label}: {', '.join(_first(keys))}" for label, keys in found if keys)


def _batch_counters(expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # checkpoints from PyTorch < 0.4.1 predate BatchNorm's num_batches_tracked; keep the model's own
    return {k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}


def _first(keys: list[str], limit: int = 12) -> list[str]:
    return keys[:limit] + ([f"... {len(keys) - limit} more"] if len(keys) > limit else [])


def load_foreign_checkpoint(path: Path | str, architecture: str, num_classes: int) -> nn.Module:
    model = build_model(architecture, num_classes)
    load_state_dict_strict(model, read_foreign_state_dict(path))
    return model.eval()
