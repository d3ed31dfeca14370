"""Top-1 accuracy of a checkpoint on an image archive.

python -m models.evaluate models/default/cifar10_resnet20.safetensors
"""

import argparse
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import load_checkpoint
from models.data import SHARED_DATA, ImageSet, load_zip, normalize


@torch.inference_mode()
def accuracy(
    model: nn.Module, data: ImageSet, mean: tuple[float, ...], std: tuple[float, ...], batch_size: int = 500
) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = normalize(data.images[start : start + batch_size], mean, std)
        correct += int((model(x).argmax(1) == data.labels[start : start + batch_size]).sum())
    return correct / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "test.zip")
    args = parser.parse_args()
    model, card = load_checkpoint(args.checkpoint)
    data = load_zip(args.data)
    acc = accuracy(model, data, card.mean, card.std)
    print(f"{args.checkpoint}: top-1 {100 * acc:.2f}% on {len(data)} images of {args.data.name}")
    card_acc = card.provenance.get("metrics", {}).get("test_top1")
    if card_acc is not None:
        print(f"card says {100 * card_acc:.2f}%")


if __name__ == "__main__":
    main()
