"""Request and response bodies, as the OpenAPI docs at /docs show them."""

from typing import Any

from pydantic import BaseModel, Field, StrictInt


class TopK(BaseModel):
    class_index: int
    class_name: str
    confidence: float = Field(description="softmax probability")


class Prediction(BaseModel):
    id: str = Field(description="unique id; send it to POST /feedback with the true label later")
    class_index: int
    class_name: str
    confidence: float = Field(description="softmax probability of the predicted class")
    entropy: float = Field(description="softmax entropy in nats; ln(C) means no idea, 0 means certain")
    top_k: list[TopK] = Field(description="the TTA_TOP_K most probable classes, most probable first")


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(description="one per image, in the order the images were sent")
    adaptation_step: int = Field(
        description="adaptation steps since the last reset when this request's batch was predicted (a step the batch "
        "causes runs after the answer)"
    )


# Labels are strict JSON integers: "3", 3.0 and true are refused (422) rather than read as 3 or 1, because a client
# that sends them has a bug that lenient parsing would hide.
class PredictJSON(BaseModel):
    images: list[str] = Field(min_length=1, description="base64-encoded image files (JPEG, PNG, WebP, GIF)")
    labels: list[StrictInt] | None = Field(
        None, description="true class index of each image (a JSON integer, 0 to num_classes - 1), to score it"
    )
    stream: str | None = Field(
        None,
        description="the stream (camera, tenant) whose adaptation state serves these images; or the X-TTA-Stream "
        "header; absent: 'default'. 1 to 64 characters: letters, digits and . _ - :",
    )


class FeedbackItem(BaseModel):
    id: str = Field(description="the prediction id returned by /predict")
    label: StrictInt = Field(description="the true class index (a JSON integer, 0 to num_classes - 1)")


class FeedbackResponse(BaseModel):
    labelled: int
    correct: int = Field(description="how many of these predictions were right when they were made")


class ResetResponse(BaseModel):
    reset: bool
    adaptation_step: int = Field(description="steps since the last reset of the stream reset (or 'default')")
    streams: list[str] = Field(description="the streams reset")


class StreamStatus(BaseModel):
    stream: str
    steps_total: int
    steps_since_reset: int
    skipped: dict[str, int] = Field(description="batches not used for a step, by reason")
    resets: dict[str, int] = Field(description="returns to the source state, by reason")
    entropy_ema: float | None
    param_drift: float = Field(description="||theta - theta_source|| / ||theta_source||")
    buffer_fill: int = Field(description="small-batch images waiting for this stream's next step")
    prequential: dict[str, dict[str, Any]] = Field(
        description="per model (adapted; source with the shadow): labels, correct, accuracy, window_accuracy"
    )


class StreamsResponse(BaseModel):
    streams: list[StreamStatus]
    max_streams: int
    evicted: int = Field(description="streams evicted (least recently used) since the start")


class ErrorBody(BaseModel):
    error: str = Field(description="stable machine-readable code, e.g. invalid_image, queue_full")
    detail: str = Field(description="what went wrong, in a sentence")


class StatusResponse(BaseModel):
    model_config = {"extra": "allow"}
    method: str
    device: str
    model: dict[str, Any]
    adaptation: dict[str, Any]
    batching: dict[str, Any]
    prequential: dict[str, Any]
    persistence: dict[str, Any] = Field(
        description="TTA_STATE_DIR snapshots: enabled, file, restored_from (or restore_refused and why), "
        "snapshots, failures, snapshot_at (wall clock), last_snapshot_s, last_pause_s, last_snapshot_bytes"
    )


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "an image cannot be decoded (invalid_image, empty_image), the body is malformed (bad_base64, "
        "invalid_json, malformed_multipart) or a header cannot be read (invalid_header)",
        401: "no admin token on POST /reset (when TTA_ADMIN_TOKEN is set) or no API key on /predict and /feedback "
        "(when TTA_API_KEYS is set)",
        403: "a wrong admin token or API key, or an API key not allowed the request's stream",
        404: "unknown or expired prediction id",
        409: "the prediction already has a label",
        413: "too many bytes, files, fields or pixels (request_too_large, image_too_large, too_many_files, "
        "too_many_fields, too_many_pixels)",
        415: "the body's media type is not one the route accepts (unsupported_media_type), or an image's format is "
        "not accepted (unsupported_image_format)",
        422: "invalid fields (invalid_fields, invalid_labels, label_out_of_range, labels_mismatch, no_images, "
        "files_not_files, duplicate_id)",
        503: "not admitted: expected past the admission budget (overloaded), queue full (queue_full) or shutting "
        "down (shutting_down); retry after Retry-After seconds",
        504: "no answer within TTA_REQUEST_TIMEOUT_S",
    }.items()
}
