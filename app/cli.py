"""`tta serve`: run the server. Flags override the matching TTA_ variables only when given."""

import argparse
import logging
import signal
import sys
from typing import NoReturn

import uvicorn
from pydantic import ValidationError
from uvicorn.config import LOG_LEVELS

from app.config import Settings, is_loopback
from app.serving.http_timeouts import with_read_timeouts

FLAGS = {  # flag -> (setting, type, help)
    "--host": ("host", str, "address to bind (TTA_HOST)"),
    "--port": ("port", int, "port (TTA_PORT)"),
    "--model": ("model", str, "checkpoint .safetensors with its .json card (TTA_MODEL)"),
    "--device": ("device", str, "auto | cpu | cuda | cuda:N (TTA_DEVICE)"),
    "--method": ("method", str, "none | norm | tent (TTA_METHOD)"),
    "--max-batch-size": ("max_batch_size", int, "images per batch (TTA_MAX_BATCH_SIZE)"),
    "--max-wait-ms": ("max_wait_ms", float, "wait for a fuller batch (TTA_MAX_WAIT_MS)"),
    "--max-queue-images": ("max_queue_images", int, "queue bound (TTA_MAX_QUEUE_IMAGES)"),
    "--request-timeout-s": ("request_timeout_s", float, "answer 504 after (TTA_REQUEST_TIMEOUT_S)"),
    "--max-queue-delay-ms": ("max_queue_delay_ms", float, "admission budget (TTA_MAX_QUEUE_DELAY_MS)"),
}


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tta", description="Test-time adaptation inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the HTTP server")
    for flag, (_, kind, text) in FLAGS.items():
        serve.add_argument(flag, type=kind, default=None, help=text)
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    args = parser.parse_args(argv)
    overrides = {setting: getattr(args, flag[2:].replace("-", "_")) for flag, (setting, _, _) in FLAGS.items()}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        refuse(f"invalid configuration:\n{error}")
    if problem := open_admin_problem(settings):
        refuse(problem)
    logging.basicConfig(level=LOG_LEVELS[args.log_level], format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.admin_token is None and not is_loopback(settings.host):
        logging.getLogger("tta").warning(
            "POST /reset is open to anyone who can reach %s (TTA_ALLOW_OPEN_ADMIN)", settings.host
        )
    from app.api.auth import KeyFileError  # after the settings are known good: importing torch takes a while
    from app.main import create_app

    try:
        app = create_app(settings)
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
