"""
A stream's metadata as the store keeps it (the seed's C{…:metadata} hash):
what every worker's listings show and what a new owner needs to reuse the
engine session.
"""

from ..constants import Meta


def metadata_of(stream) -> dict:
    """
    The metadata of C{stream} (a L{Stream}) now.
    """
    source = stream.source
    fields = {
        Meta.KEY: stream.key,
        Meta.STATE: stream.state.value,
        Meta.PARAM: stream.param,
        Meta.OWNER: stream.worker_id,
        Meta.STARTED_AT: stream.started_at,
        Meta.BYTES_IN: stream.bytes_in,
        Meta.RECONNECTS: getattr(source, "reconnects", 0),
        Meta.HEALTH: stream.health.value,
    }
    if stream.engine is not None:
        fields[Meta.ENGINE_ID] = stream.engine.id
        fields[Meta.ENGINE_URL] = stream.engine.url
    if stream.last_data_at is not None:
        fields[Meta.LAST_DATA_AT] = stream.last_data_at
    playback = getattr(source, "playback", None)
    if playback is not None:
        fields.update(
            {
                Meta.PLAYBACK_URL: playback.playback_url,
                Meta.STAT_URL: playback.stat_url,
                Meta.COMMAND_URL: playback.command_url,
                Meta.PLAYBACK_SESSION_ID: playback.playback_session_id,
                Meta.IS_LIVE: playback.is_live,
            }
        )
    return {str(k): v for k, v in fields.items()}
