#!/usr/bin/env bash
# Regenerate docker/requirements.lock: every distribution the image installs (the project's runtime
# dependencies from pyproject.toml plus its build backend, setuptools), each pinned with ==.
#
#   bash docker/lock.sh [python]     # python: a CPython 3.11 on linux x86_64 (default: python3)
#
# Resolution is pip's own (`pip install --dry-run --ignore-installed --report`), so it sees the same
# indexes, find-links and CA bundle as any pip on this machine. Run it after changing the
# dependencies in pyproject.toml; tests/test_docker_static.py fails while the lock and pyproject disagree.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${1:-python3}"
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
# The requirements themselves are read from pyproject.toml, so the project is not built to resolve them.
mapfile -t requirements < <("$python" - "$repo/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))
print("\n".join(project["project"]["dependencies"] + project["build-system"]["requires"]))
PY
)
"$python" -m pip install --quiet --dry-run --ignore-installed --only-binary=:all: --report "$report" \
    "${requirements[@]}"
"$python" - "$report" "$repo/docker/requirements.lock" <<'PY'
import json, platform, sys
report = json.load(open(sys.argv[1]))
pins = sorted(
    (item["metadata"]["name"].lower().replace("_", "-"), item["metadata"]["version"])
    for item in report["install"]
)
header = (
    "# Pinned runtime closure of pyproject.toml's dependencies (+ setuptools, the build backend) for the image.\n"
    f"# Resolved for CPython {platform.python_version()} on {sys.platform} {platform.machine()}"
    " by `bash docker/lock.sh`; do not edit by hand.\n"
)
with open(sys.argv[2], "w") as out:
    out.write(header + "".join(f"{name}=={version}\n" for name, version in pins))
print(f"wrote {len(pins)} pins to {sys.argv[2]}")
PY
