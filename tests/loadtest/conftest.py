"""A real OpenAI ingress (deployments.ingress.build_api) served by uvicorn in a thread, backed by a
fake engine client that streams one word per token, so load tests run without Ray or a model."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TOKEN_DELAY_S = 0.002  # between fake tokens: streams take a few ms, like a tiny CPU model


class WordTokenizer:
    """Whitespace 'tokenizer': enough for the ingress to count prompt tokens."""

    vocab_size = 1000
    eos_token_ids = frozenset({0})

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [1 + hash(w) % 999 for w in text.split()] or [1]

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids += [2] + self.encode(str(m.get("content") or ""))
        return ids + ([3] if add_generation_prompt else [])

    def decode(self, token_ids) -> str:
        return " ".join(f"w{t}" for t in token_ids)


class FakeLLMClient:
    """Streams ``max_tokens`` tokens (one Delta each) and a final Delta with usage."""

    max_model_len = 4096

    async def model_info(self):
        from deployments.llm import ModelInfo

        return ModelInfo(name="fake", model="fake", max_model_len=self.max_model_len, block_size=16)

    async def generate(self, req) -> AsyncIterator:
        from replica.outputs import Delta, Usage
        from replica.request import FinishReason

        n = req.params.max_tokens
        for i in range(n):
            await asyncio.sleep(TOKEN_DELAY_S)
            last = i == n - 1
            yield Delta(
                request_id=req.request_id,
                text=f" w{i}",
                token_ids=(10 + i % 900,),
                finish_reason=FinishReason.LENGTH if last else None,
                usage=Usage(prompt_tokens=len(req.prompt_token_ids), completion_tokens=n) if last else None,
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What Ray's Serve REST API answers (trimmed): two LLM replicas running, three wanted.
SERVE_DETAILS = {
    "applications": {
        "cbserve": {
            "deployments": {
                "LLMReplica": {
                    "target_num_replicas": 3,
                    "replicas": [{"state": "RUNNING"}] * 2 + [{"state": "STARTING"}],
                },
                "OpenAIIngress": {"target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]},
            }
        }
    }
}


class InProcessReplica:
    """LLMClient over the real replica logic (deployments.llm.LLMServer + AsyncEngine) in the
    HTTP server's event loop: the project's app end to end, minus Ray."""

    def __init__(self, config) -> None:
        self._config = config
        self._server = None
        self._lock: asyncio.Lock | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def _get(self):
        if self._server is None:
            from deployments.llm import LLMServer

            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if self._server is None:
                    server = object.__new__(LLMServer)  # LLMServer has an async __init__ (Serve style)
                    await server.__init__(self._config)
                    self._server, self.loop = server, asyncio.get_running_loop()
        return self._server

    async def model_info(self):
        return (await self._get()).model_info()

    async def generate(self, req) -> AsyncIterator:
        inner = (await self._get()).generate(req)
        try:
            async for item in inner:
                yield item
        finally:
            await inner.aclose()

    def shutdown(self) -> None:
        if self._server is not None and self.loop is not None and self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self._server.shutdown(), self.loop).result(timeout=30)


def serve_in_thread(api) -> tuple[str, object, threading.Thread]:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("OpenAI test server did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="session")
def openai_server() -> Iterator[str]:
    """Base URL of a live ingress on 127.0.0.1 (model name: ``fake``); it also answers
    ``GET /api/serve/applications/`` like Ray's dashboard, for the replica sampler."""
    pytest.importorskip("ray")  # deployments.ingress imports ray.serve
    from deployments.ingress import IngressSettings, OpenAIService, build_api

    service = OpenAIService(FakeLLMClient(), WordTokenizer(), IngressSettings(model="fake"))
    api = build_api(service)
    api.get("/api/serve/applications/")(lambda: SERVE_DETAILS)
    url, server, thread = serve_in_thread(api)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@contextlib.contextmanager
def engine_server(model: str = "tiny:llama", *, num_blocks: int = 256, tokenizer=None) -> Iterator[str]:
    """The ingress over a real engine on CPU (no Ray started), serving ``model``; yields its URL.
    ``tokenizer``: the ingress's (e.g. the model's with another chat template), else the model's."""
    from deployments.ingress import IngressSettings, OpenAIService, build_api
    from replica.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from replica.models import load_tokenizer

    replica = InProcessReplica(
        EngineConfig(
            model=ModelConfig(model=model, device="cpu", max_model_len=512),
            cache=CacheConfig(num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_seqs=8),
        )
    )
    service = OpenAIService(replica, tokenizer or load_tokenizer(model), IngressSettings(model=model))
    url, server, thread = serve_in_thread(build_api(service))
    try:
        yield url
    finally:
        replica.shutdown()
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def real_engine_server() -> Iterator[str]:
    """The ingress over a real engine: tiny:llama (seeded random weights) on CPU, model ``tiny:llama``."""
    pytest.importorskip("ray")
    with engine_server("tiny:llama") as url:
        yield url


ROOT = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).with_name("locust")


def run_locust(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """``locust --headless`` as a subprocess (its gevent monkey-patching stays out of pytest)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("CBSERVE_LT_")}
    cmd = [str(LOCUST), "-f", *args[:1], "--headless", "--only-summary", "--loglevel", "WARNING", *args[1:]]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class LocustRun:
    proc: subprocess.CompletedProcess
    prefix: Path  # the --csv prefix

    @property
    def jsonl(self) -> Path:
        return Path(f"{self.prefix}_requests.jsonl")

    def check(self) -> None:
        """Fail with locust's own output when the run itself failed."""
        assert self.proc.returncode == 0, (
            f"locust exited {self.proc.returncode}:\n{self.proc.stdout[-4000:]}\n{self.proc.stderr[-4000:]}"
        )


@pytest.fixture(scope="session")
def locust_run(openai_server: str, tmp_path_factory) -> LocustRun:
    """Closed-loop load from both users until 60 requests are done (a time limit alone could end
    before any request on a busy machine); replica samples from the fake Serve API."""
    out = tmp_path_factory.mktemp("locust")
    prefix = out / "run"
    proc = run_locust(
        [
            str(ROOT / "loadtest" / "locustfile.py"),
            "-H",
            openai_server,
            "-u",
            "4",
            "-r",
            "4",
            "-t",
            "120s",
            "--max-requests",
            "60",
            "--csv",
            str(prefix),
            "--input-len",
            "uniform:8:32",
            "--output-len",
            "uniform:4:12",
            "--replica-url",
            f"{openai_server}/api/serve/applications/",
            "--replica-interval",
            "0.2",
            "--replica-deployments",
            "LLMReplica",
        ],
        cwd=out,
    )
    return LocustRun(proc, prefix)
