"""Fuzzing the decode path through the real server: no input may kill the process, answer 5xx, or change what a
valid request is answered afterwards.

The same generator (tests/malformed.py) run against torchvision's `decode_image`, the decoder before this one,
kills the process with SIGSEGV within its first few hundred inputs (libpng "Not enough image data").
"""

import base64
import time
from pathlib import Path

import httpx
import numpy as np

from bench.malformed import forge_size, gif_canvas_bomb, malformed_inputs, png_declaring, seed_images
from tests.servers import running_server

FUZZ_INPUTS = 10_000
# What a malformed image may be answered: decoded after all (a mutation can leave a valid image), or refused.
ALLOWED = {
    200: None,
    400: {"invalid_image", "empty_image"},
    413: {"too_many_pixels"},
    415: {"unsupported_image_format"},
}


def as_multipart(name: str, data: bytes) -> dict:
    return {"files": [("files", (name, data, "application/octet-stream"))]}


def as_json(data: bytes) -> dict:
    return {"json": {"images": [base64.b64encode(data).decode()]}}


def without_ids(answer: dict) -> list[dict]:
    return [{k: v for k, v in p.items() if k != "id"} for p in answer["predictions"]]


def test_fixed_regressions_are_refused_cleanly(model_path: Path) -> None:
    env = {"TTA_MODEL": str(model_path), "TTA_METHOD": "none"}
    with running_server(env) as (url, process), httpx.Client(base_url=url, timeout=60) as client:
        cases = [
            # the 68-byte PNG of issue #14 (SIGSEGV before): past the per-image limit, refused from its header
            (png_declaring(6400, 6250), 413, "too_many_pixels"),
            # the same forgery within the limit reaches the decoder, which must refuse it, not crash
            (png_declaring(2000, 2000), 400, "invalid_image"),
            (png_declaring(1, 1, idat=b""), 400, "invalid_image"),
            # 407 bytes that declared a 6000 x 6000 canvas doubled the server's memory
            (gif_canvas_bomb(6000), 413, "too_many_pixels"),
        ]
        for data, status, code in cases:
            response = client.post("/predict", **as_multipart("case", data))
            assert (response.status_code, response.json()["error"]) == (status, code), response.text
        # within the per-image limit, a 10-frame canvas decodes only its first frame
        assert client.post("/predict", **as_multipart("gif", gif_canvas_bomb(2000))).status_code == 200
        # 64 JPEGs of ~1 KB that declared 6000 x 6000 took 17.8 s to decode. Now those are refused from their headers,
        # and within the limit each is decoded reduced (1/8 in the DCT domain for a 32 px model): this request costs
        # what 64 images of 375 x 250 cost
        jpeg = next(data for fmt, data in seed_images(np.random.default_rng(0)) if fmt == "JPEG")
        forged = forge_size("JPEG", jpeg, 3000, 2000)
        started = time.monotonic()
        response = client.post("/predict", files=[("files", (f"{i}.jpg", forged, "image/jpeg")) for i in range(64)])
        assert response.status_code in (200, 400), response.text
        assert time.monotonic() - started < 5
        # three PNGs within the per-image limit but past the per-request budget: refused before any is decoded
        response = client.post(
            "/predict", files=[("files", (f"{i}.png", png_declaring(3000, 2500), "image/png")) for i in range(3)]
        )
        assert (response.status_code, response.json()["error"]) == (413, "too_many_pixels"), response.text
        assert "per request" in response.json()["detail"]
        assert process.poll() is None


def test_ten_thousand_malformed_images_kill_nothing_and_change_nothing(model_path: Path) -> None:
    env = {"TTA_MODEL": str(model_path), "TTA_METHOD": "none"}
    valid = [(f"valid{i}", data) for i, (_, data) in enumerate(seed_images(np.random.default_rng(1)))]
    with running_server(env) as (url, process), httpx.Client(base_url=url, timeout=60) as client:
        before = client.post("/predict", files=[("files", (n, d, "application/octet-stream")) for n, d in valid])
        assert before.status_code == 200, before.text
        statuses: dict[int, int] = {}
        for index, (name, data) in enumerate(malformed_inputs(FUZZ_INPUTS)):
            request = as_multipart(name, data) if index % 2 == 0 else as_json(data)
            response = client.post("/predict", **request)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code in ALLOWED, f"{name}: {response.status_code} {response.text}"
            codes = ALLOWED[response.status_code]
            assert codes is None or response.json()["error"] in codes, f"{name}: {response.text}"
            if index % 1000 == 0:
                assert process.poll() is None, f"the server died at input {name}"
        after = client.post("/predict", files=[("files", (n, d, "application/octet-stream")) for n, d in valid])
        assert process.poll() is None
    print(f"\n{FUZZ_INPUTS} malformed images: answers by status {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) == FUZZ_INPUTS
    assert statuses.get(400, 0) > FUZZ_INPUTS / 2, "most mutants must really be malformed, or the fuzzing proves little"
    assert after.status_code == 200
    assert without_ids(after.json()) == without_ids(before.json()), "a valid request is answered exactly as before"
