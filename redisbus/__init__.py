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
    VersionNotFoundError,
)

__version__ = "0.1.0"

__all__ = [
    "BusConfig",
    "BusConnectionError",
    "ConfigError",
    "CorruptBlobError",
    "ManifestError",
    "PublishError",
    "RedisBusError",
    "SchemaMismatchError",
    "SignatureError",
    "VersionNotFoundError",
    "__version__",
]
