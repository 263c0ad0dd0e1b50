"""The conftest fixtures start, break and restore real Redis servers as promised."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

import fakeredis
import pytest
import redis

if TYPE_CHECKING:
    from conftest import MakeServer, RedisServerHandle

FORBIDDEN_PORT = 6379


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_server_is_fresh_and_not_the_default_port(redis_server: RedisServerHandle) -> None:
    client = redis_server.client()
    assert redis_server.port != FORBIDDEN_PORT
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert client.dbsize() == 0
    assert client.config_get("save") == {"save": ""}
    assert client.config_get("appendonly") == {"appendonly": "no"}
    client.set("k", b"\x00\xff")
    assert redis.Redis.from_url(redis_server.url).get("k") == b"\x00\xff"


def test_kill_then_start_reuses_port_with_empty_data(redis_server: RedisServerHandle) -> None:
    client = redis_server.client()
    client.set("k", "v")
    port, pid = redis_server.port, redis_server.pid
    redis_server.kill()
    assert not redis_server.running
    with pytest.raises(redis.ConnectionError):
        redis_server.client(retry=None).ping()
    redis_server.start()
    assert redis_server.port == port
    assert redis_server.pid != pid
    assert client.get("k") is None
    client.set("k", "again")
    assert client.get("k") == b"again"


def test_stop_and_restart_do_not_persist(redis_server: RedisServerHandle) -> None:
    client = redis_server.client()
    client.set("k", "v")
    redis_server.stop()
    assert not _listening(redis_server.port)
    redis_server.start()
    assert client.get("k") is None
    client.set("k", "v")
    redis_server.restart()
    assert client.dbsize() == 0


def test_pause_leaves_connection_open_but_silent(redis_server: RedisServerHandle) -> None:
    client = redis_server.client(socket_timeout=0.2, retry=None)
    assert client.ping()
    redis_server.pause()
    with pytest.raises(redis.TimeoutError):
        client.ping()
    redis_server.resume()
    assert redis_server.client().ping()


def test_paused_server_is_cleaned_up(redis_server_factory: MakeServer) -> None:
    handle = redis_server_factory()
    handle.pause()
    pid = handle.pid
    handle.close()
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not handle.dir.exists()


def test_factory_extra_args_and_config_set(redis_server_factory: MakeServer) -> None:
    handle = redis_server_factory(["--proto-max-bulk-len", "1mb"])
    client = handle.client()
    assert client.config_get("proto-max-bulk-len") == {"proto-max-bulk-len": "1048576"}
    handle.config_set("proto-max-bulk-len", "2mb")
    assert client.config_get("proto-max-bulk-len") == {"proto-max-bulk-len": "2097152"}


def test_factory_servers_are_independent(redis_server_factory: MakeServer) -> None:
    first, second = redis_server_factory(), redis_server_factory()
    assert first.port != second.port
    first.client().set("k", "v")
    assert second.client().get("k") is None


def test_factory_password_and_acl_user(redis_server_factory: MakeServer) -> None:
    handle = redis_server_factory(["--user", "bob", "on", ">bobpw", "~*", "+@all"], password="s3cr:t")
    assert redis.Redis.from_url(handle.url).ping()
    assert handle.client(username="bob", password="bobpw").ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=handle.host, port=handle.port, retry=None).ping()


def test_bad_extra_args_fail_with_server_output(redis_server_factory: MakeServer) -> None:
    with pytest.raises(RuntimeError, match="Bad directive"):
        redis_server_factory(["--no-such-directive", "1"])


def test_tls_server_needs_tls_and_the_ca(redis_server_factory: MakeServer, tls_certs: dict[str, str]) -> None:
    handle = redis_server_factory(tls=tls_certs)
    assert handle.url == f"rediss://127.0.0.1:{handle.port}/0"
    assert handle.client().ping()
    assert redis.Redis.from_url(handle.url, ssl_ca_certs=tls_certs["ca"]).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(handle.url, retry=None).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host=handle.host, port=handle.port, retry=None, socket_timeout=1).ping()


def test_tls_client_certificate_required(redis_server_factory: MakeServer, tls_certs: dict[str, str]) -> None:
    handle = redis_server_factory(tls={**tls_certs, "auth_clients": "yes"})
    assert handle.client().ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(handle.url, ssl_ca_certs=tls_certs["ca"], retry=None).ping()


def test_free_port_is_free(free_port: int) -> None:
    assert free_port != FORBIDDEN_PORT
    assert not _listening(free_port)


def test_fake_redis_is_fresh_and_shares_its_server(
    fake_redis: fakeredis.FakeRedis, fake_redis_server: fakeredis.FakeServer
) -> None:
    assert fake_redis.dbsize() == 0
    fake_redis.set("k", "v")
    assert fakeredis.FakeRedis(server=fake_redis_server).get("k") == b"v"
    assert fake_redis.eval("return redis.call('GET', KEYS[1])", 1, "k") == b"v"
