"""Serving one's own model: `tta import` and `tta serve --model FOREIGN --arch ...`, the model card and its schema,
start-up errors, the generated flags, and adaptation defaults that hold at 1,000 classes.

Every model is made here with random weights (nothing is downloaded); the third-party checkpoint in ../shared is used
where present.
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import torchvision
import yaml
from safetensors.torch import save_file

from app.adaptation import norm
from app.adaptation.engine import AdaptationEngine
from app.config import DEFAULT_MODEL, Settings
from app.serving.preprocess import ImageLimits, decode_all, fit
from models.card import IMAGENET_MEAN, IMAGENET_STD, ForeignModel, ModelError, card_path, card_schema, read_card
from models.checkpoint import load_checkpoint
from models.data import SHARED_DIR, normalize
from models.importer import CIFAR10_CLASSES, class_names, import_checkpoint
from models.registry import build_model
from tests.conftest import make_png
from tests.servers import ROOT, free_port, running_server

# Making a TorchScript file is deprecated in torch 2.14; users still have them, so the test makes one.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.(script|save)` is deprecated")

AKAMASTER = SHARED_DIR / "pretrained" / "cifar10_resnet20_akamaster.th"
LIMITS = ImageLimits(10**8, 10**8, 10**9)


def tta(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The `tta` command, without the TTA_ variables of the environment running the tests."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=timeout
    )


def third_party_style(model: torch.nn.Module) -> dict:
    """What the akamaster checkpoints hold: a DataParallel state_dict nested under "state_dict", and a figure."""
    return {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "best_prec1": 93.4}


def random_model(architecture: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(architecture, num_classes).eval()
    with torch.no_grad():  # running statistics other than 0/1, so that a checkpoint that loses them shows
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """A user's own files: (path, the model that wrote it) per kind."""
    folder = tmp_path_factory.mktemp("foreign")
    resnet56 = random_model("resnet56_cifar_a", 10)
    torch.save(third_party_style(resnet56), folder / "resnet56.th")
    resnet18 = random_model("resnet18", 10, seed=1)
    torch.save(resnet18.state_dict(), folder / "resnet18.pth")
    torch.jit.save(torch.jit.script(resnet18), folder / "resnet18_scripted.pt")
    save_file(resnet18.state_dict(), str(folder / "resnet18_bare.safetensors"))
    return {
        "cifar_th": (folder / "resnet56.th", resnet56),
        "resnet18_state_dict": (folder / "resnet18.pth", resnet18),
        "resnet18_torchscript": (folder / "resnet18_scripted.pt", resnet18),
        "resnet18_safetensors": (folder / "resnet18_bare.safetensors", resnet18),
    }


@pytest.fixture(scope="module")
def akamaster() -> Path:
    """The third-party ResNet-20 of ../shared; skipped without it, except under CI=true (tests/conftest.py)."""
    if not AKAMASTER.is_file():
        reason = f"third-party checkpoint not found at {AKAMASTER}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so this is an error rather than a skip")
        pytest.skip(reason)
    return AKAMASTER


def images(count: int) -> list[tuple[str, bytes]]:
    return [(f"{i}.png", make_png(48, 40, seed=i)) for i in range(count)]


def offline_prediction(model: torch.nn.Module, files: list[tuple[str, bytes]], card_json: dict) -> torch.Tensor:
    """What the served model should answer on its first request: the source model on the card's preprocessing."""
    x = decode_all(files, card_json["input_size"], LIMITS, card_json.get("resize"))
    with torch.inference_mode():
        return model(normalize(x, tuple(card_json["mean"]), tuple(card_json["std"]))).softmax(1)


def predict(url: str, files: list[tuple[str, bytes]], timeout: float = 60) -> dict:
    multipart = [("files", (name, data, "image/png")) for name, data in files]
    answer = httpx.post(f"{url}/predict", files=multipart, timeout=timeout)
    assert answer.status_code == 200, answer.text
    return answer.json()


def assert_served_as_offline(answer: dict, probabilities: torch.Tensor, names: list[str]) -> None:
    predictions = answer["predictions"]
    assert len(predictions) == len(probabilities)
    for prediction, p in zip(predictions, probabilities, strict=True):
        assert prediction["class_name"] == names[prediction["class_index"]]
        assert prediction["confidence"] == pytest.approx(float(p.max()), abs=1e-4)
        assert float(p[prediction["class_index"]]) == pytest.approx(float(p.max()), abs=1e-4)


# ----------------------------------------------------------------------------------------------- the importer


def test_class_names_come_with_the_code(tmp_path: Path) -> None:
    assert class_names("cifar10") == CIFAR10_CLASSES
    imagenet = class_names("imagenet")
    assert len(imagenet) == 1000 and imagenet[0] == "tench" and imagenet[-1] == "toilet tissue"
    assert class_names("3") == ["0", "1", "2"]
    (tmp_path / "names.txt").write_text("cat\n\n dog \n")
    assert class_names(str(tmp_path / "names.txt")) == ["cat", "dog"]
    with pytest.raises(ModelError, match="neither a count"):
        class_names("cifar100")


@pytest.mark.parametrize("kind", ["cifar_th", "resnet18_state_dict", "resnet18_torchscript", "resnet18_safetensors"])
def test_every_foreign_format_imports_to_the_same_outputs(kind: str, foreign: dict) -> None:
    path, original = foreign[kind]
    arch = "resnet56_cifar_a" if kind == "cifar_th" else "resnet18"
    model, card = import_checkpoint(path, ForeignModel(arch=arch, classes="cifar10", input_size=32))
    assert card.class_names == CIFAR10_CLASSES and card.provenance["imported_from"] == path.name
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), original(x))


def test_wrong_architecture_names_the_closest_that_fits(foreign: dict) -> None:
    path, _ = foreign["cifar_th"]
    with pytest.raises(ModelError) as error:  # projection shortcuts for a zero-padding checkpoint
        import_checkpoint(path, ForeignModel(arch="resnet56_cifar", classes="cifar10", input_size=32))
    assert "missing keys: layer2.0.shortcut.0.weight" in str(error.value)
    assert "These registry entries fit the weights: resnet56_cifar_a" in str(error.value)
    with pytest.raises(ModelError, match="closest registry entries: resnet56_cifar_a"):
        import_checkpoint(path, ForeignModel(arch="resnet56_cifar_aa", classes="cifar10", input_size=32))
    with pytest.raises(ModelError, match=r"shape mismatches: linear.bias \(checkpoint \(10,\), model \(100,\)\)"):
        import_checkpoint(path, ForeignModel(arch="resnet56_cifar_a", classes="100", input_size=32))


def test_architecture_of_ones_own_by_import_path(tmp_path: Path) -> None:
    """`package.module:Class` with --arch-kwargs; num_classes is passed because the constructor takes it."""
    model = random_model("resnet20_cifar", 4)
    torch.save(model.state_dict(), tmp_path / "own.pt")
    spec = ForeignModel(arch="models.cifar_resnet:CifarResNet", arch_kwargs={"depth": 20}, classes="4", input_size=32)
    imported, card = import_checkpoint(tmp_path / "own.pt", spec)
    assert card.architecture_kwargs == {"depth": 20}
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(imported(x), model(x))
    with pytest.raises(ModelError, match="cannot import architecture"):
        import_checkpoint(tmp_path / "own.pt", spec.model_copy(update={"arch": "models.nowhere:Net"}))


def test_tta_calibrate_writes_the_plausibility_scale_into_the_card(
    model_path: Path, shared_data: Path, tmp_path: Path
) -> None:
    """`tta calibrate` measures 2,000 training images spread over the zip and writes their source distance into the
    card, changing nothing else: the same figures as the committed default card's, which was made so."""
    committed = read_card(card_path(model_path))
    assert committed.source_distance is not None
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(model_path.read_bytes())
    card_path(weights).write_text(committed.model_copy(update={"source_distance": None}).model_dump_json())
    done = tta("calibrate", str(weights), "--images", str(shared_data / "train.zip"))
    assert done.returncode == 0, done.stderr
    assert "99th percentile" in done.stdout
    calibrated = read_card(card_path(weights))
    assert calibrated.source_distance is not None and calibrated.source_distance.images == 2000
    assert calibrated.source_distance.q99 == pytest.approx(committed.source_distance.q99, rel=1e-5)
    assert calibrated.source_distance.median < calibrated.source_distance.q99
    assert calibrated.model_copy(update={"source_distance": None}) == committed.model_copy(
        update={"source_distance": None}
    )
    few = tmp_path / "few"
    few.mkdir()
    for name, data in images(5):
        (few / name).write_bytes(data)
    for images_path, message in ((few, "too few"), (tmp_path / "absent", "does not exist")):
        refused = tta("calibrate", str(weights), "--images", str(images_path))
        assert refused.returncode == 2 and message in refused.stderr and refused.stderr.count("\n") == 1, refused


def test_tta_import_writes_a_readable_checkpoint_and_card(foreign: dict, tmp_path: Path) -> None:
    path, original = foreign["resnet18_torchscript"]
    out = tmp_path / "served" / "resnet18.safetensors"
    old = os.umask(0o077)  # the umask of a careful user: the files must still be readable by others
    try:
        flags = "--arch resnet18 --classes cifar10 --input-size 64 --resize 72 --mean 0.5,0.5,0.5 --std 0.25,0.25,0.25"
        result = tta("import", str(path), *flags.split(), "--out", str(out))
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    assert f"tta serve --model {out}" in result.stdout
    for written in (out, card_path(out)):
        assert written.stat().st_mode & 0o777 == 0o644, written
    model, card = load_checkpoint(out)
    assert (card.input_size, card.resize, card.mean, card.std) == (64, 72, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), original(x))
    shown = tta("card", str(out))
    assert shown.returncode == 0 and json.loads(shown.stdout)["class_names"] == CIFAR10_CLASSES


def test_tta_import_refuses_in_one_line(foreign: dict, tmp_path: Path) -> None:
    path, _ = foreign["cifar_th"]
    for flags, needed in (
        ("--arch resnet56_cifar_a --input-size 32", "needs --classes"),
        ("--arch resnet56_cifar --classes cifar10 --input-size 32", "fit the weights: resnet56_cifar_a"),
        ("--arch resnet56_cifar_a --classes cifar10 --input-size 32 --resize 16", "resize 16"),
    ):
        result = tta("import", str(path), *flags.split(), "--out", str(tmp_path / "x.safetensors"))
        assert result.returncode == 2 and needed in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout, result.stderr
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------------------------- the card


def test_card_schema_is_published_in_the_readme() -> None:
    result = tta("card-schema")
    assert result.returncode == 0
    assert json.loads(result.stdout) == card_schema()
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- card-schema -->\n```json\n(.*?)```", readme, re.S)
    assert block, "README.md lacks the card schema block (<!-- card-schema --> then a json code block)"
    assert json.loads(block.group(1)) == card_schema(), "README's card schema differs from `tta card-schema`"
    for field in card_schema()["properties"]:
        assert f"| `{field}` |" in readme, f"README's card table lacks {field}"


def test_default_card_keeps_todays_preprocessing(tmp_path: Path) -> None:
    """No resize in the default card: the shorter side goes straight to the input size, bit for bit as before."""
    card = read_card(card_path(DEFAULT_MODEL))
    assert card.resize is None and card.input_size == 32
    image = torch.randint(0, 256, (3, 45, 60), dtype=torch.uint8)
    before = torchvision.transforms.v2.functional.center_crop(
        torchvision.transforms.v2.functional.resize(image, [32], antialias=True), [32, 32]
    )
    assert torch.equal(fit(image, 32), before) and torch.equal(fit(image, 32, card.resize), before)
    exact = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(fit(exact, 32), exact)


def test_resize_then_centre_crop() -> None:
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    expected = torchvision.transforms.v2.functional.center_crop(
        torchvision.transforms.v2.functional.resize(image, [256], antialias=True), [224, 224]
    )
    assert torch.equal(fit(image, 224, 256), expected)
    square = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8)  # resized up and cropped, like any other
    assert not torch.equal(fit(square, 224, 256), square)


def test_card_errors_name_the_field(tmp_path: Path) -> None:
    good = json.loads(card_path(DEFAULT_MODEL).read_text())
    for change, needed in (
        ({"num_classes": 0}, "num_classes: Input should be greater than 0"),
        ({"input_sise": 32}, "input_sise: Extra inputs are not permitted"),
        ({"mean": [0.5, 0.5]}, "mean.2: Field required"),
        ({"class_names": ["a"]}, "card lists 1 class names for 10 classes"),
    ):
        (tmp_path / "card.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ModelError, match=re.escape(needed)):
            read_card(tmp_path / "card.json")


# ----------------------------------------------------------------------------------------------- tta serve


def test_every_setting_is_a_flag_with_its_default_and_variable() -> None:
    result = tta("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps help lines
    for name, field in Settings.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        if name == "admin_token":  # a secret: the variable only (a command line is readable by every user)
            assert flag not in text
            continue
        assert field.description, f"setting {name} has no description to make its --help from"
        assert re.search(rf"{flag} \S+ {re.escape(field.description[:30])}", text), flag
        assert f"[env: TTA_{name.upper()}]" in text, name
    assert "--max-batch-size int images per model batch (default: 64)" in text
    assert "--guard-balance bool" in text


@pytest.fixture
def broken(tmp_path: Path, foreign: dict) -> dict[str, list[str]]:
    """Wrong start-ups, each with the words its one- or two-line refusal must hold."""
    without_card = tmp_path / "nocard.safetensors"
    without_card.write_bytes(DEFAULT_MODEL.read_bytes())
    bad_card = tmp_path / "badcard.safetensors"
    bad_card.write_bytes(DEFAULT_MODEL.read_bytes())
    card_path(bad_card).write_text(card_path(DEFAULT_MODEL).read_text().replace('"input_size": 32', '"input_size": -1'))
    return {
        "missing file": ["--model", str(tmp_path / "nowhere.safetensors")],
        "foreign file without flags": ["--model", str(foreign["cifar_th"][0])],
        "missing card": ["--model", str(without_card)],
        "invalid card": ["--model", str(bad_card)],
        "weights that do not fit": [
            "--model",
            str(foreign["cifar_th"][0]),
            *["--arch", "resnet56_cifar", "--classes", "10", "--input-size", "32"],
        ],
        "unknown device": ["--device", "tpu"],
        "CUDA without CUDA": ["--device", "cuda"],
    }


REFUSALS = {
    "missing file": "nowhere.safetensors does not exist",
    "foreign file without flags": "is a PyTorch checkpoint (torch.save), not a checkpoint of this server's format",
    "missing card": "nocard.json is missing beside",
    "invalid card": "input_size: Input should be greater than 0",
    "weights that do not fit": "These registry entries fit the weights: resnet56_cifar_a",
    "unknown device": "device must be auto, cpu, cuda or cuda:N, not 'tpu'",
    "CUDA without CUDA": "TTA_DEVICE=cuda, but this machine has no CUDA device",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_wrong_startup_is_refused_in_two_lines(case: str, broken: dict) -> None:
    if case == "CUDA without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    started = time.monotonic()
    result = tta("serve", "--port", str(free_port()), *broken[case], timeout=300)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    assert "Traceback" not in output and len(output.splitlines()) <= 2, output
    assert REFUSALS[case] in output, output
    print(f"{case}: refused in {time.monotonic() - started:.1f} s")


def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "locked.safetensors"
    path.write_bytes(DEFAULT_MODEL.read_bytes())
    card_path(path).write_text(card_path(DEFAULT_MODEL).read_text())
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("this user (root) reads a file of mode 000")
    result = tta("serve", "--port", str(free_port()), "--model", str(path))
    assert result.returncode == 2 and "cannot read checkpoint" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def server_for() -> Iterator:
    """`running_server` for a model, its log shown when the test fails."""
    logs: list[Path] = []

    def start(args: list[str], tmp: Path, ready_timeout_s: float = 300):
        logs.append(tmp / f"server{len(logs)}.log")
        return running_server(log=logs[-1], args=("--method", "tent", *args), ready_timeout_s=ready_timeout_s)

    yield start
    for log in logs:
        if log.exists():
            print(log.read_text()[-3000:])


@pytest.mark.parametrize(
    ("kind", "how"),
    [("cifar_th", "import"), ("resnet18_state_dict", "serve"), ("resnet18_torchscript", "import")],
)
def test_each_kind_goes_from_its_file_to_a_served_prediction(
    kind: str, how: str, foreign: dict, tmp_path: Path, server_for
) -> None:
    path, original = foreign[kind]
    arch = "resnet56_cifar_a" if kind == "cifar_th" else "resnet18"
    resize = None if kind == "cifar_th" else 36
    flags = ["--arch", arch, "--classes", "cifar10", "--input-size", "32", *(["--resize", "36"] if resize else [])]
    # imported in memory, with persistence on: the snapshot's model identity comes from the card made at start
    served = ["--model", str(path), *flags, "--state-dir", str(tmp_path / "state")]
    if how == "import":
        out = tmp_path / f"{kind}.safetensors"
        result = tta("import", str(path), *flags, "--out", str(out))
        assert result.returncode == 0, result.stderr
        served = ["--model", str(out)]
    card_json = {"input_size": 32, "resize": resize, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    files = images(16)
    with server_for(served, tmp_path) as (url, _):
        answer = predict(url, files)
        status = httpx.get(f"{url}/v1/status").json()
    assert status["model"]["architecture"] == arch and status["model"]["resize"] == resize
    assert status["persistence"]["enabled"] == (how == "serve")
    assert_served_as_offline(answer, offline_prediction(original, files, card_json), CIFAR10_CLASSES)


def test_the_third_party_checkpoint_is_served(akamaster: Path, tmp_path: Path, server_for) -> None:
    out = tmp_path / "akamaster.safetensors"
    flags = ["--arch", "resnet20_cifar_a", "--classes", "cifar10", "--input-size", "32"]
    result = tta("import", str(akamaster), *flags, "--out", str(out))
    assert result.returncode == 0, result.stderr
    model, card = load_checkpoint(out)
    files = images(8)
    with server_for(["--model", str(out)], tmp_path) as (url, _):
        answer = predict(url, files)
    assert_served_as_offline(answer, offline_prediction(model, files, card.model_dump()), CIFAR10_CLASSES)


def test_imagenet_resnet50_serves_64_images_within_its_timeout(tmp_path: Path, server_for) -> None:
    """A 1,000-class ResNet-50 at 224 px (resize 256), imported in memory by `tta serve` alone: a 64-image request
    is answered, not a 504, because the default timeout scales to what a full batch costs on this machine. Without
    the batch correction (`--batch-stats-prior 0`) the first batch is normalised with the source's statistics, so the
    answer is the source model's own."""
    model = random_model("resnet50", 1000)
    torch.save(model.state_dict(), tmp_path / "resnet50.pth")
    flags = ["--arch", "resnet50", "--classes", "imagenet", "--input-size", "224", "--resize", "256"]
    flags += ["--batch-stats-prior", "0"]
    files = images(64)
    with server_for(["--model", str(tmp_path / "resnet50.pth"), *flags], tmp_path, ready_timeout_s=600) as (url, _):
        started = time.monotonic()
        answer = predict(url, files, timeout=3600)
        took = time.monotonic() - started
        log = (tmp_path / "server0.log").read_text()
    scaled = re.search(r"request timeout (\d+) s instead of 30 s", log)
    print(f"resnet50, 64 images at 224 px: {took:.1f} s; {scaled.group(0) if scaled else 'timeout not scaled'}")
    assert took < (float(scaled.group(1)) if scaled else 30.0)
    names = class_names("imagenet")
    card_json = {"input_size": 224, "resize": 256, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    assert_served_as_offline(answer, offline_prediction(model, files, card_json), names)


# ----------------------------------------------------------------------------------------------- 1,000 classes


class Prototypes(torch.nn.Module):
    """A 1,000-class model whose prediction is whichever class's prototype an image is closest to: fed images made
    from prototypes drawn at random, its predictions are i.i.d. over the classes, each confident but not certain
    (about 0.75), as a trained ImageNet model's are on its own domain."""

    def __init__(self, prototypes: torch.Tensor) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm2d(3)
        self.head = torch.nn.Linear(prototypes[0].numel(), len(prototypes), bias=False)
        with torch.no_grad():  # a margin of about 8 nats between the true class and the others
            self.head.weight.copy_(prototypes.flatten(1) * 8 / prototypes[0].numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x).flatten(1))


def test_a_1000_class_model_adapts_on_iid_traffic_with_default_settings() -> None:
    torch.manual_seed(0)
    prototypes = torch.randn(1000, 3, 10, 10)
    engine = AdaptationEngine(Prototypes(prototypes), 1000, Settings(), torch.device("cpu"))
    for _ in range(12):
        classes = torch.randint(0, 1000, (64,))
        logits = engine.step(prototypes[classes] + 0.1 * torch.randn(64, 3, 10, 10)).logits
        assert (logits.argmax(1) == classes).float().mean() > 0.95
    assert engine.stats.steps_total == 12, engine.stats.skipped  # every batch, not one in eight
    assert sum(engine.stats.skipped.values()) == 0 and sum(engine.stats.resets.values()) == 0


def test_a_rollback_after_the_statistics_moved_puts_back_exactly_what_the_batch_changed() -> None:
    """A non-finite gradient comes after the batch has joined the statistics: the rollback restores the rows it
    changed (saved alone, not a copy of every row), the parameters and the optimiser, bit for bit."""
    torch.manual_seed(0)
    prototypes = torch.randn(1000, 3, 10, 10)
    engine = AdaptationEngine(Prototypes(prototypes), 1000, Settings(), torch.device("cpu"))

    def batch() -> torch.Tensor:
        return prototypes[torch.randint(0, 1000, (64,))] + 0.1 * torch.randn(64, 3, 10, 10)

    engine.step(batch())
    before = engine.state.checkpoint()
    engine.params[0].register_hook(lambda grad: grad * float("nan"))
    engine.step(batch())
    after = engine.state.checkpoint()
    assert engine.stats.skipped["nonfinite"] == 1 and engine.stats.steps_total == 1
    assert before["tensors"].keys() == after["tensors"].keys()
    assert all(torch.equal(before["tensors"][k], after["tensors"][k]) for k in before["tensors"])
    for saved, restored in zip(
        before["optimizer"]["state"].values(), after["optimizer"]["state"].values(), strict=True
    ):
        assert all(torch.equal(torch.as_tensor(saved[k]), torch.as_tensor(restored[k])) for k in saved)


def test_statistics_memory_is_bounded_at_1000_classes_and_not_copied_per_batch() -> None:
    """ResNet-50 at 1,000 classes: as many rows of statistics per layer as the default budget holds (12 MB: 56 rows
    of 26,560 channels), not 1,000; the source statistics the plausibility guard reads are the source's own tensors,
    not a copy per stream; the rollback point of a batch holds the parameters and the rows the batch changes."""
    model = torchvision.models.resnet50(num_classes=1000)
    engine = AdaptationEngine(model, 1000, Settings(), torch.device("cpu"))
    layers = [m for m in engine.adapted.modules() if isinstance(m, norm.TestTimeBatchNorm)]
    live = sum(m.class_mean.nbytes + m.class_sqmean.nbytes for m in layers)
    assert {len(m.class_mean) for m in layers} == {56} and live <= Settings().stats_memory_mb * 1e6
    sources = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for layer, bn in zip(layers, sources, strict=True):
        assert layer.source_mean.data_ptr() == bn.running_mean.data_ptr()
        assert layer.source_var.data_ptr() == bn.running_var.data_ptr()
    rollback_point = engine.state.checkpoint(statistics=False)
    assert sum(t.nbytes for t in rollback_point["tensors"].values()) < 2**20  # the affine parameters alone


def test_balance_threshold_at_10_100_and_1000_classes() -> None:
    """The class-balance check against ln min(C, n): unchanged at 10 classes, reachable by 64 predictions at 1,000."""
    settings = Settings()
    assert settings.balance_threshold(10, 64) == pytest.approx(0.6 * math.log(10))
    assert (
        settings.balance_threshold(100, 64) == settings.balance_threshold(1000, 64) == pytest.approx(0.6 * math.log(64))
    )


# ----------------------------------------------------------------------------------------------- the container


def test_compose_takes_a_model_directory_and_the_import_variables() -> None:
    """TTA_MODEL_DIR is mounted read-only at /models, TTA_MODEL names a file in it (the default model by default), and
    the import variables pass through, empty when unset, which the settings read as unset."""
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    for name in ("tta", "tta-gpu"):
        service = compose["services"][name]
        assert "${TTA_MODEL_DIR:-../models/default}:/models:ro" in service["volumes"], name
        environment = service["environment"]
        model = re.fullmatch(r"\$\{TTA_MODEL:-/models/(.+)\}", environment["TTA_MODEL"])
        assert model and (ROOT / "models" / "default" / model.group(1)) == DEFAULT_MODEL, environment["TTA_MODEL"]
        for variable in ("TTA_ARCH", "TTA_CLASSES", "TTA_INPUT_SIZE", "TTA_RESIZE"):
            assert environment[variable] == f"${{{variable}:-}}", variable
    unset = ForeignModel(arch="", classes="", input_size="", resize="")
    assert (unset.arch, unset.classes, unset.input_size, unset.resize) == (None, None, None, None)
