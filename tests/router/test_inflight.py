from __future__ import annotations

import random

import pytest

from router.inflight import InflightTracker


def test_estimate_adds_sends_after_snapshot_and_subtracts_finishes():
    t = InflightTracker(horizon_s=60)
    t.on_sent("r", "old", now=10.0)  # sent before the snapshot at 12: already in its load
    t.on_sent("r", "new1", now=13.0)
    t.on_sent("r", "new2", now=14.0)
    assert t.estimated_load("r", snapshot_load=5, snapshot_ts=12.0) == 7
    t.on_finished("r", "old", now=15.0)  # left after the snapshot
    assert t.estimated_load("r", snapshot_load=5, snapshot_ts=12.0) == 6
    t.on_finished("r", "new1", now=15.5)  # never counted in the snapshot
    assert t.estimated_load("r", snapshot_load=5, snapshot_ts=12.0) == 5
    # A newer snapshot already reflects everything before it.
    assert t.estimated_load("r", snapshot_load=1, snapshot_ts=16.0) == 1


def test_estimate_is_floored_at_own_outstanding_requests():
    t = InflightTracker()
    for i in range(3):
        t.on_sent("r", f"q{i}", now=1.0)
    assert t.outstanding("r") == 3
    assert t.estimated_load("r", snapshot_load=0, snapshot_ts=2.0) == 3
    assert t.estimated_load("other", snapshot_load=4, snapshot_ts=2.0) == 4


def test_finish_for_unknown_or_other_replica_is_ignored():
    t = InflightTracker()
    t.on_sent("a", "q", now=1.0)
    t.on_finished("b", "q", now=2.0)  # e.g. a rejected attempt on b
    t.on_finished("a", "nope", now=2.0)
    assert t.outstanding("a") == 1
    t.on_finished("a", "q", now=3.0)
    assert t.outstanding("a") == 0


def test_recent_prefixes_expire_after_horizon_and_are_bounded():
    t = InflightTracker(horizon_s=10, max_prefixes_per_replica=3)
    t.on_sent("r", "q", now=0.0, prefix_hashes=[1, 2])
    assert t.recent_prefixes("r", now=5.0) == {1, 2}
    t.on_finished("r", "q", now=8.0, prefix_hashes=[1, 2, 3, 4])  # refreshed, capped at 3 newest
    assert t.recent_prefixes("r", now=9.0) == {2, 3, 4}
    assert t.recent_prefixes("r", now=17.0) == {2, 3, 4}
    assert t.recent_prefixes("r", now=18.5) == frozenset()


def test_retain_forgets_removed_replicas():
    t = InflightTracker()
    t.on_sent("a", "q1", now=1.0, prefix_hashes=[9])
    t.on_sent("b", "q2", now=1.0)
    t.retain(["b"])
    assert t.outstanding("a") == 0 and t.recent_prefixes("a", now=1.0) == frozenset()
    t.on_finished("a", "q1", now=2.0)  # must not raise
    assert t.outstanding("b") == 1


def test_bad_arguments():
    with pytest.raises(ValueError):
        InflightTracker(horizon_s=0)
    with pytest.raises(ValueError):
        InflightTracker(max_prefixes_per_replica=-1)


def _scanned_load(t: InflightTracker, replica_id: str, snapshot_load: int, snapshot_ts: float) -> int:
    """The estimate's definition, by scanning every record (what the tracker keeps counted)."""
    traffic = t._replicas[replica_id]
    sent_after = sum(1 for s in traffic.outstanding.values() if s > snapshot_ts)
    left_after = sum(1 for s, f in traffic.finished if s <= snapshot_ts < f)
    return max(snapshot_load + sent_after - left_after, len(traffic.outstanding), 0)


def test_kept_counts_match_a_full_scan_as_requests_come_and_go_across_snapshots():
    rng = random.Random(7)
    t = InflightTracker(horizon_s=5.0)
    now, snap_ts, open_ids, n = 0.0, 0.0, [], 0
    for _ in range(3000):
        now += rng.random() * 0.05
        action = rng.random()
        if action < 0.45:
            n += 1
            open_ids.append(f"q{n}")
            t.on_sent("r", open_ids[-1], now=now)
        elif action < 0.9 and open_ids:
            t.on_finished("r", open_ids.pop(rng.randrange(len(open_ids))), now=now)
        elif action < 0.91:
            snap_ts = now - rng.random() * 8  # a new snapshot, fresh or older than the horizon
        else:
            t.recent_prefixes("r", now=now)  # trims expired finishes
        if "r" in t._replicas:
            assert t.estimated_load("r", 10, snap_ts) == _scanned_load(t, "r", 10, snap_ts)


def test_recent_prefixes_is_a_view_not_a_copy():
    t = InflightTracker()
    t.on_sent("r", "q", now=1.0, prefix_hashes=[1, 2])
    view = t.recent_prefixes("r", now=1.0)
    t.on_sent("r", "q2", now=1.5, prefix_hashes=[3])
    assert 3 in view and view == {1, 2, 3}
