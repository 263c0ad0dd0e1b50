"""Garbage collection: keep the newest versions whole, let older ones fade.

Evicted versions leave the version index at once but their keys get a grace
expiry instead of a delete, so a reader mid-pull can finish; a reader that
still loses the race retries with ``latest``. Chunks of versions that were
never committed (a publisher died mid-write) are found by SCAN and faded the
same way once their pending mark is older than the pending timeout.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .keys import KeySpace
from .transport import parse_version, translate_errors
from .wire import decode_manifest

__all__ = ["GcReport", "collect"]


@dataclass
class GcReport:
    """What a garbage collection did (or, with ``dry_run``, would do)."""

    kept: list[int] = field(default_factory=list)
    evicted: list[int] = field(default_factory=list)
    orphan_versions: list[int] = field(default_factory=list)
    orphan_chunks: int = 0
    dry_run: bool = False


def _chunk_counts(client: Any, keys: KeySpace, versions: list[int]) -> list[int]:
    """How many chunks each version has, by its manifest (0 when it is gone or corrupt)."""
    if not versions:
        return []
    pipe = client.pipeline(transaction=False)
    for version in versions:
        pipe.get(keys.manifest(version))
    counts = []
    for data in pipe.execute():
        try:
            counts.append(0 if data is None else decode_manifest(data).chunk_count)
        except Exception:  # a corrupt manifest must not stop GC; its chunks are then found by SCAN
            counts.append(0)
    return counts


def _fade(pipe: Any, key: str, grace_ms: int) -> None:
    if grace_ms <= 0:
        pipe.delete(key)
    else:
        pipe.pexpire(key, grace_ms)


def collect(
    client: Any,
    keys: KeySpace,
    *,
    keep: int,
    grace_seconds: float,
    pending_timeout: float,
    scan_orphans: bool = True,
    dry_run: bool = False,
    chunk_counts: Mapping[int, int] | None = None,
    first: Any = None,
    head: tuple[Sequence[int], int | None, int | None] | None = None,
) -> GcReport:
    """Evict all but the newest ``keep`` committed versions, and fade orphan chunks.

    ``latest`` and a pinned version are never evicted.

    Args:
        client: a redis-py client.
        keys: the namespace's key names.
        keep: how many of the newest committed versions stay whole (at least 1).
        grace_seconds: how long evicted keys stay readable; 0 deletes at once.
        pending_timeout: age after which an uncommitted version counts as abandoned.
        scan_orphans: also SCAN for chunks of abandoned versions.
        dry_run: report only; change nothing.
        chunk_counts: how many chunks some versions have, known to the caller (a
            publisher knows its own); the manifests of the others are read.
        first: a pipeline holding the caller's own commands: they go out with the
            read of the version index, in one round trip (an error among them raises).
        head: the version index, ``latest`` and the pin, as the caller just read them
            (a commit returns them): not read again, and ``first`` goes out with the evictions.

    Raises:
        ValueError: ``keep`` below 1.
        BusConnectionError: Redis unreachable.

    Example:
        >>> collect(client, KeySpace("run"), keep=3, grace_seconds=60, pending_timeout=600)  # doctest: +SKIP
        GcReport(kept=[5, 6, 7], evicted=[4], orphan_versions=[], orphan_chunks=0, dry_run=False)
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    report = GcReport(dry_run=dry_run)
    grace_ms = int(grace_seconds * 1000)
    with translate_errors("garbage-collecting old versions", client):
        if head is None:
            pipe = client.pipeline(transaction=False) if first is None else first
            pipe.zrange(keys.versions, 0, -1)
            pipe.get(keys.latest)  # not MGET: a cluster pipeline refuses it
            pipe.get(keys.pin)
            index, latest, pin = pipe.execute()[-3:]
            head = [int(v) for v in index], parse_version(latest), parse_version(pin)
            first = None
        committed, *unevictable = head
        protected = set(committed[-keep:]) | {v for v in unevictable if v is not None}
        report.kept = [v for v in committed if v in protected]
        report.evicted = [v for v in committed if v not in protected]
        counts = dict(chunk_counts or {})
        unknown = [v for v in report.evicted if v not in counts]
        counts.update(zip(unknown, _chunk_counts(client, keys, unknown)))
        pipe = client.pipeline(transaction=False) if first is None else first
        for version in report.evicted:
            for index in range(counts[version]):
                _fade(pipe, keys.chunk(version, index), grace_ms)
            _fade(pipe, keys.manifest(version), grace_ms)
            pipe.zrem(keys.versions, version)
        if scan_orphans:
            _collect_orphans(client, keys, pipe, set(committed), pending_timeout, grace_ms, report)
        if not dry_run and len(pipe):
            pipe.execute()
    return report


def _collect_orphans(
    client: Any, keys: KeySpace, pipe: Any, committed: set[int], pending_timeout: float, grace_ms: int, report: GcReport
) -> None:
    now = time.time()
    pending = {int(v): float(ts) for v, ts in client.zrange(keys.pending, 0, -1, withscores=True)}
    live_pending = {v for v, started in pending.items() if now - started < pending_timeout}
    orphans: set[int] = set()
    for key in client.scan_iter(match=keys.chunk_pattern, count=1000):
        parsed = keys.parse_chunk(key)
        if parsed is None:
            continue
        version = parsed[0]
        if version in committed or version in live_pending:
            continue
        if client.pttl(key) >= 0:
            continue  # already fading
        orphans.add(version)
        report.orphan_chunks += 1
        _fade(pipe, key if isinstance(key, str) else key.decode(), grace_ms)
    for version in set(pending) - live_pending:
        pipe.zrem(keys.pending, version)
    report.orphan_versions = sorted(orphans)
