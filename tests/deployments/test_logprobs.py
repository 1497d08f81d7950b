"""Logprobs end to end through the ``openai`` SDK (ingress + replica + engine on CPU, tiny:llama, no
Ray): chat ``logprobs``/``top_logprobs`` and completions ``logprobs`` with ``echo``, streamed and not,
against a log_softmax of Hugging Face's logits of the same model; and the 400s for bad values."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import torch

from replica.outputs import Delta, TokenLogprobs, Usage
from replica.request import FinishReason

pytest.importorskip("openai")

MODEL = "tiny:llama"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    pytest.importorskip("ray")  # deployments.ingress imports ray.serve (no Ray is started)
    from tests.loadtest.conftest import engine_server

    with engine_server(MODEL, num_blocks=128) as base:
        yield base


@pytest.fixture(scope="module")
def sdk(url):
    from openai import OpenAI

    with OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def hf():
    """The served model's weights (tiny:llama is seeded) and tokenizer, on the HF path."""
    from replica.config import ModelConfig
    from replica.models import load_model

    loaded = load_model(ModelConfig(model=MODEL, device="cpu"))
    return loaded.model, loaded.tokenizer


def greedy_reference(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """HF's greedy tokens after ``prompt`` and the float64 log_softmax rows of every position."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
    return ids[len(prompt) :], torch.log_softmax(logits, dim=-1)


def token_text(tokenizer, token_id: int) -> str:
    from deployments.logprobs import TokenTexts

    return TokenTexts(tokenizer)(token_id)[0]


def test_chat_logprobs_match_hf_streamed_and_not(sdk, hf):
    model, tokenizer = hf
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    n = 6
    out, rows = greedy_reference(model, prompt, n)
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=n, temperature=0, logprobs=True, top_logprobs=5)
    resp = sdk.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == n
    for i, (entry, token) in enumerate(zip(content, out, strict=True)):
        row = rows[len(prompt) - 1 + i]
        assert entry.token == token_text(tokenizer, token)
        assert entry.bytes == list(tokenizer.token_bytes(skip_special_tokens=False).raw[token])
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        top = row.topk(5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [token_text(tokenizer, t) for t in top.indices.tolist()]
    assert "".join(e.token for e in content) == resp.choices[0].message.content

    streamed = []
    for chunk in sdk.chat.completions.create(**kw, stream=True, extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                assert choice.logprobs.content is not None  # each chunk: its own tokens' logprobs
                streamed.extend(choice.logprobs.content)
    # The same up to float32 rounding (the second request hits the prefix cache: other kernels' shapes).
    assert [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in streamed] == [
        (e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in content
    ]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_chat_without_logprobs_has_none(sdk):
    resp = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert resp.choices[0].logprobs is None
    for chunk in sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, stream=True):
        assert all(c.logprobs is None for c in chunk.choices)


def test_completion_logprobs_with_echo_streamed_and_not(sdk, hf):
    model, tokenizer = hf
    prompt = tokenizer.encode(PROMPT)
    n = 5
    out, rows = greedy_reference(model, prompt, n)
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=n, temperature=0, logprobs=3, echo=True)
    resp = sdk.completions.create(**kw, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT) and len(lp.tokens) == len(prompt) + n
    assert lp.tokens == [token_text(tokenizer, t) for t in prompt + out]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j, token in enumerate(prompt + out):
        if j == 0:
            continue
        assert lp.token_logprobs[j] == pytest.approx(float(rows[j - 1][token]), abs=1e-4)
        top = rows[j - 1].topk(3)
        expected = {token_text(tokenizer, t): v for t, v in zip(top.indices.tolist(), top.values.tolist())}
        expected.setdefault(lp.tokens[j], float(rows[j - 1][token]))
        assert lp.top_logprobs[j] == pytest.approx(expected, abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert [lp.text_offset[i + 1] - lp.text_offset[i] for i in range(len(lp.tokens) - 1)] == [
        len(t) for t in lp.tokens[:-1]
    ]

    text, tokens, logprobs, offsets = "", [], [], []
    for chunk in sdk.completions.create(**kw, stream=True, extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                logprobs += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert text == choice.text
    assert (tokens, offsets) == (lp.tokens, lp.text_offset)
    assert logprobs[0] is None and logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)


def test_completion_echo_without_logprobs_and_logprobs_without_echo(sdk):
    plain = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    echoed = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text and echoed.choices[0].logprobs is None
    scored = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0)
    lp = scored.choices[0].logprobs
    assert "".join(lp.tokens) == plain.choices[0].text and None not in lp.token_logprobs
    assert all(list(top) == [tok] for top, tok in zip(lp.top_logprobs, lp.tokens))  # logprobs=0: the token only
    assert lp.text_offset[0] == 0


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "a", "logprobs": -1}, "logprobs"),
        ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_out_of_range_values_answer_400_with_param(url, path, body, param):
    r = httpx.post(f"{url}{path}", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]


class ScriptedClient:
    """An LLMClient whose replica sends fixed deltas: two tokens merged in one item, a masked
    alternative (-inf), then a stop token (no entry)."""

    def __init__(self) -> None:
        self.requests: list = []

    async def model_info(self):
        from deployments.llm import ModelInfo

        return ModelInfo(name="m", model="m", max_model_len=64, block_size=16)

    async def generate(self, req) -> AsyncIterator:
        self.requests.append(req)
        lp = req.params.logprobs is not None
        a = TokenLogprobs(ord("h") + 3, -0.25, (ord("h") + 3, ord("j") + 3), (-0.25, -float("inf")))
        b = TokenLogprobs(ord("i") + 3, -1.5, (ord("i") + 3,), (-1.5,))
        prompt = (None, TokenLogprobs(ord("k") + 3, -2.0, (5,), (-0.1,))) if req.params.prompt_logprobs else None
        yield Delta(
            req.request_id, "hi", (a.token_id, b.token_id), logprobs=(a, b) if lp else None, prompt_logprobs=prompt
        )
        yield Delta(req.request_id, "", (2,), FinishReason.STOP, Usage(2, 3), logprobs=() if lp else None)


@pytest.fixture
def scripted():
    pytest.importorskip("ray")
    from deployments.ingress import IngressSettings, OpenAIService, build_api
    from tests.deployments.fakes import FakeTokenizer

    client = ScriptedClient()
    service = OpenAIService(client, FakeTokenizer(), IngressSettings(model="m"))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_api(service)), base_url="http://t"), client


def _events(text: str) -> list[dict]:
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]


async def test_a_merged_item_carries_its_tokens_entries_and_inf_is_finite(scripted):
    http, _ = scripted
    body = {"model": "m", "messages": MESSAGES, "logprobs": True, "top_logprobs": 2, "stream": True}
    chunks = [c for e in _events((await http.post("/v1/chat/completions", json=body)).text) for c in e["choices"]]
    with_lp = [c["logprobs"]["content"] for c in chunks if c["logprobs"] is not None]
    assert with_lp[0] == [
        {
            "token": "h",
            "logprob": -0.25,
            "bytes": [104],
            "top_logprobs": [
                {"token": "h", "logprob": -0.25, "bytes": [104]},
                {"token": "j", "logprob": -9999.0, "bytes": [106]},
            ],
        },
        {
            "token": "i",
            "logprob": -1.5,
            "bytes": [105],
            "top_logprobs": [{"token": "i", "logprob": -1.5, "bytes": [105]}],
        },
    ]
    assert with_lp[1:] == [[]]  # the finishing chunk: the stop token has no entry
    r = await http.post("/v1/chat/completions", json={**body, "stream": False})
    assert r.json()["choices"][0]["logprobs"] == {"content": with_lp[0], "refusal": None}


async def test_completion_echo_entries_and_offsets(scripted):
    http, client = scripted
    body = {"model": "m", "prompt": "k", "logprobs": 1, "echo": True}
    choice = (await http.post("/v1/completions", json=body)).json()["choices"][0]
    assert client.requests[-1].params.prompt_logprobs == 1
    assert choice["text"] == "khi"
    prompt_ids = client.requests[-1].prompt_token_ids  # FakeTokenizer: BOS 1 (no text), then "k"
    assert len(prompt_ids) == 2
    assert choice["logprobs"] == {
        "tokens": ["", "k", "h", "i"],
        "token_logprobs": [None, -2.0, -0.25, -1.5],
        "top_logprobs": [None, {"\x02": -0.1, "k": -2.0}, {"h": -0.25, "j": -9999.0}, {"i": -1.5}],
        "text_offset": [0, 0, 1, 2],
    }


async def test_tool_calls_stream_with_logprobs():
    """The tool-call parser's chunks carry logprobs too (the scripted replica sends none: empty lists)."""
    from replica.models import load_tokenizer
    from tests.deployments.test_ingress_tools import OUTPUT, TOOLS, ScriptedClient, hermes_tokenizer, sdk

    oa = sdk(hermes_tokenizer(load_tokenizer("default")), ScriptedClient(OUTPUT, 3))
    stream = await oa.chat.completions.create(
        model="m",
        messages=MESSAGES,
        tools=TOOLS,
        logprobs=True,
        stream=True,  # type: ignore[arg-type]
    )
    calls, finish, chunks = 0, None, 0
    async for chunk in stream:
        choice = chunk.choices[0]
        calls += len(choice.delta.tool_calls or [])
        finish = choice.finish_reason or finish
        if choice.delta.role is None:
            chunks += 1
            assert choice.logprobs is not None and choice.logprobs.content == []
    assert calls == 2 and finish == "tool_calls" and chunks > 3


LONG_PROMPT = "The quick brown fox jumps over the lazy dog, then runs far into the green forest to find its friends and"


def _chat_entries(content) -> list[tuple[str, list[str]]]:
    return [(e.token, [t.token for t in e.top_logprobs]) for e in content]


def test_chat_n_choices_have_the_logprobs_of_single_requests_with_seed_plus_index(sdk):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0, logprobs=True, top_logprobs=3)
    extra = {"extra_body": {"ignore_eos": True}}
    group = sdk.chat.completions.create(n=3, seed=99, **kw, **extra)
    assert [c.index for c in group.choices] == [0, 1, 2]
    streamed: dict[int, list] = {}
    for chunk in sdk.chat.completions.create(n=3, seed=99, stream=True, **kw, **extra):
        for c in chunk.choices:
            if c.logprobs is not None:  # a chunk carries its own choice's tokens' entries
                streamed.setdefault(c.index, []).extend(c.logprobs.content)
    assert sorted(streamed) == [0, 1, 2]
    for i, choice in enumerate(group.choices):
        want = sdk.chat.completions.create(seed=99 + i, **kw, **extra).choices[0].logprobs.content
        assert len(want) == 8
        for got in (choice.logprobs.content, streamed[i]):
            assert _chat_entries(got) == _chat_entries(want)
            assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=1e-4)
            for e, w in zip(got, want):
                assert [t.logprob for t in e.top_logprobs] == pytest.approx(
                    [t.logprob for t in w.top_logprobs], abs=1e-4
                )
    assert len({tuple(e.token for e in c.logprobs.content) for c in group.choices}) > 1  # seeds differ


def test_completions_n_with_echo_puts_the_prompts_logprobs_in_every_choice(sdk):
    """As vLLM: every choice echoes the prompt with its logprobs, then has its own tokens'. The
    prompt is longer than a KV block, so the choices share blocks the request scored before forking."""
    kw = dict(model=MODEL, prompt=LONG_PROMPT, max_tokens=6, temperature=1.0, logprobs=2, echo=True)
    extra = {"extra_body": {"ignore_eos": True}}
    group = sdk.completions.create(n=3, seed=7, **kw, **extra)
    n_prompt = group.usage.prompt_tokens
    assert n_prompt > 16 and [c.index for c in group.choices] == [0, 1, 2]
    streamed: dict[int, dict[str, list]] = {}
    for chunk in sdk.completions.create(n=3, seed=7, stream=True, **kw, **extra):
        for c in chunk.choices:
            s = streamed.setdefault(c.index, {"text": [], "tokens": [], "logprobs": [], "offsets": []})
            s["text"].append(c.text)
            if c.logprobs is not None:
                s["tokens"] += c.logprobs.tokens
                s["logprobs"] += c.logprobs.token_logprobs
                s["offsets"] += c.logprobs.text_offset
    prompt_part = group.choices[0].logprobs.token_logprobs[1:n_prompt]
    for i, choice in enumerate(group.choices):
        want = sdk.completions.create(seed=7 + i, **kw, **extra).choices[0]
        lp, ref = choice.logprobs, want.logprobs
        assert choice.text == want.text and choice.text.startswith(LONG_PROMPT)
        assert len(lp.tokens) == n_prompt + 6 and (lp.tokens, lp.text_offset) == (ref.tokens, ref.text_offset)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(ref.token_logprobs[1:], abs=1e-4)
        for got_top, want_top in zip(lp.top_logprobs[1:], ref.top_logprobs[1:], strict=True):
            assert got_top == pytest.approx(want_top, abs=1e-4)
        assert lp.token_logprobs[1:n_prompt] == pytest.approx(prompt_part, abs=1e-4)  # the same prompt in each
        s = streamed[i]
        assert "".join(s["text"]) == choice.text and (s["tokens"], s["offsets"]) == (lp.tokens, lp.text_offset)
        assert s["logprobs"][0] is None and s["logprobs"][1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    assert len({c.text for c in group.choices}) > 1
