"""The worker's notice subscription (:mod:`redisbus._notices`): raw on real servers, redis-py's PubSub elsewhere."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from redisbus import _notices, _resp
from redisbus.config import BusConfig
from redisbus.errors import BusConnectionError, RedisCommandError

CHANNEL = "rb:{t}:notify"


def _config(url: str, **settings: object) -> BusConfig:
    return BusConfig.from_url(url, namespace="t", **{"socket_timeout": 1.0, "health_check_interval": 0.3, **settings})


def _events(feed: _notices.NoticeFeed, count: int, timeout: float = 5.0) -> list[tuple[str, bytes | None]]:
    got: list[tuple[str, bytes | None]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        event = feed.get(0.05)
        if event is not None:
            got.append(event)
    return got


@pytest.fixture(params=["default", "resp2"])
def feed_on(redis_server, request) -> Iterator[tuple[_notices.NoticeFeed, redis.Redis]]:
    """A raw feed on the client redisbus makes (RESP3 on redis-py 8: notices are push frames) and on a RESP2 one."""
    config = _config(redis_server.url)
    protocol = {"resp2": {"protocol": 2}}.get(request.param, {})
    client = redis.Redis(**config.connection_kwargs(), **protocol, retry=config.retry())
    feed = _notices.open_feed(client, CHANNEL, config)
    yield feed, client
    feed.close()
    client.close()


def test_real_server_is_read_raw_and_every_notice_arrives_whole_and_in_order(feed_on, redis_server):
    feed, client = feed_on
    assert isinstance(feed, _notices._RawFeed)
    assert _events(feed, 1) == [("subscribe", None)]
    publisher = redis_server.client()
    sent = [b"", b"x", bytes(range(256)) * 3, b"\r\n$3\r\nabc\r\n", b"n" * 900]
    for data in sent:  # back to back: several arrive in one read and come out one per get()
        assert publisher.publish(CHANNEL, data) == 1
    assert publisher.publish("rb:{other}:notify", b"not ours") == 0
    assert _events(feed, len(sent)) == [("message", data) for data in sent]
    assert feed.get(0.1) is None
    assert client.ping()  # the subscription holds its own connection: the pool's others still work


def test_quiet_channel_is_health_checked_without_errors(feed_on, redis_server):
    feed, _ = feed_on
    assert _events(feed, 1) == [("subscribe", None)]
    deadline = time.monotonic() + 1.5  # five health-check intervals: PINGs sent and answered
    while time.monotonic() < deadline:
        assert feed.get(0.05) is None
    pings = redis_server.client().info("commandstats").get("cmdstat_ping", {}).get("calls", 0)
    assert pings >= 3
    redis_server.client().publish(CHANNEL, b"after the pings")
    assert _events(feed, 1) == [("message", b"after the pings")]


def test_server_that_stops_answering_is_a_connection_error_after_the_health_check(feed_on, redis_server):
    feed, _ = feed_on
    assert _events(feed, 1) == [("subscribe", None)]
    redis_server.pause()  # SIGSTOP: the socket stays open and silent
    try:
        started = time.monotonic()
        with pytest.raises(BusConnectionError, match="did not answer a health check within 1.0s"):
            while time.monotonic() - started < 10:
                feed.get(0.05)
        assert time.monotonic() - started <= 0.3 + 1.0 + 1.0  # interval + socket_timeout + slack
    finally:
        redis_server.resume()
    with pytest.raises(BusConnectionError, match="closed"):
        feed.get(0.05)


def test_restarted_server_is_subscribed_again_without_an_error(feed_on, redis_server):
    feed, _ = feed_on
    assert _events(feed, 1) == [("subscribe", None)]
    redis_server.restart()
    assert _events(feed, 1) == [("subscribe", None)]  # the listener catches up, as after any subscribe
    redis_server.client().publish(CHANNEL, b"after the restart")
    assert _events(feed, 1) == [("message", b"after the restart")]


def test_server_gone_for_good_is_a_connection_error_naming_both_failures(feed_on, redis_server):
    feed, _ = feed_on
    assert _events(feed, 1) == [("subscribe", None)]
    redis_server.kill()
    with pytest.raises(BusConnectionError, match=r"broke \(ServerClosed\) and could not be made again"):
        _events(feed, 1)


def test_channel_the_acl_forbids_is_refused_by_name(redis_server_factory):
    server = redis_server_factory(["--user", "w", "on", ">pw", "~*", "&rb:{other}:*", "+@all"])
    config = _config(server.url.replace("redis://", "redis://w:pw@"))
    client = config.client()
    feed = _notices.open_feed(client, CHANNEL, config)
    try:
        with pytest.raises(RedisCommandError, match=r"refused rb:\{t\}:notify: NOPERM") as refused:
            _events(feed, 1)
        assert "pw" not in str(refused.value)
    finally:
        feed.close()
        client.close()


def test_tls_server_is_read_raw(redis_server_factory, tls_certs):
    server = redis_server_factory(tls=tls_certs)
    config = _config(server.url, ssl_ca_certs=tls_certs["ca"])
    client = config.client()
    feed = _notices.open_feed(client, CHANNEL, config)
    try:
        assert isinstance(feed, _notices._RawFeed)
        assert _events(feed, 1) == [("subscribe", None)]
        publisher = config.client()
        for i in range(20):
            publisher.publish(CHANNEL, b"%d" % i + b"." * 500)
        assert _events(feed, 20) == [("message", b"%d" % i + b"." * 500) for i in range(20)]
    finally:
        feed.close()
        client.close()


def test_fakeredis_goes_through_pubsub_with_the_same_events(fake_redis):
    config = _config("redis://localhost:6379/0")
    feed = _notices.open_feed(fake_redis, CHANNEL, config)
    try:
        assert isinstance(feed, _notices._PubSubFeed)
        assert _events(feed, 1) == [("subscribe", None)]
        fake_redis.publish(CHANNEL, b"hello")
        assert _events(feed, 1) == [("message", b"hello")]
    finally:
        feed.close()
    with pytest.raises(BusConnectionError, match="closed"):
        feed.get(0.05)


def test_connection_closed_again_before_any_reply_is_an_error_not_a_loop(feed_on, redis_server, monkeypatch):
    feed, _ = feed_on
    assert _events(feed, 1) == [("subscribe", None)]

    def closed(self):
        raise _resp.ServerClosed()

    monkeypatch.setattr(_resp.Wire, "readline", closed)  # every connection closes as soon as it is read
    redis_server.client().publish(CHANNEL, b"wakes the reader")
    assert feed.get(2.0) is None  # the first close: subscribed again on a new connection, no error
    with pytest.raises(BusConnectionError, match="closed again right after subscribing"):
        feed.get(2.0)  # its confirmation is readable, and that connection closes too: the listener backs off
