"""A worker's subscription to its namespace's notices, read straight off the socket where it can be.

Every notice wakes every worker, so the code that reads one runs once per
worker and version, first thing after the process slept: on a busy host its
caches are cold and each layer costs several times what it costs hot.
redis-py's ``PubSub.get_message`` runs through its retry wrapper, a readiness
check, a pure-Python RESP3 parser and a message handler (about a fifth of a
worker's CPU per version, measured with ``time.thread_time`` around each
call). :class:`_RawFeed` holds one connection of the client's own pool (so
AUTH, TLS, ``SELECT`` and timeouts stay redis-py's) and reads the few lines
of a notice itself with :class:`redisbus._resp.Wire`, as the bulk path does.
It sends its own health-check ``PING`` and raises once one goes unanswered
for ``socket_timeout``: a half-open connection is otherwise indistinguishable
from a quiet channel.

Clients the raw path cannot drive (fakeredis, Redis Cluster, which needs
sharded subscribe on the right node) get :class:`_PubSubFeed`, redis-py's
``PubSub`` with the same health-check rule.
"""

from __future__ import annotations

import select
import time
from typing import Any, Literal, Protocol

import redis

from . import _resp
from .config import BusConfig
from .errors import BusConnectionError, RedisCommandError
from .transport import translate_errors, uses_sharded_pubsub

#: What a feed hands the listener: ``("subscribe", None)`` once subscribed, ``("message", notice bytes)`` per notice.
Event = tuple[Literal["subscribe", "message"], "bytes | None"]


class NoticeFeed(Protocol):
    """The notices of one channel, as the worker's listener reads them."""

    def get(self, timeout: float) -> Event | None:
        """The next event, or None if none came within ``timeout`` seconds.

        Raises:
            BusConnectionError: the connection broke, or left a health check unanswered.
            RedisCommandError: Redis refused the subscription (an ACL).
        """

    def close(self) -> None:
        """Drop the subscription and its connection (idempotent)."""


def open_feed(client: Any, channel: str, config: BusConfig) -> NoticeFeed:
    """Subscribe to ``channel`` on ``client``: raw on a plain connection, else through redis-py's ``PubSub``.

    Raises:
        BusConnectionError: Redis unreachable.
    """
    if _resp.fast_path_available(client):
        return _RawFeed(client, channel, config)
    return _PubSubFeed(client, channel, config)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _unanswered(config: BusConfig, channel: str) -> BusConnectionError:
    return BusConnectionError(
        f"the notice connection to {config.redacted_url()} ({channel}) did not answer a health check "
        f"within {config.socket_timeout}s"
    )


class _RawFeed:
    """``SUBSCRIBE`` on a connection borrowed from the client's pool, read with :class:`redisbus._resp.Wire`."""

    def __init__(self, client: Any, channel: str, config: BusConfig) -> None:
        self._pool = client.connection_pool
        self._config = config
        self._channel = channel
        self._conn: Any = _resp.borrow(self._pool)
        self._limit = config.socket_timeout
        self._resubscribed = False  # since the last reply read: a second close then is not retried at once
        try:
            with translate_errors("subscribing to notices", client):
                self._subscribe()
        except BaseException:
            self.close()
            raise

    def _subscribe(self) -> None:
        """Connect if needed and send ``SUBSCRIBE``; its confirmation comes as the next event."""
        conn = self._conn
        if conn._sock is None:
            conn.connect()
        self._sock = conn._sock
        self._wire = _resp.Wire(self._sock)
        self._pending = getattr(self._sock, "pending", None)  # TLS: bytes decrypted and not yet read
        self._sock.sendall(_resp.pack(conn, ("SUBSCRIBE", self._channel)))
        self._last_read = time.monotonic()
        self._ping_sent_at: float | None = None

    def _resubscribe(self, cause: BaseException) -> None:
        """After the connection closed or reset: connect (with the client's retry policy) and subscribe again.

        As redis-py's ``PubSub`` does, so a restarted server costs the worker a
        catch-up, not an error.
        """
        self._conn.disconnect()
        self._resubscribed = True
        try:
            self._subscribe()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise BusConnectionError(
                f"the notice connection to {self._config.redacted_url()} broke ({_describe(cause)}) "
                f"and could not be made again ({_describe(exc)})"
            ) from exc

    def get(self, timeout: float) -> Event | None:
        if self._conn is None:
            raise BusConnectionError(f"the notice subscription to {self._channel} is closed")
        try:
            while True:
                if not self._buffered():
                    if not select.select([self._sock], [], [], self._wait(timeout))[0]:
                        if self._ping_sent_at is not None and time.monotonic() - self._ping_sent_at > self._limit:
                            raise _unanswered(self._config, self._channel)
                        return None
                event = self._read_event()
                if event is not None:
                    return event
                timeout = 0.0  # a PONG: return what else is buffered, don't wait again
        except (RedisCommandError, BusConnectionError):
            self.close()
            raise
        except _resp.CLOSED_ERRORS as exc:  # closed or reset, not timed out
            try:
                if self._resubscribed:  # closed again before a single reply: let the listener back off
                    raise BusConnectionError(
                        f"the notice connection to {self._config.redacted_url()} was closed again right after "
                        f"subscribing ({_describe(exc)})"
                    ) from exc
                self._resubscribe(exc)
            except BaseException:
                self.close()
                raise
            return None
        except (OSError, ValueError, _resp.ProtocolError) as exc:
            self.close()
            raise BusConnectionError(
                f"the notice connection to {self._config.redacted_url()} broke ({_describe(exc)})"
            ) from exc

    def _buffered(self) -> bool:
        return self._wire.start < self._wire.end or (self._pending is not None and self._pending() > 0)

    def _wait(self, timeout: float) -> float:
        """How long to wait for the socket, at most ``timeout``: sends the health-check PING when it is due.

        A PING is due once the connection was quiet for ``health_check_interval``;
        the wait ends when an unanswered one is overdue (``socket_timeout``).
        """
        now = time.monotonic()
        interval = self._config.health_check_interval
        if self._ping_sent_at is None and interval and now - self._last_read >= interval:
            self._sock.sendall(_resp.pack(self._conn, ("PING",)))
            self._ping_sent_at = now
        if self._ping_sent_at is not None:
            return max(0.0, min(timeout, self._ping_sent_at + self._limit - now + 0.01))
        return min(timeout, self._last_read + interval - now) if interval else timeout

    def _read_event(self) -> Event | None:
        """One whole reply (a push of the subscription, or a PONG) off the socket; None for a PONG."""
        wire = self._wire
        line = wire.readline()
        self._last_read = time.monotonic()
        self._resubscribed = False
        self._ping_sent_at = None  # any reply proves the connection alive (a PONG may queue behind notices)
        kind = line[:1]
        if kind == b"-":
            raise RedisCommandError(
                f"subscribing to notices: Redis at {self._config.redacted_url()} refused {self._channel}: "
                f"{line[1:].decode(errors='replace')}"
            )
        if kind == b"+":  # RESP3 answers a PING on a subscribed connection as a plain reply
            return None
        if kind not in (b"*", b">"):  # RESP2 arrays, RESP3 pushes
            raise _resp.ProtocolError(f"unexpected reply {line[:80]!r} on the notice connection")
        count = int(line[1:])
        if not 0 < count <= 3:
            raise _resp.ProtocolError(f"unexpected reply {line[:80]!r} on the notice connection")
        parts = [wire.read_reply(1) for _ in range(count)]
        name = parts[0] if parts else None
        if name == b"message" and len(parts) == 3 and isinstance(parts[2], bytes):
            return "message", parts[2]
        if name == b"subscribe":
            return "subscribe", None
        if name == b"pong":
            return None
        raise _resp.ProtocolError(f"unexpected message {line[:80]!r} {name!r} on the notice connection")

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()  # subscribed: never back into the pool's rotation as it is
            self._pool.release(conn)


class _PubSubFeed:
    """redis-py's ``PubSub`` (sharded on a Redis 7 cluster), with the raw feed's health-check rule."""

    def __init__(self, client: Any, channel: str, config: BusConfig) -> None:
        self._config = config
        self._channel = channel
        self._client = client
        self._sharded = uses_sharded_pubsub(client)  # Redis 7 cluster: SSUBSCRIBE on the namespace's shard
        self._pubsub: Any = client.pubsub()
        self._unanswered_since: float | None = None
        try:
            with translate_errors("subscribing to notices", client):
                (self._pubsub.ssubscribe if self._sharded else self._pubsub.subscribe)(channel)
        except BaseException:
            self.close()
            raise

    def get(self, timeout: float) -> Event | None:
        pubsub = self._pubsub
        if pubsub is None:
            raise BusConnectionError(f"the notice subscription to {self._channel} is closed")
        with translate_errors("reading notices", self._client):
            message = (pubsub.get_sharded_message if self._sharded else pubsub.get_message)(timeout=timeout)
        self._check_health(message)
        if message is None:
            return None
        if message["type"] in ("subscribe", "ssubscribe"):
            return "subscribe", None
        if message["type"] in ("message", "smessage"):
            return "message", message["data"]
        return None

    def _check_health(self, message: Any) -> None:
        """Raise if the connection left its health-check PING unanswered for ``socket_timeout``.

        Any message read proves the connection alive (a PONG may queue behind
        notices while a long pull keeps the listener away), and restarts the clock.
        """
        if message is not None or getattr(self._pubsub, "health_check_response_counter", 0) <= 0:
            self._unanswered_since = None
            return
        now = time.monotonic()
        if self._unanswered_since is None:
            self._unanswered_since = now
        elif now - self._unanswered_since > self._config.socket_timeout:
            self._unanswered_since = None
            raise _unanswered(self._config, self._channel)

    def close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # the connection is already broken; nothing to release
                pass
