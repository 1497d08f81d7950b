"""KV-cache-aware router vs Ray Serve's default router, end to end over HTTP.

    python -m bench.router_bench                                  # tiny:llama, 2 replicas per router
    python -m bench.router_bench --model default --conversations 8 --turns 4 --out bench/results/router.json

Deploys two copies of the app in one Ray cluster, ``/kv`` (router.kv_router) and
``/default`` (Serve's power of two choices), with identical engines and replicas,
and runs the same multi-turn chat workload against each in turn: every conversation
starts from its own long context and each turn resends the whole history plus a new
user message, so turn N shares its prefix with turn N-1 - the case a prefix cache is
for, if the turn lands where the history is cached. ``--url`` runs the workload only,
against an app already serving (no deployment).

Per router: prefix-cache hit rate (cached prompt tokens / prompt tokens, from the
responses' usage, overall and on follow-up turns), time to first token p50/p99,
output tokens/s (all completion tokens / wall time), errors. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
    "river",
    "mountain",
    "forest",
    "ocean",
    "desert",
    "engine",
    "kernel",
    "buffer",
    "packet",
    "socket",
    "thread",
    "mutex",
    "cache",
    "block",
    "page",
    "table",
    "vector",
    "matrix",
    "tensor",
    "graph",
]


@dataclass
class TurnResult:
    conversation: int
    turn: int
    ok: bool
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    error: str | None = None


@dataclass
class RouterResult:
    router: str
    requests: int
    errors: int
    wall_s: float
    prefix_hit_rate: float  # cached / prompt tokens, all turns
    followup_hit_rate: float  # same, turns >= 2 only (turn 1 can never hit)
    ttft_p50_ms: float
    ttft_p99_ms: float
    output_tokens_per_s: float
    turns: list[TurnResult] = field(default_factory=list)


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def _context(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def _chat_turn(
    client: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int
) -> tuple[TurnResult, str]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = TurnResult(conversation=-1, turn=-1, ok=False)
    start = time.perf_counter()
    text: list[str] = []
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return r, ""
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    r.error = str(chunk["error"])[:200]
                    return r, ""
                for choice in chunk.get("choices") or ():
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        if r.ttft_s is None:
                            r.ttft_s = time.perf_counter() - start
                        text.append(delta)
                usage = chunk.get("usage")
                if usage:
                    r.prompt_tokens = usage["prompt_tokens"]
                    r.completion_tokens = usage["completion_tokens"]
                    r.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        r.ok = r.prompt_tokens > 0
        if not r.ok:
            r.error = "stream ended without usage"
    except httpx.HTTPError as exc:
        r.error = f"{type(exc).__name__}: {exc}"
    r.latency_s = time.perf_counter() - start
    return r, "".join(text)


async def run_workload(
    url: str,
    *,
    router: str,
    model: str,
    conversations: int,
    turns: int,
    context_words: int,
    user_words: int,
    max_tokens: int,
    concurrency: int,
    seed: int,
    timeout_s: float,
    think_time_s: float = 0.0,
) -> RouterResult:
    """Conversations run concurrently (at most ``concurrency``); turns within one run in order,
    separated by a think time drawn from [0.5, 1.5] x ``think_time_s`` (the user reading and
    typing). Without it a closed loop flatters queue-length routing: the replica that just
    finished a conversation's turn has the shortest queue, so the next turn goes back there."""
    sem = asyncio.Semaphore(concurrency)
    results: list[TurnResult] = []

    async def conversation(client: httpx.AsyncClient, c: int) -> None:
        rng = random.Random(seed * 1_000_003 + c)  # same workload for every router
        messages = [{"role": "system", "content": f"Conversation {c}. Context: {_context(rng, context_words)}"}]
        async with sem:
            for t in range(turns):
                messages.append({"role": "user", "content": f"Turn {t}: {_context(rng, user_words)}"})
                res, reply = await _chat_turn(client, url, model, messages, max_tokens)
                res.conversation, res.turn = c, t
                results.append(res)
                if not res.ok:
                    return
                messages.append({"role": "assistant", "content": reply})
                if think_time_s > 0 and t + 1 < turns:
                    await asyncio.sleep(think_time_s * rng.uniform(0.5, 1.5))

    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(conversation(client, c) for c in range(conversations)))
        wall = time.perf_counter() - start

    ok = [r for r in results if r.ok]
    follow = [r for r in ok if r.turn > 0]
    ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]

    def hit(rs: list[TurnResult]) -> float:
        return sum(r.cached_tokens for r in rs) / max(1, sum(r.prompt_tokens for r in rs))

    return RouterResult(
        router=router,
        requests=len(results),
        errors=len(results) - len(ok),
        wall_s=wall,
        prefix_hit_rate=hit(ok),
        followup_hit_rate=hit(follow),
        ttft_p50_ms=_pct(ttfts, 50),
        ttft_p99_ms=_pct(ttfts, 99),
        output_tokens_per_s=sum(r.completion_tokens for r in ok) / wall if wall > 0 else 0.0,
        turns=sorted(results, key=lambda r: (r.conversation, r.turn)),
    )


# -------------------------------------------------------------------- deployment


def app_args(args: argparse.Namespace, *, kv_router: bool) -> dict[str, Any]:
    """The app's arguments: deployments.yaml's router settings for /kv, none for /default."""
    a: dict[str, Any] = {
        "model": args.model,
        "num_replicas": args.replicas,
        "num_cpus": args.replica_cpus,
        "engine": {"block_size": args.block_size, "num_blocks": args.num_blocks, "max_num_seqs": 32},
    }
    if kv_router:
        a["router"] = kv_router_args(args)
    return a


def kv_router_args(args: argparse.Namespace) -> dict[str, Any]:
    cfg = _yaml_router_args()
    cfg.setdefault("request_router_class", "router.kv_router:KVCacheAwareRouter")
    cfg.setdefault("request_routing_stats_period_s", args.stats_period_s)
    return cfg


def _yaml_router_args() -> dict[str, Any]:
    """The ``router`` block of deployments.yaml's first app, so the bench runs what ships."""
    path = Path(__file__).resolve().parents[1] / "deployments.yaml"
    try:
        import yaml

        doc = yaml.safe_load(path.read_text())
        return dict(doc["applications"][0]["args"]["router"])
    except (OSError, KeyError, IndexError, TypeError):
        return {}


def deploy(args: argparse.Namespace) -> str:
    import ray
    from ray import serve

    from deployments.app import build_app

    if not ray.is_initialized():
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    for name, kv in (("kv", True), ("default", False)):
        serve.run(build_app(app_args(args, kv_router=kv)), name=name, route_prefix=f"/{name}", blocking=False)
    return f"http://127.0.0.1:{args.port}"


async def _wait_ready(url: str, timeout_s: float = 600) -> str:
    """Wait until the app answers; returns its model name."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            try:
                r = await client.get(f"{url}/v1/models")
                if r.status_code == 200:
                    return r.json()["data"][0]["id"]
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout_s}s")
            await asyncio.sleep(1)


def print_table(results: list[RouterResult]) -> None:
    head = f"{'router':<10}{'requests':>9}{'errors':>7}{'hit rate':>10}{'follow-up':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'out tok/s':>11}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r.router:<10}{r.requests:>9}{r.errors:>7}{r.prefix_hit_rate:>10.1%}{r.followup_hit_rate:>11.1%}"
            f"{r.ttft_p50_ms:>8.0f}ms{r.ttft_p99_ms:>8.0f}ms{r.output_tokens_per_s:>11.1f}"
        )


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


async def main_async(args: argparse.Namespace) -> list[RouterResult]:
    if args.url:
        targets = [(args.url_name, args.url.rstrip("/"))]
    else:
        base = deploy(args)
        targets = [(name, f"{base}/{name}") for name in args.order.split(",")]
    results = []
    for name, url in targets:
        model = await _wait_ready(url)
        # Warm-up outside the measurement: model load, first-step overheads; an unrelated prompt.
        await run_workload(
            url,
            router=name,
            model=model,
            conversations=2,
            turns=1,
            context_words=8,
            user_words=4,
            max_tokens=4,
            concurrency=2,
            seed=-1,
            timeout_s=args.timeout_s,
        )
        res = await run_workload(
            url,
            router=name,
            model=model,
            conversations=args.conversations,
            turns=args.turns,
            context_words=args.context_words,
            user_words=args.user_words,
            max_tokens=args.max_tokens,
            concurrency=args.concurrency,
            seed=args.seed,
            timeout_s=args.timeout_s,
            think_time_s=args.think_time_s,
        )
        results.append(res)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny:llama", help='model of both apps ("tiny:llama", "default", ...)')
    p.add_argument("--replicas", type=int, default=2, help="LLMReplica count per router")
    p.add_argument("--replica-cpus", type=float, default=0.5, help="CPUs reserved per replica (logical)")
    p.add_argument("--ray-cpus", type=int, default=16, help="logical CPUs of the local Ray cluster")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=1024, help="KV blocks per replica")
    p.add_argument(
        "--stats-period-s", type=float, default=1.0, help="request_routing_stats_period_s if the yaml has none"
    )
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--context-words", type=int, default=300, help="words of each conversation's own context")
    p.add_argument("--user-words", type=int, default=20, help="words per user message")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per turn")
    p.add_argument("--concurrency", type=int, default=6, help="conversations in flight at once")
    p.add_argument("--think-time-s", type=float, default=1.0, help="mean pause between a reply and the next turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", default="kv,default", help="which apps to run, in order")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--timeout-s", type=float, default=300)
    p.add_argument("--url", default=None, help="run only the workload against this base URL")
    p.add_argument("--url-name", default="external", help="label for --url in the table")
    p.add_argument("--out", default="bench/results/router_bench.json", help="JSON output path")
    args = p.parse_args(argv)
    if args.conversations < 1 or args.turns < 1 or args.concurrency < 1 or args.replicas < 1:
        p.error("--conversations, --turns, --concurrency and --replicas must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = parse_args(argv)
    results = asyncio.run(main_async(args))
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": machine(),
        "args": vars(args),
        "results": [{**asdict(r), "turns": [asdict(t) for t in r.turns]} for r in results],
    }
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")
    if not args.url:
        from ray import serve

        serve.shutdown()
    return 0 if all(r.errors == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
