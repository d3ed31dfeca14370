"""Tests for bench.corruptions: output format, determinism, severity ordering, and the cache-writing command."""

import colorsys
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from bench.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, HELD_OUT, SEVERITIES, corrupt, image_seed, main

CLASSES = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}

# Corruptions that draw no random numbers: any seed gives the same output.
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
DETERMINISTIC |= {"gaussian_blur", "saturate"}

# Severity pairs (lower, higher) for which the original CIFAR parameters do not make the mean absolute difference
# to the clean image grow, so the test does not ask for it:
NOT_MONOTONE_IN_PIXEL_DIFFERENCE = {
    # Severities 1-3 shuffle pixels in one pass, 4-5 in two; within each group only the Gaussian sigma grows
    # (0.05 -> 0.25 -> 0.4), and the extra blur smooths away shuffling about as much as it departs from the clean
    # image, so the difference stays flat (about 10.6 for 1-3, 17 for 4-5 on the test images).
    "glass_blur": {(1, 2), (2, 3), (4, 5)},
    # (radius 6, sigma 2) and (radius 8, sigma 2): ImageMagick's kernel is 2*radius+1 taps weighted exp(-i^2/8),
    # and the taps 13-16 that radius 8 adds weigh under 1e-9, so the two severities blur identically.
    "motion_blur": {(3, 4)},
    # (image, frost) weights (0.9, 0.4) -> (0.85, 0.4) -> (0.75, 0.45): dimming the image cancels part of the
    # frost it adds, so the difference shrinks although the frost-to-image ratio grows.
    "frost": {(3, 4), (4, 5)},
    # The random affine jitter shrinks with severity (2.6 -> 1 px) while the elastic displacement grows; the
    # global shift dominates the pixel difference, which therefore falls although the local distortion rises.
    "elastic_transform": {(1, 2), (2, 3), (3, 4), (4, 5)},
    # Severities 1-3 add pale water drops, 4-5 opaque mud (another branch of the original): mud at 4 covers less
    # than the water at 3 shades (about 2.6 against 6.4 on the test images).
    "spatter": {(3, 4)},
    # Saturation x0.3, x0.1, then x1.5, x2 + 0.1, x2.5 + 0.2: severity 3 turns from washing colours out to boosting
    # them, and a 1.5x boost moves pixels less than a 0.1x wash-out.
    "saturate": {(2, 3)},
}


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def synthetic_image() -> np.ndarray:
    """A textured 32x32 image kept away from black and white, so that no corruption saturates it to a constant."""
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:32, 0:32] / 31
    base = np.stack([0.3 + 0.4 * xx, 0.3 + 0.4 * yy, 0.5 + 0.2 * np.sin(6 * xx)], axis=-1)
    texture = 0.1 * ndimage.gaussian_filter(rng.normal(size=(32, 32, 3)), sigma=(1, 1, 0))
    return (np.clip(base + texture, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def test_zip(shared_data: Path) -> Path:
    return shared_data / "test.zip"


@pytest.fixture(scope="module")
def real_images(test_zip: Path) -> list[np.ndarray]:
    """Four test images spread over the classes (airplane, bird, dog, horse)."""
    with zipfile.ZipFile(test_zip) as archive:
        members = sorted(name for name in archive.namelist() if name.endswith(".jpg"))
        return [_decode(archive.read(members[i])) for i in range(0, len(members), len(members) // 4)]


def test_standard_order() -> None:
    assert list(CORRUPTIONS) == [
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "defocus_blur",
        "glass_blur",
        "motion_blur",
        "zoom_blur",
        "snow",
        "frost",
        "fog",
        "brightness",
        "contrast",
        "elastic_transform",
        "pixelate",
        "jpeg_compression",
    ]


def test_rejects_bad_arguments(synthetic_image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(synthetic_image, "rain", 1, seed=0)
    with pytest.raises(ValueError, match="severity"):
        corrupt(synthetic_image, "fog", 6, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(synthetic_image.astype(np.float32), "fog", 1, seed=0)


def test_held_out_corruptions_come_after_the_benchmark() -> None:
    assert list(HELD_OUT) == ["speckle_noise", "gaussian_blur", "spatter", "saturate"]
    assert list(ALL_CORRUPTIONS) == [*CORRUPTIONS, *HELD_OUT]  # so the 15's image seeds are what they were
    assert image_seed(0, "jpeg_compression", 5, 3) == [0, 14, 5, 3]


def test_saturate_is_the_hsv_saturation_change(real_images: list[np.ndarray]) -> None:
    """Against the standard library's HSV conversion (what skimage's rgb2hsv/hsv2rgb compute), pixel by pixel."""
    image = real_images[0]
    for severity, (factor, shift) in [(2, (0.1, 0)), (5, (2.5, 0.2))]:
        expected = np.empty(image.shape)
        for row, col in np.ndindex(image.shape[:2]):
            h, s, v = colorsys.rgb_to_hsv(*(image[row, col] / 255.0))
            expected[row, col] = colorsys.hsv_to_rgb(h, min(max(s * factor + shift, 0.0), 1.0), v)
        expected = (np.clip(expected, 0, 1) * 255).astype(np.uint8)
        assert np.abs(corrupt(image, "saturate", severity, seed=0).astype(int) - expected).max() <= 1


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_format_and_determinism(name: str, synthetic_image: np.ndarray) -> None:
    original = synthetic_image.copy()
    for severity in SEVERITIES:
        out = corrupt(synthetic_image, name, severity, seed=7)
        assert out.shape == (32, 32, 3)
        assert out.dtype == np.uint8
        assert np.array_equal(out, corrupt(synthetic_image, name, severity, seed=7)), f"{name}-{severity}"
        same_for_other_seed = np.array_equal(out, corrupt(synthetic_image, name, severity, seed=8))
        assert same_for_other_seed == (name in DETERMINISTIC), f"{name}-{severity}"
    assert np.array_equal(synthetic_image, original), "the input image was modified"


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_damage_grows_with_severity(name: str, real_images: list[np.ndarray]) -> None:
    # The same seed at every severity (common random numbers), so severities differ by their parameters only.
    differences = [
        np.mean(
            [np.abs(corrupt(img, name, s, seed=i).astype(np.float64) - img).mean() for i, img in enumerate(real_images)]
        )
        for s in SEVERITIES
    ]
    assert differences[0] > 0, f"{name} at severity 1 leaves the images unchanged"
    exempt = NOT_MONOTONE_IN_PIXEL_DIFFERENCE.get(name, set())
    for lower, higher in zip(SEVERITIES, SEVERITIES[1:], strict=False):
        if (lower, higher) not in exempt:
            assert differences[higher - 1] > differences[lower - 1], (
                f"{name}: mean |corrupted - clean| {differences} does not grow from severity {lower} to {higher}"
            )


def test_command_writes_and_reuses_cache(test_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "cache"
    args = [
        "--corruptions",
        "gaussian_noise,fog",
        "--severities",
        "5",
        "--data",
        str(test_zip),
        "--out-dir",
        str(out_dir),
    ]
    assert main([*args, "--limit-per-class", "2"]) == 0
    paths = [out_dir / "gaussian_noise-5.zip", out_dir / "fog-5.zip"]
    for path in paths:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            assert len(names) == 20
            assert all(re.fullmatch(r"test/[a-z]+/\d{4}\.png", name) for name in names)
            assert {name.split("/")[1] for name in names} == CLASSES
            assert _decode(archive.read(names[0])).shape == (32, 32, 3)
    assert not list(out_dir.glob("*.partial")), "a temporary file was left behind"

    # PNG is lossless, so the zip holds exactly what corrupt() returns with the image's own seed
    # (test/airplane/0001.jpg is image 1 of the sorted test set).
    with zipfile.ZipFile(test_zip) as source:
        clean = _decode(source.read("test/airplane/0001.jpg"))
    with zipfile.ZipFile(paths[1]) as archive:
        stored = _decode(archive.read("test/airplane/0001.png"))
        first_run = {name: archive.read(name) for name in archive.namelist()}
    assert np.array_equal(stored, corrupt(clean, "fog", 5, image_seed(0, "fog", 5, 1)))

    # A second identical run reuses both zips.
    written_at = [path.stat().st_mtime_ns for path in paths]
    capsys.readouterr()
    assert main([*args, "--limit-per-class", "2"]) == 0
    assert capsys.readouterr().out.count("cached") == 2
    assert [path.stat().st_mtime_ns for path in paths] == written_at

    # A zip for another subset is not reused; images shared by both subsets are identical.
    assert main([*args, "--limit-per-class", "1"]) == 0
    assert capsys.readouterr().out.count("wrote 10 images") == 2
    with zipfile.ZipFile(paths[1]) as archive:
        assert len(archive.namelist()) == 10
        assert all(archive.read(name) == first_run[name] for name in archive.namelist())

    # A damaged zip is rewritten.
    paths[0].write_bytes(b"not a zip")
    assert main([*args, "--limit-per-class", "1"]) == 0
    assert "gaussian_noise-5: wrote 10 images" in capsys.readouterr().out
    assert zipfile.is_zipfile(paths[0])


def test_contact_sheet(test_zip: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.png"
    assert main(["--data", str(test_zip), "--contact-sheet", str(sheet)]) == 0
    with Image.open(sheet) as img:
        # 16 tiles (clean + 15 corruptions), 4 columns of 160 px tiles.
        assert img.width > 4 * 160
        assert img.height > 4 * 160
