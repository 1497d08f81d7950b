"""n > 1 end to end through the openai SDK (ingress + replica + engine on CPU, tiny:llama, no Ray):
n choices indexed 0..n-1, each equal to the single request with seed + i, streamed and not;
usage counts the prompt once and the completions of every choice."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("openai")

MODEL = "tiny:llama"
PROMPT = "The quick brown fox jumps over the lazy dog and then"
MESSAGES = [{"role": "user", "content": "Tell me a short story about a fox."}]


@pytest.fixture(scope="module")
def client() -> Iterator:
    pytest.importorskip("ray")  # deployments.ingress imports ray.serve (no Ray is started)
    from openai import OpenAI

    from tests.loadtest.conftest import engine_server

    with engine_server(MODEL, num_blocks=64) as base:
        yield OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def _streamed(chunks) -> tuple[dict[int, str], dict[int, str | None], object, dict[int, int]]:
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    finishes: dict[int, int] = {}
    usage = None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            piece = ch.text if hasattr(ch, "text") else (ch.delta.content or "")
            texts[ch.index] = texts.get(ch.index, "") + piece
            if ch.finish_reason is not None:
                reasons[ch.index] = ch.finish_reason
                finishes[ch.index] = finishes.get(ch.index, 0) + 1
    return texts, reasons, usage, finishes


def test_completions_n_choices_equal_single_requests_with_seed_plus_index(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0)
    group = client.completions.create(n=3, seed=1234, **kw)
    assert [c.index for c in group.choices] == [0, 1, 2]
    singles = [client.completions.create(seed=1234 + i, **kw) for i in range(3)]
    assert [c.text for c in group.choices] == [s.choices[0].text for s in singles]
    assert [c.finish_reason for c in group.choices] == [s.choices[0].finish_reason for s in singles]
    assert len({c.text for c in group.choices}) > 1  # seeds differ, so do the choices
    assert group.usage.prompt_tokens == singles[0].usage.prompt_tokens  # once
    assert group.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert group.usage.total_tokens == group.usage.prompt_tokens + group.usage.completion_tokens

    stream = client.completions.create(n=3, seed=1234, stream=True, stream_options={"include_usage": True}, **kw)
    texts, reasons, usage, finishes = _streamed(stream)
    assert texts == {c.index: c.text for c in group.choices}
    assert reasons == {c.index: c.finish_reason for c in group.choices}
    assert finishes == {0: 1, 1: 1, 2: 1}  # one finish per choice
    assert usage.prompt_tokens == group.usage.prompt_tokens
    assert usage.completion_tokens == group.usage.completion_tokens


def test_chat_n_choices_streamed_and_not(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0.8)
    group = client.chat.completions.create(n=3, seed=99, **kw)
    assert [c.index for c in group.choices] == [0, 1, 2]
    single = client.chat.completions.create(seed=99 + 2, **kw)
    assert group.choices[2].message.content == single.choices[0].message.content
    assert group.usage.prompt_tokens == single.usage.prompt_tokens

    stream = client.chat.completions.create(n=3, seed=99, stream=True, stream_options={"include_usage": True}, **kw)
    chunks = list(stream)
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1, 2]  # a role chunk per choice
    assert all(len(c.choices) <= 1 for c in chunks)
    texts, reasons, usage, finishes = _streamed(chunks)
    assert texts == {c.index: c.message.content for c in group.choices}
    assert reasons == {c.index: c.finish_reason for c in group.choices} and finishes == {0: 1, 1: 1, 2: 1}
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        group.usage.prompt_tokens,
        group.usage.completion_tokens,
    )


def test_greedy_choices_are_identical(client):
    group = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, n=2)
    single = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert [c.text for c in group.choices] == [single.choices[0].text] * 2


def test_unseeded_choices_differ(client):
    group = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, n=3)
    assert len({c.text for c in group.choices}) > 1


def test_n_that_cannot_fit_is_refused_with_param_n(client):
    import openai

    # 64 blocks of 16: three sequences of ~12 + 400 tokens need ~78.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, n=3)
    assert "Lower n or max_tokens" in e.value.body["message"] and e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=9)  # max_num_seqs 8
    assert "max_num_seqs 8" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=3, best_of=2)
    assert e.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as e:  # as OpenAI: the best are known only at the end
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=1, best_of=2, stream=True)
    assert e.value.body["param"] == "best_of" and "streamed" in e.value.body["message"]
    ok = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2, best_of=2)
    assert len(ok.choices) == 2


def test_each_choice_has_its_own_grammar_matcher(client):
    pytest.importorskip("xgrammar")
    options = ["yes", "no", "maybe", "never"]
    r = client.completions.create(
        model=MODEL, prompt="Pick:", max_tokens=20, n=4, seed=3, extra_body={"guided_choice": options}
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.text in options and c.finish_reason == "stop" for c in r.choices)


@pytest.mark.parametrize("n, best_of, logprobs", [(1, 3, None), (2, 4, 1)])
def test_best_of_returns_the_candidates_with_the_highest_cumulative_logprob(client, n, best_of, logprobs):
    """Candidate i is the single request with seed + i; the n returned are those whose sampled
    tokens' logprobs sum highest, best first; logprobs only when asked."""
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0)
    singles = [client.completions.create(seed=77 + i, logprobs=0, **kw).choices[0] for i in range(best_of)]
    scores = [sum(singles[i].logprobs.token_logprobs) for i in range(best_of)]
    assert len(set(scores)) == best_of  # distinct candidates: the order is well defined
    best = sorted(range(best_of), key=lambda i: -scores[i])[:n]
    got = client.completions.create(seed=77, n=n, best_of=best_of, logprobs=logprobs, **kw)
    assert [c.index for c in got.choices] == list(range(n))
    assert [c.text for c in got.choices] == [singles[i].text for i in best]
    if logprobs is None:
        assert all(c.logprobs is None for c in got.choices)
    else:
        for c, i in zip(got.choices, best):
            assert c.logprobs.token_logprobs == pytest.approx(singles[i].logprobs.token_logprobs, abs=1e-4)
            assert c.logprobs.tokens == singles[i].logprobs.tokens and len(c.logprobs.top_logprobs) == len(
                c.logprobs.tokens
            )
    assert got.usage.completion_tokens == sum(len(s.logprobs.tokens) for s in singles)  # every candidate counts
