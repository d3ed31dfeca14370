"""Poisoning within a stream (issue 14, item 8), in-process: does a flood leave the adaptation as it found it?

A fresh AdaptationEngine (the default model, the default Settings, batches of 64) predicts 1,000 normal images: the
clean CIFAR-10 test JPEGs, shuffled with a fixed seed. Another engine first sees a flood of 2,000 images, then the
same 1,000. Floods: uniform-noise images (32 x 32, every pixel and channel uniform in 0..255: what the issue
posted), Gaussian noise (mean 0.5, sd 0.2, clipped), uniform noise posted at 64 x 64 and resized to 32 x 32 as the
server resizes (smoother noise), and 2,000 images of one class (the training split's, never in the test set), for
each class. Target: after a flood, the 1,000 normal images within 2 points of the fresh engine's accuracy on them.
Every configuration runs twice: with the default guards, and without the two that decide what the adaptation admits
(`TTA_GUARD_PLAUSIBLE`: features far from the source's; `TTA_GUARD_CLASS_PACE`: one class's statistics running ahead
of the others' while that class takes most of the recent predictions).

    python -m bench.poison                  # the table, and docs/reliability/poisoning.md
    python -m bench.poison --split selection --classes 3,5,6 --no-write   # the images the settings were chosen on

`--split selection` uses other images throughout (test images 1,000-1,999 of the same shuffle, other noise seeds,
the next 2,000 training images of each class), for choosing settings without touching the reported figures. Any
TTA_ setting in the environment applies to both configurations (e.g. TTA_CLASS_PACE_MARGIN=0.1).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability" / "poisoning.md"
BEGIN, END = "<!-- bench.poison: begin -->", "<!-- bench.poison: end -->"
NOISES = ("uniform", "gaussian", "uniform-64px")
ADMISSION_GUARDS = ("guard_plausible", "guard_class_pace")


@dataclass
class Result:
    first: float  # accuracy % over the first 200 normal images
    all: float  # over all of them
    implausible: int  # images held back as implausible, flood and normal images together
    paced: int  # images the class pace held back
    steps: int  # entropy steps over the whole run


def noise_images(kind: str, count: int, seed: int) -> torch.Tensor:
    """uint8 N x 3 x 32 x 32, as the worker receives them after decoding and resizing."""
    import torchvision.transforms.v2.functional as TF

    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return torch.from_numpy(rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8))
    if kind == "gaussian":
        return torch.from_numpy(np.clip(rng.normal(0.5, 0.2, (count, 3, 32, 32)) * 255, 0, 255).astype(np.uint8))
    if kind == "uniform-64px":  # posted larger: the server resizes (antialiased), which smooths the noise
        big = torch.from_numpy(rng.integers(0, 256, (count, 3, 64, 64), dtype=np.uint8))
        return TF.resize(big, [32], antialias=True)
    raise ValueError(f"unknown noise {kind!r}; expected one of {', '.join(NOISES)}")


def run(engine, flood: torch.Tensor | None, normal: torch.Tensor, labels: torch.Tensor, batch: int, card) -> Result:
    """The flood (if any), then the normal images, in batches as the worker steps them: uint8 in, normalised."""
    from models.data import normalize

    def predict(images: torch.Tensor) -> torch.Tensor:
        steps = range(0, len(images), batch)
        return torch.cat(
            [engine.step(normalize(images[i : i + batch], card.mean, card.std)).logits.argmax(1) for i in steps]
        )

    if flood is not None:
        predict(flood)
    correct = (predict(normal).cpu() == labels).double()
    return Result(
        round(100 * float(correct[:200].mean()), 1),
        round(100 * float(correct.mean()), 1),
        engine.stats.held_back["implausible"],
        engine.stats.held_back["class_pace"],
        engine.stats.steps_total,
    )


def main(argv: list[str] | None = None) -> int:
    from models.data import SHARED_DATA

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: TTA_MODEL or the default)")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="folder of test.zip and train.zip")
    parser.add_argument("--split", choices=("report", "selection"), default="report")
    parser.add_argument("--normal", type=int, default=1000, help="normal images after the flood")
    parser.add_argument("--flood", type=int, default=2000, help="images in a flood")
    parser.add_argument("--batch", type=int, default=64, help="images per engine step (the adaptation batch)")
    parser.add_argument("--noises", default=",".join(NOISES), help="comma-separated, or empty for none")
    parser.add_argument("--classes", default="all", help="one-class floods: comma-separated indices, all, or none")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--out", type=Path, default=DOC, help="markdown to write the table into")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--only-guarded", action="store_true", help="skip the runs without the guards (selection)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)

    from app.adaptation.engine import AdaptationEngine
    from app.config import Settings
    from models.checkpoint import load_checkpoint
    from models.data import load_zip

    settings = Settings(**({"model": args.model} if args.model else {}), device="cpu")
    source, card = load_checkpoint(settings.model)
    offset = 0 if args.split == "report" else 1
    test = load_zip(args.data / "test.zip")
    order = torch.as_tensor(np.random.default_rng(0).permutation(len(test)))
    chosen = order[offset * args.normal : (offset + 1) * args.normal]
    normal, labels = test.images[chosen], test.labels[chosen]
    floods: dict[str, torch.Tensor] = {}
    for index, kind in enumerate(k for k in args.noises.split(",") if k):
        floods[f"noise: {kind}"] = noise_images(kind, args.flood, seed=1 + index + 100 * offset)
    classes = {"all": list(range(card.num_classes)), "none": []}.get(args.classes)
    if classes is None:
        classes = [int(c) for c in args.classes.split(",")]
    if classes:
        train = load_zip(args.data / "train.zip", limit_per_class=(offset + 1) * args.flood)
        for c in classes:
            members = torch.nonzero(train.labels == c).flatten()[offset * args.flood : (offset + 1) * args.flood]
            floods[f"one class: {card.class_names[c]}"] = train.images[members]

    def engine(guarded: bool) -> AdaptationEngine:
        configured = settings if guarded else settings.model_copy(update=dict.fromkeys(ADMISSION_GUARDS, False))
        return AdaptationEngine(
            source, card.num_classes, configured.calibrated(card.source_distance_q99()), torch.device("cpu")
        )

    started = time.perf_counter()
    guards = (True,) if args.only_guarded else (False, True)
    results: dict[str, dict[bool, Result]] = {"fresh": {}}
    for guarded in guards:
        results["fresh"][guarded] = run(engine(guarded), None, normal, labels, args.batch, card)
    for name, flood in floods.items():
        results[name] = {guarded: run(engine(guarded), flood, normal, labels, args.batch, card) for guarded in guards}
        print(f"  {name:28s} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    table = render(results, args, settings, time.perf_counter() - started)
    print(table)
    if not args.no_write:
        write(args.out, table)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def render(results: dict[str, dict[bool, Result]], args: argparse.Namespace, settings, wall_s: float) -> str:
    fresh = results["fresh"]
    lines = [
        f"{args.normal:,} normal images (clean CIFAR-10 test JPEGs, {args.split} split) after a flood of "
        f"{args.flood:,}; batches of {args.batch}; accuracy % over the first 200 and all {args.normal:,} normal "
        "images, and the difference from a fresh engine's (the target: within 2 points on all of them). "
        "Held back: images the guards kept out of the statistics and the entropy step, flood and normal images "
        "together, as implausible / by the class pace.",
        "",
        "| flood | without the guards: first 200 | all | vs fresh | with them (default): first 200 | all "
        "| vs fresh | held back |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    # The floods (uniform noise, what it posted, and one class) and the other noise kinds, summed up apart.
    worst = {False: 0.0, True: 0.0}
    others = {False: 0.0, True: 0.0}
    for name, by_guard in results.items():
        cells = []
        for guarded in (False, True):
            if guarded not in by_guard:
                cells += ["", "", ""]
                continue
            r = by_guard[guarded]
            delta = r.all - fresh[guarded].all
            if name != "fresh":
                bucket = worst if name == "noise: uniform" or name.startswith("one class") else others
                bucket[guarded] = min(bucket[guarded], delta)
            cells += [f"{r.first:.1f}", f"{r.all:.1f}", "" if name == "fresh" else f"{delta:+.1f}"]
        cells.append(f"{by_guard[True].implausible:,} / {by_guard[True].paced:,}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Worst difference from fresh, uniform noise and one class: {worst[False]:+.1f} points without the guards, "
        f"{worst[True]:+.1f} with them; the other noise: {others[False]:+.1f} and {others[True]:+.1f}. "
        f"Settings: the defaults (plausible distance {settings.plausible_distance}, "
        f"class pace trigger {settings.class_pace_trigger} and margin {settings.class_pace_margin}, statistics "
        f"horizon {settings.stats_horizon}); {args.threads} torch thread(s), CPU, torch "
        f"{torch.__version__}, Python {platform.python_version()}; {wall_s:.0f} s.",
        "",
        f"Command: `python -m bench.poison{'' if args.split == 'report' else ' --split selection'}`",
    ]
    return "\n".join(lines)


def write(path: Path, table: str) -> None:
    """Put the table between the markers of `path`, keeping the text around it (a new file gets a title)."""
    block = f"{BEGIN}\n{table}\n{END}"
    text = path.read_text() if path.exists() else f"# Poisoning within a stream\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + block + rest.split(END, 1)[1])


if __name__ == "__main__":
    raise SystemExit(main())
