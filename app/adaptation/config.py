"""The adaptation's own configuration, apart from the server's: the engine takes an `AdaptationConfig` and nothing else
of the settings, so it runs as a library without a model path or a port. `app.config.Settings` is one (it inherits
these fields, read from the same TTA_ variables and flags); `Settings.adaptation` is the plain part.

Imports no torch: the settings are checked before torch loads (`tta serve` refuses a bad value in a second).
"""

import math
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from app.adaptation import methods

Method = Literal[methods.names()]  # the registry's names: one module per method in app/adaptation/methods/

# A field marked so is one of the guards' settings, shown with the guards' on/off in the status snapshot.
GUARD_SETTING: dict[str, Any] = {"guard_setting": True}


def GUARD_SETTING_AS(shown_as: str) -> dict[str, Any]:  # noqa: N802 (reads as the constant above)
    """A guard setting shown under another name in the status (`min_batch` as `min_batch_size`, as it always was)."""
    return {"guard_setting": True, "shown_as": shown_as}


class AdaptationConfig(BaseModel):
    """Method, optimiser, guards (README, "Methods and guards") and the source shadow."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    method: Method = Field(  # type: ignore[valid-type]
        "tent", description="none (frozen), norm (test statistics), tent (test statistics + entropy step)"
    )
    optimizer: Literal["adam", "sgd"] = Field("adam", description="optimiser of the entropy step")
    lr: float = Field(1e-3, gt=0, le=10, description="learning rate of the entropy step")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    steps_per_batch: int = Field(1, ge=1, le=100, description="entropy steps per adaptation batch")
    stats_horizon: int = Field(
        2560,
        ge=1,
        description="images over which the class-balanced test statistics average (small-batch guard)",
        json_schema_extra=GUARD_SETTING,
    )
    # A full batch (min_batch images or more) is normalised with the class-balanced statistics moved by its own
    # residual from them (norm.batch_correction): a domain switch is followed at its first batch instead of after
    # thousands of images (docs/BENCHMARKS.md, "Following a domain switch"). Costs a first forward pass per batch.
    batch_stats_prior: int = Field(
        128,
        ge=0,
        description="images of running statistics a full batch's own statistics are weighed against (they move the "
        "class-balanced statistics by images / (images + this) of the batch's residual, less for a batch of few "
        "classes); 0: a batch is normalised with the running statistics alone",
        json_schema_extra=GUARD_SETTING,
    )
    # A smaller batch (buffered: single images, a few per request, or mixed with other streams' images) is too small
    # to correct itself; the stream's recent small batches play the batch's part: their residual, averaged over about
    # this many images, moves the statistics as a full batch's own does (norm.py, "recent residual").
    recent_window: int = Field(
        256,
        ge=0,
        description="images of a stream's recent small batches whose residual from the class-balanced statistics "
        "corrects them, weighed as a full batch's against batch_stats_prior; 0: small batches use the running "
        "statistics alone",
        json_schema_extra=GUARD_SETTING,
    )
    # What bounds a stream's memory with many classes: a ResNet-50's BatchNorm layers have 26,560 channels, so a row
    # of its statistics costs 0.21 MB, and 1,000 classes a row each would be 212 MB per stream. 12 MB: 56 rows for
    # it (issue 15's target of 16 MB per stream, with its 0.9 MB of parameters, optimiser and monitor), still one row
    # per class for the default CIFAR-10 model (10 rows of 688 channels: 0.06 MB). Accuracy of fewer rows than
    # classes: docs/BENCHMARKS.md, "Bytes per stream".
    stats_memory_mb: float = Field(
        12.0,
        gt=0,
        description="MB (10^6 bytes) one stream's class-balanced statistics may take: rows = min(classes, 100, "
        "this / (BatchNorm channels x 8 bytes)), at least 1; classes share rows by class index modulo rows",
    )
    guard_reliable: bool = Field(True, description="adapt only on samples with entropy < reliable_entropy * ln C")
    reliable_entropy: float = Field(
        0.4,
        gt=0,
        le=1,
        description="the reliable-sample threshold, as a fraction of ln C",
        json_schema_extra=GUARD_SETTING,
    )
    guard_reweight: bool = Field(
        True, description="weight each sample's entropy by 1 / the recent share of its predicted class (DELTA)"
    )
    guard_balance: bool = Field(
        True, description="no step on a batch whose predictions concentrate on few classes (class-sorted traffic)"
    )
    balance_entropy: float = Field(
        0.6,
        ge=0,
        le=1,
        description="no step when the entropy of the batch's predicted classes is below this * ln min(C, batch size)",
        json_schema_extra=GUARD_SETTING,
    )
    guard_min_batch: bool = Field(True, description="never normalise or step on a batch smaller than min_batch alone")
    min_batch: int = Field(
        64,
        ge=1,
        le=4096,
        description="images per entropy step: smaller batches are buffered until this many have been predicted",
        json_schema_extra=GUARD_SETTING_AS("min_batch_size"),
    )
    step_lag: bool = Field(
        True,
        description="compute a buffered step (the adaptation batch that small batches complete) off the request's "
        "path and apply it just before the stream's next step: the predictions in between are one step behind "
        "(off: the step is applied at once, after the answer, on the model thread)",
    )
    # Poisoning within a stream (docs/reliability/poisoning.md): what the class-balanced statistics and the entropy
    # step admit. Noise far from anything the model was trained on is held back; while one class takes most of the
    # recent predictions (a flood of one class, or a collapse), no class's statistics may run ahead of the others'.
    guard_plausible: bool = Field(
        True,
        description="an image joins the class-balanced statistics, and the entropy step, only if its features are "
        "within plausible_distance of the source's",
    )
    # The distance's scale depends on the architecture (a 1x1 last stage makes an image's channel mean one activation,
    # with the whole running variance as its spread), so the threshold is in units of the model's own source images'
    # distances: the 99th percentile that `tta calibrate` measures and writes into the model card. 1.5 is the 0.4
    # chosen on the default model before (docs/reliability/poisoning.md) in these units (its q99 is 0.266).
    plausible_distance: float = Field(
        1.5,
        gt=0,
        description="the most an image's source distance may be, in units of source_distance_q99 (its mean squared "
        "source-normalised feature distance over every channel of every BatchNorm layer: (image's channel mean - "
        "source mean)^2 / source variance)",
        json_schema_extra=GUARD_SETTING,
    )
    source_distance_q99: float | None = Field(
        None,
        gt=0,
        description="the 99th percentile of that distance over the model's own source images: the server takes it "
        "from the model card (`tta calibrate`), and this overrides it; unknown: the plausibility guard admits every "
        "image",
        json_schema_extra=GUARD_SETTING,
    )
    guard_class_pace: bool = Field(
        True,
        description="while one class takes class_pace_trigger of the recent predictions, an image joins the "
        "class-balanced statistics, and the entropy step, only if its class's stay within class_pace_margin of "
        "the median class's freshness",
    )
    class_pace_trigger: float = Field(
        0.67,
        gt=0,
        le=1,
        description="share of the recent predictions (diversity_window) one class must take for the pace to bind",
        json_schema_extra=GUARD_SETTING,
    )
    class_pace_margin: float = Field(
        0.05,
        gt=0,
        le=1,
        description="how far one class's statistics may be fresher than the median class's (share of the moments "
        "brought by the last stats_horizon images)",
        json_schema_extra=GUARD_SETTING,
    )
    guard_grad_clip: bool = Field(True, description="clip the gradient norm of the adapted parameters")
    grad_clip_norm: float = Field(
        1.0, gt=0, description="the norm gradients are clipped to", json_schema_extra=GUARD_SETTING
    )
    guard_nonfinite: bool = Field(True, description="roll back a step with a non-finite loss, gradient or parameter")
    guard_collapse: bool = Field(True, description="reset when the entropy EMA or the prediction diversity collapses")
    collapse_entropy: float = Field(
        0.02,
        ge=0,
        le=1,
        description="reset when the entropy EMA falls below this * ln C",
        json_schema_extra=GUARD_SETTING,
    )
    entropy_ema_decay: float = Field(
        0.9, ge=0, lt=1, description="entropy EMA decay per min_batch images (the same average at any batch size)"
    )
    collapse_diversity: float = Field(
        0.1,
        ge=0,
        le=1,
        description="reset when the entropy of the mean prediction over the window falls below this * ln C",
        json_schema_extra=GUARD_SETTING,
    )
    diversity_window: int = Field(
        2048, ge=16, description="recent predictions the diversity check looks at", json_schema_extra=GUARD_SETTING
    )
    guard_drift: bool = Field(True, description="reset when the adapted parameters drift too far from the source")
    drift_max: float = Field(
        0.5,
        gt=0,
        description="reset when ||theta - theta_source|| / ||theta_source|| passes this",
        json_schema_extra=GUARD_SETTING,
    )
    guard_anchor: bool = Field(True, description="after every step, pull the adapted parameters toward the source")
    anchor_rate: float = Field(
        0.01,
        gt=0,
        le=1,
        description="fraction of the way back to the source parameters after every step",
        json_schema_extra=GUARD_SETTING,
    )
    reset_every_steps: int = Field(0, ge=0, description="periodic reset; 0 = off", json_schema_extra=GUARD_SETTING)
    shadow_source: bool = Field(False, description="also predict with the frozen source model, for comparison")

    def adaptation_config(self) -> "AdaptationConfig":
        """This configuration alone: a plain AdaptationConfig even where `self` is the server's Settings."""
        return AdaptationConfig(**{name: getattr(self, name) for name in AdaptationConfig.model_fields})

    def calibrated(self, source_distance_q99: float | None) -> Self:
        """This configuration with a model card's plausibility scale (`ModelCard.source_distance`), unless one is set
        here already (TTA_SOURCE_DISTANCE_Q99 overrides the card)."""
        if self.source_distance_q99 is not None or source_distance_q99 is None:
            return self
        return self.model_copy(update={"source_distance_q99": source_distance_q99})

    def reliable_threshold(self, num_classes: int) -> float:
        return self.reliable_entropy * math.log(num_classes)

    def balance_threshold(self, num_classes: int, batch_size: int) -> float:
        # ln min(C, n), the most even histogram n predictions can make: against ln C alone, 64 predictions of 1,000
        # classes pass 0.6 ln 1000 = 4.14 nats only when all 64 differ (ln 64 = 4.16), about one batch in eight.
        return self.balance_entropy * math.log(min(num_classes, batch_size))

    def guards(self) -> dict[str, bool]:
        """Every guard's on/off, by name (the field guard_<name>)."""
        return {name: getattr(self, f"guard_{name}") for name in guard_names()}

    def guard_status(self) -> dict[str, Any]:
        """The guards' on/off and their settings, as /v1/status shows them."""
        shown = {}
        for name, field in AdaptationConfig.model_fields.items():
            extra = field.json_schema_extra
            if isinstance(extra, dict) and extra.get("guard_setting"):
                shown[str(extra.get("shown_as", name))] = getattr(self, name)
        return {**self.guards(), **shown}

    def without_guards(self) -> "AdaptationConfig":
        """TENT as published: every guard off (of the same class: Settings stay Settings)."""
        return self.model_copy(update={f"guard_{name}": False for name in guard_names()})


def guard_names() -> tuple[str, ...]:
    return tuple(name.removeprefix("guard_") for name in AdaptationConfig.model_fields if name.startswith("guard_"))
