"""Architectures, checkpoint I/O (ours and foreign), the default model and the training loop."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.checkpoint import (
    CheckpointMismatchError,
    ModelCard,
    load_checkpoint,
    load_foreign_checkpoint,
    read_foreign_state_dict,
    save_checkpoint,
)
from models.data import SHARED_DIR, load_zip
from models.evaluate import accuracy
from models.registry import build_model, list_architectures, torchvision_architectures
from models.train import reinit_head, train_epoch

AKAMASTER = SHARED_DIR / "pretrained" / "cifar10_resnet20_akamaster.th"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def card_for(architecture: str) -> ModelCard:
    return ModelCard(
        architecture=architecture,
        num_classes=10,
        class_names=CLASSES,
        input_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )


@pytest.fixture(scope="module")
def akamaster(shared_data: Path) -> Path:
    assert AKAMASTER.is_file(), f"{AKAMASTER} is missing from {SHARED_DIR}"
    return AKAMASTER


def test_registry_builds_every_architecture() -> None:
    names = list_architectures()
    assert {"resnet20_cifar", "resnet20_cifar_a", "resnet26_cifar", "resnet50", "vit_b_16", "convnext_tiny"} <= set(
        names
    )
    assert len(torchvision_architectures()) > 50
    for name in names:
        try:
            with torch.device("meta"):  # construction only: no memory for the ImageNet giants
                model = build_model(name, num_classes=7)
        except NotImplementedError:  # RegNets read tensor values while they are built
            model = build_model(name, num_classes=7)
        classifier = list(model.parameters())[-1]  # the classifier's weight or bias is registered last
        assert classifier.shape[0] == 7, name
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet21_cifar", 10)


@pytest.mark.parametrize("architecture", ["resnet20_cifar", "resnet20_cifar_a", "resnet26_cifar"])
def test_cifar_resnets_run(architecture: str) -> None:
    model = build_model(architecture, 10).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    model = build_model("resnet20_cifar", 10)
    with torch.no_grad():  # non-default statistics, so the round trip is not trivially true
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    save_checkpoint(model, card_for("resnet20_cifar"), tmp_path / "m.safetensors")
    loaded, card = load_checkpoint(tmp_path / "m.safetensors")
    assert card == card_for("resnet20_cifar")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded(x))


def test_card_must_match_its_classes() -> None:
    with pytest.raises(ValueError, match="class names"):
        ModelCard(
            architecture="resnet20_cifar",
            num_classes=3,
            class_names=["a"],
            input_size=32,
            mean=(0, 0, 0),
            std=(1, 1, 1),
        )


def test_foreign_checkpoint_with_module_prefix_and_nesting(akamaster: Path, test_zip: Path) -> None:
    raw = torch.load(akamaster, map_location="cpu", weights_only=True)
    assert all(k.startswith("module.") for k in raw["state_dict"])
    model = load_foreign_checkpoint(akamaster, "resnet20_cifar_a", 10)
    data = load_zip(test_zip, limit_per_class=20)
    assert accuracy(model, data, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) > 0.7


def test_foreign_formats_plain_nested_and_torchscript(tmp_path: Path) -> None:
    model = build_model("resnet20_cifar", 10).eval()
    state = model.state_dict()
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "nested.pt")
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    x = torch.randn(2, 3, 32, 32)
    for name in ("plain.pt", "nested.pt", "scripted.pt"):
        loaded = load_foreign_checkpoint(tmp_path / name, "resnet20_cifar", 10)
        assert torch.equal(loaded(x), model(x)), name


def test_mismatched_checkpoint_names_the_keys(akamaster: Path) -> None:
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: layer2\.0\.shortcut\.0\.weight"):
        load_foreign_checkpoint(akamaster, "resnet20_cifar", 10)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches: linear\.bias .*linear\.weight"):
        load_foreign_checkpoint(akamaster, "resnet20_cifar_a", 100)
    state = read_foreign_state_dict(akamaster)
    assert not any(k.startswith("module.") for k in state)


def test_default_model_loads_and_its_card_is_consistent(model_path: Path) -> None:
    model, card = load_checkpoint(model_path)
    assert model_path.stat().st_size <= 5 * 2**20
    assert card.num_classes == len(card.class_names) == 10 and card.class_names == CLASSES
    assert card.input_size == 32
    provenance = card.provenance
    assert {"data", "recipe", "command", "metrics"} <= set(provenance)
    assert provenance["command"].startswith("python -m models.train")
    assert provenance["metrics"]["test_top1"] >= 0.87
    assert json.loads(model_path.with_suffix(".json").read_text())["architecture"] == card.architecture


def test_default_model_accuracy_equals_its_card(model_path: Path, test_zip: Path) -> None:
    """The documented measurement (`python -m models.evaluate`), on all 10,000 test images."""
    model, card = load_checkpoint(model_path)
    measured = accuracy(model, load_zip(test_zip), card.mean, card.std)
    assert measured >= 0.87
    assert measured == pytest.approx(card.provenance["metrics"]["test_top1"], abs=1e-4)


def test_a_tiny_training_run_moves_the_loss_down(shared_data: Path) -> None:
    torch.manual_seed(0)
    data = load_zip(shared_data / "train.zip", limit_per_class=5)
    model = build_model("resnet20_cifar", 10)
    reinit_head(model)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert float(head.bias.abs().max()) == 0 and 0.01 < float(head.weight.std()) < 0.03
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    rng = np.random.default_rng(0)
    card = card_for("resnet20_cifar")
    losses = [train_epoch(model, optimizer, scheduler, data, card, 25, rng, head_only=False) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0], losses
