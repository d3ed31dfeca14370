"""Sample selection bias: does importance-weighted finetuning beat plain finetuning on a biased target? (issue 19)

The source is the training split (train.zip, the first --source-per-class images of each class; 10% of them held out
for validation). The target is a biased selection of the held-out test split (test.zip) by a published rule:

    dark: keep each test image with probability sigmoid((DARK_CENTRE - b) / DARK_SCALE), b = its mean luma in [0, 1]
          (0.299 R + 0.587 G + 0.114 B); a seeded coin per image.

The selection depends on the image alone, so p(y | x) is the same in source and target: covariate shift inside the
source's support, the case importance weighting is made for. The selected images are split in two halves (seeded):
the unlabelled target the domain classifier sees, and the labelled target test part every model is scored on.

And a case where it cannot help: the target is the test split with gaussian_noise at severity 5 (bench.corruptions),
which no training image resembles; the domain classifier separates the domains and `tta finetune`'s warning fires.

Models compared on each target test part, each served without adaptation (none) and with the server's default
test-time adaptation (tent with its guards, bench.stream's in-process engine, prequential: predicted before the update
its batch causes, batches of 64 in a seeded random order):

- source: the default model as it is;
- plain: the default model finetuned on the source (same recipe, every image weighted 1);
- weighted: the same finetuning with the importance weights of the source images against the unlabelled target.

    nice -n 10 python -m bench.selection_bias --threads 1        # ~15 CPU minutes on one thread

Writes docs/finetune/selection_bias-<variant>.md (the table, ESS, AUC, settings), the weights' histograms
docs/finetune/weights-<variant>-<target>.png and bench/results/selection_bias/<variant>/results.json; the variant is
the --start model, with -head-only after it for --head-only.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.stream import DEFAULT_CACHE, DEFAULT_MODEL, REPO_ROOT, Pool, build_stream, ensure_corrupted, run_in_process
from models.card import ForeignModel
from models.checkpoint import load_checkpoint, save_checkpoint
from models.data import SHARED_DATA, SHARED_DIR, ImageSet, load_zip
from models.finetune import Recipe, finetune, split, stages, subset
from models.importance import weigh_source
from models.importer import import_checkpoint

DARK_CENTRE = 0.35
DARK_SCALE = 0.05
NOISE = "gaussian_noise"
NOISE_SEVERITY = 5
METHODS = ("none", "default")
AKAMASTER = SHARED_DIR / "pretrained" / "cifar10_resnet20_akamaster.th"
DOCS = REPO_ROOT / "docs" / "finetune"
RESULTS = REPO_ROOT / "bench" / "results" / "selection_bias"


def luma(images: torch.Tensor) -> torch.Tensor:
    """Mean luma of each uint8 image, in [0, 1]."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() / 255 * weights).sum(1).mean((1, 2))


def select_dark(images: torch.Tensor, seed: int) -> np.ndarray:
    """Indices kept by the dark rule: a seeded coin per image, heads with probability sigmoid((0.35 - b) / 0.05)."""
    keep = torch.sigmoid((DARK_CENTRE - luma(images)) / DARK_SCALE).numpy()
    return np.flatnonzero(np.random.default_rng([seed, 7]).random(len(keep)) < keep)


def halves(index: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(unlabelled target, labelled target test part): a seeded split of the selected images in two halves."""
    shuffled = np.random.default_rng([seed, 8]).permutation(index)
    return np.sort(shuffled[: len(shuffled) // 2]), np.sort(shuffled[len(shuffled) // 2 :])


def prequential_top1(path: Path, data: ImageSet, method: str, seed: int, batch_size: int) -> float:
    """Top-1 of the model at `path` on `data` through the server's engine (bench.stream), predicted before adapting."""
    pool = Pool(
        data.images, data.labels.numpy(), np.zeros(len(data), dtype=np.int64), ["target"], data.class_names, None
    )
    stream = build_stream("continual", pool, seed)
    output = run_in_process(stream, method, batch_size, path, device="cpu")
    return float((output.predictions == stream.labels).mean())


def start_model(name: str, work: Path) -> Path:
    """The source model's checkpoint in our format (the third-party one imported into `work`, as tta import does)."""
    if name == "default":
        return DEFAULT_MODEL
    out = work / "akamaster.safetensors"
    model, card = import_checkpoint(AKAMASTER, ForeignModel(arch="resnet20_cifar_a", classes="cifar10", input_size=32))
    save_checkpoint(model, card, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--start",
        choices=("default", "akamaster"),
        default="default",
        help="the source model every finetuning starts from: the default model (trained on all of train.zip) or the "
        "third-party ResNet-20 trained on lossless CIFAR-10 (../shared/pretrained), which has not seen the JPEGs",
    )
    parser.add_argument("--targets", default=f"dark,{NOISE}-{NOISE_SEVERITY}", help="comma-separated")
    parser.add_argument("--source-per-class", type=int, default=400, help="training images of each class (source)")
    parser.add_argument("--noise-per-class", type=int, default=300, help="gaussian_noise-5 test images of each class")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument(
        "--head-only",
        action="store_true",
        help="freeze every stage and re-initialise the head: a linear classifier on fixed features, a misspecified "
        "model (the case where importance weighting is known to matter)",
    )
    parser.add_argument("--max-weight", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=64, help="finetuning and test-time adaptation batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="bench.corruptions' zips")
    parser.add_argument("--work", type=Path, default=RESULTS, help="finetuned checkpoints and results.json")
    parser.add_argument("--docs", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.time()

    variant = args.start + ("-head-only" if args.head_only else "")
    args.work = args.work / variant
    args.work.mkdir(parents=True, exist_ok=True)
    start = start_model(args.start, args.work)
    source_model, card = load_checkpoint(start)
    train, val = split(load_zip(SHARED_DATA / "train.zip", args.source_per_class), 0.1, args.seed)
    test = load_zip(SHARED_DATA / "test.zip")
    dark = select_dark(test.images, args.seed)
    dark_unlabelled, dark_test = halves(dark, args.seed)
    noise_zip = ensure_corrupted([NOISE], NOISE_SEVERITY, args.noise_per_class, args.cache)[NOISE]
    noise = load_zip(noise_zip, args.noise_per_class)
    noise_unlabelled, noise_test = halves(np.arange(len(noise)), args.seed)
    targets = {
        "dark": (test.images[torch.as_tensor(dark_unlabelled)], subset(test, dark_test)),
        f"{NOISE}-{NOISE_SEVERITY}": (noise.images[torch.as_tensor(noise_unlabelled)], subset(noise, noise_test)),
    }
    targets = {name: targets[name] for name in args.targets.split(",")}
    print(
        f"source {len(train)} (+{len(val)} validation); dark rule kept {len(dark)} of {len(test)} test images "
        f"(mean luma {float(luma(test.images[torch.as_tensor(dark)]).mean()):.3f}, "
        f"all {float(luma(test.images).mean()):.3f})",
        flush=True,
    )

    recipe = Recipe(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    if args.head_only:
        recipe = recipe.model_copy(update={"freeze_stages": len(stages(source_model)), "reinit_head": True})

    def finetuned(name: str, weights: torch.Tensor | None) -> Path:
        out = args.work / f"{name}.safetensors"
        t0 = time.time()
        torch.manual_seed(args.seed)  # the same re-initialised head for both
        finetune(copy.deepcopy(source_model), card, train, val, recipe, out, sample_weights=weights, progress=False)
        print(f"finetuned {name} in {time.time() - t0:.0f} s", flush=True)
        return out

    plain = finetuned("plain", None)
    results: dict[str, Any] = {"targets": {}}
    for target, (unlabelled, labelled) in targets.items():
        histogram = args.docs / f"weights-{variant}-{target}.png"
        weights, report = weigh_source(source_model, card, train.images, unlabelled, args.max_weight, histogram)
        weighted = finetuned(f"weighted-{target}", weights)
        scores = {
            name: {method: prequential_top1(path, labelled, method, args.seed, args.batch_size) for method in METHODS}
            for name, path in (("source", start), ("plain", plain), ("weighted", weighted))
        }
        source_luma = luma(train.images)
        results["targets"][target] = {
            "mean_luma": {  # the weights should move the source's brightness towards the target's
                "source": round(float(source_luma.mean()), 4),
                "source_weighted": round(float((weights * source_luma).sum() / weights.sum()), 4),
                "target": round(float(luma(unlabelled).mean()), 4),
            },
            "unlabelled": len(unlabelled),
            "test": len(labelled),
            "class_counts": np.bincount(labelled.labels.numpy(), minlength=len(card.class_names)).tolist(),
            "importance_weighting": report,
            "top1": scores,
        }
        print(target, json.dumps(scores), f"ESS {report['ess']:.0f}/{report['n_source']}", flush=True)
    results["settings"] = {
        "start": variant,
        "recipe": recipe.model_dump(),
        "source_images": len(train),
        "val_images": len(val),
        "max_weight": args.max_weight,
        "threads": args.threads,
        "dark_rule": f"keep with probability sigmoid(({DARK_CENTRE} - mean luma) / {DARK_SCALE}), seed {args.seed}",
        "seconds": round(time.time() - started),
    }
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report = args.docs / f"selection_bias-{variant}.md"
    report.write_text(markdown(results, card.class_names))
    print(f"wrote {report} in {time.time() - started:.0f} s", flush=True)
    return 0


def markdown(results: dict[str, Any], class_names: list[str]) -> str:
    lines = [
        "| target | test images | model | top-1, no adaptation | top-1, default TTA | domain AUC | ESS |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for target, r in results["targets"].items():
        iw = r["importance_weighting"]
        for model, scores in r["top1"].items():
            ess = (
                f"{iw['ess']:.0f} of {iw['n_source']} ({100 * iw['ess_fraction']:.1f}%)" if model == "weighted" else ""
            )
            auc = f"{iw['auc_held_out']:.3f}" if model == "weighted" else ""
            lines.append(
                f"| {target} | {r['test']} | {model} | {100 * scores['none']:.2f}% | {100 * scores['default']:.2f}% "
                f"| {auc} | {ess} |"
            )
    warnings = [f"- {t}: {r['importance_weighting']['warning']}" for t, r in results["targets"].items()]
    brightness = [
        f"- {t}: source {m['source']:.3f}, source weighted {m['source_weighted']:.3f}, target {m['target']:.3f}"
        for t, r in results["targets"].items()
        for m in [r["mean_luma"]]
    ]
    priors = [
        f"- {t}: " + ", ".join(f"{n} {c}" for n, c in zip(class_names, r["class_counts"], strict=True))
        for t, r in results["targets"].items()
    ]
    return "\n".join(
        [
            *lines,
            "",
            "Warnings (`tta finetune`'s line, None where it did not fire):",
            *warnings,
            "",
            "Mean luma (the weights should move the source towards the target):",
            *brightness,
            "",
            "Classes of each target test part:",
            *priors,
            "",
            "Settings: `" + json.dumps(results["settings"]) + "`",
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
