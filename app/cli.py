"""`tta serve`: run the server. Flags override the matching TTA_ variables only when given."""

import argparse
import logging
import signal
import sys

import uvicorn
from pydantic import ValidationError

from app.config import Settings

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
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tta", description="Test-time adaptation inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the HTTP server")
    for flag, (_, kind, text) in FLAGS.items():
        serve.add_argument(flag, type=kind, default=None, help=text)
    serve.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    overrides = {setting: getattr(args, flag[2:].replace("-", "_")) for flag, (setting, _, _) in FLAGS.items()}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        sys.exit(f"invalid configuration:\n{error}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.main import create_app  # after the settings are known good: importing torch takes a while

    # uvicorn drains gracefully on SIGTERM, then re-raises the signal it caught, which would end the process
    # as "killed" (143); a handler installed first is the one it restores, so a drained server exits 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
    )


if __name__ == "__main__":
    main()
