"""
Who reads the engine for a stream, and how that changes hands.

The stream's lease timer drives it: an owner renews its lease (keeping the
stream's keys alive and its metadata up to date), writes back what Redis
lost when it had to take the lease again, and becomes a follower when
another worker holds it; a follower takes the stream over when its owner is
gone.  Promotion and demotion swap the stream's data source.  When the
stream stops, its owner hands it over to the workers that still have
players, or ends it: keys deleted, engine told to stop.
"""

import attrs
from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from ..constants import Event, Meta, Role, StreamState
from ..engine.registry import Engine
from ..errors import Unavailable
from .feed import EngineFeed
from .lease import Renewal
from .tail import BufferTail
from .writer import StoreWriter


@attrs.define(eq=False)
class Ownership:
    """
    The ownership changes of one stream (a L{Stream}).
    """

    log = Logger()

    stream: object

    def feed(self, engine: Engine | None, reconnects: int = 0) -> EngineFeed:
        """
        An owner's data source: the engine, through a store writer that
        appends only while the lease is surely ours.
        """
        stream = self.stream
        writer = StoreWriter(
            stream.key,
            stream.store,
            stream.clock,
            stream.fanout,
            stream.lease.safe,
            chunk_bytes=stream.tuning.chunk_bytes,
            chunk_delay=stream.tuning.chunk_delay,
        )
        return EngineFeed(
            stream.key,
            stream.param,
            stream.api,
            stream.clock,
            stream.tuning,
            stream.fanout,
            writer,
            stream.tasks,
            stream.choose_engine,
            stream.find_engine,
            stream.write_metadata,
            stream.stop,
            engine=engine,
            reconnects=reconnects,
            on_change=stream.source_changed,
            metrics=stream.metrics,
        )

    def tail(self, next_index: int | None = None) -> BufferTail:
        """
        A follower's data source: the store's ring buffer from C{next_index}.
        """
        stream = self.stream
        return BufferTail(
            stream.key,
            stream.store,
            stream.clock,
            stream.fanout,
            stream.tasks,
            stream.tuning.join_chunks,
            stream.tuning.first_byte_timeout,
            next_index=next_index,
            on_change=stream.source_changed,
        )

    async def tick(self) -> None:
        """
        Owner: renew the lease, even while starting, so that a slow engine
        does not let another worker take the stream too.  Follower: take
        the stream over when its owner is gone.  While the store is down
        nothing is asked of it: the owner goes on serving its own players,
        and the lease is settled when it is back; with no player left here,
        the grace runs here.
        """
        stream = self.stream
        if stream.stopping:
            return
        if not stream.store.available:
            if stream.role is Role.OWNER:
                # Chunks held for a renewal that cannot come (the lease went
                # unsure before the store was known down) go to the players.
                stream.source.writer.flush()
            stream.idle.store_down()
            return
        if stream.role is Role.FOLLOWER:
            if not stream.starting and await stream.lease.take_if_orphaned():
                self._promote()
            return
        if not stream.lease.due():
            return
        renewal = await stream.lease.renew()
        if renewal is Renewal.LOST:
            if not stream.starting and not stream.stopping:
                await self._demote()
            return
        if stream.stopping:
            await stream.lease.release()
            return
        if renewal is Renewal.RETAKEN:
            self.log.warn("stream {key}: its keys were lost; restoring them", key=stream.key)
            await stream.players.restore()
        stream.source.writer.flush()
        if stream.live:
            await stream.put_metadata()

    async def _demote(self) -> None:
        """
        Another worker holds the lease now: follow the buffer from the chunk
        after the last one our players got.  Our engine session is the new
        owner's to use if the metadata names it; if not, the new owner
        opened its own and ours would play to nobody, so it is stopped.
        """
        stream = self.stream
        self.log.warn("stream {key}: lost ownership; following", key=stream.key)
        feed = stream.source
        stream.swap(self.tail(stream.fanout.last_index + 1))
        stream.source.state = StreamState.STARTED
        if feed.playback is None:
            return
        meta = await stream.store.get_stream(stream.key) or {}
        if meta.get(Meta.PLAYBACK_SESSION_ID) != feed.playback.playback_session_id:
            await feed.stop_engine()

    def _promote(self) -> None:
        """
        The owner's lease lapsed and is ours now: read what it left in the
        buffer, then open the engine (reusing its session when it still
        plays) and write the buffer on from there.  It runs as the stream's
        start, so that stopping cancels it.
        """
        stream = self.stream
        self.log.warn("stream {key}: the owner is gone; taking the stream over", key=stream.key)
        stream.metrics.owner_changes.inc()
        stream.starting = True
        stream.tasks.run(self._take_over())

    async def _take_over(self) -> None:
        stream = self.stream
        tail = stream.source
        try:
            await tail.read_new()
            stream.swap(self.feed(None, reconnects=1))
            meta = await stream.store.get_stream(stream.key)
            await stream.source.open(meta, stream.put_metadata)
        except CancelledError:
            if stream.source is tail:
                # Stopped before it owned anything: stopping a follower
                # leaves the lease alone, so give it back here.
                stream.tasks.run(stream.lease.release(), keep=True)
            return
        except Exception as e:
            self.log.warn("stream {key}: takeover failed: {why}", key=stream.key, why=e)
            stream.starting = False
            stream.stop("takeover failed")
            return
        finally:
            stream.starting = False
        await stream.now_owning("taken over", Event.OWNER_CHANGED)
        # The previous owner may have died with players: they are gone too.
        await stream.players.remove_dead()

    async def hand_over(self) -> None:
        """
        Give the lease up and tell the workers that still have players, one
        of which takes the stream over at once.
        """
        stream = self.stream
        try:
            if not stream.store.available:
                raise Unavailable("the store is down")
            await stream.lease.release()
            await stream.store.publish(stream.key, Event.OWNER_CHANGED.value, handover=True)
        except Unavailable:
            self.log.warn("stream {key}: could not hand over, Redis is down", key=stream.key)

    async def end(self) -> None:
        """
        Tell the other workers, delete the keys, stop the engine session.
        With Redis down the engine is not kept waiting for the store's
        timeout: the store deletes the keys once it is back.
        """
        stream = self.stream
        try:
            if not stream.store.available:
                raise Unavailable("the store is down")
            await stream.store.publish(stream.key, Event.STREAM_STOPPING.value)
            await stream.store.delete_stream(stream.key)
        except Unavailable:
            self.log.warn(
                "stream {key}: Redis is down; its keys are deleted when it is back",
                key=stream.key,
            )
            playback = stream.source.playback
            stream.store.forget_stream_when_back(
                stream.key, playback.playback_session_id if playback is not None else None
            )
        except Exception:
            self.log.failure("stream {key}: could not delete its keys", key=stream.key)
        await stream.source.stop_engine()
