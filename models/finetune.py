"""Finetune a checkpoint on labelled images: the recipe, the training loop, the checkpoints (readers: models/images.py).

`tta finetune` (app/finetune_cli.py) is a front end to `finetune()`; other code (bench/selection_bias.py, the
transferability experiment) calls it with a `Recipe` of its own:

    model, card = open_model(path, ForeignModel())
    data = read_labelled(Path("images/"), card)  # models.images
    train, val = split(data, 0.1, seed=0)
    card = finetune(model, card, train, val, Recipe(epochs=3, freeze_stages=1), Path("out/model.safetensors"))

The model is trained in place. After every epoch the servable checkpoint (`out` + its card, whose provenance says
how many epochs are done) and the state to resume from (`<out>.partial.pt`: weights, optimiser, schedule, random
state, history) are written, each atomically; `resume=True` continues from the latter. New weights have new
BatchNorm statistics, so the plausibility guard's scale is measured again on the training images once the last epoch
is done (models/plausibility.py); the cards of the epochs before have none.
"""

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.card import ModelCard, ModelError
from models.checkpoint import load_checkpoint, save_checkpoint, state_dict_problems, write_card
from models.data import ImageSet, augment, normalize
from models.evaluate import accuracy
from models.plausibility import FEWEST_IMAGES, measure
from models.recipe import Recipe
from models.registry import build_model

__all__ = ["Recipe", "finetune", "split", "stages", "subset"]


# ---------------------------------------------------------------------------------------------------------------
# The model's parts: head, stages, frozen parameters
# ---------------------------------------------------------------------------------------------------------------


def head_name(model: nn.Module) -> str:
    """The qualified name of the classifier head: the last nn.Linear in module order."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no nn.Linear head to finetune")
    return names[-1]


def head_of(model: nn.Module) -> nn.Linear:
    return model.get_submodule(head_name(model))


def reinit_head(model: nn.Module, num_classes: int | None = None) -> None:
    """Head weights N(0, 0.02), bias 0; a new nn.Linear when `num_classes` differs from the head's outputs."""
    name = head_name(model)
    head = model.get_submodule(name)
    if num_classes is not None and num_classes != head.out_features:
        parent, _, attribute = name.rpartition(".")
        head = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
        setattr(model.get_submodule(parent) if parent else model, attribute, head)
    nn.init.normal_(head.weight, std=0.02)
    if head.bias is not None:
        nn.init.zeros_(head.bias)


def stages(model: nn.Module) -> list[list[str]]:
    """The model's stages, as lists of top-level module names, in order, the head's module excluded: each top-level
    container (nn.Sequential, a block group like layer1) is one stage, and consecutive single layers between them
    (a stem's conv1, bn1) are one stage together. resnet20_cifar_a: [conv1, bn1], [layer1], [layer2], [layer3]."""
    head_top = head_name(model).split(".")[0]
    found: list[list[str]] = []
    run: list[str] = []
    for name, child in model.named_children():
        if name == head_top or not any(True for _ in child.parameters()):
            continue
        if len(list(child.children())) == 0:  # a single layer: part of a run (the stem)
            run.append(name)
            continue
        if run:
            found.append(run)
            run = []
        found.append([name])
    if run:
        found.append(run)
    return found


def frozen_prefixes(model: nn.Module, recipe: Recipe) -> list[str]:
    """The parameter-name prefixes the recipe keeps fixed: its first freeze_stages stages and its freeze list."""
    available = stages(model)
    if recipe.freeze_stages > len(available):
        raise ModelError(
            f"--freeze-stages {recipe.freeze_stages}: {type(model).__name__} has {len(available)} stages "
            f"({'; '.join(','.join(s) for s in available)})"
        )
    prefixes = [name for stage in available[: recipe.freeze_stages] for name in stage] + list(recipe.freeze)
    names = [name for name, _ in model.named_parameters()]
    for prefix in recipe.freeze:
        if not any(_under(name, prefix) for name in names):
            raise ModelError(f"--freeze {prefix}: no parameter of {type(model).__name__} is named so")
    if any(_under(name, prefix) for name in _head_parameters(model) for prefix in prefixes):
        raise ModelError("the recipe freezes the head: nothing would be learnt")
    return prefixes


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def _head_parameters(model: nn.Module) -> list[str]:
    return [f"{head_name(model)}.{name}" for name, _ in head_of(model).named_parameters()]


# ---------------------------------------------------------------------------------------------------------------
# Data: an ImageFolder directory or a zip of that layout, read into memory at the card's input size
# ---------------------------------------------------------------------------------------------------------------


def split(data: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A random (seeded) split into training and validation images."""
    if not 0 < val_fraction < 1:
        raise ModelError(f"the validation fraction {val_fraction} must lie strictly between 0 and 1")
    order = np.random.default_rng([seed, 1]).permutation(len(data))
    cut = max(1, round(val_fraction * len(data)))
    if cut >= len(data):
        raise ModelError(f"{len(data)} images are too few to keep {val_fraction:.0%} for validation")
    return subset(data, order[cut:]), subset(data, order[:cut])


def subset(data: ImageSet, index: np.ndarray) -> ImageSet:
    picked = torch.as_tensor(index)
    return ImageSet(data.images[picked], data.labels[picked], data.class_names, [data.members[i] for i in index])


def with_model_classes(data: ImageSet, card: ModelCard, reinit: bool) -> ImageSet:
    """The data's labels as indices of the model's outputs: its classes may be some of the model's, in any order (a
    capture's labelled/ folder holds the classes labelled so far). Classes the model does not have need a new head."""
    if data.class_names == card.class_names or reinit:
        return data
    if set(data.class_names) <= set(card.class_names):
        order = torch.tensor([card.class_names.index(name) for name in data.class_names])
        return ImageSet(data.images, order[data.labels], list(card.class_names), data.members)
    raise ModelError(
        f"the data's classes ({', '.join(data.class_names)}) are not the model's ({', '.join(card.class_names)}): "
        "pass --reinit-head to train a new head for them, or import the model with the right --classes"
    )


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def prepare(model: nn.Module, card: ModelCard, data_classes: list[str], recipe: Recipe) -> ModelCard:
    """Re-initialise (or replace) the head as the recipe says; the card of the model that is then trained."""
    if recipe.reinit_head:
        reinit_head(model, len(data_classes))
    classes = list(data_classes) if recipe.reinit_head else list(card.class_names)
    layout = build_model(card.architecture, len(classes), card.architecture_kwargs).state_dict()
    if problems := state_dict_problems(layout, model.state_dict()):  # the server builds the card's architecture
        raise ModelError(f"{card.architecture} built for {len(classes)} classes does not fit the new head: {problems}")
    return card.model_copy(update={"num_classes": len(classes), "class_names": classes})


def _parameter_groups(model: nn.Module, recipe: Recipe, frozen: list[str]) -> list[dict[str, Any]]:
    head = set(_head_parameters(model))
    backbone, head_params = [], []
    for name, parameter in model.named_parameters():
        if any(_under(name, prefix) for prefix in frozen):
            parameter.requires_grad_(False)
        else:
            (head_params if name in head else backbone).append(parameter)
    groups = [{"params": head_params, "lr": recipe.head_lr or recipe.lr, "name": "head"}]
    if backbone:
        groups.insert(0, {"params": backbone, "lr": recipe.lr, "name": "backbone"})
    return groups


def _set_train_mode(model: nn.Module, fixed: list[str]) -> None:
    """Train mode, except the modules under `fixed`: a frozen layer's BatchNorm keeps its running statistics (in
    train mode it would re-estimate them from the new data, and the frozen features would move after all)."""
    model.train()
    for name, module in model.named_modules():
        if name and any(_under(name, prefix) for prefix in fixed):
            module.eval()


def _atomic_save(obj: Any, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def partial_path(out: Path) -> Path:
    return out.with_suffix(".partial.pt")


def finetune(
    model: nn.Module,
    card: ModelCard,
    train: ImageSet,
    val: ImageSet,
    recipe: Recipe,
    out: Path,
    sample_weights: torch.Tensor | None = None,
    resume: bool = False,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ModelCard:
    """Train `model` (in place) on `train`, scoring `val` after every epoch, and write `out` and its card.

    `sample_weights` (one per training image, mean 1: importance weights) weight each image's loss; `provenance`
    is merged into the card's (data paths, the importance weighting's report). Returns the final card."""
    started = time.time()
    train = with_model_classes(train, card, recipe.reinit_head)
    val = with_model_classes(val, card, recipe.reinit_head)
    if val.class_names != train.class_names:
        raise ModelError(f"the validation classes {val.class_names} are not the training ones {train.class_names}")
    card = prepare(model, card, train.class_names, recipe)
    frozen = frozen_prefixes(model, recipe)
    backbone_top = [name for stage in stages(model) for name in stage]
    optimizer = torch.optim.SGD(
        _parameter_groups(model, recipe, frozen),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        nesterov=recipe.momentum > 0,
    )
    steps_per_epoch = len(train) // recipe.batch_size
    if steps_per_epoch == 0:
        raise ModelError(f"{len(train)} training images are fewer than one batch of {recipe.batch_size}")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs * steps_per_epoch)
    rng = np.random.default_rng(recipe.seed)
    history: list[dict[str, Any]] = []
    first_epoch = 0
    if resume and partial_path(out).exists():
        saved = torch.load(partial_path(out), weights_only=True)
        if saved["recipe"] != recipe.model_dump():
            raise ModelError(f"{partial_path(out)} was written by another recipe: {saved['recipe']}")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        rng.bit_generator.state = saved["rng"]
        first_epoch, history, initial_top1 = saved["epoch"], saved["history"], saved["initial_val_top1"]
        log(f"resuming {out} after epoch {first_epoch} of {recipe.epochs}")
    else:
        initial_top1 = accuracy(model, val, card.mean, card.std)
    head_ids = {id(p) for p in head_of(model).parameters()}
    for epoch in range(first_epoch, recipe.epochs):
        t0 = time.time()
        head_only = epoch < recipe.head_epochs
        _set_train_mode(model, backbone_top if head_only else frozen)
        order = torch.as_tensor(rng.permutation(len(train)))
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{recipe.epochs}" + (" (head only)" if head_only else ""),
            unit="batch",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        total = 0.0
        for step in bar:
            index = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            images = augment(train.images[index], rng) if recipe.augment else train.images[index]
            losses = F.cross_entropy(
                model(normalize(images, card.mean, card.std)), train.labels[index], reduction="none"
            )
            loss = (losses * sample_weights[index]).mean() if sample_weights is not None else losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if head_only:  # SGD skips a parameter without a gradient: the backbone neither moves nor decays
                for group in optimizer.param_groups:
                    for parameter in group["params"]:
                        if id(parameter) not in head_ids:
                            parameter.grad = None
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
            bar.set_postfix(loss=f"{total / (step + 1):.4f}")
        bar.close()
        val_top1 = accuracy(model, val, card.mean, card.std)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": round(total / steps_per_epoch, 4),
                "val_top1": round(val_top1, 4),
                "seconds": round(time.time() - t0, 1),
            }
        )
        log(
            f"epoch {epoch + 1}/{recipe.epochs}: loss {total / steps_per_epoch:.4f}, "
            f"validation top-1 {100 * val_top1:.2f}%"
        )
        done = _card(card, recipe, history, initial_top1, len(train), len(val), started, provenance, epoch + 1)
        save_checkpoint(model.eval(), done, out)
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng.bit_generator.state,
            "epoch": epoch + 1,
            "history": history,
            "initial_val_top1": initial_top1,
            "recipe": recipe.model_dump(),
        }
        _atomic_save(state, partial_path(out))
    if len(train) >= FEWEST_IMAGES:
        done = done.model_copy(update={"source_distance": measure(model, done, train.images, "the training images")})
        write_card(done, out)
    else:
        log(f"no plausibility scale in the card: {len(train)} training images are too few (tta calibrate)")
    _, final = load_checkpoint(out)  # as the server will: build the card's architecture, load the weights strictly
    partial_path(out).unlink(missing_ok=True)
    return final


def _card(
    card: ModelCard,
    recipe: Recipe,
    history: list[dict[str, Any]],
    initial_top1: float,
    train_images: int,
    val_images: int,
    started: float,
    provenance: dict[str, Any] | None,
    epochs_done: int,
) -> ModelCard:
    extra = dict(provenance or {})
    finetuned = {
        "recipe": recipe.model_dump(),
        "epochs_done": epochs_done,
        **extra,
        "data": {"train_images": train_images, "val_images": val_images, **extra.get("data", {})},
        "metrics": {"val_top1_before": initial_top1, "val_top1": history[-1]["val_top1"], "history": history},
        "seconds": round(time.time() - started),
        "base": card.provenance,  # where the weights finetuned from came from
    }
    return card.model_copy(update={"provenance": finetuned, "source_distance": None})
