"""Every Redis key and channel name redisbus uses, in one place.

Control keys of a namespace share one Redis Cluster hash slot (the ``{ns}``
hash tag), so the commit can be one atomic script. Chunk keys carry their
own hash tag (``{ns:v:i}``) so a cluster spreads a version's chunks over
all its masters.

>>> k = KeySpace("ppo-run-7")
>>> k.latest
'rb:{ppo-run-7}:latest'
>>> k.chunk(3, 0)
'rb:chunk:{ppo-run-7:3:0}'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import defaults
from .errors import ConfigError

__all__ = ["KeySpace", "validate_namespace"]

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` if it is a valid namespace name.

    Namespaces are 1-128 characters of letters, digits, ``_``, ``.`` and ``-``
    so they can never break a hash tag, a glob pattern or an ACL rule.

    Raises:
        ConfigError: the name is empty, too long or has another character.
    """
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
        raise ConfigError(
            f"invalid namespace {namespace!r}: use 1-128 characters of letters, digits, '_', '.', '-'"
        )
    return namespace


@dataclass(frozen=True)
class KeySpace:
    """Names of the keys and channels of one namespace."""

    namespace: str
    prefix: str = defaults.KEY_PREFIX

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)

    @property
    def _control(self) -> str:
        return f"{self.prefix}:{{{self.namespace}}}"

    @property
    def seq(self) -> str:
        """INCR counter handing out version numbers."""
        return f"{self._control}:seq"

    @property
    def latest(self) -> str:
        """Newest committed version number."""
        return f"{self._control}:latest"

    @property
    def versions(self) -> str:
        """Sorted set of committed versions (score = version)."""
        return f"{self._control}:versions"

    @property
    def pending(self) -> str:
        """Sorted set of versions being written (score = start time)."""
        return f"{self._control}:pending"

    @property
    def workers(self) -> str:
        """Hash: worker id -> msgpack report (applied version, heartbeat)."""
        return f"{self._control}:workers"

    @property
    def publishers(self) -> str:
        """Hash: publisher id -> msgpack report (last version, time)."""
        return f"{self._control}:publishers"

    @property
    def pin(self) -> str:
        """Version workers are held at by an operator, if set."""
        return f"{self._control}:pin"

    @property
    def notify(self) -> str:
        """Pub/sub channel carrying one small notice per committed version."""
        return f"{self._control}:notify"

    def manifest(self, version: int) -> str:
        """Manifest of ``version`` (msgpack)."""
        return f"{self._control}:m:{int(version)}"

    def chunk(self, version: int, index: int) -> str:
        """Chunk ``index`` of ``version``'s blob (raw bytes)."""
        return f"{self.prefix}:chunk:{{{self.namespace}:{int(version)}:{int(index)}}}"

    @property
    def control_pattern(self) -> str:
        """Glob matching every control key of the namespace (ACL rules, SCAN)."""
        return f"{self._control}:*"

    @property
    def chunk_pattern(self) -> str:
        """Glob matching every chunk key of the namespace (ACL rules, SCAN)."""
        return f"{self.prefix}:chunk:{{{self.namespace}:*"

    def parse_chunk(self, key: str | bytes) -> tuple[int, int] | None:
        """Return ``(version, index)`` of a chunk key of this namespace, else None."""
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        head = f"{self.prefix}:chunk:{{{self.namespace}:"
        if not key.startswith(head) or not key.endswith("}"):
            return None
        parts = key[len(head) : -1].split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            return None
        return int(parts[0]), int(parts[1])
