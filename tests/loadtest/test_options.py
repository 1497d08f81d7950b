"""loadtest/options.py: locust flags, env vars and validation."""

from __future__ import annotations

import argparse

import pytest

from loadtest.options import LoadTestOptions, add_arguments


def _parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return LoadTestOptions.from_namespace(p.parse_args(argv))


def test_defaults():
    o = _parse([])
    assert o.pacing == "closed" and o.length_control == "ignore_eos" and o.itl_events == "token"
    assert o.output_len.kind == "fixed" and o.output_len.low == 128
    assert o.replica_source == "serve-api" and o.replica_deployments == ()
    assert not o.itl_list


def test_flags():
    o = _parse(
        [
            "--pacing",
            "poisson",
            "--request-rate",
            "2.5",
            "--input-len",
            "dataset",
            "--output-len",
            "dataset",
            "--itl-list",
            "--replica-deployments",
            "LLMReplica, OpenAIIngress",
        ]
    )
    assert o.pacing == "poisson" and o.request_rate == 2.5 and o.itl_list
    assert o.input_len.kind == o.output_len.kind == "dataset"
    assert o.replica_deployments == ("LLMReplica", "OpenAIIngress")


def test_env_vars_set_defaults(monkeypatch):
    monkeypatch.setenv("CBSERVE_LT_OUTPUT_LEN", "fixed:16")
    monkeypatch.setenv("CBSERVE_LT_ITL_LIST", "true")
    monkeypatch.setenv("CBSERVE_LT_REQUEST_RATE", "3")
    o = _parse([])
    assert o.output_len.low == 16 and o.itl_list and o.request_rate == 3.0
    assert _parse(["--output-len", "fixed:2"]).output_len.low == 2  # a flag beats the env
    # Without a parser (library use) the env vars still apply.
    assert LoadTestOptions.from_namespace(None).output_len.low == 16


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--pacing", "burst"], "--pacing must be one of"),
        (["--length-control", "eos"], "--length-control"),
        (["--pacing", "poisson", "--request-rate", "0"], "--request-rate"),
        (["--replica-source", "metrics"], "--replica-metric"),
        (["--max-inflight", "0"], "--max-inflight"),
        (["--input-len", "uniform:5:1"], "--input-len"),
    ],
)
def test_bad_values(argv, match):
    with pytest.raises(ValueError, match=match):
        _parse(argv)
