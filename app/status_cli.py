"""`tta status`: a running server's status as a table, one row per stream (GET /v1/status and /v1/streams).

Plain aligned text, greppable and the same in any terminal: a dozen lines of formatting do not justify a runtime
dependency. The client is imported only when the command runs, so the other commands start no slower for it.
"""

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.server_command import add_url_argument, reporting_failures

if TYPE_CHECKING:
    from app.api.schemas import StatusResponse, StreamsResponse

COLUMNS = ("stream", "steps", "since reset", "resets", "skipped", "entropy", "drift", "buffer", "labels")
RIGHT_ALIGNED = {"steps", "since reset", "entropy", "drift", "buffer", "labels", "adapted", "source"}


def add_status_command(commands: Any) -> None:
    """`tta status`, on the `tta` command's subparsers (argparse's private _SubParsersAction, hence Any)."""
    status = commands.add_parser(
        "status",
        help="print a running server's status, per stream",
        description="Print a running server's model, batching and prequential figures, then one row per stream: "
        "adaptation steps (in all, and since the last reset), resets and skipped batches by reason, entropy EMA, "
        "parameter drift, buffered images, labels and prequential accuracy (adapted; source with the shadow).",
    )
    add_url_argument(status)
    status.set_defaults(run=run_status)


def run_status(args: argparse.Namespace) -> None:
    """Prints the status; a refusal or an unreachable server is one line on stderr and exit status 1."""
    from app.client import DEFAULT_URL, TTAClient

    url = args.url or DEFAULT_URL
    with reporting_failures("status", url), TTAClient(url, retries=0) as tta:
        status, streams = tta.status(), tta.streams()
    print(render(url, status, streams))


def render(url: str, status: "StatusResponse", streams: "StreamsResponse") -> str:
    model, batching, prequential = status.model, status.batching, status.prequential
    models = [name for name in ("adapted", "source") if name in prequential]
    lines = [
        f"{url}  {status.method} on {status.device}  {Path(model['path']).name} ({model['architecture']}, "
        f"{model['num_classes']} classes)  up {duration(getattr(status, 'uptime_s', 0.0))}",
        f"queue {batching['queue_depth']} of {batching['max_queue_images']} images  "
        f"{number(batching['throughput_images_per_s'], '.1f')} images/s  "
        f"expected wait {number(batching['expected_wait_s'], '.2f')} s",
        "prequential: "
        + ", ".join(f"{name} {score(prequential[name])}" for name in models)
        + (f", agreement {percent(prequential['source_agreement'])}" if "source_agreement" in prequential else ""),
        f"streams {len(streams.streams)} of {streams.max_streams} ({streams.evicted} evicted)",
        "",
    ]
    rows = [
        {
            "stream": s.stream,
            "steps": str(s.steps_total),
            "since reset": str(s.steps_since_reset),
            "resets": by_reason(s.resets),
            "skipped": by_reason(s.skipped),
            "entropy": number(s.entropy_ema, ".3f"),
            "drift": f"{s.param_drift:.4f}",
            "buffer": str(s.buffer_fill),
            "labels": str(s.prequential.get("adapted", {}).get("labels", 0)),
            **{name: percent(s.prequential.get(name, {}).get("accuracy")) for name in models},
        }
        for s in streams.streams
    ]
    return "\n".join(lines + table((*COLUMNS, *models), rows))


def table(columns: tuple[str, ...], rows: list[dict[str, str]]) -> list[str]:
    widths = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in columns}

    def line(cells: dict[str, str]) -> str:
        return "  ".join(
            cells[c].rjust(widths[c]) if c in RIGHT_ALIGNED else cells[c].ljust(widths[c]) for c in columns
        ).rstrip()

    return [line({c: c.upper() for c in columns}), *(line(row) for row in rows)]


def by_reason(counts: dict[str, int]) -> str:
    """'3 (drift 2, manual 1)', or '0': the reasons that happened, most frequent first."""
    happened = sorted(((n, reason) for reason, n in counts.items() if n), reverse=True)
    total = sum(n for n, _ in happened)
    return f"{total} ({', '.join(f'{reason} {n}' for n, reason in happened)})" if happened else "0"


def score(figures: dict[str, Any]) -> str:
    if not figures["labels"]:
        return "no labels yet"
    return (
        f"{percent(figures['accuracy'])} of {figures['labels']} labels (window {percent(figures['window_accuracy'])})"
    )


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"
