"""
An HLS viewer whose requests reach two workers (a load balancer without
stickiness): one player for the whole stream, kept for as long as either
worker serves it, on task.Clock with the shared-store cluster of
L{tests.test_ownership}.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from acestream_proxy.constants import Event, PlayerField, Role

from .fakes import FakeRequest
from .test_ownership import KEY, cluster


def watch(worker):
    """The viewer of the fakes' one address and user agent, on C{worker}."""
    d = Deferred.fromCoroutine(worker.registry.watch(KEY, "id", FakeRequest()))
    return d


def test_a_viewer_on_two_workers_is_one_player_until_neither_serves_it():
    c = cluster("a", "b")
    a, b = c.workers
    tuning = a.registry.tuning
    watched_a = watch(a)
    c.engine.send()
    stream_a, viewer_a = watched_a.result
    watched_b = watch(b)
    c.run(1)
    stream_b, viewer_b = watched_b.result
    assert (stream_a.role, stream_b.role) == (Role.OWNER, Role.FOLLOWER)
    # One viewer, whichever worker answers it.
    assert viewer_a.info.id == viewer_b.info.id
    assert list(c.shared.clients[KEY]) == [viewer_a.info.id]
    events = []
    b.store.listen(KEY, events.append)
    # The balancer now sends every request to b: a's copy of the viewer
    # goes, b's keeps the registration, and the stream plays on from a,
    # which has no player of its own left.
    elapsed = 0.0
    while not viewer_a.finished:
        viewer_b.sent(1000)
        c.run(1)
        elapsed += 1
        assert elapsed <= tuning.ghost_client_timeout + 2 * tuning.heartbeat_interval
    assert elapsed >= tuning.ghost_client_timeout
    assert not stream_a.players
    # Left without taking the viewer's registration, which b heartbeats: a
    # has no player, and with no registration either it would stop the
    # stream after its grace, if b's next heartbeat came later than that.
    assert [e for e in events if e["event"] == Event.PLAYER_DISCONNECTED] == []
    for _ in range(int(tuning.cleanup_grace + 2 * tuning.heartbeat_interval)):
        viewer_b.sent(1000)
        c.run(1)
    assert c.shared.clients[KEY][viewer_b.info.id][PlayerField.WORKER] == "b"
    assert stream_a.live and stream_b.live and not viewer_b.finished
    assert c.engine.stops == []
    # When b stops being asked too, the viewer is gone and so is the stream.
    c.run(tuning.ghost_client_timeout + 2 * tuning.heartbeat_interval + tuning.cleanup_grace)
    assert viewer_b.finished and not stream_a.live and not stream_b.live
    assert c.engine.stops == [("a", "session-1")]
    assert not c.shared.clients.get(KEY)
