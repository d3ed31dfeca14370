"""Capture (TTA_CAPTURE_DIR): a real server keeps a bounded, uniform sample of what each stream served, with its
labels, in the layout `tta finetune` reads; the writer's queue never blocks a request."""

import re
import threading
from pathlib import Path

import httpx
import numpy as np
import torch

from app.serving.capture import OUTCOMES, QUEUE_SIZE, Capture
from models.checkpoint import load_checkpoint
from models.images import read_labelled, read_unlabelled
from tests.conftest import make_png
from tests.servers import metric_value, running_server

MAX_IMAGES, MAX_STREAMS = 50, 2
PER_REQUEST, REQUESTS = 256, 40  # 10,240 images, in few requests: the capture's bound is per image
STREAMS = ("a", "..", "c")  # '..' must stay inside the capture folder; 'c' is past TTA_CAPTURE_MAX_STREAMS
NAME = re.compile(r"^([0-9a-f]{32})_p(\d+)\.png$")


def captured(directory: Path) -> dict[str, Path]:
    """Prediction id -> file, every image anywhere under the folder."""
    return {NAME.match(p.name).group(1): p for p in directory.rglob("*.png")}


def watch_bounds(directory: Path, stop: threading.Event, worst: dict[str, int]) -> None:
    """The most images any one stream folder held at once, sampled while the server runs."""
    while not stop.wait(0.2):
        for stream_dir in (p for p in directory.iterdir() if p.is_dir()):
            worst[stream_dir.name] = max(worst.get(stream_dir.name, 0), sum(1 for _ in stream_dir.rglob("*.png")))


def test_capture_is_bounded_uniform_and_labelled_under_10000_images(tmp_path: Path, model_path: Path) -> None:
    directory = tmp_path / "capture"
    env = {
        "TTA_MODEL": str(model_path),
        "TTA_METHOD": "none",  # the capture is under test, not the adaptation: forward passes only, fast
        "TTA_MAX_WAIT_MS": "0",
        "TTA_MAX_FILES_PER_REQUEST": str(PER_REQUEST),
        "TTA_MAX_BATCH_SIZE": str(PER_REQUEST),
        "TTA_CAPTURE_DIR": str(directory),
        "TTA_CAPTURE_MAX_IMAGES": str(MAX_IMAGES),
        "TTA_CAPTURE_MAX_STREAMS": str(MAX_STREAMS),
    }
    _, card = load_checkpoint(model_path)
    pool = [make_png(32, 32, seed) for seed in range(PER_REQUEST)]  # the model's size: no resizing to pay for
    rng = np.random.default_rng(0)
    served: dict[str, tuple[str, int, int]] = {}  # id -> (stream, position in its stream, predicted class)
    labels: dict[str, int] = {}  # id -> the label sent for it, with /predict or /feedback
    late: dict[str, list[dict]] = {s: [] for s in STREAMS}
    count = dict.fromkeys(STREAMS, 0)  # images served per stream
    stop, worst = threading.Event(), {}
    with running_server(env) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        watcher = threading.Thread(target=watch_bounds, args=(directory, stop, worst), daemon=True)
        watcher.start()
        for r in range(REQUESTS):
            stream = STREAMS[r % 3]
            sent = rng.integers(0, 10, PER_REQUEST).tolist()
            with_labels = r % 4 == 0  # a quarter of the requests bring their labels
            response = client.post(
                "/predict",
                files=[("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pool)],
                data={"labels": ",".join(map(str, sent))} if with_labels else None,
                headers={"X-TTA-Stream": stream},
            )
            assert response.status_code == 200, response.text
            for i, prediction in enumerate(response.json()["predictions"]):
                served[prediction["id"]] = (stream, count[stream], prediction["class_index"])
                count[stream] += 1
                if with_labels:
                    labels[prediction["id"]] = sent[i]
                elif rng.random() < 0.5:  # half of the others get a late label
                    late[stream].append({"id": prediction["id"], "label": int(rng.integers(0, 10))})
        for items in late.values():
            answer = client.post("/feedback", json=items)
            assert answer.status_code == 200, answer.text
            labels.update({item["id"]: item["label"] for item in items})
        for _ in range(200):  # the writer catches up off the request path
            metrics = client.get("/metrics").text
            if metric_value(metrics, "tta_capture_queued") == 0:
                break
            stop.wait(0.05)
        stop.set()
        watcher.join()

    assert metric_value(metrics, "tta_capture_queued") == 0
    outcomes = {o: metric_value(metrics, "tta_capture_images_total", f'outcome="{o}"') for o in OUTCOMES}
    assert sum(outcomes.values()) == len(served) == REQUESTS * PER_REQUEST
    files = captured(directory)
    # bounded: at most MAX_IMAGES per stream at any moment, MAX_STREAMS streams, nothing outside the folder
    assert sorted(p.name for p in directory.iterdir()) == ["%2E%2E", "a"]
    assert max(worst.values()) <= MAX_IMAGES, worst
    assert not any(p.name.endswith(".tmp") for p in directory.rglob("*")), "a temporary file was left behind"
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "labelled").exists()
    kept_gauge = sum(
        metric_value(metrics, "tta_capture_kept_images", f'state="{s}"') for s in ("labelled", "unlabelled")
    )
    assert kept_gauge == len(files) == MAX_STREAMS * MAX_IMAGES
    by_stream = {s: [i for i in files if served[i][0] == s] for s in STREAMS}
    assert len(by_stream["a"]) == len(by_stream[".."]) == MAX_IMAGES and not by_stream["c"]
    assert outcomes["stream_limit"] == count["c"]
    # uniform: the kept images' positions in their stream spread over the whole stream (a reservoir that kept the
    # first or the last images would sit near 0 or 1; the mean of 50 uniform positions has sd 0.04)
    for stream in ("a", ".."):
        mean_position = np.mean([served[i][1] / count[stream] for i in by_stream[stream]])
        assert 0.3 < mean_position < 0.7, (stream, mean_position)
    # each file says its prediction, and sits where its label (or the lack of one) puts it
    for prediction_id, path in files.items():
        assert int(NAME.match(path.name).group(2)) == served[prediction_id][2]
        if prediction_id in labels:
            assert path.parent.parent.name == "labelled"
            assert path.parent.name == card.class_names[labels[prediction_id]]
        else:
            assert path.parent.name == "unlabelled"
    # what tta finetune reads: the labelled folder as an ImageFolder, the unlabelled one as target images
    for stream_dir in directory.iterdir():
        data = read_labelled(stream_dir / "labelled", card)
        ids = [NAME.match(Path(member).name).group(1) for member in data.members]
        read_back = {i: data.class_names[y] for i, y in zip(ids, data.labels.tolist(), strict=True)}
        here = [i for i, path in files.items() if path.is_relative_to(stream_dir)]
        assert read_back == {i: card.class_names[labels[i]] for i in here if i in labels}
        unlabelled = read_unlabelled(stream_dir / "unlabelled", card)
        assert len(read_back) + len(unlabelled) == MAX_IMAGES
        assert unlabelled.shape[1:] == (3, card.input_size, card.input_size)


def test_a_full_queue_drops_the_capture_instead_of_waiting(tmp_path: Path) -> None:
    """The writer is not started, so nothing leaves the queue: offers past its size return at once, counted."""
    capture = Capture(tmp_path, ["x", "y"], max_images=1000, max_streams=1, seed=0)
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    for i in range(QUEUE_SIZE + 10):
        capture.offer("s", f"{i:032x}", image, 0, None)
    assert capture.outcomes == {"kept": QUEUE_SIZE, "replaced": 0, "not_sampled": 0, "dropped": 10, "stream_limit": 0}
    assert not list(tmp_path.iterdir()), "the request's side never writes"


def test_a_restart_adopts_the_folder_and_a_lower_bound_trims_it(tmp_path: Path) -> None:
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    first = Capture(tmp_path, ["x", "y"], max_images=20, max_streams=2, seed=0)
    first.start()
    for i in range(100):
        first.offer("s", f"{i:032x}", image, 1, 0 if i % 2 else None)
    first.flush()
    first.label([(i, 1) for i in first._reservoirs["s"].ids[:3]])
    first.stop()
    before = captured(tmp_path)
    assert len(before) == 20 and sum(p.parent.name == "y" for p in before.values()) >= 3

    again = Capture(tmp_path, ["x", "y"], max_images=20, max_streams=2, seed=1)
    again.start()
    assert again._reservoirs["s"].seen == 100 and set(again._reservoirs["s"].ids) == set(before)
    assert again.on_disk["labelled"] + again.on_disk["unlabelled"] == 20
    again.stop()

    smaller = Capture(tmp_path, ["x", "y"], max_images=5, max_streams=2, seed=2)
    smaller.start()
    smaller.stop()
    after = captured(tmp_path)
    assert len(after) == 5 and set(after) <= set(before)
