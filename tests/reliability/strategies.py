"""Hypothesis strategies for HTTP requests to the OpenAI ingress: near-valid bodies with hostile
values, valid bodies, random JSON, raw bytes, other routes and methods, good and bad keys."""

from __future__ import annotations

import json

from hypothesis import strategies as st

MODEL = "tiny:llama"
KEY = "fuzz-key-0123456789"
AUTH = [(b"authorization", f"Bearer {KEY}".encode())]

ints = st.one_of(st.integers(-3, 40), st.sampled_from([0, -1, 2**31, 2**63, 2**64 + 1, -(2**63) - 1, 10**30]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-300, 2.0, 2.0000001, -0.0]))
text = st.text(max_size=60)
json_scalar = st.one_of(st.none(), st.booleans(), ints, floats, text)
json_value = st.recursive(
    json_scalar,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(text, kids, max_size=4)),
    max_leaves=12,
)
maybe = lambda s: st.one_of(s, json_value)

stop = st.one_of(st.none(), text, st.lists(st.text(max_size=40), max_size=6))
token_ids = st.lists(st.integers(-2, 50_000), min_size=0, max_size=40)
prompt = st.one_of(
    text, token_ids, st.lists(text, max_size=2), st.lists(token_ids, max_size=2), st.text(min_size=300, max_size=2000)
)
role = st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot", ""])
content = st.one_of(
    st.none(),
    text,
    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": text}), max_size=3),
)
message = st.fixed_dictionaries({"role": role}, optional={"content": maybe(content), "name": maybe(text)})

common = {
    "max_tokens": maybe(ints),
    "temperature": maybe(floats),
    "top_p": maybe(floats),
    "top_k": maybe(ints),
    "seed": maybe(ints),
    "stop": maybe(stop),
    "stream": maybe(st.booleans()),
    "stream_options": maybe(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
    "n": maybe(ints),
    "min_tokens": maybe(ints),
    "ignore_eos": maybe(st.booleans()),
    "stop_token_ids": maybe(st.lists(ints, max_size=5)),
    "presence_penalty": maybe(floats),
    "logit_bias": maybe(st.dictionaries(text, floats, max_size=2)),
    "user": maybe(text),
    "unknown_field": json_value,
}
model = st.one_of(st.just(MODEL), st.just(MODEL), text)
completion = st.fixed_dictionaries({"model": model, "prompt": maybe(prompt)}, optional=common)
chat = st.fixed_dictionaries(
    {"model": model, "messages": maybe(st.lists(message, max_size=4))},
    optional={**common, "max_completion_tokens": maybe(ints), "logprobs": maybe(st.booleans())},
)
# A valid request with one hostile field: the most common shape of a client bug.
valid_completion = st.fixed_dictionaries(
    {"model": st.just(MODEL), "prompt": st.one_of(text.filter(str.strip), token_ids.filter(bool))},
    optional={
        "max_tokens": st.integers(1, 10),
        "temperature": st.floats(0, 2),
        "stream": st.booleans(),
        "seed": st.integers(0, 2**32),
        "stop": stop,
        "ignore_eos": st.booleans(),
    },
)


def dumps(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()  # NaN/Infinity: Python's json accepts them


@st.composite
def http_request(draw):
    kind = draw(st.sampled_from(["completion", "chat", "valid", "valid", "raw", "json", "route"]))
    headers = AUTH
    if kind == "completion":
        return "POST", "/v1/completions", dumps(draw(completion)), headers
    if kind == "chat":
        return "POST", "/v1/chat/completions", dumps(draw(chat)), headers
    if kind == "valid":
        return "POST", "/v1/completions", dumps(draw(valid_completion)), headers
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    if kind == "raw":
        return "POST", path, draw(st.binary(max_size=200)), headers
    if kind == "json":
        return "POST", path, dumps(draw(json_value)), headers
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    path = draw(st.sampled_from(["/v1/models", "/health", "/v1/completions", "/", "/v1/", "/docs", "/v1/x"]))
    headers = draw(st.sampled_from([AUTH, [], [(b"authorization", b"Bearer wrong")], [(b"authorization", b"")]]))
    return method, path, draw(st.binary(max_size=50)), headers
