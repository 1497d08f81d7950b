"""Multiplexed streaming between ingress replicas and LLM replicas: one Ray stream item per
engine step per ingress, carrying every request's deltas, instead of one per request per token.

Why: with per-request streams, each token of each request costs a Ray streaming item in the
LLM replica's process, which shares its GIL with the engine's step thread; at 256 streams
that work, not the GPU, bounds throughput. Here the hand-off is:

    ingress  --submit(GenerateRequest, channel)-->  replica (routed by the KV-aware router)
             <-- Submitted(replica_id) | ReplicaError
    ingress  --pump(PumpRequest(replica_id, channel)), one long-lived stream per replica-->
             <-- [Delta, ...] per wake-up: all that accumulated for this ingress
    ingress  --abort_request(AbortRequest(replica_id, request_id))-->   (client went away)

``PumpRequest`` and ``AbortRequest`` name their replica: the router (router.kv_router) sends
them there and nowhere else. Coalescing is adaptive: a pump yields whatever accumulated
since its last item, so streams are per-token while the path keeps up and coarser only when
it falls behind; the ingress side does the same per request.

Nothing is lost or left behind: a pump that ends (the ingress went away, cancelled) aborts its
channel's requests; deltas made before the pump connected wait in the channel; a channel no
pump claims within ``ORPHAN_TIMEOUT_S`` is aborted; on the ingress, a pump that fails (the
replica died) ends each of its requests with a ``ReplicaError``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.errors import ReplicaError, backpressure_error
from replica.outputs import Delta, merge_deltas

logger = logging.getLogger("ray.serve")

ORPHAN_TIMEOUT_S = 30.0  # a channel with requests but no pump for this long is aborted
PUMP_IDLE_S = 2.0  # a pump with nothing to carry for this long ends (the ingress reopens it on demand)
PUMP_OPEN_TIMEOUT_S = 15.0  # the ingress gives up on a pump that never says hello (replica gone)


# ------------------------------------------------------------- wire types


@dataclass(frozen=True)
class Submitted:
    """The replica accepted the request; its deltas come on this replica's pump."""

    replica_id: str


@dataclass(frozen=True)
class PumpRequest:
    """Open the stream of one ingress's deltas on one replica (routed to that replica only)."""

    target_replica_id: str
    channel: str


@dataclass(frozen=True)
class AbortRequest:
    """Abort one request on the replica that runs it (routed to that replica only)."""

    target_replica_id: str
    request_id: str


# ------------------------------------------------------------- replica side


@dataclass
class _Channel:
    pending: list[Delta] = field(default_factory=list)
    requests: set[str] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pumps: int = 0
    unclaimed_since: float = field(default_factory=time.monotonic)

    def put(self, d: Delta) -> None:
        self.pending.append(d)
        if d.finish_reason is not None:
            self.requests.discard(d.request_id)
        self.wake.set()


class Outboxes:
    """The LLM replica's side: one channel per ingress, fed by the engine (on the event loop)
    and drained by that ingress's pump. ``abort`` aborts an engine request by id."""

    def __init__(self, abort: Callable[[str], None]) -> None:
        self._abort = abort
        self._channels: dict[str, _Channel] = {}

    def _channel(self, name: str) -> _Channel:
        ch = self._channels.get(name)
        if ch is None:
            ch = self._channels[name] = _Channel()
        return ch

    def sink(self, channel: str, request_id: str) -> Callable[[Delta], None]:
        """Where the engine delivers this request's deltas."""
        ch = self._channel(channel)
        ch.requests.add(request_id)
        return ch.put

    def forget(self, channel: str, request_id: str) -> None:
        """A request the engine refused after ``sink``: nothing will come for it."""
        ch = self._channels.get(channel)
        if ch is not None:
            ch.requests.discard(request_id)

    async def pump(self, channel: str) -> AsyncIterator[list[Delta]]:
        """Everything for ``channel``, as it accumulates; first an empty hello. It ends by
        itself after ``PUMP_IDLE_S`` with no request open, so that a replica Serve wants to stop
        (downscaling, redeploy) is not held by an idle stream. When the consumer goes away
        (Serve cancels this generator), the channel's requests are aborted."""
        ch = self._channel(channel)
        ch.pumps += 1
        idle_end = False
        idle_s = PUMP_IDLE_S
        try:
            yield []
            while True:
                if not ch.pending:
                    ch.wake.clear()
                    try:
                        await asyncio.wait_for(ch.wake.wait(), idle_s)
                    except asyncio.TimeoutError:
                        if not ch.requests and not ch.pending:
                            idle_end = True
                            return
                        continue
                batch, ch.pending = ch.pending, []
                yield batch
        finally:
            ch.pumps -= 1
            if ch.pumps == 0 and not idle_end:
                self._drop(channel, "its ingress stream closed")
            elif ch.pumps == 0:
                ch.unclaimed_since = time.monotonic()

    def reap(self, now: float | None = None) -> int:
        """Abort the requests of channels that no pump has claimed for ``ORPHAN_TIMEOUT_S``
        (an ingress that submitted and died before connecting). Returns how many."""
        now = time.monotonic() if now is None else now
        n = 0
        for name, ch in list(self._channels.items()):
            if ch.pumps:
                ch.unclaimed_since = now
            elif now - ch.unclaimed_since > ORPHAN_TIMEOUT_S:
                n += len(ch.requests)
                self._drop(name, f"no ingress claimed it for {ORPHAN_TIMEOUT_S:.0f} s")
        return n

    def _drop(self, name: str, why: str) -> None:
        ch = self._channels.pop(name, None)
        if ch is None:
            return
        if ch.requests:
            logger.info("channel %s: %s; aborting its %d requests", name, why, len(ch.requests))
        for rid in ch.requests:
            self._abort(rid)

    @property
    def num_channels(self) -> int:
        return len(self._channels)


# ------------------------------------------------------------- ingress side


class _Inbox:
    """One request's deltas on the ingress, merged per wake-up (adaptive coalescing)."""

    __slots__ = ("items", "replica_id", "wake")

    def __init__(self) -> None:
        self.items: list[Delta | ReplicaError] = []
        self.wake = asyncio.Event()
        self.replica_id: str | None = None

    def put(self, item: Delta | ReplicaError) -> None:
        self.items.append(item)
        self.wake.set()


class MuxLLMClient:
    """LLMClient over multiplexed replica streams (see the module docstring). ``handle`` is
    the DeploymentHandle to LLMReplica; its router must honour ``target_replica_id``."""

    def __init__(self, handle: Any, *, stream_interval: int = 1) -> None:
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._channel = f"ingress-{uuid.uuid4().hex[:12]}"
        self._inboxes: dict[str, _Inbox] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._stream_interval = stream_interval

    async def model_info(self) -> Any:
        return await self._handle.model_info.remote()

    async def generate(self, req: Any) -> AsyncIterator[Delta | ReplicaError]:
        from ray.serve.exceptions import BackPressureError

        rid = req.request_id
        inbox = self._inboxes[rid] = _Inbox()
        done = False
        try:
            submit = asyncio.ensure_future(self._handle.submit.remote(req, self._channel))
            try:
                # Shielded: a client that leaves while the submit is in flight must still have
                # its request aborted once the replica that took it is known.
                res = await asyncio.shield(submit)
            except asyncio.CancelledError:
                submit.add_done_callback(lambda f: self._abort_submitted(f, rid))
                raise
            except BackPressureError as exc:
                done = True
                yield backpressure_error(exc)
                return
            except Exception as exc:
                done = True
                yield _unavailable(exc)
                return
            if isinstance(res, ReplicaError):
                done = True
                yield res
                return
            inbox.replica_id = res.replica_id
            self._ensure_pump(res.replica_id)
            async for item in self._drain(inbox):
                done = isinstance(item, ReplicaError) or item.finished
                yield item
                if done:
                    return
        finally:
            self._inboxes.pop(rid, None)
            if not done and inbox.replica_id is not None:
                self._abort(inbox.replica_id, rid)

    async def _drain(self, inbox: _Inbox) -> AsyncIterator[Delta | ReplicaError]:
        first_sent = False
        interval = self._stream_interval
        while True:
            if not inbox.items:
                inbox.wake.clear()
                await inbox.wake.wait()
            if first_sent and interval > 1:  # hold until `interval` tokens or the end
                while not _enough(inbox.items, interval):
                    inbox.wake.clear()
                    await inbox.wake.wait()
            items, inbox.items = inbox.items, []
            errors = [i for i in items if isinstance(i, ReplicaError)]
            deltas = [i for i in items if not isinstance(i, ReplicaError)]
            if deltas:
                merged = merge_deltas(deltas)
                first_sent = first_sent or merged.num_tokens > 0
                yield merged
                if merged.finished:
                    return
            if errors:
                yield errors[0]
                return

    def _ensure_pump(self, replica_id: str) -> None:
        task = self._pumps.get(replica_id)
        if task is None or task.done():
            self._pumps[replica_id] = _detached(self._run_pump(replica_id))

    async def _run_pump(self, replica_id: str) -> None:
        gen = self._stream.pump.remote(PumpRequest(replica_id, self._channel))
        error: ReplicaError | None = None
        try:
            hello = await asyncio.wait_for(gen.__anext__(), PUMP_OPEN_TIMEOUT_S)
            if isinstance(hello, ReplicaError):
                raise RuntimeError(hello.message)
            async for batch in gen:
                for d in batch:
                    inbox = self._inboxes.get(d.request_id)
                    if inbox is not None:
                        inbox.put(d)
        except asyncio.CancelledError:
            # The replica aborts this channel's requests when its pump is cancelled: end them here
            # too, or their clients would wait forever.
            gen.cancel()
            for inbox in self._waiting(replica_id):
                inbox.put(ReplicaError("engine_unavailable", "the stream from the model replica was cancelled"))
            raise
        except Exception as exc:  # the replica died, or the pump never opened
            gen.cancel()
            error = _unavailable(exc)
        finally:
            self._pumps.pop(replica_id, None)
        waiting = self._waiting(replica_id)
        if error is None:  # ended idle: reopen if a request was submitted meanwhile
            if waiting:
                self._ensure_pump(replica_id)
            return
        for inbox in waiting:
            inbox.put(error)

    def _waiting(self, replica_id: str) -> list[_Inbox]:
        """This ingress's requests whose deltas come on ``replica_id``'s pump."""
        return [i for i in self._inboxes.values() if i.replica_id == replica_id]

    def _abort_submitted(self, submit: asyncio.Future[Any], request_id: str) -> None:
        if not submit.cancelled() and submit.exception() is None and isinstance(submit.result(), Submitted):
            self._abort(submit.result().replica_id, request_id)

    def _abort(self, replica_id: str, request_id: str) -> None:
        async def send() -> None:
            try:
                await self._handle.abort_request.remote(AbortRequest(replica_id, request_id))
            except Exception as exc:  # the replica is gone: nothing left to free there
                logger.info("request %s: abort on replica %s failed: %s", request_id, replica_id, exc)

        _detached(send())


def _detached(coro: Any) -> asyncio.Task[Any]:
    """A task outside the current request's context. Serve cancels the handle calls a request
    made when that request is cancelled (its client left), and a task inherits its creator's
    context: a pump opened by one request carries every request of this ingress, and an abort
    is sent exactly when its request was cancelled, so neither may be tied to one request."""
    return contextvars.Context().run(asyncio.get_running_loop().create_task, coro)


def _enough(items: list[Delta | ReplicaError], interval: int) -> bool:
    n = 0
    for i in items:
        if isinstance(i, ReplicaError) or i.finish_reason is not None:
            return True
        n += i.num_tokens
    return n >= interval


def _unavailable(exc: BaseException) -> ReplicaError:
    # The exception's text can be a remote traceback: logged here, not sent to clients.
    logger.warning("model replica call failed: %s", exc)
    return ReplicaError("engine_unavailable", f"model replica unavailable ({type(exc).__name__})")
