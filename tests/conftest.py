"""Fixtures shared by the test modules."""

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from app.config import DEFAULT_MODEL, Settings
from models.checkpoint import load_checkpoint
from models.data import SHARED_DATA, list_members, load_zip, normalize


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data/cifar10-jpeg (test.zip, train.zip); TTA_SHARED_DIR moves ../shared.

    Tests that need it are skipped when it is missing on a developer machine, but fail under CI (CI=true), where
    the data is always laid out beside the clone and a silent skip would hide a broken set-up.
    """
    if not SHARED_DATA.is_dir():
        reason = f"shared CIFAR-10 data not found at {SHARED_DATA}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so this is an error rather than a skip")
        pytest.skip(reason)
    return SHARED_DATA


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The committed default model (TTA_TEST_MODEL points elsewhere, e.g. while retraining it)."""
    path = Path(os.environ.get("TTA_TEST_MODEL", DEFAULT_MODEL))
    assert path.is_file(), f"default model {path} is missing: it is committed under models/default/"
    return path


@pytest.fixture(scope="session")
def test_zip(shared_data: Path) -> Path:
    return shared_data / "test.zip"


@pytest.fixture(scope="session")
def jpeg_images(test_zip: Path) -> list[tuple[str, bytes, int]]:
    """Forty real test JPEGs, four per class: (member name, bytes, label)."""
    with zipfile.ZipFile(test_zip) as archive:
        members, labels, _ = list_members(archive)
        picked = [i for i in range(len(members)) if int(members[i].rsplit("/", 1)[1][:4]) < 4]
        return [(members[i], archive.read(members[i]), labels[i]) for i in picked]


def make_png(width: int = 40, height: int = 30, seed: int = 0, mode: str = "RGB") -> bytes:
    """An image made by the test itself, for tests that need any image at all."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8).squeeze()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def source(model_path: Path) -> tuple[nn.Module, Settings]:
    """The default model and the default settings as the server runs them (its card's plausibility scale), for
    engines made in-process."""
    model, card = load_checkpoint(model_path)
    return model, Settings(model=model_path).calibrated(card.source_distance_q99())


def shuffled_test_images(model_path: Path, test_zip: Path, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` test images of each class, shuffled with a fixed seed, normalised as the server does; labels."""
    _, card = load_checkpoint(model_path)
    data = load_zip(test_zip, limit_per_class=per_class)
    order = torch.as_tensor(np.random.default_rng(0).permutation(len(data)))
    return normalize(data.images[order], card.mean, card.std), data.labels[order]
