"""The trainer's side: snapshot weights, upload the chunks, commit atomically, announce."""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .buffers import HostBuffer, LazyFill, TensorBlob
from .errors import ConfigError, BusConnectionError, PublishError, RedisBusError
from .registry import PublisherReport, identity, report_publisher
from .retention import collect
from .signing import sign_manifest
from .tensors import Weights, flatten_weights
from .transport import (
    Committed,
    HeldConnection,
    RedisSource,
    allocate_version,
    read_head,
    resolve,
    server_max_bulk_len,
    stage_manifest_and_wait,
    translate_errors,
    upload_and_commit,
)
from .wire import (
    Manifest,
    TensorKey,
    check_metadata,
    chunk_spans,
    encode_manifest,
    encode_notice,
    notice_for,
    plan_layout,
)

__all__ = ["WeightPublisher"]

log = logging.getLogger("redisbus.publisher")


class WeightPublisher:
    """Publishes versioned weights of one namespace.

    Args:
        redis: a ``redis://``, ``rediss://`` or ``unix://`` URL, a
            :class:`~redisbus.BusConfig`, an existing ``redis.Redis`` client
            (``fakeredis.FakeRedis`` works), or None to read ``REDISBUS_URL``.
        namespace: the bus namespace (default: the settings' one, or
            ``REDISBUS_NAMESPACE``).
        publisher_id: how this publisher names itself in manifests and reports.
        **settings: any other :class:`~redisbus.BusConfig` field
            (``chunk_size``, ``keep_versions``, ``grace_seconds``, ...).

    Raises:
        ConfigError: invalid URL, namespace or setting.

    Example:
        >>> with WeightPublisher("redis://127.0.0.1:6379/0", namespace="ppo") as pub:  # doctest: +SKIP
        ...     v = pub.publish(policy, metadata={"step": 1000})
    """

    def __init__(
        self,
        redis: RedisSource = None,
        *,
        namespace: str | None = None,
        publisher_id: str | None = None,
        **settings: Any,
    ) -> None:
        self.config, self._client, self._owns_client = resolve(redis, namespace, settings)
        if self.config.replicas_to_wait and self.config.wait_timeout >= self.config.socket_timeout:
            if self._owns_client:
                self._client.close()
            raise ConfigError(
                f"wait_timeout ({self.config.wait_timeout}s) must be below socket_timeout ({self.config.socket_timeout}s): "
                "the publisher's WAIT for its replicas runs on a socket with that timeout"
            )
        self.keys = self.config.keys
        ident = identity()
        self.publisher_id = publisher_id or f"{ident['host']}:{ident['pid']}:{uuid.uuid4().hex[:8]}"
        self._identity = {"id": self.publisher_id, **ident}
        self._snapshot = HostBuffer()
        self._last_version = 0
        # Chunk counts of the versions this publisher committed, until GC evicts them. Should another publisher
        # reuse a number after Redis restarted empty, a wrong count fades too few of that version's chunks
        # (GC's orphan sweep takes the rest) or touches keys that do not exist; never another version's.
        self._chunk_counts: dict[int, int] = {}
        self._chunk_size: int | None = None
        self._layout: _Layout | None = None  # the last publish's, reused while the weights keep it
        self._lock = threading.Lock()
        self._held = HeldConnection(self._client)  # each version's number, chunks and commit: one kept connection
        self._uploader: ThreadPoolExecutor | None = None
        self._pending: Future[int] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"WeightPublisher({self.config.redacted_url()!r}, namespace={self.keys.namespace!r})"

    def __enter__(self) -> WeightPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def latest_version(self) -> int | None:
        """The newest committed version of the namespace, or None if there is none.

        Raises:
            BusConnectionError: Redis unreachable.
        """
        return read_head(self._client, self.keys)[0]

    def publish(
        self, weights: Weights, metadata: Mapping[str, Any] | None = None, *, block: bool = True
    ) -> int | Future[int]:
        """Publish ``weights`` as a new version.

        With ``block=False`` the tensors are copied into a reused snapshot
        buffer before the call returns (from then on the caller may
        change the tensors), the upload and commit run in a background thread
        and a :class:`~concurrent.futures.Future` of the version number is
        returned; a second call waits for the first upload to finish before
        taking its snapshot. A blocking publish of CPU tensors sends them
        straight from their memory (or, when signing, copies them chunk by
        chunk just ahead of the upload): other threads must not change them
        until it returns.

        Args:
            weights: a TensorDict, an ``nn.Module`` or a mapping of tensors (any device).
            metadata: small msgpack-able user metadata stored in the manifest.
            block: wait for the commit (default) or return a future.

        Returns:
            The committed version number (or a future of it).

        Raises:
            PublishError: the upload or commit failed; ``latest`` is unchanged (unless the
                connection broke during the commit itself; see :class:`~redisbus.PublishError`).
            SchemaMismatchError: a leaf that is not a tensor.
            ManifestError: a dtype off the allow-list, or metadata too large.
        """
        if self._closed:
            raise PublishError("publisher is closed")
        meta = check_metadata(metadata or {})
        if self._pending is not None:
            self._pending.exception()  # wait; its error was or will be reported through its own future
        if block:
            with self._lock:
                entries, total, fill = self._take_snapshot(weights, lazy=True)
                return self._upload_held(entries, total, meta, fill)
        with self._lock:
            entries, total, _ = self._take_snapshot(weights)
        if self._uploader is None:
            self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redisbus-upload")
        self._pending = self._uploader.submit(self._upload, entries, total, meta)
        return self._pending

    def _take_snapshot(
        self, weights: Weights, *, lazy: bool = False
    ) -> tuple[list[Any], int, LazyFill | TensorBlob | None]:
        """Lay out ``weights`` and copy them into the snapshot; or (``lazy``: a blocking publish, CPU only) plan
        to send them straight from their memory (:class:`TensorBlob`), or to copy them chunk by chunk as the
        upload goes (:class:`LazyFill`: signing reads the whole blob; strided tensors)."""
        leaves = flatten_weights(weights)
        layout = self._layout
        if layout is None or not layout.fits(leaves):
            layout = self._layout = _Layout(leaves)
        entries, total = layout.entries, layout.total
        tensors = [t for _, t in leaves]
        on_cuda = any(t.is_cuda for t in tensors)
        if lazy and not self.config.signing_key:
            blob = layout.blob(tensors)
            if blob is not None:
                return entries, total, blob  # sent from the tensors: no snapshot at all
        if all(t.device.type == "cpu" for t in tensors):
            self._snapshot.reserve(total)
            fill = LazyFill(self._snapshot, entries, tensors)
            if lazy:
                return entries, total, fill
            fill.fill_to(total)  # the whole snapshot now, memcpy shared with a helper thread
            return entries, total, None
        self._snapshot.reserve(total, pinned=on_cuda)
        with torch.no_grad():
            for entry, tensor in zip(entries, tensors):
                self._snapshot.view(entry).copy_(tensor.detach(), non_blocking=tensor.is_cuda)
        if on_cuda:
            torch.cuda.synchronize()
        return entries, total, None

    def _effective_chunk_size(self) -> int:
        if self._chunk_size is None:
            limit = server_max_bulk_len(self._client)
            size = self.config.chunk_size
            if limit is not None and size > limit // 2:
                size = max(1024, limit // 2)
                log.info("chunk size lowered to %d bytes to fit the server's proto-max-bulk-len %d", size, limit)
            self._chunk_size = size
        return self._chunk_size

    def _upload(self, entries: list[Any], total: int, metadata: dict[str, Any]) -> int:
        with self._lock:
            return self._upload_held(entries, total, metadata)

    def _upload_held(
        self, entries: list[Any], total: int, metadata: dict[str, Any], fill: LazyFill | TensorBlob | None = None
    ) -> int:
        try:
            return self._upload_locked(entries, total, metadata, fill)
        except PublishError:
            raise
        except RedisBusError as exc:
            raise PublishError(f"publish to namespace {self.keys.namespace!r} failed: {exc}") from exc

    def _upload_locked(
        self, entries: list[Any], total: int, metadata: dict[str, Any], fill: LazyFill | TensorBlob | None
    ) -> int:
        chunk_size = self._effective_chunk_size()
        spans = chunk_spans(total, chunk_size)
        direct = fill if isinstance(fill, TensorBlob) else None
        lazy = fill if isinstance(fill, LazyFill) else None
        blob = None if direct is not None else self._snapshot.memoryview()
        version = allocate_version(self._client, self.keys, self._last_version, self._held)
        sums: list[int | None] = [None] * len(spans)
        prepared: list[Manifest] = []

        def prepare() -> tuple[bytes, bytes]:
            if lazy is not None:
                lazy.fill_to(total)  # zero-byte tensors at the end; signing reads the whole blob
            checksums = tuple(int(c) for c in sums)  # type: ignore[arg-type]  # every slot is filled
            manifest, data, notice = self._manifest(version, total, chunk_size, checksums, entries, metadata, blob)
            prepared.append(manifest)
            return data, notice

        try:
            # each chunk is hashed just before it goes out, read from the tensors or copied in just ahead; the
            # commit follows on the same connection (one round trip), or after the replicas have the chunks
            committed = upload_and_commit(self._client, self.keys, version, blob, spans, sums, prepare,
                                          fill=None if lazy is None else lazy.fill_to,
                                          segments=None if direct is None else direct.views,
                                          one_trip=not self.config.replicas_to_wait, held=self._held)  # fmt: skip
        except BusConnectionError:
            if not prepared:
                self._discard_chunks(version, len(spans))
                raise
            # The commit may have run before the connection broke: keep the chunks (GC's orphan
            # sweep fades them if the version was never committed) rather than gut a committed version.
            self._last_version = max(self._last_version, version)
            raise
        except RedisBusError:
            self._discard_chunks(version, len(spans))
            raise
        created = prepared[0].created
        self._last_version = max(self._last_version, version)
        self._chunk_counts[version] = len(spans)
        if committed.latest != version:
            log.warning("version %d committed but latest is %d: another publisher shares namespace %r",
                        version, committed.latest, self.keys.namespace)
        try:
            report = self._client.pipeline(transaction=False)  # goes out with GC's evictions: one round trip
            report_publisher(
                report,
                self.keys,
                PublisherReport(self.publisher_id, version, created, self._identity["host"], self._identity["pid"]),
            )
            kept = collect(
                self._client,
                self.keys,
                keep=self.config.keep_versions,
                grace_seconds=self.config.grace_seconds,
                pending_timeout=self.config.pending_timeout_seconds,
                scan_orphans=False,
                chunk_counts=self._chunk_counts,
                first=report,
                head=(committed.index, committed.latest, committed.pin),
            ).kept
            self._chunk_counts = {v: n for v, n in self._chunk_counts.items() if v in kept}
        except RedisBusError as exc:  # the version is committed: a failed report or GC must not say otherwise
            log.warning("version %d committed, but reporting or garbage collection failed: %s", version, exc)
        log.debug("published version %d (%d bytes, %d chunks)", version, total, len(spans))
        return version

    def _manifest(
        self,
        version: int,
        total: int,
        chunk_size: int,
        checksums: tuple[int, ...],
        entries: list[Any],
        metadata: dict[str, Any],
        blob: memoryview | None,
    ) -> tuple[Manifest, bytes, bytes]:
        """The version's manifest, its encoding and its notice; with replicas to wait for, once they have the chunks."""
        manifest = Manifest(
            version=version,
            total_bytes=total,
            chunk_size=chunk_size,
            chunk_checksums=checksums,
            tensors=tuple(entries),
            created=time.time(),
            publisher=self._identity,
            metadata=metadata,
        )
        if self.config.signing_key:
            manifest = sign_manifest(manifest, blob, self.config.signing_key)
        data = encode_manifest(manifest)
        notice = encode_notice(notice_for(manifest, data))
        if self.config.replicas_to_wait:
            self._wait_for_replicas(version, data)
        return manifest, data, notice

    def _wait_for_replicas(self, version: int, manifest: bytes) -> None:
        """Make the replicas hold the chunks and the manifest before the commit announces the version."""
        wanted, timeout = self.config.replicas_to_wait, self.config.wait_timeout
        acked = stage_manifest_and_wait(
            self._client, self.keys, version, manifest, wanted, timeout, self.config.pending_timeout_seconds
        )
        if acked < wanted:
            log.warning("version %d reached %d of %d replicas within %.1fs; committing anyway "
                        "(workers whose replica lags pull from the primary)", version, acked, wanted, timeout)  # fmt: skip

    def _discard_chunks(self, version: int, count: int) -> None:
        try:
            pipe = self._client.pipeline(transaction=False)
            if self.config.replicas_to_wait:
                pipe.delete(self.keys.manifest(version))  # staged before the commit
            for index in range(count):
                pipe.delete(self.keys.chunk(version, index))
            pipe.execute()
        except Exception:  # Redis may be gone; GC's orphan scan fades them later
            log.debug("could not discard the chunks of failed version %d", version, exc_info=True)

    def close(self) -> None:
        """Finish a pending upload, then release the buffer and the connection."""
        if self._closed:
            return
        self._closed = True
        if self._uploader is not None:
            self._uploader.shutdown(wait=True)
        self._snapshot.release()
        self._held.close()
        if self._owns_client:
            with translate_errors("closing the publisher", self._client):
                self._client.close()


class _Layout:
    """Where one set of tensors lies in the blob, and (once they come again) their bytes as a :class:`TensorBlob`.

    A trainer publishes the same parameters again and again, and for a small
    policy working out the layout and the tensors' byte views costs more than
    sending them. The layout is reused while a publish names the same tensors
    (the same objects, keys, addresses, shapes, dtypes and contiguity). It
    holds them only weakly until they come a second time: a caller that
    publishes fresh copies each time gets no copy kept alive in between.
    """

    __slots__ = ("keys", "refs", "marks", "entries", "total", "repeated", "_blob")

    def __init__(self, leaves: list[tuple[TensorKey, torch.Tensor]]) -> None:
        self.keys = [key for key, _ in leaves]
        self.refs = [weakref.ref(t) for _, t in leaves]
        self.marks = [_mark(t) for _, t in leaves]
        self.entries, self.total = plan_layout((key, t.dtype, t.shape) for key, t in leaves)
        self.repeated = False
        self._blob: TensorBlob | None = None

    def fits(self, leaves: list[tuple[TensorKey, torch.Tensor]]) -> bool:
        """Whether ``leaves`` are the tensors this layout was made for, where they were (then it is kept)."""
        if len(leaves) != len(self.refs):
            return False
        for (key, tensor), known_key, ref, mark in zip(leaves, self.keys, self.refs, self.marks):
            if ref() is not tensor or key != known_key or _mark(tensor) != mark:
                return False
        self.repeated = True
        return True

    def blob(self, tensors: list[torch.Tensor]) -> TensorBlob | None:
        """The tensors' bytes, read from their memory (None where :meth:`TensorBlob.supports` says no)."""
        if self._blob is not None:
            return self._blob
        blob = TensorBlob(self.entries, tensors) if TensorBlob.supports(tensors) else None
        if self.repeated:
            self._blob = blob  # holds the tensors: only once they proved long-lived
        return blob


def _mark(tensor: torch.Tensor) -> tuple[int, torch.Size, torch.dtype, bool]:
    return tensor.data_ptr(), tensor.shape, tensor.dtype, tensor.is_contiguous()
