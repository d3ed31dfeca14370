"""The body of GET /v1/live, the live page's JSON (app/ui/live.py makes it); pydantic only, so that the client
(app/client.py) reads it without importing the server."""

from pydantic import BaseModel, Field


class ServerNow(BaseModel):
    queue_depth: int = Field(description="images waiting for a batch")
    max_queue_images: int = Field(description="TTA_MAX_QUEUE_IMAGES")
    predictions_total: int = Field(description="images predicted since the server started")


class ServerFigures(BaseModel):
    now: ServerNow
    series: dict[str, list[float | None]] = Field(
        description="columns, oldest first: t (unix seconds), latency_p50_s and latency_p99_s (POST /predict), "
        "batch_size_mean, images_per_s (over the trailing window_s; null without traffic), queue_depth"
    )


class StreamNow(BaseModel):
    labels: dict[str, int] = Field(description="labelled predictions per model (adapted; source with the shadow)")
    correct: dict[str, int] = Field(description="of those, right when they were made")
    steps_total: int
    steps_since_reset: int
    resets: dict[str, int] = Field(description="returns to the source state, by reason")
    skipped: dict[str, int] = Field(description="batches not used for a step, by reason")
    buffer_fill: int = Field(description="small-batch images waiting for a step")


class StreamFigures(BaseModel):
    now: StreamNow
    series: dict[str, list[float | None]] = Field(
        description="columns, oldest first: t (unix seconds), accuracy_adapted and accuracy_source (over the "
        "last TTA_PREQUENTIAL_WINDOW labels; null before the first label or without the shadow), entropy_ema, "
        "param_drift, steps_total, resets_total"
    )


class LiveResponse(BaseModel):
    method: str
    shadow_source: bool = Field(description="TTA_SHADOW_SOURCE: whether source accuracy is measured")
    interval_s: float = Field(description="seconds between samples")
    window_s: float = Field(description="trailing window of the latency and batch figures")
    server: ServerFigures
    streams: dict[str, StreamFigures] = Field(description="stream -> its figures; only `default` until streams exist")
