"""The engine in a process of its own, behind the same asyncio facade as ``AsyncEngine``.

Why: in a Serve replica, the engine's step thread shares one GIL with everything Ray and Serve
do per request and per stream item; measured on an H200, that work stretched the engine's step
from 4.8 to 12.5 ms at 256 streams. Here the step loop (an ``AsyncEngine``) runs in a child
process that owns the GPU, and the two sides exchange one pickled message per step over a pipe
(as vLLM's API server and its EngineCore do):

    parent -> child   ("submit", id, prompt, params) | ("abort", id) | ("shutdown", drain_s)
                      (submits and aborts reach the engine from the child's pipe reader thread)
    child -> parent   [(kind, ...), ...] per wake-up of the child's loop:
                      ("ack", id, error | None)   the request is queued, or why it was refused
                                                  (its first deltas may come before it)
                      ("delta", Delta)            in order per request
                      ("stats", EngineStats, prefix hashes)   at most every STATS_PERIOD_S
                      ("dead", why)               the step loop died: nothing more will come

Refusals stay typed: ``submit_checked`` awaits the child's ack (a fraction of a millisecond:
the child's loop is free while its step thread runs). A child that dies ends every open
request with an ERROR delta and makes ``is_dead`` true, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import pickle
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from replica.config import EngineConfig
from replica.errors import EngineError, EngineUnavailableError, check_accepting
from replica.outputs import Delta, EngineStats, Usage
from replica.request import FinishReason, SamplingParams

logger = logging.getLogger(__name__)

STATS_PERIOD_S = 0.2
START_TIMEOUT_S = 900.0  # model load + CUDA graphs + warm-up


# ----------------------------------------------------------------------------- child


def _child_main(config: EngineConfig, conn: Any) -> None:
    """Entry point of the engine process: load, start, serve the pipe until shutdown."""
    try:
        asyncio.run(_child(config, conn))
    except BaseException as e:  # the parent learns why from its end of the pipe
        with contextlib.suppress(Exception):
            conn.send_bytes(pickle.dumps([("dead", f"engine process failed: {e!r}")]))
        raise


async def _child(config: EngineConfig, conn: Any) -> None:
    from replica.async_engine import AsyncEngine
    from replica.tensor_parallel import load_engine_model

    engine = AsyncEngine(config, loaded=load_engine_model(config))
    await engine.start()
    loop = asyncio.get_running_loop()
    out: list[tuple[Any, ...]] = []
    flush_pending = False
    last_stats = 0.0
    send_lock = threading.Lock()

    def send(msgs: list[tuple[Any, ...]]) -> None:
        with send_lock:
            conn.send_bytes(pickle.dumps(msgs, protocol=pickle.HIGHEST_PROTOCOL))

    def flush() -> None:
        nonlocal flush_pending, out, last_stats
        flush_pending = False
        now = time.monotonic()
        if now - last_stats >= STATS_PERIOD_S:
            last_stats = now
            out.append(("stats", engine.stats(), engine.cached_block_hashes(4096)))
            if engine.is_dead:
                out.append(("dead", "engine step loop died"))
        if out:
            msgs, out = out, []
            send(msgs)

    def flush_soon() -> None:
        nonlocal flush_pending
        if not flush_pending:  # one message per wake-up: everything this turn of the loop made
            flush_pending = True
            loop.call_soon(flush)

    def emit(msg: tuple[Any, ...]) -> None:
        out.append(msg)
        flush_soon()

    def on_delta(d: Delta) -> None:
        emit(("delta", d))

    stop = asyncio.Event()
    drain_s = 0.0

    def handle(msgs: list[tuple[Any, ...]]) -> None:
        nonlocal drain_s
        for msg in msgs:
            kind = msg[0]
            if kind == "ack":
                emit(msg)
            elif kind == "shutdown":
                drain_s = msg[1]
                stop.set()

    def reader() -> None:
        while True:
            try:
                msgs = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the parent is gone: stop
                loop.call_soon_threadsafe(stop.set)
                return
            # Submits and aborts go to the engine from here, in order: a request reaches the step
            # thread without first waking this process's event loop (one thread hand-off less
            # before its first step); the acks and everything else are the loop's.
            rest: list[tuple[Any, ...]] = []
            for msg in msgs:
                if msg[0] == "submit":
                    _, rid, prompt, params = msg
                    error: EngineError | None = None
                    try:
                        engine.submit_from_thread(rid, prompt, params, on_delta)
                    except EngineError as e:
                        error = e
                    except Exception as e:  # a bug must refuse this request, not stop the reader
                        logger.exception("request %s: submit failed", rid)
                        error = EngineError(f"internal error: {type(e).__name__}")
                    rest.append(("ack", rid, error))
                elif msg[0] == "abort":
                    engine.abort_nowait(msg[1])
                else:
                    rest.append(msg)
            if rest:
                loop.call_soon_threadsafe(handle, rest)

    threading.Thread(target=reader, name="engine-pipe-reader", daemon=True).start()
    emit(("stats", engine.stats(), engine.cached_block_hashes(4096)))
    ticker = loop.create_task(_tick(flush_soon))
    await stop.wait()
    ticker.cancel()
    await engine.shutdown(drain_timeout_s=drain_s)
    flush()
    send([("closed",)])


async def _tick(flush_soon: Callable[[], None]) -> None:
    """Stats reach the parent even while no request runs."""
    while True:
        await asyncio.sleep(STATS_PERIOD_S)
        flush_soon()


# ----------------------------------------------------------------------------- parent


class ProcessEngine:
    """``AsyncEngine``'s facade over an engine process (see the module docstring)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._sinks: dict[str, Callable[[Delta], None]] = {}
        self._acks: dict[str, asyncio.Future[None]] = {}
        self._stats: EngineStats | None = None
        self._hashes: list[int] = []
        self._dead: str | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: Any = None
        self._conn: Any = None
        self._ready = asyncio.Event()
        self._done = asyncio.Event()
        self._send_lock = threading.Lock()

    # ----- facade -----------------------------------------------------------------------

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    @property
    def max_model_len(self) -> int:
        return self.stats().max_model_len

    @property
    def block_size(self) -> int:
        return self.stats().block_size

    async def start(self) -> None:
        if self._proc is not None:
            return
        self._loop = asyncio.get_running_loop()
        ctx = mp.get_context("spawn")  # CUDA cannot be initialised in a forked child
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(self.config, child), name="cbserve-engine", daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        threading.Thread(target=self._read, name="engine-pipe-reader", daemon=True).start()
        ready = asyncio.ensure_future(self._ready.wait())
        done = asyncio.ensure_future(self._done.wait())
        await asyncio.wait({ready, done}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        for t in (ready, done):
            t.cancel()
        if self._stats is None:
            raise EngineUnavailableError(f"the engine process did not start: {self._dead or 'timed out'}")

    async def submit_checked(
        self, request_id: str, prompt: Any, params: SamplingParams | None, on_delta: Callable[[Delta], None]
    ) -> None:
        """Queue a request in the engine process; raises its refusal (typed) if it has one."""
        check_accepting(self._dead, self._closed)
        if request_id in self._sinks:
            from replica.errors import InvalidRequestError

            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        assert self._loop is not None
        ack: asyncio.Future[None] = self._loop.create_future()
        self._acks[request_id] = ack
        self._sinks[request_id] = on_delta
        self._send([("submit", request_id, list(prompt), params or SamplingParams())])
        try:
            await ack
        except BaseException:
            self._sinks.pop(request_id, None)
            raise

    def add_request(
        self, request_id: str, prompt: Any, params: SamplingParams | None = None, *, stream_interval: int = 1
    ) -> AsyncIterator[Delta]:
        """The per-request stream form, as ``AsyncEngine.add_request`` (``stream_interval``
        included); a refusal raises from the first iteration."""
        return self._stream(request_id, prompt, params, stream_interval)

    async def _stream(
        self, request_id: str, prompt: Any, params: SamplingParams | None, interval: int
    ) -> AsyncIterator[Delta]:
        from replica.async_engine import coalesced

        queue: asyncio.Queue[Delta] = asyncio.Queue()
        await self.submit_checked(request_id, prompt, params, queue.put_nowait)
        # aclosing: closing this stream closes the inner one now, which aborts an unfinished request.
        async with contextlib.aclosing(coalesced(queue, interval, lambda: self.abort_nowait(request_id))) as deltas:
            async for d in deltas:
                yield d

    async def abort(self, request_id: str) -> None:
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)
        if self._dead is None and self._conn is not None:
            self._send([("abort", request_id)])

    def stats(self) -> EngineStats:
        if self._stats is None:
            raise EngineUnavailableError("the engine process has not reported yet")
        return self._stats

    def cached_block_hashes(self, limit: int = 4096) -> list[int]:
        return self._hashes[:limit]

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        if self._closed or self._proc is None:
            return
        self._closed = True
        if self._dead is None:
            self._send([("shutdown", drain_timeout_s)])
            try:
                await asyncio.wait_for(self._done.wait(), drain_timeout_s + 30)
            except asyncio.TimeoutError:
                logger.warning("engine process did not stop in time; killing it")
        await asyncio.to_thread(self._proc.join, 10)
        if self._proc.is_alive():
            self._proc.kill()
        self._end_all(FinishReason.ABORT, None)

    # ----- plumbing ---------------------------------------------------------------------

    def _send(self, msgs: list[tuple[Any, ...]]) -> None:
        try:
            with self._send_lock:
                self._conn.send_bytes(pickle.dumps(msgs, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, ValueError) as e:  # the child is gone
            self._on_dead(f"engine process unreachable: {e!r}")

    def _read(self) -> None:
        assert self._loop is not None
        while True:
            try:
                msgs = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                code = self._proc.exitcode if self._proc is not None else None
                self._loop.call_soon_threadsafe(self._on_closed, code)
                return
            self._loop.call_soon_threadsafe(self._dispatch, msgs)

    def _dispatch(self, msgs: list[tuple[Any, ...]]) -> None:
        sinks = self._sinks
        for msg in msgs:
            kind = msg[0]
            if kind == "delta":
                d = msg[1]
                sink = sinks.get(d.request_id)
                if sink is not None:
                    if d.finish_reason is not None:
                        del sinks[d.request_id]
                    sink(d)
            elif kind == "ack":
                fut = self._acks.pop(msg[1], None)
                if fut is not None and not fut.done():
                    if msg[2] is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(msg[2])
            elif kind == "stats":
                self._stats, self._hashes = msg[1], msg[2]
                self._ready.set()
            elif kind == "dead":
                self._on_dead(msg[1])
            elif kind == "closed":
                self._done.set()

    def _on_closed(self, exitcode: int | None) -> None:
        self._done.set()
        if not self._closed:
            self._on_dead(f"engine process exited (code {exitcode})")

    def _on_dead(self, why: str) -> None:
        if self._dead is None:
            logger.error("engine process: %s", why)
            self._dead = why
        self._end_all(FinishReason.ERROR, why)
        self._done.set()

    def _end_all(self, reason: FinishReason, error: str | None) -> None:
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(EngineUnavailableError(error or "the engine stopped"))
        self._acks.clear()
        sinks, self._sinks = self._sinks, {}
        for rid, sink in sinks.items():
            sink(Delta(rid, "", (), reason, Usage(0, 0), error))
