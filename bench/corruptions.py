"""The 15 CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019) for 32x32 RGB images, and the paper's four
held-out ones (speckle_noise, gaussian_blur, spatter, saturate: HELD_OUT), for choosing settings off the benchmark.

Severity parameters are those of the paper's ``make_cifar_c.py`` (the CIFAR ones, not ImageNet-C's). The
original needs ImageMagick, OpenCV, scikit-image and a set of frost photographs; this module uses only numpy,
scipy and PIL instead:

- motion_blur and snow: ImageMagick's motion blur is reimplemented (a one-sided line kernel with half-Gaussian
  weights at a random angle, edge pixels repeated beyond the border), see ``_motion_blur``.
- frost: the frost photographs are replaced by a procedural texture, see ``_frost_texture``.
- defocus/glass blur, elastic transform, brightness: the OpenCV/scikit-image operations are rewritten with
  scipy.ndimage and numpy using the same kernels and border modes.
- spatter: its water drops' OpenCV steps (Canny, distance transform, equalizeHist, filter2D) are rewritten with
  scipy and numpy (the distance exact where OpenCV's 5x5 mask approximates it), see ``_water_mask``.
- Randomness comes from the ``numpy.random.Generator`` passed in (the original used the global numpy RNG), so an
  image is reproducible from its seed.

As in the original, float results are clipped to [0, 1] and truncated (not rounded) to uint8.

Also a command that writes corrupted copies of the CIFAR-10 test set, one zip per (corruption, severity)::

    python -m bench.corruptions --corruptions gaussian_noise,fog --severities 5 --limit-per-class 10
    python -m bench.corruptions --contact-sheet docs/corruptions.png
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "test.zip"
DEFAULT_OUT_DIR = REPO_ROOT / "bench" / "cache"
DEFAULT_SHEET_IMAGE = "test/horse/0006.jpg"

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared by several corruptions
# ---------------------------------------------------------------------------------------------------------------


def _skimage_gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian(x, sigma, multichannel=True): blur rows and columns, not channels."""
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)


def _clipped_zoom(x: np.ndarray, zoom_factor: float) -> np.ndarray:
    """Zoom into the centre of an HxWxC array by ``zoom_factor`` (bilinear), keeping its size."""
    size = x.shape[0]
    crop = int(np.ceil(size / zoom_factor))
    top = (size - crop) // 2
    zoomed = ndimage.zoom(x[top : top + crop, top : top + crop], (zoom_factor, zoom_factor, 1), order=1)
    trim = (zoomed.shape[0] - size) // 2
    return zoomed[trim : trim + size, trim : trim + size]


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's MotionBlurImage (what the original calls through Wand) on an HxW or HxWxC float array.

    ImageMagick averages 2*ceil(radius)+1 pixels along a ray from each pixel in the direction ``angle`` (degrees,
    0 = towards +x, positive = towards +y), weighted by exp(-i^2 / 2 sigma^2) for the i-th step, so the streak
    trails on one side only; pixels beyond the border repeat the edge.
    """
    width = 2 * math.ceil(radius) + 1
    steps = np.arange(width)
    weights = np.exp(-(steps**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    theta = np.deg2rad(angle)
    col_offsets = np.ceil(steps * np.cos(theta) - 0.5).astype(int)
    row_offsets = np.ceil(steps * np.sin(theta) - 0.5).astype(int)

    height, width_px = x.shape[:2]
    rows = np.arange(height)[:, None]
    cols = np.arange(width_px)[None, :]
    blurred = np.zeros(x.shape, dtype=np.float64)
    for weight, d_row, d_col in zip(weights, row_offsets, col_offsets, strict=True):
        blurred += weight * x[np.clip(rows + d_row, 0, height - 1), np.clip(cols + d_col, 0, width_px - 1)]
    return blurred


def _power_of_two_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _plasma_fractal(mapsize: int, wibble_decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map, mapsize x mapsize (a power of two), scaled to [0, 1]; as in make_cifar_c.py.

    The original's random term is ``wibble * uniform(-wibble, wibble)`` (wibble squared in scale); kept as is since
    it sets how rough the fog is.
    """
    if mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two, got {mapsize}")
    heights = np.zeros((mapsize, mapsize))
    step = mapsize
    wibble = 100.0

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        # Squares: each square's centre is the mean of its four corners plus noise.
        corners = heights[0::step, 0::step]
        total = corners + np.roll(corners, -1, axis=0)
        total += np.roll(total, -1, axis=1)
        heights[half::step, half::step] = wibbled_mean(total)
        # Diamonds: each edge midpoint is the mean of its two corners and the two adjacent square centres.
        centres = heights[half::step, half::step]
        corners = heights[0::step, 0::step]
        heights[0::step, half::step] = wibbled_mean(
            centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        )
        heights[half::step, 0::step] = wibbled_mean(
            centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        )
        step //= 2
        wibble /= wibble_decay

    heights -= heights.min()
    return heights / heights.max()


def _frost_texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural frost texture, HxWx3 in [0, 255], standing in for the original's frost photographs.

    make_cifar_c.py blends in a random 32x32 crop of one of six photographs of frost on a window (scaled to 20%),
    which this project cannot ship. What such a crop shows is a network of thin bright ice ridges and a few
    fern-like dendrites, denser in some patches than others, pale blue. Here:

    - ridges: the zero crossings of band-passed Gaussian noise at two scales, which form a connected vein network;
    - dendrites: a few straight needles with side branches at +-60 degrees (the hexagonal habit of ice);
    - patchiness: a plasma fractal that sets the haze and how visible the crystals are;

    all drawn at twice the size and box-downsampled, so that lines thinner than a pixel stay antialiased. It is
    deterministic for a given generator state, but its statistics only approximate those of the photographs
    (mean about 145 of 255 here), so frost results are not directly comparable with the published CIFAR-10-C.
    """
    supersample = 2
    big_h, big_w = height * supersample, width * supersample
    ridges = np.zeros((big_h, big_w))
    for sigma in (2.0, 4.0):
        band = ndimage.gaussian_filter(rng.normal(size=(big_h, big_w)), sigma, mode="wrap")
        band /= band.std()
        ridges += 0.5 * np.clip(1 - np.abs(band) / 0.35, 0, 1)

    canvas = Image.new("L", (big_w, big_h))
    draw = ImageDraw.Draw(canvas)
    # Dim needles first, so that brighter crystals stay on top where they cross.
    for brightness in np.sort(rng.uniform(0.6, 1.0, 8)):
        start = rng.uniform(0, max(big_h, big_w), 2)
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(8, 20) * supersample
        direction = np.array([np.cos(angle), np.sin(angle)])
        fill = int(255 * brightness)
        draw.line([tuple(start), tuple(start + length * direction)], fill=fill)
        for t in np.linspace(0.15, 0.9, 5):
            root = start + t * length * direction
            branch_length = (1 - t) * 0.5 * length + 2  # branches shorten towards the tip, like a fern
            for side in (-1, 1):
                branch_angle = angle + side * np.pi / 3
                tip = root + branch_length * np.array([np.cos(branch_angle), np.sin(branch_angle)])
                draw.line([tuple(root), tuple(tip)], fill=int(0.8 * fill))
    needles = np.asarray(canvas, dtype=np.float64) / 255.0

    crystals = Image.fromarray((np.clip(np.maximum(ridges, needles), 0, 1) * 255).astype(np.uint8))
    crystals = np.asarray(crystals.resize((width, height), Image.Resampling.BOX), dtype=np.float64) / 255.0
    haze = _plasma_fractal(_power_of_two_at_least(max(height, width)), wibble_decay=2.0, rng=rng)[:height, :width]
    intensity = np.clip(0.3 + 0.45 * haze + 0.7 * crystals * (0.3 + 0.7 * haze), 0.0, 1.0)
    tint = np.array([0.82, 0.9, 1.0])
    return 255.0 * intensity[..., None] * tint


# ---------------------------------------------------------------------------------------------------------------
# The corruptions: each takes uint8 HxWx3, a severity 1..5 and a generator, and returns uint8 HxWx3.
# ---------------------------------------------------------------------------------------------------------------


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    scale = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
    x = _to_float(image)
    return _to_uint8(x + rng.normal(scale=scale, size=x.shape))


def shot_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    photons = [500, 250, 100, 75, 50][severity - 1]
    return _to_uint8(rng.poisson(_to_float(image) * photons) / photons)


def impulse_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise on each channel value independently, as skimage's random_noise(mode='s&p')."""
    amount = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    x = _to_float(image)
    flipped = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    x[flipped & salt] = 1.0
    x[flipped & ~salt] = 0.0
    return _to_uint8(x)


def defocus_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias_blur = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    # The original draws the disk on a 17x17 grid and antialiases it with OpenCV's 3x3 Gaussian blur.
    coords = np.arange(-8, 9)
    xx, yy = np.meshgrid(coords, coords)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = np.exp(-(np.arange(-1, 2) ** 2) / (2.0 * alias_blur**2))
    taps /= taps.sum()
    for axis in (0, 1):
        disk = ndimage.correlate1d(disk, taps, axis=axis, mode="mirror")
    # scipy's "mirror" is OpenCV's default BORDER_REFLECT_101.
    return _to_uint8(ndimage.correlate(_to_float(image), disk[..., None], mode="mirror"))


def glass_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma, max_delta, iterations = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][severity - 1]
    x = (_skimage_gaussian(_to_float(image), sigma) * 255).astype(np.uint8)
    height, width = x.shape[:2]
    rows = range(height - max_delta, max_delta, -1)
    cols = range(width - max_delta, max_delta, -1)
    # Offsets in [-max_delta, max_delta), i.e. {-1, 0}: numpy's randint excludes its upper bound, as in the original.
    offsets = rng.integers(-max_delta, max_delta, size=(iterations, len(rows), len(cols), 2))
    for iteration in range(iterations):
        for i, row in enumerate(rows):
            for j, col in enumerate(cols):
                d_col, d_row = offsets[iteration, i, j]
                # The original's tuple "swap" of two numpy views copies the neighbour onto this pixel rather than
                # swapping the two; CIFAR-10-C was made that way, so this reproduces the copy.
                x[row, col] = x[row + d_row, col + d_col]
    return _to_uint8(_skimage_gaussian(x / 255.0, sigma))


def motion_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][severity - 1]
    blurred = _motion_blur(image.astype(np.float64), radius, sigma, angle=rng.uniform(-45, 45))
    # ImageMagick rounds to the nearest 8-bit value.
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


def zoom_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    # Same np.arange calls as the original, so the same number of zoom steps despite float rounding at the end.
    zooms = [
        np.arange(1, 1.06, 0.01),
        np.arange(1, 1.11, 0.01),
        np.arange(1, 1.16, 0.01),
        np.arange(1, 1.21, 0.01),
        np.arange(1, 1.26, 0.01),
    ][severity - 1]
    x = _to_float(image).astype(np.float32)
    total = x.copy()
    for zoom_factor in zooms:
        total += _clipped_zoom(x, zoom_factor)
    return _to_uint8(total / (len(zooms) + 1))


def snow(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    mean, std, zoom, threshold, blur_radius, blur_sigma, blend = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ][severity - 1]
    x = image.astype(np.float32) / 255.0
    flakes = rng.normal(loc=mean, scale=std, size=x.shape[:2])
    flakes = _clipped_zoom(flakes[..., None], zoom)[..., 0]
    flakes[flakes < threshold] = 0
    # The original hands the flakes to ImageMagick as an 8-bit PNG and reads the blurred result back as 8 bits.
    flakes = (np.clip(flakes, 0, 1) * 255).astype(np.uint8)
    streaks = np.rint(_motion_blur(flakes.astype(np.float64), blur_radius, blur_sigma, rng.uniform(-135, -45)))
    streaks = (streaks / 255.0)[..., None]

    gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # OpenCV's RGB2GRAY weights
    x = blend * x + (1 - blend) * np.maximum(x, gray[..., None] * 1.5 + 0.5)
    return _to_uint8(x + streaks + np.rot90(streaks, k=2))


def frost(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blend with a frost texture; the texture is procedural (see ``_frost_texture``), the weights original."""
    image_weight, frost_weight = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][severity - 1]
    texture = _frost_texture(image.shape[0], image.shape[1], rng)
    return _to_uint8((image_weight * image + frost_weight * texture) / 255.0)


def fog(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    thickness, wibble_decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][severity - 1]
    x = _to_float(image)
    max_val = x.max()
    height, width = x.shape[:2]
    mapsize = _power_of_two_at_least(max(height, width))
    x += thickness * _plasma_fractal(mapsize, wibble_decay, rng)[:height, :width, None]
    return _to_uint8(x * max_val / (max_val + thickness))


def brightness(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Add to the HSV value channel, keeping hue and saturation.

    With hue and saturation fixed, RGB is proportional to the value V = max(R, G, B), so this scales each pixel
    by V'/V (and a black pixel, whose saturation is 0, becomes grey V'); the same as skimage's rgb2hsv/hsv2rgb.
    """
    shift = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
    x = _to_float(image)
    value = x.max(axis=2, keepdims=True)
    new_value = np.clip(value + shift, 0.0, 1.0)
    ratio = np.divide(new_value, value, out=np.zeros_like(value), where=value > 0)
    return _to_uint8(np.where(value > 0, x * ratio, new_value))


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    x = _to_float(image)
    means = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((x - means) * factor + means)


def elastic_transform(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A random affine warp followed by a smoothed random displacement field.

    The CIFAR parameters are not monotone in strength: the affine jitter shrinks with severity while the local
    displacement (alpha, and the smaller sigma that smooths it less) grows.
    """
    size = 32
    alpha, sigma, jitter = [
        (size * 0, size * 0, size * 0.08),
        (size * 0.05, size * 0.2, size * 0.07),
        (size * 0.08, size * 0.06, size * 0.06),
        (size * 0.1, size * 0.04, size * 0.05),
        (size * 0.1, size * 0.03, size * 0.03),
    ][severity - 1]
    x = image.astype(np.float32) / 255.0
    height, width = x.shape[:2]

    # Random affine: move three (x, y) points around the centre by up to `jitter` pixels, as cv2.getAffineTransform.
    centre = np.array([width // 2, height // 2], dtype=np.float64)
    half_side = min(height, width) // 3
    source = np.array([centre + half_side, [centre[0] + half_side, centre[1] - half_side], centre - half_side])
    target = source + rng.uniform(-jitter, jitter, size=source.shape)
    forward = np.eye(3)
    forward[:2] = np.linalg.solve(np.c_[source, np.ones(3)], target).T
    # cv2.warpAffine samples the source at the inverse-mapped position (bilinear, BORDER_REFLECT_101 = "mirror").
    inverse = np.linalg.inv(forward)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    source_cols = inverse[0, 0] * cols + inverse[0, 1] * rows + inverse[0, 2]
    source_rows = inverse[1, 0] * cols + inverse[1, 1] * rows + inverse[1, 2]
    x = np.stack(
        [ndimage.map_coordinates(x[..., c], [source_rows, source_cols], order=1, mode="mirror") for c in range(3)],
        axis=-1,
    )

    # Elastic part: smoothed uniform noise as a per-pixel displacement (skimage gaussian, mode reflect, truncate 3).
    d_cols = ndimage.gaussian_filter(rng.uniform(-1, 1, (height, width)), sigma, mode="reflect", truncate=3) * alpha
    d_rows = ndimage.gaussian_filter(rng.uniform(-1, 1, (height, width)), sigma, mode="reflect", truncate=3) * alpha
    warped = [
        ndimage.map_coordinates(x[..., c], [rows + d_rows, cols + d_cols], order=1, mode="reflect") for c in range(3)
    ]
    return _to_uint8(np.stack(warped, axis=-1))


def pixelate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    height, width = image.shape[:2]
    small = Image.fromarray(image).resize((int(width * factor), int(height * factor)), Image.Resampling.BOX)
    return np.array(small.resize((width, height), Image.Resampling.BOX))


def jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = [80, 65, 58, 50, 40][severity - 1]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.array(Image.open(buffer).convert("RGB"))


# ---------------------------------------------------------------------------------------------------------------
# The four held-out corruptions (the paper's "extra" set, made by the same make_cifar_c.py): for choosing
# settings on data that is not the benchmark
# ---------------------------------------------------------------------------------------------------------------


def speckle_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    scale = [0.06, 0.1, 0.12, 0.16, 0.2][severity - 1]
    x = _to_float(image)
    return _to_uint8(x + x * rng.normal(scale=scale, size=x.shape))


def gaussian_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = [0.4, 0.6, 0.7, 0.8, 1.0][severity - 1]
    return _to_uint8(_skimage_gaussian(_to_float(image), sigma))


def _rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2hsv on an HxWx3 float array in [0, 1] (hue 0 where the pixel is grey)."""
    value = x.max(axis=2)
    delta = value - x.min(axis=2)
    saturation = np.divide(delta, value, out=np.zeros_like(value), where=value > 0)
    safe = np.where(delta > 0, delta, 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hue = (g - b) / safe
    hue = np.where(g == value, 2.0 + (b - r) / safe, hue)  # skimage assigns r, then g, then b: the last wins
    hue = np.where(b == value, 4.0 + (r - g) / safe, hue)
    hue = np.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
    return np.stack([hue, saturation, value], axis=2)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """skimage.color.hsv2rgb."""
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(hue * 6.0)
    f = hue * 6.0 - sector
    p, q, t = value * (1 - saturation), value * (1 - f * saturation), value * (1 - (1 - f) * saturation)
    sector = sector.astype(int) % 6
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    return np.stack([np.choose(sector, [c[i] for c in choices]) for i in range(3)], axis=2)


def saturate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Scale and shift the HSV saturation (severities 1-2 wash colours out, 3-5 boost them)."""
    factor, shift = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][severity - 1]
    hsv = _rgb_to_hsv(_to_float(image))
    hsv[..., 1] = np.clip(hsv[..., 1] * factor + shift, 0.0, 1.0)
    return _to_uint8(_hsv_to_rgb(hsv))


def _canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """OpenCV's Canny (3x3 Sobel, L1 gradient magnitude, borders replicated) on a uint8 HxW array: bool edges."""
    x = image.astype(np.float64)
    dx = ndimage.sobel(x, axis=1, mode="nearest")
    dy = ndimage.sobel(x, axis=0, mode="nearest")
    magnitude = np.pad(np.abs(dx) + np.abs(dy), 1)  # zero outside, as OpenCV's magnitude buffer
    m = magnitude[1:-1, 1:-1]
    ax, ay = np.abs(dx), np.abs(dy)
    tan22, tan67 = math.tan(math.radians(22.5)), math.tan(math.radians(67.5))

    def at(d_row: int | np.ndarray, d_col: int | np.ndarray) -> np.ndarray:
        rows, cols = np.indices(m.shape)
        return magnitude[rows + 1 + d_row, cols + 1 + d_col]

    horizontal = ay < tan22 * ax
    vertical = ay > tan67 * ax
    s = np.where((dx < 0) != (dy < 0), -1, 1)  # the diagonal's direction
    local_max = np.where(
        horizontal,
        (m > at(0, -1)) & (m >= at(0, 1)),
        np.where(vertical, (m > at(-1, 0)) & (m >= at(1, 0)), (m > at(-1, -s)) & (m > at(1, s))),
    )
    candidate = local_max & (m > low)
    strong = candidate & (m > high)
    labels, count = ndimage.label(candidate, structure=np.ones((3, 3)))  # hysteresis: 8-connected to a strong one
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False
    return keep[labels]


def _equalize_hist(x: np.ndarray) -> np.ndarray:
    """OpenCV's equalizeHist on a uint8 array."""
    hist = np.bincount(x.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    if hist[first] == x.size:
        return np.full_like(x, first)
    lut = np.rint(np.cumsum(hist) * 255.0 / (x.size - hist[first]) - hist[first] * 255.0 / (x.size - hist[first]))
    lut[: first + 1] = 0
    return np.clip(lut, 0, 255).astype(np.uint8)[x]


def _water_mask(liquid: np.ndarray) -> np.ndarray:
    """The water branch's shading, from the thresholded liquid layer (OpenCV's edge and distance steps)."""
    layer = (liquid * 255).astype(np.uint8)
    edges = _canny(layer, 50, 150)
    # cv2.distanceTransform(DIST_L2, 5) approximates this exact Euclidean distance to within a few percent
    dist = ndimage.distance_transform_edt(~edges) if edges.any() else np.full(layer.shape, 20.0)
    dist = np.minimum(dist, 20.0)  # cv2.threshold(..., 20, 20, THRESH_TRUNC)
    dist = ndimage.uniform_filter(dist, size=3, mode="mirror").astype(np.uint8)  # cv2.blur, BORDER_REFLECT_101
    dist = _equalize_hist(dist)
    kernel = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
    dist = np.clip(np.rint(ndimage.correlate(dist.astype(np.float64), kernel, mode="mirror")), 0, 255)
    dist = ndimage.uniform_filter(dist.astype(np.uint8).astype(np.float64), size=3, mode="mirror")
    shade = layer * dist
    peak = shade.max()
    return shade / peak if peak > 0 else shade


def spatter(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Liquid drops from a thresholded, blurred noise layer: pale turquoise water (severities 1-3) or brown mud
    (4-5). The water branch's OpenCV steps (Canny, distance transform, histogram equalisation, filter2D) are
    rewritten with scipy and numpy, see ``_canny``, ``_equalize_hist`` and ``_water_mask``."""
    loc, scale, sigma, threshold, intensity, mud = [
        (0.62, 0.1, 0.7, 0.7, 0.5, 0),
        (0.65, 0.1, 0.8, 0.7, 0.5, 0),
        (0.65, 0.3, 1, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1),
        (0.65, 0.1, 0.5, 0.68, 0.6, 1),
    ][severity - 1]
    x = _to_float(image)
    liquid = ndimage.gaussian_filter(rng.normal(loc=loc, scale=scale, size=x.shape[:2]), sigma, mode="nearest")
    liquid[liquid < threshold] = 0
    if not mud:
        water = np.array([175, 238, 238]) / 255.0
        return _to_uint8(x + (_water_mask(liquid) * intensity)[..., None] * water)
    mask = ndimage.gaussian_filter((liquid > threshold).astype(np.float64), intensity, mode="nearest")
    mask[mask < 0.8] = 0
    mud_brown = np.array([63, 42, 20]) / 255.0
    return _to_uint8(x * (1 - mask[..., None]) + mask[..., None] * mud_brown)


CORRUPTIONS: OrderedDict[str, Corruption] = OrderedDict(
    (fn.__name__, fn)
    for fn in (
        gaussian_noise,
        shot_noise,
        impulse_noise,
        defocus_blur,
        glass_blur,
        motion_blur,
        zoom_blur,
        snow,
        frost,
        fog,
        brightness,
        contrast,
        elastic_transform,
        pixelate,
        jpeg_compression,
    )
)
HELD_OUT: OrderedDict[str, Corruption] = OrderedDict(
    (fn.__name__, fn) for fn in (speckle_noise, gaussian_blur, spatter, saturate)
)
ALL_CORRUPTIONS: OrderedDict[str, Corruption] = OrderedDict([*CORRUPTIONS.items(), *HELD_OUT.items()])
SEVERITIES = (1, 2, 3, 4, 5)


def corrupt(image: np.ndarray, name: str, severity: int, seed: int | Sequence[int]) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1..5) to a uint8 HxWx3 image; the same seed gives the same result.

    ``seed`` is anything numpy.random.default_rng accepts, e.g. an int or the list from ``image_seed``.
    """
    if name not in ALL_CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {', '.join(ALL_CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1..5, got {severity}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    return ALL_CORRUPTIONS[name](image, severity, np.random.default_rng(seed))


def image_seed(seed: int, name: str, severity: int, image_index: int) -> list[int]:
    """The seed of one image of the test set, so that an image's corruption does not depend on the subset made."""
    return [seed, list(ALL_CORRUPTIONS).index(name), severity, image_index]  # the 15 first: their seeds unchanged


# ---------------------------------------------------------------------------------------------------------------
# Command line: corrupted copies of the test set, and a contact sheet
# ---------------------------------------------------------------------------------------------------------------


def _read_rgb(archive: zipfile.ZipFile, member: str) -> np.ndarray:
    with Image.open(io.BytesIO(archive.read(member))) as img:
        return np.asarray(img.convert("RGB"))


def _source_members(archive: zipfile.ZipFile) -> list[str]:
    """All test images, sorted; an image's position here is its index for ``image_seed``."""
    return sorted(name for name in archive.namelist() if name.startswith("test/") and name.endswith(".jpg"))


def _select(members: list[str], limit_per_class: int | None) -> list[int]:
    """Indices of the first ``limit_per_class`` members of each class (all of them when None)."""
    taken: dict[str, int] = {}
    selected = []
    for index, member in enumerate(members):
        label = member.split("/")[1]
        if limit_per_class is None or taken.get(label, 0) < limit_per_class:
            taken[label] = taken.get(label, 0) + 1
            selected.append(index)
    return selected


def _output_member(member: str) -> str:
    return member.removesuffix(".jpg") + ".png"


def _is_complete(path: Path, expected_members: list[str], comment: bytes) -> bool:
    """Whether ``path`` is a finished zip of exactly these members made with the same settings."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.comment == comment and archive.namelist() == expected_members
    except (OSError, zipfile.BadZipFile):
        return False


def write_corrupted_zip(
    source: zipfile.ZipFile,
    members: list[str],
    selected: list[int],
    name: str,
    severity: int,
    seed: int,
    out_dir: Path,
) -> bool:
    """Write ``<out_dir>/<name>-<severity>.zip`` unless an identical one is there; return whether it was written."""
    target = out_dir / f"{name}-{severity}.zip"
    expected = [_output_member(members[i]) for i in selected]
    comment = json.dumps({"corruption": name, "severity": severity, "seed": seed}, sort_keys=True).encode()
    if _is_complete(target, expected, comment):
        return False
    # Write under a temporary name and rename at the end, so an interrupted run never leaves a partial zip behind
    # under the final name.
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:
        for index in selected:
            corrupted = corrupt(
                _read_rgb(source, members[index]), name, severity, image_seed(seed, name, severity, index)
            )
            buffer = io.BytesIO()
            Image.fromarray(corrupted).save(buffer, format="PNG")
            archive.writestr(_output_member(members[index]), buffer.getvalue())
        archive.comment = comment
    os.replace(partial, target)
    return True


def render_contact_sheet(
    image: np.ndarray, image_index: int, seed: int, scale: int = 5, columns: int = 4
) -> Image.Image:
    """The clean image and every corruption at severity 5, upscaled (nearest neighbour) and labelled, in a grid.

    Each tile uses the image's ``image_seed``, so it shows exactly what the zips hold for that image.
    """
    tiles = [("clean", image)]
    tiles += [(name, corrupt(image, name, 5, image_seed(seed, name, 5, image_index))) for name in CORRUPTIONS]
    tile_h, tile_w = image.shape[0] * scale, image.shape[1] * scale
    label_h, margin = 22, 8
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new(
        "RGB", (columns * (tile_w + margin) + margin, rows * (tile_h + label_h + margin) + margin), "white"
    )
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    for position, (label, tile) in enumerate(tiles):
        left = margin + (position % columns) * (tile_w + margin)
        top = margin + (position // columns) * (tile_h + label_h + margin)
        sheet.paste(Image.fromarray(tile).resize((tile_w, tile_h), Image.Resampling.NEAREST), (left, top))
        draw.text((left + tile_w / 2, top + tile_h + 3), label, fill="black", font=font, anchor="mt")
    return sheet


def _parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.corruptions",
        description="Write CIFAR-10-C style corrupted copies of the CIFAR-10 test set, one zip per "
        "(corruption, severity), with the test.zip layout and PNG images; existing complete zips are reused.",
    )
    parser.add_argument(
        "--corruptions",
        default=",".join(CORRUPTIONS),
        help="comma-separated names (default: the 15 of the benchmark; held out: " + ", ".join(HELD_OUT) + ")",
    )
    parser.add_argument("--severities", default="1,2,3,4,5", help="comma-separated severities (default: 1,2,3,4,5)")
    parser.add_argument("--limit-per-class", type=int, default=None, help="only the first N images of each class")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"source test.zip (default: {DEFAULT_DATA})")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=f"(default: {DEFAULT_OUT_DIR})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--contact-sheet",
        type=Path,
        default=None,
        help="instead of writing zips, render one image under every corruption at severity 5 into this PNG",
    )
    parser.add_argument("--sheet-image", default=DEFAULT_SHEET_IMAGE, help="test.zip member for --contact-sheet")
    args = parser.parse_args(argv)

    names = _parse_list(args.corruptions)
    unknown = [name for name in names if name not in ALL_CORRUPTIONS]
    if unknown:
        parser.error(f"unknown corruptions {unknown}; choose from {', '.join(ALL_CORRUPTIONS)}")
    try:
        severities = [int(s) for s in _parse_list(args.severities)]
    except ValueError:
        parser.error(f"--severities must be integers, got {args.severities!r}")
    if any(s not in SEVERITIES for s in severities):
        parser.error(f"severities must be in 1..5, got {severities}")
    if args.limit_per_class is not None and args.limit_per_class < 1:
        parser.error("--limit-per-class must be at least 1")
    if not args.data.is_file():
        parser.error(f"test set not found: {args.data}")

    with zipfile.ZipFile(args.data) as source:
        members = _source_members(source)
        if args.contact_sheet is not None:
            if args.sheet_image not in members:
                parser.error(f"--sheet-image {args.sheet_image!r} is not a test image in {args.data}")
            image = _read_rgb(source, args.sheet_image)
            sheet = render_contact_sheet(image, members.index(args.sheet_image), args.seed)
            args.contact_sheet.parent.mkdir(parents=True, exist_ok=True)
            sheet.save(args.contact_sheet)
            print(f"wrote {args.contact_sheet}")
            return 0

        selected = _select(members, args.limit_per_class)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            for severity in severities:
                started = time.perf_counter()
                written = write_corrupted_zip(source, members, selected, name, severity, args.seed, args.out_dir)
                status = f"wrote {len(selected)} images" if written else "cached"
                print(f"{name}-{severity}: {status} ({time.perf_counter() - started:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
