"""Load generators people point at vLLM-compatible servers, run against the Serve app (CPU,
tiny model): guidellm's CLI, a short bounded benchmark with its default request bodies
(streaming chat completions with ``stream_options.continuous_usage_stats``, ``ignore_eos``,
``max_completion_tokens``), must finish every request without an error.

guidellm's tokenizer (it sizes synthetic prompts) is the tiny model's own, from the
converted folder in cbserve's cache, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

APP = "cbserve_loadgen"
MODEL = "tiny:llama"
MAX_REQUESTS = 8
OUTPUT_TOKENS = 8
ARGS = {
    "model": MODEL,
    "num_replicas": 1,
    "num_gpus": 0,
    "num_cpus": 1,
    "accelerator_resource": "fake_gpu",
    "ingress_num_cpus": 0.5,
    "engine": {"dtype": "float32", "max_model_len": 1024, "num_blocks": 128, "block_size": 16, "max_num_seqs": 4},
}


@pytest.fixture(scope="module")
def app(serve_url, deploy_app):
    from ray import serve

    deploy_app({APP: (ARGS, "/")})
    yield serve_url
    serve.delete(APP)


def _guidellm() -> list[str]:
    pytest.importorskip("guidellm")
    exe = shutil.which("guidellm") or str(Path(sys.executable).with_name("guidellm"))
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "guidellm"]


def test_guidellm_bounded_benchmark_has_no_errors(app, tmp_path):
    from replica.default_model import default_tokenizer_dir

    out = tmp_path / "benchmarks.json"
    cmd = [
        *_guidellm(),
        "run",
        "--backend",
        f"kind=openai_http,target={app},model={MODEL}",
        "--profile",
        "kind=concurrent,streams=2",
        "--constraint",
        f"kind=max_requests,count={MAX_REQUESTS}",
        "--tokenizer",
        f"kind=huggingface_auto,model={default_tokenizer_dir()}",
        "--data",
        f"kind=synthetic_text,prompt_tokens=32,output_tokens={OUTPUT_TOKENS}",
        "--output",
        f"kind=json,path={out}",
        "--disable-console-interactive",
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GUIDELLM__LOGGING__CONSOLE_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, f"guidellm failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    report = json.loads(out.read_text())
    (bench,) = report["benchmarks"]
    m = bench["metrics"]
    totals = m["request_totals"]
    out_tokens = m["output_token_count"]["successful"]["total_sum"]
    prompt_tokens = m["prompt_token_count"]["successful"]["total_sum"]
    iterations = m["request_streaming_iterations_count"]["successful"]["mean"]
    print(
        f"guidellm: {totals}, prompt tokens {prompt_tokens}, output tokens {out_tokens}, stream events/req {iterations}"
    )
    assert totals["successful"] == MAX_REQUESTS and totals["total"] == MAX_REQUESTS, totals
    assert totals["errored"] == 0 and totals["incomplete"] == 0, totals
    assert prompt_tokens > 0
    # guidellm sends ignore_eos and max_completion_tokens=output_tokens: every request runs to 8.
    assert out_tokens == MAX_REQUESTS * OUTPUT_TOKENS, out_tokens
    assert iterations > 1  # streamed, not one body
