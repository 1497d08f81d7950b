"""A real OpenAI ingress (deployments.ingress.build_api) served by uvicorn in a thread, backed by a
fake engine client that streams one word per token, so load tests run without Ray or a model."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

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


@pytest.fixture(scope="module")
def openai_server() -> Iterator[str]:
    """Base URL of a live ingress on 127.0.0.1 (model name: ``fake``)."""
    pytest.importorskip("ray")  # deployments.ingress imports ray.serve
    import uvicorn

    from deployments.ingress import IngressSettings, OpenAIService, build_api

    service = OpenAIService(FakeLLMClient(), WordTokenizer(), IngressSettings(model="fake"))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_api(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("fake OpenAI server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
