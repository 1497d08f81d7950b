"""The committed k8s/rayservice.yaml: parses, validates against KubeRay's CRD, and carries
exactly deployments.yaml (plus the documented k8s/gpu_overrides.yaml) as serveConfigV2."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from k8s.generate import (
    DEFAULT_DEPLOYMENTS,
    DEFAULT_OUT,
    DEFAULT_OVERRIDES,
    ClusterSpec,
    apply_overrides,
    generate,
    gpu_worker_bounds,
    load_yaml,
    replica_plan,
)
from tests.k8s.conftest import schema_errors

pytestmark = pytest.mark.skipif(not DEFAULT_DEPLOYMENTS.exists(), reason="deployments.yaml not written yet")


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    docs = list(yaml.safe_load_all(DEFAULT_OUT.read_text()))
    assert len(docs) == 1, "one RayService per file"
    return docs[0]


@pytest.fixture(scope="module")
def serve_config(manifest) -> dict[str, Any]:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def _leaves(d: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    """Flatten to {path: value}; lists of named items are keyed by name (like the overrides)."""
    if isinstance(d, dict):
        out: dict[tuple, Any] = {}
        for k, v in d.items():
            out |= _leaves(v, (*prefix, k))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out = {}
        for i, x in enumerate(d):
            out |= _leaves(x, (*prefix, x.get("name", "default" if prefix[-1:] == ("applications",) else i)))
        return out
    return {prefix: d}


def test_manifest_is_up_to_date():
    assert DEFAULT_OUT.read_text() == generate(), "k8s/rayservice.yaml is stale: run python k8s/generate.py"


def test_manifest_validates_against_crd(manifest, rayservice_validator):
    assert schema_errors(rayservice_validator, manifest) == []


def test_serve_config_is_deployments_yaml_plus_overrides(serve_config):
    deployments = load_yaml(DEFAULT_DEPLOYMENTS)
    overrides = load_yaml(DEFAULT_OVERRIDES)
    assert serve_config == apply_overrides(deployments, overrides)
    # And nothing but the overridden leaves differs from deployments.yaml.
    ours, theirs = _leaves(serve_config), _leaves(deployments)
    changed = {p for p in ours.keys() | theirs.keys() if ours.get(p, object()) != theirs.get(p, object())}
    allowed = set(_leaves(overrides))
    assert changed <= allowed, f"serveConfigV2 differs from deployments.yaml outside the overrides: {changed - allowed}"
    # Applications and deployments keep their order and names.
    names = lambda cfg: [(a.get("name"), [d["name"] for d in a.get("deployments", [])]) for a in cfg["applications"]]
    assert names(serve_config) == names(deployments)


def test_serve_config_is_valid_for_serve(serve_config):
    """What KubeRay will PUT to the dashboard parses as Serve's own config schema."""
    schema = pytest.importorskip("ray.serve.schema")
    parsed = schema.ServeDeploySchema.model_validate(serve_config)
    assert [a.name for a in parsed.applications] == [a["name"] for a in serve_config["applications"]]


def test_cluster_shape(manifest, serve_config):
    rc = manifest["spec"]["rayClusterConfig"]
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert rc["enableInTreeAutoscaling"] is True
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    (group,) = rc["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (group["minReplicas"], group["maxReplicas"]) == gpu_worker_bounds(serve_config, ClusterSpec())
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["maxReplicas"] > group["minReplicas"]  # room for the autoscaler to add GPU pods
    assert replica_plan(serve_config, ClusterSpec()).gpus_per_replica == 1
