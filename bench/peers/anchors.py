"""The published TTA methods as peers in the stream benchmark: Döbler et al.'s online-TTA benchmark code, run
unmodified from ../shared/anchors/tta-benchmark on our model and our stream.

Their code is imported from ../shared at run time (sys.path), never copied into the project. Around it, only what
its README says it needs: a bare `methods` package (its __init__ imports every method, CLIP ones too, so only the
modules run here are imported), a dummy `models.model` (an isinstance check and LAME's encoder/classifier split),
a `datasets.data_loading` that gives EATA's Fisher information source images from the training split
(train.zip, never the test split), and our model wrapped to take images in [0, 1] and normalise inside, as
theirs do. Each method's config is conf.py's defaults merged with cfgs/cifar10_c/<method>.yaml; only
TEST.BATCH_SIZE changes (to the benchmark's batch) and the device is whatever TTAMethod picks (cuda when there is
one, else cpu).

Prequential order: every one of these predicts a batch with the forward made before the update that batch
causes, so its prediction is scored on data it has not yet adapted to, as ours:

- bn-anchor (BNTest): BatchNorm in train mode, the batch normalised with its own statistics; no state kept;
- tent-anchor (Tent), eata (EATA), sar (SAR): the outputs of the forward that computes the loss, taken before
  the optimiser step (SAR: the first of its two forwards; its model recovery resets after the prediction);
- roid (ROID): the same forward's outputs, then multiplied by a smoothed prior of the batch's own predictions
  (prior correction); the weight ensembling with the source comes after;
- rotta (RoTTA): the teacher's outputs, computed before the batch enters the memory and before any update
  made from the memory within the batch;
- lame (LAME): no parameter changes; the frozen model's outputs refined over the batch's own affinity graph;
- cotta (CoTTA): the teacher's (augmentation-averaged) outputs, before the student's step and the EMA update.

Like ours, each uses the current batch itself (statistics, affinity or prior) to predict it, except RoTTA,
whose robust BatchNorm predicts with statistics from earlier batches only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import random
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.data import SHARED_DATA, SHARED_DIR, load_zip

ANCHOR_DIR = SHARED_DIR / "anchors" / "tta-benchmark"
SOURCE_TRAIN_ZIP = SHARED_DATA / "train.zip"
MODEL_RESET = "model recovery"  # a reset the method itself makes (SAR's recovery scheme)


@dataclass(frozen=True)
class Anchor:
    config: str  # cfgs/cifar10_c/<config>.yaml
    module: str  # methods.<module>
    cls: str  # the method's class in that module


ANCHORS: dict[str, Anchor] = {
    "bn-anchor": Anchor("norm_test", "norm", "BNTest"),
    "tent-anchor": Anchor("tent", "tent", "Tent"),
    "eata": Anchor("eata", "eata", "EATA"),
    "sar": Anchor("sar", "sar", "SAR"),
    "roid": Anchor("roid", "roid", "ROID"),
    "rotta": Anchor("rotta", "rotta", "RoTTA"),
    "lame": Anchor("lame", "lame", "LAME"),
    "cotta": Anchor("cotta", "cotta", "CoTTA"),
}
ANCHOR_METHODS = tuple(ANCHORS)


def anchor_available() -> str | None:
    """None when the anchors can run here, else why not."""
    if not (ANCHOR_DIR / "methods" / "base.py").is_file():
        return f"the anchors' code is not at {ANCHOR_DIR}"
    for package in ("yacs", "iopath"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed (pip install -e '.[bench]')"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Our model as theirs: [0, 1] images in, normalised inside
# ---------------------------------------------------------------------------------------------------------------


class UnitRangeModel(nn.Module):
    """Our checkpoint taking images in [0, 1] and normalising with its card's mean and std, as their models do."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.model_preprocess = None  # TTAMethod and EATA read it; theirs is a torchvision Compose or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)

    def head(self) -> nn.Linear:
        """The classifier: the last Linear layer (LAME refines the outputs over the features that enter it)."""
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the model has no Linear layer, so LAME cannot split it into encoder and classifier")
        return linears[-1]


class _Features(nn.Module):
    """The input of the model's last Linear layer: LAME's encoder for any architecture ending in one."""

    def __init__(self, model: UnitRangeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        hook = self.model.head().register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            self.model(x)
        finally:
            hook.remove()
        return captured[0]


def _split_up_model(model: UnitRangeModel, arch_name: str, dataset_name: str) -> tuple[nn.Module, nn.Module]:
    return _Features(model), model.head()


class _NoDomainNetModel:
    """Stands in for models.model.ResNetDomainNet126 (their code only tests isinstance against it)."""


def _source_loader(*, batch_size: int, num_samples: int, **_ignored: Any) -> tuple[None, list[list[torch.Tensor]]]:
    """datasets.data_loading.get_source_loader for EATA's Fisher information: `num_samples` images of the
    training split (the first num_samples/10 of each class of train.zip, shuffled with a fixed seed), in [0, 1]
    as their CIFAR source transform (ToTensor) gives them, in batches of `batch_size`."""
    data = load_zip(SOURCE_TRAIN_ZIP, limit_per_class=-(-num_samples // 10))
    order = torch.as_tensor(np.random.default_rng(0).permutation(len(data))[:num_samples])
    images, labels = data.images[order].float() / 255.0, data.labels[order]
    loader = [[images[s : s + batch_size], labels[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    return None, loader


# ---------------------------------------------------------------------------------------------------------------
# Importing their code
# ---------------------------------------------------------------------------------------------------------------

_PACKAGES = ("methods", "utils", "augmentations")  # their top-level packages, bound to their folders
_STUBS = ("models.model", "datasets", "datasets.data_loading")


@contextlib.contextmanager
def _their_import_path() -> Iterator[None]:
    """Their packages and the stand-ins importable for the duration; every name added is removed after, so the
    rest of the process (our own `models` package, any other `utils`) sees nothing of them."""
    before = set(sys.modules)
    for name in _PACKAGES:
        package = types.ModuleType(name)
        package.__path__ = [str(ANCHOR_DIR / name)]  # bare: methods/__init__.py (every method) is not run
        sys.modules[name] = package
    model_stub = types.ModuleType("models.model")
    model_stub.ResNetDomainNet126 = _NoDomainNetModel
    model_stub.split_up_model = _split_up_model
    datasets_stub = types.ModuleType("datasets.data_loading")
    datasets_stub.get_source_loader = _source_loader
    sys.modules.update({"models.model": model_stub, "datasets": types.ModuleType("datasets")})
    sys.modules["datasets.data_loading"] = datasets_stub
    try:
        yield
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in _PACKAGES or name in _STUBS:
                del sys.modules[name]


_classes: dict[str, type] = {}
_conf: Any = None


def _method_class(method: str) -> type:
    """The method's own class, imported from ../shared; RoTTA's with the fp32 bug worked around."""
    if method not in _classes:
        anchor = ANCHORS[method]
        with _their_import_path():
            cls = getattr(importlib.import_module(f"methods.{anchor.module}"), anchor.cls)
        if method == "rotta":
            cls = _rotta_fp32(cls)
        _classes[method] = cls
    return _classes[method]


def _rotta_fp32(rotta: type) -> type:
    class RoTTAFp32(rotta):
        """RoTTA's fp32 path calls self.loss_calculation(x), a method that takes no argument (a TypeError
        whenever mixed precision is off; later upstream versions fixed it): accept the argument and ignore it."""

        def loss_calculation(self, x: Any = None) -> torch.Tensor:
            return super().loss_calculation()

    return RoTTAFp32


def _defaults() -> Any:
    """conf.py's default config (yacs), loaded from their file under a private name."""
    global _conf
    if _conf is None:
        spec = importlib.util.spec_from_file_location("tta_benchmark_conf", ANCHOR_DIR / "conf.py")
        assert spec is not None and spec.loader is not None
        _conf = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_conf)
    return _conf._CFG_DEFAULT


def anchor_config(method: str, batch_size: int) -> Any:
    """conf.py's defaults merged with cfgs/cifar10_c/<method>.yaml, TEST.BATCH_SIZE set to the benchmark's."""
    cfg = _defaults().clone()
    cfg.defrost()
    cfg.merge_from_file(str(ANCHOR_DIR / "cfgs" / "cifar10_c" / f"{ANCHORS[method].config}.yaml"))
    cfg.TEST.BATCH_SIZE = batch_size
    cfg.freeze()
    return cfg


def anchor_settings(method: str, batch_size: int) -> dict[str, Any]:
    """What a saved run of the anchor must match to be reused: its code's commit, class and whole config."""
    commit = (ANCHOR_DIR / "COMMIT").read_text().strip() if (ANCHOR_DIR / "COMMIT").is_file() else None
    config = json.loads(json.dumps(anchor_config(method, batch_size)))  # CfgNode -> plain JSON values
    anchor = ANCHORS[method]
    settings = {"anchor_commit": commit, "class": f"methods.{anchor.module}.{anchor.cls}", "cfg": config}
    if method == "rotta":
        settings["workaround"] = "loss_calculation(x) accepts and ignores x (their fp32 path's TypeError)"
    return settings


# ---------------------------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------------------------


def build_anchor(method: str, batch_size: int, model_path: Path) -> tuple[nn.Module, Any]:
    """The method's object around a fresh copy of our model, seeded with their RNG_SEED; and its config."""
    from models.checkpoint import load_checkpoint

    cfg = anchor_config(method, batch_size)
    torch.manual_seed(cfg.RNG_SEED)  # ROID's and CoTTA's augmentations, CoTTA's restore masks
    np.random.seed(cfg.RNG_SEED)  # CoTTA's transforms draw from numpy's global RNG
    random.seed(cfg.RNG_SEED)
    model, card = load_checkpoint(model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # TTAMethod's own choice
    wrapped = UnitRangeModel(model, card.mean, card.std).to(device)
    with _their_import_path():  # EATA's Fisher information calls datasets.data_loading at construction
        tta = _method_class(method)(cfg, wrapped, card.num_classes)
    return tta, card


def run_anchor(stream: Any, method: str, batch_size: int, model_path: Path) -> Any:
    """A bench.stream RunOutput: the stream through the method in batches of `batch_size`, predictions taken
    from what its forward returns (see the module docstring for what that is, method by method)."""
    from bench.stream import SCENARIO_RESET, RunOutput, _check_classes, batches

    tta, card = build_anchor(method, batch_size, model_path)
    _check_classes(card.class_names, stream.pool.class_names)
    own_resets = 0
    their_reset = tta.reset

    def counted_reset() -> None:  # SAR's model recovery calls self.reset(): count it as a guard reset
        nonlocal own_resets
        own_resets += 1
        their_reset()

    tta.reset = counted_reset
    predictions = np.empty(len(stream), dtype=np.int64)
    resets: list[dict[str, Any]] = []
    device = next(tta.model.parameters()).device
    started = time.perf_counter()
    for index, segment in enumerate(stream.segments):
        if index > 0:
            their_reset()
            resets.append({"position": segment[0], "reason": SCENARIO_RESET})
        for start, end in batches(segment, batch_size):
            before = own_resets
            x = stream.images(start, end).to(device).float() / 255.0
            outputs = tta(x)
            predictions[start:end] = outputs.argmax(1).cpu().numpy()
            resets += [{"position": end, "reason": MODEL_RESET}] * (own_resets - before)
    wall_s = time.perf_counter() - started
    extra = {
        "mode": "in-process, the published method's own class from ../shared/anchors/tta-benchmark",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "settings": anchor_settings(method, batch_size),
    }
    if method == "eata":
        extra["fisher_source"] = f"{tta.cfg.SOURCE.NUM_SAMPLES} images of {SOURCE_TRAIN_ZIP.name}"
    return RunOutput(predictions, resets, wall_s, extra)
