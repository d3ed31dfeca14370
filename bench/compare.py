"""One table across bench.stream result folders: a row per method, a column per cell (domain length, scenario,
batch), each cell the mean prequential error % and, below it, the error on the first 500 images after each switch
against the rest of the domain. Cells a method has no saved run for stay empty::

    python -m bench.compare bench/results/length-500 bench/results/length-2000 > table.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.stream import SCENARIOS, SWITCH_WINDOW, _method_rank, load_records, switch_errors

Cell = tuple[str, str, int]  # (results folder name, scenario, batch size)


def _cell_key(cell: Cell) -> tuple[Any, ...]:
    folder, scenario, batch = cell
    length = int(folder.removeprefix("length-")) if folder.removeprefix("length-").isdigit() else 0
    return (length, folder, SCENARIOS.index(scenario) if scenario in SCENARIOS else 99, -batch)


def _figure(record: dict[str, Any], window: int) -> str:
    first, rest = switch_errors(record, window)
    return f"{record['mean_error']:.2f}" + ("" if rest is None else f" ({first:.1f} / {rest:.1f})")


def comparison_table(folders: Sequence[Path], window: int = SWITCH_WINDOW) -> str:
    runs: dict[tuple[str, Cell], dict[str, Any]] = {}
    for folder in folders:
        for record in load_records(folder):
            runs[(record["method"], (folder.name, record["scenario"], record["batch_size"]))] = record
    cells = sorted({cell for _, cell in runs}, key=_cell_key)
    methods = sorted({method for method, _ in runs}, key=_method_rank)
    best = {
        cell: min((r["mean_error"] for (m, c), r in runs.items() if c == cell and r["batch_size"] > 1), default=None)
        for cell in cells
    }
    header = [f"{folder.removeprefix('length-')} {scenario} b{batch}" for folder, scenario, batch in cells]
    lines = ["| method | " + " | ".join(header) + " |", "| --- |" + " ---: |" * len(cells)]
    for method in methods:
        row = []
        for cell in cells:
            record = runs.get((method, cell))
            text = _figure(record, window) if record else ""
            row.append(f"**{text}**" if record and record["mean_error"] == best[cell] else text)
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    note = (
        f"\nMean prequential error % per cell (images per domain, scenario, batch); in brackets the error on the "
        f"first {window} images after each domain switch / on the rest of the domain (means over domains; "
        "only where domains are longer than that); bold: the lowest of the cell at batch > 1.\n"
    )
    return "\n".join(lines) + "\n" + note


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("::")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="bench.stream --results-dir folders")
    parser.add_argument(
        "--switch-window", type=int, default=SWITCH_WINDOW, help="images after each switch (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    sys.stdout.write(comparison_table(args.folders, args.switch_window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
