"""Schemathesis against the real server's own /openapi.json: every operation, with data that fits its documented
request and data that does not, must answer without a 5xx and within its documented responses (status code, content
type, headers, body schema); data that does not fit must be refused, a method a route lacks must be a 405 with
Allow, and a protected route must refuse made-up credentials.

Bounded and reproducible: schemathesis' coverage phase (boundary values, missing fields, wrong types and methods)
plus MAX_EXAMPLES fuzzed cases per operation, in deterministic mode (the same cases on every run, no example
database). TTA_METHOD=none keeps each /predict cheap.

One check is left out: positive_data_acceptance (every schema-valid request accepted). A schema cannot say "a
decodable image" or "an id that /predict returned", so schema-valid bytes get 400 invalid_image and made-up ids 404,
by design.
"""

import json
import subprocess
import sys
from pathlib import Path

from app.config import Settings
from app.main import create_app
from tests.servers import running_server

MAX_EXAMPLES = 50
ADMIN_TOKEN = "contract-test-admin-token-0123456789"
CONTRACT_OPERATIONS = 7  # POST /predict, /feedback, /reset; GET /v1/status, /healthz, /readyz, /metrics


def schemathesis_run(url: str, report: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{url}/openapi.json",
        "--checks=all",
        "--exclude-checks=positive_data_acceptance",
        "--phases=examples,coverage,fuzzing",
        f"--max-examples={MAX_EXAMPLES}",
        "--generation-deterministic",
        "--workers=1",
        "--continue-on-failure",
        f"--header=Authorization: Bearer {ADMIN_TOKEN}",  # so /reset is tested past its 401 too
        "--request-timeout=30",
        "--no-color",
        "--report=json",
        f"--report-json-path={report}",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_every_operation_answers_as_its_openapi_document_says(model_path: Path, tmp_path: Path) -> None:
    env = {"TTA_MODEL": str(model_path), "TTA_METHOD": "none", "TTA_ADMIN_TOKEN": ADMIN_TOKEN}
    with running_server(env) as (url, _):
        run = schemathesis_run(url, tmp_path / "schemathesis.json")
    assert (tmp_path / "schemathesis.json").is_file(), run.stdout + run.stderr
    result = json.loads((tmp_path / "schemathesis.json").read_text())
    cases = result["test_cases"]
    print(
        f"schemathesis: {result['operations']['tested']} operations, {cases['generated']} cases, "
        f"{cases['unique_failures']} failures, {result['running_time']:.1f} s"
    )
    operations = result["operations"]
    assert operations["tested"] == operations["total"] >= CONTRACT_OPERATIONS, run.stdout
    assert cases["generated"] >= operations["total"] * 10, run.stdout
    assert (result["failures"], result["errors"], run.returncode) == ([], [], 0), run.stdout[-20_000:]


def test_the_document_asks_only_for_credentials_that_are_set(model_path: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("contract-test-api-key-0123456789\n")

    def security(**settings: object) -> dict[str, list | None]:
        document = create_app(Settings(model=model_path, **settings)).openapi()
        return {path: document["paths"][path]["post"].get("security") for path in ("/predict", "/feedback", "/reset")}

    assert security() == {"/predict": None, "/feedback": None, "/reset": None}
    key_schemes = [{"api_key_bearer": []}, {"api_key_header": []}]
    assert security(admin_token=ADMIN_TOKEN, api_keys=keys) == {
        "/predict": key_schemes,
        "/feedback": key_schemes,
        "/reset": [{"admin_token": []}],
    }
