"""redisbus: a Redis pub/sub backed weight bus for PyTorch."""

from __future__ import annotations

from .config import BusConfig
from .errors import (
    BusConnectionError,
    ConfigError,
    CorruptBlobError,
    ManifestError,
    PublishError,
    RedisBusError,
    SchemaMismatchError,
    SignatureError,
    RedisCommandError,
    VersionNotFoundError,
)
from .publisher import WeightPublisher
from .subscriber import WeightSubscriber

__version__ = "0.1.0"

__all__ = [
    "BusConfig",
    "BusConnectionError",
    "ConfigError",
    "CorruptBlobError",
    "ManifestError",
    "PublishError",
    "RedisBusError",
    "RedisCommandError",
    "SchemaMismatchError",
    "SignatureError",
    "VersionNotFoundError",
    "WeightPublisher",
    "WeightSubscriber",
    "__version__",
]
