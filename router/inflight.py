"""What this router itself sent: an in-flight estimate between stats refreshes.

Replica stats arrive every ``request_routing_stats_period_s``; a burst routed in
between would all see the same stale queue depth and pile onto one affine replica.
The tracker corrects each snapshot with the router's own traffic since it was taken:

    load ~= snapshot_load + (sent after snapshot, still running)
                          - (sent before snapshot, finished after it)

floored at the number of this router's requests still running there (those are
certainly present). It also remembers which prompt prefixes it just sent where,
so the next turn of a conversation finds its replica before the replica reports it.
Plain Python, no Ray: the glue in ``router.kv_router`` calls it from Serve's hooks.

Every routing decision asks both questions for every replica, on the ingress's event loop and
before the request is sent, so neither scans the records: the two corrections are counted for
the replica's current snapshot and kept up to date as requests are sent and finish (a scan
only when a new snapshot arrives, about once per stats period), and the remembered prefixes
are handed out as a live view. With full records (8,192 prefixes, a few thousand recent
finishes) the copy and the scans cost about 2 ms per decision on a 2-core CPU.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Set
from dataclasses import dataclass, field


@dataclass
class _ReplicaTraffic:
    outstanding: dict[str, float] = field(default_factory=dict)  # request id -> send time
    finished: deque[tuple[float, float]] = field(default_factory=deque)  # (sent, finished)
    # Prefix hash -> when this router last sent (or saw finish) a request holding it.
    recent_prefixes: OrderedDict[int, float] = field(default_factory=OrderedDict)
    # The corrections of estimated_load for the snapshot taken at snap_ts, kept current.
    snap_ts: float | None = None
    sent_after: int = 0  # outstanding, sent after snap_ts
    left_after: int = 0  # in finished, sent at or before snap_ts and finished after it

    def count_for(self, snapshot_ts: float) -> None:
        """Count the corrections for a new snapshot (the only scan of the records)."""
        self.snap_ts = snapshot_ts
        self.sent_after = sum(1 for s in self.outstanding.values() if s > snapshot_ts)
        self.left_after = sum(1 for s, f in self.finished if s <= snapshot_ts < f)

    def counted_left(self, sent: float, finished: float) -> bool:
        return self.snap_ts is not None and sent <= self.snap_ts < finished


class InflightTracker:
    """Per-replica record of requests this router sent and prefixes it placed.

    ``horizon_s`` bounds how long finished-request records and remembered prefixes
    are kept (older stats are stale anyway); ``max_prefixes_per_replica`` bounds memory.
    """

    def __init__(self, *, horizon_s: float = 30.0, max_prefixes_per_replica: int = 8192) -> None:
        if horizon_s <= 0:
            raise ValueError(f"horizon_s must be > 0, got {horizon_s}")
        if max_prefixes_per_replica < 0:
            raise ValueError(f"max_prefixes_per_replica must be >= 0, got {max_prefixes_per_replica}")
        self._horizon_s = horizon_s
        self._max_prefixes = max_prefixes_per_replica
        self._replicas: dict[str, _ReplicaTraffic] = {}
        self._where: dict[str, str] = {}  # request id -> replica id, for on_finish

    def on_sent(self, replica_id: str, request_id: str, now: float, prefix_hashes: Iterable[int] = ()) -> None:
        """A request was accepted by ``replica_id``."""
        t = self._replicas.setdefault(replica_id, _ReplicaTraffic())
        if request_id in t.outstanding:  # a resend of the same id replaces the first
            self._forget_outstanding(t, request_id)
        t.outstanding[request_id] = now
        if t.snap_ts is not None and now > t.snap_ts:
            t.sent_after += 1
        self._where[request_id] = replica_id
        self._remember(t, prefix_hashes, now)

    def on_finished(self, replica_id: str, request_id: str, now: float, prefix_hashes: Iterable[int] = ()) -> None:
        """A request ended (any outcome). Unknown ids, or ids routed elsewhere, are ignored:
        Serve also reports requests that a replica rejected and that were never sent."""
        if self._where.get(request_id) != replica_id:
            return
        del self._where[request_id]
        t = self._replicas[replica_id]
        sent = self._forget_outstanding(t, request_id)
        t.finished.append((sent, now))
        if t.counted_left(sent, now):
            t.left_after += 1
        # The replica has now cached this prompt's full blocks: refresh the memory.
        self._remember(t, prefix_hashes, now)
        self._trim(t, now)

    def routed_to(self, request_id: str) -> str | None:
        """The replica an outstanding request was sent to, if this tracker knows it."""
        return self._where.get(request_id)

    def outstanding(self, replica_id: str) -> int:
        t = self._replicas.get(replica_id)
        return len(t.outstanding) if t else 0

    def estimated_load(self, replica_id: str, snapshot_load: int, snapshot_ts: float) -> int:
        """Queued + running at ``replica_id`` now, from a snapshot taken at ``snapshot_ts``."""
        t = self._replicas.get(replica_id)
        if t is None:
            return snapshot_load
        if t.snap_ts != snapshot_ts:
            t.count_for(snapshot_ts)
        return max(snapshot_load + t.sent_after - t.left_after, len(t.outstanding), 0)

    def recent_prefixes(self, replica_id: str, now: float) -> Set[int]:
        """Prefix hashes this router placed on ``replica_id`` within the horizon: a live view
        (no copy per decision), valid until this tracker is next updated."""
        t = self._replicas.get(replica_id)
        if t is None:
            return frozenset()
        self._trim(t, now)
        return t.recent_prefixes.keys()

    def retain(self, replica_ids: Iterable[str]) -> None:
        """Forget replicas that are gone (scaled down or dead)."""
        keep = set(replica_ids)
        for rid in [r for r in self._replicas if r not in keep]:
            for req in self._replicas.pop(rid).outstanding:
                self._where.pop(req, None)

    @staticmethod
    def _forget_outstanding(t: _ReplicaTraffic, request_id: str) -> float:
        sent = t.outstanding.pop(request_id)
        if t.snap_ts is not None and sent > t.snap_ts:
            t.sent_after -= 1
        return sent

    def _remember(self, t: _ReplicaTraffic, prefix_hashes: Iterable[int], now: float) -> None:
        if self._max_prefixes == 0:
            return
        for h in prefix_hashes:
            t.recent_prefixes[h] = now
            t.recent_prefixes.move_to_end(h)
        while len(t.recent_prefixes) > self._max_prefixes:
            t.recent_prefixes.popitem(last=False)

    def _trim(self, t: _ReplicaTraffic, now: float) -> None:
        cutoff = now - self._horizon_s
        while t.finished and t.finished[0][1] < cutoff:
            sent, finished = t.finished.popleft()
            if t.counted_left(sent, finished):
                t.left_after -= 1
        while t.recent_prefixes:
            _h, seen = next(iter(t.recent_prefixes.items()))
            if seen >= cutoff:
                break
            t.recent_prefixes.popitem(last=False)
