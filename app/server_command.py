"""What the commands that talk to a running server (`tta predict`, `tta status`) share: the `--url` flag, and a
refusal or an unreachable server as one line on stderr with exit status 1 (the model commands exit 2: there it is
the user's input that is wrong, here it may be the server)."""

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn


def add_url_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument("--url", default=os.environ.get("TTA_URL"), help="server (TTA_URL; http://127.0.0.1:8000)")


def fail(command: str, message: str) -> NoReturn:
    print(f"tta {command}: {message}", file=sys.stderr)
    raise SystemExit(1)


@contextmanager
def reporting_failures(command: str, url: str, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Inside: the server unreachable, a refusal (`TTAError`) or one of `also` ends the command with its one line."""
    import httpx

    from app.client import TTAError

    try:
        yield
    except httpx.TransportError as error:
        fail(command, f"cannot reach {url}: {error}")
    except (TTAError, *also) as error:
        fail(command, str(error))
