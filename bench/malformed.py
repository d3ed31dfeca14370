"""Malformed images for the decoder fuzz test (tests/test_fuzz_decode.py) and bench.decode_cost.

The mutations are the ones that found crashes in image decoders before: bit flips, overwritten runs, truncation,
splices of two files, and forged dimensions written into each format's own header fields (with the PNG chunk
CRC recomputed, so the forgery gets past the CRC check to the decoder).
"""

import io
import struct
import zlib
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

# Dimensions a forged header declares: degenerate, ordinary, at and past the server's default limits, absurd.
FORGED_SIZES = [
    (0, 0),
    (1, 1),
    (0, 32),
    (1, 65535),
    (640, 480),
    (4000, 4000),
    (3840, 2160),
    (3841, 2160),
    (6400, 6250),
    (65535, 65535),
]


def seed_images(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """(format, bytes) of small real images in every accepted format and the colour modes they come in."""
    y, x = np.mgrid[0:48, 0:64]
    natural = np.stack([(x * 4) % 256, (y * 5) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)
    noisy = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    rgb, rgb_noise = Image.fromarray(natural), Image.fromarray(noisy)
    frames = [Image.fromarray(np.roll(natural, k, 1)) for k in range(3)]

    def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    return [
        ("PNG", encoded(rgb, "PNG")),
        ("PNG", encoded(rgb.convert("RGBA"), "PNG")),
        ("PNG", encoded(rgb.convert("L"), "PNG")),
        ("PNG", encoded(rgb.convert("P"), "PNG", transparency=0)),
        ("PNG", encoded(rgb_noise, "PNG", optimize=True)),
        ("PNG", encoded(frames[0], "PNG", save_all=True, append_images=frames[1:])),  # APNG
        ("JPEG", encoded(rgb, "JPEG", quality=75)),
        ("JPEG", encoded(rgb_noise, "JPEG", quality=90, progressive=True)),
        ("JPEG", encoded(rgb.convert("L"), "JPEG")),
        ("JPEG", encoded(rgb.convert("CMYK"), "JPEG")),
        ("WEBP", encoded(rgb, "WEBP", quality=80)),
        ("WEBP", encoded(rgb_noise, "WEBP", lossless=True)),
        ("WEBP", encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:])),  # animated: VP8X
        ("GIF", encoded(rgb.convert("P"), "GIF")),
        ("GIF", encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0)),
    ]


def png_declaring(width: int, height: int, idat: bytes = b"\0" * 16) -> bytes:
    """A PNG whose header declares width x height, followed by too little image data (the SIGSEGV of issue #14)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(idat)) + _chunk(b"IEND", b"")


def gif_canvas_bomb(canvas: int = 6000, frames: int = 10) -> bytes:
    """A few hundred bytes: a canvas x canvas GIF of `frames` 1 x 1 frames (every frame on the full canvas)."""
    out = b"GIF89a" + struct.pack("<HHBBB", canvas, canvas, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    for _ in range(frames):
        out += b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 1/100 s
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return out + b"\x3b"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def forge_size(fmt: str, data: bytes, width: int, height: int) -> bytes:
    """`data` with the dimensions in its format's header replaced (unchanged where the header is not found)."""
    out = bytearray(data)
    if fmt == "PNG" and data[12:16] == b"IHDR":
        out[16:24] = struct.pack(">II", width, height)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    elif fmt == "JPEG":
        for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):  # baseline, extended, progressive frame headers
            at = data.find(marker)
            if at > 0:
                out[at + 5 : at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
                break
    elif fmt == "GIF":
        out[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)  # the logical screen (canvas)
        at = data.find(b"\x2c", 13)
        if at > 0:  # the first frame's own size
            out[at + 5 : at + 9] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif fmt == "WEBP":
        kind = data[12:16]
        if kind == b"VP8 ":
            out[26:30] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
        elif kind == b"VP8L":
            packed = ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14) | (data[24] >> 4 << 28)
            out[21:25] = struct.pack("<I", packed)
        elif kind == b"VP8X":
            out[24:30] = ((width - 1) & 0xFFFFFF).to_bytes(3, "little") + ((height - 1) & 0xFFFFFF).to_bytes(
                3, "little"
            )
    return bytes(out)


def _flip_bits(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for at in rng.integers(0, len(out), int(rng.integers(1, 17))):
        out[at] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def _overwrite(data: bytes, rng: np.random.Generator) -> bytes:
    at = int(rng.integers(0, len(data)))
    run = rng.integers(0, 256, int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
    return data[:at] + run + data[at + len(run) :]


def _truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(1, len(data)))]


def _forge(fmt: str) -> Callable[[bytes, np.random.Generator], bytes]:
    def forge(data: bytes, rng: np.random.Generator) -> bytes:
        width, height = FORGED_SIZES[int(rng.integers(0, len(FORGED_SIZES)))]
        forged = forge_size(fmt, data, width, height)
        return _truncate(forged, rng) if rng.random() < 0.5 else forged  # the header's promise, then not the data

    return forge


def malformed_inputs(count: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """`count` (description, bytes) mutants of the seed images, reproducibly."""
    rng = np.random.default_rng(seed)
    seeds = seed_images(rng)
    for index in range(count):
        fmt, data = seeds[index % len(seeds)]
        kind = ("flip", "overwrite", "truncate", "forge", "splice")[int(rng.integers(0, 5))]
        if kind == "flip":
            mutant = _flip_bits(data, rng)
        elif kind == "overwrite":
            mutant = _overwrite(data, rng)
        elif kind == "truncate":
            mutant = _truncate(data, rng)
        elif kind == "forge":
            mutant = _forge(fmt)(data, rng)
        else:  # one file's header on another's data
            _, other = seeds[int(rng.integers(0, len(seeds)))]
            mutant = data[: int(rng.integers(1, len(data)))] + other[int(rng.integers(0, len(other))) :]
        yield f"{index}:{fmt}:{kind}", mutant
