"""Session-wide test setup: offline hub, CPU threads, and one Ray cluster per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _front_env() -> None:
    """The HTTP front the app ships with (deployments/front_proxy.py: HAProxy before the ingress
    replicas), unless CBSERVE_TEST_FRONT=serve-proxy asks for Serve's own proxy. HAProxy's stats,
    metrics and fallback ports are fixed by default: free ones, so test runs side by side do not clash."""
    from deployments.front_proxy import front_env
    from deployments.limits import RequestLimits

    if os.environ.get("CBSERVE_TEST_FRONT", "haproxy") != "haproxy":
        return
    os.environ.update(front_env(RequestLimits()))
    for var in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"):
        os.environ.setdefault(var, str(_free_port()))


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole test session (CPU, with fake GPU resources for placement)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        _front_env()
        ray.init(
            num_cpus=8,  # logical CPUs: replicas and proxies reserve CPUs, the box has 2 real cores
            num_gpus=0,
            resources={"fake_gpu": 4},
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
            # Replica processes share 2 real cores: one BLAS thread each avoids oversubscription.
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_session) -> str:
    """Serve's HTTP proxy for this session, on a free port (pytest runs side by side must not
    fight over 8000); returns its base URL. Modules deploy their own apps and delete them."""
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    return f"http://127.0.0.1:{_get_global_client().http_config.port}"


@pytest.fixture(scope="session")
def deploy_app(serve_url):
    """Returns ``deploy(apps, timeout_s=300)``: runs each ``{name: (args, route_prefix)}`` with
    ``build_app`` and waits until all are RUNNING, failing at once on DEPLOY_FAILED."""
    import time

    from ray import serve

    from deployments.app import build_app

    def deploy(apps: dict[str, tuple[dict, str]], timeout_s: float = 300.0) -> None:
        for name, (args, prefix) in apps.items():
            serve.run(build_app(args), name=name, route_prefix=prefix, blocking=False)
        deadline = time.monotonic() + timeout_s
        while True:
            statuses = {n: serve.status().applications[n].status for n in apps}
            failed = {n: s for n, s in statuses.items() if str(getattr(s, "value", s)) == "DEPLOY_FAILED"}
            assert not failed, f"deploy failed: {serve.status().applications}"
            if all(str(getattr(s, "value", s)) == "RUNNING" for s in statuses.values()):
                return
            assert time.monotonic() < deadline, f"applications did not start within {timeout_s}s: {statuses}"
            time.sleep(1)

    return deploy
