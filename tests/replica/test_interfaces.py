"""The seams' Protocols as the engine uses them: which runners it pipelines, and that the real
implementations have the shape their Protocol says."""

from __future__ import annotations

from replica.async_engine import AsyncEngine
from replica.engine import LLMEngine
from replica.interfaces import PipelinedRunner, Runner, ServingEngine
from replica.request import SamplingParams
from tests.replica.fakes import PagedFakeRunner, reference_tokens
from tests.replica.test_engine import BS, GREEDY, VOCAB, CharTokenizer, config


class RunOnly:
    """A ``Runner`` without ``launch``: the engine must step it synchronously."""

    def __init__(self) -> None:
        self.inner = PagedFakeRunner(BS, VOCAB)
        self.block_size, self.vocab_size, self.num_blocks, self.alive = BS, VOCAB, None, True

    def run(self, out):
        return self.inner.run(out)

    def close(self) -> None:
        pass


def test_only_a_pipelined_runner_gets_async_scheduling():
    run_only = RunOnly()
    assert not isinstance(run_only, PipelinedRunner) and isinstance(PagedFakeRunner(BS, VOCAB), PipelinedRunner)
    eng = LLMEngine(config(async_=True), runner=run_only, tokenizer=CharTokenizer())
    params = SamplingParams(max_tokens=6, **GREEDY)
    (out,) = eng.generate(["hello"], params, use_tqdm=False)
    assert list(out.token_ids) == reference_tokens(out.prompt_token_ids, params)
    assert len(run_only.inner.steps) == eng.stats().num_steps == 6  # one run per token: no blind steps


def test_the_engines_and_runners_have_their_protocols_shape():
    # Protocol members present on the classes (mypy checks the signatures; this catches a rename).
    def members(proto: type) -> set[str]:
        return {n for n in vars(proto) if not n.startswith("_")}

    from replica.engine_process import ProcessEngine
    from replica.model_runner import ModelRunner

    for cls in (AsyncEngine, ProcessEngine):
        assert members(ServingEngine) <= set(dir(cls)), cls
    runner_attrs = set(dir(ModelRunner)) | {"block_size", "num_blocks", "vocab_size"}  # set in __init__
    assert members(Runner) | members(PipelinedRunner) <= runner_attrs
    assert members(Runner) | members(PipelinedRunner) <= set(dir(PagedFakeRunner(BS, VOCAB)))
