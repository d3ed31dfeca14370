"""What decoding can cost within the default limits: the worst inputs per format, per byte and per request.

The worst case for a decoder is the most pixels per byte: a flat image at the largest size the per-image limit
admits (deflate, WebP and LZW all compress it ~300-1000:1), and forged headers that promise that size with
almost no data. Each is decoded through the server's own path (app/serving/preprocess.decode_all, one thread).

    python -m bench.decode_cost --out docs/reliability/decode_cost.json
"""

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.api.errors import REFUSAL_STATUS
from app.config import Settings
from app.serving.preprocess import DecodeRefusedError, ImageLimits, decode_all
from bench.malformed import forge_size, png_declaring  # the fuzz test's forgeries

INPUT_SIZE = 32  # the default model's


def flat(fmt: str, width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    Image.fromarray(np.full((height, width, 3), 127, np.uint8)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def timed(files: list[tuple[str, bytes]], limits: ImageLimits, repeats: int = 3) -> tuple[float, str]:
    best, outcome = float("inf"), ""
    for _ in range(repeats):
        started = time.perf_counter()
        try:
            decode_all(files, INPUT_SIZE, limits)
            outcome = "decoded"
        except DecodeRefusedError as error:
            outcome = f"{REFUSAL_STATUS[type(error)]} {error.code}"
        best = min(best, time.perf_counter() - started)
    return best, outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    defaults = Settings.model_fields
    limits = ImageLimits(
        defaults["max_image_bytes"].default,
        defaults["max_image_pixels"].default,
        defaults["max_request_pixels"].default,
    )
    w, h = 3840, 2160  # the per-image limit's shape: a 4K frame
    assert w * h <= limits.max_image_pixels
    small_jpeg = flat("JPEG", 64, 64)
    cases = {f"flat {fmt} {w}x{h}": [("a", flat(fmt, w, h))] for fmt in ("PNG", "WEBP", "GIF", "JPEG")}
    cases[f"forged PNG header {w}x{h}, no data"] = [("a", png_declaring(w, h))]
    cases[f"forged JPEG header {w}x{h}, 64 px of data"] = [("a", forge_size("JPEG", small_jpeg, w, h))]
    cases["64 forged JPEGs, 6000x6000 each (issue #14: 17.8 s)"] = [
        (str(i), forge_size("JPEG", small_jpeg, 6000, 6000)) for i in range(64)
    ]
    cases[f"64 forged JPEGs, {w}x{h} each"] = [(str(i), forge_size("JPEG", small_jpeg, w, h)) for i in range(64)]
    cases[f"2 flat PNGs {w}x{h} (the per-request budget)"] = [(str(i), flat("PNG", w, h)) for i in range(2)]
    cases[f"3 flat PNGs {w}x{h} (past the budget)"] = [(str(i), flat("PNG", w, h)) for i in range(3)]
    rows = []
    for name, files in cases.items():
        seconds, outcome = timed(files, limits)
        size = sum(len(d) for _, d in files)
        rows.append(
            {"case": name, "bytes": size, "ms": seconds * 1000, "us_per_byte": seconds * 1e6 / size, "outcome": outcome}
        )
        print(f"| {name} | {size:,} | {seconds * 1000:.1f} | {seconds * 1e6 / size:.2f} | {outcome} |", flush=True)
    result = {
        "limits": limits.__dict__,
        "input_size": INPUT_SIZE,
        "rows": rows,
        "command": "python -m bench.decode_cost " + " ".join(argv or sys.argv[1:]),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
