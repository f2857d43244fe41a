"""flare.runtime.inference.sessions: fold sessions made on first use, at most ``capacity`` alive."""

from __future__ import annotations

from flare.runtime.inference.sessions import FoldSessions


def test_capacity_drops_the_least_recently_used_and_views_share_the_sessions() -> None:
    made: list[str] = []
    pool = FoldSessions(["f0", "f1", "f2"], lambda spec: made.append(spec) or spec.upper(), capacity=2)
    assert pool.prefetch(3) is pool and made == ["f0", "f1"] and pool.alive() == [0, 1]
    assert pool[0] == "F0" and pool.alive() == [1, 0]  # used: most recent
    assert pool[2] == "F2" and pool.alive() == [0, 2] and pool.dropped == 1  # f1 (least recent) dropped first
    view = pool[:2]
    assert len(view) == 2 and view[1] == "F1" and pool.alive() == [2, 1] and pool.created == 4
    assert pool.peek() == "F1" and pool.created == 4  # peek makes nothing
    pool.capacity = 1
    assert pool.alive() == [1] and view.capacity == 1 and pool.alive_engines() == ["F1"]
    pool.capacity = 3
    assert [pool[i] for i in range(3)] == ["F0", "F1", "F2"] and len(pool.alive()) == 3
