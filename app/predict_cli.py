"""`tta predict IMAGE...`: classify images with a running server (app/client.py), one line per image.

The client is imported only when the command runs, so `tta serve` and the other commands start no slower for it.
"""

import argparse
import os
from pathlib import Path
from typing import Any

from app.server_command import add_url_argument, reporting_failures


def add_predict_command(commands: Any) -> None:
    """`tta predict`, on the `tta` command's subparsers (argparse's private _SubParsersAction, hence Any)."""
    predict = commands.add_parser(
        "predict",
        help="classify images with a running server",
        description="Classify images with a running server and print one line per image. The API key, when the "
        "server wants one, is read from TTA_CLIENT_API_KEY (never a flag: a command line is visible to every user).",
    )
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    add_url_argument(predict)
    predict.add_argument("--labels", help="true class indices, comma-separated, one per image: 3,5")
    predict.add_argument("--stream", help="stream name, sent as X-TTA-Stream")
    predict.add_argument("--batch-size", type=int, help="images per request (64)")
    predict.add_argument("--json", action="store_true", help="print the server's JSON answer instead")
    predict.set_defaults(run=run_predict)


def run_predict(args: argparse.Namespace) -> None:
    """Prints the predictions; a refusal or an unreachable server is one line on stderr and exit status 1."""
    from app.client import DEFAULT_BATCH_SIZE, DEFAULT_URL, TTAClient

    url = args.url or DEFAULT_URL
    with reporting_failures("predict", url, also=(ValueError, OSError)):
        labels = [int(label) for label in args.labels.split(",")] if args.labels else None
        api_key = os.environ.get("TTA_CLIENT_API_KEY")
        with TTAClient(
            url, api_key=api_key, stream=args.stream, batch_size=args.batch_size or DEFAULT_BATCH_SIZE
        ) as tta:
            answer = tta.predict(args.images, labels)
    if args.json:
        print(answer.model_dump_json(indent=2))
        return
    width = max(len(str(path)) for path in args.images)
    for path, p in zip(args.images, answer.predictions, strict=True):
        print(f"{str(path):<{width}}  {p.class_name:<12} {p.confidence:6.1%}  entropy {p.entropy:.3f}  id {p.id}")
