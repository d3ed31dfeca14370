"""Peer (b): LitServe with dynamic batching, the same model without adaptation and the same preprocessing.

`max_batch_size` and `batch_timeout` default to ours (TTA_MAX_BATCH_SIZE=64, TTA_MAX_WAIT_MS=5 -> 0.005 s).
LitServe parses the multipart body in its API-server process and hands the form to an inference-worker process,
which decodes (`decode_request`), stacks a batch (`batch`), runs the model under torch.inference_mode
(`predict`) and answers per request. The answer carries class_index, class_name and confidence per image.

When PEER_BATCH_STATS names a file, the worker keeps "<images> <batches>" in it (rewritten after every batch), so
the benchmark can report LitServe's achieved mean batch size as it does ours from /metrics.

    python -m bench.peers.litserve_peer --port 8002 --model models/default/cifar10_resnet20.safetensors
"""

from __future__ import annotations

import argparse
import os

import litserve as ls
import torch

from bench.peers.common import decode, load, normalise, predictions


class ClassifierAPI(ls.LitAPI):
    def __init__(self, model_path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_path = model_path

    def setup(self, device: str) -> None:
        self.loaded = load(self.model_path)
        self.size, self.names = self.loaded.card.input_size, self.loaded.card.class_names
        stats = os.environ.get("PEER_BATCH_STATS")
        self.stats_fd = os.open(stats, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if stats else None
        self.images = self.batches = 0

    def decode_request(self, request) -> torch.Tensor:
        files = request.getlist("files") if hasattr(request, "getlist") else [request["files"]]
        return torch.stack([decode(f.file.read(), self.size) for f in files])

    def batch(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        return torch.cat(inputs), [len(x) for x in inputs]

    def predict(self, batch: tuple[torch.Tensor, list[int]]) -> list[list[dict]]:
        images, counts = batch
        with torch.inference_mode():
            logits = self.loaded.model(normalise(images, self.loaded))
        flat = predictions(logits, self.names)
        self._count(len(images))
        out, start = [], 0
        for n in counts:
            out.append(flat[start : start + n])
            start += n
        return out

    def unbatch(self, output: list[list[dict]]) -> list[list[dict]]:
        return output

    def encode_response(self, output: list[dict]) -> dict:
        return {"predictions": output}

    def _count(self, images: int) -> None:
        self.images += images
        self.batches += 1
        if self.stats_fd is not None:
            os.pwrite(self.stats_fd, f"{self.images:>20} {self.batches:>20}\n".encode(), 0)


def read_batch_stats(path: str) -> tuple[float, float] | None:
    """(images, batches) so far from a PEER_BATCH_STATS file; None when it is missing or empty."""
    try:
        text = open(path).read().split()  # noqa: SIM115 - tiny file, read once
    except OSError:
        return None
    return (float(text[0]), float(text[1])) if len(text) == 2 else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.litserve_peer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--model", default=os.environ.get("TTA_MODEL"), required="TTA_MODEL" not in os.environ)
    parser.add_argument("--max-batch-size", type=int, default=int(os.environ.get("TTA_MAX_BATCH_SIZE", 64)))
    parser.add_argument("--max-wait-ms", type=float, default=float(os.environ.get("TTA_MAX_WAIT_MS", 5.0)))
    parser.add_argument("--api-path", default="/predict")
    parser.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ transport instead of mp queues")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    api = ClassifierAPI(
        args.model, max_batch_size=args.max_batch_size, batch_timeout=args.max_wait_ms / 1000, api_path=args.api_path
    )
    server = ls.LitServer(
        api, accelerator="cpu", devices=1, workers_per_device=1, timeout=30, fast_queue=args.fast_queue
    )
    server.run(host=args.host, port=args.port, num_api_servers=1, log_level=args.log_level, generate_client_file=False)


if __name__ == "__main__":
    main()
