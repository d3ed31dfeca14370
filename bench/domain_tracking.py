"""Statistics that follow a domain switch, and a label-prior correction: the research behind issue 16, item 3.

The default method normalises every BatchNorm layer with class-balanced running statistics over ~2,560 images
(README, "small batches, class-sorted traffic"): class-sorted traffic cannot take them over, but after a domain
switch they need thousands of images to arrive. The variants measured here change only those statistics, or only
the returned prediction, of the default (tent with every guard on), run in-process on bench.stream's streams:

- `--fast-layers K --fast-horizon H`: the first K BatchNorm layers normalise with a plain running estimate of the
  moments of the last ~H images (no classes). Those layers' statistics move a lot at a domain switch and, being
  early, little with the class, so class-sorted traffic costs little there while a switch is followed in ~H images.
- `--shift-horizon H`: the other layers keep their class-balanced rows, and every image also moves all rows by a
  1/H share of its residual from its own predicted class's row (the running mean residual, common to all rows). A
  switch shifts every class's moments alike, so the residuals carry it to the rows of classes not seen since the
  switch; a run of one class leaves residuals from that class's own row, which it has been learning, so the run
  moves the other rows by far less than its own.
- `--prior-horizon H`: the returned logits add the log of the running mean predicted distribution over the last ~H
  images (the model's own probabilities, before the correction, mixed with an even share `--prior-floor`): a
  label-prior correction (as ROID's and LAME's exploit class-sorted traffic) that needs no batch, so it works at
  batch 1. Only the answer changes: the statistics and the entropy step see the model's own prediction.

It subclasses `norm.TestTimeBatchNorm` (its `add_moments`, as of commit 1f87405); the method registry
(app/adaptation/methods/) is where the chosen variant would become a method. Records are bench.stream's, so
`python -m bench.compare` tabulates them::

    python -m bench.domain_tracking --severity 3 --per-class 50 --scenario continual --fast-layers 7 \\
        --fast-horizon 128 --shift-horizon 512 --results-dir bench/results/tracking/sev3-500
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from app.adaptation import norm
from bench import stream as bench_stream
from bench.corruptions import CORRUPTIONS, HELD_OUT


def _running_update(running: torch.Tensor, values: torch.Tensor, momentum: float) -> None:
    """`running` after the rows of `values` one after another, each moving it by `momentum` (closed form)."""
    n = len(values)
    if n:
        weights = momentum * (1 - momentum) ** torch.arange(n - 1, -1, -1, dtype=values.dtype, device=values.device)
        running.mul_((1 - momentum) ** n).add_((weights[:, None] * values).sum(0))


class TrackingBatchNorm(norm.TestTimeBatchNorm):
    """`TestTimeBatchNorm` with the variants' statistics: fast plain ones in the first layers, a common shift in the
    others. `layer` is the layer's position among the model's BatchNorm layers."""

    def __init__(
        self,
        bn: _BatchNorm,
        robust: bool,
        stats_horizon: int,
        num_classes: int,
        layer: int,
        fast_layers: int,
        fast_horizon: int,
        shift_horizon: int,
    ) -> None:
        super().__init__(bn, robust, stats_horizon, num_classes)
        self.fast = layer < fast_layers
        self.fast_momentum = 1.0 / fast_horizon
        self.shift_momentum = 1.0 / shift_horizon if shift_horizon else 0.0
        self.register_buffer("fast_mean", self.class_mean[0].clone())
        self.register_buffer("fast_sqmean", self.class_sqmean[0].clone())

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fast:
            return super().scale_and_shift()
        mean = self.fast_mean.clone()  # a copy: the running estimate changes in place before the entropy step
        var = (self.fast_sqmean - mean.square()).clamp_min(0.0)
        scale = self.weight / torch.sqrt(var + self.eps)
        return scale, self.bias - mean * scale

    @torch.no_grad()
    def add_moments(
        self,
        means: torch.Tensor,
        sqmeans: torch.Tensor,
        predicted: torch.Tensor,
        admitted: torch.Tensor | None = None,
        freshness: torch.Tensor | None = None,
    ) -> None:
        kept = torch.isfinite(means).all(1) & torch.isfinite(sqmeans).all(1)
        if admitted is not None:
            kept &= admitted.to(kept.device)
        if self.fast:
            _running_update(self.fast_mean, means[kept], self.fast_momentum)
            _running_update(self.fast_sqmean, sqmeans[kept], self.fast_momentum)
        elif self.shift_momentum and bool(kept.any()):
            rows = predicted.to(means.device)[kept] % len(self.class_mean)
            share = 1 - (1 - self.shift_momentum) ** int(kept.sum())
            for running, batch in ((self.class_mean, means[kept]), (self.class_sqmean, sqmeans[kept])):
                running.add_(share * (batch - running[rows]).mean(0))
        super().add_moments(means, sqmeans, predicted, admitted, freshness)


def tracking_layers(fast_layers: int, fast_horizon: int, shift_horizon: int) -> Callable[..., list[TrackingBatchNorm]]:
    """A stand-in for `norm._replace_batchnorms` that builds `TrackingBatchNorm` layers, numbered in module order."""

    def replace(model: torch.nn.Module, robust: bool, horizon: int, num_classes: int) -> list[TrackingBatchNorm]:
        replaced = []
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, _BatchNorm):
                    layer = TrackingBatchNorm(
                        child, robust, horizon, num_classes, len(replaced), fast_layers, fast_horizon, shift_horizon
                    )
                    setattr(parent, name, layer.to(child.weight.device))
                    replaced.append(layer)
        return replaced

    return replace


def run(stream: bench_stream.Stream, batch_size: int, prior_horizon: int, prior_floor: float) -> bench_stream.RunOutput:
    """The default method over `stream` (one segment) in batches of `batch_size`, predictions corrected by the
    running prior when `prior_horizon` is set; otherwise exactly bench.stream's in-process run."""
    if not prior_horizon:
        return bench_stream.run_in_process(stream, "default", batch_size, bench_stream.DEFAULT_MODEL, "cpu")
    from app.adaptation.engine import AdaptationEngine
    from models.checkpoint import load_checkpoint
    from models.data import normalize

    settings = bench_stream.method_settings("default", bench_stream.DEFAULT_MODEL, "cpu")
    source, card = load_checkpoint(bench_stream.DEFAULT_MODEL)
    engine = AdaptationEngine(source, card.num_classes, settings, torch.device("cpu"))
    classes = card.num_classes
    prior = torch.full((classes,), 1.0 / classes, dtype=torch.float64)
    momentum = 1.0 / prior_horizon
    predictions = np.empty(len(stream), dtype=np.int64)
    started = time.perf_counter()
    for start, end in bench_stream.batches(stream.segments[0], batch_size):
        logits = engine.step(normalize(stream.images(start, end), card.mean, card.std)).logits.double()
        corrected = logits + ((1 - prior_floor) * prior + prior_floor / classes).log()
        predictions[start:end] = corrected.argmax(1).numpy()
        _running_update(prior, logits.softmax(1), momentum)  # the model's own probabilities, not the corrected
    return bench_stream.RunOutput(predictions, [], time.perf_counter() - started, {"mode": "in-process"})


def variant_name(args: argparse.Namespace) -> str:
    parts = ["default"]
    if args.fast_layers:
        parts.append(f"fast{args.fast_layers}x{args.fast_horizon}")
    if args.shift_horizon:
        parts.append(f"shift{args.shift_horizon}")
    if args.prior_horizon:
        parts.append(f"prior{args.prior_horizon}")
    return "+".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.domain_tracking", description=__doc__.split("\n\n")[0])
    parser.add_argument("--severity", type=int, default=3, choices=range(1, 6))
    parser.add_argument("--per-class", type=int, default=50, help="images per class and corruption")
    every = ", ".join([*CORRUPTIONS, *HELD_OUT])
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS), help=f"comma-separated, of {every}")
    parser.add_argument("--scenario", default="continual", choices=("continual", "correlated"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fast-layers", type=int, default=0)
    parser.add_argument("--fast-horizon", type=int, default=128)
    parser.add_argument("--shift-horizon", type=int, default=0)
    parser.add_argument("--prior-horizon", type=int, default=0)
    parser.add_argument("--prior-floor", type=float, default=0.1)
    parser.add_argument("--results-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # every engine this process builds gets the variant's layers (norm.configure calls this)
    norm._replace_batchnorms = tracking_layers(args.fast_layers, args.fast_horizon, args.shift_horizon)
    chosen = set(args.corruptions.split(","))
    names = [name for name in (*CORRUPTIONS, *HELD_OUT) if name in chosen]
    paths = bench_stream.ensure_corrupted(names, args.severity, args.per_class, bench_stream.DEFAULT_CACHE)
    pool = bench_stream.load_pool(paths, args.per_class, with_payloads=False)
    stream = bench_stream.build_stream(args.scenario, pool, seed=0)
    output = run(stream, args.batch_size, args.prior_horizon, args.prior_floor)
    method = variant_name(args)
    meta: dict[str, Any] = {
        "scenario": args.scenario,
        "method": method,
        "batch_size": args.batch_size,
        "severity": args.severity,
        "images_per_class": args.per_class,
        "corruptions": names,
        "seed": 0,
        "variant": {k: v for k, v in vars(args).items() if k != "results_dir"},
    }
    record = bench_stream.summarize(stream, output, meta)
    bench_stream.save_record(bench_stream.run_path(args.results_dir, args.scenario, method, args.batch_size), record)
    first, rest = bench_stream.switch_errors(record)
    figures = f"mean {record['mean_error']:.2f}, first 500 after a switch {first:.2f}, rest {rest}"
    print(f"{args.scenario} b{args.batch_size} {method}: {figures}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
