"""Logprobs end to end through the ``openai`` SDK (ingress + replica + engine on CPU, tiny:llama, no
Ray): chat ``logprobs``/``top_logprobs`` and completions ``logprobs`` with ``echo``, streamed and not,
against a log_softmax of Hugging Face's logits of the same model; and the 400s for bad values."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch

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
