"""Read an OpenAI-style SSE stream and turn its timing into one request record.

Definitions (all durations in seconds):

- TTFT: request sent -> first chunk that carries output text.
- E2E: request sent -> end of the stream (``data: [DONE]``).
- TPOT: (E2E - TTFT) / (output_tokens - 1); undefined for a single output token.
- ITL: gaps between successive text-bearing chunks. A chunk may carry several tokens (the
  server's detokenizer holds text back at word/UTF-8 boundaries), so ITL is what a client sees
  and TPOT is the per-token figure.

Output tokens come from the final usage chunk (``stream_options.include_usage``); when a server
sends none, the count of text-bearing chunks stands in and ``tokens_from_usage`` is false.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StreamResult:
    """What arrived on one stream, with arrival times from the caller's monotonic clock."""

    chunk_times: list[float] = field(default_factory=list)  # text-bearing chunks only
    end_time: float | None = None
    usage: dict[str, Any] | None = None
    text_chars: int = 0
    finish_reason: str | None = None
    done: bool = False  # saw data: [DONE]
    error: str | None = None  # an error object inside the stream, or malformed data


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):  # chat.completion.chunk
        return delta.get("content") or ""
    return choice.get("text") or ""  # text_completion


def read_sse(lines: Iterable[bytes | str], clock: Callable[[], float]) -> StreamResult:
    """Consume ``data:`` lines until ``[DONE]``; stamp each text-bearing chunk with ``clock()``."""
    res = StreamResult()
    for raw in lines:
        now = clock()
        line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        line = line.strip()
        if not line.startswith("data:"):
            continue  # blank separators, ": keep-alive" comments, event:/id: fields
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            res.done = True
            res.end_time = now
            break
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            res.error = f"malformed SSE data: {payload[:200]!r}"
            res.end_time = now
            break
        if "error" in chunk:
            err = chunk["error"]
            res.error = f"error in stream: {err.get('message', err) if isinstance(err, dict) else err}"
            res.end_time = now
            break
        if chunk.get("usage"):
            res.usage = chunk["usage"]
        text = _chunk_text(chunk)
        if text:
            res.chunk_times.append(now)
            res.text_chars += len(text)
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                res.finish_reason = choice["finish_reason"]
        res.end_time = now
    return res


def _pct(sorted_xs: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    k = max(0, min(len(sorted_xs) - 1, round(q / 100 * (len(sorted_xs) - 1))))
    return sorted_xs[k]


@dataclass(frozen=True)
class RequestRecord:
    """One line of the per-request JSONL."""

    ts: float  # wall clock (unix seconds) when the request was sent
    endpoint: str
    status: int  # HTTP status; 0 when no response arrived
    ok: bool
    ttft: float | None
    tpot: float | None
    e2e: float | None
    itl: tuple[float, ...]  # gaps between text chunks
    output_tokens: int
    prompt_tokens: int | None
    tokens_from_usage: bool
    max_tokens: int
    target_input_len: int | None
    error: str | None = None
    scheduled_lag: float = 0.0  # open loop: how late the send was against its Poisson slot

    @classmethod
    def from_stream(
        cls,
        res: StreamResult,
        *,
        ts: float,
        start: float,
        endpoint: str,
        status: int,
        max_tokens: int,
        target_input_len: int | None,
        scheduled_lag: float = 0.0,
    ) -> RequestRecord:
        error = res.error
        if error is None and not res.done:
            error = "stream ended without data: [DONE]"
        usage_tokens = (res.usage or {}).get("completion_tokens")
        tokens_from_usage = isinstance(usage_tokens, int)
        output_tokens = usage_tokens if tokens_from_usage else len(res.chunk_times)
        ttft = res.chunk_times[0] - start if res.chunk_times else None
        e2e = res.end_time - start if res.end_time is not None else None
        tpot = None
        if ttft is not None and e2e is not None and output_tokens > 1:
            tpot = (e2e - ttft) / (output_tokens - 1)
        itl = tuple(b - a for a, b in zip(res.chunk_times, res.chunk_times[1:]))
        if error is None and status != 200:
            error = f"HTTP {status}"
        if error is None and ttft is None:
            error = "no output text in stream"
        ok = error is None
        return cls(
            ts=ts,
            endpoint=endpoint,
            status=status,
            ok=ok,
            ttft=ttft,
            tpot=tpot,
            e2e=e2e,
            itl=itl,
            output_tokens=output_tokens,
            prompt_tokens=(res.usage or {}).get("prompt_tokens"),
            tokens_from_usage=tokens_from_usage,
            max_tokens=max_tokens,
            target_input_len=target_input_len,
            error=error,
            scheduled_lag=scheduled_lag,
        )

    @classmethod
    def failed(
        cls,
        *,
        ts: float,
        endpoint: str,
        status: int,
        error: str,
        e2e: float | None,
        max_tokens: int,
        target_input_len: int | None,
        scheduled_lag: float = 0.0,
    ) -> RequestRecord:
        return cls(
            ts=ts,
            endpoint=endpoint,
            status=status,
            ok=False,
            ttft=None,
            tpot=None,
            e2e=e2e,
            itl=(),
            output_tokens=0,
            prompt_tokens=None,
            tokens_from_usage=False,
            max_tokens=max_tokens,
            target_input_len=target_input_len,
            error=error,
            scheduled_lag=scheduled_lag,
        )

    def to_json(self, *, itl_list: bool = False) -> str:
        """One JSONL line; ITL as summary stats, plus the full list when asked."""
        d: dict[str, Any] = {
            "type": "request",
            "ts": round(self.ts, 6),
            "endpoint": self.endpoint,
            "status": self.status,
            "ok": self.ok,
            "ttft": self.ttft,
            "tpot": self.tpot,
            "e2e": self.e2e,
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "tokens_from_usage": self.tokens_from_usage,
            "max_tokens": self.max_tokens,
            "target_input_len": self.target_input_len,
            "scheduled_lag": round(self.scheduled_lag, 6),
            "error": self.error,
        }
        if self.itl:
            s = sorted(self.itl)
            d["itl_stats"] = {
                "n": len(s),
                "mean": statistics.fmean(s),
                "p50": _pct(s, 50),
                "p90": _pct(s, 90),
                "p99": _pct(s, 99),
                "max": s[-1],
            }
        else:
            d["itl_stats"] = None
        if itl_list:
            d["itl"] = [round(x, 6) for x in self.itl]
        return json.dumps(d, separators=(",", ":"))
