"""
Ending a stream nobody watches: C{cleanup_grace} seconds after the last
player left every worker, the owner stops the stream (and its engine
session); a follower stops following once it has had no player of its own
for the grace.

While the store cannot serve, no worker can tell another that its players
left, nor count them: each counts the grace from what it sees itself, so
that a stream whose players all left during an outage still ends, and its
engine session with it, rather than play to nobody until the store is back.
"""

import attrs
from twisted.internet.defer import Deferred, succeed

from ..constants import Role
from ..errors import Unavailable


@attrs.define(eq=False)
class IdleCheck:
    """
    The grace timer and idle check of one stream (a L{Stream}).
    """

    stream: object
    #: How many players joined, here or elsewhere: a check that awaited the
    #: store compares it to see whether one came meanwhile.
    joins: int = 0
    _call: object = attrs.field(default=None, init=False)

    def nobody_here(self, nobody_anywhere: bool = True) -> None:
        """
        No player here (and, with C{nobody_anywhere}, none in any worker):
        start the grace, unless it runs already.
        """
        stream = self.stream
        if not stream.live:
            return
        if nobody_anywhere:
            stream.tasks.run(stream.store.set_last_disconnect(stream.key, stream.clock.seconds()))
        if self._call is None:
            self._call = stream.clock.callLater(stream.tuning.cleanup_grace, self._grace_over)

    def player_joined(self, here: bool = True) -> None:
        """
        A player joined (C{here}, or in another worker): the grace is off.
        """
        self.joins += 1
        if self.cancel() and here:
            stream = self.stream
            stream.tasks.run(stream.store.set_last_disconnect(stream.key, None))

    def cancel(self) -> bool:
        if self._call is None:
            return False
        self._call.cancel()
        self._call = None
        return True

    def store_down(self) -> None:
        """
        The store cannot serve (the lease timer says so while it lasts): a
        player who left meanwhile could not be counted out, so with nobody
        here the grace starts here.
        """
        if not self.stream.players:
            self.nobody_here(nobody_anywhere=False)

    def _grace_over(self) -> None:
        self._call = None
        stream = self.stream
        if stream.role is Role.FOLLOWER:
            if not stream.players and stream.live:
                stream.stop("no players here")
            return
        if not stream.store.available:
            # Followers get no chunks from a store that is down: this
            # worker's players are the stream's only ones, and there were
            # none for the grace.
            if not stream.players and stream.live:
                stream.stop("no players here while the store is down")
            return
        self.check()

    def check(self) -> Deferred:
        """
        Owner: stop the stream if no worker has had a player for the grace.
        """
        stream = self.stream
        if stream.role is not Role.OWNER or not stream.live or stream.players:
            return succeed(None)
        return stream.tasks.run(self._check())

    async def _check(self) -> None:
        stream = self.stream
        joins = self.joins
        try:
            players = await stream.store.list_players(stream.key)
            left_at = await stream.store.get_last_disconnect(stream.key)
        except Unavailable:
            return
        # A player may have joined here while the store answered; its
        # registration may not be in what the store said.
        if players or self.joins != joins or stream.players or not stream.live:
            return
        now = stream.clock.seconds()
        grace = stream.tuning.cleanup_grace
        if left_at is None:
            await stream.store.set_last_disconnect(stream.key, now)
        elif now - left_at >= grace - 1e-6:
            stream.stop("no players")
        elif self._call is None:
            self._call = stream.clock.callLater(grace - (now - left_at), self._grace_over)
