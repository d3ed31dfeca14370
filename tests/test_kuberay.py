"""The KubeRay manifest (deploy/kuberay/rayservice.yaml) against the RayService schema, without a cluster: the
subset of the CRD's OpenAPI schema vendored beside it (deploy/kuberay/rayservice.schema.json says where from), and
its Serve application against deploy/ray/serve.yaml. Ray's own check of both configs is in tests/test_ray_scale.py."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
MANIFEST = DEPLOY / "kuberay" / "rayservice.yaml"
SCHEMA = DEPLOY / "kuberay" / "rayservice.schema.json"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_manifest_is_a_valid_rayservice(manifest: dict, validator: jsonschema.Draft202012Validator) -> None:
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert not errors, errors


@pytest.mark.parametrize(
    "break_it",
    [
        lambda m: m["spec"]["rayClusterConfig"].update(
            workerGroupSpec=m["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        ),
        lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"),
        lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"].update({"num-cpus": 1}),
        lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
            "limits"
        ].update(memory="4 GB"),
    ],
    ids=["misspelt field", "no group name", "start parameter not a string", "bad quantity"],
)
def test_the_schema_refuses_a_broken_manifest(
    manifest: dict, validator: jsonschema.Draft202012Validator, break_it
) -> None:
    broken = copy.deepcopy(manifest)
    break_it(broken)
    assert not validator.is_valid(broken)


def test_its_serve_application_is_the_config_files(manifest: dict) -> None:
    """The same application as `serve run deploy/ray/serve.yaml`: import path, deployments, their resources."""
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    local = yaml.safe_load((DEPLOY / "ray" / "serve.yaml").read_text())["applications"]
    assert [a["import_path"] for a in embedded] == [a["import_path"] for a in local] == ["app.ray_app:app_builder"]
    for ours, theirs in zip(embedded[0]["deployments"], local[0]["deployments"], strict=True):
        assert ours["name"] == theirs["name"]
        assert ours["ray_actor_options"] == theirs["ray_actor_options"]
