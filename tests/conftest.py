"""Fixtures shared by the test modules."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data/cifar10-jpeg (test.zip, train.zip).

    Tests that need it are skipped when it is missing on a developer machine, but fail under CI (CI=true), where
    the data is always laid out beside the clone and a silent skip would hide a broken set-up.
    """
    if not SHARED_DATA.is_dir():
        reason = f"shared CIFAR-10 data not found at {SHARED_DATA}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so this is an error rather than a skip")
        pytest.skip(reason)
    return SHARED_DATA
