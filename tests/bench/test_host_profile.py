"""bench/host_profile.py's PhaseTimer on CPU: it times the engine's phases without changing
its outputs (the benchmark itself needs CUDA)."""

from __future__ import annotations

from bench.host_profile import PhaseTimer
from replica.request import SamplingParams
from tests.bench.test_throughput import _engine


def test_phase_timer_accounts_every_phase_and_leaves_outputs_unchanged():
    prompts = [[(i * 5 + j) % 150 + 3 for j in range(8 + 5 * i)] for i in range(4)]
    params = [SamplingParams(max_tokens=6 + i, temperature=0.0, ignore_eos=True) for i in range(4)]
    expected = [list(o.token_ids) for o in _engine().generate(prompts, params, use_tqdm=False)]

    engine = _engine()
    timer = PhaseTimer(engine)
    got = [list(o.token_ids) for o in engine.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert set(timer.acc) == {"schedule_next", "launch", "update", "wait_for_device"}
    assert all(v > 0 for v in timer.acc.values())
