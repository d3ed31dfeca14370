"""`tta finetune`: from a checkpoint the server reads (ours, or a foreign one with `tta import`'s flags) and labelled
images to a new checkpoint + card the server loads; optionally importance-weighted towards unlabelled target images.

The flags are the fields of models.finetune.Recipe (the recipe), of models.card.ForeignModel (how to read a foreign
checkpoint) and of FinetuneCommand (the data and the output), each documented in --help with why one would set it.
Errors are one line on stderr and exit status 2, like `tta import`'s.
"""

import argparse
import json
import logging
import shlex
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import CliPositionalArg, CliSettingsSource

from app.model_cli import FlagsOnly, fail
from models.card import ForeignModel, ModelError, card_path, check_model_file, one_line
from models.recipe import Recipe


class FinetuneCommand(FlagsOnly, ForeignModel, Recipe):
    """The flags of `tta finetune`: the recipe, how to read a foreign model, the data and the output."""

    model: CliPositionalArg[Path] = Field(
        description="checkpoint to start from: ours (.safetensors beside its card), or a foreign file read with "
        "--arch, --classes, --input-size as tta import reads it"
    )
    train: Path = Field(
        validation_alias=AliasChoices("train", "source"),
        description="labelled training images (--source: the same, the name importance weighting uses): a "
        "directory of class folders (<class>/<image>, torchvision's ImageFolder) or a zip of that layout, "
        "optionally under one top folder (train/<class>/<image>), read member by member without unpacking",
    )
    val: Path | None = Field(
        None, description="labelled validation images, same layouts; unset: --val-fraction of --train is held out"
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of --train held out for validation when --val is not given"
    )
    out: Path = Field(
        description="checkpoint to write, DIR/NAME.safetensors (card beside it as .json), after every epoch; the "
        "state to resume from goes to DIR/NAME.partial.pt until the last epoch is done"
    )
    resume: bool = Field(False, description="continue from the last finished epoch of an interrupted run of --out")
    target_unlabeled: Path | None = Field(
        None,
        description="unlabelled target images (a directory, any layout, or a zip): the domain --importance-weighting "
        "adapts to",
    )
    importance_weighting: bool = Field(
        False,
        description="weight each source image's loss by w = (1 - p) / p * n_s / n_t, p = p(source | x) from a "
        "domain classifier on the model's penultimate features (models/importance.py): the weighted source loss "
        "then estimates the target's, if the target lies inside the source's support; needs --target-unlabeled",
    )
    max_weight: float = Field(
        10.0,
        gt=1,
        description="clip the importance weights (mean 1) at this value: a few source images with p near 0 would "
        "otherwise carry the whole loss",
    )
    histogram: Path | None = Field(
        None, description="where the weights' histogram PNG goes; unset: beside --out as NAME.weights.png"
    )
    progress: bool = Field(True, description="a progress bar per epoch on stderr")

    def recipe(self) -> Recipe:
        return Recipe(**{name: getattr(self, name) for name in Recipe.model_fields})


def add_finetune_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = commands.add_parser(
        "finetune",
        help="finetune a checkpoint on labelled images (optionally importance-weighted towards a target)",
        usage="tta finetune MODEL --train DATA --out FILE.safetensors [RECIPE FLAGS ...]",
        description="Trains MODEL on the labelled images with the recipe the flags give, writing a checkpoint and "
        "card the server loads after every epoch; the recipe, the data and the metrics go into the card's "
        "provenance. README, section Finetuning, has one command per recipe.",
    )
    source = CliSettingsSource(
        FinetuneCommand,
        root_parser=parser,
        cli_kebab_case=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_enforce_required=True,
        cli_implicit_flags=True,
    )
    parser.set_defaults(run=lambda args: run_finetune(source(parsed_args=args)))


def run_finetune(source: CliSettingsSource[Any]) -> None:
    try:
        command = FinetuneCommand(_cli_settings_source=source)
    except ValidationError as error:
        fail("finetune", one_line(error))
    if command.out.suffix != ".safetensors":
        fail("finetune", f"--out {command.out} must end in .safetensors (the card is written beside it as .json)")
    if command.importance_weighting and command.target_unlabeled is None:
        fail("finetune", "--importance-weighting needs --target-unlabeled DIR (the images to adapt to)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_model_file(command.model, imported=command.arch is not None)
        card = finetune_command(command)
    except ModelError as error:
        fail("finetune", str(error))
    top1 = card.provenance["metrics"]["val_top1"]
    print(
        f"wrote {command.out} and {card_path(command.out)} ({card.architecture}, {card.num_classes} classes, "
        f"validation top-1 {100 * top1:.2f}%); serve it with: tta serve --model {command.out}"
    )


def command_line(command: FinetuneCommand) -> str:
    """The `tta finetune` command that makes this run again: the model and every flag not at its default."""
    words = ["tta", "finetune", str(command.model)]
    for name, value in command.model_dump(exclude_defaults=True, exclude={"model"}).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else flag.replace("--", "--no-", 1))
        elif isinstance(value, list | tuple):
            words += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, dict):
            words += [flag, json.dumps(value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def finetune_command(command: FinetuneCommand) -> Any:
    """Read the model and the data, weigh the source if asked, finetune; the final card."""
    import torch  # after the flags and the model file are known good

    from models.finetune import finetune, split
    from models.images import read_labelled, read_unlabelled
    from models.importance import weigh_source
    from models.importer import open_model

    torch.manual_seed(command.seed)  # a re-initialised head is drawn from torch's global generator
    model, card = open_model(command.model, command)
    train = read_labelled(command.train, card)
    val = read_labelled(command.val, card) if command.val else None
    if val is None:
        train, val = split(train, command.val_fraction, command.seed)
    provenance: dict[str, Any] = {
        "command": command_line(command),
        "init": str(command.model),
        "data": {
            "train": str(command.train),
            "val": str(command.val) if command.val else f"{command.val_fraction:.0%} of train",
        },
    }
    weights = None
    if command.importance_weighting:
        target = read_unlabelled(command.target_unlabeled, card)
        histogram = command.histogram or command.out.with_suffix(".weights.png")
        weights, provenance["importance_weighting"] = weigh_source(
            model, card, train.images, target, command.max_weight, histogram, command.seed
        )
        provenance["data"]["target_unlabeled"] = str(command.target_unlabeled)
    return finetune(
        model,
        card,
        train,
        val,
        command.recipe(),
        command.out,
        sample_weights=weights,
        resume=command.resume,
        provenance=provenance,
        progress=command.progress,
    )
