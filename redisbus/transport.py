"""Redis I/O of the protocol: clients, the two atomic scripts, manifests and chunks.

Everything that talks to Redis for the bus goes through here, so error
translation (redis-py exceptions to redisbus's) happens in one place. The
bulk chunk path lives in :mod:`redisbus._resp`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Union

import redis

from . import _resp
from .config import BusConfig
from .errors import (
    BusConnectionError,
    ManifestError,
    RedisBusError,
    RedisCommandError,
    VersionNotFoundError,
)
from .keys import KeySpace
from .wire import Manifest, decode_manifest

__all__ = [
    "RedisSource",
    "resolve",
    "translate_errors",
    "allocate_version",
    "commit_version",
    "read_head",
    "read_manifest",
    "write_chunks",
    "read_chunks_into",
    "server_max_bulk_len",
]

#: What the public classes accept as their first argument.
RedisSource = Union[str, BusConfig, redis.Redis, None]

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

# KEYS: manifest, versions, latest, pending. ARGV: version, manifest bytes, notice bytes, channel.
# Returns the newest committed version after this commit.
_COMMIT = """
local v = tonumber(ARGV[1])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], v, v)
redis.call('ZREM', KEYS[4], v)
local cur = tonumber(redis.call('GET', KEYS[3]) or '0')
if v > cur then
  redis.call('SET', KEYS[3], v)
  cur = v
end
redis.call('PUBLISH', ARGV[4], ARGV[3])
return cur
"""


def _describe(client: Any) -> str:
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
        return BusConfig.from_env(**overrides), source, False
    raise TypeError(f"expected a Redis URL, a BusConfig or a redis.Redis client, not {type(source).__name__}")


@contextmanager
def translate_errors(what: str, client: Any) -> Iterator[None]:
    """Re-raise redis-py errors met while doing ``what`` as redisbus errors (never with secrets)."""
    try:
        yield
    except RedisBusError:
        raise
    except redis.AuthenticationError as exc:
        raise BusConnectionError(f"{what}: authentication to Redis at {_describe(client)} failed") from exc
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise BusConnectionError(f"{what}: cannot reach Redis at {_describe(client)} ({type(exc).__name__}: {exc})") from exc
    except redis.ResponseError as exc:
        raise RedisCommandError(f"{what}: Redis at {_describe(client)} refused: {exc}") from exc


def _script(client: Any, source: str) -> Any:
    cache = client.__dict__.setdefault("_redisbus_scripts", {})
    if source not in cache:
        cache[source] = client.register_script(source)
    return cache[source]


def allocate_version(client: Any, keys: KeySpace, floor: int) -> int:
    """Hand out the next version number (above ``floor``) and mark it pending."""
    with translate_errors("allocating a version number", client):
        return int(_script(client, _ALLOCATE)(keys=[keys.seq, keys.pending], args=[floor, time.time()]))


def commit_version(client: Any, keys: KeySpace, version: int, manifest: bytes, notice: bytes) -> int:
    """Atomically store the manifest, index the version, move ``latest`` forward and notify.

    Returns:
        The newest committed version afterwards.
    """
    with translate_errors(f"committing version {version}", client):
        script = _script(client, _COMMIT)
        return int(
            script(
                keys=[keys.manifest(version), keys.versions, keys.latest, keys.pending],
                args=[version, manifest, notice, keys.notify],
            )
        )


def _as_int(raw: Any) -> int | None:
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
    return _as_int(latest), _as_int(pin)


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
    if not size:
        raise VersionNotFoundError(f"version {version} not found in namespace {keys.namespace!r} (no key {key})")
    if size > config.max_manifest_bytes:
        raise ManifestError(f"manifest {key} is {size} bytes, over the limit of {config.max_manifest_bytes}")
    manifest = decode_manifest(data, max_manifest_bytes=config.max_manifest_bytes, max_blob_bytes=config.max_blob_bytes)
    if manifest.version != version:
        raise ManifestError(f"manifest {key} describes version {manifest.version}, not {version}")
    return manifest, data


def write_chunks(client: Any, keys: KeySpace, version: int, blob: memoryview, spans: Sequence[tuple[int, int]]) -> None:
    """Store every chunk of ``blob`` under its chunk key."""
    items = [(keys.chunk(version, i), blob[start:stop]) for i, (start, stop) in enumerate(spans)]
    with translate_errors(f"writing the chunks of version {version}", client):
        _resp.write_chunks(client, items)


def read_chunks_into(client: Any, keys: KeySpace, manifest: Manifest, blob: memoryview) -> None:
    """Fetch every chunk of ``manifest``'s version straight into ``blob``."""
    spans = manifest.spans()
    with translate_errors(f"reading the chunks of version {manifest.version}", client):
        _resp.read_chunks_into(
            client,
            [keys.chunk(manifest.version, i) for i in range(len(spans))],
            [blob[start:stop] for start, stop in spans],
        )


def server_max_bulk_len(client: Any) -> int | None:
    """The server's ``proto-max-bulk-len`` (largest value it accepts), or None if it won't say."""
    try:
        reply = client.config_get("proto-max-bulk-len")
    except (redis.RedisError, AttributeError, NotImplementedError):
        return None
    for value in reply.values() if isinstance(reply, dict) else ():
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    return None
