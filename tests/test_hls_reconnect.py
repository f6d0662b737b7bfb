"""
HLS numbering across changes of the stream's source, on real sockets with the
simulated engine playing the demo's media (a keyframe every second):

  - the engine's playback connection is cut (the simulated engine drops it,
    as a crashing engine does): the owner reconnects on a new engine
    session, and the playlist numbers on, marks the first segment of the
    new session with C{#EXT-X-DISCONTINUITY}, and from the moment that
    segment leaves the list says C{#EXT-X-DISCONTINUITY-SEQUENCE:1};
  - the owner worker shuts down while another worker serves the viewer:
    the other one takes the stream over and numbers on from the previous
    owner's last segment, its first one marked as a discontinuity.

Segments are short here (hls_target_duration 1, the minimum, so one GOP
each) and the list is the shortest allowed (3), so that a discontinuity
slides out of the list within a few seconds.  Every wait is the playlist
polled with a deadline, as a player polls it.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from acestream_proxy.stream.stream import Role

from .support import HASHES, start_proxy
from .test_hls_workers import (  # noqa: F401 (fixtures)
    FAST,
    Playlist,
    check_segment,
    media,
    media_engine,
    playlist,
    playlist_until,
    segment,
    workers,
)

KEY = HASHES[0]

#: One GOP (one second) a segment, three listed.
SHORT = dict(hls_target_duration=1, hls_list_size=3)


class Seen:
    """
    Every segment the playlists polled so far listed, by sequence number:
    a number is never reused for another segment, and the discontinuity
    sequence number each playlist gives a segment (RFC 8216 6.2.2) is the
    same in every playlist that lists it.
    """

    def __init__(self) -> None:
        self.segments = {}
        self.discontinuity = {}
        self.playlists: list[Playlist] = []

    def add(self, listed: Playlist) -> Playlist:
        self.playlists.append(listed)
        for entry in listed.segments:
            number = listed.discontinuity_of(entry.sequence)
            before = self.segments.setdefault(entry.sequence, entry)
            assert before == entry, (before, entry, listed.text)
            assert self.discontinuity.setdefault(entry.sequence, number) == number, listed.text
        return listed

    def check_consecutive(self) -> list[int]:
        numbers = sorted(self.segments)
        assert numbers == list(range(numbers[0], numbers[-1] + 1)), numbers
        return numbers

    def first_discontinuous(self) -> int | None:
        return next(
            (n for n in sorted(self.segments) if self.segments[n].discontinuous), None
        )


async def poll(seen: Seen, proxy, predicate, what: str, timeout: float = 15.0) -> Playlist:
    return await playlist_until(proxy, lambda p: predicate(seen.add(p)), timeout, what)


async def check_discontinuity_slides_out(seen: Seen, proxy, marked: int) -> None:
    """
    Segment C{marked} is the first of a new session: every playlist gives
    the segments before it discontinuity number 0 and it and those after it
    1; while it is listed it carries the tag, and the first playlist without
    it says C{#EXT-X-DISCONTINUITY-SEQUENCE:1} (and, with it first, 0).
    """
    gone = await poll(
        seen, proxy, lambda p: p.sequences[0] > marked, f"segment {marked} to slide out"
    )
    assert gone.discontinuity_sequence == 1, gone.text
    assert not any(entry.discontinuous for entry in gone.segments), gone.text
    # Polled every tenth of a second, segments a second long: the list that
    # starts with it was seen.
    assert any(listed.sequences[0] == marked for listed in seen.playlists)
    for listed in seen.playlists:
        if listed.find(marked) is not None:
            assert "#EXT-X-DISCONTINUITY\n" in listed.text
            if listed.sequences[0] == marked:
                assert listed.discontinuity_sequence == 0, listed.text
        elif listed.sequences[0] < marked:
            assert listed.discontinuity_sequence is None, listed.text
    for number, value in seen.discontinuity.items():
        assert value == (0 if number < marked else 1), (number, value, seen.discontinuity)
    assert [n for n in seen.segments if seen.segments[n].discontinuous] == [marked]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_numbering_goes_on_across_an_engine_reconnection(
    media_engine, request, store, decoder_log
):
    """
    The engine drops the playback connection; the owner reconnects on a
    new session.  The media sequence goes on (no number reused or
    skipped), the first segment of the new session is marked as a
    discontinuity and starts on its keyframe (PAT, PMT, keyframe, decodable
    alone), and the discontinuity sequence is right as that segment
    slides out of the list.
    """
    redis = request.getfixturevalue("redis_server").url if store == "redis" else None
    proxy = await start_proxy(
        [media_engine.config("engine-a")], redis=redis, **{**FAST, **SHORT}
    )
    try:
        seen = Seen()
        before = await poll(seen, proxy, lambda p: len(p.segments) >= 2, "two segments")
        stream = proxy.registry.streams[KEY]
        engine = media_engine.engine
        [first_session] = engine.sessions
        assert before.discontinuity_sequence is None

        assert engine.drop_playback() == 1
        await poll(
            seen, proxy, lambda p: any(e.discontinuous for e in p.segments), "a discontinuity"
        )
        marked = seen.first_discontinuous()
        assert marked > before.sequences[-1]
        assert len(engine.getstream_calls) == 2
        assert first_session not in engine.sessions
        assert len(engine.sessions) == 1

        # The new session's first segment starts on its first keyframe.
        check_segment(await segment(proxy, marked), decoder_log)

        await check_discontinuity_slides_out(seen, proxy, marked)
        seen.check_consecutive()
        assert stream.source.reconnects == 1
        assert proxy.registry.streams[KEY] is stream
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_numbering_goes_on_when_another_worker_takes_the_stream_over(
    media_engine, redis_server, workers, decoder_log
):
    """
    The viewer reads the playlist from worker A, the owner, and fetches
    the segments from worker B.  A shuts down: it hands the stream over
    (B serves the viewer too), B takes it over and cuts on, numbering from
    A's last segment on, the first segment it cut marked as a discontinuity
    and decodable alone; the viewer, now on B, gets a list that goes on
    from the one A gave it, on the same engine session.

    The viewer's one record in the store names A, as it does whenever A's
    heartbeat wrote it last: A must hand over all the same.
    """
    first = await workers(**SHORT)
    second = await workers(**SHORT)
    seen = Seen()
    listed = await poll(seen, first, lambda p: len(p.segments) >= 2, "two segments on A")
    for entry in listed.segments:
        await segment(second, entry.sequence)
    owner = first.registry.streams[KEY]
    follower = second.registry.streams[KEY]
    assert (owner.role, follower.role) == (Role.OWNER, Role.FOLLOWER)
    engine = media_engine.engine
    [session_id] = engine.sessions
    # Every segment A cuts, to the last.
    cut_by_a = []
    publish = owner.hls.cutter.publish

    def noting(cut):
        cut_by_a.append(cut.sequence)
        publish(cut)

    owner.hls.cutter.publish = noting
    # The viewer goes on: a segment from B, then the playlist from A, each
    # worker's heartbeat round after its request, A's last.
    listed = await poll(seen, first, lambda p: p.sequences[-1] > listed.sequences[-1], "more")
    await segment(second, listed.sequences[-1])
    await second.registry.heartbeats.tick()
    seen.add(await playlist(first))
    await first.registry.heartbeats.tick()
    [record] = (await first.registry.store.list_players(KEY)).values()
    assert record["worker"] == first.registry.worker_id

    await first.service.stopService()
    assert second.registry.streams.get(KEY) is follower, "A ended the stream, not handed it over"
    assert engine.stopped == []
    last_of_a = max(cut_by_a + listed.sequences)

    await poll(
        seen, second, lambda p: any(e.discontinuous for e in p.segments), "B's discontinuity"
    )
    assert follower.role is Role.OWNER
    marked = seen.first_discontinuous()
    assert marked == last_of_a + 1, (marked, last_of_a, cut_by_a)
    check_segment(await segment(second, marked), decoder_log)
    await check_discontinuity_slides_out(seen, second, marked)
    seen.check_consecutive()
    # The same engine session, handed over.
    assert list(engine.sessions) == [session_id]
    assert engine.getstream_calls == [("id", KEY)]
    assert engine.stopped == []
