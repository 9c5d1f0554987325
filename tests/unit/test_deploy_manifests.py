"""deploy/: the KubeRay RayService is valid against KubeRay's own CRD schema (strictly: no field
the CRD does not know, as `kubectl apply --validate=strict` would refuse), and the Serve
application it and deploy/ray/serve-config.yaml carry is one Ray Serve accepts, naming a config
slimserve accepts."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# The `v1` openAPIV3Schema of ray-operator/config/crd/bases/ray.io_rayservices.yaml, KubeRay v1.7.0.
CRD_SCHEMA = ROOT / "tests/data/kuberay-v1.7.0-rayservice-v1.schema.json.gz"


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever Kubernetes would prune them."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def validator() -> jsonschema.Validator:
    schema = _strict(json.loads(gzip.decompress(CRD_SCHEMA.read_bytes())))
    return jsonschema.Draft7Validator(schema)


def _manifest() -> dict:
    return yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())


def test_rayservice_is_valid_against_the_kuberay_crd(validator):
    errors = sorted(validator.iter_errors(_manifest()), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_strict_check_catches_a_misspelt_field(validator):
    broken = copy.deepcopy(_manifest())
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert any("maxReplica" in e.message for e in validator.iter_errors(broken))
    broken = copy.deepcopy(_manifest())
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert list(validator.iter_errors(broken))


@pytest.mark.parametrize("source", ["kuberay", "serve-config"])
def test_the_serve_application_is_one_ray_serve_accepts(source):
    from ray.serve.schema import ServeDeploySchema

    from slimserve.serve.config import load_config

    if source == "kuberay":
        serve_config = yaml.safe_load(_manifest()["spec"]["serveConfigV2"])
    else:
        serve_config = yaml.safe_load((ROOT / "deploy/ray/serve-config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(serve_config)
    (app,) = schema.applications
    assert app.import_path == "slimserve.serve.app:app_builder"
    config_path = Path(app.args["config"].removeprefix("/app/"))  # the image's WORKDIR
    assert load_config(ROOT / config_path).variants
