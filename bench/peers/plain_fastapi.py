"""Peer (a): a plain FastAPI endpoint that runs the model once per request. No batching, no adaptation.

The endpoint is a plain `def`, so FastAPI runs it in its thread pool (the usual way to keep model code off the
event loop); the model call is under torch.inference_mode. Same multipart `files` POST and preprocessing as ours.

    python -m bench.peers.plain_fastapi --port 8001 --model models/default/cifar10_resnet20.safetensors
"""

from __future__ import annotations

import argparse
import os

import torch
import uvicorn
from fastapi import FastAPI, File, HTTPException, UploadFile

from bench.peers.common import decode, load, normalise, predictions


def create_app(model_path: str) -> FastAPI:
    loaded = load(model_path)
    size, names = loaded.card.input_size, loaded.card.class_names
    app = FastAPI(title="plain FastAPI peer")

    @app.post("/predict")
    def predict(files: list[UploadFile] = File(...)) -> dict:
        try:
            images = torch.stack([decode(f.file.read(), size) for f in files])
        except RuntimeError as error:
            raise HTTPException(400, "undecodable image") from error
        with torch.inference_mode():
            logits = loaded.model(normalise(images, loaded))
        return {"predictions": predictions(logits, names)}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.plain_fastapi")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default=os.environ.get("TTA_MODEL"), required="TTA_MODEL" not in os.environ)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.model), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
