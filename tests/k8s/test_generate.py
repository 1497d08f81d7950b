"""k8s/generate.py: overrides merge, worker sizing, and the manifest it builds (on a sample config)."""

from __future__ import annotations

import copy

import pytest
import yaml

from k8s.generate import (
    ClusterSpec,
    ReplicaPlan,
    apply_overrides,
    build_rayservice,
    generate,
    gpu_worker_bounds,
    load_yaml,
    main,
    render,
    replica_plan,
)
from tests.k8s.conftest import schema_errors

SAMPLE = {
    "proxy_location": "EveryNode",
    "http_options": {"host": "127.0.0.1", "port": 8000},
    "applications": [
        {
            "name": "cbserve",
            "route_prefix": "/",
            "import_path": "deployments.app:build_app",
            "args": {"model": "tiny:llama", "engine": {"max_num_seqs": 8}},
            "deployments": [
                {"name": "OpenAIIngress", "num_replicas": 1},
                {
                    "name": "LLMReplica",
                    "autoscaling_config": {"min_replicas": 1, "max_replicas": 3},
                    "ray_actor_options": {"num_cpus": 1},
                },
            ],
        }
    ],
}
OVERRIDES = {
    "http_options": {"host": "0.0.0.0"},
    "applications": {"cbserve": {"deployments": {"LLMReplica": {"ray_actor_options": {"num_gpus": 1}}}}},
}


def test_overrides_merge_only_what_they_name():
    before = copy.deepcopy(SAMPLE)
    out = apply_overrides(SAMPLE, OVERRIDES)
    assert before == SAMPLE  # inputs untouched
    assert out["http_options"] == {"host": "0.0.0.0", "port": 8000}
    llm = out["applications"][0]["deployments"][1]
    assert llm["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    assert llm["autoscaling_config"] == SAMPLE["applications"][0]["deployments"][1]["autoscaling_config"]
    # Undo the two overridden leaves and the rest is identical.
    del llm["ray_actor_options"]["num_gpus"]
    out["http_options"]["host"] = "127.0.0.1"
    assert out == SAMPLE


def test_overrides_of_nested_args_keep_siblings():
    over = {"applications": {"cbserve": {"args": {"engine": {"device": "cuda"}}}}}
    args = apply_overrides(SAMPLE, over)["applications"][0]["args"]
    assert args == {"model": "tiny:llama", "engine": {"max_num_seqs": 8, "device": "cuda"}}


@pytest.mark.parametrize(
    "over, match",
    [
        ({"applications": {"nope": {}}}, "application 'nope'"),
        ({"applications": {"cbserve": {"deployments": {"Missing": {"num_replicas": 2}}}}}, "deployment 'Missing'"),
    ],
)
def test_overrides_naming_unknown_things_fail(over, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(SAMPLE, over)


def test_unnamed_application_is_called_default():
    cfg = {"applications": [{"import_path": "x:y", "deployments": [{"name": "LLMReplica"}]}]}
    over = {"applications": {"default": {"deployments": {"LLMReplica": {"ray_actor_options": {"num_gpus": 1}}}}}}
    out = apply_overrides(cfg, over)
    assert out["applications"][0]["deployments"][0]["ray_actor_options"] == {"num_gpus": 1}


def test_worker_bounds_follow_the_gpu_deployment():
    cfg = apply_overrides(SAMPLE, OVERRIDES)
    assert gpu_worker_bounds(cfg, ClusterSpec()) == (1, 3)
    assert gpu_worker_bounds(cfg, ClusterSpec(min_workers=0, max_workers=8)) == (0, 8)
    half = apply_overrides(
        cfg, {"applications": {"cbserve": {"deployments": {"LLMReplica": {"ray_actor_options": {"num_gpus": 0.5}}}}}}
    )
    assert gpu_worker_bounds(half, ClusterSpec()) == (1, 2)  # two replicas share a GPU pod
    with pytest.raises(ValueError, match="asks for no GPU"):
        gpu_worker_bounds(SAMPLE, ClusterSpec())
    with pytest.raises(ValueError, match="min workers"):
        ClusterSpec(min_workers=3, max_workers=1)


ARGS_APP = {
    "applications": [
        {
            "name": "cbserve",
            "import_path": "deployments.app:build_app",
            "args": {"model": "tiny:llama", "num_replicas": 2, "num_gpus": "auto"},
            "deployments": [{"name": "OpenAIIngress"}, {"name": "LLMReplica"}],
        }
    ]
}


def _args_over(**args):
    return {"applications": {"cbserve": {"args": args}}}


def test_worker_bounds_from_build_app_args():
    """Without Serve-level options on LLMReplica, build_app's args decide, as they will in Serve."""
    pytest.importorskip("ray")
    with pytest.raises(ValueError, match="'auto'"):
        gpu_worker_bounds(ARGS_APP, ClusterSpec())
    fixed = apply_overrides(ARGS_APP, _args_over(num_gpus=1))
    assert replica_plan(fixed, ClusterSpec()) == ReplicaPlan(1.0, 2, 2)
    assert gpu_worker_bounds(fixed, ClusterSpec()) == (2, 2)
    scaled = apply_overrides(ARGS_APP, _args_over(num_gpus=1, autoscaling={"min_replicas": 0, "max_replicas": 5}))
    assert gpu_worker_bounds(scaled, ClusterSpec()) == (0, 5)
    with pytest.raises(ValueError, match="bad args for build_app"):
        gpu_worker_bounds(apply_overrides(ARGS_APP, _args_over(num_gpu=1)), ClusterSpec())
    # Serve-level options on the deployment win over the args, as Serve applies them.
    both = apply_overrides(
        scaled,
        {
            "applications": {
                "cbserve": {
                    "deployments": {
                        "LLMReplica": {"num_replicas": 3, "ray_actor_options": {"num_cpus": 1, "num_gpus": 2}}
                    }
                }
            }
        },
    )
    assert replica_plan(both, ClusterSpec()) == ReplicaPlan(2.0, 3, 3)
    # A replica's two GPUs must share a node: three pods of two GPUs, not six of one.
    assert gpu_worker_bounds(both, ClusterSpec()) == (3, 3)
    (group,) = build_rayservice(both, ClusterSpec())["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    two_apps = {
        "applications": [ARGS_APP["applications"][0] | {"deployments": []}, {"name": "b", "import_path": "x:y"}]
    }
    with pytest.raises(ValueError, match="no deployment 'LLMReplica'"):
        gpu_worker_bounds(two_apps, ClusterSpec())


def test_built_manifest_shape():
    cfg = apply_overrides(SAMPLE, OVERRIDES)
    rs = build_rayservice(cfg, ClusterSpec(image="registry.example/cbserve:1"))
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    assert yaml.safe_load(rs["spec"]["serveConfigV2"]) == cfg
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert rc["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (group,) = rc["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (1, 3, 1)
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["image"] == head["image"] == "registry.example/cbserve:1"


def test_every_node_starts_with_the_haproxy_front_of_the_apps_limits():
    """Ray reads the HTTP front's settings when a node starts: head and workers carry them, from
    the first app's limits (deployments/front_proxy.py)."""
    cfg = copy.deepcopy(apply_overrides(SAMPLE, OVERRIDES))
    cfg["applications"][0]["args"]["limits"] = {"client_timeout_s": 7, "max_connections": 900}
    rc = build_rayservice(cfg, ClusterSpec(image="x"))["spec"]["rayClusterConfig"]
    pods = [rc["headGroupSpec"], *rc["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e["value"] for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
        assert (env["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"], env["RAY_SERVE_HAPROXY_MAXCONN"]) == ("7", "900")
    default = build_rayservice(apply_overrides(SAMPLE, OVERRIDES), ClusterSpec(image="x"))["spec"]["rayClusterConfig"][
        "headGroupSpec"
    ]
    env = {e["name"]: e["value"] for e in default["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == "10" and env["RAY_SERVE_HAPROXY_MAXCONN"] == "4096"


def test_rendered_manifest_round_trips_and_validates(rayservice_validator):
    rs = build_rayservice(apply_overrides(SAMPLE, OVERRIDES), ClusterSpec())
    text = render(rs)
    assert text.startswith("# GENERATED")
    assert "serveConfigV2: |" in text  # a readable YAML block, not an escaped one-liner
    assert yaml.safe_load(text) == rs
    assert schema_errors(rayservice_validator, rs) == []


def test_strict_schema_catches_a_typo(rayservice_validator):
    """The validator is not vacuous: an unknown field and a wrong type are both reported."""
    rs = build_rayservice(apply_overrides(SAMPLE, OVERRIDES), ClusterSpec())
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    bad["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = "yes"
    errors = schema_errors(rayservice_validator, bad)
    assert any("maxReplica" in e for e in errors)
    assert any("enableInTreeAutoscaling" in e for e in errors)


def test_cli_writes_and_checks(tmp_path, capsys):
    dep, over, out = tmp_path / "deployments.yaml", tmp_path / "over.yaml", tmp_path / "rs.yaml"
    dep.write_text(yaml.safe_dump(SAMPLE))
    over.write_text(yaml.safe_dump(OVERRIDES))
    args = ["--deployments", str(dep), "--overrides", str(over), "--out", str(out)]
    assert main(args) == 0
    assert out.read_text() == generate(dep, over)
    assert main([*args, "--check"]) == 0
    out.write_text(out.read_text().replace("maxReplicas: 3", "maxReplicas: 9"))
    assert main([*args, "--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert main(["--deployments", str(tmp_path / "absent.yaml"), "--overrides", str(over), "--out", str(out)]) == 2


def test_load_yaml_rejects_non_mapping(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_yaml(p)
