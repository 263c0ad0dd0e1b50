"""Redis I/O of the protocol: clients, the two atomic scripts, manifests and chunks.

Everything that talks to Redis for the bus goes through here, so error
translation (redis-py exceptions to redisbus's) happens in one place. The
bulk chunk path lives in :mod:`redisbus._resp`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Union

import redis
import xxhash
from redis.cluster import RedisCluster

from . import _resp, defaults
from .config import BusConfig
from .errors import (
    BusConnectionError,
    ManifestError,
    PublishError,
    RedisBusError,
    RedisCommandError,
    VersionNotFoundError,
)
from .keys import KeySpace
from .wire import Manifest, chunk_checksum, chunk_spans, decode_manifest

__all__ = [
    "HeldConnection",
    "RedisSource",
    "resolve",
    "translate_errors",
    "allocate_version",
    "Committed",
    "commit_version",
    "upload_and_commit",
    "parse_version",
    "read_head",
    "read_manifest",
    "read_head_and_manifest",
    "read_head_manifest_and_chunks",
    "decode_fetched_manifest",
    "write_chunks",
    "read_chunks_into",
    "server_max_bulk_len",
    "is_cluster",
    "uses_sharded_pubsub",
    "refresh_topology",
    "publish_notice",
    "stage_manifest_and_wait",
    "read_values_into",
    "write_values",
]

#: What the public classes accept as their first argument.
RedisSource = Union[str, BusConfig, redis.Redis, None]
#: A connection a worker keeps for its reads after each notice (see :class:`redisbus._resp.HeldConnection`).
HeldConnection = _resp.HeldConnection

# KEYS: seq, pending. ARGV: floor (the caller's newest known version), now.
# A server that restarted empty hands out numbers again from 1; the floor keeps them increasing.
_ALLOCATE = """
local v = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if v <= floor then
  v = floor + 1
  redis.call('SET', KEYS[1], v)
end
redis.call('ZADD', KEYS[2], ARGV[2], v)
return v
"""

# KEYS: manifest, versions, latest, pending, pin, then the version's chunks. ARGV: version, manifest bytes,
# notice bytes, channel, then each chunk's size. The chunks are checked where they can be named (not on a
# cluster: they live in other slots), so a commit sent right behind its chunks on one connection never
# announces a version one of them failed to reach. Returns {latest after this commit, the version index,
# the pin}: what the publisher's garbage collection would otherwise read in a round trip of its own.
_COMMIT = """
local v = tonumber(ARGV[1])
for i = 6, #KEYS do
  if redis.call('STRLEN', KEYS[i]) ~= tonumber(ARGV[i - 1]) then
    return redis.error_reply('NOCHUNK chunk ' .. (i - 6) .. ' of version ' .. v .. ' is missing or not ' .. ARGV[i - 1] .. ' bytes')
  end
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], v, v)
redis.call('ZREM', KEYS[4], v)
local cur = tonumber(redis.call('GET', KEYS[3]) or '0')
if v > cur then
  redis.call('SET', KEYS[3], v)
  cur = v
end
redis.call('PUBLISH', ARGV[4], ARGV[3])
return {cur, redis.call('ZRANGE', KEYS[2], 0, -1), redis.call('GET', KEYS[5])}
"""

# The same commit for a Redis 7 cluster: the notice goes out with SPUBLISH (sharded pub/sub), so
# only the shard of the namespace's slot carries it. The channel has the ``{ns}`` hash tag, so it
# hashes to the slot of the script's keys, as Redis requires of SPUBLISH inside a script.
_COMMIT_SHARDED = _COMMIT.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
assert _COMMIT_SHARDED != _COMMIT


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a :class:`redis.cluster.RedisCluster`."""
    kind = type(client)
    known = _CLUSTER_TYPES.get(kind)
    if known is None:  # isinstance against RedisCluster goes through typing's slow protocol check: once per type
        known = _CLUSTER_TYPES[kind] = isinstance(client, RedisCluster)
    return known


_CLUSTER_TYPES: dict[type, bool] = {}


def uses_sharded_pubsub(client: Any) -> bool:
    """Whether notices travel by sharded pub/sub: a Redis Cluster whose servers are Redis 7 or newer.

    Publisher and workers of a namespace decide this from the same servers, so
    they agree. Single-node Redis keeps plain ``PUBLISH``/``SUBSCRIBE``.
    """
    if not is_cluster(client):
        return False
    cached = client.__dict__.get("_redisbus_sharded")
    if cached is None:
        try:
            info = client.info("server")
            versions = [info] if "redis_version" in info else list(info.values())
            cached = all(int(str(i["redis_version"]).split(".")[0]) >= 7 for i in versions)
        except (redis.RedisError, KeyError, TypeError, ValueError, AttributeError):
            cached = False
        client.__dict__["_redisbus_sharded"] = cached
    return bool(cached)


def refresh_topology(client: Any) -> None:
    """Re-read a cluster's slot map (after a failover); nothing for other clients, never raises.

    Keyed commands refresh it by themselves on errors; a sharded subscription
    does not, so the listener calls this before it subscribes again.
    """
    if is_cluster(client):
        try:
            client.nodes_manager.initialize()
        except Exception:  # the cluster may still be electing; the next attempt retries
            pass


def _describe(client: Any) -> str:
    if is_cluster(client):
        try:
            node = client.get_default_node()
            return f"cluster node {node.host}:{node.port}"
        except Exception:  # describing must never fail
            return "a Redis Cluster"
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {}) or {}
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    if "host" in kwargs:
        return f"{kwargs['host']}:{kwargs.get('port', 6379)}"
    return type(client).__name__


def resolve(source: RedisSource, namespace: str | None, overrides: dict[str, Any]) -> tuple[BusConfig, Any, bool]:
    """Settings, a client, and whether the caller owns (must close) that client.

    Args:
        source: a URL, a :class:`BusConfig`, an existing redis-py (or fakeredis)
            client, or None to read ``REDISBUS_URL``.
        namespace: overrides the settings' namespace when given.
        overrides: further :class:`BusConfig` fields.

    Raises:
        ConfigError: an invalid URL, namespace or setting.
    """
    if namespace is not None:
        overrides = {**overrides, "namespace": namespace}
    if isinstance(source, BusConfig):
        config = source.with_options(**overrides) if overrides else source
        return config, config.client(), True
    if source is None or isinstance(source, str):
        config = BusConfig.from_env(source, **overrides)
        return config, config.client(), True
    if hasattr(source, "execute_command"):
        # the client says where Redis is: REDISBUS_URL is not read (a stale or malformed one must not matter)
        return BusConfig.from_env(defaults.URL, **overrides), source, False
    raise TypeError(f"expected a Redis URL, a BusConfig or a redis.Redis client, not {type(source).__name__}")


def _tls_hint(exc: BaseException, client: Any) -> str:
    """A pointer to the likely cause when a connection failed in (or for lack of) the TLS handshake."""
    text = str(exc).lower()
    if any(word in text for word in ("ssl", "tls", "certificate")):
        return (
            "; TLS handshake failed: check ssl_ca_certs (the CA that signed the server certificate), that the "
            "URL's host name is in that certificate, ssl_certfile/ssl_keyfile if the server requires client "
            "certificates, and that the port speaks TLS"
        )
    connection_class = getattr(getattr(client, "connection_pool", None), "connection_class", None)
    uses_tls = isinstance(connection_class, type) and issubclass(connection_class, redis.SSLConnection)
    if uses_tls and "timeout connecting" in text:
        return "; no TLS handshake answer: if this port does not speak TLS, use redis://"
    if not uses_tls and "reset by peer" in text:
        return "; if this port only accepts TLS, use rediss://"
    return ""


@contextmanager
def translate_errors(what: str, client: Any) -> Iterator[None]:
    """Re-raise redis-py errors met while doing ``what`` as redisbus errors (never with secrets)."""
    try:
        yield
    except RedisBusError:
        raise
    except redis.AuthenticationError as exc:
        raise BusConnectionError(f"{what}: authentication to Redis at {_describe(client)} failed") from exc
    except (redis.exceptions.ClusterError, redis.exceptions.RedisClusterException) as exc:
        # CLUSTERDOWN, a slot without a master, a node list gone stale: a failover in progress.
        raise BusConnectionError(f"{what}: Redis Cluster at {_describe(client)} unavailable ({type(exc).__name__}: {exc})") from exc
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise BusConnectionError(
            f"{what}: cannot reach Redis at {_describe(client)} ({type(exc).__name__}: {exc}){_tls_hint(exc, client)}"
        ) from exc
    except redis.ResponseError as exc:
        raise RedisCommandError(f"{what}: Redis at {_describe(client)} refused: {_error_code(exc)}{exc}") from exc


def _error_code(exc: redis.ResponseError) -> str:
    """The error code redis-py strips from some replies, put back: users search for NOPERM and OOM."""
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return "NOPERM (an ACL rule forbids it): "
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return "OOM (maxmemory reached): "
    return ""


def _script(client: Any, source: str) -> Any:
    cache = client.__dict__.setdefault("_redisbus_scripts", {})
    if source not in cache:
        cache[source] = client.register_script(source)
    return cache[source]


def allocate_version(client: Any, keys: KeySpace, floor: int, held: HeldConnection | None = None) -> int:
    """Hand out the next version number (above ``floor``) and mark it pending.

    ``held``: send it on that connection of ``client``'s, straight over RESP
    (a publisher's first round trip of every version: redis-py's script call costs twice the CPU).
    """
    script = _script(client, _ALLOCATE)
    script_keys, args = [keys.seq, keys.pending], [floor, time.time()]
    command = [("EVALSHA", script.sha, 2, *script_keys, *args)]
    with translate_errors("allocating a version number", client):
        for attempt in (1, 2):
            try:
                reply = _resp.read_chunks_into(client, [], [], first=command, held=held)[0]
                break
            except BusConnectionError as exc:
                # A kept connection the server closed meanwhile (it restarted): once more on a new one, as
                # redis-py retries. Were the first number handed out after all, it is skipped, never reused.
                if attempt == 2 or not _resp.closed_under_us(exc):
                    raise BusConnectionError(f"allocating a version number: {exc}") from exc
        if _is_noscript(reply):  # a server that has not seen the script yet: redis-py loads it
            reply = script(keys=script_keys, args=args)
        elif isinstance(reply, Exception):
            raise reply
        return int(reply)


def _is_noscript(reply: Any) -> bool:
    """Whether a reply read raw or through redis-py says the server does not have the script."""
    return isinstance(reply, redis.exceptions.NoScriptError) or (
        isinstance(reply, redis.ResponseError) and str(reply).startswith("NOSCRIPT")
    )


class Committed(NamedTuple):
    """What a commit reports back, read in the same atomic step."""

    #: The newest committed version afterwards (another publisher's, if it is ahead).
    latest: int
    #: The committed versions, oldest first.
    index: list[int]
    #: The operator's pin, if set.
    pin: int | None


def commit_version(
    client: Any, keys: KeySpace, version: int, manifest: bytes, notice: bytes, spans: Sequence[tuple[int, int]] = ()
) -> Committed:
    """Atomically store the manifest, index the version, move ``latest`` forward and notify.

    ``spans``: the version's chunk spans; outside a cluster the commit first
    checks that each chunk is stored whole (else :class:`PublishError`, and nothing changes).
    """
    with translate_errors(f"committing version {version}", client):
        script = _script(client, _COMMIT_SHARDED if uses_sharded_pubsub(client) else _COMMIT)
        chunk_keys, args = _commit_arguments(client, keys, version, manifest, notice, spans)
        try:
            return _committed(script(keys=chunk_keys, args=args))
        except redis.ResponseError as exc:
            _raise_refused_commit(exc)
            raise


def _commit_arguments(
    client: Any, keys: KeySpace, version: int, manifest: bytes, notice: bytes, spans: Sequence[tuple[int, int]]
) -> tuple[list[str], list[Any]]:
    checked = [] if is_cluster(client) else spans
    return (
        [keys.manifest(version), keys.versions, keys.latest, keys.pending, keys.pin,
         *(keys.chunk(version, i) for i in range(len(checked)))],
        [version, manifest, notice, keys.notify, *(stop - start for start, stop in checked)],
    )  # fmt: skip


def _committed(reply: Any) -> Committed:
    latest, index, pin = reply
    return Committed(int(latest), [int(v) for v in index], parse_version(pin))


def _raise_refused_commit(exc: redis.ResponseError) -> None:
    if str(exc).startswith("NOCHUNK"):
        raise PublishError(f"commit refused: {exc}") from exc


def upload_and_commit(
    client: Any,
    keys: KeySpace,
    version: int,
    blob: memoryview | None,
    spans: Sequence[tuple[int, int]],
    checksums: list[int | None],
    prepare: Callable[[], tuple[bytes, bytes]],
    *,
    fill: Callable[[int], None] | None = None,
    segments: Callable[[int, int], Sequence[memoryview]] | None = None,
    one_trip: bool = True,
    held: HeldConnection | None = None,
) -> Committed:
    """:func:`write_chunks`, then :func:`commit_version` of what ``prepare()`` returns: ``(manifest, notice)``.

    ``prepare`` runs once every chunk was hashed and sent (``checksums`` filled).
    With ``one_trip`` on a plain (non-cluster) client, the commit goes out on
    the chunks' connection right behind them: a small version is stored,
    committed and announced in one round trip. Should the connection fail once
    ``prepare`` returned, the commit may have run (the caller keeps the chunks).
    ``held``: the one-trip upload goes on that connection of ``client``'s.

    Returns:
        What the commit reports (see :func:`commit_version`).

    Raises:
        PublishError: a chunk refused, or the commit found one missing (nothing committed).
        BusConnectionError: Redis unreachable.
        RedisCommandError: Redis refused the commit (an ACL rule, OOM).
    """
    if not one_trip or is_cluster(client):
        write_chunks(client, keys, version, blob, spans, checksums, fill=fill, segments=segments)
        return commit_version(client, keys, version, *prepare(), spans)
    script = _script(client, _COMMIT)
    prepared: list[tuple[bytes, bytes]] = []

    def commit_command() -> tuple[Any, ...]:
        prepared.append(prepare())
        chunk_keys, args = _commit_arguments(client, keys, version, *prepared[0], spans)
        return ("EVALSHA", script.sha, len(chunk_keys), *chunk_keys, *args)

    reply = write_chunks(client, keys, version, blob, spans, checksums, fill=fill, segments=segments, then=commit_command,
                         held=held)  # fmt: skip
    if _is_noscript(reply):
        # a server that has not seen the script yet (new, restarted, flushed): load it and commit
        return commit_version(client, keys, version, *prepared[0], spans)
    if isinstance(reply, redis.ResponseError):
        with translate_errors(f"committing version {version}", client):
            _raise_refused_commit(reply)
            raise reply
    return _committed(reply)


def publish_notice(client: Any, keys: KeySpace, notice: bytes) -> None:
    """Send a notice outside a commit (re-announcing an existing version): ``SPUBLISH`` on a Redis 7 cluster."""
    with translate_errors("announcing a version", client):
        if uses_sharded_pubsub(client):
            client.spublish(keys.notify, notice)
        else:
            client.publish(keys.notify, notice)


def stage_manifest_and_wait(
    client: Any, keys: KeySpace, version: int, manifest: bytes, replicas: int, timeout: float, expire: float
) -> int:
    """Write the manifest ahead of its commit and ``WAIT`` until ``replicas`` replicas have it.

    ``SET`` and ``WAIT`` go down one connection (a pipeline), and that ``SET``
    comes after every chunk of the version was acknowledged, so when ``WAIT``
    returns, the replicas that acknowledged hold the chunks and the manifest:
    the commit that follows can only announce a version they already have.
    The staged manifest expires after ``expire`` seconds unless the commit
    (which writes it again, without expiry) comes first.

    Returns:
        How many replicas acknowledged within ``timeout`` seconds.
    """
    with translate_errors(f"waiting for replicas to receive version {version}", client):
        pipe = client.pipeline(transaction=False)
        pipe.set(keys.manifest(version), manifest, px=max(1, int(expire * 1000)))
        pipe.execute_command("WAIT", int(replicas), max(1, int(timeout * 1000)))
        return int(pipe.execute()[-1])


def parse_version(raw: Any) -> int | None:
    """A version number as stored in ``latest`` or the pin; None when unset or not a number."""
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def read_head(client: Any, keys: KeySpace) -> tuple[int | None, int | None]:
    """``(latest, pin)``: the newest committed version and the operator's pin, each None if unset."""
    with translate_errors("reading the latest version", client):
        latest, pin = client.mget([keys.latest, keys.pin])
    return parse_version(latest), parse_version(pin)


def read_manifest(client: Any, keys: KeySpace, version: int, config: BusConfig) -> tuple[Manifest, bytes]:
    """Fetch and validate a manifest, refusing an oversized one before transferring it.

    Raises:
        VersionNotFoundError: no manifest for ``version``.
        ManifestError: oversized or invalid, or describing another version.
    """
    key = keys.manifest(version)
    with translate_errors(f"reading the manifest of version {version}", client):
        pipe = client.pipeline(transaction=False)
        pipe.strlen(key)
        pipe.getrange(key, 0, config.max_manifest_bytes - 1)
        size, data = pipe.execute()
    return decode_fetched_manifest(keys, version, size, data, config), data


def read_head_and_manifest(
    client: Any, keys: KeySpace, version: int, config: BusConfig
) -> tuple[int | None, int | None, tuple[int, bytes] | None]:
    """:func:`read_head` and the raw manifest of ``version`` (a notice's version) in one round trip.

    Returns ``(latest, pin, fetched)``; ``fetched`` is ``(size, first bytes)`` for
    :func:`decode_fetched_manifest`, or None on a cluster client (its head and
    manifest are read apart).
    """
    if is_cluster(client):
        return (*read_head(client, keys), None)
    return _read_head_and_manifest_first(client, keys, version, config, "reading the latest version", [], [])


def read_head_manifest_and_chunks(
    client: Any,
    keys: KeySpace,
    version: int,
    chunk_size: int,
    blob: memoryview,
    config: BusConfig,
    held: HeldConnection | None = None,
) -> tuple[int | None, int | None, tuple[int, bytes]]:
    """:func:`read_head_and_manifest`, and the chunks of ``version`` into ``blob``, all in one round trip.

    For a version a notice announced with its size (``len(blob)``) and chunk size:
    the chunks are read before the manifest that describes them was checked, so
    the caller must verify them against it (and use them only if its layout is
    the one read). ``held``: read on that connection of ``client``'s (see
    :class:`redisbus._resp.HeldConnection`). Not for a cluster client (:class:`ValueError`).

    Raises:
        VersionNotFoundError: a chunk does not exist.
        CorruptBlobError: a chunk's size is not what the layout says.
        BusConnectionError: Redis unreachable.
    """
    if is_cluster(client):
        raise ValueError("a cluster reads the head and the chunks of a version from different nodes")
    spans = chunk_spans(len(blob), chunk_size)
    names = [keys.chunk(version, i) for i in range(len(spans))]
    views = [blob[start:stop] for start, stop in spans]
    return _read_head_and_manifest_first(client, keys, version, config, f"reading version {version}", names, views,
                                         held)  # fmt: skip


def _read_head_and_manifest_first(
    client: Any,
    keys: KeySpace,
    version: int,
    config: BusConfig,
    what: str,
    names: list[str],
    views: list[memoryview],
    held: HeldConnection | None = None,
) -> tuple[int | None, int | None, tuple[int, bytes]]:
    """``MGET latest pin``, ``STRLEN`` and ``GETRANGE`` of ``version``'s manifest, then ``GET`` of ``names`` into
    ``views``: one round trip on one (non-cluster) connection."""
    key = keys.manifest(version)
    with translate_errors(what, client):
        replies = _resp.read_chunks_into(
            client,
            names,
            views,
            first=[("MGET", keys.latest, keys.pin), ("STRLEN", key), ("GETRANGE", key, 0, config.max_manifest_bytes - 1)],
            held=held,
        )
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
    (latest, pin), size, data = replies
    return parse_version(latest), parse_version(pin), (size, data)


def decode_fetched_manifest(keys: KeySpace, version: int, size: int, data: bytes, config: BusConfig) -> Manifest:
    """Validate a manifest fetched as ``STRLEN`` + ``GETRANGE`` (see :func:`read_manifest`, which raises the same)."""
    key = keys.manifest(version)
    if not size:
        raise VersionNotFoundError(f"version {version} not found in namespace {keys.namespace!r} (no key {key})")
    if size > config.max_manifest_bytes:
        raise ManifestError(f"manifest {key} is {size} bytes, over the limit of {config.max_manifest_bytes}")
    manifest = decode_manifest(data, max_manifest_bytes=config.max_manifest_bytes, max_blob_bytes=config.max_blob_bytes)
    if manifest.version != version:
        raise ManifestError(f"manifest {key} describes version {manifest.version}, not {version}")
    return manifest


def write_chunks(
    client: Any,
    keys: KeySpace,
    version: int,
    blob: memoryview,
    spans: Sequence[tuple[int, int]],
    checksums: list[int | None] | None = None,
    fill: Callable[[int], None] | None = None,
    segments: Callable[[int, int], Sequence[memoryview]] | None = None,
    then: Callable[[], _resp.Command] | None = None,
    held: HeldConnection | None = None,
) -> Any:
    """Store every chunk of ``blob`` under its chunk key (and send ``then``'s command behind them).

    With ``checksums`` (one slot per span), each chunk's checksum is computed
    just before the chunk is sent, so hashing overlaps the upload instead of
    preceding it; every slot is filled on return. With ``fill``, ``fill(stop)``
    runs before a chunk ending at ``stop`` is hashed and sent, to write the
    blob's bytes just ahead of the upload (it needs ``checksums``). With
    ``segments``, the blob is not read at all (``blob`` may be None): chunk
    ``(start, stop)`` is sent as the views ``segments(start, stop)`` returns,
    back to back (the tensors' own memory: no snapshot copy). With ``then``
    (not on a cluster), see :func:`redisbus._resp.write_chunks`: its
    command's reply is returned; ``held``: on that connection of ``client``'s
    (with ``then`` only).

    Raises:
        PublishError: with ``fill``, a chunk went out without its hook (never expected).
    """
    if segments is not None:
        items: list[tuple[str, Any]] = [(keys.chunk(version, i), tuple(segments(a, b))) for i, (a, b) in enumerate(spans)]
    else:
        items = [(keys.chunk(version, i), blob[start:stop]) for i, (start, stop) in enumerate(spans)]
    before_send = None
    if checksums is not None:
        index = {key: i for i, (key, _) in enumerate(items)}

        def before_send(key: str, view: Any) -> None:
            i = index[key]
            if fill is not None:
                fill(spans[i][1])
            checksums[i] = _checksum(view)

    with translate_errors(f"writing the chunks of version {version}", client):
        if then is None:
            write_values(client, items, before_send=before_send)
            reply = None
        else:
            reply = _resp.write_chunks(client, items, before_send=before_send, then=then, held=held)
    if checksums is not None:
        for i, (key, view) in enumerate(items):
            if checksums[i] is None:  # a path that sent without the hook: never leave a slot empty
                if fill is not None:
                    raise PublishError(f"chunk {key!r} was sent before its bytes were written")
                checksums[i] = _checksum(view)
    return reply


def _checksum(payload: Any) -> int:
    """:func:`redisbus.wire.chunk_checksum` of a view, or of a tuple of views back to back."""
    if not isinstance(payload, tuple):
        return chunk_checksum(payload)
    if len(payload) == 1:
        return chunk_checksum(payload[0])
    state = xxhash.xxh3_64()
    for part in payload:
        state.update(part)
    return state.intdigest()


def read_chunks_into(
    client: Any,
    keys: KeySpace,
    manifest: Manifest,
    blob: memoryview,
    *,
    verify: Callable[[Manifest, memoryview, Sequence[int]], None] | None = None,
) -> None:
    """Fetch every chunk of ``manifest``'s version straight into ``blob``.

    With ``verify`` (:func:`redisbus.wire.verify_chunks` or a function like
    it), each chunk is checked as soon as it has landed, while the next ones
    arrive, and any chunk the hook did not see is checked afterwards: on
    return every chunk of ``blob`` is verified.

    Raises:
        CorruptBlobError: a chunk fails ``verify``.
    """
    spans = manifest.spans()
    names = [keys.chunk(manifest.version, i) for i in range(len(spans))]
    views = [blob[start:stop] for start, stop in spans]
    after_recv = None
    verified: set[int] = set()
    if verify is not None:
        index = {name: i for i, name in enumerate(names)}

        def after_recv(key: str, view: memoryview) -> None:
            i = index[key]
            verify(manifest, blob, (i,))
            verified.add(i)

    with translate_errors(f"reading the chunks of version {manifest.version}", client):
        read_values_into(client, names, views, after_recv=after_recv)
    if verify is not None and len(verified) != len(spans):
        verify(manifest, blob, [i for i in range(len(spans)) if i not in verified])


def write_values(
    client: Any, items: Sequence[tuple[str, memoryview]], *, before_send: Callable[[str, memoryview], None] | None = None
) -> None:
    """``SET`` each key to its view's bytes: the fast bulk path, and on a cluster every master's share at once.

    ``before_send(key, view)`` runs just before each value is sent (see :func:`redisbus._resp.write_chunks`).
    Raises what :func:`redisbus._resp.write_chunks` raises.
    """
    if is_cluster(client):
        _per_master(client, [key for key, _ in items],
                    lambda node, idx: _resp.write_chunks(node, [items[i] for i in idx], before_send=before_send),
                    lambda: _resp.write_chunks(client, items, before_send=before_send))  # fmt: skip
    else:
        _resp.write_chunks(client, items, before_send=before_send)


def read_values_into(
    client: Any,
    names: Sequence[str],
    views: Sequence[memoryview],
    *,
    after_recv: Callable[[str, memoryview], None] | None = None,
) -> None:
    """``GET`` each key straight into its view: the fast bulk path, and on a cluster every master's share at once.

    ``after_recv(key, view)`` runs as each value lands (see :func:`redisbus._resp.read_chunks_into`).
    Raises what :func:`redisbus._resp.read_chunks_into` raises.
    """
    if is_cluster(client):
        _per_master(client, names,
                    lambda node, idx: _resp.read_chunks_into(node, [names[i] for i in idx], [views[i] for i in idx],
                                                             after_recv=after_recv),
                    lambda: _resp.read_chunks_into(client, names, views, after_recv=after_recv))  # fmt: skip
    else:
        _resp.read_chunks_into(client, names, views, after_recv=after_recv)


def _per_master(
    client: RedisCluster, names: Sequence[str], work: Callable[[Any, list[int]], object], fallback: Callable[[], object]
) -> None:
    """Run ``work(node_client, indices)`` for each master's share of ``names``, all masters in parallel.

    Each master's share goes over the fast bulk path on that master's own
    connection pool, so a version's chunks move to and from every shard at
    once. If a node cannot be reached or answers with a redirection (the slot
    map changed: failover, resharding), ``fallback`` redoes the whole transfer
    through redis-py's cluster pipeline, which follows redirections and
    refreshes the slot map.
    """
    groups: dict[str, tuple[Any, list[int]]] = {}
    try:
        for i, name in enumerate(names):
            node = client.get_node_from_key(name)
            if node.name not in groups:
                groups[node.name] = (client.get_redis_connection(node), [])
            groups[node.name][1].append(i)
    except (redis.RedisError, redis.exceptions.RedisClusterException, AttributeError):
        fallback()
        return
    errors: list[BaseException] = []

    def run(node_client: Any, indices: list[int]) -> None:
        try:
            work(node_client, indices)
        except BaseException as exc:  # noqa: BLE001 - raised on the caller's thread below
            errors.append(exc)

    shares = list(groups.values())
    threads = [threading.Thread(target=run, args=share, name="redisbus-shard", daemon=True) for share in shares[1:]]
    for t in threads:
        t.start()
    if shares:
        run(*shares[0])
    for t in threads:
        t.join()
    if not errors:
        return
    hard = [e for e in errors if not isinstance(e, (BusConnectionError, PublishError, redis.RedisError))]
    if hard:
        raise hard[0]  # missing or corrupt chunk: the data's fault, not the route's
    fallback()


def server_max_bulk_len(client: Any) -> int | None:
    """The server's ``proto-max-bulk-len`` (largest value it accepts), or None if it won't say."""
    try:
        reply = client.config_get("proto-max-bulk-len")
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        with translate_errors("asking the server's proto-max-bulk-len", client):
            raise exc  # unreachable is an error, not a refusal
    except (redis.RedisError, AttributeError, NotImplementedError):
        return None  # refused (an ACL without CONFIG GET) or unsupported: keep the configured size
    for value in reply.values() if isinstance(reply, dict) else ():
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    return None
