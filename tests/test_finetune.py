"""`tta finetune` (models/finetune.py, app/finetune_cli.py) and importance weighting (models/importance.py).

On a few dozen real CIFAR-10 test JPEGs (three per class to train on, one to validate), one torch thread, a batch of
8: every recipe flag, from the default model and from a foreign checkpoint, gives a checkpoint the server's loader
loads and that does what the flag says; one of them is served by the real server; an interrupted run resumes to the
same weights as an uninterrupted one; importance weighting reports its ESS and histogram and warns when the target
lies outside the source.
"""

import json
import shutil
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.cli import main as tta
from models.card import ForeignModel, ModelError, card_path, check_model_file
from models.checkpoint import load_checkpoint
from models.finetune import Recipe, finetune, partial_path, split, stages
from models.images import read_labelled
from models.importance import clip_normalised, importance_weights
from models.importer import open_model
from tests.servers import running_server
from tests.test_import import random_model, third_party_style

CLASSES3 = ("airplane", "cat", "ship")


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folders(jpeg_images: list, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ImageFolder layouts of the forty test JPEGs: train (3 per class), val (1 per class), a zip of train, and a
    three-class train/val pair for a new head."""
    root = tmp_path_factory.mktemp("images")
    for member, data, _ in jpeg_images:
        cls, name = member.split("/")[-2:]
        split_name = "val" if name.startswith("0003") else "train"
        for top in (split_name, *([f"{split_name}3"] if cls in CLASSES3 else [])):
            (root / top / cls).mkdir(parents=True, exist_ok=True)
            (root / top / cls / name).write_bytes(data)
    with zipfile.ZipFile(root / "train.zip", "w") as archive:
        for path in sorted((root / "train").rglob("*.jpg")):
            archive.write(path, f"train/{path.relative_to(root / 'train')}")
    return {name: root / name for name in ("train", "val", "train3", "val3", "train.zip")}


@pytest.fixture(scope="module")
def foreign_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A third-party-style pickle (state_dict under "state_dict", keys prefixed "module."), as tests/test_import.py
    makes them."""
    path = tmp_path_factory.mktemp("foreign") / "resnet20.th"
    torch.save(third_party_style(random_model("resnet20_cifar_a", 10)), path)
    return path


FOREIGN_FLAGS = ["--arch", "resnet20_cifar_a", "--classes", "cifar10", "--input-size", "32"]

# (name, flags, data): each recipe flag; the check each one's result gets is in test_each_recipe_flag
RECIPES = {
    "epochs": ["--epochs", "2"],
    "lr": ["--lr", "0.001"],
    "weight-decay-0": ["--weight-decay", "0"],
    "per-group-lr": ["--lr", "1e-12", "--head-lr", "0.05"],
    "freeze-stages": ["--freeze-stages", "2"],
    "freeze-prefix": ["--freeze", "conv1,bn1,layer1"],
    "reinit-head": ["--reinit-head"],
    "reinit-head-new-classes": ["--reinit-head"],
    "warm-start": ["--head-epochs", "1", "--epochs", "2"],
    "val-fraction-zip": ["--val-fraction", "0.25"],
}


def run(start: list[str], folders: dict[str, Path], recipe: str, out: Path) -> None:
    three = recipe == "reinit-head-new-classes"
    if recipe == "val-fraction-zip":
        data = ["--train", str(folders["train.zip"])]
    else:
        data = [
            "--train",
            str(folders["train3" if three else "train"]),
            "--val",
            str(folders["val3" if three else "val"]),
        ]
    tta(
        [
            "finetune",
            *start,
            *data,
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--no-progress",
            "--epochs",
            "1",
            *RECIPES[recipe],
        ]
    )


@pytest.mark.parametrize("start", ["default", "foreign"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_flag(
    recipe: str, start: str, folders: dict, model_path: Path, foreign_checkpoint: Path, tmp_path: Path
) -> None:
    flags = [str(model_path)] if start == "default" else [str(foreign_checkpoint), *FOREIGN_FLAGS]
    before, _ = open_model(Path(flags[0]), ForeignModel() if start == "default" else _foreign())
    out = tmp_path / "model.safetensors"
    run(flags, folders, recipe, out)

    check_model_file(out, imported=False)  # what `tta serve` checks before the slow imports, then loads
    after, card = load_checkpoint(out)
    finetuned = card.provenance
    assert finetuned["recipe"] == json.loads(Recipe.model_validate(finetuned["recipe"]).model_dump_json())
    assert len(finetuned["metrics"]["history"]) == finetuned["recipe"]["epochs"] == finetuned["epochs_done"]
    assert finetuned["command"].startswith(f"tta finetune {flags[0]}") and "--batch-size 8" in finetuned["command"]
    assert not partial_path(out).exists()
    assert card.source_distance is None, "new weights: the plausibility scale is not the base model's (9 images)"
    old, new = before.state_dict(), after.state_dict()
    changed = {k for k in old if k in new and old[k].shape == new[k].shape and not torch.equal(old[k], new[k])}
    if recipe == "reinit-head-new-classes":
        assert card.num_classes == 3 and card.class_names == list(CLASSES3)
        assert after.linear.out_features == 3 and finetuned["data"]["train_images"] == 9
    else:
        assert card.class_names == before_card_classes()
    if recipe == "per-group-lr":  # the backbone's rate is negligible: only the head (and BatchNorm statistics) move
        moved = {k for k in changed if not k.startswith("linear.") and "running" not in k and "num_batches" not in k}
        assert {"linear.weight", "linear.bias"} <= changed
        assert all((old[k] - new[k]).abs().max() < 1e-6 for k in moved)
    if recipe in ("freeze-stages", "freeze-prefix"):  # stem and layer1, statistics included, untouched
        assert not {k for k in changed if k.startswith(("conv1", "bn1", "layer1."))}
        assert any(k.startswith("layer2.") for k in changed)
    if recipe == "warm-start":  # one head-only epoch, then everything: the history has both
        assert finetuned["recipe"]["head_epochs"] == 1 and any(k.startswith("layer1.") for k in changed)
    if recipe == "val-fraction-zip":
        assert finetuned["data"]["val_images"] == 8 and finetuned["data"]["train_images"] == 22  # 30 x 0.25
    if recipe == "reinit-head":
        assert finetuned["recipe"]["reinit_head"]


def _foreign() -> ForeignModel:
    return ForeignModel(arch="resnet20_cifar_a", classes="cifar10", input_size=32)


def before_card_classes() -> list[str]:
    from models.importer import CIFAR10_CLASSES

    return list(CIFAR10_CLASSES)


def test_warm_start_epochs_leave_the_backbone_as_it_was(folders: dict, model_path: Path, tmp_path: Path) -> None:
    before, card = load_checkpoint(model_path)
    model, _ = load_checkpoint(model_path)
    train, val = read_labelled(folders["train"], card), read_labelled(folders["val"], card)
    out = tmp_path / "warm.safetensors"
    finetune(model, card, train, val, Recipe(epochs=1, head_epochs=1, batch_size=8), out, progress=False)
    old, new = before.state_dict(), load_checkpoint(out)[0].state_dict()
    assert [k for k in old if not torch.equal(old[k], new[k])] == ["linear.weight", "linear.bias"]


def test_stages_of_the_cifar_resnet_and_a_torchvision_one() -> None:
    assert stages(random_model("resnet20_cifar_a", 10)) == [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"]]
    assert stages(random_model("resnet18", 10))[:2] == [["conv1", "bn1"], ["layer1"]]


def test_an_interrupted_run_resumes_to_the_same_weights(folders: dict, model_path: Path, tmp_path: Path) -> None:
    _, card = load_checkpoint(model_path)
    train, val = split(read_labelled(folders["train.zip"], card), 0.25, seed=0)
    recipe = Recipe(epochs=3, batch_size=8, head_epochs=1, reinit_head=True)

    def train_to(out: Path, stop_at: int | None = None, resume: bool = False) -> None:
        def log(line: str) -> None:
            if stop_at is not None and line.startswith(f"epoch {stop_at}/"):
                raise KeyboardInterrupt  # as if stopped during epoch `stop_at`, before it was saved

        torch.manual_seed(0)  # the head's re-initialisation
        model, _ = load_checkpoint(model_path)
        finetune(model, card, train, val, recipe, out, resume=resume, progress=False, log=log)

    whole = tmp_path / "whole.safetensors"
    train_to(whole)
    interrupted = tmp_path / "interrupted.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train_to(interrupted, stop_at=3)
    assert partial_path(interrupted).exists()
    assert load_checkpoint(interrupted)[1].provenance["epochs_done"] == 2  # servable after every epoch
    model, _ = load_checkpoint(model_path)
    with pytest.raises(ModelError, match="written by another recipe"):
        finetune(model, card, train, val, Recipe(epochs=4, batch_size=8), interrupted, resume=True, progress=False)
    train_to(interrupted, resume=True)
    whole_model, whole_card = load_checkpoint(whole)
    resumed_model, resumed_card = load_checkpoint(interrupted)
    a, b = whole_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop_time = [{k: v for k, v in e.items() if k != "seconds"} for e in whole_card.provenance["metrics"]["history"]]
    assert drop_time == [
        {k: v for k, v in e.items() if k != "seconds"} for e in resumed_card.provenance["metrics"]["history"]
    ]
    assert not partial_path(interrupted).exists()


def test_a_new_head_is_served_by_the_real_server(folders: dict, model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "three.safetensors"
    run([str(model_path)], folders, "reinit-head-new-classes", out)
    image = next((folders["val3"] / "cat").iterdir()).read_bytes()
    with running_server(args=("--model", str(out))) as (url, _):
        answer = httpx.post(f"{url}/predict", files={"files": ("cat.jpg", image, "image/jpeg")}, timeout=60).json()
        status = httpx.get(f"{url}/v1/status", timeout=10).json()
    assert status["model"]["class_names"] == list(CLASSES3)
    assert answer["predictions"][0]["class_name"] in CLASSES3


def test_weights_follow_the_density_ratio() -> None:
    """Features from N(0, 1) (source) and N(0.5, 1) (target) in 4 dimensions: the true ratio is exp(0.5 x1 - 1/8)."""
    rng = np.random.default_rng(0)
    source = torch.tensor(rng.normal(0, 1, (3000, 4)), dtype=torch.float32)
    target = torch.tensor(rng.normal(0, 1, (1000, 4)) + [0.5, 0, 0, 0], dtype=torch.float32)
    result = importance_weights(source, target, max_weight=50)
    true = torch.exp(0.5 * source[:, 0] - 0.125)
    assert np.corrcoef(result.weights.numpy(), true.numpy())[0, 1] > 0.95
    assert abs(result.raw_mean - 1) < 0.05  # calibrated: E_s[p_t / p_s] = 1 with the n_s / n_t correction
    assert abs(float(result.weights.mean()) - 1) < 1e-5
    assert result.ess == pytest.approx(float(result.weights.sum() ** 2 / (result.weights**2).sum()))
    assert 0.55 < result.auc < 0.75 and result.warning() is None
    separated = importance_weights(source, target + 10, max_weight=10)
    assert separated.auc > 0.98 and "outside the source's support" in separated.warning()

    weights, clipped = clip_normalised(torch.tensor([1.0] * 98 + [500.0, 1000.0], dtype=torch.float64), 10)
    assert float(weights.max()) == pytest.approx(10, rel=1e-6) and clipped == 2  # clipped, and still mean 1
    assert float(weights.mean()) == pytest.approx(1, rel=1e-9) and float(weights[0]) == pytest.approx(
        1 / 1.225
    )  # t = 12.25


def test_importance_weighting_reports_ess_histogram_and_warns_outside_the_support(
    folders: dict, model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):  # uniform noise: no CIFAR-10 image looks like it
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise / f"{i}.png")
    out = tmp_path / "weighted.safetensors"
    tta(
        ["finetune", str(model_path), "--source", str(folders["train"]), "--val", str(folders["val"])]
        + ["--target-unlabeled", str(noise), "--importance-weighting", "--out", str(out)]
        + ["--batch-size", "8", "--epochs", "1", "--no-progress"]
    )
    report = load_checkpoint(out)[1].provenance["importance_weighting"]
    assert report["n_source"] == 30 and report["n_target"] == 30
    assert 1 <= report["ess"] <= 30 and sum(report["histogram"]["counts"]) == 30
    assert report["auc_held_out"] > 0.98 and "outside the source's support" in report["warning"]
    assert "p_s(x) > 0" in report["assumption"]
    assert (tmp_path / "weighted.weights.png").stat().st_size > 1000 and report[
        "histogram_png"
    ] == "weighted.weights.png"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "outside the source's support" in warnings[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--importance-weighting"], "needs --target-unlabeled"),
        (["--freeze", "nothing"], "--freeze nothing: no parameter"),
        (["--freeze-stages", "9"], "has 4 stages"),
        (["--freeze", "linear"], "freezes the head"),
        (["--out", "x.pt"], "must end in .safetensors"),
        (["--weight-decay", "-1"], "weight_decay"),
    ],
)
def test_bad_recipes_are_refused_in_one_line(
    flags: list[str], message: str, folders: dict, model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        tta(
            ["finetune", str(model_path), "--train", str(folders["train"]), "--out", str(tmp_path / "m.safetensors")]
            + flags
        )
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("tta finetune: ") and message in error and "\n" not in error


def test_some_of_the_models_classes_keep_its_head_and_classes_it_lacks_need_a_new_one(
    folders: dict, model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Three of the ten classes (as a capture's labelled/ folder holds the classes labelled so far) train the model's
    own ten-class head; a class the model does not have is refused unless the head is re-initialised."""
    out = tmp_path / "some.safetensors"
    flags = ["--val", str(folders["val3"]), "--batch-size", "8", "--epochs", "1", "--no-progress"]
    tta(["finetune", str(model_path), "--train", str(folders["train3"]), "--out", str(out), *flags])
    card = load_checkpoint(out)[1]
    assert card.num_classes == 10 and card.provenance["data"]["train_images"] == 9
    unknown = tmp_path / "unknown"
    shutil.copytree(folders["train3"], unknown)
    (unknown / "cat").rename(unknown / "unicorn")
    refused = tmp_path / "refused.safetensors"
    with pytest.raises(SystemExit):
        tta(["finetune", str(model_path), "--train", str(unknown), "--out", str(refused), *flags])
    assert "pass --reinit-head" in capsys.readouterr().err
    assert not card_path(refused).exists()
