"""Locust users that stream from the OpenAI-compatible endpoints and measure LLM latencies.

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 -u 8 -r 2 -t 2m \
        --csv results/run ChatUser

Besides locust's own row for each HTTP call (response time = end of stream), every successful
request adds rows of custom metrics to locust's stats (Type column, milliseconds):
``TTFT``, ``TPOT``, ``ITL`` and ``E2E``, named by endpoint; the E2E row's "content size" is
the output token count. A JSONL line per request (and per replica-count sample) goes to
``--jsonl`` (default ``<csv prefix>_requests.jsonl``). See loadtest/options.py for all flags
and README "Load testing" for the whole workflow; the step shape is in loadtest/shape.py.
"""

from __future__ import annotations

import itertools
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import gevent
from gevent.pool import Pool
from locust import HttpUser, events, task
from locust.runners import WorkerRunner

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # locust imports this file by path; make `loadtest` importable
    sys.path.insert(0, str(_ROOT))

from loadtest.options import LoadTestOptions, add_arguments  # noqa: E402
from loadtest.replicas import ReplicaSampler, ray_auth_token  # noqa: E402
from loadtest.stream import RequestRecord, read_sse  # noqa: E402
from loadtest.workload import WorkItem, Workload, load_prompt_set  # noqa: E402

log = logging.getLogger("cbserve.loadtest")


class RunContext:
    """Per-process state of one locust run: options, workload, the JSONL sink, the model name."""

    def __init__(self, environment: Any, options: LoadTestOptions) -> None:
        self.environment = environment
        self.options = options
        needs_set = options.input_len.kind == "dataset"
        self.workload = Workload(
            options.input_len,
            options.output_len,
            prompt_set=load_prompt_set(options.prompt_file) if needs_set else (),
            shared_prefix_len=options.shared_prefix_len,
            seed=options.seed,
        )
        parsed = environment.parsed_options
        csv_prefix = getattr(parsed, "csv_prefix", None) if parsed is not None else None
        self.jsonl_path = Path(
            options.jsonl or (f"{csv_prefix}_requests.jsonl" if csv_prefix else "loadtest_requests.jsonl")
        )
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        # Workers of a distributed run append to the file the master truncated.
        is_worker = isinstance(environment.runner, WorkerRunner)
        self._file = self.jsonl_path.open("a" if is_worker else "w", buffering=1)
        self._user_ids = itertools.count()
        self._worker_index = getattr(environment.runner, "worker_index", 0)
        self.model: str | None = options.model or None
        self.sampler_greenlet: gevent.Greenlet | None = None
        self.warned_no_usage = False
        self.finished = 0  # requests done (ok or not), for --max-requests

    def user_rng(self) -> random.Random:
        return random.Random(f"{self.options.seed}:{self._worker_index}:{next(self._user_ids)}")

    def write(self, line: str) -> None:
        if not self._file.closed:
            self._file.write(line + "\n")

    def close(self) -> None:
        self._file.close()


def _context(environment: Any) -> RunContext:
    ctx = getattr(environment, "cbserve", None)
    if ctx is None:  # library use without the init event (e.g. Environment() in a script)
        ctx = environment.cbserve = RunContext(environment, LoadTestOptions.from_namespace(environment.parsed_options))
    return ctx


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    add_arguments(parser)


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    ctx = environment.cbserve = RunContext(environment, LoadTestOptions.from_namespace(environment.parsed_options))
    environment.events.quit.add_listener(lambda **_: ctx.close())
    log.info("per-request records -> %s", environment.cbserve.jsonl_path)


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    ctx = _context(environment)
    ctx.finished = 0  # a new test (web UI) starts a new --max-requests count
    opts = ctx.options
    if isinstance(environment.runner, WorkerRunner) or opts.replica_source == "none" or ctx.sampler_greenlet:
        return
    url = opts.replica_url
    if not url:
        from urllib.parse import urlsplit

        host = urlsplit(environment.host or "http://127.0.0.1:8000")
        if opts.replica_source == "serve-api":
            url = f"http://{host.hostname}:8265/api/serve/applications/"  # the dashboard speaks plain HTTP
        else:
            url = f"{host.scheme}://{host.netloc}/metrics"
    sampler = ReplicaSampler(
        opts.replica_source,
        url,
        lambda sample: ctx.write(_json(sample)),
        metric=opts.replica_metric,
        deployments=opts.replica_deployments,
        interval=opts.replica_interval,
        token=ray_auth_token(url, opts.replica_token) if opts.replica_source == "serve-api" else None,
    )
    ctx.sampler_greenlet = gevent.spawn(sampler.run)


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    ctx = getattr(environment, "cbserve", None)
    if ctx is not None and ctx.sampler_greenlet is not None:
        ctx.sampler_greenlet.kill()
        ctx.sampler_greenlet = None
    parsed = environment.parsed_options
    if getattr(parsed, "csv_prefix", None) and not isinstance(environment.runner, WorkerRunner):
        # Locust rewrites <prefix>_stats.csv once a second and not again at exit; wait for one
        # more pass so the CSV holds the final numbers (users are stopped, stats are final).
        from locust.stats import CSV_STATS_INTERVAL_SEC

        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)


def _json(obj: dict[str, Any]) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))


class _StreamingUser(HttpUser):
    """One streaming OpenAI client. Closed loop by default; ``--pacing poisson`` makes each user
    an open-loop Poisson source whose requests run in their own greenlets."""

    abstract = True
    endpoint: ClassVar[str]

    def on_start(self) -> None:
        self.ctx = _context(self.environment)
        self.opts = self.ctx.options
        self.rng = self.ctx.user_rng()
        self.pool = Pool(self.opts.max_inflight)
        if self.opts.api_key:
            self.client.headers["Authorization"] = f"Bearer {self.opts.api_key}"
        if self.ctx.model is None:
            self.ctx.model = self._discover_model()

    def on_stop(self) -> None:
        self.pool.kill()

    def wait_time(self) -> float:
        if self.opts.pacing == "poisson":
            return self.rng.expovariate(self.opts.request_rate)
        return self.opts.think_time

    @task
    def generate(self) -> None:
        if self.opts.pacing == "poisson":
            slot = time.perf_counter()  # this arrival's Poisson time; a full pool makes us late
            self.pool.spawn(self._one_request, slot)
        else:
            self._one_request(None)

    # -- one request -------------------------------------------------------------------------

    def _discover_model(self) -> str:
        with self.client.get("/v1/models", name="/v1/models", catch_response=True) as resp:
            try:
                return resp.json()["data"][0]["id"]
            except Exception as e:
                resp.failure(f"cannot read a model id from /v1/models: {e}")
                raise RuntimeError("no --model given and /v1/models gave no model id") from e

    def _body(self, item: WorkItem) -> dict[str, Any]:
        raise NotImplementedError

    def _request_body(self, item: WorkItem) -> dict[str, Any]:
        body = self._body(item)
        body.update(
            model=self.ctx.model,
            max_tokens=item.max_tokens,
            temperature=self.opts.temperature,
            stream=True,
            stream_options={"include_usage": True},
        )
        if self.opts.length_control == "ignore_eos":
            body["ignore_eos"] = True
        elif self.opts.length_control == "min_tokens":
            body["min_tokens"] = item.max_tokens
        return body

    def _one_request(self, slot: float | None) -> None:
        item = self.ctx.workload.sample(self.rng)
        body = self._request_body(item)
        ts, start = time.time(), time.perf_counter()
        lag = start - slot if slot is not None else 0.0
        common = dict(
            ts=ts,
            endpoint=self.endpoint,
            max_tokens=item.max_tokens,
            target_input_len=item.target_input_len,
            scheduled_lag=lag,
        )
        with self.client.post(
            self.endpoint,
            json=body,
            stream=True,
            catch_response=True,
            timeout=self.opts.request_timeout,
            name=self.endpoint,
        ) as resp:
            status = resp.status_code or 0
            try:
                if status != 200:
                    detail = str(resp.error) if getattr(resp, "error", None) else resp.text[:300]
                    record = RequestRecord.failed(
                        status=status, error=f"HTTP {status}: {detail}", e2e=time.perf_counter() - start, **common
                    )
                else:
                    res = read_sse(resp.iter_lines(), time.perf_counter)
                    record = RequestRecord.from_stream(res, start=start, status=status, **common)
            except Exception as e:
                record = RequestRecord.failed(
                    status=status, error=f"{type(e).__name__}: {e}", e2e=time.perf_counter() - start, **common
                )
            resp.request_meta["response_time"] = (record.e2e or 0.0) * 1000
            resp.request_meta["response_length"] = record.output_tokens
            if record.ok:
                resp.success()
            else:
                resp.failure(record.error)
        self._report(record)

    def _report(self, record: RequestRecord) -> None:
        self.ctx.write(record.to_json(itl_list=self.opts.itl_list))
        self.ctx.finished += 1
        if self.opts.max_requests and self.ctx.finished == self.opts.max_requests:
            log.info("--max-requests %d reached: stopping", self.opts.max_requests)
            # Not from this greenlet: quitting kills the users, this one included.
            gevent.spawn(self.environment.runner.quit)
        if not record.ok:
            return
        if not record.tokens_from_usage and not self.ctx.warned_no_usage:
            self.ctx.warned_no_usage = True
            log.warning("no usage chunk in the stream; counting text chunks as output tokens")
        fire = self.environment.events.request.fire
        name = self.endpoint

        def metric(kind: str, seconds: float, length: int = 0) -> None:
            fire(
                request_type=kind,
                name=name,
                response_time=seconds * 1000,
                response_length=length,
                exception=None,
                context={},
            )

        metric("TTFT", record.ttft)
        if record.tpot is not None:
            metric("TPOT", record.tpot)
        if record.itl and self.opts.itl_events == "token":
            for gap in record.itl:
                metric("ITL", gap)
        elif record.itl and self.opts.itl_events == "request":
            metric("ITL", sum(record.itl) / len(record.itl))
        metric("E2E", record.e2e, record.output_tokens)


class ChatUser(_StreamingUser):
    """Streams ``POST /v1/chat/completions`` with one user message."""

    endpoint = "/v1/chat/completions"

    def _body(self, item: WorkItem) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": item.prompt}]}


class CompletionUser(_StreamingUser):
    """Streams ``POST /v1/completions`` with a raw prompt."""

    endpoint = "/v1/completions"

    def _body(self, item: WorkItem) -> dict[str, Any]:
        return {"prompt": item.prompt}
