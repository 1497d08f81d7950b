"""The HTTP front's settings (deployments/front_proxy.py): environment from limits, and what the
ingress says about the front it got."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from deployments.front_proxy import Front, config_limits, describe_front, front_env
from deployments.limits import RequestLimits


def test_env_carries_the_limits():
    env = front_env(RequestLimits(client_timeout_s=7, max_connections=900))
    assert env == {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "7",
        "RAY_SERVE_HAPROXY_MAXCONN": "900",
    }
    assert Front.of(env) == Front(True, 7, 900)


@pytest.mark.parametrize("bad", [{"client_timeout_s": 0}, {"max_connections": -1}, {"client_timeout_s": 1.5}])
def test_bad_values_are_refused(bad):
    with pytest.raises(ValidationError):
        RequestLimits(**bad)


def test_the_ingress_says_which_front_it_got():
    lim = RequestLimits()
    ok, msg = describe_front(lim, Front.of(front_env(lim)))
    assert ok and "HAProxy, client timeout 10 s, at most 4096 connections" in msg
    ok, msg = describe_front(lim, Front.of({}))
    assert not ok and "Serve's Python proxy" in msg and "not enforced" in msg
    half = {**front_env(lim), "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}  # HAProxy needs direct ingress
    assert not describe_front(lim, Front.of(half))[0]
    ok, msg = describe_front(RequestLimits(client_timeout_s=30), Front.of(front_env(lim)))
    assert not ok and "10 s" in msg and "30 s" in msg


def test_cli_prints_exports_for_a_configs_limits(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("applications:\n  - args:\n      limits: {client_timeout_s: 5}\n")
    assert config_limits(cfg).client_timeout_s == 5
    out = subprocess.run(
        [sys.executable, "-m", "deployments.front_proxy", str(cfg)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert "export RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S=5" in out and "export RAY_SERVE_HAPROXY_MAXCONN=4096" in out
    (tmp_path / "bad.yaml").write_text("applications:\n  - args:\n      limits: {client_timeout: 5}\n")
    bad = subprocess.run(
        [sys.executable, "-m", "deployments.front_proxy", str(tmp_path / "bad.yaml")], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "client_timeout" in bad.stderr
