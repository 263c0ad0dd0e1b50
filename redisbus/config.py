"""Connection and bus settings: one frozen dataclass, parsed from a URL or the environment.

>>> cfg = BusConfig.from_url("redis://:s3cret@10.0.0.5:6379/0", namespace="ppo-run-7")
>>> cfg.host, cfg.port, cfg.db
('10.0.0.5', 6379, 0)
>>> "s3cret" in repr(cfg)
False
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from . import defaults
from .errors import BusConnectionError, ConfigError
from .keys import KeySpace, validate_namespace

__all__ = ["BusConfig", "ENV_URL", "ENV_NAMESPACE"]

#: Environment variable read for the Redis URL.
ENV_URL = "REDISBUS_URL"
#: Environment variable read for the namespace.
ENV_NAMESPACE = "REDISBUS_NAMESPACE"
#: Environment variable read for the signing secret (opt-in signing).
ENV_SIGNING_KEY = "REDISBUS_SIGNING_KEY"

_SCHEMES = ("redis", "rediss", "unix")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _as_bool(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"URL option {name}={value!r} is not a boolean")


@dataclass(frozen=True)
class BusConfig:
    """Everything needed to reach Redis and run one namespace of the bus.

    Build it with :meth:`from_url` or :meth:`from_env`; every field can be
    overridden there by keyword. Secrets (``password``, ``signing_key``)
    never appear in ``repr`` or :meth:`redacted_url`.

    Example:
        >>> BusConfig.from_url("rediss://bus.internal:6380/2", namespace="run",
        ...                    ssl_ca_certs="/etc/ca.pem").ssl
        True
    """

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    unix_socket_path: str | None = None
    ssl: bool = False
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    namespace: str = defaults.NAMESPACE
    chunk_size: int = defaults.CHUNK_SIZE
    keep_versions: int = defaults.KEEP_VERSIONS
    grace_seconds: float = defaults.GRACE_SECONDS
    pending_timeout_seconds: float = defaults.PENDING_TIMEOUT_SECONDS
    poll_interval: float = defaults.POLL_INTERVAL_SECONDS
    heartbeat_interval: float = defaults.HEARTBEAT_SECONDS
    socket_timeout: float = defaults.SOCKET_TIMEOUT_SECONDS
    health_check_interval: float = defaults.HEALTH_CHECK_INTERVAL_SECONDS
    backoff_base: float = defaults.BACKOFF_BASE_SECONDS
    backoff_cap: float = defaults.BACKOFF_CAP_SECONDS
    max_manifest_bytes: int = defaults.MAX_MANIFEST_BYTES
    max_blob_bytes: int = defaults.MAX_BLOB_BYTES
    signing_key: bytes | None = field(default=None, repr=False)
    require_signature: bool = False
    cluster: bool = False
    replicas: tuple[str, ...] = field(default=(), repr=False)  # replica URLs may carry passwords
    wait_replicas: int | None = None
    wait_timeout: float = defaults.WAIT_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)
        if self.chunk_size < 1024:
            raise ConfigError(f"chunk_size must be at least 1024 bytes, got {self.chunk_size}")
        if self.keep_versions < 1:
            raise ConfigError(f"keep_versions must be at least 1, got {self.keep_versions}")
        for name in ("poll_interval", "heartbeat_interval", "socket_timeout", "backoff_base", "backoff_cap"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if isinstance(self.signing_key, str):
            object.__setattr__(self, "signing_key", self.signing_key.encode())
        if self.require_signature and not self.signing_key:
            raise ConfigError("require_signature is set but no signing_key was given")
        self._check_topology()

    def _check_topology(self) -> None:
        """Normalise and check ``cluster``, ``replicas``, ``wait_replicas``, ``wait_timeout``."""
        replicas = self.replicas
        if isinstance(replicas, str):
            replicas = tuple(item.strip() for item in replicas.split(",") if item.strip())
        object.__setattr__(self, "replicas", tuple(replicas))
        for item in self.replicas:
            if not isinstance(item, str) or not item:
                raise ConfigError(f"replicas must be 'host:port' strings or Redis URLs, got {item!r}")
            self._replica_config(item)  # raises ConfigError if malformed
        if isinstance(self.wait_replicas, str):
            try:
                object.__setattr__(self, "wait_replicas", int(self.wait_replicas))
            except ValueError:
                raise ConfigError(f"wait_replicas must be a whole number, got {self.wait_replicas!r}") from None
        if self.wait_replicas is not None and self.wait_replicas < 0:
            raise ConfigError(f"wait_replicas must be 0 or more, got {self.wait_replicas}")
        if self.wait_timeout <= 0:
            raise ConfigError(f"wait_timeout must be positive, got {self.wait_timeout}")
        if self.cluster:
            if self.unix_socket_path:
                raise ConfigError("a Redis Cluster is reached over TCP, not a unix socket")
            if self.db != 0:
                raise ConfigError(f"a Redis Cluster has only database 0, got db={self.db}")
            if self.replicas or self.wait_replicas:
                raise ConfigError(
                    "replicas and wait_replicas apply to a primary with replicas, not to a Redis Cluster "
                    "(a cluster spreads reads over its masters; its replicas serve failover)"
                )

    @property
    def replicas_to_wait(self) -> int:
        """Replicas the publisher ``WAIT``s for before a commit: ``wait_replicas``, else one per listed replica."""
        return len(self.replicas) if self.wait_replicas is None else self.wait_replicas

    def _replica_config(self, address: str) -> BusConfig:
        if "://" in address:
            base = BusConfig.from_url(address)
            return replace(self, host=base.host, port=base.port, db=base.db, username=base.username or self.username,
                           password=base.password or self.password, ssl=base.ssl, unix_socket_path=base.unix_socket_path,
                           replicas=(), wait_replicas=0)  # fmt: skip
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"invalid replica address {address!r}: expected host:port or a redis:// URL")
        return replace(self, host=host.strip("[]"), port=int(port), unix_socket_path=None, replicas=(), wait_replicas=0)

    def replica_configs(self) -> tuple[BusConfig, ...]:
        """Settings of each read replica (same credentials, TLS and database unless its URL says otherwise)."""
        return tuple(self._replica_config(address) for address in self.replicas)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> BusConfig:
        """Parse a ``redis://``, ``rediss://`` or ``unix://`` URL.

        Args:
            url: ``redis://[[user]:password@]host[:port][/db]``,
                ``rediss://...`` (TLS; query options ``ssl_ca_certs``,
                ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``) or
                ``unix:///path/to/redis.sock[?db=N]``. Query options may also
                set ``namespace`` and any other field: ``cluster=true`` for a
                Redis Cluster (this node is the seed), ``replicas=h1:6379,h2:6379``
                for workers' read replicas, ``wait_replicas=N`` and
                ``wait_timeout=S`` for the publisher's ``WAIT``.
            **overrides: any field of :class:`BusConfig`.

        Raises:
            ConfigError: unknown scheme, bad port or db, unknown option.
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"invalid Redis URL: {exc}") from exc
        if parts.scheme not in _SCHEMES:
            raise ConfigError(
                f"invalid Redis URL scheme {parts.scheme!r}: expected one of redis://, rediss://, unix://"
            )
        values: dict[str, Any] = {}
        if parts.username:
            values["username"] = unquote(parts.username)
        if parts.password:
            values["password"] = unquote(parts.password)
        if parts.scheme == "unix":
            if not parts.path:
                raise ConfigError("unix:// URL has no socket path")
            values["unix_socket_path"] = unquote(parts.path)
        else:
            if parts.hostname:
                values["host"] = parts.hostname
            if port is not None:
                values["port"] = port
            db_path = parts.path.lstrip("/")
            if db_path:
                if not db_path.isdigit():
                    raise ConfigError(f"invalid database number {db_path!r} in Redis URL")
                values["db"] = int(db_path)
            values["ssl"] = parts.scheme == "rediss"
        known = {f.name: f for f in fields(cls)}
        for name, items in parse_qs(parts.query, keep_blank_values=True).items():
            if name not in known or name in ("password", "signing_key"):
                raise ConfigError(f"unknown Redis URL option {name!r}")
            raw = items[-1]
            current = known[name].default
            if isinstance(current, bool):
                values[name] = _as_bool(name, raw)
            elif isinstance(current, (int, float)):
                try:
                    values[name] = type(current)(raw)
                except ValueError:
                    raise ConfigError(f"URL option {name}={raw!r} is not a number") from None
            else:
                values[name] = raw
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_env(cls, url: str | None = None, **overrides: Any) -> BusConfig:
        """Build settings from ``REDISBUS_URL`` / ``REDISBUS_NAMESPACE`` (and an explicit URL if given).

        ``REDISBUS_SIGNING_KEY`` turns on signing when set.

        Raises:
            ConfigError: as :meth:`from_url`.
        """
        url = url or os.environ.get(ENV_URL) or defaults.URL
        if "namespace" not in overrides and os.environ.get(ENV_NAMESPACE):
            overrides["namespace"] = os.environ[ENV_NAMESPACE]
        if "signing_key" not in overrides and os.environ.get(ENV_SIGNING_KEY):
            overrides["signing_key"] = os.environ[ENV_SIGNING_KEY].encode()
        return cls.from_url(url, **overrides)

    def with_options(self, **changes: Any) -> BusConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)

    @property
    def keys(self) -> KeySpace:
        """Key and channel names of this namespace."""
        return KeySpace(self.namespace)

    def redacted_url(self) -> str:
        """The URL with any password replaced by ``***``; safe to log."""
        auth = ""
        if self.username or self.password:
            auth = f"{self.username or ''}{':***' if self.password else ''}@"
        if self.unix_socket_path:
            return f"unix://{auth}{self.unix_socket_path}?db={self.db}"
        scheme = "rediss" if self.ssl else "redis"
        return f"{scheme}://{auth}{self.host}:{self.port}/{self.db}{'?cluster=true' if self.cluster else ''}"

    def retry(self, retries: int = 3) -> Retry:
        """redis-py retry policy: capped exponential backoff with full jitter.

        Only connection errors (refused, reset, closed) are retried; a timeout
        is not, so a server that stops answering costs one ``socket_timeout``,
        not one per retry, before the caller's own recovery takes over.
        """
        backoff = ExponentialWithJitterBackoff(cap=self.backoff_cap, base=self.backoff_base)
        return Retry(backoff, retries, supported_errors=(redis.ConnectionError,))

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`redis.Redis` (and for raw connections of the fast path)."""
        kwargs: dict[str, Any] = {
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_timeout,
            "socket_keepalive": True,
            "health_check_interval": self.health_check_interval,
            "client_name": f"redisbus:{socket.gethostname()}:{os.getpid()}",
        }
        if self.unix_socket_path:
            kwargs["unix_socket_path"] = self.unix_socket_path
        else:
            kwargs.update(host=self.host, port=self.port)
            if self.ssl:
                kwargs.update(
                    ssl=True,
                    ssl_ca_certs=self.ssl_ca_certs,
                    ssl_certfile=self.ssl_certfile,
                    ssl_keyfile=self.ssl_keyfile,
                    ssl_check_hostname=self.ssl_check_hostname,
                    ssl_cert_reqs="required",
                )
        return kwargs

    def client(self, retries: int = 3) -> redis.Redis:
        """A new redis-py client for these settings (bytes replies, retry with backoff).

        With ``cluster`` set, a :class:`redis.cluster.RedisCluster` seeded with
        this host and port (it discovers the other nodes).
        """
        if self.cluster:
            from redis.cluster import RedisCluster

            kwargs = self.connection_kwargs()
            kwargs.pop("db", None)
            kwargs.pop("health_check_interval", None)  # not accepted per node by RedisCluster
            try:
                return RedisCluster(retry=self.retry(retries), **kwargs)
            except redis.RedisError as exc:
                raise BusConnectionError(
                    f"cannot reach the Redis Cluster at {self.host}:{self.port} ({type(exc).__name__}: {exc})"
                ) from exc
            except redis.exceptions.RedisClusterException as exc:
                raise BusConnectionError(f"cannot use the Redis Cluster at {self.host}:{self.port}: {exc}") from exc
        return redis.Redis(
            retry=self.retry(retries),
            retry_on_error=[redis.ConnectionError],
            **self.connection_kwargs(),
        )
