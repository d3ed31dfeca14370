"""`tta serve`: run the server, with a flag per setting that overrides its TTA_ variable only when given; and the
model commands (`tta import`, `tta card`, `tta card-schema`, app/model_cli.py; `tta finetune`, app/finetune_cli.py)."""

import argparse
import logging
import signal
import sys
from typing import NoReturn

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliSettingsSource, SettingsError
from uvicorn.config import LOG_LEVELS

from app.config import Settings, is_loopback
from app.finetune_cli import add_finetune_command
from app.model_cli import add_model_commands
from app.predict_cli import add_predict_command
from app.serving.http_timeouts import with_read_timeouts
from app.status_cli import add_status_command
from models.card import ModelError, check_model_file, one_line


def refuse(message: str) -> NoReturn:
    """A configuration the server will not start with: one paragraph on stderr, exit status 2, no traceback."""
    print(f"tta serve: {message}", file=sys.stderr)
    raise SystemExit(2)


def open_admin_problem(settings: Settings) -> str | None:
    """Why listening where the settings say would open POST /reset to the network; None when it would not."""
    if settings.admin_token is not None or settings.allow_open_admin or is_loopback(settings.host):
        return None
    return (
        f"refusing to listen on {settings.host}, which is not a loopback address, without TTA_ADMIN_TOKEN: anyone "
        "who can reach it could reset the adaptation (POST /reset). Set TTA_ADMIN_TOKEN to a secret (for example "
        "the output of `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`), or listen on a loopback "
        "address (--host 127.0.0.1), or set TTA_ALLOW_OPEN_ADMIN=true to serve an open admin route on purpose."
    )


def settings_flags(parser: argparse.ArgumentParser) -> CliSettingsSource[Settings]:
    """A flag for every setting, made from the settings' own names and descriptions, with the default and the
    variable in --help; values are written as in the variables (`--guard-balance false`, `--mean 0.5,0.5,0.5`)."""
    return CliSettingsSource(
        Settings,
        root_parser=parser,
        cli_kebab_case=True,
        cli_implicit_flags=False,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_show_env_vars=True,
    )


def setting_names(loc: tuple[int | str, ...]) -> str:
    return f"TTA_{str(loc[0]).upper()} (--{str(loc[0]).replace('_', '-')})" if loc else "settings"


def serve_settings(args: argparse.Namespace, flags: CliSettingsSource[Settings]) -> Settings:
    """The settings, checked as far as they can be without torch: a refusal then takes a second, not a minute."""
    if hasattr(args, "admin_token"):  # accepted, unlisted, by the generated flags; refused so it never sits in `ps`
        refuse("--admin-token: set TTA_ADMIN_TOKEN instead; a command line is readable by every user of the machine")
    try:
        settings = Settings(_cli_settings_source=flags(parsed_args=args))
    except ValidationError as error:
        refuse(f"invalid configuration: {one_line(error, setting_names)}")
    except SettingsError as error:  # a variable that is not the JSON its setting needs (TTA_MEAN='[0.5,0.5,0.5]')
        refuse(f"invalid configuration: {error}")
    if problem := open_admin_problem(settings):
        refuse(problem)
    try:
        check_model_file(settings.model, imported=settings.arch is not None)
    except ModelError as error:
        refuse(str(error))
    return settings


def device_problem(name: str) -> str | None:
    """Why the device named cannot be used, or None. Imports torch, the first of the slow imports, and only it."""
    import torch

    count = torch.cuda.device_count() if name.startswith("cuda") else 0
    if not name.startswith("cuda") or int(name.partition(":")[2] or 0) < count:
        return None
    present = f"{count} CUDA devices (cuda:0 to cuda:{count - 1})" if count else "no CUDA device"
    return f"TTA_DEVICE={name}, but this machine has {present}; use cpu or auto"


def serve_replicas(settings: Settings, replicas: int, log_level: str) -> None:
    try:
        from app.ray_app import serve_locally
    except ImportError as error:
        refuse(f"--replicas needs Ray Serve, and {error.name} is not installed: pip install -e '.[ray]'")
    serve_locally(settings, replicas, log_level)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tta", description="Test-time adaptation inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="start the HTTP server",
        usage="tta serve [-h] [--FLAG VALUE ...]",  # not the generated one: a screenful of flags before every error
        description="Every flag sets the setting of the TTA_ variable shown in its help, and overrides the variable "
        "only when given. A foreign checkpoint (--model FILE with --arch, --classes, --input-size) is imported "
        "in memory at start, as `tta import` would.",
    )
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    serve.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="scale out: N replicas on a local Ray cluster, every stream's requests on one of them (needs the "
        ".[ray] extra; app/ray_app.py, README: Scale out)",
    )
    flags = settings_flags(serve)
    add_model_commands(commands)
    add_finetune_command(commands)
    add_predict_command(commands)
    add_status_command(commands)
    args = parser.parse_args(argv)
    if args.command != "serve":
        args.run(args)
        return
    settings = serve_settings(args, flags)
    if args.replicas is not None and args.replicas < 1:
        refuse(f"--replicas {args.replicas}: give 1 or more")
    logging.basicConfig(level=LOG_LEVELS[args.log_level], format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.admin_token is None and not is_loopback(settings.host):
        logging.getLogger("tta").warning(
            "POST /reset is open to anyone who can reach %s (TTA_ALLOW_OPEN_ADMIN)", settings.host
        )
    if problem := device_problem(settings.device):
        refuse(problem)
    from models.importer import open_model  # torchvision, but not yet the server's own imports

    try:
        loaded = open_model(settings.model, settings)  # here: a model that does not fit is refused in plain words
    except ModelError as error:
        refuse(str(error))
    from app.api.auth import KeyFileError  # after the settings are known good: importing torch takes a while
    from app.main import create_app
    from app.serving.calibration import scaled_timeout

    settings = scaled_timeout(settings, *loaded)  # a model whose batch takes a minute gets a longer default timeout
    if args.replicas is not None:
        serve_replicas(settings, args.replicas, args.log_level)
        return
    try:
        app = create_app(settings, loaded)
    except KeyFileError as error:
        refuse(str(error))

    # uvicorn drains gracefully on SIGTERM, then re-raises the signal it caught, which would end the process
    # as "killed" (143); a handler installed first is the one it restores, so a drained server exits 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
        http=with_read_timeouts(settings.header_timeout_s, settings.body_timeout_s),
        ws="none",  # no websocket route; an upgrade request is then plain HTTP, timed like any other
        limit_concurrency=settings.max_connections,
        backlog=settings.backlog,
    )


if __name__ == "__main__":
    main()
