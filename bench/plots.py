"""Plots for the stream benchmark: prequential error along the stream, one line per method.

Domain boundaries are vertical lines labelled with the corruption that starts there; resets made by a guard
are markers on the method's line (the `reset` scenario's own resets sit on the boundaries and are not marked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display: this runs on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

COLORS = {
    "none": "tab:gray",
    "norm": "tab:blue",
    "tent-faithful": "tab:red",
    "default": "tab:green",
    # the published methods (bench/peers/anchors.py)
    "bn-anchor": "tab:cyan",
    "tent-anchor": "tab:pink",
    "eata": "tab:orange",
    "sar": "tab:olive",
    "roid": "tab:purple",
    "rotta": "tab:brown",
    "lame": "gold",
    "cotta": "black",
}


def moving_error(correct: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, error %) of the trailing window of `window` images, x = images seen; one point per image."""
    window = max(1, min(window, len(correct)))
    wrong = (~correct).astype(np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(wrong)])
    error = 100 * (cumulative[window:] - cumulative[:-window]) / window
    return np.arange(window, len(correct) + 1), error


def _color(method: str) -> str | None:
    return COLORS.get(method.removeprefix("http-"))


def plot_stream(records: list[dict[str, Any]], path: Path, window: int, title: str) -> None:
    """One PNG: error along the stream for each record (method) of one scenario and batch size."""
    from bench.stream import SCENARIO_RESET, correct_sequence

    fig, ax = plt.subplots(figsize=(13, 5.2))
    for record in records:
        x, error = moving_error(correct_sequence(record), window)
        label = f"{record['method']} (mean {record['mean_error']:.1f}%)"
        over_http = record["method"].startswith("http-")  # dashed: it often lies exactly on its in-process twin
        style = {"lw": 1.2, "color": _color(record["method"]), "ls": "--" if over_http else "-"}
        (line,) = ax.plot(x, error, label=label, **style)
        resets = [r["position"] for r in record["resets"] if r["reason"] != SCENARIO_RESET]
        if resets:
            # each marker sits on the line where the reset takes effect
            at = np.clip(np.searchsorted(x, resets), 0, len(x) - 1)
            ax.plot(x[at], error[at], "v", ms=7, color=line.get_color(), mec="black", mew=0.6, ls="none")
    _draw_boundaries(ax, records[0])
    ax.set_xlim(0, records[0]["images"])
    ax.set_ylim(0, 100)
    ax.set_xlabel("images seen")
    ax.set_ylabel(f"error % (last {window} images)")
    note = {
        "reset": "engine reset at every boundary",
        "mixed": "all corruptions interleaved",
        "correlated": "classes in Dirichlet(0.1) bursts",
        "recurring": "domains of random lengths that come back",
    }.get(records[0]["scenario"], "no reset")
    ax.set_title(f"Prequential error along the stream: {title} ({note}; \u25bc = guard reset)")
    ax.grid(alpha=0.3)
    # below the axes: inside, it would hide the boundary labels or the lines
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8, ncol=min(len(records), 5), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_boundaries(ax: Any, record: dict[str, Any]) -> None:
    for position, name in record.get("boundaries", []):
        if position > 0:
            ax.axvline(position, color="black", lw=0.6, alpha=0.4)
        ax.text(position, 99, f" {name}", rotation=90, va="top", ha="left", fontsize=7, alpha=0.8)
