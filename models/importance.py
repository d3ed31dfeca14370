"""Importance weights for domain adaptation under covariate shift (sample selection bias).

The loss on the target, E_t[l(x, y)], equals the weighted loss on the source, E_s[w(x) l(x, y)], with
w(x) = p_t(x) / p_s(x), provided p(y | x) is the same in both domains and the target lies inside the source's
support (p_s(x) > 0 wherever p_t(x) > 0). The density ratio comes from a domain classifier: trained to tell source
(label 1) from target images, it gives p = p(source | x), and by Bayes

    p / (1 - p) = (n_s p_s(x)) / (n_t p_t(x)),   so   w(x) = (1 - p) / p * n_s / n_t,

where n_s / n_t (the source and target counts the classifier was trained on) corrects for its class prior.

The classifier is a logistic regression on the model's penultimate features (the input of its head), standardised:
those are what the head decides from, so the weights follow the shift that matters to the prediction; they are low
dimensional (64 for the CIFAR ResNets), so a linear classifier is well posed on a few thousand images; and logistic
regression's log-loss is a proper scoring rule, so its p is calibrated, as w = (1 - p) / p needs. It is fitted
with torch's L-BFGS (no other dependency), with cross-fitting: each image's p comes from a classifier trained on
the other folds, so a source image is not weighted by a classifier that memorised it, and the AUC is held out.

The weights are normalised to mean 1 over the source and clipped at `max_weight` (a few images with p near 0 would
otherwise carry the whole loss): min(w, t) / mean(min(w, t)) with t chosen so that the largest is `max_weight`.
When the classifier separates the domains almost perfectly (held-out AUC above SEPARABLE_AUC) or the effective
sample size (sum w)^2 / sum w^2 falls below LOW_ESS_FRACTION of the source, the support assumption fails: the
target lies outside the source, a few source images get all the weight, and the weighted loss estimates nothing.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.card import ModelCard
from models.data import normalize

log = logging.getLogger("tta.finetune")

SEPARABLE_AUC = 0.98
LOW_ESS_FRACTION = 0.05
SUPPORT_ASSUMPTION = (
    "importance weighting assumes covariate shift inside the source's support: p(y | x) is the same in both domains "
    "and every target image could have been drawn from the source (p_s(x) > 0 where p_t(x) > 0)"
)


@dataclass
class ImportanceWeights:
    weights: torch.Tensor  # one per source image, mean 1, clipped
    p_source: torch.Tensor  # held-out p(source | x) of each source image
    raw_mean: float  # mean of (1 - p) / p * n_s / n_t before normalising: near 1 when p is calibrated
    auc: float  # held-out AUC of the domain classifier (0.5: indistinguishable, 1: separated)
    n_source: int
    n_target: int
    clipped: int
    max_weight: float

    @property
    def ess(self) -> float:
        """Effective sample size, (sum w)^2 / sum w^2: as many equally weighted images would give the same variance."""
        return float(self.weights.sum() ** 2 / (self.weights**2).sum())

    def warning(self) -> str | None:
        """One line when the weights degenerate, saying why; None when they do not."""
        fraction = self.ess / self.n_source
        if self.auc <= SEPARABLE_AUC and fraction >= LOW_ESS_FRACTION:
            return None
        return (
            f"the domain classifier separates source and target (held-out AUC {self.auc:.3f}, ESS {self.ess:.0f} of "
            f"{self.n_source} = {100 * fraction:.1f}%): the target lies outside the source's support, the weights "
            "degenerate and importance weighting cannot correct this shift"
        )

    def report(self, bins: int = 20) -> dict[str, Any]:
        """What goes into the card: the figures, the histogram's counts, the assumption and any warning."""
        counts, edges = np.histogram(self.weights.numpy(), bins=bins)
        quantiles = np.quantile(self.weights.numpy(), [0.0, 0.05, 0.5, 0.95, 1.0])
        return {
            "domain_classifier": "logistic regression on standardised penultimate features, 5-fold cross-fitted",
            "features": "the input of the head (penultimate layer)",
            "n_source": self.n_source,
            "n_target": self.n_target,
            "auc_held_out": round(self.auc, 4),
            "ess": round(self.ess, 1),
            "ess_fraction": round(self.ess / self.n_source, 4),
            "raw_weight_mean": round(self.raw_mean, 4),
            "max_weight": self.max_weight,
            "clipped": self.clipped,
            "weight_quantiles": {
                q: round(float(v), 4) for q, v in zip(("min", "p5", "median", "p95", "max"), quantiles, strict=True)
            },
            "histogram": {"counts": counts.tolist(), "edges": [round(float(e), 4) for e in edges]},
            "assumption": SUPPORT_ASSUMPTION,
            "warning": self.warning(),
        }


@torch.inference_mode()
def penultimate_features(
    model: nn.Module, head: nn.Module, images: torch.Tensor, card: ModelCard, batch_size: int = 500
) -> torch.Tensor:
    """The input of `head` (the classifier's last Linear) for each uint8 image, the model in eval mode."""
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0].flatten(1).float()))
    try:
        model.eval()
        for start in range(0, len(images), batch_size):
            model(normalize(images[start : start + batch_size], card.mean, card.std))
    finally:
        hook.remove()
    return torch.cat(captured)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> nn.Linear:
    """L2-regularised logistic regression, fitted to convergence with L-BFGS."""
    linear = nn.Linear(x.shape[1], 1, dtype=x.dtype)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(linear(x).squeeze(1), y)
        loss = loss + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return linear


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a positive scores above a negative (Mann-Whitney U)."""
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def domain_probabilities(
    source: torch.Tensor, target: torch.Tensor, folds: int = 5, seed: int = 0, l2: float = 1e-3
) -> tuple[torch.Tensor, float]:
    """Held-out p(source | x) of every source feature row, and the held-out AUC over both domains."""
    x = torch.cat([source, target]).double()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    y = torch.cat([torch.ones(len(source)), torch.zeros(len(target))]).double()
    fold = torch.as_tensor(np.random.default_rng(seed).permutation(len(x)) % folds)
    logits = torch.empty(len(x), dtype=torch.float64)
    for k in range(folds):
        held = fold == k
        classifier = _fit_logistic(x[~held], y[~held], l2)
        with torch.no_grad():
            logits[held] = classifier(x[held]).squeeze(1)
    return torch.sigmoid(logits[: len(source)]).float(), auc(logits, y.bool())


def importance_weights(
    source: torch.Tensor, target: torch.Tensor, max_weight: float = 10.0, seed: int = 0
) -> ImportanceWeights:
    """w = (1 - p) / p * n_s / n_t per source row of features, clipped and normalised to mean 1 (clip_normalised)."""
    p, held_out_auc = domain_probabilities(source, target, seed=seed)
    p = p.clamp(1e-6, 1 - 1e-6)
    raw = (1 - p) / p * (len(source) / len(target))
    weights, clipped = clip_normalised(raw.double(), max_weight)
    return ImportanceWeights(weights, p, float(raw.mean()), held_out_auc, len(source), len(target), clipped, max_weight)


def clip_normalised(raw: torch.Tensor, max_weight: float) -> tuple[torch.Tensor, int]:
    """Weights of mean 1 and at most `max_weight`, and how many were clipped: min(raw, t) / mean(min(raw, t)), the
    threshold t found by bisection (t / mean(min(raw, t)) grows with t). Clipping first and normalising after would
    lift the clipped weights past the bound again when most of the weight is cut off."""
    if raw.max() / raw.mean() <= max_weight:
        return raw / raw.mean(), 0
    low, high = float(raw.min()), float(raw.max())
    for _ in range(100):
        t = (low + high) / 2
        low, high = (t, high) if t / float(raw.clamp(max=t).mean()) < max_weight else (low, t)
    clipped = raw.clamp(max=low)
    return clipped / clipped.mean(), int((raw > low).sum())


def write_histogram(result: ImportanceWeights, path: Path, title: str) -> bool:
    """The weights' histogram as a PNG (matplotlib: the bench extra); False, and a log line, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning(
            "matplotlib is not installed (pip install '.[bench]'): no histogram PNG; its counts are in the card"
        )
        return False
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=110)
    axes.hist(result.weights.numpy(), bins=40, color="#3a6ea5")
    axes.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes.set_yscale("log")
    axes.set_xlabel(f"importance weight w (mean 1, clipped at {result.max_weight:g})")
    axes.set_ylabel("source images")
    axes.set_title(
        f"{title}\nESS {result.ess:.0f} of {result.n_source} ({100 * result.ess / result.n_source:.1f}%), "
        f"domain AUC {result.auc:.3f}",
        fontsize=9,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return True


def weigh_source(
    model: nn.Module,
    card: ModelCard,
    source_images: torch.Tensor,
    target_images: torch.Tensor,
    max_weight: float,
    histogram: Path | None,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The importance weights of the source images against the unlabelled target ones, from `model`'s features as
    they are before finetuning; logs the figures and, when the weights degenerate, one warning line. Returns the
    weights and the report for the card (with the histogram PNG's name when one was written)."""
    from models.finetune import head_of

    head = head_of(model)
    result = importance_weights(
        penultimate_features(model, head, source_images, card),
        penultimate_features(model, head, target_images, card),
        max_weight,
        seed,
    )
    log.info(SUPPORT_ASSUMPTION)
    log.info(
        "importance weights: held-out domain AUC %.3f, ESS %.0f of %d source images (%.1f%%), %d clipped at %g",
        result.auc,
        result.ess,
        result.n_source,
        100 * result.ess / result.n_source,
        result.clipped,
        max_weight,
    )
    if (warning := result.warning()) is not None:
        log.warning("%s", warning)
    report = result.report()
    if histogram is not None and write_histogram(result, histogram, "importance weights of the source images"):
        report["histogram_png"] = histogram.name
    return result.weights, report
