"""Generate from the command line with the engine (no Ray, no HTTP).

    python -m replica "Write a haiku about GPUs"
    python -m replica --no-chat --max-tokens 32 "The capital of France is"
    python -m replica --model tiny:llama --temperature 0 "anything"
    python -m replica --check-model Qwen/Qwen2.5-0.5B   # served exactly, or refused and why

The default model is the embedded SmolLM2-135M-Instruct, on CPU unless CUDA is present.
One prompt streams its text as it is generated; several prompts run as one batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from replica.config import CacheConfig, EngineConfig, ModelConfig, RunnerConfig, SchedulerConfig
from replica.errors import EngineError
from replica.models import ModelLoadError
from replica.request import SamplingParams

if TYPE_CHECKING:
    from replica.engine import LLMEngine
    from replica.tokenizer import Tokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m replica", description="Generate text with the cbserve engine.")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (several: one batch)")
    p.add_argument(
        "--check-model",
        metavar="MODEL",
        default=None,
        help="load MODEL, print whether the engine serves it exactly (and its features) or why it refuses it",
    )
    p.add_argument(
        "--model",
        default="default",
        help="default | tiny:llama | dummy:qwen2.5-0.5b | HF id or local path (default: %(default)s)",
    )
    p.add_argument("--no-chat", action="store_true", help="plain completion: no chat template")
    p.add_argument("--system", default=None, help="system message (chat mode)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same text)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--kv-cache-gib", type=float, default=0.25, help="KV cache size on CPU")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.check_model is not None:
        return _check_model(args)
    if not args.prompts:
        parser.error("give at least one PROMPT (or --check-model MODEL)")
    from replica.engine import LLMEngine

    config = EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len),
        cache=CacheConfig(cpu_cache_gib=args.kv_cache_gib),
        scheduler=SchedulerConfig(max_num_seqs=max(8, len(args.prompts))),
        runner=RunnerConfig(),
    )
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=tuple(args.stop),
        )
        engine = LLMEngine(config)
        prompts = [_prompt(engine.tokenizer, text, args) for text in args.prompts]
        start = time.perf_counter()
        if len(prompts) == 1:
            n_tokens, reason = _stream(engine, prompts[0], params)
        else:
            outs = engine.generate(prompts, params, use_tqdm=False)
            for i, out in enumerate(outs):
                print(f"--- [{i}] {args.prompts[i]!r}\n{out.text}\n")
            n_tokens, reason = (
                sum(len(o.token_ids) for o in outs),
                ",".join(sorted({o.finish_reason.value for o in outs})),
            )
    except (EngineError, ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    print(
        f"[{n_tokens} tokens in {elapsed:.2f} s, {n_tokens / max(elapsed, 1e-9):.1f} tok/s, finish: {reason}]",
        file=sys.stderr,
    )
    return 0


def _check_model(args: argparse.Namespace) -> int:
    """0: served (verdict on stdout); 1: refused (the feature on stdout); 2: cannot load."""
    from replica.model_check import UnsupportedModelError, check_model
    from replica.models import load_model

    try:
        loaded = load_model(ModelConfig(model=args.check_model, dtype=args.dtype, device=args.device))
        verdict = check_model(loaded)
    except UnsupportedModelError as e:
        print(f"refused: {args.check_model}: {e.feature}: {e.detail}")
        return 1
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.check_model}: {verdict.report()}")
    return 0


def _prompt(tokenizer: Tokenizer, text: str, args: argparse.Namespace) -> str | list[int]:
    if args.no_chat:
        return text
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": text}
    ]
    return tokenizer.apply_chat_template(messages)


def _stream(engine: LLMEngine, prompt: str | list[int], params: SamplingParams) -> tuple[int, str]:
    engine.add_request("cli-0", prompt, params)
    n_tokens, reason = 0, "?"
    while engine.has_unfinished():
        for delta in engine.step():
            print(delta.text, end="", flush=True)
            n_tokens += len(delta.token_ids)
            if delta.finished:
                reason = delta.finish_reason.value if delta.finish_reason else "?"
                if delta.error:
                    print(f"\nerror: {delta.error}", file=sys.stderr)
    print()
    return n_tokens, reason


if __name__ == "__main__":
    sys.exit(main())
