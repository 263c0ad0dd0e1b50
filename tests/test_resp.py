"""Tests of the raw RESP bulk path (:mod:`redisbus._resp`) against real redis-server processes.

Servers come from the shared ``redis_server_factory`` fixture (free ports,
never 6379); fakeredis covers the plain-pipeline fallback.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis
import torch

from redisbus import _resp
from redisbus.config import BusConfig
from redisbus.errors import BusConnectionError, CorruptBlobError, PublishError, RedisCommandError, VersionNotFoundError

MiB = 1 << 20
CHUNK = 4 * MiB  # the default chunk size
FILL = 0xA5  # what an untouched destination byte holds


def _blob(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)


def _items(blob: np.ndarray, sizes: list[int], prefix: str = "t:chunk") -> list[tuple[str, memoryview]]:
    view = memoryview(blob)
    out, pos = [], 0
    for i, size in enumerate(sizes):
        out.append((f"{prefix}:{i}", view[pos : pos + size]))
        pos += size
    return out


def _round_trip(client: redis.Redis, sizes: list[int], *, connections: int = 1, prefix: str = "t:chunk") -> None:
    src = _blob(sum(sizes), seed=len(sizes))
    items = _items(src, sizes, prefix)
    _resp.write_chunks(client, items, connections=connections)
    dst = np.full(sum(sizes), FILL, dtype=np.uint8)
    views = [view for _, view in _items(dst, sizes, prefix)]
    _resp.read_chunks_into(client, [k for k, _ in items], views, connections=connections)
    assert np.array_equal(src, dst)
    # Plain redis-py on the same pool still works, and sees exactly the bytes written.
    assert client.ping()
    for key, view in items[:3]:
        assert client.get(key) == bytes(view)


@pytest.fixture
def server(redis_server_factory):
    return redis_server_factory()


@pytest.fixture
def client(server) -> redis.Redis:
    return server.client(socket_timeout=10)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "size",
    [0, 1, _resp.SMALL_PAYLOAD - 1, _resp.SMALL_PAYLOAD, CHUNK - 1, CHUNK, CHUNK + 1],
    ids=lambda s: f"{s}B",
)
def test_round_trip_single_sizes(client, size):
    _round_trip(client, [size])
    assert _resp.fast_path_available(client)


def test_round_trip_mixed_sizes_bit_exact(client):
    sizes = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 17, 0, _resp.SMALL_PAYLOAD, 3 * MiB + 5]
    _round_trip(client, sizes)


def test_round_trip_many_chunks_small_windows(client, monkeypatch):
    # Small windows force many top-ups and interleaved acknowledgement reads.
    monkeypatch.setattr(_resp, "READ_WINDOW_BYTES", 100_000)
    monkeypatch.setattr(_resp, "WRITE_WINDOW_BYTES", 300_000)
    monkeypatch.setattr(_resp, "MAX_INFLIGHT_COMMANDS", 7)
    rng = np.random.default_rng(1)
    sizes = [int(s) for s in rng.integers(0, 150_000, size=300)] + [CHUNK] * 3
    _round_trip(client, sizes)


def test_round_trip_blob_in_default_chunks(client):
    total = 10 * CHUNK + 12345
    sizes = [min(CHUNK, total - o) for o in range(0, total, CHUNK)]
    _round_trip(client, sizes)


def test_round_trip_two_connections(client):
    sizes = [CHUNK] * 6 + [1000] * 5
    _round_trip(client, sizes, connections=2)
    _round_trip(client, [5], connections=4)  # fewer items than connections


def test_non_byte_views_move_raw_bytes(client):
    src = torch.randn(3, 1000, dtype=torch.float32)
    dst = torch.zeros(3, 1000, dtype=torch.float32)
    _resp.write_chunks(client, [("t:f32", memoryview(src.numpy()))])
    _resp.read_chunks_into(client, ["t:f32"], [memoryview(dst.numpy())])
    assert torch.equal(src, dst)
    assert client.strlen("t:f32") == src.numel() * 4


def test_expire_sets_a_ttl(client):
    _resp.write_chunks(client, [("t:e", memoryview(b"x" * 100_000))], expire_seconds=30)
    assert 0 < client.pttl("t:e") <= 30_000
    _resp.write_chunks(client, [("t:p", memoryview(b"y"))])
    assert client.pttl("t:p") == -1


def test_selected_db_and_decoded_client(server):
    c2 = server.client(db=2, decode_responses=True)
    _resp.write_chunks(c2, [("t:db", memoryview(b"\xff\x00raw"))])
    assert server.client(db=2).get("t:db") == b"\xff\x00raw"
    assert server.client(db=0).exists("t:db") == 0
    out = bytearray(5)
    _resp.read_chunks_into(c2, ["t:db"], [memoryview(out)])
    assert bytes(out) == b"\xff\x00raw"


def test_busconfig_client(server):
    cfg = BusConfig.from_url(server.url)
    client = cfg.client()
    try:
        assert _resp.fast_path_available(client)
        _round_trip(client, [CHUNK, 10])
        name = client.client_getname()
        assert name is not None and (name.decode() if isinstance(name, bytes) else name).startswith("redisbus:")
    finally:
        client.close()


def test_resp3_client(server):
    client = server.client(protocol=3)
    _round_trip(client, [CHUNK, 3])
    with pytest.raises(VersionNotFoundError, match="t:missing"):
        _resp.read_chunks_into(client, ["t:missing"], [memoryview(bytearray(3))])


def test_stale_reply_on_pooled_connection_is_not_read_as_data(client):
    key, payload = "t:stale", b"payload-bytes"
    _resp.write_chunks(client, [(key, memoryview(payload))])
    # A connection goes back to the pool with an unread reply on its socket.
    conn = client.connection_pool.get_connection()
    conn.send_command("GET", key)
    client.connection_pool.release(conn)
    out = bytearray(len(payload))
    _resp.read_chunks_into(client, [key], [memoryview(out)])
    assert bytes(out) == payload
    assert client.ping()


# --------------------------------------------------------------------------- read errors


def test_missing_key_names_the_key_and_leaves_its_view_alone(client):
    _resp.write_chunks(client, [("t:a", memoryview(b"a" * 10)), ("t:c", memoryview(b"c" * CHUNK))])
    before = client.client_id()
    views = [memoryview(bytearray(10)), memoryview(bytearray([FILL]) * 20), memoryview(bytearray([FILL]) * CHUNK)]
    with pytest.raises(VersionNotFoundError, match="t:b"):
        _resp.read_chunks_into(client, ["t:a", "t:b", "t:c"], views)
    assert bytes(views[1]) == bytes([FILL]) * 20
    assert bytes(views[2]) == bytes([FILL]) * CHUNK  # later chunks were drained, not written
    # The stream stayed in sync: the same connection serves the next calls.
    assert client.client_id() == before
    out = bytearray(CHUNK)
    _resp.read_chunks_into(client, ["t:c"], [memoryview(out)])
    assert out == b"c" * CHUNK


@pytest.mark.parametrize("stored", [CHUNK - 1, CHUNK + 7, 0], ids=["short", "long", "empty"])
def test_length_mismatch_is_corrupt_and_connection_survives(client, stored):
    _resp.write_chunks(client, [("t:m", memoryview(b"m" * stored)), ("t:ok", memoryview(b"k" * 1000))])
    before = client.client_id()
    view = memoryview(bytearray([FILL]) * CHUNK)
    with pytest.raises(CorruptBlobError) as info:
        _resp.read_chunks_into(client, ["t:m", "t:ok"], [view, memoryview(bytearray(1000))])
    message = str(info.value)
    assert "t:m" in message and str(stored) in message and str(CHUNK) in message
    assert bytes(view) == bytes([FILL]) * CHUNK
    assert client.client_id() == before
    out = bytearray(1000)
    _resp.read_chunks_into(client, ["t:ok"], [memoryview(out)])
    assert out == b"k" * 1000


def test_huge_mismatch_drops_the_connection_and_next_call_works(client, monkeypatch):
    monkeypatch.setattr(_resp, "MAX_DRAIN_BYTES", MiB)
    _resp.write_chunks(client, [("t:big", memoryview(b"b" * (2 * MiB))), ("t:ok", memoryview(b"k" * 10))])
    before = client.client_id()
    with pytest.raises(CorruptBlobError, match="t:big"):
        _resp.read_chunks_into(client, ["t:big", "t:ok"], [memoryview(bytearray(10)), memoryview(bytearray(10))])
    assert client.client_id() != before  # discarded, not reused half-read
    out = bytearray(10)
    _resp.read_chunks_into(client, ["t:ok"], [memoryview(out)])
    assert out == b"k" * 10


def test_held_connection_serves_every_read_and_goes_back_to_the_pool_on_close(client, monkeypatch):
    monkeypatch.setattr(_resp, "MAX_DRAIN_BYTES", MiB)
    _resp.write_chunks(client, [("t:big", memoryview(b"b" * (2 * MiB))), ("t:ok", memoryview(b"k" * 10))])
    held = _resp.HeldConnection(client)
    pool = client.connection_pool
    borrowed = []
    real_get = pool.get_connection
    monkeypatch.setattr(pool, "get_connection", lambda *a, **k: borrowed.append(1) or real_get(*a, **k))
    out = bytearray(10)
    for _ in range(3):
        assert _resp.read_chunks_into(client, ["t:ok"], [memoryview(out)], first=[("PING",)], held=held) == [b"PONG"]
        assert out == b"k" * 10
    assert len(borrowed) == 1  # taken from the pool once, then kept
    conn = held.take()
    socket_before = conn._sock
    with pytest.raises(CorruptBlobError, match="t:big"):  # not drained: the held connection is dropped ...
        _resp.read_chunks_into(client, ["t:big"], [memoryview(bytearray(10))], held=held)
    assert held.take() is conn and conn._sock is None
    _resp.read_chunks_into(client, ["t:ok"], [memoryview(out)], held=held)  # ... and reconnects on its next use
    assert conn._sock is not None and conn._sock is not socket_before and len(borrowed) == 1
    assert conn not in pool._available_connections
    held.close()
    held.close()
    assert conn in pool._available_connections
    with pytest.raises(ValueError, match="another client"):
        _resp.read_chunks_into(redis.Redis(), ["t:ok"], [memoryview(out)], held=held)
    with pytest.raises(ValueError, match="single connection"):
        _resp.read_chunks_into(client, ["t:ok"], [memoryview(out)], held=held, connections=2)


def test_wrong_type_is_corrupt(client):
    client.rpush("t:list", b"x")
    with pytest.raises(CorruptBlobError, match="t:list"):
        _resp.read_chunks_into(client, ["t:list"], [memoryview(bytearray(1))])
    assert client.ping()


def test_error_in_one_of_two_connections(client):
    sizes = [MiB] * 6
    src = _blob(sum(sizes))
    items = _items(src, sizes)
    _resp.write_chunks(client, items)
    client.delete(items[4][0])
    views = [memoryview(bytearray(MiB)) for _ in sizes]
    with pytest.raises(VersionNotFoundError, match=items[4][0]):
        _resp.read_chunks_into(client, [k for k, _ in items], views, connections=2)
    _round_trip(client, [MiB, 1], connections=2)


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_split_covers_everything_in_order(parts):
    rng = np.random.default_rng(parts)
    for n in (1, 2, 5, 40):
        sizes = [int(s) for s in rng.integers(0, 1000, size=n)]
        ranges = _resp._split(sizes, parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(lo < hi for lo, hi in ranges)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert len(ranges) <= min(parts, n)


def test_bad_arguments(client):
    with pytest.raises(ValueError):
        _resp.read_chunks_into(client, ["a", "b"], [memoryview(bytearray(1))])
    with pytest.raises(ValueError):
        _resp.read_chunks_into(client, ["a"], [memoryview(b"read-only")])
    with pytest.raises(ValueError):
        _resp.write_chunks(client, [("a", memoryview(b"x"))], expire_seconds=0)
    with pytest.raises(ValueError):
        _resp.write_chunks(client, [("a", memoryview(b"x"))], connections=0)
    with pytest.raises(ValueError):
        _resp.write_chunks(client, [("a", memoryview(np.zeros((4, 4), dtype=np.uint8)[:, 1]))])
    _resp.write_chunks(client, [])
    _resp.read_chunks_into(client, [], [])


# --------------------------------------------------------------------------- write errors


def test_oom_is_publish_error_and_connection_survives(redis_server_factory):
    server = redis_server_factory(extra_args=["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"])
    client = server.client(socket_timeout=10)
    before = client.client_id()
    blob = _blob(8 * MiB)
    with pytest.raises(PublishError, match=r"t:chunk:\d+.*OOM"):
        _resp.write_chunks(client, _items(blob, [MiB] * 8))
    assert client.client_id() == before
    assert client.ping()


def test_value_over_proto_max_bulk_len_is_publish_error(redis_server_factory):
    server = redis_server_factory(extra_args=["--proto-max-bulk-len", "1mb"])
    client = server.client(socket_timeout=10)
    blob = _blob(2 * MiB + 10)
    items = [("t:small", memoryview(blob)[:10]), ("t:huge", memoryview(blob)[10:])]
    with pytest.raises(PublishError, match="t:huge"):
        _resp.write_chunks(client, items)
    assert client.ping()  # the pool reconnects
    assert client.get("t:small") == bytes(blob[:10])


def test_acl_refusals_keep_the_stream_in_sync(redis_server_factory):
    server = redis_server_factory(
        extra_args=["--user", "writer", "on", ">pw", "~*", "+@all", "-get",
                    "--user", "reader", "on", ">pw", "~*", "+@all", "-set"]
    )
    writer = server.client(username="writer", password="pw", socket_timeout=10)
    reader = server.client(username="reader", password="pw", socket_timeout=10)
    _resp.write_chunks(writer, [("t:a", memoryview(b"a" * 100)), ("t:b", memoryview(b"b" * MiB))])
    before = writer.client_id()
    with pytest.raises(RedisCommandError, match="t:a.*NOPERM"):
        _resp.read_chunks_into(writer, ["t:a", "t:b"], [memoryview(bytearray(100)), memoryview(bytearray(MiB))])
    assert writer.client_id() == before
    with pytest.raises(PublishError, match="t:c.*NOPERM"):
        _resp.write_chunks(reader, [("t:c", memoryview(b"c" * MiB)), ("t:d", memoryview(b"d"))])
    out = bytearray(MiB)
    _resp.read_chunks_into(reader, ["t:b"], [memoryview(out)])
    assert out == b"b" * MiB


# --------------------------------------------------------------------------- connection failures


def _trigger_on_call(monkeypatch, attr: str, nth: int, action) -> None:
    """Run ``action`` right after the ``nth`` call of ``_resp.Wire.<attr>``."""
    original = getattr(_resp.Wire, attr)
    calls = {"n": 0}

    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == nth:
            action()
        return result

    monkeypatch.setattr(_resp.Wire, attr, wrapper)


@pytest.mark.timeout(60)
def test_server_killed_mid_read_is_connection_error(server, monkeypatch):
    client = server.client()  # no socket timeout: only the dead peer can end the read
    sizes = [CHUNK] * 8
    _resp.write_chunks(client, _items(_blob(sum(sizes)), sizes))
    _trigger_on_call(monkeypatch, "take", 2, server.kill)
    views = [memoryview(bytearray(CHUNK)) for _ in sizes]
    with pytest.raises(BusConnectionError, match=r"t:chunk:\d"):
        _resp.read_chunks_into(client, [f"t:chunk:{i}" for i in range(8)], views)
    monkeypatch.undo()
    server.start()
    _round_trip(client, [10, CHUNK])  # the pool reconnects to the new server


@pytest.mark.timeout(60)
def test_server_killed_mid_write_is_connection_error(server, monkeypatch):
    client = server.client()
    _trigger_on_call(monkeypatch, "send_view", 2, server.kill)
    sizes = [CHUNK] * 16
    with pytest.raises(BusConnectionError, match=r"t:chunk:\d"):
        _resp.write_chunks(client, _items(_blob(sum(sizes)), sizes))
    monkeypatch.undo()
    server.start()
    _round_trip(client, [10, CHUNK])


@pytest.mark.timeout(60)
def test_frozen_server_times_out_instead_of_hanging(server, monkeypatch):
    client = server.client(socket_timeout=1)
    sizes = [CHUNK] * 8
    _resp.write_chunks(client, _items(_blob(sum(sizes)), sizes))
    _trigger_on_call(monkeypatch, "take", 1, server.pause)
    views = [memoryview(bytearray(CHUNK)) for _ in sizes]
    started = time.monotonic()
    try:
        with pytest.raises(BusConnectionError, match="timed out"):
            _resp.read_chunks_into(client, [f"t:chunk:{i}" for i in range(8)], views)
    finally:
        server.resume()
    assert time.monotonic() - started < 20
    monkeypatch.undo()
    _round_trip(client, [CHUNK])


def test_unreachable_server_is_connection_error(free_port):
    client = redis.Redis(port=free_port, socket_connect_timeout=2)
    with pytest.raises(BusConnectionError):
        _resp.write_chunks(client, [("t:x", memoryview(b"x"))])
    with pytest.raises(BusConnectionError):
        _resp.read_chunks_into(client, ["t:x"], [memoryview(bytearray(1))])


# --------------------------------------------------------------------------- auth, unix socket, TLS


def test_password_protected_server(redis_server_factory):
    server = redis_server_factory(password="s3cret pw")
    _round_trip(server.client(socket_timeout=10), [CHUNK, 1, 0])
    wrong = redis.Redis(host=server.host, port=server.port, password="nope")
    with pytest.raises(BusConnectionError):
        _resp.read_chunks_into(wrong, ["t:chunk:0"], [memoryview(bytearray(CHUNK))])
    anonymous = redis.Redis(host=server.host, port=server.port)
    with pytest.raises(BusConnectionError):
        _resp.write_chunks(anonymous, [("t:x", memoryview(b"x"))])


@pytest.fixture
def unix_socket_path() -> Iterator[str]:
    # Unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    path = f"/tmp/rb-resp-{os.getpid()}-{threading.get_ident()}.sock"
    yield path
    if os.path.exists(path):
        os.unlink(path)


def test_unix_socket(redis_server_factory, unix_socket_path):
    redis_server_factory(extra_args=["--unixsocket", unix_socket_path, "--unixsocketperm", "700"])
    client = redis.Redis(unix_socket_path=unix_socket_path, socket_timeout=10)
    try:
        assert client.connection_pool.connection_class is redis.UnixDomainSocketConnection
        assert _resp.fast_path_available(client)
        _round_trip(client, [CHUNK, CHUNK + 1, 0, 5])
        cfg = BusConfig.from_url(f"unix://{unix_socket_path}?db=1")
        bus_client = cfg.client()
        _round_trip(bus_client, [MiB, 3])
        bus_client.close()
    finally:
        client.close()


def test_tls(redis_server_factory, tls_certs):
    server = redis_server_factory(tls=tls_certs)
    client = server.client(socket_timeout=10)
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert _resp.fast_path_available(client)
    _round_trip(client, [CHUNK, CHUNK + 1, 1, 0, 20_000, _resp.SMALL_PAYLOAD])
    _round_trip(client, [MiB] * 4, connections=2)
    with pytest.raises(VersionNotFoundError, match="t:nope"):
        _resp.read_chunks_into(client, ["t:nope"], [memoryview(bytearray(5))])
    with pytest.raises(CorruptBlobError):
        _resp.read_chunks_into(client, ["t:chunk:0"], [memoryview(bytearray(7))])
    assert client.ping()


# --------------------------------------------------------------------------- commands sent first


@pytest.fixture(params=["fast", "plain"])
def any_client(request, server, fake_redis):
    """A real server's client (raw RESP path) and fakeredis (plain pipelines): the same replies from both."""
    client = server.client(socket_timeout=10) if request.param == "fast" else fake_redis
    assert _resp.fast_path_available(client) == (request.param == "fast")
    return client


def test_commands_sent_first_reply_like_redis_py(any_client):
    """Bulk, nil, integer, array with a nil and error replies, in order, then the chunks."""
    any_client.set("t:m", b"manifest\r\nbytes")
    any_client.set("t:n", 7)
    src = _blob(3 * 1000 + 17)
    items = _items(src, [1000, 1000, 1000, 17])
    _resp.write_chunks(any_client, items)
    dst = np.full(src.size, FILL, dtype=np.uint8)
    replies = _resp.read_chunks_into(
        any_client,
        [k for k, _ in items],
        [v for _, v in _items(dst, [1000, 1000, 1000, 17])],
        first=[("MGET", "t:n", "t:absent"), ("STRLEN", "t:m"), ("GETRANGE", "t:m", 0, 99), ("GET", "t:absent"),
               ("EXISTS", "t:m", "t:n"), ("INCRBY", "t:m", 1)],
    )  # fmt: skip
    assert replies[:5] == [[b"7", None], 15, b"manifest\r\nbytes", None, 2]
    assert isinstance(replies[5], redis.ResponseError) and "not an integer" in str(replies[5])
    assert np.array_equal(src, dst)
    assert any_client.get("t:m") == b"manifest\r\nbytes"  # the stream stayed in sync


def test_commands_sent_first_without_chunks(any_client):
    any_client.set("t:v", b"x")
    assert _resp.read_chunks_into(any_client, [], [], first=[("GET", "t:v")]) == [b"x"]
    assert _resp.read_chunks_into(any_client, [], []) == []


def test_commands_sent_first_need_one_connection(client):
    with pytest.raises(ValueError, match="single connection"):
        _resp.read_chunks_into(client, ["t:a"], [memoryview(bytearray(1))], connections=2, first=[("PING",)])


# --------------------------------------------------------------------------- fallback


def test_fakeredis_uses_the_plain_path(fake_redis, monkeypatch):
    assert not _resp.fast_path_available(fake_redis)

    def no_fast_path(*args, **kwargs):
        raise AssertionError("fast path used for fakeredis")

    monkeypatch.setattr(_resp, "_with_connection", no_fast_path)
    monkeypatch.setattr(_resp, "PLAIN_BATCH_BYTES", 3 * MiB)  # several pipelines
    _round_trip(fake_redis, [0, 1, MiB, MiB + 1, 2 * MiB, 17])
    _resp.write_chunks(fake_redis, [("t:e", memoryview(b"e"))], expire_seconds=5)
    assert 0 < fake_redis.pttl("t:e") <= 5000
    with pytest.raises(VersionNotFoundError, match="t:absent"):
        _resp.read_chunks_into(fake_redis, ["t:absent"], [memoryview(bytearray(1))])
    view = memoryview(bytearray([FILL]) * 4)
    with pytest.raises(CorruptBlobError, match="t:e.*1.*4"):
        _resp.read_chunks_into(fake_redis, ["t:e"], [view])
    assert bytes(view) == bytes([FILL]) * 4


def test_other_clients_are_not_fast(server):
    assert not _resp.fast_path_available(object())
    assert not _resp.fast_path_available(redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=type("Custom", (redis.Connection,), {}), port=server.port)))
    # Client-side caching (needs Redis 7.4 to run; only the dispatch is checked here).
    cached = redis.Redis(port=server.port, protocol=3, cache_config=redis.cache.CacheConfig())
    assert not _resp.fast_path_available(cached)
    cached.close()


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_small_commands_are_packed_as_redis_py_packs_them(encoding):
    conn = redis.Connection(encoding=encoding)
    commands = [
        ("MGET", "rb:{ns}:latest", "rb:{ns}:pin"),
        ("GETRANGE", "rb:{ns}:m:12", 0, -1),
        ("EVALSHA", "ab" * 20, 2, "rb:{ns}:seq", "rb:{ns}:pending", 7, 1765158000.123456, 1e-300),
        ("EVALSHA", b"\x00\xff" * 20, 2, "k\u00e9y", b"", 10**18, b"m" * 70_000),
    ]
    for command in commands:
        assert _resp.pack(conn, command) == b"".join(conn.pack_command(*command))
    with pytest.raises(TypeError, match="bool"):
        _resp.pack(conn, ("SET", "k", True))
