"""The Ray deployment files, checked without a cluster.

``deploy/serve.yaml`` and ``deploy/serve-cpu.yaml`` are valid Serve configs (Ray Serve's
own schema) whose arguments the builder takes; ``deploy/rayservice.yaml`` is a valid
KubeRay ``RayService`` (the CRD's schema, strictly: unknown fields refused) that serves
the same applications as ``deploy/serve.yaml``; ``docker/ray.Dockerfile`` passes hadolint
and the build context holds what it copies. Serving itself is tested in ``tests/ray``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import REPO, assert_hadolint_passes

DEPLOY = REPO / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
RAY_DOCKERFILE = REPO / "docker" / "ray.Dockerfile"


def needs(module: str) -> Any:
    """``module``, or a skip (a failure under CI, which installs the ray extra)."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI installs the ray extra (make test): {exc}")
        pytest.skip(f"{module} is not installed (pip install '.[ray]'): {exc}")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", ["serve.yaml", "serve-cpu.yaml"])
def test_serve_configs_are_valid_and_match_the_service_limits(name: str) -> None:
    schema = needs("ray.serve.schema")
    ray_serve = needs("depass_ray.serve")
    config = schema.ServeDeploySchema.model_validate(load(name))
    (application,) = config.applications
    assert application.import_path == "depass_ray.serve:app_builder"
    args = ray_serve.ServeArgs(**application.args)
    settings = ray_serve.Settings(**args.settings)
    options = ray_serve.deployment_options(args, settings)
    # The service's own queue answers 429 before Serve's limit is reached.
    assert options["max_ongoing_requests"] > settings.max_queue + settings.max_batch
    assert options["max_queued_requests"] >= options["max_ongoing_requests"]
    assert options["backpressure_config"].status_code == 429
    assert options["backpressure_config"].retry_after_s
    assert options["ray_actor_options"]["num_gpus"] == args.num_gpus


def test_the_gpu_config_gives_each_replica_one_gpu() -> None:
    args = load("serve.yaml")["applications"][0]["args"]
    assert args["num_gpus"] == 1 and args["max_replicas"] > args["min_replicas"]


def test_builder_arguments_are_checked() -> None:
    ray_serve = needs("depass_ray.serve")
    with pytest.raises(ValueError, match="unknown service settings: max_queues"):
        ray_serve.ServeArgs(settings={"max_queues": 3})
    with pytest.raises(ValueError, match="num_gpu"):
        ray_serve.ServeArgs(num_gpu=1)


def strict(schema: Any) -> Any:
    """The CRD's schema with unknown fields refused where Kubernetes would prune them
    (objects with ``properties`` that do not preserve unknown fields)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayservice_validator() -> Any:
    jsonschema = needs("jsonschema")
    schema = strict(json.loads((SCHEMAS / "rayservice-v1.json").read_text()))
    return jsonschema.Draft7Validator(schema)


def errors_of(validator: Any, manifest: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(manifest)
    ]


def test_the_rayservice_manifest_is_valid(rayservice_validator: Any) -> None:
    manifest = load("rayservice.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert errors_of(rayservice_validator, manifest) == []


def test_the_validation_catches_mistakes(rayservice_validator: Any) -> None:
    manifest = load("rayservice.yaml")
    typo = copy.deepcopy(manifest)
    typo["spec"]["rayClusterConfig"]["workerGroupSpec"] = typo["spec"]["rayClusterConfig"].pop(
        "workerGroupSpecs"
    )
    assert any("workerGroupSpec" in e for e in errors_of(rayservice_validator, typo))
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "one"
    assert errors_of(rayservice_validator, wrong_type)


def test_the_rayservice_serves_the_applications_of_serve_yaml() -> None:
    schema = needs("ray.serve.schema")
    manifest = load("rayservice.yaml")
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    schema.ServeDeploySchema.model_validate(served)
    assert served["applications"] == load("serve.yaml")["applications"]
    spec = manifest["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == needs("ray").__version__
    (workers,) = spec["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"  # one replica per GPU (num_gpus: 1)
    assert workers["maxReplicas"] == served["applications"][0]["args"]["max_replicas"]
    images = {
        c["image"]
        for group in (spec["headGroupSpec"], workers)
        for c in group["template"]["spec"]["containers"]
    }
    assert images == {"depass-serve:ray"}
    assert "-t depass-serve:ray" in RAY_DOCKERFILE.read_text()


def test_the_ray_image_lints_and_its_sources_are_in_the_build_context() -> None:
    assert_hadolint_passes(RAY_DOCKERFILE)
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for source in ("depass_batch/", "depass_ray/", "pyproject.toml"):
        assert (REPO / source).exists()
        assert f"!{source}" in ignored, f"{source} is kept out of the build context"
