"""What a replica tells the router: the wire form of ``record_routing_stats()``.

Ray Serve pulls ``record_routing_stats()`` from each replica every
``request_routing_stats_period_s`` and hands the dict to every router as
``RunningReplica.routing_stats``. This module owns that dict's shape on both sides:
``build_routing_stats`` (replica side) and ``RoutingStats.from_wire`` (router side),
so the two cannot drift. Stdlib only: the router process never imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

WIRE_VERSION = 1
# Bound on the prefix summary a replica sends: routing stats are broadcast to every
# router on every change, so they must stay small (2048 hashes ~ 20 KB pickled).
DEFAULT_MAX_PREFIX_HASHES = 2048


@dataclass(frozen=True)
class RoutingStats:
    """One replica's engine state as the router sees it.

    ``prefix_hashes`` are chained hashes (``replica.prefix_hash``) of full KV blocks the
    replica holds, most recently used first, possibly truncated; ``timestamp`` is the
    replica's wall clock when the snapshot was taken (seconds since the epoch).
    """

    timestamp: float
    block_size: int
    num_free_blocks: int
    num_total_blocks: int
    num_waiting: int
    num_running: int
    prefix_hashes: frozenset[int]
    draining: bool = False  # shutting down: refuses new requests

    @property
    def load(self) -> int:
        """Requests the engine holds: queued plus running."""
        return self.num_waiting + self.num_running

    @property
    def kv_free_fraction(self) -> float:
        return self.num_free_blocks / max(1, self.num_total_blocks)

    def to_wire(self) -> dict[str, Any]:
        return build_routing_stats(
            block_size=self.block_size,
            num_free_blocks=self.num_free_blocks,
            num_total_blocks=self.num_total_blocks,
            num_waiting=self.num_waiting,
            num_running=self.num_running,
            prefix_hashes=self.prefix_hashes,
            draining=self.draining,
            max_prefix_hashes=len(self.prefix_hashes),
            timestamp=self.timestamp,
        )

    @classmethod
    def from_wire(cls, d: Mapping[str, Any] | None) -> RoutingStats | None:
        """Parse a replica's routing stats; ``None`` when absent or malformed.

        Malformed stats are treated like missing ones (the router falls back to
        power of two) rather than raising inside Ray's routing loop.
        """
        if not d or d.get("v") != WIRE_VERSION:
            return None
        try:
            stats = cls(
                timestamp=float(d["ts"]),
                block_size=int(d["block_size"]),
                num_free_blocks=int(d["num_free_blocks"]),
                num_total_blocks=int(d["num_total_blocks"]),
                num_waiting=int(d["num_waiting"]),
                num_running=int(d["num_running"]),
                prefix_hashes=frozenset(int(h) for h in d.get("prefix_hashes", ())),
                draining=bool(d.get("draining", False)),
            )
        except (KeyError, TypeError, ValueError):
            return None
        if (
            stats.block_size <= 0
            or stats.num_total_blocks <= 0
            or min(stats.num_free_blocks, stats.num_waiting, stats.num_running) < 0
        ):
            return None
        return stats


def build_routing_stats(
    *,
    block_size: int,
    num_free_blocks: int,
    num_total_blocks: int,
    num_waiting: int,
    num_running: int,
    prefix_hashes: Iterable[int],
    draining: bool = False,
    max_prefix_hashes: int = DEFAULT_MAX_PREFIX_HASHES,
    timestamp: float | None = None,
) -> dict[str, Any]:
    """The dict ``LLMReplica.record_routing_stats()`` returns (replica side).

    Pass the engine's ``cached_block_hashes(limit)`` as ``prefix_hashes``; only the
    first ``max_prefix_hashes`` (most recently used) are kept.
    """
    if max_prefix_hashes < 0:
        raise ValueError(f"max_prefix_hashes must be >= 0, got {max_prefix_hashes}")
    hashes: list[int] = []
    for h in prefix_hashes:
        if len(hashes) >= max_prefix_hashes:
            break
        hashes.append(int(h))
    return {
        "v": WIRE_VERSION,
        "ts": time.time() if timestamp is None else float(timestamp),
        "block_size": int(block_size),
        "num_free_blocks": int(num_free_blocks),
        "num_total_blocks": int(num_total_blocks),
        "num_waiting": int(num_waiting),
        "num_running": int(num_running),
        "kv_usage": 1.0 - int(num_free_blocks) / max(1, int(num_total_blocks)),  # for humans; derived
        "draining": bool(draining),
        "prefix_hashes": hashes,
    }
