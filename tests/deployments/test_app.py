"""build_app: argument validation and what it turns them into (no Ray cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from deployments.app import AppArgs, build_app
from deployments.ingress import IngressSettings
from deployments.llm import ReplicaUserConfig

ROOT = Path(__file__).resolve().parents[2]


def llm_deployment(app):
    ingress = app._bound_deployment
    (llm_app, settings) = ingress.init_args
    return ingress, llm_app._bound_deployment, settings


def test_defaults_build_the_two_deployment_graph():
    ingress, llm, settings = llm_deployment(build_app({}))
    assert ingress.name == "OpenAIIngress" and llm.name == "LLMReplica"
    assert settings == IngressSettings(model="default").model_dump()  # limits and auth at their defaults
    (engine_config,) = llm.init_args
    assert engine_config.model.model == "default" and engine_config.model.device == "auto"
    assert llm.num_replicas == 1
    # The engine's own queue decides 429: Serve must let one more than it holds through.
    sched = engine_config.scheduler
    assert llm.max_ongoing_requests == sched.max_num_seqs + sched.max_waiting + 1
    assert llm.user_config == ReplicaUserConfig().model_dump()  # reconfigure() gets validated settings


def test_replica_transport_reaches_the_ingress():
    assert llm_deployment(build_app({}))[2]["replica_transport"] == "grpc"
    assert llm_deployment(build_app({"replica_transport": "ray"}))[2]["replica_transport"] == "ray"
    with pytest.raises(pydantic.ValidationError):
        build_app({"replica_transport": "http"})


@pytest.mark.parametrize("fast_path", [True, False])
def test_grpc_transport_raises_the_message_cap_on_both_ends(fast_path):
    """Serve's gRPC between deployments refuses messages over 4 MiB unless both processes (the
    ingress sends and receives, the replica too) read a higher cap from their environment."""
    key = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
    ingress, llm, _ = llm_deployment(build_app({"serve_fast_path": fast_path}))
    for d in (ingress, llm):
        env = d.ray_actor_options["runtime_env"]["env_vars"]
        assert int(env[key]) >= 256 * 2**20
        assert ("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD" in env) == fast_path
    ingress, llm, _ = llm_deployment(build_app({"replica_transport": "ray", "serve_fast_path": False}))
    for d in (ingress, llm):
        assert "runtime_env" not in (d.ray_actor_options or {})


def test_engine_args_map_onto_the_frozen_engine_config():
    args = {
        "model": "tiny:llama",
        "served_model_name": "tiny",
        "engine": {
            "dtype": "float32",
            "max_model_len": 512,
            "block_size": 8,
            "num_blocks": 100,
            "max_num_seqs": 4,
            "max_waiting": 3,
            "attention_backend": "torch",
            "use_cuda_graphs": False,
        },
        "num_gpus": 1,
        "accelerator_resource": "fake_gpu",
        "max_ongoing_requests": 9,
        "replica": {"log_requests": True},
    }
    _ingress, llm, settings = llm_deployment(build_app(args))
    (cfg,) = llm.init_args
    assert (cfg.model.model, cfg.model.served_name, cfg.model.dtype, cfg.model.max_model_len) == (
        "tiny:llama",
        "tiny",
        "float32",
        512,
    )
    assert (cfg.cache.block_size, cfg.cache.num_blocks) == (8, 100)
    assert (cfg.scheduler.max_num_seqs, cfg.scheduler.max_waiting) == (4, 3)
    assert cfg.scheduler.max_num_batched_tokens == 2048  # unset: the engine's default
    assert (cfg.runner.attention_backend, cfg.runner.use_cuda_graphs) == ("torch", False)
    assert llm.ray_actor_options["num_gpus"] == 1 and llm.ray_actor_options["resources"] == {"fake_gpu": 1}
    assert llm.max_ongoing_requests == 9 and llm.user_config["log_requests"] is True
    assert settings["served_model_name"] == "tiny"


def test_num_gpus_auto_is_zero_without_gpus():
    assert AppArgs().resolved_num_gpus() == 0.0  # no Ray cluster with GPUs here
    assert AppArgs(num_gpus=0.5).resolved_num_gpus() == 0.5


def test_autoscaling_and_router_options_reach_serve():
    args = {
        "autoscaling": {
            "min_replicas": 1,
            "max_replicas": 3,
            "upscale_delay_s": 5,
            "policy": "deployments.autoscaling:QueueDepthAutoscalingPolicy",
            "policy_kwargs": {"target_requests_per_replica": 8},
        },
        "router": {"request_router_class": "router.kv_router:KVCacheAwareRouter", "request_routing_stats_period_s": 1},
    }
    _, llm, _ = llm_deployment(build_app(args))
    auto = llm._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.upscale_delay_s) == (1, 3, 5)
    assert auto.policy.policy_function == "deployments.autoscaling:QueueDepthAutoscalingPolicy"
    router = llm._deployment_config.request_router_config
    assert router.request_routing_stats_period_s == 1


def test_tensor_parallel_replica_is_one_placement_group_of_n_bundles():
    args = {
        "engine": {"tensor_parallel_size": 4},
        "num_gpus": 1,
        "num_cpus": 2,
        "accelerator_resource": "fake_gpu",
        "placement_strategy": "PACK",
        "autoscaling": {"policy": "deployments.autoscaling:QueueDepthAutoscalingPolicy"},
    }
    _, llm, _ = llm_deployment(build_app(args))
    (cfg,) = llm.init_args
    assert cfg.parallel.tensor_parallel_size == 4 and cfg.parallel.init_method is None
    replica = {"CPU": 2.0, "GPU": 1.0, "fake_gpu": 1.0}
    worker = {"CPU": 1.0, "GPU": 1.0, "fake_gpu": 1.0}
    assert llm._replica_config.placement_group_bundles == [replica, worker, worker, worker]
    assert llm._replica_config.placement_group_strategy == "PACK"
    # The autoscaler's "cannot place" warning names a whole replica's needs: every rank's GPU.
    policy = llm._deployment_config.autoscaling_config.policy
    assert policy.policy_kwargs["replica_resources"] == {"CPU": 5.0, "GPU": 4.0, "fake_gpu": 4.0}


def test_one_rank_replica_has_no_placement_group():
    _, llm, _ = llm_deployment(build_app({"num_gpus": 1}))
    (cfg,) = llm.init_args
    assert cfg.parallel.tensor_parallel_size == 1
    assert llm._replica_config.placement_group_bundles is None


@pytest.mark.parametrize(
    "args, words",
    [
        ({"modle": "x"}, "Extra inputs are not permitted"),
        ({"engine": {"max_num_seqs": 0}}, "greater than 0"),
        ({"engine": {"dtype": "int8"}}, "Input should be"),
        ({"engine": {"block_sizes": 16}}, "Extra inputs"),
        ({"autoscaling": {"min_replicas": 5, "max_replicas": 2}}, "min_replicas must be <= max_replicas"),
        ({"replica": {"drain_timeout_s": -1}}, "greater than or equal"),
        ({"num_gpus": "lots"}, "num_gpus"),
        ({"engine": {"tensor_parallel_size": 0}}, "greater than 0"),
        ({"placement_strategy": "ANYWHERE"}, "STRICT_PACK"),
        ({"num_gpus": 2}, "set engine.tensor_parallel_size"),
    ],
)
def test_bad_arguments_are_rejected_clearly(args, words):
    with pytest.raises(pydantic.ValidationError, match=words):
        build_app(args)


@pytest.mark.parametrize("name", ["deployments.yaml", "deployments.gpu.yaml"])
def test_shipped_configs_validate(name):
    cfg = yaml.safe_load((ROOT / name).read_text())
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(cfg)  # Serve's own schema for `serve run` / `serve deploy`
    (app,) = cfg["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    AppArgs.model_validate(app["args"])  # and our arguments
    assert {d["name"] for d in app["deployments"]} == {"OpenAIIngress", "LLMReplica"}
    if name == "deployments.yaml":
        assert app["args"]["model"] == "default" and app["args"]["num_gpus"] == "auto"
