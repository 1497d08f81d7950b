"""Generate k8s/rayservice.yaml from deployments.yaml, the one source of the Serve config.

    python k8s/generate.py            # write k8s/rayservice.yaml
    python k8s/generate.py --check    # exit 1 if the committed manifest is stale (CI)

serveConfigV2 is deployments.yaml deep-merged with k8s/gpu_overrides.yaml (the documented
GPU differences, e.g. ``num_gpus: 1`` per LLM replica). The cluster around it:

- every container: the HTTP front's environment (HAProxy before the ingress replicas, bounded
  by the app's ``limits``; deployments/front_proxy.py);
- head: ``num-cpus: 0`` and ``num-gpus: 0``, so the Serve controller and proxy live there
  but no replica (every deployment asks for CPU or GPU) is ever scheduled on it;
- one GPU worker group, ``nvidia.com/gpu`` per pod = one replica's GPUs (``num_gpus`` x
  ``engine.tensor_parallel_size``: a tensor-parallel replica's ranks share a node under
  STRICT_PACK), minReplicas/maxReplicas derived from
  the GPU deployment's replica range (build_app's ``autoscaling`` args, or the deployment's
  own options) times its GPUs per replica, so Serve's autoscaler drives KubeRay's in-tree
  autoscaler (``enableInTreeAutoscaling: true``), which adds and removes GPU pods.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEPLOYMENTS = ROOT / "deployments.yaml"
DEFAULT_OVERRIDES = ROOT / "k8s" / "gpu_overrides.yaml"
DEFAULT_OUT = ROOT / "k8s" / "rayservice.yaml"
RAY_VERSION = "2.60.0"  # must match the Dockerfile's base image tag and the Ray in pyproject


@dataclass(frozen=True)
class ClusterSpec:
    """The Kubernetes side of the RayService; the Serve side comes from deployments.yaml."""

    name: str = "cbserve"
    image: str = "cbserve:0.1.0"
    ray_version: str = RAY_VERSION
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    worker_cpu: str = "8"
    worker_memory: str = "32Gi"
    worker_group: str = "gpu-workers"
    gpu_deployment: str = "LLMReplica"
    min_workers: int | None = None  # None: from the GPU deployment's min_replicas x num_gpus
    max_workers: int | None = None  # None: from its max_replicas x num_gpus
    idle_timeout_s: int = 120

    def __post_init__(self) -> None:
        for n in (self.min_workers, self.max_workers):
            if n is not None and n < 0:
                raise ValueError("worker counts must be >= 0")
        if self.min_workers is not None and self.max_workers is not None and self.min_workers > self.max_workers:
            raise ValueError("min workers must be <= max workers")


# ---------------------------------------------------------------- serve config


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise FileNotFoundError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a YAML mapping")
    return data


def _app_name(app: dict[str, Any]) -> str:
    return app.get("name", "default")  # Serve's name for an unnamed application


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _merge_named(items: list[dict[str, Any]], overrides: dict[str, Any], what: str, key: Any) -> list[dict[str, Any]]:
    by_name = {key(it): i for i, it in enumerate(items)}
    out = list(items)
    for name, over in overrides.items():
        if name not in by_name:
            raise ValueError(f"gpu overrides name {what} {name!r}, but deployments.yaml has {sorted(by_name)}")
        out[by_name[name]] = _merge(items[by_name[name]], over)
    return out


def apply_overrides(serve_config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """deployments.yaml + gpu_overrides.yaml -> serveConfigV2 (inputs are not modified)."""
    overrides = copy.deepcopy(overrides or {})
    app_overrides = overrides.pop("applications", {}) or {}
    out = _merge(serve_config, overrides)
    if app_overrides:
        apps = serve_config.get("applications")
        if not isinstance(apps, list):
            raise ValueError("deployments.yaml needs an 'applications' list")
        merged = []
        for app in _merge_named(apps, {k: {} for k in app_overrides}, "application", _app_name):
            over = copy.deepcopy(app_overrides.get(_app_name(app), {}))
            dep_over = over.pop("deployments", {}) or {}
            app = _merge(app, over)
            if dep_over:
                app["deployments"] = _merge_named(
                    app.get("deployments") or [], dep_over, "deployment", lambda d: d.get("name")
                )
            merged.append(app)
        out["applications"] = merged
    return out


@dataclass(frozen=True)
class ReplicaPlan:
    """What the GPU deployment asks of the cluster: GPUs per replica and its replica range."""

    gpus_per_replica: float
    min_replicas: int
    max_replicas: int


def _app_args(app: dict[str, Any]) -> Any:
    """The application's args through build_app's own validation (unknown keys are errors)."""
    if str(ROOT) not in sys.path:  # run as `python k8s/generate.py`
        sys.path.insert(0, str(ROOT))
    from deployments.app import AppArgs  # lazy: imports Ray Serve

    try:
        return AppArgs.model_validate(app.get("args") or {})
    except Exception as e:  # pydantic's ValidationError: show it as a config error
        raise ValueError(f"application {_app_name(app)!r}: bad args for build_app: {e}") from e


def replica_plan(serve_config: dict[str, Any], spec: ClusterSpec) -> ReplicaPlan:
    """Read the GPU deployment's needs the way Serve will: options in its ``deployments:``
    entry win (Serve replaces the code's ray_actor_options/num_replicas with them); otherwise
    build_app's args decide (num_gpus, autoscaling or num_replicas)."""
    apps = serve_config.get("applications") or []
    named = [(a, d) for a in apps for d in a.get("deployments") or [] if d.get("name") == spec.gpu_deployment]
    if named:
        app, dep = named[0]
    elif len(apps) == 1:
        app, dep = apps[0], {}
    else:
        raise ValueError(
            f"no deployment {spec.gpu_deployment!r} in the Serve config (the GPU worker group is sized from it)"
        )
    args = None
    if isinstance(dep.get("placement_group_bundles"), list):  # all of a replica's bundles share its pod
        gpus = sum(float((b or {}).get("GPU", 0)) for b in dep["placement_group_bundles"])
    elif "ray_actor_options" in dep:
        gpus = float((dep["ray_actor_options"] or {}).get("num_gpus", 0))
    else:
        args = _app_args(app)
        if args.num_gpus == "auto":
            raise ValueError("num_gpus is 'auto': the manifest needs a number (set it in k8s/gpu_overrides.yaml)")
        # Tensor parallelism: num_gpus per rank, all ranks of a replica in one placement group.
        gpus = float(args.num_gpus) * (args.engine.tensor_parallel_size or 1)
    if gpus <= 0:
        raise ValueError(f"deployment {spec.gpu_deployment!r} asks for no GPU; the overrides should set num_gpus")
    if isinstance(dep.get("autoscaling_config"), dict):
        auto = dep["autoscaling_config"]
        lo, hi = int(auto.get("min_replicas", 1)), int(auto.get("max_replicas", 1))
    elif "num_replicas" in dep:
        if dep["num_replicas"] == "auto":
            raise ValueError("num_replicas 'auto' has no fixed bounds; give autoscaling_config min/max")
        lo = hi = int(dep["num_replicas"])
    else:
        args = args or _app_args(app)
        if args.autoscaling is not None:
            lo, hi = args.autoscaling.min_replicas, args.autoscaling.max_replicas
        else:
            lo = hi = args.num_replicas
    return ReplicaPlan(gpus, lo, hi)


def gpus_per_pod(plan: ReplicaPlan) -> int:
    """A replica's GPUs must sit on one node, so a worker pod holds ceil(num_gpus) of them (at least 1)."""
    return max(1, math.ceil(plan.gpus_per_replica))


def gpu_worker_bounds(serve_config: dict[str, Any], spec: ClusterSpec) -> tuple[int, int]:
    """Worker pods (``gpus_per_pod`` GPUs each) at the GPU deployment's min and max replica count."""
    plan = replica_plan(serve_config, spec)
    per_pod = gpus_per_pod(plan)

    def pods(n: int) -> int:  # replicas with fractional GPUs share a pod
        return -(-round(n * plan.gpus_per_replica * 1000) // (1000 * per_pod))

    return (
        spec.min_workers if spec.min_workers is not None else pods(plan.min_replicas),
        spec.max_workers if spec.max_workers is not None else pods(plan.max_replicas),
    )


# ---------------------------------------------------------------- manifest


def front_env_of(serve_config: dict[str, Any]) -> dict[str, str]:
    """HAProxy before the ingress replicas, bounded by the first app's ``limits``
    (deployments/front_proxy.py); Ray reads it when each node starts."""
    from deployments.front_proxy import front_env, limits_of

    return front_env(limits_of(serve_config))


def _container(
    spec: ClusterSpec,
    name: str,
    cpu: str,
    memory: str,
    gpus: int,
    ports: list[dict[str, Any]],
    env: dict[str, str],
) -> dict[str, Any]:
    limits: dict[str, str] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    c: dict[str, Any] = {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"limits": limits, "requests": dict(limits)},
        "env": [
            {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
            {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
            *({"name": k, "value": v} for k, v in env.items()),
        ],
        # Ray's object store and NCCL want a large /dev/shm; the container default is 64 MiB.
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if ports:
        c["ports"] = ports
    return c


def build_rayservice(serve_config_v2: dict[str, Any], spec: ClusterSpec) -> dict[str, Any]:
    min_w, max_w = gpu_worker_bounds(serve_config_v2, spec)
    shm = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    head_ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": 8000, "name": "serve"},
    ]
    per_pod = gpus_per_pod(replica_plan(serve_config_v2, spec))
    env = front_env_of(serve_config_v2)
    worker = _container(
        spec,
        "ray-worker",
        spec.worker_cpu,
        spec.worker_memory,
        per_pod,
        [{"containerPort": 8000, "name": "serve"}],
        env,
    )
    worker["lifecycle"] = {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": spec.name, "labels": {"app.kubernetes.io/name": spec.name}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config_v2, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": spec.ray_version,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": spec.idle_timeout_s,
                    "resources": {
                        "limits": {"cpu": "500m", "memory": "512Mi"},
                        "requests": {"cpu": "500m", "memory": "512Mi"},
                    },
                },
                "headGroupSpec": {
                    # No replica may land on the head: it offers no CPU and no GPU to Ray.
                    "rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": {
                        "spec": {
                            "containers": [
                                _container(spec, "ray-head", spec.head_cpu, spec.head_memory, 0, head_ports, env)
                            ],
                            "volumes": shm,
                        }
                    },
                },
                "workerGroupSpecs": [
                    {
                        "groupName": spec.worker_group,
                        "replicas": min_w,
                        "minReplicas": min_w,
                        "maxReplicas": max_w,
                        "rayStartParams": {},
                        "template": {
                            "spec": {
                                "containers": [worker],
                                "volumes": shm,
                                "tolerations": [
                                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                                ],
                            }
                        },
                    }
                ],
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # plain repeated blocks read better in a manifest than &id001 anchors


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None  # serveConfigV2 reads as YAML, not one escaped line
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)

HEADER = (
    "# GENERATED by k8s/generate.py from deployments.yaml + k8s/gpu_overrides.yaml; do not edit.\n"
    '# Regenerate: python k8s/generate.py   (README: "Run on Kubernetes")\n'
)


def render(rayservice: dict[str, Any]) -> str:
    return HEADER + yaml.dump(rayservice, Dumper=_Dumper, sort_keys=False, width=120)


def generate(
    deployments: Path = DEFAULT_DEPLOYMENTS, overrides: Path = DEFAULT_OVERRIDES, spec: ClusterSpec | None = None
) -> str:
    serve_config = apply_overrides(load_yaml(deployments), load_yaml(overrides))
    return render(build_rayservice(serve_config, spec or ClusterSpec()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deployments", type=Path, default=DEFAULT_DEPLOYMENTS)
    p.add_argument("--overrides", type=Path, default=DEFAULT_OVERRIDES)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--image", default=ClusterSpec.image, help="container image built from k8s/Dockerfile")
    p.add_argument("--name", default=ClusterSpec.name, help="RayService name")
    p.add_argument("--min-workers", type=int, help="GPU pods at least (default: from the LLM deployment)")
    p.add_argument("--max-workers", type=int, help="GPU pods at most (default: from the LLM deployment)")
    p.add_argument("--check", action="store_true", help="don't write; exit 1 if --out differs")
    args = p.parse_args(argv)
    try:
        spec = ClusterSpec(name=args.name, image=args.image, min_workers=args.min_workers, max_workers=args.max_workers)
        text = generate(args.deployments, args.overrides, spec)
    except (ValueError, FileNotFoundError) as e:
        print(f"generate: {e}", file=sys.stderr)
        return 2
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            sys.stdout.writelines(
                difflib.unified_diff(current.splitlines(True), text.splitlines(True), str(args.out), "generated")
            )
            print(f"\n{args.out} is stale: run python k8s/generate.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
