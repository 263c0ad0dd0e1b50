"""The worker's side: listen, pull and verify into staging, apply at the safe point."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import redis
import torch
from redis.backoff import ExponentialWithJitterBackoff

from . import defaults
from ._notices import NoticeFeed, open_feed
from .buffers import HostBuffer
from .errors import (
    BusConnectionError,
    ConfigError,
    CorruptBlobError,
    ManifestError,
    RedisBusError,
    RedisCommandError,
    SchemaMismatchError,
    SignatureError,
    VersionNotFoundError,
)
from .registry import WorkerReport, identity, report_worker
from .signing import verify_chunk_digests, verify_signature
from .tensors import Target, match_target, target_leaves
from .transport import (
    HeldConnection,
    RedisSource,
    decode_fetched_manifest,
    is_cluster,
    read_chunks_into,
    read_head,
    read_head_and_manifest,
    read_head_manifest_and_chunks,
    read_manifest,
    refresh_topology,
    resolve,
)
from .wire import Manifest, Notice, TensorEntry, decode_notice, verify_chunks

__all__ = ["WeightSubscriber"]

log = logging.getLogger("redisbus.subscriber")

ApplyMode = Literal["on_sync", "immediate"]

#: Errors that condemn a version for good: retrying it cannot help.
_BAD_VERSION_ERRORS = (ManifestError, CorruptBlobError, SchemaMismatchError, SignatureError)
_CONNECTION_ERRORS = (BusConnectionError, redis.ConnectionError, redis.TimeoutError, OSError)
#: Errors of a read replica after which the pull is redone on the primary.
_REPLICA_FALLBACK_ERRORS = (VersionNotFoundError, BusConnectionError, RedisCommandError)
_MAX_REMEMBERED_FAILURES = 1024
_TICK_SECONDS = 0.05


class WeightSubscriber:
    """Follows one namespace and keeps ``target`` on its newest verified version.

    A background listener (``start()``) subscribes to the notify channel,
    catches up by reading ``latest`` after every (re)subscribe, on every
    notice and on a poll timer, and pulls each newer version into a reusable
    staging buffer (pinned when the target is on CUDA), verifying every
    checksum and matching keys, shapes and dtypes against the target. The
    target changes only in :meth:`sync` (or right away with
    ``apply="immediate"``), in one step; a version that fails any check is
    logged, counted in :meth:`stats`, and never touches the target.

    Args:
        redis: a URL, a :class:`~redisbus.BusConfig`, a ``redis.Redis`` client, or
            None to read ``REDISBUS_URL``.
        namespace: the bus namespace.
        target: the TensorDict or ``nn.Module`` to keep up to date (any device).
        worker_id: how this worker names itself in reports (default: host:pid:random).
        apply: ``"on_sync"`` (default) or ``"immediate"``.
        on_apply: called with each version number after it is applied.
        **settings: any other :class:`~redisbus.BusConfig` field.

    Raises:
        ConfigError: invalid URL, namespace, setting or apply mode.

    Example:
        >>> sub = WeightSubscriber("redis://10.0.0.5:6379/0", namespace="ppo",  # doctest: +SKIP
        ...                        target=policy, worker_id="collector-3")
        >>> sub.start()  # doctest: +SKIP
        >>> sub.sync()   # between two rollouts  # doctest: +SKIP
    """

    def __init__(
        self,
        redis: RedisSource = None,
        *,
        namespace: str | None = None,
        target: Target,
        worker_id: str | None = None,
        apply: ApplyMode = "on_sync",
        on_apply: Callable[[int], None] | None = None,
        **settings: Any,
    ) -> None:
        if apply not in ("on_sync", "immediate"):
            raise ConfigError(f"apply must be 'on_sync' or 'immediate', not {apply!r}")
        leaves = target_leaves(target)
        self.config, self._client, self._owns_client = resolve(redis, namespace, settings)
        self.keys = self.config.keys
        self.target = target
        self.apply_mode: ApplyMode = apply
        self._identity = identity()
        self.worker_id = worker_id or f"{self._identity['host']}:{self._identity['pid']}:{uuid.uuid4().hex[:8]}"
        self._on_apply = on_apply
        self._on_cuda = any(t.is_cuda for t in leaves.values())
        self._staging = HostBuffer()
        self._cond = threading.Condition(threading.RLock())
        self._pull_lock = threading.Lock()
        self._applied: int | None = None
        self._applied_at: float | None = None
        self._staged: Manifest | None = None
        self._failed: dict[int, RedisBusError] = {}
        self._copy_done: Any = None
        self._stats: Counter[str] = Counter()
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._deferred = False  # a catch-up found a staged version in the way: catch up again after sync()
        self._report_due_at: float | None = None  # when an applied version must be reported by
        self._thread: threading.Thread | None = None
        self._backoff = ExponentialWithJitterBackoff(cap=self.config.backoff_cap, base=self.config.backoff_base)
        self._notice_conn = HeldConnection(self._client)  # one-trip reads after notices: one connection, kept
        self._replica: Any = None  # this worker's read replica (chosen by worker id), made on first pull
        self._replica_down_until = 0.0

    def __repr__(self) -> str:
        return (
            f"WeightSubscriber({self.config.redacted_url()!r}, namespace={self.keys.namespace!r}, "
            f"worker_id={self.worker_id!r}, version={self._applied})"
        )

    def __enter__(self) -> WeightSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def version(self) -> int | None:
        """The version currently applied to the target (None before the first)."""
        return self._applied

    @property
    def staged_version(self) -> int | None:
        """The verified version waiting for :meth:`sync`, if any."""
        staged = self._staged
        return staged.version if staged else None

    def latest_version(self) -> int | None:
        """The newest committed version on the bus (one read of ``latest``), or None.

        Raises:
            BusConnectionError: Redis unreachable.
        """
        return read_head(self._client, self.keys)[0]

    def wanted_version(self) -> int | None:
        """The version this worker should end up on: ``latest``, or the operator's pin when lower.

        One read of ``latest`` and the pin; None when nothing was published. Pass
        it to :meth:`wait_for_version` to apply whatever was committed before the call.

        Raises:
            BusConnectionError: Redis unreachable.
        """
        latest, pin = read_head(self._client, self.keys)
        return min(latest, pin) if latest is not None and pin is not None else latest

    def stats(self) -> dict[str, Any]:
        """Counters: notices, pulls, applied, errors (total and by class), reconnects, last error."""
        with self._cond:
            counts = dict(self._stats)
            errors = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("error:")}
            return {
                "version": self._applied,
                "staged": self.staged_version,
                "notices": counts.get("notices", 0),
                "pulls": counts.get("pulls", 0),
                "applied": counts.get("applied", 0),
                "bytes_pulled": counts.get("bytes_pulled", 0),
                "reconnects": counts.get("reconnects", 0),
                "replica_fallbacks": counts.get("replica_fallbacks", 0),
                "subscribes": counts.get("subscribes", 0),
                "errors": sum(errors.values()),
                "errors_by_type": errors,
                "failed_versions": sorted(self._failed),
                "last_error": self._last_error,
            }

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> WeightSubscriber:
        """Start the background listener (idempotent). Returns self."""
        if self._stop.is_set():
            raise RuntimeError("subscriber is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"redisbus-listener-{self.worker_id}", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the listener, release the staging buffer and the connection (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.socket_timeout + 5)
        with self._cond:
            self._staged = None
            self._staging.release()
        if self._thread is None or not self._thread.is_alive():  # a listener stuck past the join may still read on it
            self._notice_conn.close()
        if self._owns_client:
            try:
                self._client.close()
            except Exception:  # closing a dead connection has nothing left to report
                pass
        if self._replica is not None:
            try:
                self._replica.close()
            except Exception:  # as above
                pass

    # -- the sync hook -----------------------------------------------------------------------

    def sync(self) -> int | None:
        """Apply the newest verified version if it is newer than the applied one.

        Call it at the worker's safe point (between two rollouts). Without a
        running listener it first pulls ``latest`` itself, on this thread.

        Returns:
            The version applied now, or None when there was nothing newer.

        Raises:
            BusConnectionError: only without a listener, when Redis is unreachable.
        """
        if self._thread is None:
            self._catch_up()
        applied = self._apply_staged()
        if applied is not None and self._thread is None:
            self._report()
        return applied

    def wait_for_version(self, version: int, timeout: float | None = None) -> int:
        """Block until a version >= ``version`` is applied, and return the applied version.

        Waiting counts as a safe point: verified versions are applied as they arrive.

        Raises:
            TimeoutError: not reached within ``timeout`` seconds (the message
                names the last error seen, if any).
            RedisBusError: the newest version >= ``version`` was refused
                (``SchemaMismatchError``, ``CorruptBlobError``, ...); the target is unchanged.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._thread is None:
                try:
                    self._catch_up()
                except _CONNECTION_ERRORS as exc:
                    self._count_error(exc)
            with self._cond:
                if self._staged is not None:
                    self._apply_staged()  # waiting is a safe point; applying makes room for newer pulls
                if self._applied is not None and self._applied >= version:
                    return self._applied
                refused = [v for v in self._failed if v >= version]
                if refused and self._staged is None:
                    raise self._failed[max(refused)]
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    detail = f"; last error: {self._last_error}" if self._last_error else ""
                    raise TimeoutError(
                        f"worker {self.worker_id!r} did not reach version {version} within {timeout}s "
                        f"(applied: {self._applied}){detail}"
                    )
                wait = self.config.poll_interval if self._thread is None else 1.0
                self._cond.wait(wait if remaining is None else min(wait, remaining))

    # -- applying ----------------------------------------------------------------------------

    def _apply_staged(self, pairs: list[tuple[TensorEntry, torch.Tensor]] | None = None) -> int | None:
        """Apply the staged version; ``pairs``: its match against the target, made by the pull just now."""
        with self._cond:
            manifest = self._staged
            if manifest is None:
                return None
            self._staged = None
            try:
                if pairs is None:
                    pairs = match_target(manifest, target_leaves(self.target))
            except SchemaMismatchError as exc:
                self._condemn(manifest.version, exc)
                return None
            self._staging.copy_out(pairs)
            if self._on_cuda:
                self._copy_done = torch.cuda.Event()
                self._copy_done.record()
            self._applied = manifest.version
            self._applied_at = time.time()
            self._stats["applied"] += 1
            self._cond.notify_all()
            wake, self._deferred = self._deferred, False
            if self._report_due_at is None:
                self._report_due_at = time.monotonic() + defaults.REPORT_DELAY_SECONDS
        if wake:  # applying made room for the newer version a catch-up had to leave
            self._wake.set()
        log.info("worker %s applied version %d", self.worker_id, manifest.version)
        if self._on_apply is not None:
            self._on_apply(manifest.version)
        return manifest.version

    # -- pulling -----------------------------------------------------------------------------

    def _held(self) -> int:
        return max(self._applied or 0, self.staged_version or 0)

    def _catch_up(self, notice: Notice | None = None) -> None:
        """Pull the newest wanted version into staging if it is newer than what we hold.

        ``notice``: the announcement that woke us. Its version's manifest is fetched
        in the same round trip as ``latest`` (and, for a small version, its chunks
        too), and used if that is the version wanted.
        """
        with self._pull_lock:
            fetched = None
            landed = None  # chunk size with which the announced version's chunks landed in staging
            if notice is not None and not self.config.replicas:
                latest, pin, fetched, landed = self._read_announced(notice)
            else:
                latest, pin = read_head(self._client, self.keys)
            for _ in range(defaults.GC_RACE_RETRIES):
                if latest is None:
                    return
                wanted = min(latest, pin) if pin is not None else latest
                with self._cond:
                    if wanted <= self._held() or wanted in self._failed:
                        return
                    if self._staged is not None:
                        self._deferred = True
                        return  # an unapplied verified version waits for sync(); don't overwrite it
                announced = notice is not None and wanted == notice.version
                prefetched, fetched = (fetched if announced else None), None
                in_staging, landed = (landed if announced else None), None
                try:
                    manifest, pairs = self._pull(wanted, prefetched, in_staging)
                except VersionNotFoundError as exc:
                    latest, pin = read_head(self._client, self.keys)
                    if latest == wanted and pin is None:
                        self._condemn(wanted, exc)  # not a race with GC: the latest version itself lost data
                        return
                    log.info("version %d vanished while pulling (%s); retrying with latest", wanted, exc)
                    self._stats["gc_races"] += 1
                    continue
                except _BAD_VERSION_ERRORS as exc:
                    self._condemn(wanted, exc)
                    return
                with self._cond:
                    self._staged = manifest
                    self._cond.notify_all()
                if self.apply_mode == "immediate":
                    self._apply_staged(pairs)  # on this thread, right away: the pull's match still holds
                return

    def _read_announced(self, notice: Notice) -> tuple[int | None, int | None, tuple[int, bytes] | None, int | None]:
        """``latest``, the pin and the announced version's raw manifest, in one round trip.

        A small version's chunks come in the same round trip, straight into
        staging (then the last item is the chunk size they were read with, else
        None): the common RL case, a policy of a few MB, reaches every worker
        in one round trip after its notice.
        """
        with self._cond:  # an apply copying out of staging holds it: wait for the copy to finish
            staging_free = self._staged is None  # else it holds a verified version waiting for sync()
        size, chunk = notice.total_bytes, notice.chunk_size
        if (
            chunk is not None
            and staging_free
            and size <= min(defaults.ONE_TRIP_PULL_BYTES, self.config.max_blob_bytes)
            and -(-size // chunk) <= defaults.ONE_TRIP_MAX_CHUNKS
            and not is_cluster(self._client)
        ):
            self._reserve_staging(size)
            try:
                latest, pin, fetched = read_head_manifest_and_chunks(self._client, self.keys, notice.version, chunk,
                                                                     self._staging.memoryview(), self.config,
                                                                     self._notice_conn)  # fmt: skip
                return latest, pin, fetched, chunk
            except (VersionNotFoundError, CorruptBlobError) as exc:
                # GC won a race, or the notice's layout is not its version's: the two round trips below
                # find out which and say it (a version is condemned only for what its manifest says)
                log.debug("worker %s: one-trip pull of version %d failed (%s)", self.worker_id, notice.version, exc)
        head = read_head_and_manifest(self._client, self.keys, notice.version, self.config)
        return (*head, None)

    def _reserve_staging(self, size: int) -> None:
        if self._copy_done is not None:
            self._copy_done.synchronize()  # a device copy may still read the staging buffer
        self._staging.reserve(size, pinned=self._on_cuda)

    def _replica_client(self) -> Any:
        """This worker's read replica, or None (none configured, or it failed lately)."""
        if not self.config.replicas or time.monotonic() < self._replica_down_until:
            return None
        if self._replica is None:
            configs = self.config.replica_configs()
            # no retries: a replica that fails is skipped for the primary, not waited on again
            self._replica = configs[zlib.crc32(self.worker_id.encode()) % len(configs)].client(retries=0)
        return self._replica

    def _pull(
        self, version: int, fetched: tuple[int, bytes] | None = None, landed: int | None = None
    ) -> tuple[Manifest, list[tuple[TensorEntry, torch.Tensor]]]:
        """Pull ``version`` from this worker's read replica if it has one, else (or if it lags) from the primary.

        ``fetched``: the version's manifest as read from the primary with ``latest``;
        ``landed``: its chunks are in staging already, read with this chunk size.
        Returns the verified manifest and its match against the target.
        """
        replica = self._replica_client()
        if replica is not None:
            try:
                return self._pull_from(replica, version)
            except _REPLICA_FALLBACK_ERRORS as exc:
                self._stats["replica_fallbacks"] += 1
                if not isinstance(exc, VersionNotFoundError):  # unreachable or refusing: leave it alone a while
                    self._replica_down_until = time.monotonic() + defaults.REPLICA_RETRY_SECONDS
                log.info("worker %s: replica could not serve version %d (%s); pulling from the primary",
                         self.worker_id, version, exc)  # fmt: skip
        return self._pull_from(self._client, version, fetched, landed)

    def _pull_from(
        self, client: Any, version: int, fetched: tuple[int, bytes] | None = None, landed: int | None = None
    ) -> tuple[Manifest, list[tuple[TensorEntry, torch.Tensor]]]:
        if fetched is not None:
            manifest = decode_fetched_manifest(self.keys, version, *fetched, self.config)
        else:
            manifest, _ = read_manifest(client, self.keys, version, self.config)
        if self.config.signing_key:
            verify_signature(manifest, self.config.signing_key)
        elif manifest.signature is not None:
            log.debug("version %d is signed but this worker has no key; checksums only", version)
        pairs = match_target(manifest, target_leaves(self.target))
        self._stats["pulls"] += 1
        if landed == manifest.chunk_size and self._staging.size == manifest.total_bytes:
            blob = self._staging.memoryview()
            verify_chunks(manifest, blob)  # read by the layout the notice gave, which is the manifest's
        else:
            self._reserve_staging(manifest.total_bytes)
            blob = self._staging.memoryview()
            read_chunks_into(client, self.keys, manifest, blob, verify=verify_chunks)  # each chunk checked as it lands
        if self.config.signing_key:
            verify_chunk_digests(manifest, blob)
        self._stats["bytes_pulled"] += manifest.total_bytes
        return manifest, pairs

    def _count_error(self, exc: BaseException) -> None:
        with self._cond:
            self._stats[f"error:{type(exc).__name__}"] += 1
            self._last_error = f"{type(exc).__name__}: {exc}"

    def _condemn(self, version: int, exc: RedisBusError) -> None:
        self._count_error(exc)
        with self._cond:
            if len(self._failed) >= _MAX_REMEMBERED_FAILURES:
                self._failed.pop(next(iter(self._failed)))
            self._failed[version] = exc
        log.error("worker %s rejected version %d: %s", self.worker_id, version, exc)

    def _report(self) -> None:
        report = WorkerReport(
            worker_id=self.worker_id,
            version=self._applied,
            applied_at=self._applied_at,
            heartbeat=time.time(),
            host=self._identity["host"],
            pid=self._identity["pid"],
            errors=sum(v for k, v in self._stats.items() if k.startswith("error:")),
        )
        try:
            report_worker(self._client, self.keys, report)
        except RedisCommandError as exc:  # refused (maxmemory, an ACL): weights matter more than the heartbeat
            self._count_error(exc)
            log.warning("worker %s could not report its heartbeat: %s", self.worker_id, exc)

    # -- the listener ------------------------------------------------------------------------

    def _on_notice(self, data: bytes) -> None:
        self._stats["notices"] += 1
        try:
            notice = decode_notice(data)
        except ManifestError as exc:
            self._count_error(exc)
            log.warning("worker %s ignored a malformed notice: %s", self.worker_id, exc)
            return
        if notice.version <= self._held():
            self._stats["stale_notices"] += 1
            return
        self._catch_up(notice)

    def _run(self) -> None:
        failures = 0
        feed: NoticeFeed | None = None
        next_poll = next_report = 0.0
        while not self._stop.is_set():
            try:
                if feed is None:
                    feed = open_feed(self._client, self.keys.notify, self.config)
                event = feed.get(_TICK_SECONDS)
                if event is not None:
                    kind, data = event
                    if kind == "subscribe":
                        self._catch_up()
                        self._stats["subscribes"] += 1  # counted caught up: from here on, notices explain pulls
                        next_poll = time.monotonic() + self.config.poll_interval
                        failures = 0
                    else:
                        self._on_notice(data)  # type: ignore[arg-type]  # a message carries its bytes
                now = time.monotonic()
                if now >= next_poll or self._wake.is_set():
                    self._wake.clear()
                    self._catch_up()
                    next_poll = now + self.config.poll_interval
                due = self._report_due_at
                if now >= next_report or (due is not None and (event is None or now >= due)):
                    self._report_due_at = None  # an apply after this point is reported next time
                    self._report()
                    next_report = now + self.config.heartbeat_interval
            except _CONNECTION_ERRORS as exc:
                failures += 1
                self._stats["reconnects"] += 1
                self._count_error(exc)
                delay = self._backoff.compute(failures)
                log.warning("worker %s lost Redis (%s); retrying in %.2fs", self.worker_id, exc, delay)
                feed = self._drop(feed)
                refresh_topology(self._client)  # a cluster may have failed over: find the new masters
                self._stop.wait(delay)
            except Exception as exc:  # keep listening whatever happens; the error is counted and logged
                failures += 1
                self._count_error(exc)
                log.exception("worker %s listener error", self.worker_id)
                feed = self._drop(feed)
                self._stop.wait(self._backoff.compute(failures))
        if self._report_due_at is not None:  # the last apply before close(): report it on the way out
            with contextlib.suppress(Exception):
                self._report()
        self._drop(feed)

    @staticmethod
    def _drop(feed: NoticeFeed | None) -> None:
        if feed is not None:
            feed.close()
        return None
