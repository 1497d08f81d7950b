"""deployments/mux.py: multiplexed replica streams, both sides, in-process (no Ray): a fake
DeploymentHandle routes ``submit`` round-robin and ``pump``/``abort_request`` to the replica
they name, as router.kv_router does."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
from typing import Any

import pytest

from deployments import mux
from deployments.errors import ReplicaError
from deployments.llm import GenerateRequest, LLMServer
from deployments.mux import MuxLLMClient, Outboxes
from replica.outputs import Delta
from replica.request import FinishReason, SamplingParams
from tests.deployments.fakes import FakeEngine, make_server


class _Call:
    def __init__(self, handle: FakeHandle, method: str) -> None:
        self._h, self._m = handle, method

    def remote(self, *args: Any) -> Any:
        return self._h.call(self._m, args)


class _Gen:
    """A streaming DeploymentResponseGenerator look-alike over an async generator."""

    def __init__(self, agen: Any) -> None:
        self._agen = agen
        self.cancelled = False

    def __aiter__(self) -> _Gen:
        return self

    async def __anext__(self) -> Any:
        return await self._agen.__anext__()

    def cancel(self) -> None:
        self.cancelled = True
        asyncio.get_running_loop().create_task(self._agen.aclose())


class FakeHandle:
    def __init__(self, servers: list[LLMServer], *, stream: bool = False, calls: list | None = None) -> None:
        self.servers = servers
        self.by_id = {s._replica_id: s for s in servers}
        self.stream = stream
        self.calls = [] if calls is None else calls
        self._rr = itertools.cycle(servers)
        self.pumps: list[_Gen] = []

    def options(self, *, stream: bool = False) -> FakeHandle:
        h = FakeHandle(self.servers, stream=stream, calls=self.calls)
        h._rr, h.pumps = self._rr, self.pumps
        return h

    def __getattr__(self, method: str) -> _Call:
        return _Call(self, method)

    def call(self, method: str, args: tuple) -> Any:
        self.calls.append((method, args))
        target = getattr(args[0], "target_replica_id", None)
        server = self.by_id[target] if target is not None else next(self._rr)
        result = getattr(server, method)(*args)
        if self.stream:
            gen = _Gen(result)
            if method == "pump":
                self.pumps.append(gen)
            return gen
        return result


def greq(rid: str, max_tokens: int = 5, seed: int = 1) -> GenerateRequest:
    return GenerateRequest(rid, (1, 2, 3), SamplingParams(max_tokens=max_tokens, seed=seed))


async def collect(client: MuxLLMClient, req: GenerateRequest) -> tuple[str, list[Delta | ReplicaError]]:
    items = [i async for i in client.generate(req)]
    return "".join(i.text for i in items if isinstance(i, Delta)), items


async def expected_text(req: GenerateRequest) -> str:
    """What the fake engine produces for the request, read straight from its stream."""
    engine = FakeEngine()
    return "".join([d.text async for d in engine.add_request(req.request_id, list(req.prompt_token_ids), req.params)])


@pytest.fixture
async def two_replicas():
    servers, engines = [], []
    for _ in range(2):
        server, engine = await make_server(FakeEngine(max_running=8, max_waiting=8))
        servers.append(server)
        engines.append(engine)
    yield FakeHandle(servers), engines
    for s in servers:
        s._metrics_task.cancel()


async def test_every_request_gets_its_own_text_over_one_pump_per_replica(two_replicas):
    handle, engines = two_replicas
    client = MuxLLMClient(handle)
    reqs = [greq(f"r{i}", max_tokens=3 + i, seed=i) for i in range(8)]
    results = await asyncio.gather(*(collect(client, r) for r in reqs))
    for r, (text, items) in zip(reqs, results, strict=True):
        assert text == await expected_text(r)
        last = items[-1]
        assert isinstance(last, Delta) and last.finish_reason is FinishReason.LENGTH
        assert sum(len(i.token_ids) for i in items) == r.params.max_tokens
    pumps = [args[0].target_replica_id for m, args in handle.calls if m == "pump"]
    assert sorted(pumps) == sorted(s._replica_id for s in handle.servers)  # one each, reused by 8 requests
    assert all(not e.blocks for e in engines)


async def test_a_pump_item_carries_many_requests_deltas():
    out = Outboxes(abort=lambda rid: None)
    sinks = [out.sink("ing", f"r{i}") for i in range(4)]
    pump = out.pump("ing")
    assert await pump.__anext__() == []  # hello
    for step in range(3):  # three engine steps before the pump runs again
        for i, sink in enumerate(sinks):
            sink(Delta(f"r{i}", "x", (step,)))
    batch = await pump.__anext__()
    assert len(batch) == 12 and {d.request_id for d in batch} == {"r0", "r1", "r2", "r3"}
    await pump.aclose()


async def test_a_closed_stream_aborts_on_the_replica_that_runs_it(two_replicas):
    handle, engines = two_replicas
    client = MuxLLMClient(handle)
    for e in engines:
        e.pause.clear()
    agen = client.generate(greq("gone", max_tokens=50))
    first = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(0.05)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await agen.aclose()
    await asyncio.sleep(0.05)
    aborts = [args[0] for m, args in handle.calls if m == "abort_request"]
    assert [a.request_id for a in aborts] == ["gone"]
    owner = handle.by_id[aborts[0].target_replica_id]
    assert "gone" in owner._engine.aborted and not owner._engine.blocks
    assert not owner._live


async def test_an_ingress_that_goes_away_aborts_its_requests():
    aborted: list[str] = []
    out = Outboxes(abort=aborted.append)
    out.sink("ing", "a")
    finish_b = out.sink("ing", "b")
    finish_b(Delta("b", "done", (1,), FinishReason.STOP))  # finished: nothing to abort
    pump = out.pump("ing")
    await pump.__anext__()
    await pump.aclose()  # what Serve's cancellation does
    assert aborted == ["a"] and out.num_channels == 0


async def test_an_idle_pump_ends_and_the_next_request_reopens_it(two_replicas, monkeypatch):
    monkeypatch.setattr(mux, "PUMP_IDLE_S", 0.05)
    handle, _ = two_replicas
    client = MuxLLMClient(handle)
    r1 = greq("one")
    assert (await collect(client, r1))[0] == await expected_text(r1)
    await asyncio.sleep(0.3)
    assert not client._pumps  # ended by the replica, not left open
    r2, r3 = greq("two", seed=7), greq("three", seed=8)
    texts = await asyncio.gather(collect(client, r2), collect(client, r3))
    assert [t for t, _ in texts] == [await expected_text(r2), await expected_text(r3)]
    assert sum(1 for m, _ in handle.calls if m == "pump") >= 3


async def test_an_orphan_channel_is_aborted_after_the_timeout():
    aborted: list[str] = []
    out = Outboxes(abort=aborted.append)
    out.sink("ing", "x")
    assert out.reap() == 0 and aborted == []
    assert out.reap(now=10**9) == 1 and aborted == ["x"] and out.num_channels == 0


async def test_refusals_come_back_typed(two_replicas):
    handle, _engines = two_replicas
    client = MuxLLMClient(handle)
    too_long = GenerateRequest("long", (1,) * 10, SamplingParams(max_tokens=1000))
    _, items = await collect(client, too_long)
    assert len(items) == 1 and isinstance(items[0], ReplicaError) and items[0].code == "context_length_exceeded"
    assert not handle.servers[0]._live and not handle.servers[1]._live


async def test_a_replica_whose_pump_fails_ends_its_requests_with_an_error(two_replicas):
    handle, engines = two_replicas
    for e in engines:
        e.pause.clear()  # no output: the request is mid-flight when its replica dies

    async def dying_pump(target: Any) -> Any:
        yield []
        await asyncio.sleep(0.05)
        raise ConnectionError("replica died")  # what the stream of a dead actor raises

    for s in handle.servers:
        s.pump = dying_pump
    client = MuxLLMClient(handle)
    _, items = await asyncio.wait_for(collect(client, greq("doomed", max_tokens=50)), 5)
    assert len(items) == 1 and isinstance(items[0], ReplicaError) and items[0].code == "engine_unavailable"
    assert "died" not in items[0].message  # remote error text stays in the log


async def test_a_client_gone_while_its_submit_is_in_flight_is_still_aborted(two_replicas):
    handle, engines = two_replicas
    for e in engines:
        e.pause.clear()
    for s in handle.servers:
        real = s.submit

        async def slow_submit(req: GenerateRequest, channel: str, real: Any = real) -> Any:
            await asyncio.sleep(0.1)  # the client leaves meanwhile
            return await real(req, channel)

        s.submit = slow_submit
    client = MuxLLMClient(handle)
    agen = client.generate(greq("early", max_tokens=50))
    task = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0.3)
    aborts = [args[0] for m, args in handle.calls if m == "abort_request"]
    assert [a.request_id for a in aborts] == ["early"]
    owner = handle.by_id[aborts[0].target_replica_id]
    assert not owner._live and "early" in owner._engine.aborted


REQUEST = contextvars.ContextVar("request", default=None)  # stands in for Serve's request context


async def test_pump_and_aborts_are_not_tied_to_the_request_that_opened_them(two_replicas, monkeypatch):
    """Serve cancels the handle calls a request made once that request is cancelled (its client
    left), and tasks inherit their creator's context: a pump opened by one request carries the
    others' deltas, so it must not run in that request's context (nor must aborts)."""
    handle, engines = two_replicas
    seen: list[tuple[str, Any]] = []
    real_call = FakeHandle.call

    def call(self: FakeHandle, method: str, args: tuple) -> Any:
        seen.append((method, REQUEST.get()))
        return real_call(self, method, args)

    monkeypatch.setattr(FakeHandle, "call", call)  # the streaming handle (options) is another instance
    client = MuxLLMClient(handle)
    for e in engines:
        e.pause.clear()

    async def as_request(rid: str) -> Any:
        REQUEST.set(rid)
        agen = client.generate(greq(rid, max_tokens=50))
        first = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0.05)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await agen.aclose()

    await asyncio.create_task(as_request("opener"))
    await asyncio.sleep(0.05)
    by_method = {m: {r for mm, r in seen if mm == m} for m, _ in seen}
    assert by_method["submit"] == {"opener"}  # the submit itself belongs to its request
    assert by_method["pump"] == {None} and by_method["abort_request"] == {None}


async def test_a_cancelled_pump_ends_its_requests_instead_of_leaving_them_waiting(two_replicas):
    handle, engines = two_replicas
    for e in engines:
        e.pause.clear()
    client = MuxLLMClient(handle)
    reqs = [asyncio.ensure_future(collect(client, greq(f"r{i}", max_tokens=50))) for i in range(4)]
    await asyncio.sleep(0.05)
    assert client._pumps
    for task in list(client._pumps.values()):
        task.cancel()  # e.g. Serve cancelled it along with a request
    results = await asyncio.wait_for(asyncio.gather(*reqs), 5)
    for _, items in results:
        assert isinstance(items[-1], ReplicaError) and items[-1].code == "engine_unavailable"
