"""loadtest/replicas.py: parsing Serve's REST answer and Prometheus text; a failing source."""

from __future__ import annotations

import pytest

from loadtest.replicas import ReplicaSampler, parse_prometheus_gauge, parse_serve_details, ray_auth_token

DETAILS = {
    "applications": {
        "cbserve": {
            "deployments": {
                "LLMReplica": {
                    "target_num_replicas": 4,
                    "replicas": [
                        {"state": "RUNNING"},
                        {"state": "RUNNING"},
                        {"state": "STARTING"},
                        {"state": "STOPPING"},
                    ],
                },
                "OpenAIIngress": {"target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]},
            }
        },
        "other": {"deployments": {"LLMReplica": {"replicas": []}}},
    }
}


def test_serve_details_counts_running_and_target():
    assert parse_serve_details(DETAILS) == {
        "cbserve/LLMReplica": {"running": 2, "target": 4},
        "cbserve/OpenAIIngress": {"running": 1, "target": 1},
        "other/LLMReplica": {"running": 0, "target": 0},
    }
    assert set(parse_serve_details(DETAILS, ["LLMReplica"])) == {"cbserve/LLMReplica", "other/LLMReplica"}
    assert parse_serve_details({"applications": {}}) == {}


PROM = """# HELP ray_serve_deployment_replica_healthy Whether the replica is healthy.
# TYPE ray_serve_deployment_replica_healthy gauge
ray_serve_deployment_replica_healthy{deployment="LLMReplica",replica="a"} 1.0
ray_serve_deployment_replica_healthy{deployment="LLMReplica",replica="b"} 1.0
ray_serve_deployment_replica_healthy_extra{deployment="LLMReplica"} 7.0
plain_gauge 3
"""


def test_prometheus_gauge_sums_samples_of_exactly_that_metric():
    assert parse_prometheus_gauge(PROM, "ray_serve_deployment_replica_healthy") == 2.0
    assert parse_prometheus_gauge(PROM, "plain_gauge") == 3.0
    assert parse_prometheus_gauge(PROM, "absent") is None


def test_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="serve-api or metrics"):
        ReplicaSampler("dashboard", "http://x", print)
    with pytest.raises(ValueError, match="metric name"):
        ReplicaSampler("metrics", "http://x", print)
    with pytest.raises(ValueError, match="interval"):
        ReplicaSampler("serve-api", "http://x", print, interval=0)


def test_unreachable_source_gives_no_sample(caplog):
    # Port 9 on localhost: nothing listens (connection refused at once).
    s = ReplicaSampler("serve-api", "http://127.0.0.1:9/api/serve/applications/", print, timeout=2)
    assert s.sample_once() is None
    assert s.sample_once() is None
    assert sum("replica sampling" in r.message for r in caplog.records) == 1  # warned once only


def test_token_lookup_order(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    local, remote = "http://127.0.0.1:8265/api/serve/applications/", "http://10.1.2.3:8265/x"
    assert ray_auth_token(local) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert ray_auth_token(local) == "home-token"
    assert ray_auth_token(remote) is None  # the local token never goes to another host unasked
    token_file = tmp_path / "tok"
    token_file.write_text("file-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert ray_auth_token(remote) == "file-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert ray_auth_token(remote) == "env-token"
    assert ray_auth_token(remote, "flag-token") == "flag-token"


def test_sampler_sends_the_token_and_explains_401(monkeypatch, caplog):
    import requests

    seen = {}

    class Resp:
        status_code = 401

    def fake_get(url, timeout, headers):
        seen.update(headers)
        return Resp()

    monkeypatch.setattr(requests, "get", fake_get)
    s = ReplicaSampler("serve-api", "http://127.0.0.1:1/api/serve/applications/", print, token="abc")
    assert s.sample_once() is None
    assert seen == {"Authorization": "Bearer abc"}
    assert "auth token" in caplog.text
