"""Tests for bench.compare: one table across result folders, a row per method and a column per cell."""

import base64
from pathlib import Path

import numpy as np

from bench.compare import comparison_table
from bench.stream import run_path, save_record


def _record(method: str, scenario: str, mean_error: float, correct: np.ndarray, batch: int = 64) -> dict:
    return {
        "method": method,
        "scenario": scenario,
        "batch_size": batch,
        "mean_error": mean_error,
        "images": len(correct),
        "correct_bits": base64.b64encode(np.packbits(correct).tobytes()).decode(),
        "boundaries": [(0, "a"), (1000, "b")] if scenario != "mixed" else [],
    }


def test_table_has_a_row_per_method_and_a_column_per_cell(tmp_path: Path) -> None:
    right_after_500 = np.array(([False] * 500 + [True] * 500) * 2)
    runs = {
        "length-1000": [("default", "continual", 50.0), ("eata", "continual", 40.0), ("default", "mixed", 30.0)],
        "length-500": [("eata", "continual", 20.0)],
    }
    for folder, records in runs.items():
        for method, scenario, error in records:
            path = run_path(tmp_path / folder, scenario, method, 64)
            save_record(path, _record(method, scenario, error, right_after_500))
    save_record(
        run_path(tmp_path / "length-1000", "continual", "default", 1),
        _record("default", "continual", 10.0, right_after_500, batch=1),
    )
    table = comparison_table([tmp_path / "length-1000", tmp_path / "length-500"])
    lines = table.splitlines()
    assert lines[0] == "| method | 500 continual b64 | 1000 continual b64 | 1000 continual b1 | 1000 mixed b64 |"
    assert lines[2] == "| default |  | 50.00 (100.0 / 0.0) | 10.00 (100.0 / 0.0) | **30.00** |"  # ours first
    assert lines[3] == "| eata | **20.00 (100.0 / 0.0)** | **40.00 (100.0 / 0.0)** |  |  |"  # b1 is not a best
