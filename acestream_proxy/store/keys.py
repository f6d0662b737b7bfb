"""
Every Redis key and channel the proxy uses, built in one place (the seed's
schema, under the C{ace_proxy:} prefix):

    ace_proxy:stream:{KEY}:metadata                  hash: state, engine, urls...
    ace_proxy:stream:{KEY}:owner                     worker id, held as a lease
    ace_proxy:stream:{KEY}:buffer:index              newest chunk's index
    ace_proxy:stream:{KEY}:buffer:chunk:{N}          chunk N (expires)
    ace_proxy:stream:{KEY}:hls:segments              list: newest HLS segments (expires)
    ace_proxy:stream:{KEY}:clients                   set of client ids
    ace_proxy:stream:{KEY}:clients:{CLIENT_ID}       hash: one client (expires)
    ace_proxy:stream:{KEY}:last_client_disconnect_time
    ace_proxy:events:{KEY}                           pub/sub channel
    ace_proxy:worker:{WORKER_ID}                     a worker's liveness (expires)

and one key no one ever sees: ace_proxy:probe:{WORKER_ID}, which a script
sets and deletes at once to learn whether Redis takes writes again.
"""

PREFIX = "ace_proxy"

#: Matches every stream's metadata key, for listing streams with SCAN.
METADATA_PATTERN = f"{PREFIX}:stream:*:metadata"

#: Matches every stream's event channel.
EVENTS_PATTERN = f"{PREFIX}:events:*"


def stream(key: str) -> str:
    return f"{PREFIX}:stream:{key}"


def metadata(key: str) -> str:
    return f"{stream(key)}:metadata"


def owner(key: str) -> str:
    return f"{stream(key)}:owner"


def buffer_index(key: str) -> str:
    return f"{stream(key)}:buffer:index"


def buffer_chunk_prefix(key: str) -> str:
    """
    The chunk key without its number; scripts append the number.
    """
    return f"{stream(key)}:buffer:chunk:"


def buffer_chunk(key: str, index: int) -> str:
    return f"{buffer_chunk_prefix(key)}{index}"


def hls_segments(key: str) -> str:
    return f"{stream(key)}:hls:segments"


def clients(key: str) -> str:
    return f"{stream(key)}:clients"


def client_prefix(key: str) -> str:
    return f"{clients(key)}:"


def client(key: str, client_id: str) -> str:
    return f"{client_prefix(key)}{client_id}"


def last_client_disconnect_time(key: str) -> str:
    return f"{stream(key)}:last_client_disconnect_time"


def events(key: str) -> str:
    return f"{PREFIX}:events:{key}"


def probe(worker_id: str) -> str:
    return f"{PREFIX}:probe:{worker_id}"


def key_of(name: str) -> str:
    """
    The stream key in a metadata key or event channel name.
    """
    if name.startswith(f"{PREFIX}:events:"):
        return name[len(f"{PREFIX}:events:") :]
    return name[len(f"{PREFIX}:stream:") :].split(":", 1)[0]


def worker(worker_id: str) -> str:
    """
    A worker's liveness key: renewed while the worker runs, so that its
    death is noticed within the key's time to live, not a whole lease.
    """
    return f"{PREFIX}:worker:{worker_id}"
