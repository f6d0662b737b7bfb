"""
What anyone can see: without admin rights, the JSON views show keys,
states, engine ids, counts and health; players' addresses, user agents and
ids, engine URLs and playback session ids need the admin token (or, with
none configured, loopback, which the daemon warns about when it listens on
loopback only).
"""

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher

from acestream_proxy.config import Config
from acestream_proxy.http.views import PUBLIC_ENGINE_FIELDS, PUBLIC_STREAM_FIELDS
from acestream_proxy.service import make_service

from .support import HASHES, Player

KEY = HASHES[0]
TOKEN = "s3cret-admin-token"
USER_AGENT = b"PrivatePlayer/7.1 (living room)"


async def get(url: str, token: str | None = None):
    headers = {b"Authorization": [f"Bearer {token}".encode()]} if token else None
    response = await treq.get(url, headers=headers)
    return response.code, await response.text()


@pytest_twisted.ensureDeferred
async def test_views_show_details_to_admins_only(engine, proxy_factory):
    proxy = await proxy_factory([engine.config("engine-a")], admin_token=TOKEN)
    player = await Player.open(proxy.stream_url(KEY), headers={b"User-Agent": [USER_AGENT]})
    await player.wait_bytes(1)
    [stream] = proxy.registry.streams.values()
    [producer] = stream.players
    secrets = [
        USER_AGENT.decode(),
        producer.info.id,
        engine.url,
        stream.source.playback.playback_session_id,
        stream.source.playback.playback_url,
    ]

    for path in ("/streams", f"/streams/{KEY}", "/engines"):
        code, public = await get(proxy.url + path)
        assert code == 200, public
        for secret in secrets:
            assert secret not in public, (path, secret)
        code, detailed = await get(proxy.url + path, TOKEN)
        assert code == 200
        assert len(detailed) > len(public)

    code, public = await get(proxy.url + "/streams")
    [shown] = json.loads(public)
    assert set(shown) <= PUBLIC_STREAM_FIELDS
    assert shown["key"] == KEY and shown["players"] == 1 and shown["container_id"] == "engine-a"
    assert shown["status"] == "started" and shown["health"] == "healthy"

    code, public = await get(proxy.url + f"/streams/{KEY}")
    assert json.loads(public)["players"] == 1

    code, detailed = await get(proxy.url + f"/streams/{KEY}", TOKEN)
    [listed] = json.loads(detailed)["players"]
    assert listed["user_agent"] == USER_AGENT.decode()
    assert listed["address"] == "127.0.0.1"
    assert json.loads(detailed)["playback_session_id"] in secrets

    code, public = await get(proxy.url + "/engines")
    [shown] = json.loads(public)
    assert set(shown) <= PUBLIC_ENGINE_FIELDS
    assert shown == {"id": "engine-a", "forwarded": False, "healthy": True, "streams": 1}
    code, detailed = await get(proxy.url + "/engines", TOKEN)
    assert json.loads(detailed)[0]["url"] == engine.url

    # A wrong token sees what anyone sees, and is not told more.
    code, wrong = await get(proxy.url + "/streams", "not-the-token")
    assert code == 200
    assert all(set(s) <= PUBLIC_STREAM_FIELDS for s in json.loads(wrong))
    for secret in secrets:
        assert secret not in wrong
    player.disconnect()


@pytest_twisted.ensureDeferred
async def test_without_a_token_loopback_sees_the_details(engine, proxy_factory):
    proxy = await proxy_factory([engine.config("engine-a")])
    player = await Player.open(proxy.stream_url(KEY), headers={b"User-Agent": [USER_AGENT]})
    await player.wait_bytes(1)
    code, detailed = await get(proxy.url + f"/streams/{KEY}")
    assert code == 200
    [listed] = json.loads(detailed)["players"]
    assert listed["user_agent"] == USER_AGENT.decode()
    player.disconnect()


@pytest.mark.parametrize(
    "listen, token, warned",
    [
        ("tcp:8000:interface=127.0.0.1", None, True),
        ("tcp6:8000:interface=\\:\\:1", None, True),
        ("tcp:8000:interface=127.0.0.1", TOKEN, False),
        ("tcp:8000:interface=0.0.0.0", None, False),
        ("tcp:8000", None, False),
    ],
)
def test_listening_on_loopback_without_a_token_is_said_at_startup(listen, token, warned):
    """
    Behind a reverse proxy on the same host every request comes from
    loopback, which without a token is an admin: the daemon says so.
    """
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        service = make_service(Config(listen=listen, admin_token=token), reactor)
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [formatEvent(e) for e in events if "admin_token" in (e.get("log_format") or "")]
    assert bool(said) is warned
    if warned:
        assert said[0].startswith(f"listening on loopback ({listen}) without admin_token")
    assert service.getServiceNamed("http") is not None
