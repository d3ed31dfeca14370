"""Tests for bench.stream: the Dirichlet order, the scenarios' streams, in-process vs HTTP agreement, and the
command end to end (results, resume, table, CSV, plots) on a tiny stream."""

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.stream import (
    RECURRING_LENGTHS,
    RECURRING_VISITS,
    SCENARIO_RESET,
    Pool,
    build_stream,
    dirichlet_order,
    ensure_corrupted,
    load_pool,
    main,
    recurring_plan,
    run_http,
    run_in_process,
    server_method,
    switch_errors,
)
from tests.servers import running_server

CORRUPTIONS = ["gaussian_noise", "brightness"]  # two cheap ones; the order is the standard one
PER_CLASS = 2
BATCH = 4


@pytest.fixture(scope="module")
def cache_dir(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("corrupted")
    ensure_corrupted(CORRUPTIONS, 5, PER_CLASS, cache, shared_data / "test.zip")
    return cache


@pytest.fixture(scope="module")
def pool(cache_dir: Path, shared_data: Path) -> Pool:
    paths = ensure_corrupted(CORRUPTIONS, 5, PER_CLASS, cache_dir, shared_data / "test.zip")  # cached by now
    return load_pool(paths, PER_CLASS, with_payloads=True)


def _repeat_fraction(labels: np.ndarray) -> float:
    """Fraction of consecutive pairs with the same label: about 1/C for a shuffle, near 1 for long bursts."""
    return float(np.mean(labels[1:] == labels[:-1]))


def test_dirichlet_order_is_a_class_correlated_permutation() -> None:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 100))
    order = dirichlet_order(labels, 0.1, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(len(labels)))
    assert np.array_equal(order, dirichlet_order(labels, 0.1, np.random.default_rng(1)))  # seeded
    correlated = _repeat_fraction(labels[order])
    shuffled = _repeat_fraction(labels[np.random.default_rng(2).permutation(len(labels))])
    assert shuffled < 0.2
    assert correlated > 0.6, correlated


def _synthetic_pool(domains: int = 3, per_domain: int = 40) -> Pool:
    n = domains * per_domain
    return Pool(
        images=torch.zeros(n, 3, 2, 2, dtype=torch.uint8),
        labels=np.tile(np.arange(10), n // 10),
        domain=np.repeat(np.arange(domains), per_domain),
        names=[f"d{i}" for i in range(domains)],
        class_names=[str(i) for i in range(10)],
        payloads=None,
    )


def test_scenarios_are_permutations_with_the_right_structure() -> None:
    pool = _synthetic_pool()
    streams = {s: build_stream(s, pool, seed=0) for s in ("reset", "continual", "correlated", "mixed")}
    for stream in streams.values():
        assert sorted(stream.order.tolist()) == list(range(len(pool.labels)))
    # reset and continual: the same order, domains one after another; only reset has one segment per domain
    assert np.array_equal(streams["reset"].order, streams["continual"].order)
    assert streams["reset"].segments == [(0, 40), (40, 80), (80, 120)]
    assert streams["continual"].segments == [(0, 120)]
    assert [b for b, _ in streams["correlated"].boundaries()] == [0, 40, 80]
    assert np.array_equal(streams["correlated"].domain, np.repeat(np.arange(3), 40))
    assert streams["mixed"].boundaries() == []
    assert len(np.flatnonzero(np.diff(streams["mixed"].domain))) > 10  # interleaved
    assert np.array_equal(build_stream("mixed", pool, seed=0).order, streams["mixed"].order)  # seeded


def test_server_method_names_the_configuration() -> None:
    guards = {"reliable": True, "min_batch": True, "grad_clip": True, "min_batch_size": 16}
    assert server_method({"method": "tent", "adaptation": {"guards": guards}}) == "default"
    off = {k: (False if isinstance(v, bool) else v) for k, v in guards.items()}
    assert server_method({"method": "tent", "adaptation": {"guards": off}}) == "tent-faithful"
    assert server_method({"method": "tent", "adaptation": {"guards": {**off, "reliable": True}}}) == "tent-custom"
    assert server_method({"method": "norm", "adaptation": {"guards": guards}}) == "norm"


def test_in_process_and_http_give_the_same_predictions(
    pool: Pool, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrency 1 and images per request = the server's max batch size: the server forms the in-process
    batches exactly (the reset scenario adds a short batch per domain and a POST /reset between domains).
    The stream is 20 images a domain, so steps are taken on buffered groups of 8 (both sides read TTA_MIN_BATCH),
    each applied at the next group (the step lag): the server computes them on its step thread, in-process at once."""
    monkeypatch.setenv("TTA_MIN_BATCH", "8")
    env = {
        "TTA_METHOD": "tent",
        "TTA_MIN_BATCH": "8",
        "TTA_MAX_BATCH_SIZE": str(BATCH),
        "TTA_MAX_WAIT_MS": "50",
        "TTA_MODEL": str(model_path),
        "TTA_DEVICE": "cpu",
    }
    with running_server(env=env) as (url, _):
        for scenario in ("continual", "reset"):
            stream = build_stream(scenario, pool, seed=0)
            local = run_in_process(stream, "default", BATCH, model_path, device="cpu")
            remote = run_http(stream, url, images_per_request=BATCH, concurrency=1)

            assert local.extra["engine"]["steps_total"] > 0, "the stream should make the model adapt"
            assert np.array_equal(local.predictions, remote.predictions), scenario
            correct = int((local.predictions == stream.labels).sum())
            server = remote.extra["server_prequential"]
            assert (server["labels"], server["correct"]) == (len(stream), correct), scenario
            assert local.resets == remote.resets, scenario
            assert remote.extra["requests"] == sum(-(-(e - s) // BATCH) for s, e in stream.segments)
    assert [r["reason"] for r in local.resets] == [SCENARIO_RESET]


def test_command_end_to_end_writes_report_and_resumes(
    tmp_path: Path,
    cache_dir: Path,
    shared_data: Path,
    model_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    results, docs = tmp_path / "results", tmp_path / "docs"
    argv = [
        "--profile", "quick", "--limit-per-class", str(PER_CLASS), "--corruptions", ",".join(CORRUPTIONS),
        "--scenarios", "continual,correlated", "--methods", "none,default", "--batch-sizes", str(BATCH),
        "--model", str(model_path), "--device", "cpu", "--data", str(shared_data / "test.zip"),
        "--cache-dir", str(cache_dir), "--results-dir", str(results), "--copy-to", str(docs),
    ]  # fmt: skip
    assert main(argv) == 0
    runs = sorted(p.name for p in (results / "runs").glob("*.json"))
    assert runs == [f"{s}-b{BATCH}-{m}.json" for s in ("continual", "correlated") for m in ("default", "none")]
    record = json.loads((results / "runs" / f"continual-b{BATCH}-default.json").read_text())
    assert list(record["per_corruption_error"]) == CORRUPTIONS
    assert record["images"] == 2 * 10 * PER_CLASS
    assert record["mean_error"] == pytest.approx(np.mean(list(record["per_corruption_error"].values())), abs=1e-3)
    assert [b[1] for b in record["boundaries"]] == CORRUPTIONS
    assert {"wall_s", "resets", "window_errors", "correct_bits", "settings"} <= set(record)

    table = (results / "accuracy.md").read_text()
    assert f"### continual, batch {BATCH}" in table and f"### correlated, batch {BATCH}" in table
    assert "| none |" in table and "| default |" in table and "| gauss | brit | **mean** |" in table
    rows = (results / "accuracy.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4 and rows[0].startswith("scenario,batch_size,method")
    for scenario in ("continual", "correlated"):
        png = results / f"{scenario}-b{BATCH}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (docs / png.name).is_file()
    assert (docs / "accuracy.md").read_text() == table

    mtimes = {p: p.stat().st_mtime_ns for p in (results / "runs").glob("*.json")}
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("skip ") == 4
    assert {p: p.stat().st_mtime_ns for p in (results / "runs").glob("*.json")} == mtimes

    # another adaptation setting makes the saved runs of the adapting method stale, and only those
    monkeypatch.setenv("TTA_ANCHOR_RATE", "0.5")
    assert main([*argv, "--scenarios", "continual"]) == 0
    assert capsys.readouterr().out.count("skip ") == 1
    rerun = json.loads((results / "runs" / f"continual-b{BATCH}-default.json").read_text())
    assert rerun["settings"]["anchor_rate"] == 0.5


def test_recurring_stream_lengths_balance_and_recurrence() -> None:
    pool = _synthetic_pool(domains=3, per_domain=11_000)  # 1,100 per class: two visits never use a domain up
    plan = recurring_plan(3, seed=0)
    assert plan == recurring_plan(3, seed=0) and plan != recurring_plan(3, seed=1)  # seeded
    domains = [d for d, _ in plan]
    assert sorted(domains) == [0, 0, 1, 1, 2, 2]  # every domain comes back
    assert all(a != b for a, b in zip(domains, domains[1:], strict=False))  # never twice in a row
    assert all(RECURRING_LENGTHS[0] <= n <= RECURRING_LENGTHS[1] for _, n in plan)
    assert len({n for _, n in plan}) > 1

    stream = build_stream("recurring", pool, seed=0)
    assert len(stream) == sum(n for _, n in plan)
    starts = [b for b, _ in stream.boundaries()]
    assert starts == list(np.cumsum([0] + [n for _, n in plan])[:-1])
    assert [name for _, name in stream.boundaries()] == [pool.names[d] for d in domains]
    seen: dict[int, set[int]] = {}
    ends = [*starts[1:], len(stream)]
    for start, end, (domain, length) in zip(starts, ends, plan, strict=True):
        segment = stream.order[start:end]
        assert (pool.domain[segment] == domain).all()
        counts = np.bincount(pool.labels[segment], minlength=10)
        assert counts.max() - counts.min() <= 1 and counts.sum() == length  # classes balanced
        assert len(set(segment.tolist())) == length  # no image twice within a visit
        assert not seen.get(domain, set()) & set(segment.tolist())  # a recurrence brings other images
        seen.setdefault(domain, set()).update(segment.tolist())


def test_recurring_stream_reuses_a_small_pool_in_turn() -> None:
    pool = _synthetic_pool(domains=2, per_domain=40)  # 4 per class: far fewer than a visit needs
    stream = build_stream("recurring", pool, seed=0)
    for domain in (0, 1):
        members = stream.order[stream.domain == domain]
        uses = np.bincount(members, minlength=len(pool.labels))[pool.domain == domain]
        assert uses.max() - uses.min() <= 1  # every image used as often as any other, within one


def test_domain_length_and_recurring_from_the_command(
    tmp_path: Path, cache_dir: Path, shared_data: Path, model_path: Path
) -> None:
    argv = [
        "--domain-length", str(10 * PER_CLASS), "--corruptions", ",".join(CORRUPTIONS), "--methods", "none",
        "--scenarios", "continual,recurring", "--batch-sizes", str(BATCH), "--model", str(model_path),
        "--device", "cpu", "--data", str(shared_data / "test.zip"), "--cache-dir", str(cache_dir),
        "--results-dir", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    continual = json.loads((tmp_path / "runs" / f"continual-b{BATCH}-none.json").read_text())
    assert continual["images"] == 2 * 10 * PER_CLASS and continual["domain_length"] == 10 * PER_CLASS
    recurring = json.loads((tmp_path / "runs" / f"recurring-b{BATCH}-none.json").read_text())
    assert recurring["images"] == sum(n for _, n in recurring_plan(2, seed=0))
    assert len(recurring["boundaries"]) == 2 * RECURRING_VISITS
    first, rest = switch_errors(recurring)
    assert first is not None and rest is not None
    assert "| none |" in (tmp_path / "accuracy.md").read_text()
    with pytest.raises(SystemExit):
        main([*argv, "--domain-length", "25"])  # not a multiple of the 10 classes


def test_switch_errors_are_means_over_domains() -> None:
    correct = np.array([0] * 500 + [1] * 500 + [1] * 250 + [0] * 250 + [1] * 600, dtype=bool)
    record = {
        "images": len(correct),
        "correct_bits": base64.b64encode(np.packbits(correct).tobytes()).decode(),
        "boundaries": [(0, "a"), (1000, "b"), (1500, "c")],
    }
    first, rest = switch_errors(record)
    assert first == pytest.approx(100 * (1 + 0.5 + 0) / 3)  # domain c: its first 500 all right
    assert rest == pytest.approx(100 * (0 + 0) / 2)  # b has no rest; c's last 100 are right
    assert switch_errors({**record, "boundaries": []}) == (None, None)  # mixed
