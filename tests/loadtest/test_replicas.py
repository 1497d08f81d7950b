"""loadtest/replicas.py: parsing Serve's REST answer and Prometheus text; a failing source."""

from __future__ import annotations

import pytest

from loadtest.replicas import ReplicaSampler, parse_prometheus_gauge, parse_serve_details

DETAILS = {
    "applications": {
        "cbserve": {
            "deployments": {
                "LLMReplica": {
                    "target_num_replicas": 4,
                    "replicas": [{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "STARTING"}, {"state": "STOPPING"}],
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
