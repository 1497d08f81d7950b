"""loadtest/stream.py: SSE parsing and the latency definitions, on scripted streams and clocks."""

from __future__ import annotations

import json

import pytest

from loadtest.stream import RequestRecord, read_sse


def _chat(text, finish=None):
    return "data: " + json.dumps({"choices": [{"delta": {"content": text}, "finish_reason": finish}], "usage": None})


def _usage(n, prompt=7):
    return "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n}})


class Clock:
    """Returns the scripted arrival time of each line, in order."""

    def __init__(self, times):
        self.times = iter(times)

    def __call__(self):
        return next(self.times)


def _record(lines, times, start=0.0, status=200):
    res = read_sse(lines, Clock(times))
    return RequestRecord.from_stream(
        res, ts=1000.0, start=start, endpoint="/v1/chat/completions", status=status, max_tokens=8, target_input_len=None
    )


def test_latencies_from_a_chat_stream():
    lines = [
        _chat(""),  # role chunk: no text, not the first token
        "",
        ": keep-alive",
        _chat("Hel"),
        _chat("lo"),
        _chat(" world", "length"),
        _usage(5),
        "data: [DONE]",
    ]
    times = [0.05, 0.06, 0.07, 0.10, 0.13, 0.19, 0.20, 0.21]
    r = _record([line.encode() for line in lines], times)
    assert r.ok and r.error is None
    assert r.ttft == pytest.approx(0.10)
    assert r.e2e == pytest.approx(0.21)
    assert r.itl == pytest.approx((0.03, 0.06))
    assert r.output_tokens == 5 and r.tokens_from_usage and r.prompt_tokens == 7
    assert r.tpot == pytest.approx((0.21 - 0.10) / 4)  # per token, though only 3 text chunks came
    line = json.loads(r.to_json())
    assert line["type"] == "request" and line["itl_stats"]["n"] == 2 and "itl" not in line
    assert line["itl_stats"]["max"] == pytest.approx(0.06)
    assert json.loads(r.to_json(itl_list=True))["itl"] == pytest.approx([0.03, 0.06])


def test_completion_stream_and_missing_usage():
    lines = ['data: {"choices":[{"text":"a"}]}', 'data: {"choices":[{"text":"b"}]}', "data: [DONE]"]
    r = _record(lines, [1.0, 1.5, 1.6], start=0.5)
    assert r.ok and not r.tokens_from_usage
    assert r.output_tokens == 2  # counted from text chunks
    assert r.ttft == pytest.approx(0.5) and r.tpot == pytest.approx(0.6)


def test_single_token_has_no_tpot():
    r = _record([_chat("x", "stop"), _usage(1), "data: [DONE]"], [0.1, 0.2, 0.3])
    assert r.ok and r.tpot is None and r.itl == ()
    assert json.loads(r.to_json())["itl_stats"] is None


@pytest.mark.parametrize(
    "lines, error",
    [
        ([_chat("a"), 'data: {"error": {"message": "boom", "code": 500}}'], "error in stream: boom"),
        ([_chat("a"), "data: {not json"], "malformed SSE data"),
        ([_chat("a"), _usage(1)], "without data: [DONE]"),
        ([_usage(0), "data: [DONE]"], "no output text"),
    ],
)
def test_broken_streams_are_failures(lines, error):
    r = _record(lines, [0.1 * i for i in range(1, len(lines) + 1)])
    assert not r.ok and error in r.error


def test_stream_stops_reading_at_done():
    lines = [_chat("a"), "data: [DONE]", _chat("never read")]
    res = read_sse(lines, Clock([0.1, 0.2]))  # a third clock read would raise StopIteration
    assert res.done and len(res.chunk_times) == 1


def test_non_200_status_is_a_failure_even_with_text():
    r = _record([_chat("a"), "data: [DONE]"], [0.1, 0.2], status=500)
    assert not r.ok and r.error == "HTTP 500"


def test_failed_record_json():
    r = RequestRecord.failed(
        ts=5.0,
        endpoint="/v1/completions",
        status=429,
        error="HTTP 429: busy",
        e2e=0.01,
        max_tokens=4,
        target_input_len=3,
    )
    d = json.loads(r.to_json())
    assert d["ok"] is False and d["status"] == 429 and d["ttft"] is None and d["error"] == "HTTP 429: busy"
