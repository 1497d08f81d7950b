"""``AsyncEngine``: an ``LLMEngine`` stepping in a background thread, with one stream of deltas
per request on the asyncio loop; what a Serve replica drives (``interfaces.ServingEngine``).

Threads: the event loop (or, in the engine process, its pipe reader: ``submit_from_thread``)
validates and refuses requests synchronously (``make_request``, the waiting-queue bound), then
hands them to the step thread through a locked inbox of ``_Add`` / ``_Abort`` items; only the step thread touches the engine's queues and cache, so no lock is
held during a step. Deltas go back with ``loop.call_soon_threadsafe`` to each request's sink.
A step that raises fails its own requests; a broken cache or repeated failures fail every
request and mark the engine dead (``is_dead``), so no consumer ever waits forever.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from replica.config import EngineConfig
from replica.engine import LLMEngine
from replica.errors import EngineError, EngineUnavailableError, InvalidRequestError, QueueFullError, check_accepting
from replica.interfaces import Prompt
from replica.outputs import Delta, EngineStats, Usage, merge_deltas
from replica.request import FinishReason, Request, SamplingParams

if TYPE_CHECKING:
    from replica.models import LoadedModel
    from replica.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Add:
    """Inbox item: queue this validated request."""

    request: Request


@dataclass(frozen=True, slots=True)
class _Abort:
    """Inbox item: abort this request, wherever it is."""

    request_id: str


def _end_delta(request_id: str, reason: FinishReason, error: str | None) -> Delta:
    """The last delta of a request that ends outside a step (refused late, aborted, failed)."""
    return Delta(request_id, "", (), reason, Usage(0, 0), error)


async def coalesced(
    queue: asyncio.Queue[Delta], interval: int = 1, on_abandon: Callable[[], None] | None = None
) -> AsyncGenerator[Delta, None]:
    """One request's deltas from ``queue`` until its last: what queued up while the consumer
    was busy goes out as one item (one per wake-up instead of one per token when it falls
    behind), and after the first token (which never waits) at least ``interval`` tokens per item.
    ``on_abandon`` runs if the consumer closes or cancels the stream before its last delta
    (the engine then aborts the request and frees its blocks)."""
    first_sent = finished = False
    try:
        while True:
            delta = await queue.get()
            n = delta.num_tokens
            if not delta.finished and (not queue.empty() or (first_sent and n < interval)):
                batch = [delta]
                while not batch[-1].finished:
                    if not queue.empty():
                        batch.append(queue.get_nowait())
                    elif first_sent and n < interval:
                        batch.append(await queue.get())
                    else:
                        break
                    n += batch[-1].num_tokens
                delta = merge_deltas(batch)
            first_sent = first_sent or n > 0
            finished = delta.finished
            yield delta
            if finished:
                return
    finally:
        if not finished and on_abandon is not None:
            on_abandon()


class AsyncEngine:
    """``LLMEngine`` stepping in a background thread, so the asyncio loop stays free (see the
    module docstring for who touches what)."""

    _MAX_CONSECUTIVE_FAILURES = 3
    _HASHES_REFRESH_S = 0.5

    def __init__(
        self, config: EngineConfig, *, loaded: LoadedModel | None = None, engine: LLMEngine | None = None, **kwargs: Any
    ) -> None:
        self.engine = engine if engine is not None else LLMEngine(config, loaded=loaded, **kwargs)
        self.config = config
        self._lock = threading.Lock()  # guards _inbox, _closed, _dead
        self._inbox: list[_Add | _Abort] = []
        self._num_inbox_adds = 0
        self._wake = threading.Event()
        # request -> its sink: added under _lock by whoever submits, read and removed on the event loop
        self._streams: dict[str, Callable[[Delta], None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False  # draining or stopped: refuse new requests
        self._stop = False
        self._dead: str | None = None
        self._failures = 0
        self._tokens_per_s = 0.0  # refreshed by the step thread (the rate window is its own)
        self._hashes: list[int] = []
        self._hashes_limit = 4096
        self._hashes_at = 0.0

    # ----- facade -----------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def block_size(self) -> int:
        return self.engine.block_size

    @property
    def is_dead(self) -> bool:
        return self._dead is not None or not self.engine.alive

    async def start(self) -> None:
        self._ensure_started(asyncio.get_running_loop())

    def _ensure_started(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._thread is not None:
            if loop is not self._loop:
                raise RuntimeError("AsyncEngine is bound to another event loop")
            return
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None = None, *, stream_interval: int = 1
    ) -> AsyncIterator[Delta]:
        """Queue a request and return its stream of deltas (the last has finish_reason).
        Refusals raise here, synchronously. Closing or cancelling the stream aborts the
        request and frees its blocks. ``stream_interval`` > 1 holds deltas after the first
        token until that many tokens (or the end) are there: fewer stream items per token
        for every hop behind this one (Ray streaming, SSE), at the cost of coarser chunks."""
        if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) or stream_interval < 1:
            raise InvalidRequestError(f"stream_interval must be an integer >= 1, got {stream_interval!r}")
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.submit(request_id, prompt, params, queue.put_nowait)
        return coalesced(queue, stream_interval, lambda: self.abort_nowait(request_id))

    def submit(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None, on_delta: Callable[[Delta], None]
    ) -> None:
        """Queue a request whose deltas go to ``on_delta``, called on the event loop in order
        (the last has finish_reason). Refusals raise here, synchronously. The caller owns
        the request's life: ``abort`` it when its consumer goes away."""
        self._ensure_started(asyncio.get_running_loop())
        self._enqueue(request_id, prompt, params, on_delta)

    def submit_from_thread(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None, on_delta: Callable[[Delta], None]
    ) -> None:
        """``submit`` from a thread other than the event loop's, once the engine is started
        (the engine process's pipe reader: a request then reaches the step thread without first
        waking the event loop). ``on_delta`` is still called on the event loop."""
        if self._loop is None:
            raise RuntimeError("submit_from_thread needs a started AsyncEngine")
        self._enqueue(request_id, prompt, params, on_delta)

    def _enqueue(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None, on_delta: Callable[[Delta], None]
    ) -> None:
        check_accepting(self._dead, self._closed)
        req = self.engine.make_request(request_id, prompt, params)
        with self._lock:
            if self._dead is not None or self._closed:
                raise EngineUnavailableError("the engine is shutting down and no longer accepts requests")
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
            max_waiting = self.engine.config.scheduler.max_waiting
            queued = self.engine.num_waiting + self._num_inbox_adds
            if queued >= max_waiting:
                self.engine.record_refusal()
                raise QueueFullError(f"the waiting queue is full ({queued} of {max_waiting} requests); retry later")
            self._streams[request_id] = on_delta
            self._inbox.append(_Add(req))
            self._num_inbox_adds += 1
        self._wake.set()

    async def submit_checked(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None, on_delta: Callable[[Delta], None]
    ) -> None:
        """``submit`` as ``ServingEngine`` has it (a ``ProcessEngine`` learns refusals later)."""
        self.submit(request_id, prompt, params, on_delta)

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream (if still read) ends with an ABORT delta."""
        self._post_abort(request_id)

    def abort_nowait(self, request_id: str) -> None:
        """``abort`` for callers outside a coroutine; no ABORT delta is delivered."""
        self._streams.pop(request_id, None)
        self._post_abort(request_id)

    def _post_abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(_Abort(request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        if self._thread is None:
            return self.engine.stats()
        s = self.engine.build_stats(self._tokens_per_s)
        if self._num_inbox_adds:
            s = replace(s, num_waiting=s.num_waiting + self._num_inbox_adds)
        return s

    def cached_block_hashes(self, limit: int = 4096) -> list[int]:
        if self._thread is None:
            return self.engine.cached_block_hashes(limit)
        self._hashes_limit = max(self._hashes_limit, limit)
        return self._hashes[:limit]

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let running ones finish (up to ``drain_timeout_s``), abort
        the rest, stop the step loop."""
        self._closed = True
        if self._thread is None:
            await asyncio.to_thread(self.engine.close)
            return
        deadline = time.monotonic() + drain_timeout_s
        while self._thread.is_alive() and (self._streams or self._inbox) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        with self._lock:
            self._stop = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self.engine.close)
        await asyncio.sleep(0)  # let the last call_soon_threadsafe deliveries run
        self._end_streams(FinishReason.ABORT, None)

    # ----- event-loop side --------------------------------------------------------------

    def _deliver(self, deltas: list[Delta]) -> None:
        for d in deltas:
            sink = self._streams.get(d.request_id)
            if sink is None:
                continue  # its consumer went away
            if d.finished:
                del self._streams[d.request_id]
            sink(d)

    def _end_streams(self, reason: FinishReason, error: str | None) -> None:
        """Give every open stream a final delta: nobody waits forever."""
        streams, self._streams = self._streams, {}
        for rid, sink in streams.items():
            sink(_end_delta(rid, reason, error))

    # ----- step thread ------------------------------------------------------------------

    def _send(self, deltas: list[Delta]) -> None:
        if deltas and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, deltas)

    def _run(self) -> None:
        try:
            self._loop_body()
        except BaseException as e:  # a bug in the loop itself: fail loudly, never hang a consumer
            logger.exception("engine step loop crashed")
            with self._lock:
                self._dead = f"step loop crashed: {e!r}"
        if self._dead is not None and self._loop is not None and not self._loop.is_closed():
            # After the last deliveries (call_soon_threadsafe is FIFO): any stream still open
            # would otherwise wait forever for a loop that has stopped.
            self._loop.call_soon_threadsafe(self._end_streams, FinishReason.ERROR, self._dead)

    def _loop_body(self) -> None:
        eng = self.engine
        while True:
            with self._lock:
                items, self._inbox = self._inbox, []
                stop = self._stop
            deltas: list[Delta] = []
            for item in items:
                if isinstance(item, _Add):
                    try:
                        eng.add(item.request, enforce_queue_limit=False)  # the bound was checked on arrival
                    except EngineError as e:
                        deltas.append(_end_delta(item.request.request_id, FinishReason.ERROR, e.message))
                    finally:
                        with self._lock:
                            self._num_inbox_adds -= 1
                else:
                    eng.abort(item.request_id)
            if stop:
                for rid in eng.unfinished_request_ids():
                    eng.abort(rid)
                deltas.extend(eng.step())  # only the pending ABORT deltas: nothing is left to run
                self._send(deltas)
                self._refresh(force=True)
                return
            if not eng.has_unfinished():
                self._send(deltas)
                self._refresh(force=True)
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                applied = eng.num_steps
                deltas.extend(eng.step())
                if eng.num_steps > applied:  # a step that only launched proves nothing yet
                    self._failures = 0
            except Exception as e:
                deltas.extend(self._on_step_error(e))
            self._send(deltas)
            self._refresh()
            if self._dead is not None:
                return

    def _on_step_error(self, e: Exception) -> list[Delta]:
        """Fail the requests of the step that raised; if the engine's state is broken or
        steps keep failing, fail everything and refuse new requests."""
        logger.exception("engine step failed")
        eng = self.engine
        msg = f"engine step failed: {type(e).__name__}: {e}"
        self._failures += 1
        blamed = eng.last_scheduled
        eng.drop_inflight()  # a step launched after the failed one is not applied either
        deltas = eng.fail_requests(blamed or eng.unfinished_request_ids(), msg)
        try:
            eng.check_invariants()
            broken = self._failures >= self._MAX_CONSECUTIVE_FAILURES or not eng.alive
        except AssertionError:
            broken = True
        if broken:
            with self._lock:
                self._dead = msg
                items, self._inbox = self._inbox, []
                adds = [item.request for item in items if isinstance(item, _Add)]
                self._num_inbox_adds -= len(adds)
            deltas.extend(eng.fail_requests(eng.unfinished_request_ids(), msg))
            deltas.extend(_end_delta(req.request_id, FinishReason.ERROR, msg) for req in adds)
        return deltas

    def _refresh(self, *, force: bool = False) -> None:
        self._tokens_per_s = self.engine.tokens_per_s()
        now = time.monotonic()
        if force or now - self._hashes_at >= self._HASHES_REFRESH_S:
            self._hashes = self.engine.cached_block_hashes(self._hashes_limit)
            self._hashes_at = now
