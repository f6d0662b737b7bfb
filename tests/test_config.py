"""
Tests for L{acestream_proxy.config}: defaults, the TOML file, command-line
overrides, and one clear line for every mistake.
"""

import json
import os
import pathlib
import re

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.python import usage

from acestream_proxy.config import (
    Config,
    EngineConfig,
    Tuning,
    build,
    engine_from_url,
    load_file,
)
from acestream_proxy.config_checks import REDIS_SHAPE, ConfigError
from acestream_proxy.options import Options

EXAMPLE = pathlib.Path(__file__).parent.parent / "systemd" / "aceproxy.toml.example"

FULL_TOML = """
listen = "tcp:9000:interface=127.0.0.1"
redis = "redis://db.example:6380/2"
admin_token = "s3cret"

[[engines]]
id = "local"
url = "http://127.0.0.1:6878"

[[engines]]
url = "https://Engine.Example/"
forwarded = true

[tuning]
heartbeat_interval = 2.5
ghost_client_timeout = 12
chunk_ttl = 30
buffer_chunks = 200
join_chunks = 0
cleanup_grace = 1
no_data_timeout = 3
reconnect_after = 4
owner_lease = 6
engine_connect_timeout = 1.5
engine_timeout = 7
first_byte_timeout = 8
probe_interval = 9
write_timeout = 11
max_reconnects = 0
max_streams = 10
max_clients_per_stream = 20
max_clients = 30
"""


def error_of(file_data, overrides=None):
    """The message of the L{ConfigError} that C{build} must raise."""
    with pytest.raises(ConfigError) as info:
        build(file_data, overrides or {})
    return str(info.value)


def assert_one_line(message):
    assert "\n" not in message and "\r" not in message
    assert len(message.splitlines()) == 1


def write(tmp_path, text):
    path = tmp_path / "aceproxy.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults():
    config = build({}, {})
    assert config == Config()
    assert config.listen == "tcp:8000"
    assert config.reuse_port is False
    assert config.redis is None
    assert config.admin_token is None
    assert (config.engines_url, config.engines_api_key, config.engines_events) == (
        None,
        None,
        False,
    )
    assert config.engines == (
        EngineConfig("127.0.0.1:6878", "http://127.0.0.1:6878", forwarded=False),
    )
    assert config.engines[0].host == "127.0.0.1"
    assert config.engines[0].port == 6878
    assert config.tuning == Tuning()
    assert attrs.asdict(Tuning()) == {
        "heartbeat_interval": 10,
        "ghost_client_timeout": 50,
        "chunk_ttl": 60,
        "buffer_chunks": 1000,
        "buffer_seconds": 8,
        "buffer_bytes": 6291456,
        "max_buffer_bytes": 268435456,
        "chunk_bytes": 49152,
        "chunk_delay": 0.1,
        "join_chunks": 3,
        "cleanup_grace": 5,
        "no_data_timeout": 10,
        "reconnect_after": 30,
        "owner_lease": 15,
        "worker_timeout": 3,
        "engine_connect_timeout": 5,
        "engine_timeout": 15,
        "first_byte_timeout": 20,
        "probe_interval": 30,
        "engines_refresh": 10,
        "write_timeout": 30,
        "max_reconnects": 5,
        "max_streams": 100,
        "max_clients_per_stream": 2000,
        "max_clients": 2000,
        "header_timeout": 10,
        "max_connections_per_address": 32,
        "max_new_streams_per_address": 10,
        "hls_target_duration": 2,
        "hls_list_size": 4,
    }


def test_full_file(tmp_path):
    config = build(load_file(write(tmp_path, FULL_TOML)), {})
    assert config.listen == "tcp:9000:interface=127.0.0.1"
    assert config.redis == "redis://db.example:6380/2"
    assert config.admin_token == "s3cret"
    assert config.engines == (
        EngineConfig("local", "http://127.0.0.1:6878", False),
        EngineConfig("engine.example:443", "https://engine.example:443", True),
    )
    assert (config.engines[1].host, config.engines[1].port) == ("engine.example", 443)
    assert config.tuning == Tuning(
        heartbeat_interval=2.5,
        ghost_client_timeout=12,
        chunk_ttl=30,
        buffer_chunks=200,
        join_chunks=0,
        cleanup_grace=1,
        no_data_timeout=3,
        reconnect_after=4,
        owner_lease=6,
        engine_connect_timeout=1.5,
        engine_timeout=7,
        first_byte_timeout=8,
        probe_interval=9,
        write_timeout=11,
        max_reconnects=0,
        max_streams=10,
        max_clients_per_stream=20,
        max_clients=30,
    )
    assert isinstance(config.tuning.ghost_client_timeout, float)
    assert isinstance(config.tuning.max_streams, int)


def test_partial_tuning_keeps_other_defaults():
    tuning = build({"tuning": {"chunk_ttl": 5}}, {}).tuning
    assert tuning == attrs.evolve(Tuning(), chunk_ttl=5.0)


def test_overrides_win_over_file():
    config = build(
        {"listen": "tcp:9000", "redis": "redis://a/1", "admin_token": "file"},
        {"listen": "tcp:9001", "redis": "unix:///run/redis.sock", "admin_token": "cli"},
    )
    assert config.listen == "tcp:9001"
    assert config.redis == "unix:///run/redis.sock"
    assert config.admin_token == "cli"


def test_unset_overrides_keep_file_values():
    """Options passes None for a flag not given and [] for no engine flag."""
    file_data = {"listen": "tcp:9000", "engines": [{"url": "http://e:1"}]}
    config = build(
        file_data, {"listen": None, "redis": None, "admin_token": None, "engines": []}
    )
    assert config.listen == "tcp:9000"
    assert config.engines == (EngineConfig("e:1", "http://e:1"),)


def test_engine_overrides_replace_file_engines():
    file_data = {"engines": [{"id": "a", "url": "http://a:1"}, {"url": "http://b:2"}]}
    engines = [
        engine_from_url("http://c:3"),
        engine_from_url("http://d", forwarded=True),
    ]
    config = build(file_data, {"engines": engines})
    assert config.engines == (
        EngineConfig("c:3", "http://c:3", False),
        EngineConfig("d:80", "http://d:80", True),
    )


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("http://127.0.0.1:6878", "http://127.0.0.1:6878"),
        ("http://127.0.0.1:6878/", "http://127.0.0.1:6878"),
        ("HTTP://Engine.LAN", "http://engine.lan:80"),
        ("https://engine.lan", "https://engine.lan:443"),
        ("http://[::1]:6878/", "http://[::1]:6878"),
    ],
)
def test_engine_url_normalised(url, normal):
    engine = engine_from_url(url)
    assert engine.url == normal
    assert engine.id == normal.split("://")[1]
    assert engine.forwarded is False


def test_engine_host_and_port_ipv6():
    engine = engine_from_url("http://[::1]:6878")
    assert (engine.id, engine.host, engine.port) == ("[::1]:6878", "::1", 6878)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://x",
        "127.0.0.1:6878",
        "http://",
        "http://:6878",
        "http://host:notaport",
        "http://host:0",
        "http://host:70000",
        "http://host:6878/ace",
        "http://host:6878/?x=1",
        "http://host:6878?",
        "http://host:6878#frag",
        "http://user:pw@host:6878",
        "http://ho st:6878",
        "http://host:6878\n",
        "http://[::1",
        "",
    ],
)
def test_bad_engine_url(url):
    message = error_of({"engines": [{"url": "http://ok:1"}, {"url": url}]})
    assert message == (
        f"engines[1].url: not an http(s) URL with host and port: {json.dumps(url)}"
    )
    assert_one_line(message)


ERRORS = [
    ({"tuning": {"heartbeat_intervall": 1}}, "unknown key: tuning.heartbeat_intervall"),
    ({"listn": "tcp:1"}, "unknown key: listn"),
    ({"engines": [{"url": "http://a:1", "urll": 1}]}, "unknown key: engines[0].urll"),
    (
        {"tuning": {"heartbeat_interval": "ten"}},
        'tuning.heartbeat_interval: expected a positive number, got "ten"',
    ),
    (
        {"tuning": {"heartbeat_interval": True}},
        "tuning.heartbeat_interval: expected a positive number, got true",
    ),
    (
        {"tuning": {"chunk_ttl": 0}},
        "tuning.chunk_ttl: expected a positive number, got 0",
    ),
    (
        {"tuning": {"write_timeout": -1.5}},
        "tuning.write_timeout: expected a positive number, got -1.5",
    ),
    (
        {"tuning": {"probe_interval": float("inf")}},
        "tuning.probe_interval: expected a positive number, got inf",
    ),
    (
        {"tuning": {"engine_timeout": float("nan")}},
        "tuning.engine_timeout: expected a positive number, got nan",
    ),
    (
        {"tuning": {"buffer_chunks": 10.0}},
        "tuning.buffer_chunks: expected a positive integer, got 10.0",
    ),
    (
        {"tuning": {"buffer_chunks": 0}},
        "tuning.buffer_chunks: expected a positive integer, got 0",
    ),
    (
        {"tuning": {"buffer_seconds": 0}},
        "tuning.buffer_seconds: expected a positive number, got 0",
    ),
    (
        {"tuning": {"buffer_bytes": 6.5}},
        "tuning.buffer_bytes: expected a positive integer, got 6.5",
    ),
    (
        {"tuning": {"buffer_bytes": 1503}},
        "tuning.buffer_bytes: must be at least 1504 (one chunk), got 1503",
    ),
    (
        {"tuning": {"max_buffer_bytes": -1}},
        "tuning.max_buffer_bytes: expected a positive integer, got -1",
    ),
    (
        {"tuning": {"max_buffer_bytes": 2000, "buffer_bytes": 4000}},
        "tuning.max_buffer_bytes: must be at least tuning.buffer_bytes (4000), got 2000",
    ),
    (
        {"tuning": {"max_clients": False}},
        "tuning.max_clients: expected a positive integer, got false",
    ),
    (
        {"tuning": {"max_streams": "100"}},
        'tuning.max_streams: expected a positive integer, got "100"',
    ),
    (
        {"tuning": {"join_chunks": -1}},
        "tuning.join_chunks: expected a non-negative integer, got -1",
    ),
    (
        {"tuning": {"max_reconnects": 1.5}},
        "tuning.max_reconnects: expected a non-negative integer, got 1.5",
    ),
    (
        {"tuning": {"buffer_chunks": 3}},
        "tuning.join_chunks: must be less than tuning.buffer_chunks (3), got 3",
    ),
    (
        {"tuning": {"ghost_client_timeout": 10}},
        "tuning.ghost_client_timeout: must be greater than"
        " tuning.heartbeat_interval (10), got 10",
    ),
    ({"tuning": 3}, "tuning: expected a table, got 3"),
    ({"engines": []}, "engines: expected at least one engine"),
    (
        {"engines": {"url": "http://a:1"}},
        "engines: expected an array of tables ([[engines]]), got {'url': 'http://a:1'}",
    ),
    ({"engines": ["http://a:1"]}, 'engines[0]: expected a table, got "http://a:1"'),
    ({"engines": [{"id": "a"}]}, "engines[0].url: missing"),
    ({"engines": [{"url": 6878}]}, "engines[0].url: expected a string, got 6878"),
    (
        {"engines": [{"url": "http://a:1", "forwarded": "yes"}]},
        'engines[0].forwarded: expected true or false, got "yes"',
    ),
    (
        {"engines": [{"url": "http://a:1", "id": ""}]},
        'engines[0].id: expected a non-empty string, got ""',
    ),
    (
        {"engines": [{"url": "http://a:1", "id": 7}]},
        "engines[0].id: expected a non-empty string, got 7",
    ),
    (
        {"engines": [{"url": "http://a:1"}, {"url": "http://a:1/"}]},
        'engines[1].id: duplicate engine id "a:1" (also engines[0])',
    ),
    (
        {"engines": [{"id": "x", "url": "http://a:1"}, {"id": "x", "url": "http://b:1"}]},
        'engines[1].id: duplicate engine id "x" (also engines[0])',
    ),
    ({"listen": ""}, 'listen: expected a non-empty string, got ""'),
    ({"listen": 8000}, "listen: expected a non-empty string, got 8000"),
    ({"admin_token": ""}, 'admin_token: expected a non-empty string, got ""'),
    ({"reuse_port": "yes"}, 'reuse_port: expected true or false, got "yes"'),
    ({"reuse_port": 1, "redis": "redis://h/0"}, "reuse_port: expected true or false, got 1"),
    (
        {"reuse_port": True},
        "reuse_port: needs redis: workers sharing a port must share their streams,"
        " or each would open its own engine session",
    ),
    (
        {"reuse_port": True, "redis": "redis://h/0", "listen": "systemd:domain=INET:index=0"},
        'reuse_port: applies to a tcp: listen endpoint only, not "systemd:domain=INET:index=0"',
    ),
    (
        {"reuse_port": True, "redis": "redis://h/0", "listen": "unix:/run/aceproxy.sock"},
        'reuse_port: applies to a tcp: listen endpoint only, not "unix:/run/aceproxy.sock"',
    ),
]


@pytest.mark.parametrize(("file_data", "expected"), ERRORS)
def test_errors_name_the_key_on_one_line(file_data, expected):
    message = error_of(file_data)
    assert message == expected
    assert_one_line(message)


def test_duplicate_engine_flags_rejected():
    engines = [engine_from_url("http://a:1"), engine_from_url("http://a:1", forwarded=True)]
    assert error_of({}, {"engines": engines}) == (
        'engines[1].id: duplicate engine id "a:1" (also engines[0])'
    )


def test_unknown_override_rejected():
    assert error_of({}, {"tuning": Tuning()}) == "unknown override: tuning"


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://localhost:6379",
        "redis://localhost:6379/",
        "redis://localhost:6379/0",
        "redis://10.0.0.5/15",
        "redis://[::1]:6379/1",
        "redis://user:pw@localhost:6379/0",
        "redis://:pw@localhost",
        "rediss://localhost:6379",
        "rediss://:pw@localhost/1?ssl_ca_certs=/etc/redis/ca.pem",
        "unix:///run/redis/redis.sock",
        "unix:///run/redis/redis.sock?db=3",
    ],
)
def test_good_redis_urls(url):
    assert build({"redis": url}, {}).redis == url


@pytest.mark.parametrize(
    "url",
    [
        "",
        "localhost:6379",
        "http://localhost:6379",
        "redis://",
        "redis://:6379/0",
        "redis://localhost:port",
        "redis://localhost:6379/zero",
        "redis://localhost:6379/0/1",
        "redis://localhost:6379/0?timeout=1",
        "redis://localhost/0#x",
        "redis://local host",
        "unix://relative/redis.sock",
        "unix:///",
        "unix:///run/redis.sock?db=x",
        "unix:///run/redis.sock?database=1",
        "unix:///run/redis.sock?db=1#x",
        "unix:///run/redis\n.sock",
        6379,
    ],
)
def test_bad_redis_urls(url):
    message = error_of({"redis": url})
    shown = json.dumps(url) if isinstance(url, str) else repr(url)
    assert message == (
        f"redis: expected {REDIS_SHAPE}, got {shown}"
    )
    assert_one_line(message)


@pytest.mark.parametrize(
    "listen",
    [
        "tcp:8000",
        "tcp:8000:interface=127.0.0.1",
        "tcp6:8000:interface=\\:\\:",
        "unix:/run/aceproxy.sock",
        "systemd:domain=INET:index=0",
        "systemd:domain=INET6:name=aceproxy",
    ],
)
def test_good_listen(listen):
    assert build({"listen": listen}, {}).listen == listen


def test_systemd_listen_leaves_activation_environment(monkeypatch):
    """
    Twisted reads socket activation variables once and removes them, so
    validating the configuration must not read them first.
    """
    activation = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
    for name, value in activation.items():
        monkeypatch.setenv(name, value)
    build({"listen": "systemd:domain=INET:index=0"}, {})
    assert {name: os.environ.get(name) for name in activation} == activation


@pytest.mark.parametrize(
    "listen",
    [
        "nonsense:",
        "nonsense",
        "tcp:http",
        "tcp:8000:colour=blue",
        "ssl:8443:privateKey=/nonexistent/key.pem",
        "systemd:domain=NOPE:index=0",
        "systemd:domain=INET",
        "systemd:domain=INET:index=0:name=x",
        "systemd:domain=INET:index=first",
        "systemd:domain=INET:index=0:colour=blue",
    ],
)
def test_bad_listen(listen):
    message = error_of({}, {"listen": listen})
    assert message.startswith(
        f"listen: not a valid endpoint description: {json.dumps(listen)} ("
    )
    assert_one_line(message)


@pytest.mark.parametrize(
    "listen", ["tcp:8000", "tcp:8000:interface=127.0.0.1", "tcp6:8000:interface=\\:\\:"]
)
def test_reuse_port_on_tcp_with_redis(listen):
    config = build({"listen": listen, "reuse_port": True, "redis": "redis://h/0"}, {})
    assert (config.listen, config.reuse_port) == (listen, True)


def test_reuse_port_off_needs_nothing():
    config = build({"reuse_port": False, "listen": "systemd:domain=INET:index=0"}, {})
    assert config.reuse_port is False


def test_reuse_port_flag(tmp_path):
    options = Options()
    options.parseOptions(["--reuse-port", "--redis", "redis://h/0", "--listen", "tcp:8000"])
    assert options.config.reuse_port is True
    # Without the flag, the file's setting stands.
    path = write(tmp_path, 'reuse_port = true\nredis = "redis://h/0"\n')
    options = Options()
    options.parseOptions(["--config", path])
    assert options.config.reuse_port is True
    options = Options()
    options.parseOptions([])
    assert options.config.reuse_port is False


def test_reuse_port_flag_without_redis_is_a_usage_error():
    with pytest.raises(usage.UsageError) as info:
        Options().parseOptions(["--reuse-port"])
    assert str(info.value).startswith("reuse_port: needs redis")
    assert_one_line(str(info.value))


def test_missing_file():
    with pytest.raises(ConfigError) as info:
        load_file("/nonexistent/aceproxy.toml")
    assert str(info.value) == (
        "cannot read /nonexistent/aceproxy.toml: No such file or directory"
    )


def test_invalid_toml(tmp_path):
    path = write(tmp_path, 'listen = "tcp:8000\n[tuning\n')
    with pytest.raises(ConfigError) as info:
        load_file(path)
    message = str(info.value)
    assert re.fullmatch(re.escape(path) + r": invalid TOML: .*\(at line 1, column \d+\)", message)
    assert_one_line(message)


def test_not_utf8(tmp_path):
    path = tmp_path / "aceproxy.toml"
    path.write_bytes(b'admin_token = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_file(str(path))
    assert str(info.value).startswith(f"{path}: invalid TOML: not UTF-8")


def test_options_end_to_end(tmp_path):
    path = write(tmp_path, FULL_TOML)
    options = Options()
    options.parseOptions(
        [
            "--config",
            path,
            "--listen",
            "tcp:9100",
            "--redis",
            "redis://other/3",
            "--admin-token",
            "cli-token",
            "--forwarded-engine",
            "http://10.0.0.2:6878",
            "--engine",
            "http://10.0.0.1:6878/",
            "--forwarded-engine",
            "https://remote.example",
        ]
    )
    config = options.config
    assert config.listen == "tcp:9100"
    assert config.redis == "redis://other/3"
    assert config.admin_token == "cli-token"
    assert config.engines == (
        EngineConfig("10.0.0.2:6878", "http://10.0.0.2:6878", True),
        EngineConfig("10.0.0.1:6878", "http://10.0.0.1:6878", False),
        EngineConfig("remote.example:443", "https://remote.example:443", True),
    )
    assert config.tuning.buffer_chunks == 200


def test_options_file_only(tmp_path):
    options = Options()
    options.parseOptions(["-c", write(tmp_path, FULL_TOML)])
    assert options.config == build(load_file(write(tmp_path, FULL_TOML)), {})


def test_options_defaults():
    options = Options()
    options.parseOptions([])
    assert options.config == Config()


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--config", "/nonexistent.toml"], "cannot read /nonexistent.toml:"),
        (["--engine", "ftp://x"], '--engine: not an http(s) URL with host and port: "ftp://x"'),
        (
            ["--forwarded-engine", "http://h/path"],
            '--forwarded-engine: not an http(s) URL with host and port: "http://h/path"',
        ),
        (["--listen", "nonsense:"], 'listen: not a valid endpoint description: "nonsense:"'),
        (["--redis", "localhost"], "redis: expected redis://"),
    ],
)
def test_options_errors_are_usage_errors(arguments, expected):
    with pytest.raises(usage.UsageError) as info:
        Options().parseOptions(arguments)
    assert str(info.value).startswith(expected)
    assert_one_line(str(info.value))


def test_options_bad_file_is_usage_error(tmp_path):
    path = write(tmp_path, "[tuning]\nheartbeat_interval = -1\n")
    with pytest.raises(usage.UsageError) as info:
        Options().parseOptions(["--config", path])
    assert str(info.value) == "tuning.heartbeat_interval: expected a positive number, got -1"
    assert info.value.__cause__ is None


def test_options_help_mentions_every_option():
    text = str(Options())
    for flag in [
        "--config",
        "--listen",
        "--reuse-port",
        "--redis",
        "--engine",
        "--forwarded-engine",
        "--admin-token",
    ]:
        assert flag in text


def test_example_file_equals_defaults():
    data = load_file(str(EXAMPLE))
    assert build(data, {}) == Config()
    # Every tuning key is spelled out, so the example documents them all.
    assert set(data["tuning"]) == {field.name for field in attrs.fields(Tuning)}
    text = EXAMPLE.read_text(encoding="utf-8")
    for name in ["redis", "admin_token", "engines_url", "engines_api_key"]:
        assert re.search(rf"^#\s+{name} = ", text, re.MULTILINE)
    assert re.search(r"^reuse_port = false$", text, re.MULTILINE)


KNOWN_KEYS = {field.name for field in attrs.fields(Config)}
TOML_VALUES = st.recursive(
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=5,
)
VALID_ENTRIES = st.fixed_dictionaries(
    {},
    optional={
        "listen": st.just("tcp:8000"),
        "redis": st.just("redis://localhost/0"),
        "admin_token": st.text(min_size=1),
        "engines": st.just([{"url": "http://127.0.0.1:6878"}]),
        "tuning": st.just({"join_chunks": 1}),
    },
)


@given(
    valid=VALID_ENTRIES,
    key=st.text().filter(lambda k: k not in KNOWN_KEYS),
    value=TOML_VALUES,
)
def test_unknown_top_level_key_rejected(valid, key, value):
    file_data = {**valid, key: value}
    with pytest.raises(ConfigError) as info:
        build(file_data, {})
    message = str(info.value)
    shown = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)
    if shown.isprintable():
        assert message == f"unknown key: {shown}"
    else:
        assert message.startswith("unknown key: ")
    assert_one_line(message)


@given(key=st.from_regex(r"[A-Za-z0-9_-]+", fullmatch=True).filter(lambda k: k not in KNOWN_KEYS))
def test_unknown_bare_top_level_key_named_exactly(key):
    assert error_of({key: 1, "listen": "tcp:8000"}) == f"unknown key: {key}"


def test_the_redis_password_is_not_in_the_config_repr():
    config = build({"redis": "redis://:hunter2-secret@127.0.0.1:6379/0"}, {})
    assert config.redis == "redis://:hunter2-secret@127.0.0.1:6379/0"
    assert "hunter2-secret" not in repr(config)


def test_engines_url_alone_means_announced_engines_only():
    config = build({"engines_url": "https://orch.lan:8443/engines"}, {})
    assert config.engines == ()
    assert config.engines_url == "https://orch.lan:8443/engines"
    assert config.tuning.engines_refresh == 10
    both = build(
        {"engines_url": "http://orch.lan/engines", "engines": [{"url": "http://e.lan:6878"}]},
        {},
    )
    assert [e.id for e in both.engines] == ["e.lan:6878"]
    flags = build(
        {"engines_url": "http://orch.lan/engines"}, {"engines": [engine_from_url("http://f.lan")]}
    )
    assert [e.id for e in flags.engines] == ["f.lan:80"]
    # Without engines_url, no engine at all is still a mistake.
    assert error_of({"engines": []}) == "engines: expected at least one engine"


@pytest.mark.parametrize(
    "value, shown",
    [
        ("ftp://orch.lan/engines", '"ftp://orch.lan/engines"'),
        ("http:///engines", '"http:///engines"'),
        ("http://orch.lan/engines#x", '"http://orch.lan/engines#x"'),
        ("http://orch .lan/engines", '"http://orch .lan/engines"'),
        ("http://admin:pw@orch.lan/engines", '"http://***@orch.lan/engines"'),
        (8000, "8000"),
    ],
)
def test_bad_engines_url(value, shown):
    assert error_of({"engines_url": value}) == (
        f"engines_url: expected an http(s) URL with a host and no credentials, got {shown}"
    )


def test_the_orchestrator_api_key_is_checked_and_never_shown():
    config = build({"engines_url": "http://orch.lan/engines", "engines_api_key": "k3y-s3cret"}, {})
    assert config.engines_api_key == "k3y-s3cret"
    assert "k3y-s3cret" not in repr(config)
    assert error_of({"engines_api_key": "k3y-s3cret"}) == "engines_api_key: needs engines_url"
    message = error_of({"engines_url": "http://orch.lan/", "engines_api_key": "two\nlines"})
    assert message == "engines_api_key: expected a non-empty string of printable ASCII"
    assert error_of({"engines_url": "http://orch.lan/", "engines_api_key": ""}) == message


def test_engines_refresh_is_a_duration():
    assert build({"tuning": {"engines_refresh": 2.5}}, {}).tuning.engines_refresh == 2.5
    assert error_of({"tuning": {"engines_refresh": 0}}) == (
        "tuning.engines_refresh: expected a positive number, got 0"
    )


def test_engines_events_needs_engines_url():
    config = build({"engines_url": "http://orch.lan/engines", "engines_events": True}, {})
    assert config.engines_events is True
    assert error_of({"engines_events": True}) == "engines_events: needs engines_url"
    assert error_of({"engines_url": "http://orch.lan/", "engines_events": "yes"}) == (
        'engines_events: expected true or false, got "yes"'
    )
