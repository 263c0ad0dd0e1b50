"""Who is on the bus: worker and publisher reports kept in two Redis hashes.

Each worker writes its applied version and a heartbeat; each publisher its
identity and last version. Operators read them to see lag, dead workers and
a second publisher on the same namespace.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import msgpack

from .keys import KeySpace
from .transport import translate_errors

__all__ = ["WorkerReport", "PublisherReport", "report_worker", "list_workers", "report_publisher", "list_publishers"]

_MAX_REPORT_BYTES = 4096


@dataclass(frozen=True)
class WorkerReport:
    """What a worker last told the bus about itself."""

    worker_id: str
    version: int | None
    applied_at: float | None
    heartbeat: float
    host: str
    pid: int
    errors: int = 0

    def lag(self, latest: int | None) -> int | None:
        """Versions behind ``latest`` (None when either is unknown)."""
        if latest is None or self.version is None:
            return None
        return max(0, latest - self.version)

    def is_dead(self, dead_after: float, now: float | None = None) -> bool:
        """True when the heartbeat is older than ``dead_after`` seconds."""
        return ((now or time.time()) - self.heartbeat) > dead_after


@dataclass(frozen=True)
class PublisherReport:
    """What a publisher last told the bus about itself."""

    publisher_id: str
    version: int
    published_at: float
    host: str
    pid: int


def identity() -> dict[str, Any]:
    """Host name and process id of this process."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _decode(raw: bytes) -> dict[str, Any] | None:
    if len(raw) > _MAX_REPORT_BYTES:
        return None
    try:
        body = msgpack.unpackb(raw, raw=False, max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    return body if isinstance(body, dict) else None


_Report = TypeVar("_Report", WorkerReport, PublisherReport)


def _write(client: Any, hash_key: str, report: WorkerReport | PublisherReport, what: str) -> None:
    body = asdict(report)
    ident = body.pop(fields(report)[0].name)
    with translate_errors(f"reporting {what} {ident!r}", client):
        client.hset(hash_key, ident, msgpack.packb(body))


def _read_all(client: Any, hash_key: str, kind: type[_Report], what: str) -> list[_Report]:
    with translate_errors(f"listing {what}s", client):
        raw = client.hgetall(hash_key)
    id_field = fields(kind)[0].name
    reports = []
    for ident, value in raw.items():
        body = _decode(value)
        if body is None:
            continue
        try:
            reports.append(kind(**{id_field: ident.decode("utf-8", "replace")}, **body))
        except TypeError:
            continue
    return reports


def report_worker(client: Any, keys: KeySpace, report: WorkerReport) -> None:
    """Record a worker's applied version and heartbeat."""
    _write(client, keys.workers, report, "worker")


def list_workers(client: Any, keys: KeySpace) -> list[WorkerReport]:
    """Every worker that reported, sorted by id; malformed reports are skipped."""
    return sorted(_read_all(client, keys.workers, WorkerReport, "worker"), key=lambda r: r.worker_id)


def report_publisher(client: Any, keys: KeySpace, report: PublisherReport) -> None:
    """Record a publisher's identity and last version."""
    _write(client, keys.publishers, report, "publisher")


def list_publishers(client: Any, keys: KeySpace) -> list[PublisherReport]:
    """Every publisher that reported, newest first; malformed reports are skipped."""
    reports = _read_all(client, keys.publishers, PublisherReport, "publisher")
    return sorted(reports, key=lambda r: r.published_at, reverse=True)
