"""k8s/Dockerfile: the official Ray image at the manifest's Ray version, copying paths that exist."""

from __future__ import annotations

import re

import pytest

from k8s.generate import RAY_VERSION, ROOT

DOCKERFILE = ROOT / "k8s" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_base_image_is_ray_gpu_at_manifest_version():
    froms = [rest for op, rest in _instructions() if op == "FROM"]
    assert froms == [f"rayproject/ray:{RAY_VERSION}-py311-gpu"]


def test_ray_version_matches_installed_ray():
    import ray

    assert ray.__version__ == RAY_VERSION, "bump RAY_VERSION in k8s/generate.py and the Dockerfile's FROM together"


@pytest.mark.skipif(not (ROOT / "deployments.yaml").exists(), reason="deployments.yaml not written yet")
def test_copied_sources_exist_and_project_is_installed():
    sources = []
    for op, rest in _instructions():
        if op == "COPY":
            sources += [p for p in rest.split() if not p.startswith("--")][:-1]  # last one is the target
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    assert {"pyproject.toml", "deployments.yaml", "replica", "deployments", "router"} <= set(sources)
    runs = " ".join(rest for op, rest in _instructions() if op == "RUN")
    assert "pip install --no-cache-dir --no-deps ." in runs
