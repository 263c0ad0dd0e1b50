"""One exception hierarchy for everything redisbus raises.

Every error a user can meet derives from :class:`RedisBusError`; errors
caused by another library's exception are raised ``from`` it.
"""

from __future__ import annotations

__all__ = [
    "RedisBusError",
    "ConfigError",
    "BusConnectionError",
    "ManifestError",
    "CorruptBlobError",
    "SchemaMismatchError",
    "VersionNotFoundError",
    "SignatureError",
    "PublishError",
    "RedisCommandError",
]


class RedisBusError(Exception):
    """Base class of every error raised by redisbus."""


class ConfigError(RedisBusError, ValueError):
    """A URL, namespace or setting is invalid."""


class BusConnectionError(RedisBusError, ConnectionError):
    """Redis could not be reached, refused us, or went away mid-operation."""


class ManifestError(RedisBusError):
    """A manifest or notice is malformed, oversized or violates the format's limits."""


class CorruptBlobError(RedisBusError):
    """A chunk is missing bytes, has extra bytes, or fails its checksum."""


class SchemaMismatchError(RedisBusError):
    """The published tensors do not match the target's keys, shapes or dtypes."""


class VersionNotFoundError(RedisBusError, LookupError):
    """The requested version (or one of its chunks) is not in Redis."""


class SignatureError(RedisBusError):
    """A version is unsigned, or its signature does not verify, while signing is required."""


class PublishError(RedisBusError):
    """A publish could not be completed; ``latest`` still names a complete version.

    That is the previous one, except when the connection broke while the commit
    ran: the outcome is then unknown, and ``latest`` may name this version,
    complete (its chunks are kept; garbage collection fades them if the commit
    did not happen).
    """


class RedisCommandError(RedisBusError):
    """Redis refused a command: missing ACL permission, out of memory, a size limit."""
