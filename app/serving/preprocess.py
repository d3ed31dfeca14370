"""Encoded image bytes -> uint8 tensor 3 x S x S (the card's input size). Runs in a thread pool.

Normalisation (mean/std) is left to the worker, which does it once for the whole batch.
"""

import io
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

ACCEPTED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF"}


class InputError(Exception):
    """A request the service refuses; maps to one JSON error response."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


@dataclass(frozen=True)
class ImageLimits:
    max_image_bytes: int
    max_image_pixels: int


def decode_one(name: str, data: bytes, size: int, limits: ImageLimits) -> torch.Tensor:
    if not data:
        raise InputError(400, "empty_image", f"image {name!r} is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise InputError(
            413, "image_too_large", f"image {name!r} is {len(data)} bytes; the limit is {limits.max_image_bytes}"
        )
    # Read only the header first: a 50,000 x 50,000 PNG is refused before any pixel is allocated.
    try:
        with Image.open(io.BytesIO(data)) as header:
            image_format, (width, height) = header.format, header.size
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(400, "invalid_image", f"file {name!r} is not an image this server can read") from error
    except Image.DecompressionBombError as error:
        raise InputError(413, "too_many_pixels", f"image {name!r} declares too many pixels: {error}") from error
    if image_format not in ACCEPTED_FORMATS:
        raise InputError(
            415,
            "unsupported_image_format",
            f"image {name!r} is {image_format}; accepted formats are {', '.join(sorted(ACCEPTED_FORMATS))}",
        )
    if width * height > limits.max_image_pixels:
        raise InputError(
            413,
            "too_many_pixels",
            f"image {name!r} is {width}x{height} = {width * height} pixels; the limit is {limits.max_image_pixels}",
        )
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        raise InputError(
            400, "invalid_image", f"image {name!r} is corrupt or truncated and cannot be decoded"
        ) from error
    if image.dim() == 4:  # an animated GIF: its first frame
        image = image[0]
    return fit(image, size)


def fit(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size`, then centre-crop to size x size."""
    if image.shape[-2:] == (size, size):
        return image
    image = TF.resize(image, [size], antialias=True)
    return TF.center_crop(image, [size, size])


def decode_all(files: list[tuple[str, bytes]], size: int, limits: ImageLimits) -> torch.Tensor:
    """All images of one request as one N x 3 x S x S uint8 tensor; the first bad one rejects the request."""
    return torch.stack([decode_one(name, data, size, limits) for name, data in files])
