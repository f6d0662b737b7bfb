"""
The HLS segment index of the Redis store: one list per stream, under the
stream's prefix (C{…:hls:segments}), with the chunks' time to live.
"""

import attrs
from twisted.internet.defer import Deferred

from . import keys, scripts


@attrs.define(eq=False)
class RedisSegmentIndex:
    store: object

    def add(self, key: str, record: str, kept: int) -> Deferred[None]:
        store = self.store
        return store._script(
            scripts.ADD_SEGMENT,
            [keys.hls_segments(key)],
            [record, kept, int(store.chunk_ttl * 1000)],
        ).addCallback(lambda _: None)

    def list(self, key: str) -> Deferred[list[str]]:
        return self.store._call("LRANGE", keys.hls_segments(key), 0, -1).addCallback(
            lambda records: [
                r.decode("utf-8", "replace") if isinstance(r, bytes) else r for r in records
            ]
        )
