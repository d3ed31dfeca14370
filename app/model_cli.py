"""`tta import`, `tta card`, `tta card-schema`: bring a foreign checkpoint into the server's format, show cards.

Errors are one line on stderr and exit status 2, like `tta serve`'s; torch is imported only once the flags and the
file have been checked.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, CliPositionalArg, CliSettingsSource, PydanticBaseSettingsSource

from models.card import (
    SOURCE_IMAGES,
    ForeignModel,
    ModelError,
    card_path,
    card_schema,
    check_model_file,
    one_line,
    read_card,
)


class FlagsOnly(BaseSettings):
    """Settings read from the command's flags alone: a TTA_ variable set for `tta serve` must not change what a model
    command (`tta import`, `tta finetune`) does."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class ImportCommand(FlagsOnly, ForeignModel):
    """The flags of `tta import`: what to import, where to write it, and how to read it (ForeignModel's fields,
    which `tta serve` takes too)."""

    src: CliPositionalArg[Path] = Field(
        description="foreign checkpoint: a PyTorch state_dict (bare, nested under state_dict/model, module.-prefixed), "
        "a TorchScript archive or a safetensors file"
    )
    out: Path = Field(description="checkpoint to write, DIR/NAME.safetensors; its model card goes beside it as .json")


def fail(command: str, message: str) -> NoReturn:
    print(f"tta {command}: {message}", file=sys.stderr)
    raise SystemExit(2)


def add_model_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = commands.add_parser(
        "import",
        help="import a foreign checkpoint into the server's format (safetensors + model card)",
        usage="tta import SRC --arch NAME --classes N|FILE|cifar10|imagenet --input-size S --out FILE [...]",
        description="Reads a foreign checkpoint, loads it strictly into the architecture, checks a forward pass and "
        "writes the checkpoint and its model card (both mode 0644).",
    )
    source = CliSettingsSource(
        ImportCommand,
        root_parser=parser,
        cli_kebab_case=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_enforce_required=True,
    )
    parser.set_defaults(run=lambda args: run_import(source(parsed_args=args)))
    calibrate = commands.add_parser(
        "calibrate",
        help="measure the plausibility guard's scale for a checkpoint on its source images and write it into its card",
        description="Measures how far the model's own source images are from its BatchNorm statistics (the source "
        f"distance's median and 99th percentile over at most {SOURCE_IMAGES} images spread evenly over the folder or "
        "zip) and writes it into the card as source_distance; the plausibility guard's threshold is "
        "TTA_PLAUSIBLE_DISTANCE times that 99th percentile. Without it the guard admits every image.",
    )
    calibrate.add_argument("model", type=Path, help="our checkpoint (.safetensors beside its card)")
    calibrate.add_argument(
        "--images", type=Path, required=True, help="source images (the training data): a directory or a zip, any layout"
    )
    calibrate.set_defaults(run=lambda args: run_calibrate(args.model, args.images))
    card = commands.add_parser("card", help="print the model card of a checkpoint, validated")
    card.add_argument("path", type=Path, help="a checkpoint (.safetensors) or its card (.json)")
    card.set_defaults(run=lambda args: print_card(args.path))
    schema = commands.add_parser("card-schema", help="print the JSON Schema of the model card")
    schema.set_defaults(run=lambda _: print(json.dumps(card_schema(), indent=2)))


def run_import(source: CliSettingsSource[Any]) -> None:
    try:
        command = ImportCommand(_cli_settings_source=source)
    except ValidationError as error:
        fail("import", one_line(error))
    if command.out.suffix != ".safetensors":
        fail("import", f"--out {command.out} must end in .safetensors (the card is written beside it as .json)")
    try:
        check_model_file(command.src, imported=True)
        from models.checkpoint import save_checkpoint  # torch: after the flags and the file are known good
        from models.importer import import_checkpoint

        model, card = import_checkpoint(command.src, command)
    except ModelError as error:
        fail("import", str(error))
    save_checkpoint(model, card, command.out)
    crop = f"{card.resize} then {card.input_size} px" if card.resize else f"{card.input_size} px"
    print(
        f"wrote {command.out} and {card_path(command.out)} ({card.architecture}, {card.num_classes} classes, {crop}); "
        f"serve it with: tta serve --model {command.out} (after `tta calibrate {command.out} --images SOURCE_IMAGES`, "
        "the plausibility guard can tell noise from the images it was trained on)"
    )


def run_calibrate(model_path: Path, images: Path) -> None:
    try:
        check_model_file(model_path, imported=False)
        if not images.exists():
            raise ModelError(f"--images {images} does not exist")
        from models.plausibility import calibrate_checkpoint  # torch: after the flags and the file are known good

        measured = calibrate_checkpoint(model_path, images)
    except (ModelError, FileNotFoundError) as error:
        fail("calibrate", str(error))
    print(
        f"wrote source_distance into {card_path(model_path)}: median {measured.median:.4g}, 99th percentile "
        f"{measured.q99:.4g} over {measured.images} images of {images}"
    )


def print_card(path: Path) -> None:
    try:
        card = read_card(path if path.suffix == ".json" else card_path(path))
    except ModelError as error:
        fail("card", str(error))
    print(card.model_dump_json(indent=2))
