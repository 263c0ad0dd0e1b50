"""Zero-copy bulk data path: many chunk ``SET``/``GET`` commands over raw RESP.

redis-py moves large values slowly (0.1-0.4 GB/s here) because its command
packer copies every payload and its reply parsers build a fresh ``bytes``
object per reply. This module speaks RESP directly on the socket of a
connection borrowed from the client's own pool, so AUTH, ``SELECT``, TLS,
the client name and timeouts all stay redis-py's business:

* :func:`write_chunks` sends ``SET`` headers, then each payload straight from
  its memoryview (``sendall``), then the trailer; it never copies a payload
  (payloads under 64 KiB are coalesced with the headers into one send).
* :func:`read_chunks_into` sends pipelined ``GET`` commands (a bounded window
  of bytes in flight) and receives each value with ``recv_into`` straight
  into the caller's view; only the few bytes read ahead together with a reply
  header pass through a small scratch buffer.

Both fall back to plain redis-py pipelines (:func:`_write_chunks_plain`,
:func:`_read_chunks_into_plain`) for clients whose connections are not plain
TCP / TLS / unix socket connections (fakeredis, RedisCluster, client-side
caching, RESP3 with maintenance notifications); see
:func:`fast_path_available`. Callers never have to care.

Invariants: replies are read on our side only when redis-py's parser buffer
is empty, and any failure that may leave the stream out of sync disconnects
the connection before it goes back to the pool.

Measured (loopback, 2 cores, Redis 7.0, 256 MB in 4 MiB chunks, see
``/tmp/resp_bench.py``): reads keep only :data:`READ_WINDOW_BYTES` in flight
because pipelining every ``GET`` at once halves throughput (Redis copies
each reply into a fresh output buffer); one connection is as fast as two
or more on two cores, so ``connections`` defaults to 1.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, Union

import redis
from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection

from .errors import (
    BusConnectionError,
    CorruptBlobError,
    PublishError,
    RedisBusError,
    RedisCommandError,
    VersionNotFoundError,
)

__all__ = ["Command", "HeldConnection", "Payload", "fast_path_available", "payload_len", "read_chunks_into", "write_chunks"]

#: Connection classes whose ``_sock`` we know how to drive directly (exact types, not subclasses:
#: fakeredis' connection subclasses :class:`redis.connection.Connection`).
_FAST_CONNECTION_CLASSES: frozenset[type] = frozenset({Connection, SSLConnection, UnixDomainSocketConnection})

#: Bytes of GET replies allowed in flight per connection (bounds Redis's output buffer for us).
READ_WINDOW_BYTES = 2 * 1024 * 1024
#: Bytes of SET payloads sent but not yet acknowledged per connection (early stop on errors).
WRITE_WINDOW_BYTES = 64 * 1024 * 1024
#: Most commands in flight per connection, whatever their size.
MAX_INFLIGHT_COMMANDS = 4096
#: Payloads smaller than this are copied into the send buffer with their headers (fewer syscalls).
SMALL_PAYLOAD = 64 * 1024
#: Small commands and payloads are gathered up to this many bytes before a send.
SEND_BUFFER_BYTES = 1024 * 1024
#: Size of the scratch buffer that reply headers (and a little read-ahead) land in.
SCRATCH_BYTES = 64 * 1024
#: A mismatched value larger than this is not drained; the connection is dropped instead.
MAX_DRAIN_BYTES = 64 * 1024 * 1024
#: Longest reply line (status, error, length header) accepted.
MAX_LINE_BYTES = 64 * 1024
#: Bytes per plain-pipeline batch in the fallback path (bounds client memory).
PLAIN_BATCH_BYTES = 64 * 1024 * 1024

_CRLF = b"\r\n"
#: How errors name the command :func:`write_chunks` sends behind the values.
_BEHIND = "the command sent behind the chunks"
_T = TypeVar("_T")
#: A value to write: a byte view, or a tuple of byte views written back to back.
Payload = Union[memoryview, "tuple[memoryview, ...]"]
#: A small command's arguments, e.g. ``("MGET", "a", "b")``.
Command = Sequence[Union[str, bytes, int]]


# --------------------------------------------------------------------------- dispatch


def fast_path_available(client: Any) -> bool:
    """Whether ``client``'s pool hands out connections the raw RESP path can drive.

    True for a :class:`redis.Redis` whose pool makes plain
    :class:`~redis.connection.Connection`, :class:`~redis.connection.SSLConnection`
    or :class:`~redis.connection.UnixDomainSocketConnection` objects (exact
    classes), with no client-side cache and no RESP3 push notifications.
    False for fakeredis, RedisCluster, sentinel-managed and any other client.
    """
    if not isinstance(client, redis.Redis):
        return False
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, redis.ConnectionPool):
        return False
    if pool.connection_class not in _FAST_CONNECTION_CLASSES:
        return False
    if getattr(pool, "cache", None) is not None:
        return False
    kwargs = getattr(pool, "connection_kwargs", {}) or {}
    protocol = kwargs.get("protocol", 2)
    if protocol not in (None, 2, "2", 3, "3"):
        return False
    if protocol in (3, "3"):
        enabled = getattr(pool, "maint_notifications_enabled", None)
        # RESP3 maintenance notifications arrive as unsolicited push frames that
        # redis-py must see; leave such connections to redis-py.
        if callable(enabled) and enabled():
            return False
    return True


def write_chunks(
    client: redis.Redis,
    items: Sequence[tuple[str, Payload]],
    *,
    expire_seconds: float | None = None,
    connections: int = 1,
    before_send: Callable[[str, Payload], None] | None = None,
    then: Callable[[], Command] | None = None,
    held: HeldConnection | None = None,
) -> Any:
    """``SET`` each key to its view's bytes, pipelined, without copying the payloads.

    Args:
        client: a redis-py client; connections come from its own pool.
        items: ``(key, view)`` pairs; each view must be C-contiguous (any
            format; its raw bytes are stored). A view may also be a tuple of
            views: their bytes, back to back, make the value (sent without
            joining them on the fast path).
        expire_seconds: if given, each key gets this time to live (``PX``).
        connections: number of pool connections used in parallel (threads).
        before_send: called with ``(key, byte view or tuple of them)`` just before each payload
            is sent (e.g. to checksum it while the previous one drains); from
            the sending thread, once per key and attempt.
        then: called once every payload was sent (and none refused so far; on
            the plain path: queued in the last pipeline); the small command it
            returns goes out behind them, on the same connection and in the
            same round trip (Redis runs it after every ``SET``). Not with
            several connections.
        held: write on this connection of ``client``'s instead of borrowing one
            from the pool (one connection only).

    Returns:
        The reply to ``then``'s command (an error reply as a :class:`redis.ResponseError`
        instance, not raised), or None without ``then``.

    Raises:
        BusConnectionError: the socket failed, timed out or was closed (the
            error names the key being written).
        PublishError: Redis answered a ``SET`` with an error (OOM, bulk length
            over ``proto-max-bulk-len``...); names the first failing key.
        ValueError: ``then`` or ``held`` with several connections, or a ``held`` connection of another client.
    """
    if (then is not None or held is not None) and connections != 1:
        raise ValueError("a command sent behind the values, or a held connection, needs a single connection")
    if held is not None and held.client is not client:
        raise ValueError("the held connection belongs to another client")
    px = _expire_ms(expire_seconds)
    views = [(key, _payload(view)) for key, view in items]
    if not views and then is None:
        return None
    if not fast_path_available(client):
        return _write_chunks_plain(client, views, expire_seconds=expire_seconds, before_send=before_send, then=then)
    replies: list[Any] = []
    _run_parallel(
        lambda part, stop: _with_connection(client, lambda conn: _write_on(conn, part, px, stop, before_send, then,
                                                                           replies), held),
        views,
        [payload_len(v) for _, v in views],
        connections,
    )  # fmt: skip
    return replies[0] if replies else None


def read_chunks_into(
    client: redis.Redis,
    keys: Sequence[str],
    views: Sequence[memoryview],
    *,
    connections: int = 1,
    after_recv: Callable[[str, memoryview], None] | None = None,
    first: Sequence[Command] = (),
    held: HeldConnection | None = None,
) -> list[Any]:
    """``GET`` each key straight into its view with ``recv_into``, pipelined.

    Each value must be exactly ``len(view)`` bytes (``nbytes`` for non-byte
    views). A view is written only with the exact bytes of its key's value.

    Args:
        client: a redis-py client; connections come from its own pool.
        keys: chunk keys.
        views: one writable, C-contiguous view per key.
        connections: number of pool connections used in parallel (threads).
        after_recv: called with ``(key, byte view)`` as soon as each value has
            landed whole in its view (e.g. to verify it while the next ones
            arrive); a :class:`~redisbus.errors.RedisBusError` it raises stops
            the transfer and is raised once the connection is back in sync.
        first: small commands (argument tuples) sent ahead of the ``GET`` commands in
            the same round trip, on one connection; their replies are returned.
        held: read on this connection of ``client``'s instead of borrowing one
            from the pool (one connection only).

    Returns:
        The replies to ``first``, in order: bulk strings as bytes, integers,
        arrays as lists, nil as None, and an error reply as a
        :class:`redis.ResponseError` instance in its place (not raised). Only
        for commands whose replies redis-py passes on as they are (``GET``,
        ``MGET``, ``STRLEN``, ``GETRANGE``...): the fallback path goes through redis-py.

    Raises:
        VersionNotFoundError: a key does not exist (names the key).
        CorruptBlobError: a value's length differs from its view's (names the
            key and both lengths), or the key holds another type.
        BusConnectionError: the socket failed, timed out or was closed.
        RedisCommandError: Redis refused a ``GET`` (an ACL rule: ``NOPERM``...);
            the connection stays in sync.
        ValueError: ``keys`` and ``views`` differ in length, ``first`` or ``held`` with
            several connections, or a ``held`` connection of another client.
    """
    if len(keys) != len(views):
        raise ValueError(f"{len(keys)} keys but {len(views)} views")
    if (first or held is not None) and connections != 1:
        raise ValueError("commands sent first, or a held connection, need a single connection")
    if held is not None and held.client is not client:
        raise ValueError("the held connection belongs to another client")
    pairs = [(key, _byte_view(view, writable=True)) for key, view in zip(keys, views)]
    if not pairs and not first:
        return []
    if not fast_path_available(client):
        return _read_chunks_into_plain(
            client, [k for k, _ in pairs], [v for _, v in pairs], after_recv=after_recv, first=first
        )
    replies: list[Any] = []
    _run_parallel(
        lambda part, stop: _with_connection(client, lambda conn: _read_on(conn, part, stop, after_recv, first, replies),
                                            held),
        pairs,
        [len(v) for _, v in pairs],
        connections,
    )
    return replies


# --------------------------------------------------------------------------- plain fallback


def _write_chunks_plain(
    client: Any,
    items: Sequence[tuple[str, Payload]],
    *,
    expire_seconds: float | None = None,
    before_send: Callable[[str, Payload], None] | None = None,
    then: Callable[[], Command] | None = None,
) -> Any:
    """Fallback of :func:`write_chunks`: redis-py pipelines of ``SET`` (copies, but works everywhere)."""
    px = _expire_ms(expire_seconds)
    batches = _batches(items, lambda item: payload_len(item[1])) or [[]]
    for number, batch in enumerate(batches, 1):
        pipe = client.pipeline(transaction=False)
        for key, view in batch:
            if before_send is not None:
                before_send(key, view)
            value = b"".join(view) if isinstance(view, tuple) else view
            pipe.set(key, value, px=px)  # byte-format view: redis-py's Python packer sends it uncopied
        behind = then is not None and number == len(batches)
        if behind:
            pipe.execute_command(*then())  # type: ignore[misc]  # behind is only true with then
        what = f"chunk {batch[0][0]!r}" if batch else _BEHIND
        try:
            replies = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise BusConnectionError(f"connection failed while writing {what}: {exc}") from exc
        for (key, _), reply in zip(batch, replies):
            if isinstance(reply, Exception):
                raise PublishError(f"Redis refused chunk {key!r}: {reply}") from reply
        if behind:
            return replies[-1]
    return None


def _read_chunks_into_plain(
    client: Any,
    keys: Sequence[str],
    views: Sequence[memoryview],
    *,
    after_recv: Callable[[str, memoryview], None] | None = None,
    first: Sequence[Command] = (),
) -> list[Any]:
    """Fallback of :func:`read_chunks_into`: redis-py pipelines of ``GET``, values copied into the views."""
    pairs = list(zip(keys, views))
    answers: list[Any] = []
    for number, batch in enumerate(_batches(pairs, lambda item: len(item[1])) or [[]]):
        pipe = client.pipeline(transaction=False)
        ahead = len(first) if number == 0 else 0
        for command in first[:ahead]:
            pipe.execute_command(*command)
        for key, _ in batch:
            pipe.get(key)
        try:
            replies = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            what = f"chunk {batch[0][0]!r}" if batch else "the first replies"
            raise BusConnectionError(f"connection failed while reading {what}: {exc}") from exc
        answers.extend(replies[:ahead])
        for (key, view), value in zip(batch, replies[ahead:]):
            if isinstance(value, Exception):
                if "WRONGTYPE" in str(value):
                    raise CorruptBlobError(f"chunk {key!r} is not a string value: {value}") from value
                raise RedisCommandError(f"Redis refused to read chunk {key!r}: {value}") from value
            if value is None:
                raise VersionNotFoundError(f"chunk {key!r} does not exist")
            if isinstance(value, str):
                raise CorruptBlobError(f"chunk {key!r} came back decoded as text; use a bytes client")
            if len(value) != len(view):
                raise CorruptBlobError(f"chunk {key!r} holds {len(value)} bytes, expected {len(view)}")
            view[:] = value
            if after_recv is not None:
                after_recv(key, view)
    return answers


def _batches(items: Sequence[_T], size: Callable[[_T], int]) -> list[list[_T]]:
    """Split ``items`` into consecutive batches of about :data:`PLAIN_BATCH_BYTES`."""
    out: list[list[_T]] = []
    current: list[_T] = []
    total = 0
    for item in items:
        if current and (total + size(item) > PLAIN_BATCH_BYTES or len(current) >= MAX_INFLIGHT_COMMANDS):
            out.append(current)
            current, total = [], 0
        current.append(item)
        total += size(item)
    if current:
        out.append(current)
    return out


# --------------------------------------------------------------------------- helpers


def _expire_ms(expire_seconds: float | None) -> int | None:
    """``expire_seconds`` as whole milliseconds (at least 1), or None."""
    if expire_seconds is None:
        return None
    if not math.isfinite(expire_seconds) or expire_seconds <= 0:
        raise ValueError(f"expire_seconds must be a positive number, got {expire_seconds!r}")
    return max(1, round(expire_seconds * 1000))


def _payload(view: Any) -> Payload:
    """A value to write: one flat byte view, or a tuple of them (written back to back)."""
    if isinstance(view, (tuple, list)):
        return tuple(_byte_view(part, writable=False) for part in view)
    return _byte_view(view, writable=False)


def payload_len(payload: Payload) -> int:
    """Bytes of a value to write (see :func:`write_chunks`)."""
    return sum(len(part) for part in payload) if isinstance(payload, tuple) else len(payload)


def pack(conn: Connection, command: Command) -> bytes:
    """A small command in RESP, its strings encoded as ``conn``'s encoder does (redis-py's packer costs 3x)."""
    encoder = conn.encoder
    out = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, str):
            data = arg.encode(encoder.encoding, encoder.encoding_errors)
        elif isinstance(arg, bool):
            raise TypeError("a bool is not a Redis argument")
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            data = bytes(arg)
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _byte_view(view: Any, *, writable: bool) -> memoryview:
    """A flat unsigned-byte view over ``view``'s memory (no copy)."""
    mv = view if isinstance(view, memoryview) else memoryview(view)
    if mv.format != "B" or mv.ndim != 1:
        if not mv.c_contiguous:
            raise ValueError("chunk views must be C-contiguous")
        mv = mv.cast("B")
    elif not mv.c_contiguous:
        raise ValueError("chunk views must be C-contiguous")
    if writable and mv.readonly:
        raise ValueError("read_chunks_into needs writable views")
    return mv


def _split(sizes: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Cut ``range(len(sizes))`` into at most ``parts`` contiguous ranges of about equal bytes."""
    n = len(sizes)
    parts = max(1, min(parts, n))
    if parts == 1:
        return [(0, n)]
    total = sum(sizes)
    bounds: list[tuple[int, int]] = []
    start = 0
    acc = 0
    for part in range(1, parts):
        target = total * part / parts
        end = start
        while end < n - (parts - part) and (acc + sizes[end] <= target or end == start):
            acc += sizes[end]
            end += 1
        bounds.append((start, end))
        start = end
    bounds.append((start, n))
    return [b for b in bounds if b[0] < b[1]]


def _run_parallel(
    work: Callable[[Sequence[_T], threading.Event], None],
    items: Sequence[_T],
    sizes: Sequence[int],
    connections: int,
) -> None:
    """Run ``work`` over contiguous slices of ``items``, one thread (and connection) per slice.

    The first error stops the other slices at their next command and is raised.
    """
    if connections < 1:
        raise ValueError(f"connections must be at least 1, got {connections}")
    ranges = _split(sizes, connections)
    stop = threading.Event()
    if len(ranges) == 1:
        work(items, stop)
        return
    errors: list[BaseException] = []

    def run(lo: int, hi: int) -> None:
        try:
            work(items[lo:hi], stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=run, args=r, name="redisbus-resp", daemon=True) for r in ranges[1:]]
    for t in threads:
        t.start()
    run(*ranges[0])
    for t in threads:
        t.join()
    if errors:
        # Prefer a real error over a sibling's "stopped" (none here: stopped slices return quietly).
        raise errors[0]


_NEEDS_COMMAND_NAME: dict[type, bool] = {}


def _get_connection(pool: redis.ConnectionPool) -> Connection:
    """``pool.get_connection()`` across redis-py versions (5.0 required a command name)."""
    needs = _NEEDS_COMMAND_NAME.get(type(pool))
    if needs is None:
        try:
            param = inspect.signature(pool.get_connection).parameters.get("command_name")
            needs = param is not None and param.default is inspect.Parameter.empty
        except (TypeError, ValueError):
            needs = False
        _NEEDS_COMMAND_NAME[type(pool)] = needs
    if needs:
        return pool.get_connection("GET")  # type: ignore[call-arg]
    return pool.get_connection()


def _parser_idle(conn: Connection) -> bool:
    """True when redis-py's parser holds no buffered bytes for ``conn``."""
    parser = getattr(conn, "_parser", None)
    if parser is None:
        return False
    reader = getattr(parser, "_reader", None)  # hiredis
    if reader is not None:
        has_data = getattr(reader, "has_data", None)
        if callable(has_data):
            return not has_data()
        return getattr(parser, "_next_response", False) is False
    buffer = getattr(parser, "_buffer", None)  # pure-Python SocketBuffer
    unread = getattr(buffer, "unread_bytes", None)
    if callable(unread):
        return unread() == 0
    return False


class HeldConnection:
    """One connection taken out of a client's pool and kept, for a caller that reads again and again.

    Borrowing from the pool costs its lock and a check that the connection has
    nothing to read (a system call) each time; a worker that reads after every
    notice keeps one connection instead. One reader at a time (the caller
    serialises its reads); :meth:`close` gives the connection back.

    Example:
        >>> held = HeldConnection(client)  # doctest: +SKIP
        >>> read_chunks_into(client, keys, views, held=held)  # doctest: +SKIP
        >>> held.close()  # doctest: +SKIP
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._conn: Connection | None = None

    def take(self) -> Connection:
        """The held connection, borrowed from the pool on first use.

        Raises:
            BusConnectionError: the pool could not hand out a connection.
        """
        if self._conn is None:
            self._conn = borrow(self.client.connection_pool)
        return self._conn

    def close(self) -> None:
        """Give the connection back to the pool (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self.client.connection_pool.release(conn)


def borrow(pool: redis.ConnectionPool) -> Connection:
    try:
        return _get_connection(pool)
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError) as exc:
        raise BusConnectionError(f"cannot get a Redis connection: {exc}") from exc


def _with_connection(
    client: redis.Redis, body: Callable[[Connection], Exception | None], held: HeldConnection | None = None
) -> None:
    """Borrow a connection (or use ``held``'s), make sure its stream is clean, run ``body`` and give it back.

    ``body`` returns normally only when the stream is in sync afterwards; the
    error it returns (nil value, length mismatch, error reply: all fully
    consumed) is raised after the connection went back to the pool. If
    ``body`` raises, the connection is disconnected before release, so a
    half-read connection is never reused (a held one reconnects on its next use).
    """
    pool = client.connection_pool
    conn = borrow(pool) if held is None else held.take()
    in_sync = False
    failure: Exception | None = None
    try:
        try:
            conn.check_health()  # PING if the health-check interval passed; reconnects on failure
            if conn._sock is None or not _parser_idle(conn):
                conn.disconnect()
                conn.connect()
            if conn._sock is None or not _parser_idle(conn):
                raise BusConnectionError("Redis connection is not in a clean state")
        except RedisBusError:  # BusConnectionError is an OSError too: don't wrap it twice
            raise
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError) as exc:
            raise BusConnectionError(f"cannot get a Redis connection: {exc}") from exc
        failure = body(conn)
        in_sync = True
    finally:
        if not in_sync:
            conn.disconnect()
        if held is None:
            pool.release(conn)
    if failure is not None:
        raise failure


class ServerClosed(Exception):
    """The server closed the connection (recv returned no bytes)."""


class ProtocolError(Exception):
    """The server sent something this reader does not expect."""


class Wire:
    """Raw RESP I/O on one socket: a small read-ahead buffer for lines, ``recv_into`` for values.

    Outgoing small pieces are gathered in a send buffer and flushed before any
    blocking read (so a reply we wait for never depends on unsent bytes).
    """

    __slots__ = ("sock", "buf", "mv", "start", "end", "out")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.buf = bytearray(SCRATCH_BYTES)
        self.mv = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.out = bytearray()

    # -- sending
    def queue(self, data: bytes | memoryview) -> None:
        """Append small bytes to the send buffer (sent once it holds :data:`SEND_BUFFER_BYTES`)."""
        self.out += data
        if len(self.out) >= SEND_BUFFER_BYTES:
            self.flush()

    def send_view(self, view: memoryview) -> None:
        """Send a payload: copied into the send buffer if small, else sent straight from the view."""
        if len(view) < SMALL_PAYLOAD:
            self.queue(view)
            return
        self.flush()
        self.sock.sendall(view)

    def flush(self) -> None:
        """Send whatever the send buffer holds."""
        if self.out:
            self.sock.sendall(self.out)
            self.out = bytearray()

    # -- receiving
    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):
            n = self.end - self.start
            self.buf[:n] = self.buf[self.start : self.end]
            self.start, self.end = 0, n
        got = self.sock.recv_into(self.mv[self.end :])
        if not got:
            raise ServerClosed()
        self.end += got

    def readline(self) -> bytes:
        """One reply line without its CRLF."""
        while True:
            i = self.buf.find(_CRLF, self.start, self.end)
            if i >= 0:
                line = bytes(self.mv[self.start : i])
                self.start = i + 2
                return line
            if self.end - self.start >= min(MAX_LINE_BYTES, len(self.buf)):
                raise ProtocolError("reply line too long")
            self._fill()

    def take(self, view: memoryview, n: int) -> int:
        """Copy up to ``n`` already-buffered bytes into ``view``; returns how many."""
        take = min(self.end - self.start, n)
        if take:
            view[:take] = self.mv[self.start : self.start + take]
            self.start += take
        return take

    def skip(self, n: int) -> None:
        """Read and discard exactly ``n`` bytes."""
        take = min(self.end - self.start, n)
        self.start += take
        n -= take
        while n:
            self.start = self.end = 0
            got = self.sock.recv_into(self.mv, min(n, len(self.buf)))
            if not got:
                raise ServerClosed()
            n -= got

    def expect_crlf(self) -> None:
        """Consume the CRLF that ends a bulk value."""
        while self.end - self.start < 2:
            self._fill()
        if self.buf[self.start : self.start + 2] != _CRLF:
            raise ProtocolError("bulk value not followed by CRLF")
        self.start += 2

    def read_reply(self, depth: int = 0) -> Any:
        """One whole reply of a small command, as redis-py gives it with bytes responses (errors returned)."""
        line = self.readline()
        kind, rest = line[:1], line[1:]
        try:
            if kind == b"+":
                return rest
            if kind == b"-":
                return redis.ResponseError(rest.decode(errors="replace"))
            if kind == b":":
                return int(rest)
            if kind == b"_":
                return None
            if kind == b"$":
                length = int(rest)
                if length < 0:
                    return None
                if length > MAX_DRAIN_BYTES:
                    raise ProtocolError(f"a {length}-byte reply to a small command")
                value = bytearray(length)
                view = memoryview(value)
                pos = self.take(view, length)
                while pos < length:
                    got = self.sock.recv_into(view[pos:], length - pos)
                    if not got:
                        raise ServerClosed()
                    pos += got
                self.expect_crlf()
                return bytes(value)
            if kind == b"*" and depth < 2:
                count = int(rest)
                return None if count < 0 else [self.read_reply(depth + 1) for _ in range(count)]
        except ValueError:
            raise ProtocolError(f"bad reply header {line[:80]!r}") from None
        raise ProtocolError(f"unexpected reply {line[:80]!r} to a small command")


#: What a socket meets when the server closed or reset the connection (builtin ``ConnectionError``: resets,
#: broken pipes); not a timeout, nor a failure to connect.
CLOSED_ERRORS = (ServerClosed, ConnectionError)


def closed_under_us(exc: BaseException) -> bool:
    """Whether a :class:`BusConnectionError` of this module says the server closed or reset the connection.

    What a kept connection meets after a restart, where one more try on a new
    connection is worth it.
    """
    return isinstance(exc.__cause__, CLOSED_ERRORS)


def _wire_errors(what: str, subject: Callable[[], str]) -> Callable[[BaseException], BusConnectionError]:
    """Turns a socket failure into an error naming what was being read or written (``subject()``)."""

    def convert(exc: BaseException) -> BusConnectionError:
        if isinstance(exc, ServerClosed):
            msg = f"Redis closed the connection while {what} {subject()}"
        elif isinstance(exc, TimeoutError):
            msg = f"timed out while {what} {subject()}: Redis did not answer within the socket timeout"
        elif isinstance(exc, ProtocolError):
            msg = f"protocol error while {what} {subject()}: {exc}"
        else:
            msg = f"connection failed while {what} {subject()}: {exc}"
        return BusConnectionError(msg)

    return convert


# --------------------------------------------------------------------------- fast write


def _write_on(
    conn: Connection,
    items: Sequence[tuple[str, Payload]],
    px: int | None,
    stop: threading.Event,
    before_send: Callable[[str, Payload], None] | None = None,
    then: Callable[[], Command] | None = None,
    replies: list[Any] | None = None,
) -> Exception | None:
    """Pipelined raw ``SET``s on one connection, then ``then``'s command (its reply goes to ``replies``).

    Returns the error to raise (an error reply; the stream is in sync) or
    None; raises when the stream may be out of sync.
    """
    wire = Wire(conn._sock)
    encode = conn.encoder.encode
    if px is None:
        argc = b"*3\r\n$3\r\nSET\r\n"
        trailer = _CRLF
    else:
        px_b = str(px).encode()
        argc = b"*5\r\n$3\r\nSET\r\n"
        trailer = b"\r\n$2\r\nPX\r\n$%d\r\n%s\r\n" % (len(px_b), px_b)
    pending: deque[tuple[str, int]] = deque()  # (key, payload bytes) awaiting a reply
    pending_bytes = 0
    failure: tuple[str, bytes] | None = None
    current = [f"chunk {items[0][0]!r}" if items else _BEHIND]
    convert = _wire_errors("writing", lambda: current[0])

    def read_reply() -> None:
        nonlocal pending_bytes, failure
        key, size = pending[0]
        current[0] = f"chunk {key!r}"
        line = wire.readline()
        pending.popleft()
        pending_bytes -= size
        if line[:1] == b"+":
            return
        if line[:1] == b"-":
            if failure is None:
                failure = (key, line[1:])
            return
        raise ProtocolError(f"unexpected reply {line[:80]!r} to SET")

    try:
        for key, view in items:
            if failure is not None or stop.is_set():
                break
            current[0] = f"chunk {key!r}"
            if before_send is not None:
                before_send(key, view)  # while the previous payload drains from the socket buffers
            key_b = encode(key)
            size = payload_len(view)
            pending.append((key, size))  # before sending: a refusal mid-payload is this key's
            pending_bytes += size
            wire.queue(b"%s$%d\r\n%s\r\n$%d\r\n" % (argc, len(key_b), key_b, size))
            for part in view if isinstance(view, tuple) else (view,):
                wire.send_view(part)
            wire.queue(trailer)
            while pending and (pending_bytes > WRITE_WINDOW_BYTES or len(pending) > MAX_INFLIGHT_COMMANDS):
                wire.flush()
                read_reply()
        wire.flush()  # Redis stores the values while ``then`` makes its command
        behind = then is not None and failure is None and not stop.is_set()
        if behind:
            wire.queue(pack(conn, then()))  # type: ignore[misc]  # behind is only true with then
            wire.flush()
        while pending:
            read_reply()
        if behind:
            current[0] = _BEHIND
            replies.append(wire.read_reply())  # type: ignore[union-attr]  # given with then
    except OSError as exc:
        # The server may have refused a command and closed the connection
        # (bulk length over proto-max-bulk-len); its error reply explains
        # the broken pipe better than the pipe does.
        reason = failure or _salvage_error(wire, pending)
        if reason is not None:
            raise PublishError(f"Redis refused chunk {reason[0]!r}: {reason[1].decode(errors='replace')}") from exc
        raise convert(exc) from exc
    except (ServerClosed, ProtocolError) as exc:
        if failure is not None:
            raise PublishError(
                f"Redis refused chunk {failure[0]!r}: {failure[1].decode(errors='replace')}"
            ) from convert(exc)
        raise convert(exc) from exc
    if failure is not None:
        return PublishError(f"Redis refused chunk {failure[0]!r}: {failure[1].decode(errors='replace')}")
    return None


def _salvage_error(wire: Wire, pending: deque[tuple[str, int]]) -> tuple[str, bytes] | None:
    """After a failed send, read the replies still readable and return the first error reply, if any."""
    try:
        wire.sock.settimeout(0.5)
        while pending:
            key, _ = pending.popleft()
            line = wire.readline()
            if line[:1] == b"-":
                return key, line[1:]
    except Exception:  # noqa: BLE001 - best effort only; the connection is dropped anyway
        return None
    return None


# --------------------------------------------------------------------------- fast read


def _read_on(
    conn: Connection,
    pairs: Sequence[tuple[str, memoryview]],
    stop: threading.Event,
    after_recv: Callable[[str, memoryview], None] | None = None,
    first: Sequence[Command] = (),
    replies: list[Any] | None = None,
) -> Exception | None:
    """Pipelined raw ``GET``s on one connection, after the ``first`` commands (their replies go to ``replies``).

    The next ``GET`` goes out as soon as fewer than :data:`READ_WINDOW_BYTES`
    requested bytes are still to be received, so the server never waits on a
    round trip while its output buffer for us stays small.

    Returns the error to raise (missing key, length mismatch, error reply:
    all consumed, the stream is in sync) or None; raises when the stream may
    be out of sync.
    """
    wire = Wire(conn._sock)
    recv_into = wire.sock.recv_into
    encode = conn.encoder.encode
    window = READ_WINDOW_BYTES
    n = len(pairs)
    sent = 0  # GETs sent
    done = 0  # replies read
    outstanding = 0  # bytes requested and not yet received (by the views' lengths)
    failure: Exception | None = None
    convert = _wire_errors("reading", lambda: f"chunk {pairs[min(done, n - 1)][0]!r}" if n else "the replies")

    def top_up() -> None:
        nonlocal sent, outstanding
        while sent < n and (
            sent == done or (outstanding < window and sent - done < MAX_INFLIGHT_COMMANDS)
        ):
            key_b = encode(pairs[sent][0])
            wire.queue(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key_b), key_b))
            outstanding += len(pairs[sent][1])
            sent += 1
        wire.flush()

    try:
        for command in first:
            wire.queue(pack(conn, command))
        top_up()
        for _ in first:
            replies.append(wire.read_reply())  # type: ignore[union-attr]  # given with first
        while done < sent:
            key, view = pairs[done]
            expected = len(view)
            header = wire.readline()
            kind = header[:1]
            if kind == b"$":
                try:
                    length = int(header[1:])
                except ValueError:
                    raise ProtocolError(f"bad bulk header {header[:80]!r}") from None
                if length == expected and failure is None:
                    # The hot path: buffered read-ahead first, then straight into the view.
                    pos = wire.take(view, length)
                    outstanding -= pos
                    more = not stop.is_set()
                    if more and sent < n and outstanding < window:
                        top_up()
                    while pos < length:
                        got = recv_into(view[pos:], length - pos)
                        if not got:
                            raise ServerClosed()
                        pos += got
                        outstanding -= got
                        if more and sent < n and outstanding < window:
                            top_up()
                    wire.expect_crlf()
                    expected = 0
                    if after_recv is not None:
                        try:
                            after_recv(key, view)  # while the next values arrive in the socket buffers
                        except RedisBusError as exc:
                            failure = exc  # drain what was asked for; raised once the stream is in sync
                elif length < 0:
                    failure = failure or VersionNotFoundError(f"chunk {key!r} does not exist")
                else:
                    if length != expected:
                        failure = failure or CorruptBlobError(
                            f"chunk {key!r} holds {length} bytes, expected {expected}"
                        )
                        if length > MAX_DRAIN_BYTES:
                            raise failure  # not worth draining: drop the connection
                    wire.skip(length)
                    wire.expect_crlf()
            elif kind == b"_":  # RESP3 null
                failure = failure or VersionNotFoundError(f"chunk {key!r} does not exist")
            elif kind == b"-":
                message = header[1:].decode(errors="replace")
                if message.startswith("WRONGTYPE"):
                    failure = failure or CorruptBlobError(f"chunk {key!r} is not a string value: {message}")
                else:
                    failure = failure or RedisCommandError(f"Redis refused to read chunk {key!r}: {message}")
            else:
                raise ProtocolError(f"unexpected reply {header[:80]!r} to GET")
            outstanding -= expected
            done += 1
            if failure is None and not stop.is_set():
                top_up()
    except RedisBusError:  # an abandoned drain; BusConnectionError is an OSError too
        raise
    except (OSError, ServerClosed, ProtocolError) as exc:
        raise convert(exc) from exc
    return failure
