"""Sample the Serve replica count during a load test, so the report can plot autoscaling.

Two sources:

- ``serve-api`` (default): Ray's Serve REST API on the dashboard,
  ``GET <dashboard>/api/serve/applications/`` -- the same call ``serve status`` makes. It
  gives, per deployment, the replicas in state RUNNING and the autoscaler's target. The
  dashboard listens on port 8265 of the head node (``serve run`` starts it locally; on
  KubeRay, port-forward the head service's 8265).
- ``metrics``: a Prometheus text endpoint (for example the ingress's ``/metrics``); the
  samples of one named gauge are summed.

Ray >= 2.5x starts local clusters with token authentication on: the dashboard then wants
``Authorization: Bearer <token>``. The token is taken from ``--replica-token``, else
``$RAY_AUTH_TOKEN``, else the file at ``$RAY_AUTH_TOKEN_PATH``, else (only for a dashboard on
this machine) ``~/.ray/auth_token`` -- the places Ray itself looks (``ray get-auth-token``).

Samples go into the request JSONL as ``{"type": "replicas", ...}`` lines.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


def parse_serve_details(payload: dict[str, Any], deployments: Iterable[str] = ()) -> dict[str, dict[str, int]]:
    """``{"app/deployment": {"running": n, "target": m}}`` from a ServeInstanceDetails JSON.

    ``deployments`` filters by deployment name (empty: all deployments).
    """
    wanted = set(deployments)
    out: dict[str, dict[str, int]] = {}
    for app_name, app in (payload.get("applications") or {}).items():
        for dep_name, dep in (app.get("deployments") or {}).items():
            if wanted and dep_name not in wanted:
                continue
            replicas = dep.get("replicas") or []
            running = sum(1 for r in replicas if r.get("state") == "RUNNING")
            target = dep.get("target_num_replicas")
            out[f"{app_name}/{dep_name}"] = {
                "running": running,
                "target": int(target) if target is not None else running,
            }
    return out


def parse_prometheus_gauge(text: str, metric: str) -> float | None:
    """Sum of all samples of ``metric`` (any labels) in Prometheus text format; None if absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_end = len(metric)
        if not line.startswith(metric) or (len(line) > name_end and line[name_end] not in "{ "):
            continue
        try:
            value = line.rsplit("}", 1)[-1].split()[0] if "{" in line else line.split()[1]
            total += float(value)
            seen = True
        except (IndexError, ValueError):
            continue
    return total if seen else None


def ray_auth_token(url: str, explicit: str = "") -> str | None:
    """The Ray dashboard token for ``url``, looked up like Ray does (see the module docstring)."""
    if explicit:
        return explicit
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not path and urlsplit(url).hostname in {"127.0.0.1", "localhost", "::1"}:
        path = str(Path.home() / ".ray" / "auth_token")  # never sent to another host unasked
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


class ReplicaSampler:
    """Polls one source every ``interval`` seconds and hands each sample to ``sink``.

    Runs under locust's gevent (``requests`` and ``time.sleep`` are monkey-patched), so a plain
    loop is a cooperative greenlet. A failing source is logged once, then retried quietly.
    """

    def __init__(
        self,
        source: str,
        url: str,
        sink: Callable[[dict[str, Any]], None],
        *,
        metric: str = "",
        deployments: Iterable[str] = (),
        interval: float = 2.0,
        timeout: float = 5.0,
        token: str | None = None,
    ) -> None:
        if source not in {"serve-api", "metrics"}:
            raise ValueError(f"replica source must be serve-api or metrics, got {source!r}")
        if source == "metrics" and not metric:
            raise ValueError("replica source 'metrics' needs a metric name (--replica-metric)")
        if interval <= 0:
            raise ValueError("replica sample interval must be > 0")
        self.source, self.url, self.sink = source, url, sink
        self.metric, self.deployments = metric, tuple(deployments)
        self.interval, self.timeout = interval, timeout
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._warned = False

    def sample_once(self) -> dict[str, Any] | None:
        import requests

        try:
            resp = requests.get(self.url, timeout=self.timeout, headers=self.headers)
            if resp.status_code in (401, 403):
                raise PermissionError(
                    f"HTTP {resp.status_code}: the Ray dashboard wants its auth token "
                    "(--replica-token or RAY_AUTH_TOKEN; `ray get-auth-token` prints it)"
                )
            resp.raise_for_status()
            if self.source == "serve-api":
                counts = parse_serve_details(resp.json(), self.deployments)
            else:
                value = parse_prometheus_gauge(resp.text, self.metric)
                if value is None:
                    raise ValueError(f"metric {self.metric!r} not found at {self.url}")
                counts = {self.metric: {"running": int(value), "target": int(value)}}
        except Exception as e:
            if not self._warned:
                log.warning("replica sampling from %s failed (%s); retrying quietly", self.url, e)
                self._warned = True
            return None
        return {"type": "replicas", "ts": time.time(), "source": self.source, "deployments": counts}

    def run(self) -> None:
        while True:
            sample = self.sample_once()
            if sample is not None:
                self.sink(sample)
            time.sleep(self.interval)
