"""Load-test settings: locust custom arguments, each also readable from an env var.

Every flag ``--foo-bar`` can also be set as ``CBSERVE_LT_FOO_BAR`` or in a locust.conf file.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from loadtest.workload import DEFAULT_PROMPT_FILE, LengthSpec

ENV_PREFIX = "CBSERVE_LT_"

# (flag, default, type, help); the env var is derived from the flag.
_ARGS: tuple[tuple[str, Any, type, str], ...] = (
    ("--api-key", "", str, "sent as Authorization: Bearer <key> when the service requires API keys"),
    ("--model", "", str, "model name sent in requests; empty: the first id from GET /v1/models"),
    ("--input-len", "uniform:32:256", str, "prompt length: fixed:N | uniform:LO:HI | dataset"),
    ("--output-len", "fixed:128", str, "output length: fixed:N | uniform:LO:HI | dataset"),
    ("--prompt-file", str(DEFAULT_PROMPT_FILE), str, "prompt set (JSON list of {prompt, output_len}) for 'dataset'"),
    ("--shared-prefix-len", 0, int, "words of one shared prefix put before every prompt (exercises prefix caching)"),
    ("--length-control", "ignore_eos", str, "how outputs reach max_tokens: ignore_eos | min_tokens | none"),
    ("--temperature", 0.0, float, "sampling temperature"),
    ("--pacing", "closed", str, "closed: each user waits for its reply | poisson: open-loop Poisson arrivals"),
    ("--request-rate", 1.0, float, "poisson pacing: requests/s per user (total rate = users x this)"),
    ("--think-time", 0.0, float, "closed pacing: seconds a user waits between its requests"),
    ("--max-inflight", 256, int, "poisson pacing: most requests one user keeps open; more arrivals wait"),
    ("--max-requests", 0, int, "stop the test after this many finished requests per locust process (0: no limit)"),
    ("--request-timeout", 600.0, float, "seconds before a request is abandoned"),
    ("--jsonl", "", str, "per-request JSONL path; empty: <csv prefix>_requests.jsonl or loadtest_requests.jsonl"),
    ("--itl-list", False, bool, "also write every inter-token gap to the JSONL (not just its stats)"),
    ("--itl-events", "token", str, "ITL rows in locust stats: token (one per gap) | request (mean) | none"),
    ("--replica-source", "serve-api", str, "replica count sampling: serve-api | metrics | none"),
    ("--replica-url", "", str, "sampling URL; empty: http://<host>:8265/api/serve/applications/ or <host>/metrics"),
    (
        "--replica-token",
        "",
        str,
        "serve-api: Ray dashboard auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)",
    ),
    ("--replica-metric", "", str, "metrics source: Prometheus gauge whose samples are summed"),
    ("--replica-deployments", "", str, "serve-api source: comma-separated deployment names (empty: all)"),
    ("--replica-interval", 2.0, float, "seconds between replica samples"),
    ("--seed", 0, int, "seed for prompts and lengths (each user derives its own stream)"),
)


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def _env_bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def add_arguments(parser: Any) -> None:
    """Register the flags on locust's parser (``events.init_command_line_parser``)."""
    for flag, default, typ, help_ in _ARGS:
        env = _env_name(flag)
        if typ is bool:
            parser.add_argument(
                flag, action="store_true", default=_env_bool(os.environ.get(env, "")), help=f"{help_} [env {env}]"
            )
        else:
            # Locust's web UI masks secrets; a plain argparse parser (tests) knows no such flag.
            secret = (
                {"is_secret": True}
                if flag.endswith(("-token", "-key")) and hasattr(parser, "secret_args_included_in_web_ui")
                else {}
            )
            parser.add_argument(
                flag,
                type=typ,
                default=typ(os.environ.get(env, default)),
                help=f"{help_} (default {default!r}) [env {env}]",
                **secret,
            )


@dataclass(frozen=True)
class LoadTestOptions:
    api_key: str
    model: str
    input_len: LengthSpec
    output_len: LengthSpec
    prompt_file: str
    shared_prefix_len: int
    length_control: str
    temperature: float
    pacing: str
    request_rate: float
    think_time: float
    max_inflight: int
    max_requests: int
    request_timeout: float
    jsonl: str
    itl_list: bool
    itl_events: str
    replica_source: str
    replica_url: str
    replica_token: str
    replica_metric: str
    replica_deployments: tuple[str, ...]
    replica_interval: float
    seed: int

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace | None) -> LoadTestOptions:
        """Read our flags from locust's parsed options (defaults/env for any that are absent)."""
        values: dict[str, Any] = {}
        for flag, default, typ, _ in _ARGS:
            dest = flag.lstrip("-").replace("-", "_")
            raw = getattr(ns, dest, None) if ns is not None else None
            if raw is None:
                env = os.environ.get(_env_name(flag))
                raw = (_env_bool(env) if typ is bool else typ(env)) if env is not None else default
            values[dest] = raw
        values["input_len"] = LengthSpec.parse(values["input_len"], what="--input-len")
        values["output_len"] = LengthSpec.parse(values["output_len"], what="--output-len")
        values["replica_deployments"] = tuple(d.strip() for d in values["replica_deployments"].split(",") if d.strip())
        opts = cls(**values)
        opts._validate()
        return opts

    def _validate(self) -> None:
        choices = {
            "length_control": {"ignore_eos", "min_tokens", "none"},
            "pacing": {"closed", "poisson"},
            "itl_events": {"token", "request", "none"},
            "replica_source": {"serve-api", "metrics", "none"},
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be one of {sorted(allowed)}, got {getattr(self, name)!r}")
        if self.pacing == "poisson" and self.request_rate <= 0:
            raise ValueError("--request-rate must be > 0 with --pacing poisson")
        if self.max_inflight < 1:
            raise ValueError("--max-inflight must be >= 1")
        if self.max_requests < 0:
            raise ValueError("--max-requests must be >= 0")
        if self.think_time < 0 or self.request_timeout <= 0 or self.replica_interval <= 0:
            raise ValueError("--think-time must be >= 0; --request-timeout and --replica-interval > 0")
        if self.replica_source == "metrics" and not self.replica_metric:
            raise ValueError("--replica-source metrics needs --replica-metric")
