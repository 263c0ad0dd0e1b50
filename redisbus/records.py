"""What the operator API returns: frozen records of versions, tensors, checks, workers and changes.

Each record turns into JSON-ready data with ``to_dict()`` (bytes as hex,
tuples as lists, NaN and infinities as strings), which is what the CLI's
``--json`` prints.

>>> PinResult(pin=7, previous=None, latest=9).to_dict()
{'pin': 7, 'previous': None, 'latest': 9, 'workers_ahead': []}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .registry import PublisherReport, WorkerReport

__all__ = [
    "ChunkProblem",
    "DiffResult",
    "ExportResult",
    "Inspection",
    "PinResult",
    "PublishResult",
    "PublisherStatus",
    "Status",
    "TensorDiff",
    "TensorRow",
    "TensorStats",
    "VerifyResult",
    "VersionInfo",
    "WorkerStatus",
    "json_ready",
]


def json_ready(value: Any) -> Any:
    """``value`` with bytes turned to hex and tuples to lists (JSON-ready)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class _Record:
    """Base of the records: ``to_dict()`` for JSON output."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of this record."""
        return json_ready(asdict(self))  # type: ignore[call-overload]


@dataclass(frozen=True)
class VersionInfo(_Record):
    """One committed version as ``versions`` lists it."""

    version: int
    created: float | None
    publisher: dict[str, Any]
    total_bytes: int
    tensor_count: int
    chunk_count: int
    chunks_present: int
    latest: bool
    pinned: bool
    metadata: dict[str, Any]
    signed: bool = False
    expires_in: float | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        """Manifest readable and every chunk present with its expected size."""
        return self.error is None and self.chunks_present == self.chunk_count

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "complete": self.complete}


@dataclass(frozen=True)
class TensorStats(_Record):
    """Statistics of one tensor over its finite elements (complex: over magnitudes)."""

    numel: int
    finite: int
    nan: int
    inf: int
    min: float | None
    max: float | None
    mean: float | None
    norm: float


@dataclass(frozen=True)
class TensorRow(_Record):
    """One tensor of a version as ``inspect`` shows it: name, layout, and statistics when asked for."""

    key: str
    path: list[str]
    dtype: str
    shape: list[int]
    nbytes: int
    offset: int
    stats: TensorStats | None = None


@dataclass(frozen=True)
class Inspection(_Record):
    """A version's manifest, and per-tensor statistics when asked for."""

    version: int
    latest: int | None
    pin: int | None
    created: float
    publisher: dict[str, Any]
    metadata: dict[str, Any]
    total_bytes: int
    chunk_size: int
    chunk_count: int
    signed: bool
    tensors: list[TensorRow]


@dataclass(frozen=True)
class ChunkProblem(_Record):
    """Why one chunk (or, with ``chunk`` None, the manifest) is unsound."""

    chunk: int | None
    key: str
    problem: str


@dataclass
class VerifyResult(_Record):
    """The outcome of verifying one version."""

    version: int
    total_bytes: int = 0
    chunk_count: int = 0
    chunks_ok: int = 0
    signature: str = "absent"  # "absent", "not checked" (no key), "ok", "bad"
    problems: list[ChunkProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems

    @property
    def bad_chunks(self) -> list[int]:
        """Indices of the chunks with a problem, ascending."""
        return sorted({p.chunk for p in self.problems if p.chunk is not None})

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "ok": self.ok, "bad_chunks": self.bad_chunks}


@dataclass(frozen=True)
class TensorDiff(_Record):
    """How one tensor differs between two versions.

    ``change`` is ``"unchanged"``, ``"changed"``, ``"added"``, ``"removed"``,
    ``"shape"`` (shape differs) or ``"dtype"`` (dtype differs).
    """

    key: str
    change: str
    old_dtype: str | None
    new_dtype: str | None
    old_shape: list[int] | None
    new_shape: list[int] | None
    elements_changed: int | None = None
    max_abs: float | None = None
    rel_l2: float | None = None


@dataclass(frozen=True)
class DiffResult(_Record):
    """Every tensor of two versions, compared (see :class:`TensorDiff`)."""

    old: int
    new: int
    tensors: list[TensorDiff]

    def count(self, change: str) -> int:
        """How many tensors have this ``change``."""
        return sum(1 for t in self.tensors if t.change == change)

    @property
    def identical(self) -> bool:
        """Every tensor unchanged, bit for bit."""
        return all(t.change == "unchanged" for t in self.tensors)


@dataclass(frozen=True)
class WorkerStatus(_Record):
    """A worker's last report with its lag and liveness.

    ``lag`` is ``latest`` minus the worker's version, as it is: negative for a
    worker *ahead* of ``latest`` (Redis restarted empty and a restarted
    trainer numbers from 1 again; such a worker applies nothing until the
    versions pass its own), None when either is unknown.
    """

    worker_id: str
    host: str
    pid: int
    version: int | None
    lag: int | None
    heartbeat: float
    heartbeat_age: float
    applied_at: float | None
    errors: int
    dead: bool
    #: "dead", "waiting" (nothing applied yet), "ahead" (a version newer than ``latest``, or the namespace has no
    #: ``latest`` at all), "pinned", "lagging", "current"
    state: str

    @classmethod
    def from_report(cls, r: WorkerReport, latest: int | None, pin: int | None, dead_after: float, now: float) -> WorkerStatus:
        """The status of the worker behind report ``r``, given the namespace's ``latest`` and pin at time ``now``."""
        lag = None if latest is None or r.version is None else latest - r.version  # not clamped: < 0 is ahead
        dead = r.is_dead(dead_after, now)
        if dead:
            state = "dead"
        elif r.version is None:
            state = "waiting"
        elif lag is None or lag < 0:
            state = "ahead"
        elif lag and pin is not None and r.version >= pin:
            state = "pinned"
        elif lag:
            state = "lagging"
        else:
            state = "current"
        return cls(
            worker_id=r.worker_id,
            host=r.host,
            pid=r.pid,
            version=r.version,
            lag=lag,
            heartbeat=r.heartbeat,
            heartbeat_age=round(max(0.0, now - r.heartbeat), 3),
            applied_at=r.applied_at,
            errors=r.errors,
            dead=dead,
            state=state,
        )


@dataclass(frozen=True)
class PublisherStatus(_Record):
    """A publisher's last report, with its age in seconds."""

    publisher_id: str
    host: str
    pid: int
    version: int
    published_at: float
    age: float

    @classmethod
    def from_report(cls, p: PublisherReport, now: float) -> PublisherStatus:
        """The status of the publisher behind report ``p`` at time ``now``."""
        return cls(p.publisher_id, p.host, p.pid, p.version, p.published_at, max(0.0, now - p.published_at))


@dataclass(frozen=True)
class Status(_Record):
    """A namespace at a glance, as ``status`` shows it."""

    namespace: str
    url: str
    latest: int | None
    pin: int | None
    versions: list[int]
    stored_bytes: int
    workers: int
    workers_current: int
    workers_lagging: int
    workers_dead: int
    publishers: list[PublisherStatus]
    #: live workers on a version newer than ``latest`` (state ``ahead``): not current, not behind
    workers_ahead: int = 0


@dataclass(frozen=True)
class PinResult(_Record):
    """The pin after ``pin`` / ``unpin``, the one before, ``latest``, and the live workers already past the pin."""

    pin: int | None
    previous: int | None
    latest: int | None
    workers_ahead: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PublishResult(_Record):
    """A version published by ``rollback`` or ``import``."""

    version: int
    total_bytes: int
    tensor_count: int
    metadata: dict[str, Any]
    pin: int | None
    source: str


@dataclass(frozen=True)
class ExportResult(_Record):
    """A version written to a file by ``export``."""

    version: int
    path: str
    tensor_count: int
    total_bytes: int
    file_bytes: int


