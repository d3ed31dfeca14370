"""create_app(settings): the FastAPI app; its lifespan loads the model and starts the worker and batcher."""

import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app.adaptation.engine import AdaptationEngine
from app.adaptation.streams import StreamEngines
from app.api.auth import install_auth
from app.api.errors import install_error_handlers
from app.api.routes import router
from app.config import Settings
from app.metrics.ledger import PredictionLedger
from app.metrics.prometheus import ServiceMetrics
from app.serving.batcher import Batcher
from app.serving.capture import Capture
from app.serving.persistence import Persistence, SnapshotFile, model_digest
from app.serving.preprocess import ImageDecoder, ImageLimits
from app.serving.worker import ModelWorker
from app.ui.pages import install_ui
from models.checkpoint import ModelCard
from models.importer import open_model

log = logging.getLogger("tta")


@dataclass
class Service:
    """Everything a route needs, built once per process."""

    settings: Settings
    card: ModelCard
    device: torch.device
    worker: ModelWorker
    batcher: Batcher
    ledger: PredictionLedger
    metrics: ServiceMetrics
    decoder: ImageDecoder
    persistence: Persistence
    capture: Capture
    started: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"TTA_DEVICE={name} but no CUDA device is available; use cpu or auto")
    return device


def model_identity(settings: Settings, card: ModelCard) -> str:
    """What a snapshot must have been taken with. A foreign file imported at start has no card on disk; the card made
    from it holds the file's sha256 and every import flag, so its digest stands for both."""
    if settings.arch is None:
        return model_digest(settings.model)
    return hashlib.sha256(card.model_dump_json().encode()).hexdigest()


def build_service(settings: Settings, loaded: tuple[torch.nn.Module, ModelCard] | None = None) -> Service:
    model, card = loaded or open_model(settings.model, settings)  # Settings holds the import flags (ForeignModel)
    settings = settings.calibrated(card.source_distance_q99())
    if settings.guard_plausible and settings.source_distance_q99 is None:
        log.warning(
            "the plausibility guard admits every image: the model card has no source_distance (measure it with "
            "`tta calibrate MODEL --images SOURCE_IMAGES`, or set TTA_SOURCE_DISTANCE_Q99)"
        )
    device = resolve_device(settings.device)
    model = model.to(device)
    streams = StreamEngines(lambda: AdaptationEngine(model, card.num_classes, settings, device), settings.max_streams)
    worker = ModelWorker(streams, card.mean, card.std, settings.top_k)
    metrics = ServiceMetrics()
    batcher = Batcher(
        worker.predict,
        settings.max_batch_size,
        settings.max_wait_ms / 1000,
        settings.max_queue_images,
        settings.queue_delay_s(),
        recorder=metrics,
    )
    ledger = PredictionLedger(
        card.num_classes,
        settings.ledger_size,
        settings.ledger_max_age_s,
        settings.prequential_window,
        settings.max_streams,
    )
    state_file = SnapshotFile(settings.state_dir, model_identity(settings, card)) if settings.state_dir else None
    persistence = Persistence(state_file, worker, ledger, settings.snapshot_interval_s)
    metrics.read_at_scrape(batcher, worker, ledger, persistence, settings.shadow_source)
    limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.max_request_pixels)
    decoder = ImageDecoder(card.input_size, limits, settings.decode_threads or None, resize=card.resize)
    capture = Capture(settings.capture_dir, card.class_names, settings.capture_max_images, settings.capture_max_streams)
    metrics.registry.register(capture)
    return Service(settings, card, device, worker, batcher, ledger, metrics, decoder, persistence, capture, time.time())


def create_app(settings: Settings | None = None, loaded: tuple[torch.nn.Module, ModelCard] | None = None) -> FastAPI:
    """`loaded`: the model and card, when the caller has loaded them already (`tta serve`, to refuse a bad one)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = build_service(settings, loaded)
        service.worker.start()
        await service.persistence.restore()  # before the first batch, which then adapts the restored state
        service.batcher.start()
        service.persistence.start()
        service.capture.start()
        app.state.service = service
        log.info(
            "serving %s (%s) on %s with method %s",
            settings.model.name,
            service.card.architecture,
            service.device,
            settings.method,
        )
        yield
        await service.batcher.stop(settings.shutdown_grace_s)
        await service.persistence.stop()  # the last snapshot: after the batcher has drained, before the worker stops
        service.worker.stop()
        service.decoder.close()
        service.capture.stop()

    # FastAPIOffline: /docs and /redoc with Swagger UI and ReDoc served from the fastapi-offline package, no CDN
    app = FastAPIOffline(
        title="TTA inference server",
        description="Image classification that adapts online to its traffic (TENT with stability guards), "
        "with dynamic batching and prequential metrics.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_auth(app, settings)  # here, not in the lifespan: a bad key file stops `tta serve` before it listens
    app.include_router(router)
    install_ui(app)  # the live page at /, its JSON at /v1/live
    return app
