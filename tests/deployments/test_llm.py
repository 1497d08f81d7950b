"""LLMServer (the replica's logic) against a fake engine: streaming, refusals as values,
abort on disconnect/cancel, reconfigure, draining, stats hooks."""

from __future__ import annotations

import asyncio

import pydantic
import pytest

from deployments.errors import ReplicaError
from deployments.llm import GenerateRequest, LLMReplica, ReplicaStats
from replica.outputs import Delta
from replica.request import FinishReason, SamplingParams
from tests.deployments.fakes import FakeEngine, make_server

pytestmark = pytest.mark.timeout(60)


def req(rid: str = "r1", n_prompt: int = 8, **params) -> GenerateRequest:
    params.setdefault("max_tokens", 5)
    return GenerateRequest(rid, tuple(range(3, 3 + n_prompt)), SamplingParams(**params))


async def test_streams_deltas_until_finished():
    server, engine = await make_server()
    assert engine.started
    items = [d async for d in server.generate(req(max_tokens=5, seed=1))]
    assert all(isinstance(d, Delta) for d in items)
    assert len(items) == 5 and items[-1].finish_reason is FinishReason.LENGTH
    assert items[-1].usage is not None and items[-1].usage.completion_tokens == 5
    assert engine.aborted == []  # a finished request is not aborted
    assert server.stats().num_inflight == 0


@pytest.mark.parametrize(
    "kwargs, code, retry",
    [
        (dict(n_prompt=250, max_tokens=10), "context_length_exceeded", None),
        (None, "queue_full", 1),
    ],
)
async def test_engine_refusal_is_yielded_as_a_value(kwargs, code, retry):
    server, engine = await make_server(FakeEngine(max_running=1, max_waiting=0))
    if kwargs is None:  # fill the only slot first
        busy = server.generate(req("busy"))
        await busy.__anext__()
        kwargs = {}
    items = [d async for d in server.generate(req("x", **kwargs))]
    assert len(items) == 1 and isinstance(items[0], ReplicaError)
    assert items[0].code == code and items[0].retry_after_s == retry
    assert "x" not in engine.blocks


async def test_closing_the_stream_aborts_and_frees_blocks():
    server, engine = await make_server()
    gen = server.generate(req("gone", max_tokens=100))
    first = await gen.__anext__()
    assert isinstance(first, Delta) and engine.blocks["gone"] > 0
    await gen.aclose()  # what Serve does when the HTTP client disconnects (GeneratorExit)
    assert engine.aborted == ["gone"]
    assert engine.stats().num_free_blocks == engine.num_blocks
    assert server.stats().num_inflight == 0


async def test_cancelling_the_consumer_aborts():
    server, engine = await make_server()
    engine.pause.clear()

    async def consume():
        async for _ in server.generate(req("cancelled", max_tokens=100)):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)  # the request is now parked inside the engine stream
    assert "cancelled" in engine.blocks
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.aborted == ["cancelled"] and not engine.blocks


async def test_reconfigure_validates_and_applies():
    server, _ = await make_server(user_config={"routing_num_block_hashes": 2})
    assert server.record_routing_stats()["prefix_hashes"] == [11, 22]
    server.reconfigure({"routing_num_block_hashes": 1, "log_requests": True})
    assert server.record_routing_stats()["prefix_hashes"] == [11]
    with pytest.raises(pydantic.ValidationError, match="extra"):
        server.reconfigure({"no_such_setting": 1})
    with pytest.raises(pydantic.ValidationError):
        server.reconfigure({"drain_timeout_s": -1})


async def test_stream_interval_setting_reaches_the_engine():
    server, engine = await make_server()
    [d async for d in server.generate(req("a"))]
    server.reconfigure({"stream_interval": 8})
    [d async for d in server.generate(req("b"))]
    assert engine.stream_intervals == [1, 8]
    with pytest.raises(pydantic.ValidationError):
        server.reconfigure({"stream_interval": 0})


async def test_shutdown_drains_and_then_refuses_with_unavailable():
    server, engine = await make_server(user_config={"drain_timeout_s": 7})
    await server.shutdown()
    assert engine.closed and engine.shutdown_timeout == 7
    items = [d async for d in server.generate(req())]
    assert len(items) == 1 and isinstance(items[0], ReplicaError) and items[0].code == "engine_unavailable"
    assert server.stats().draining


async def test_stats_hooks_report_engine_state():
    server, engine = await make_server()
    gen = server.generate(req("a", n_prompt=9, max_tokens=50))
    await gen.__anext__()
    stats = server.stats()
    assert isinstance(stats, ReplicaStats) and stats.num_inflight == 1
    assert stats.engine.num_total_blocks - stats.engine.num_free_blocks == 3  # ceil(9 / 4)
    routing = server.record_routing_stats()
    assert routing["num_free_blocks"] == engine.num_blocks - 3 and routing["block_size"] == 4
    auto = server.record_autoscaling_stats()
    assert auto["queue_depth"] == 1.0
    assert all(isinstance(v, float) for v in auto.values())  # Serve rejects non-numbers
    await gen.aclose()


async def test_metrics_observe_ttft_and_finish():
    server, _ = await make_server()
    backend = server._metrics.ttft  # FakeMetric
    [d async for d in server.generate(req(max_tokens=3))]
    assert len(backend.values) == 1 and backend.values[0][0] >= 0
    finished = server._metrics.finished.values
    assert finished == [(1, {"model": "default", "finish_reason": "length"})]
    assert len(server._metrics.tpot.values) == 1


async def test_model_info_comes_from_the_engine():
    server, _engine = await make_server(FakeEngine(max_model_len=99, block_size=8))
    info = server.model_info()
    assert (info.name, info.max_model_len, info.block_size) == ("default", 99, 8)


def test_deployment_is_the_server_with_a_serve_destructor():
    # Serve calls __del__ (async) on graceful shutdown; the plain class stays GC-safe.
    cls = LLMReplica.func_or_class
    assert asyncio.iscoroutinefunction(cls.__del__)
    assert LLMReplica.name == "LLMReplica"


async def test_health_check_fails_when_the_engine_died():
    server, engine = await make_server()
    server.check_health()
    engine.is_dead = True
    with pytest.raises(RuntimeError, match="dead"):
        server.check_health()
