"""Who is on the bus: worker and publisher reports kept in two Redis hashes.

Each worker writes its applied version and a heartbeat; each publisher its
identity and last version. Operators read them to see lag, dead workers and
a second publisher on the same namespace.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

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


def report_worker(client: Any, keys: KeySpace, report: WorkerReport) -> None:
    """Record a worker's applied version and heartbeat."""
    body = asdict(report)
    worker_id = body.pop("worker_id")
    with translate_errors(f"reporting worker {worker_id!r}", client):
        client.hset(keys.workers, worker_id, msgpack.packb(body))


def list_workers(client: Any, keys: KeySpace) -> list[WorkerReport]:
    """Every worker that reported, sorted by id; malformed reports are skipped."""
    with translate_errors("listing workers", client):
        raw = client.hgetall(keys.workers)
    reports = []
    for worker_id, value in raw.items():
        body = _decode(value)
        try:
            reports.append(WorkerReport(worker_id=worker_id.decode("utf-8", "replace"), **body))  # type: ignore[arg-type]
        except TypeError:
            continue
    return sorted(reports, key=lambda r: r.worker_id)


def report_publisher(client: Any, keys: KeySpace, report: PublisherReport) -> None:
    """Record a publisher's identity and last version."""
    body = asdict(report)
    publisher_id = body.pop("publisher_id")
    with translate_errors(f"reporting publisher {publisher_id!r}", client):
        client.hset(keys.publishers, publisher_id, msgpack.packb(body))


def list_publishers(client: Any, keys: KeySpace) -> list[PublisherReport]:
    """Every publisher that reported, newest first; malformed reports are skipped."""
    with translate_errors("listing publishers", client):
        raw = client.hgetall(keys.publishers)
    reports = []
    for publisher_id, value in raw.items():
        body = _decode(value)
        try:
            reports.append(PublisherReport(publisher_id=publisher_id.decode("utf-8", "replace"), **body))  # type: ignore[arg-type]
        except TypeError:
            continue
    return sorted(reports, key=lambda r: r.published_at, reverse=True)
