"""How transferable are features? Yosinski et al. (2014) on CIFAR-10 with the default architecture (issue 19, item 5).

The ten classes are split at random (seed 0) into two halves, A and B. Two base nets of the default architecture
(`resnet20_cifar_a`, a CIFAR ResNet-20) are trained from scratch, one on A, one on B. Then, for k = 1..3, the first k
stages (stage 1 with the stem conv1/bn1; stages 2 and 3 as in the architecture) are copied into a fresh net, whose
other stages and head stay freshly initialised, and the net is trained on B:

- BnB:  copied from base B, frozen (selfer: does B's own net lose anything when cut and re-trained above k?)
- BnB+: copied from base B, finetuned with the rest
- AnB:  copied from base A, frozen (transfer: are A's first k stages general enough for B?)
- AnB+: copied from base A, finetuned with the rest

"Frozen" keeps the copied stages' function fixed: their parameters get no gradient and their BatchNorm layers keep
the copied running statistics. Every net, base nets included, is trained by `tta finetune`'s loop
(models.finetune.finetune: SGD with Nesterov momentum, cosine learning rate, crop and flip augmentation; frozen
stages by name with the recipe's `freeze`) with one recipe, on a subset of the training split so that the run fits
the shared machine (the defaults below: 300 images per class, 5 epochs of batches of 32), and reported as top-1 on
all 5,000 test images of B's classes (base A: on A's):

    nice -n 10 python -m bench.transferability          # 14 trainings on one thread; resumes where it stopped
    python -m bench.transferability --plot-only         # the plot and table again from the saved results

Each finished net's figure is saved at once in `--results` (JSON), and every net's checkpoint after each epoch in
`--work` (finetune's own per-epoch checkpoint and resume), so a stopped run resumes within the net it was training.
The plot (top-1 against k, as the paper's figure 2) goes to docs/transferability.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.card import ModelCard
from models.checkpoint import load_checkpoint
from models.data import SHARED_DATA, ImageSet, load_zip
from models.evaluate import accuracy
from models.finetune import Recipe, finetune, partial_path, stages, subset
from models.registry import build_model

ROOT = Path(__file__).resolve().parent.parent
ARCH = "resnet20_cifar_a"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the default model's card's
COPIED = 3  # k = 1..3: the stem with stage 1, then stages 2 and 3 (models.finetune.stages: stem, layer1..3)
CELLS = ("BnB", "BnB+", "AnB", "AnB+")
VAL_PER_CLASS = 20  # training-split images held out for finetune()'s per-epoch validation, never trained on


def split_classes(seed: int) -> tuple[list[int], list[int]]:
    order = np.random.default_rng(seed).permutation(10)
    return sorted(order[:5].tolist()), sorted(order[5:].tolist())


def of_classes(data: ImageSet, classes: list[int]) -> ImageSet:
    """The images of `classes`, labels renumbered 0..len(classes)-1 in that order."""
    keep = torch.isin(data.labels, torch.tensor(classes))
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    return ImageSet(
        data.images[keep],
        relabel[data.labels[keep]],
        [data.class_names[c] for c in classes],
        [m for m, k in zip(data.members, keep.tolist(), strict=True) if k],
    )


def train_and_val(data: ImageSet, per_class: int) -> tuple[ImageSet, ImageSet]:
    """The first `per_class` images of each class to train on, the next VAL_PER_CLASS to validate on."""
    position = torch.zeros(len(data), dtype=torch.long)
    for label in data.labels.unique():
        mask = data.labels == label
        position[mask] = torch.arange(int(mask.sum()))
    return subset(data, np.flatnonzero(position < per_class)), subset(data, np.flatnonzero(position >= per_class))


def copied_prefixes(model: nn.Module, k: int) -> list[str]:
    return [name for stage in stages(model)[: k + 1] for name in stage]


def recipe(args: argparse.Namespace, freeze: list[str]) -> Recipe:
    return Recipe(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        freeze=freeze,
        seed=args.seed,
    )


def fresh_net(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(args.seed)  # every net starts from the same initialisation: cells differ only by what is copied
    return build_model(ARCH, 5)


def trained(name: str, model: nn.Module, data: tuple[ImageSet, ImageSet], freeze: list[str], args) -> nn.Module:
    """finetune() (models/finetune.py, `tta finetune`'s loop) from `model`; resumes an interrupted epoch loop, and
    a net already trained (its checkpoint without a partial state) is read back instead."""
    out = args.work / f"{name}.safetensors"
    if out.exists() and not partial_path(out).exists():
        return load_checkpoint(out)[0]
    train, val = data
    card = ModelCard(
        architecture=ARCH,
        num_classes=5,
        class_names=train.class_names,
        input_size=32,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    finetune(model, card, train, val, recipe(args, freeze), out, resume=True, progress=False, log=lambda _: None)
    return model


def transfer_net(source: nn.Module, k: int, frozen: bool, name: str, data, args) -> nn.Module:
    """The first k stages copied from `source`, the rest (and the head) freshly initialised; trained on B."""
    model = fresh_net(args)
    prefixes = copied_prefixes(model, k)
    copied = {n: v for n, v in source.state_dict().items() if n.split(".")[0] in prefixes}
    model.load_state_dict(copied, strict=False)
    return trained(name, model, data, prefixes if frozen else [], args)


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> dict:
    classes_a, classes_b = split_classes(args.seed)
    train_all = load_zip(args.train, args.per_class + VAL_PER_CLASS)
    test_all = load_zip(args.test)
    data = {n: train_and_val(of_classes(train_all, c), args.per_class) for n, c in (("A", classes_a), ("B", classes_b))}
    test = {"A": of_classes(test_all, classes_a), "B": of_classes(test_all, classes_b)}
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    results["setup"] = {
        "A": test["A"].class_names,
        "B": test["B"].class_names,
        "train_images_per_class": args.per_class,
        "val_images_per_class": VAL_PER_CLASS,
        "test_images": {"A": len(test["A"]), "B": len(test["B"])},
        "recipe": recipe(args, []).model_dump(exclude={"freeze"}),
    }
    cells = results.setdefault("cells", {})

    def measure(name: str, make, on: str) -> None:
        if name in cells:
            return
        started = time.process_time()
        model = make()
        cells[name] = {"top1": round(100 * accuracy(model, test[on], IMAGENET_MEAN, IMAGENET_STD), 2)}
        cells[name]["cpu_seconds"] = round(time.process_time() - started)
        save(results, args.results)
        print(
            f"{name}: {cells[name]['top1']:.2f}% on {len(test[on])} images ({cells[name]['cpu_seconds']} CPU s)",
            flush=True,
        )

    def base(name: str) -> nn.Module:
        return trained(f"base{name}", fresh_net(args), data[name], [], args)

    for name in "AB":
        measure(f"base{name}", lambda name=name: base(name), name)
    for k in range(1, COPIED + 1):
        for cell in CELLS:
            frozen = not cell.endswith("+")

            def make(cell: str = cell, k: int = k, frozen: bool = frozen) -> nn.Module:
                return transfer_net(base(cell[0]), k, frozen, f"{cell}{k}", data["B"], args)

            measure(f"{cell}{k}", make, "B")
    return results


def table(results: dict) -> str:
    cells = results["cells"]
    lines = ["| k (stages copied) | " + " | ".join(CELLS) + " |", "| --- |" + " --- |" * len(CELLS)]
    for k in range(1, COPIED + 1):
        row = [f"{cells[f'{c}{k}']['top1']:.2f}" if f"{c}{k}" in cells else "-" for c in CELLS]
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    base = {n: cells.get(f"base{n}", {}).get("top1") for n in "AB"}
    lines.append("")
    lines.append(f"Base B (trained on B alone, k = 0): {base['B']}%; base A on A's test images: {base['A']}%.")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    cells = results["cells"]
    setup = results["setup"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {
        "BnB": ("tab:blue", "o", "--"),
        "BnB+": ("tab:blue", "o", "-"),
        "AnB": ("tab:red", "s", "--"),
        "AnB+": ("tab:red", "s", "-"),
    }
    if "baseB" in cells:
        ax.axhline(cells["baseB"]["top1"], color="black", lw=1, alpha=0.6, label="base B (k = 0)")
    for cell, (color, marker, ls) in styles.items():
        ks = [k for k in range(1, COPIED + 1) if f"{cell}{k}" in cells]
        ax.plot(ks, [cells[f"{cell}{k}"]["top1"] for k in ks], color=color, marker=marker, ls=ls, label=cell)
    ax.set_xticks(range(1, COPIED + 1), ["1: stem + stage 1", "2: + stage 2", "3: + stage 3"])
    ax.set_xlabel("k: stages copied (the rest and the head re-initialised, trained on B)")
    ax.set_ylabel(f"top-1 % on B's {setup['test_images']['B']} test images")
    ax.set_title(
        f"Transferability, {ARCH}: A = {', '.join(setup['A'])}\nB = {', '.join(setup['B'])}; "
        f"{setup['train_images_per_class']} train images per class, {setup['recipe']['epochs']} epochs",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=SHARED_DATA / "train.zip")
    parser.add_argument("--test", type=Path, default=SHARED_DATA / "test.zip")
    parser.add_argument("--per-class", type=int, default=300, help="training images per class (the first ones)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "transferability.json")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "cache" / "transferability")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "transferability.png")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the benchmark is sized for one thread
    results = json.loads(args.results.read_text()) if args.plot_only else run(args)
    plot(results, args.plot)
    print(table(results))


if __name__ == "__main__":
    main()
