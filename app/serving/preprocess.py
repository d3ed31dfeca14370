"""Encoded image bytes -> uint8 tensor 3 x S x S (the card's input size), on a bounded pool of decode threads.

One decoder, Pillow, reads every format, and it raises on bad data where torchvision's decoders can crash the
process (libpng "Not enough image data" under `decode_image` is a SIGSEGV: a 60-byte PNG that declares 6400 x 6250
pixels killed the server). Pillow's header parsers are Python and its C decoders report truncation as an error;
it is fuzzed continuously by OSS-Fuzz, and tests/test_fuzz_decode.py fuzzes this path here.

What a request may cost is bounded before any pixel is decoded: every header is read first, then the declared
pixels of each image and the pixels to decode over the whole request are checked against the limits. JPEGs are
decoded already reduced in the DCT domain (1/2, 1/4 or 1/8, never below the model's input), which is both cheaper
and a good downscale; only the first frame of an animated GIF, WebP or PNG is decoded.

Normalisation (mean/std) is left to the worker, which does it once for the whole batch.
"""

import asyncio
import contextlib
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, PngImagePlugin

ACCEPTED_FORMATS = ("GIF", "JPEG", "PNG", "WEBP")

# Pillow's PNG text chunks (iTXt/zTXt are compressed) may take 64 MiB per image by default; the server never reads
# them, so a little is enough and a compressed-text bomb costs nothing.
PngImagePlugin.MAX_TEXT_MEMORY = 1 << 20
# The pixel limits below are this server's; Pillow's own decompression-bomb warning would only add noise to the log.
Image.MAX_IMAGE_PIXELS = None
# A palette image with transparency converted to RGB makes Pillow warn once per image: the alpha is dropped on
# purpose (the model sees RGB), and a warning per request would flood the log.
warnings.filterwarnings("ignore", message="Palette images with Transparency", module="PIL")


class DecodeRefusedError(Exception):
    """Images the decoder will not decode. `code` names the reason, stable for clients; `detail` says it in a
    sentence. What a refusal is in HTTP is the API's to say (app/api/errors.py), by the subclass."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class UnreadableImageError(DecodeRefusedError):
    """Empty, not an image, or corrupt: `empty_image`, `invalid_image`."""


class UnsupportedFormatError(DecodeRefusedError):
    """An image in a format outside ACCEPTED_FORMATS: `unsupported_image_format`."""


class ImageLimitError(DecodeRefusedError):
    """Past a limit of ImageLimits: `image_too_large` (bytes), `too_many_pixels`."""


@dataclass(frozen=True)
class ImageLimits:
    max_image_bytes: int  # encoded bytes of one image
    max_image_pixels: int  # width x height one image's header may declare
    max_request_pixels: int  # pixels decoded for the whole request (JPEGs after their DCT-domain reduction)


def decode_all(
    files: list[tuple[str, bytes]], size: int, limits: ImageLimits, resize: int | None = None
) -> torch.Tensor:
    """All images of one request as one N x 3 x S x S uint8 tensor; the first bad one rejects the request."""
    with contextlib.ExitStack() as stack:
        images = [stack.enter_context(_open(name, data, resize or size, limits)) for name, data in files]
        to_decode = sum(image.width * image.height for image in images)
        if to_decode > limits.max_request_pixels:
            raise ImageLimitError(
                "too_many_pixels",
                f"the request's {len(files)} images hold {to_decode} pixels to decode; the limit per request is "
                f"{limits.max_request_pixels}: send fewer or smaller images per request",
            )
        pixels = (_pixels(name, image) for (name, _), image in zip(files, images, strict=True))
        return torch.stack([fit(image, size, resize) for image in pixels])


def _open(name: str, data: bytes, size: int, limits: ImageLimits) -> Image.Image:
    """The image with only its header read, checked against the per-image limits."""
    if not data:
        raise UnreadableImageError("empty_image", f"image {name!r} is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise ImageLimitError(
            "image_too_large", f"image {name!r} is {len(data)} bytes; the limit is {limits.max_image_bytes}"
        )
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as error:  # Pillow's plugins raise many types on bad headers; every one means "not an image"
        raise UnreadableImageError("invalid_image", f"file {name!r} is not an image this server can read") from error
    if image.format not in ACCEPTED_FORMATS:
        image.close()
        raise UnsupportedFormatError(
            "unsupported_image_format",
            f"image {name!r} is {image.format}; accepted formats are {', '.join(ACCEPTED_FORMATS)}",
        )
    width, height = image.size
    if width * height > limits.max_image_pixels:
        image.close()
        raise ImageLimitError(
            "too_many_pixels",
            f"image {name!r} is {width}x{height} = {width * height} pixels; the limit is {limits.max_image_pixels}",
        )
    if image.format == "JPEG":
        try:
            image.draft("RGB", (size, size))  # the largest reduction that keeps both sides >= size
        except Exception as error:
            image.close()
            raise UnreadableImageError("invalid_image", f"image {name!r} is a JPEG this server cannot read") from error
    return image


def _pixels(name: str, image: Image.Image) -> torch.Tensor:
    """Decode the (first frame of the) image as 3 x H x W uint8."""
    try:
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
    except Exception as error:  # truncated or corrupt data, a decoder error: the request's fault, never the server's
        raise UnreadableImageError(
            "invalid_image", f"image {name!r} is corrupt or truncated and cannot be decoded"
        ) from error
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def fit(image: torch.Tensor, size: int, resize: int | None = None) -> torch.Tensor:
    """Resize the shorter side to `resize` (by default `size`), then centre-crop to size x size."""
    side = resize or size
    if image.shape[-2:] == (size, size) and side == size:
        return image.contiguous()
    image = TF.resize(image, [side], antialias=True)
    return TF.center_crop(image, [size, size]).contiguous()


class ImageDecoder:
    """Decodes requests on its own threads: as many as cores by default, so that the memory decoding can take at
    once is bounded (threads x one request's pixel budget) and decoding never starves the event loop's other work."""

    def __init__(self, size: int, limits: ImageLimits, threads: int | None = None, resize: int | None = None) -> None:
        self.size, self.limits, self.resize = size, limits, resize
        self._pool = ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1, thread_name_prefix="decode")

    async def decode(self, files: list[tuple[str, bytes]]) -> torch.Tensor:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, decode_all, files, self.size, self.limits, self.resize
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
