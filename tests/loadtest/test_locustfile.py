"""A real headless locust run against the project's ingress (fake engine): zero failures, the
custom latency rows in locust's CSV, a JSONL line per request, replica samples; and the step shape
with open-loop Poisson pacing."""

from __future__ import annotations

import csv
import json

from tests.loadtest.conftest import ROOT, SERVE_DETAILS, run_locust


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_succeeds_with_zero_failures(locust_run):
    locust_run.check()
    rows = _rows(f"{locust_run.prefix}_stats.csv")
    agg = next(r for r in rows if r["Name"] == "Aggregated")
    assert int(agg["Request Count"]) > 0, locust_run.proc.stdout + locust_run.proc.stderr
    assert agg["Failure Count"] == "0"
    assert _rows(f"{locust_run.prefix}_failures.csv") == []


def test_custom_metric_rows_per_endpoint(locust_run):
    locust_run.check()
    rows = _rows(f"{locust_run.prefix}_stats.csv")
    by = {(r["Type"], r["Name"]): r for r in rows}
    for endpoint in ("/v1/chat/completions", "/v1/completions"):
        for kind in ("TTFT", "TPOT", "ITL", "E2E", "POST"):
            assert (kind, endpoint) in by, f"missing {kind} row for {endpoint}"
        ttft, e2e = by[("TTFT", endpoint)], by[("E2E", endpoint)]
        assert int(ttft["Request Count"]) > 0 and ttft["Failure Count"] == "0"
        assert 0 < float(ttft["Average Response Time"]) <= float(e2e["Average Response Time"])
        # ITL: one row entry per gap, so more entries than requests (outputs are >= 4 tokens).
        assert int(by[("ITL", endpoint)]["Request Count"]) > int(e2e["Request Count"])
        # The E2E row's content size is the output token count, within --output-len uniform:4:12.
        assert 4 <= float(e2e["Average Content Size"]) <= 12


def test_jsonl_has_one_record_per_request(locust_run):
    locust_run.check()
    records = [json.loads(line) for line in locust_run.jsonl.read_text().splitlines()]
    requests = [r for r in records if r["type"] == "request"]
    assert len(requests) >= 60  # --max-requests 60 stopped the run (in-flight ones may finish too)
    assert all(r["ok"] and r["status"] == 200 for r in requests)
    for r in requests:
        assert r["tokens_from_usage"] is True
        assert r["output_tokens"] == r["max_tokens"]  # ignore_eos: exact lengths
        assert 4 <= r["max_tokens"] <= 12 and 8 <= r["target_input_len"] <= 32
        assert 0 < r["ttft"] <= r["e2e"]
        assert r["tpot"] == (r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1)
        assert r["itl_stats"]["n"] == r["output_tokens"] - 1  # one text chunk per token here
        assert r["prompt_tokens"] > 0
    # Locust's final CSV agrees with the JSONL (the locustfile waits for its last rewrite).
    rows = _rows(f"{locust_run.prefix}_stats.csv")
    posts = sum(int(r["Request Count"]) for r in rows if r["Type"] == "POST")
    assert posts == len(requests)


def test_replica_samples_in_jsonl(locust_run):
    locust_run.check()
    samples = [json.loads(line) for line in locust_run.jsonl.read_text().splitlines()]
    samples = [s for s in samples if s["type"] == "replicas"]
    assert samples
    want = SERVE_DETAILS["applications"]["cbserve"]["deployments"]["LLMReplica"]
    for s in samples:
        assert s["source"] == "serve-api"
        assert s["deployments"] == {"cbserve/LLMReplica": {"running": 2, "target": want["target_num_replicas"]}}


def test_step_shape_with_poisson_pacing(openai_server, tmp_path):
    prefix = tmp_path / "shape"
    proc = run_locust(
        [
            f"{ROOT / 'loadtest' / 'locustfile.py'},{ROOT / 'loadtest' / 'shape.py'}",
            "-H",
            openai_server,
            "--csv",
            str(prefix),
            "--csv-full-history",
            "ChatUser",
            "--shape-levels",
            "1,3",
            "--shape-step-time",
            "2",
            "--shape-hold-time",
            "3",
            "--pacing",
            "poisson",
            "--request-rate",
            "20",
            "--output-len",
            "fixed:4",
            "--input-len",
            "fixed:8",
            "--length-control",
            "min_tokens",
            "--replica-source",
            "none",
            "--itl-events",
            "request",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    history = [r for r in _rows(f"{prefix}_stats_history.csv") if r["Name"] == "Aggregated"]
    users = [int(r["User Count"]) for r in history]
    assert max(users) == 3, users  # stepped up to the peak ...
    assert 1 in users[users.index(3) :], users  # ... and back down before the shape ended the test
    requests = [json.loads(line) for line in (tmp_path / "shape_requests.jsonl").read_text().splitlines()]
    assert requests and all(
        r["ok"] and r["output_tokens"] == 4 and r["endpoint"] == "/v1/chat/completions" for r in requests
    )
    stats = {(r["Type"], r["Name"]): r for r in _rows(f"{prefix}_stats.csv")}
    # --itl-events request: one ITL entry per request, not per gap.
    assert (
        stats[("ITL", "/v1/chat/completions")]["Request Count"]
        == stats[("E2E", "/v1/chat/completions")]["Request Count"]
    )


def test_bad_option_is_a_clear_error(openai_server, tmp_path):
    proc = run_locust(
        [str(ROOT / "loadtest" / "locustfile.py"), "-H", openai_server, "-t", "1s", "--output-len", "gauss:3"],
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "bad --output-len spec 'gauss:3'" in proc.stderr


def test_against_the_real_engine(real_engine_server, tmp_path):
    """The project's ingress + replica logic + AsyncEngine (tiny:llama on CPU), no fakes: real
    detokenized chunks, real usage counts, ignore_eos honoured by the engine."""
    prefix = tmp_path / "real"
    proc = run_locust(
        [
            str(ROOT / "loadtest" / "locustfile.py"),
            "-H",
            real_engine_server,
            "-u",
            "2",
            "-r",
            "2",
            "-t",
            "120s",
            "--max-requests",
            "6",
            "--csv",
            str(prefix),
            "--input-len",
            "dataset",
            "--output-len",
            "fixed:12",
            "--replica-source",
            "none",
            "ChatUser",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    requests = [json.loads(line) for line in (tmp_path / "real_requests.jsonl").read_text().splitlines()]
    assert len(requests) >= 6
    for r in requests:
        assert r["ok"], r
        assert r["tokens_from_usage"] and r["output_tokens"] == 12  # exact length despite EOS
        assert r["prompt_tokens"] > 5 and 0 < r["ttft"] < r["e2e"] and r["tpot"] > 0
    rows = {(r["Type"], r["Name"]): r for r in _rows(f"{prefix}_stats.csv")}
    for kind in ("TTFT", "TPOT", "E2E"):
        assert int(rows[(kind, "/v1/chat/completions")]["Request Count"]) == len(requests)
        assert rows[(kind, "/v1/chat/completions")]["Failure Count"] == "0"


def test_api_key_is_sent(tmp_path):
    """Against an ingress that requires API keys: --api-key passes, its absence is a 401 failure."""
    from deployments.auth import AuthSettings
    from deployments.ingress import IngressSettings, OpenAIService, build_api
    from tests.loadtest.conftest import FakeLLMClient, WordTokenizer, serve_in_thread

    key = "lt-test-key-0123456789"
    settings = IngressSettings(model="fake", auth=AuthSettings(api_keys=(key,), api_keys_env=None))
    url, server, thread = serve_in_thread(build_api(OpenAIService(FakeLLMClient(), WordTokenizer(), settings)))
    try:
        common = [
            str(ROOT / "loadtest" / "locustfile.py"),
            "-H",
            url,
            "-u",
            "1",
            "-t",
            "60s",
            "--max-requests",
            "3",
            "--model",
            "fake",
            "--output-len",
            "fixed:3",
            "--input-len",
            "fixed:4",
            "--replica-source",
            "none",
            "ChatUser",
        ]
        ok = run_locust([*common, "--api-key", key, "--csv", str(tmp_path / "ok")], cwd=tmp_path)
        assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
        denied = run_locust([*common, "--csv", str(tmp_path / "denied")], cwd=tmp_path)
        assert denied.returncode != 0
        failures = _rows(tmp_path / "denied_failures.csv")
        assert failures and "HTTP 401" in failures[0]["Error"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
