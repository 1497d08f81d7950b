"""KubeRay's RayService CRD schema, from ../shared/k8s next to the repository (skipped when absent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT.parent / "shared" / "k8s" / "ray.io_rayservices.yaml"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 18k lines


def strict(schema: Any) -> Any:
    """Reject unknown fields like `kubectl apply --validate=strict`: a CRD's openAPIV3Schema
    lists properties but leaves additionalProperties open, so a typo would otherwise pass."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="session")
def rayservice_validator():
    """A jsonschema validator for RayService ray.io/v1 (strict about unknown fields)."""
    jsonschema = pytest.importorskip("jsonschema")
    if not CRD_PATH.exists():
        pytest.skip(f"KubeRay CRD schema not found at {CRD_PATH}")
    crd = yaml.load(CRD_PATH.read_text(), Loader=_Loader)
    assert crd["spec"]["names"]["kind"] == "RayService"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))


def schema_errors(validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
