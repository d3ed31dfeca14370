"""Every setting of the service, read from environment variables prefixed `TTA_` (e.g. TTA_PORT=9000)."""

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, CliSuppress, SettingsConfigDict

from app.adaptation.config import AdaptationConfig
from models.card import ForeignModel

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default" / "cifar10_resnet20.safetensors"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: an address only this machine can reach."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # any other host name may resolve to anything
        return False


# ForeignModel: arch, arch_kwargs, classes, input_size, resize, mean, std, to import a foreign TTA_MODEL at start.
class Settings(BaseSettings, ForeignModel, AdaptationConfig):
    # hide_input_in_errors: a refused TTA_ADMIN_TOKEN must not be echoed into the log by its error message.
    model_config = SettingsConfigDict(
        env_prefix="TTA_", frozen=True, protected_namespaces=(), hide_input_in_errors=True
    )

    # --- serving ---
    model: Path = Field(
        DEFAULT_MODEL,
        description="checkpoint: .safetensors with its .json model card beside it, or a foreign file imported at "
        "start with arch, classes and input_size",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N; auto picks CUDA when present")
    host: str = Field("127.0.0.1", description="address to listen on; beyond loopback only with admin_token")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    max_batch_size: int = Field(64, ge=1, le=4096, description="images per model batch")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long the oldest request waits for a fuller batch")
    max_queue_images: int = Field(1024, ge=1, description="images waiting beyond this answer 503")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request not answered by then gets 504")
    # Default: a sixth of the timeout, 5 s at the default 30 s. An overload leaves at most that much work queued, so
    # latency is normal again seconds after it ends (docs/reliability/overload.md); the timeout leaves six times the
    # budget for the throughput estimate to be wrong before a 504 (at an overload's onset it was 25-40% optimistic,
    # and a machine shared with other work can halve the throughput in seconds); and on the default model it is about
    # what the default count bound holds (1,024 images at ~250 images/s), so the time bound carries that over to
    # slower models and devices. Where two full batches take longer, the batcher allows two full batches.
    max_queue_delay_ms: float | None = Field(
        None,
        gt=0,
        description="admit a request only if its images are expected to be computed within this; "
        "default request_timeout_s / 6",
    )
    # Slow clients (README, "Slow clients"): a request's headers are a few hundred bytes, and a body of a few images
    # takes well under a second on any link these requests come over; the timeouts free what a trickle would hold.
    header_timeout_s: float = Field(10.0, gt=0, description="a connection whose request headers take longer is closed")
    body_timeout_s: float = Field(20.0, gt=0, description="a request body that takes longer is answered 408")
    max_connections: int = Field(
        1024, ge=1, description="uvicorn limit_concurrency: past this many connections, requests are answered 503"
    )
    backlog: int = Field(2048, ge=1, description="connections the kernel queues before they are accepted")
    top_k: int = Field(5, ge=1, le=1000, description="classes listed per prediction")
    max_files_per_request: int = Field(64, ge=1, le=4096, description="images in one POST /predict")
    max_image_bytes: int = Field(8 * 2**20, ge=1, description="encoded bytes of one image")
    max_request_bytes: int = Field(64 * 2**20, ge=1, description="body of one POST /predict")
    # An item is ~56 bytes, so 1 MiB holds ~18,000 labels, parsed in ~50 ms on one core: a large batch of late labels
    # fits, and no body can hold the event loop (every route) for long.
    max_feedback_bytes: int = Field(2**20, ge=1, description="body of one POST /feedback")
    # Pixels, not bytes, are what decoding costs (deflate packs ~340 pixels in a byte): README, "Upload limits".
    max_image_pixels: int = Field(
        3840 * 2160, ge=1, description="width x height one image may declare, checked before decoding"
    )
    max_request_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="pixels decoded for one request, summed over its images (JPEGs after DCT-domain reduction)",
    )
    decode_threads: int = Field(0, ge=0, le=256, description="threads decoding images; 0 = one per CPU core")
    # No flag: a command line is readable by every local user (ps); the variable is not.
    admin_token: CliSuppress[SecretStr | None] = Field(
        None, description="bearer token required by POST /reset when set; needed to listen beyond loopback"
    )
    allow_open_admin: bool = Field(
        False, description="listen on a non-loopback address without admin_token: POST /reset open to anyone"
    )
    api_keys: Path | None = Field(
        None, description="file of the API keys /predict and /feedback accept (format: app/api/auth.py, README)"
    )
    shutdown_grace_s: float = Field(10.0, ge=0, description="how long SIGTERM waits for queued batches")
    state_dir: Path | None = Field(
        None, description="directory of the adapted-state snapshot, restored at start; unset = no persistence"
    )
    # A minute: what a kill -9 can lose (about 50 steps at the saturated one-core rate), for a pause in serving of a
    # few milliseconds per snapshot, and of up to 200 ms with a full ledger (README, "Persistence").
    snapshot_interval_s: float = Field(60.0, gt=0, le=86_400, description="seconds between state snapshots")

    max_streams: int = Field(
        1024, ge=1, le=1_000_000, description="streams adapted at once; beyond, the least recently used is evicted"
    )
    # Capture (app/serving/capture.py; README, "Capture"): the disk holds at most max_streams x max_images images.
    capture_dir: Path | None = Field(None, description="keep a uniform sample of served images here; unset = off")
    capture_max_images: int = Field(1000, ge=1, description="images kept per stream (a reservoir sample)")
    capture_max_streams: int = Field(16, ge=1, description="streams captured; images of further streams are not")

    # --- adaptation: AdaptationConfig's fields (app/adaptation/config.py; README, "Methods and guards") ---

    # --- evaluation ---
    ledger_size: int = Field(100_000, ge=1, description="predictions remembered while waiting for a label")
    ledger_max_age_s: float = Field(3600.0, gt=0, description="seconds a prediction waits for its label at most")
    prequential_window: int = Field(1000, ge=1, description="labels in the tta_prequential_accuracy window")

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"model checkpoint {value} does not exist")
        return value

    @field_validator("admin_token")
    @classmethod
    def _token_fits_a_header(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        token = value.get_secret_value()
        if not token:
            raise ValueError("TTA_ADMIN_TOKEN is empty: unset it, or set it to a secret")
        if not (token.isascii() and token.isprintable()) or " " in token:
            # It travels in `Authorization: Bearer <token>`, where the server refuses non-ASCII bytes (400).
            raise ValueError("TTA_ADMIN_TOKEN must be printable ASCII without spaces")
        return value

    @field_validator("api_keys")
    @classmethod
    def _key_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"API key file {value} does not exist")
        return value

    @model_validator(mode="after")
    def _queue_delay_within_timeout(self) -> "Settings":
        if self.queue_delay_s() >= self.request_timeout_s:
            raise ValueError("max_queue_delay_ms must be below request_timeout_s, or admitted requests would time out")
        return self

    def queue_delay_s(self) -> float:
        """The admission budget in seconds (TTA_MAX_QUEUE_DELAY_MS, by default a sixth of the request timeout)."""
        return self.max_queue_delay_ms / 1000 if self.max_queue_delay_ms is not None else self.request_timeout_s / 6

    @property
    def adaptation(self) -> AdaptationConfig:
        """The adaptation's configuration, what the engine takes."""
        return self.adaptation_config()
