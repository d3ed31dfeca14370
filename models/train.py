"""Train or finetune a classifier on an image archive and write our checkpoint + model card.

The default model is made by finetuning the third-party ResNet-20 (trained on lossless CIFAR-10)
on the JPEG training split, so that source and clean test images share one format:

    python -m models.train --arch resnet20_cifar_a \
        --init ../shared/pretrained/cifar10_resnet20_akamaster.th \
        --epochs 10 --lr 0.05 --out models/default/cifar10_resnet20.safetensors

Warm start: `--head-epochs K` trains only the (optionally re-initialised) head for the first K
epochs, then everything; `--head-lr` gives the head its own learning rate; `--freeze conv1,layer1`
keeps parameters under those prefixes fixed. A checkpoint is written after every epoch
(`<out>.partial.pt`) and `--resume` continues from it.
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import (
    ModelCard,
    load_checkpoint,
    load_state_dict_strict,
    read_foreign_state_dict,
    save_checkpoint,
)
from models.data import SHARED_DATA, ImageSet, augment, load_zip, normalize
from models.evaluate import accuracy
from models.plausibility import measure
from models.registry import build_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def head_of(model: nn.Module) -> nn.Linear:
    """The classifier head: the last Linear layer in module order."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear head")
    return linears[-1]


def reinit_head(model: nn.Module) -> None:
    head = head_of(model)
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)


def initial_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    if args.init is None:
        return build_model(args.arch, num_classes)
    if args.init.suffix == ".safetensors":
        model, _ = load_checkpoint(args.init)
        return model
    model = build_model(args.arch, num_classes)
    load_state_dict_strict(model, read_foreign_state_dict(args.init))
    return model


def parameter_groups(model: nn.Module, args: argparse.Namespace) -> list[dict]:
    head_ids = {id(p) for p in head_of(model).parameters()}
    frozen = tuple(p for p in args.freeze.split(",") if p)
    body, head = [], []
    for name, p in model.named_parameters():
        if name.startswith(frozen):
            p.requires_grad_(False)
        elif id(p) in head_ids:
            head.append(p)
        else:
            body.append(p)
    return [
        {"params": body, "lr": args.lr, "name": "body"},
        {"params": head, "lr": args.head_lr or args.lr, "name": "head"},
    ]


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: ImageSet,
    card: ModelCard,
    batch_size: int,
    rng: np.random.Generator,
    head_only: bool,
) -> float:
    model.train()
    order = torch.as_tensor(rng.permutation(len(data)))
    head_ids = {id(p) for p in head_of(model).parameters()}
    total, count = 0.0, 0
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        x = normalize(augment(data.images[idx], rng), card.mean, card.std)
        loss = F.cross_entropy(model(x), data.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if head_only:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) not in head_ids:
                        p.grad = None
        optimizer.step()
        scheduler.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    return total / max(count, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20_cifar_a")
    parser.add_argument("--init", type=Path, help="checkpoint to start from (ours or a foreign file)")
    parser.add_argument("--train", type=Path, default=SHARED_DATA / "train.zip")
    parser.add_argument("--test", type=Path, default=SHARED_DATA / "test.zip")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--head-epochs", type=int, default=0, help="warm start: epochs that train the head only")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--head-lr", type=float, default=None)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--freeze", default="", help="comma-separated parameter-name prefixes to keep fixed")
    parser.add_argument("--reinit-head", action="store_true", help="head weights N(0, 0.02), bias 0")
    parser.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN)
    parser.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD)
    parser.add_argument("--limit-per-class", type=int, default=None, help="use only this many images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.time()
    train = load_zip(args.train, args.limit_per_class)
    test = load_zip(args.test, args.limit_per_class)
    model = initial_model(args, len(train.class_names))
    if args.reinit_head:
        reinit_head(model)
    card = ModelCard(
        architecture=args.arch,
        num_classes=len(train.class_names),
        class_names=train.class_names,
        input_size=int(train.images.shape[-1]),
        mean=tuple(args.mean),
        std=tuple(args.std),
    )
    optimizer = torch.optim.SGD(
        parameter_groups(model, args), momentum=args.momentum, weight_decay=args.weight_decay, nesterov=True
    )
    steps_per_epoch = len(train) // args.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=args.epochs * steps_per_epoch,
        pct_start=0.15,
    )
    partial = args.out.with_suffix(".partial.pt")
    first_epoch, history = 0, []
    if args.resume and partial.exists():
        saved = torch.load(partial, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        rng = saved["rng"]
        first_epoch, history = saved["epoch"] + 1, saved["history"]
    for epoch in range(first_epoch, args.epochs):
        t0 = time.time()
        loss = train_epoch(
            model, optimizer, scheduler, train, card, args.batch_size, rng, head_only=epoch < args.head_epochs
        )
        test_acc = accuracy(model, test, card.mean, card.std)
        history.append({"epoch": epoch + 1, "train_loss": round(loss, 4), "test_top1": round(test_acc, 4)})
        print(
            f"epoch {epoch + 1}/{args.epochs} loss {loss:.4f} test {100 * test_acc:.2f}% ({time.time() - t0:.0f}s)",
            flush=True,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng,
                "epoch": epoch,
                "history": history,
            },
            partial,
        )
    final_acc = accuracy(model, test, card.mean, card.std)
    card.provenance = {
        "data": {
            "train": args.train.name,
            "test": args.test.name,
            "train_images": len(train),
            "test_images": len(test),
        },
        "init": str(args.init) if args.init else "random",
        "recipe": {k: v for k, v in vars(args).items() if k not in {"train", "test", "out", "init", "resume"}},
        "command": "python -m models.train " + shlex.join(sys.argv[1:] if argv is None else argv),
        "metrics": {"test_top1": final_acc, "history": history},
        "train_seconds": round(time.time() - started),
    }
    card.source_distance = measure(model, card, train.images, args.train.name)  # the plausibility guard's scale
    save_checkpoint(model.eval(), card, args.out)
    partial.unlink(missing_ok=True)
    print(f"wrote {args.out}: test top-1 {100 * final_acc:.2f}%")


if __name__ == "__main__":
    main()
