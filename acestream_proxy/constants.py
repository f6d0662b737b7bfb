"""
Names shared by every part of the proxy: stream states, event names and the
fields of a stream's metadata, so that the stores, the web API and the logs
agree on spelling.
"""

from enum import StrEnum


class StreamState(StrEnum):
    """
    Where a stream is in its life.  C{STARTED} is the state a stream has while
    it is being served; listings filter on it.
    """

    STARTING = "starting"
    STARTED = "started"
    UNHEALTHY = "unhealthy"
    RECONNECTING = "reconnecting"
    STOPPING = "stopping"
    ERROR = "error"


class Role(StrEnum):
    """
    A worker's part in a stream: its owner reads the engine, a follower the
    owner's buffer.
    """

    OWNER = "owner"
    FOLLOWER = "follower"


#: States in which a stream holds a session on its engine and so counts
#: towards that engine's load.
ACTIVE_STATES = frozenset(
    {
        StreamState.STARTING,
        StreamState.STARTED,
        StreamState.UNHEALTHY,
        StreamState.RECONNECTING,
    }
)


class Event(StrEnum):
    """
    Events published on a stream's channel for the other workers.
    """

    PLAYER_CONNECTED = "client_connected"
    PLAYER_DISCONNECTED = "client_disconnected"
    STREAM_STARTED = "stream_started"
    STREAM_STOPPING = "stream_stopping"
    OWNER_CHANGED = "owner_changed"
    CHUNK_ADDED = "chunk_added"
    #: Asks the stream's owner, wherever it runs, to stop the stream.
    STOP_REQUESTED = "stop_requested"


class Meta(StrEnum):
    """
    Fields of a stream's metadata hash.
    """

    KEY = "key"
    STATE = "status"
    PARAM = "param"
    ENGINE_ID = "container_id"
    ENGINE_URL = "engine_url"
    PLAYBACK_URL = "playback_url"
    STAT_URL = "stat_url"
    COMMAND_URL = "command_url"
    PLAYBACK_SESSION_ID = "playback_session_id"
    IS_LIVE = "is_live"
    OWNER = "owner"
    STARTED_AT = "started_at"
    LAST_DATA_AT = "last_data_at"
    BYTES_IN = "bytes_in"
    HEALTH = "health"
    RECONNECTS = "reconnects"


class PlayerField(StrEnum):
    """
    Fields of one client's hash.
    """

    ID = "id"
    WORKER = "worker"
    ADDRESS = "address"
    USER_AGENT = "user_agent"
    CONNECTED_AT = "connected_at"
    LAST_HEARTBEAT = "last_heartbeat"
    BYTES_SENT = "bytes_sent"
    SKIPS = "skips"
