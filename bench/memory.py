"""Server memory over a long labelled stream: resident set size of a real `tta serve` every N predictions.

Real CIFAR-10 test JPEGs, 64 per request with their labels (so the ledger and the prequential scores work as in
production), the default method and guards. What must hold: memory levels off (the ledger is bounded by
TTA_LEDGER_SIZE, every buffer by a setting) instead of growing with the number of predictions.

    python -m bench.memory --predictions 150000 --out docs/reliability/memory.json
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench.load import DEFAULT_DATA, load_jpegs
from bench.speed import free_port

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def labelled_body(images: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name.rsplit("/", 1)[-1]}"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in images
    ]
    labels = ",".join(str(CLASSES.index(name.split("/")[-2])) for name, _ in images)
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="labels"\r\n\r\n{labels}\r\n'.encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts) + f"--{boundary}--\r\n".encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--predictions", type=int, default=150_000)
    parser.add_argument("--every", type=int, default=5_000, help="sample the RSS every this many predictions")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    images = load_jpegs(args.data, limit=10_000)
    rng = random.Random(0)
    bodies = [labelled_body(rng.sample(images, 64)) for _ in range(64)]
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="tta-memory-")) / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    samples, started = [], time.monotonic()
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=120) as client:
            for _ in range(600):
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            samples.append({"predictions": 0, "rss_mb": rss_mb(server.pid), "s": 0.0})
            done = 0
            while done < args.predictions:
                content_type, body = bodies[(done // 64) % len(bodies)]
                response = client.post("/predict", content=body, headers={"content-type": content_type})
                response.raise_for_status()
                done += 64
                if done % args.every < 64:
                    sample = {"predictions": done, "rss_mb": rss_mb(server.pid), "s": time.monotonic() - started}
                    samples.append(sample)
                    print(json.dumps(sample), flush=True)
            status = client.get("/v1/status").json()
    finally:
        server.terminate()
        server.wait(30)
    peak = max(s["rss_mb"] for s in samples)
    after_warmup = [s["rss_mb"] for s in samples if s["predictions"] >= args.predictions // 3]
    result = {
        "predictions": done,
        "samples": samples,
        "rss_start_mb": samples[0]["rss_mb"],
        "rss_peak_mb": peak,
        "rss_end_mb": samples[-1]["rss_mb"],
        "rss_growth_last_two_thirds_mb": after_warmup[-1] - after_warmup[0],
        "ledger_entries": status["ledger_entries"],
        "prequential_accuracy": status["prequential"]["adapted"]["accuracy"],
        "command": "python -m bench.memory " + " ".join(argv or sys.argv[1:]),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
