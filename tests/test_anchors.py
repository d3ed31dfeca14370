"""Tests for bench/peers/anchors.py: the published methods' own classes from ../shared/anchors, run on our model
and our stream, predicting each batch before adapting to it."""

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from bench.peers.anchors import ANCHOR_DIR, anchor_available, anchor_config, build_anchor
from bench.stream import build_stream, ensure_corrupted, load_pool, main

CORRUPTIONS = ["gaussian_noise", "brightness"]
PER_CLASS = 4  # 80 images: RoTTA's first update comes at its 64th image
BATCH = 16


@pytest.fixture(scope="module")
def anchors(shared_data: Path) -> Path:
    """../shared/anchors/tta-benchmark and its packages (yacs, iopath: the bench and test extras)."""
    missing = anchor_available()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}; CI=true, so this is an error rather than a skip")
        pytest.skip(missing)
    return ANCHOR_DIR


@pytest.fixture(scope="module")
def cache_dir(anchors: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("corrupted")
    ensure_corrupted(CORRUPTIONS, 5, PER_CLASS, cache, shared_data / "test.zip")
    return cache


def _images(cache_dir: Path, shared_data: Path) -> torch.Tensor:
    paths = ensure_corrupted(CORRUPTIONS, 5, PER_CLASS, cache_dir, shared_data / "test.zip")
    stream = build_stream("continual", load_pool(paths, PER_CLASS, with_payloads=False), seed=0)
    return stream.images(0, len(stream)).float() / 255.0


def test_config_is_theirs_with_only_the_batch_size_changed(anchors: Path) -> None:
    cfg = anchor_config("eata", 64)
    assert cfg.MODEL.ADAPTATION == "eata" and cfg.TEST.BATCH_SIZE == 64  # the yaml's 200 replaced
    assert (cfg.EATA.D_MARGIN, cfg.SOURCE.NUM_SAMPLES, cfg.OPTIM.LR) == (0.4, 2000, 1e-3)  # the yaml over conf.py
    assert anchor_config("roid", 8).ROID.MOMENTUM_SRC == 0.99  # conf.py's default where the yaml says nothing


def test_tent_predicts_each_batch_before_its_update(
    anchors: Path, cache_dir: Path, shared_data: Path, model_path: Path
) -> None:
    """Their Tent returns the outputs of the forward made before its optimiser step: the first batch is predicted
    by the source model with batch statistics (their BNTest's prediction), the second by the model as the first
    update left it; and the update changed it. Their code's names are gone from sys.modules afterwards."""
    x = _images(cache_dir, shared_data)
    tent, _ = build_anchor("tent-anchor", BATCH, model_path)
    bn, _ = build_anchor("bn-anchor", BATCH, model_path)
    first = tent(x[:BATCH])
    torch.testing.assert_close(first, bn(x[:BATCH]))
    before_second = copy.deepcopy(tent.model)
    with torch.no_grad():
        expected = before_second(x[BATCH : 2 * BATCH])
    torch.testing.assert_close(tent(x[BATCH : 2 * BATCH]), expected)
    changed = [
        not torch.equal(p, q)
        for p, q in zip(before_second.parameters(), tent.model.parameters(), strict=True)
        if p.requires_grad
    ]
    assert changed and any(changed), "the second batch should have updated the BatchNorm affine parameters"
    assert not {"methods", "utils", "augmentations", "models.model", "datasets"} & set(sys.modules)


def test_anchors_run_from_bench_stream(
    anchors: Path, tmp_path: Path, cache_dir: Path, shared_data: Path, model_path: Path
) -> None:
    """`--methods` runs them beside ours on the same stream and batches, with a saved record each; RoTTA's
    first memory update comes at image 64 (the fp32 path their code breaks without the subclass)."""
    argv = [
        "--domain-length", str(10 * PER_CLASS), "--corruptions", ",".join(CORRUPTIONS),
        "--methods", "none,tent-anchor,rotta", "--scenarios", "continual", "--batch-sizes", str(BATCH),
        "--model", str(model_path), "--device", "cpu", "--threads", "1", "--data", str(shared_data / "test.zip"),
        "--cache-dir", str(cache_dir), "--results-dir", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    records = {
        m: json.loads((tmp_path / "runs" / f"continual-b{BATCH}-{m}.json").read_text()) for m in argv[5].split(",")
    }
    assert {r["images"] for r in records.values()} == {2 * 10 * PER_CLASS}
    for method in ("tent-anchor", "rotta"):
        settings = records[method]["settings"]
        assert settings["cfg"]["TEST"]["BATCH_SIZE"] == BATCH and settings["anchor_commit"]
        assert list(records[method]["per_corruption_error"]) == CORRUPTIONS
    assert records["rotta"]["settings"]["class"] == "methods.rotta.RoTTA"
    table = (tmp_path / "accuracy.md").read_text()
    assert "| none |" in table and "| tent-anchor |" in table and "| rotta |" in table
