"""Operator API: inspect, verify, diff, roll back, pin, garbage-collect, export and import versions.

This is the library behind the ``redisbus`` command line; everything the CLI
shows comes from here, so scripts can do the same without parsing text.

>>> with BusAdmin("redis://10.0.0.5:6379/0", namespace="ppo") as admin:  # doctest: +SKIP
...     [v.version for v in admin.list_versions()]
[5, 6, 7]
>>> admin.verify([7])[0].ok  # doctest: +SKIP
True

Nothing here applies weights to a model: versions are pulled into a host
buffer, checked chunk by chunk, and read as typed views of that buffer.

Pinning: :meth:`BusAdmin.pin` stores a version ``V`` under the namespace's
pin key. Workers never apply a version newer than ``V`` while the pin is set
(they apply ``min(latest, V)``); workers already past ``V`` stay where they
are, since a worker never moves backwards. To send workers back to old
weights, :meth:`BusAdmin.rollback` republishes them as a new version. A
pinned version is never garbage-collected. :meth:`BusAdmin.unpin` removes the
pin and re-announces ``latest`` so workers move on at once.

What the methods return is in :mod:`redisbus.records`; file reading and
writing in :mod:`redisbus.weightfiles`; tensor statistics and diffs in
:mod:`redisbus.tensorstats`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tensordict import TensorDict

from . import defaults
from .buffers import HostBuffer
from .errors import (
    ConfigError,
    ManifestError,
    SchemaMismatchError,
    VersionNotFoundError,
)
from .progress import NoProgress, Progress
from .records import (
    ChunkProblem,
    DiffResult,
    ExportResult,
    Inspection,
    PinResult,
    PublisherStatus,
    PublishResult,
    Status,
    TensorRow,
    VerifyResult,
    VersionInfo,
    WorkerStatus,
    json_ready,
)
from .registry import list_publishers, list_workers
from .retention import GcReport, collect
from .tensorstats import diff_versions, tensor_stats
from .transport import (
    RedisSource,
    publish_notice,
    read_head,
    read_manifest,
    resolve,
    translate_errors,
)
from .verification import check_version, pull_version
from .watching import follow
from .weightfiles import FileFormatError, read_weights_file, write_safetensors
from .wire import Manifest, Notice, encode_notice, format_key, manifest_digest

__all__ = ["BusAdmin", "parse_metadata"]

#: The ops publisher never garbage-collects as a side effect of rollback/import; ``gc`` does that.
_NO_GC_KEEP = 1 << 31


def parse_metadata(values: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Metadata from ``KEY=VALUE`` strings (each VALUE parsed as JSON when it is JSON), or a mapping as is.

    Raises:
        ConfigError: an item without ``=`` or without a key.

    >>> parse_metadata(["step=7", "note=warm start"])
    {'step': 7, 'note': 'warm start'}
    """
    if values is None:
        return {}
    if isinstance(values, Mapping):
        return dict(values)
    out: dict[str, Any] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"metadata {item!r} is not KEY=VALUE")
        try:
            out[name] = json.loads(raw)
        except ValueError:
            out[name] = raw
    return out


class BusAdmin:
    """Operator access to one namespace of the bus.

    Args:
        redis: a ``redis://`` / ``rediss://`` / ``unix://`` URL, a
            :class:`~redisbus.BusConfig`, a ``redis.Redis`` client, or None to
            read ``REDISBUS_URL``.
        namespace: the namespace (default ``REDISBUS_NAMESPACE`` or ``default``).
        **settings: any other :class:`~redisbus.BusConfig` field
            (``socket_timeout``, ``signing_key``, ...).

    Every method raises :class:`~redisbus.BusConnectionError` when Redis is
    unreachable or refuses the credentials, and
    :class:`~redisbus.VersionNotFoundError` for a version that is not there.
    """

    def __init__(self, redis: RedisSource = None, *, namespace: str | None = None, **settings: Any) -> None:
        self.config, self.client, self._owns_client = resolve(redis, namespace, settings)
        self.keys = self.config.keys
        self.namespace = self.keys.namespace

    def __repr__(self) -> str:
        return f"BusAdmin({self.config.redacted_url()!r}, namespace={self.namespace!r})"

    def __enter__(self) -> BusAdmin:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (when this object opened it)."""
        if self._owns_client:
            with contextlib.suppress(Exception):  # closing a dead connection has nothing left to report
                self.client.close()

    def _redis(self, what: str) -> Any:
        return translate_errors(what, self.client)

    def where(self) -> str:
        """``namespace 'x' at redis://host:port/db`` (never with the password)."""
        return f"namespace {self.namespace!r} at {self.config.redacted_url()}"

    # -- reading --------------------------------------------------------------------------

    def head(self) -> tuple[int | None, int | None]:
        """``(latest, pin)``."""
        return read_head(self.client, self.keys)

    def committed(self) -> list[int]:
        """Every committed version still in the version index, oldest first."""
        with self._redis("listing versions"):
            return [int(v) for v in self.client.zrange(self.keys.versions, 0, -1)]

    def resolve_version(self, version: int | None) -> int:
        """``version``, or ``latest`` when None.

        Raises:
            VersionNotFoundError: the namespace has no versions.
        """
        if version is not None:
            return int(version)
        latest, _ = self.head()
        if latest is None:
            raise VersionNotFoundError(f"no versions in {self.where()}")
        return latest

    def manifest(self, version: int | None = None) -> Manifest:
        """The validated manifest of ``version`` (default ``latest``).

        Raises:
            VersionNotFoundError: no such version (the message lists those there are).
            ManifestError: the manifest is invalid.
        """
        version = self.resolve_version(version)
        try:
            return read_manifest(self.client, self.keys, version, self.config)[0]
        except VersionNotFoundError:
            committed = self.committed()
            if not committed:
                raise VersionNotFoundError(f"no versions in {self.where()}") from None
            shown = ", ".join(map(str, committed[-10:]))
            more = f" (and {len(committed) - 10} older)" if len(committed) > 10 else ""
            raise VersionNotFoundError(
                f"version {version} not found in {self.where()}; versions there: {shown}{more}"
            ) from None

    def _manifest_or_error(self, version: int) -> Manifest | str:
        """``version``'s manifest, or why it cannot be read (missing or invalid)."""
        try:
            return read_manifest(self.client, self.keys, version, self.config)[0]
        except (ManifestError, VersionNotFoundError) as exc:
            return str(exc)

    def pull(self, version: int | None = None, progress: Progress | None = None, what: str = "pulling") -> tuple[Manifest, HostBuffer]:
        """Fetch a version into a host buffer and verify every chunk (and the signature, with a key).

        Returns:
            The manifest and the buffer; ``buffer.view(entry)`` is a tensor.

        Raises:
            VersionNotFoundError: no such version.
            CorruptBlobError: a chunk is missing, has the wrong size or fails its checksum.
            SignatureError: a signing key is configured and the version does not verify.
        """
        manifest = self.manifest(version)
        buffer = pull_version(
            self.client, self.keys, manifest, signing_key=self.config.signing_key, progress=progress or NoProgress(), what=what
        )
        return manifest, buffer

    # -- listing --------------------------------------------------------------------------

    def list_versions(self) -> list[VersionInfo]:
        """Every committed version still in Redis, oldest first, with whether its chunks are all there.

        Raises:
            VersionNotFoundError: the namespace has no versions.
        """
        committed = self.committed()
        latest, pin = self.head()
        if not committed:
            raise VersionNotFoundError(f"no versions in {self.where()}")
        manifests = {version: self._manifest_or_error(version) for version in committed}
        with self._redis("checking chunks"):
            pipe = self.client.pipeline(transaction=False)
            for version in committed:
                pipe.pttl(self.keys.manifest(version))
                m = manifests[version]
                if isinstance(m, Manifest):
                    for i in range(m.chunk_count):
                        pipe.strlen(self.keys.chunk(version, i))
            replies = iter(pipe.execute())
        out = []
        for version in committed:
            ttl = next(replies)
            m = manifests[version]
            expires = ttl / 1000 if isinstance(ttl, int) and ttl >= 0 else None
            if isinstance(m, str):
                out.append(VersionInfo(version, None, {}, 0, 0, 0, 0, version == latest, version == pin, {}, expires_in=expires, error=m))
                continue
            present = sum(1 for (a, b) in m.spans() if next(replies) == b - a)
            out.append(
                VersionInfo(
                    version=version,
                    created=m.created,
                    publisher=dict(m.publisher),
                    total_bytes=m.total_bytes,
                    tensor_count=len(m.tensors),
                    chunk_count=m.chunk_count,
                    chunks_present=present,
                    latest=version == latest,
                    pinned=version == pin,
                    metadata=dict(m.metadata),
                    signed=m.signature is not None,
                    expires_in=expires,
                )
            )
        return out

    def inspect(self, version: int | None = None, *, stats: bool = False, progress: Progress | None = None) -> Inspection:
        """A version's manifest; with ``stats``, per-tensor statistics of its pulled (and verified) bytes."""
        if stats:
            manifest, buffer = self.pull(version, progress, what="reading")
        else:
            manifest, buffer = self.manifest(version), None
        latest, pin = self.head()
        rows = []
        for entry in manifest.tensors:
            rows.append(
                TensorRow(
                    key=format_key(entry.key),
                    path=list(entry.key),
                    dtype=entry.dtype,
                    shape=list(entry.shape),
                    nbytes=entry.nbytes,
                    offset=entry.offset,
                    stats=tensor_stats(buffer.view(entry)) if buffer is not None else None,
                )
            )
        if buffer is not None:
            buffer.release()
        return Inspection(
            version=manifest.version,
            latest=latest,
            pin=pin,
            created=manifest.created,
            publisher=dict(manifest.publisher),
            metadata=dict(manifest.metadata),
            total_bytes=manifest.total_bytes,
            chunk_size=manifest.chunk_size,
            chunk_count=manifest.chunk_count,
            signed=manifest.signature is not None,
            tensors=rows,
        )

    # -- verifying ------------------------------------------------------------------------

    def verify(self, versions: Sequence[int] | None = None, progress: Progress | None = None) -> list[VerifyResult]:
        """Re-read every chunk of each version and check it against its manifest.

        Args:
            versions: the versions to check; None checks every committed one
                and also that ``latest`` and the pin name committed versions.
            progress: receives the bytes read.

        Returns:
            One result per version; ``result.ok`` is False and
            ``result.problems`` names each bad chunk (missing, wrong size,
            checksum mismatch, signed digest mismatch) or manifest problem.

        Raises:
            VersionNotFoundError: ``versions`` is None and the namespace has no versions.
        """
        progress = progress or NoProgress()
        check_head = versions is None
        if versions is None:
            versions = self.committed()
            if not versions:
                raise VersionNotFoundError(f"no versions in {self.where()}")
        committed = set(self.committed()) if not check_head else set(versions)
        manifests: dict[int, Manifest] = {}
        results: list[VerifyResult] = []
        for version in versions:
            result = VerifyResult(version)
            key = self.keys.manifest(version)
            try:
                manifests[version] = read_manifest(self.client, self.keys, version, self.config)[0]
            except VersionNotFoundError:
                if version not in committed:
                    self.manifest(version)  # not a committed version at all: raises, listing those there are
                result.problems.append(ChunkProblem(None, key, "manifest is missing"))
            except ManifestError as exc:
                result.problems.append(ChunkProblem(None, key, f"manifest is invalid: {exc}"))
            results.append(result)
        if check_head:
            latest, pin = self.head()
            for name, value in (("latest", latest), ("pin", pin)):
                if value is not None and value not in committed:
                    problem = ChunkProblem(None, getattr(self.keys, name), f"{name} names version {value}, which is not committed")
                    results.append(VerifyResult(value, problems=[problem]))
        progress.start("verifying", sum(m.total_bytes for m in manifests.values()))
        scratch = HostBuffer()
        try:
            for result in results:
                manifest = manifests.get(result.version)
                if manifest is not None:
                    signing_key = self.config.signing_key
                    check_version(self.client, self.keys, manifest, result, signing_key=signing_key, scratch=scratch, progress=progress)
        finally:
            scratch.release()
        return results

    def diff(self, old: int | None, new: int | None, progress: Progress | None = None) -> DiffResult:
        """Compare two versions tensor by tensor (both pulled and verified first)."""
        old_m, old_buf = self.pull(old, progress, what="reading")
        try:
            new_m, new_buf = self.pull(new, progress, what="reading")
            try:
                return diff_versions(old_m, old_buf, new_m, new_buf)
            finally:
                new_buf.release()
        finally:
            old_buf.release()

    # -- who is on the bus ----------------------------------------------------------------

    def workers(self, dead_after: float = defaults.DEAD_AFTER_SECONDS, now: float | None = None) -> list[WorkerStatus]:
        """Every worker that reported: applied version, lag behind ``latest``, heartbeat age, dead or alive."""
        reports = list_workers(self.client, self.keys)
        latest, pin = self.head()
        return [WorkerStatus.from_report(r, latest, pin, dead_after, now or time.time()) for r in reports]

    def prune_workers(self, dead_after: float = defaults.DEAD_AFTER_SECONDS) -> list[str]:
        """Forget the reports of dead workers; returns their ids (a live worker re-reports on its next heartbeat)."""
        dead = [w.worker_id for w in self.workers(dead_after) if w.dead]
        if dead:
            with self._redis("pruning dead workers"):
                self.client.hdel(self.keys.workers, *dead)
        return dead

    def publishers(self) -> list[PublisherStatus]:
        """Every publisher that reported, newest first."""
        now = time.time()
        return [PublisherStatus.from_report(p, now) for p in list_publishers(self.client, self.keys)]

    def exists(self) -> bool:
        """Whether anything of this namespace is in Redis (versions, workers or publishers)."""
        with self._redis("looking up the namespace"):
            return bool(self.client.exists(self.keys.seq, self.keys.latest, self.keys.workers, self.keys.publishers))

    def status(self, dead_after: float = defaults.DEAD_AFTER_SECONDS) -> Status:
        """One-glance summary: latest, pin, versions kept, workers by state, publishers.

        Raises:
            VersionNotFoundError: nothing of this namespace is in Redis (a typo?).
        """
        if not self.exists():
            raise VersionNotFoundError(f"nothing found for {self.where()}")
        latest, pin = self.head()
        committed = self.committed()
        manifests = [self._manifest_or_error(version) for version in committed]
        workers = self.workers(dead_after)
        return Status(
            namespace=self.namespace,
            url=self.config.redacted_url(),
            latest=latest,
            pin=pin,
            versions=committed,
            stored_bytes=sum(m.total_bytes for m in manifests if isinstance(m, Manifest)),
            workers=len(workers),
            workers_current=sum(w.state == "current" for w in workers),
            workers_lagging=sum(w.state in ("lagging", "pinned", "waiting") for w in workers),
            workers_dead=sum(w.dead for w in workers),
            publishers=self.publishers(),
        )

    # -- changing -------------------------------------------------------------------------

    def _publisher(self, chunk_size: int | None = None) -> Any:
        """A publisher on this admin's connection that never garbage-collects (``gc`` does that)."""
        from .publisher import WeightPublisher

        return WeightPublisher(
            self.client,
            namespace=self.namespace,
            publisher_id=f"redisbus-cli@{socket.gethostname()}",  # one report per host, not per run
            chunk_size=max(1024, chunk_size or self.config.chunk_size),
            keep_versions=_NO_GC_KEEP,
            signing_key=self.config.signing_key,
            socket_timeout=self.config.socket_timeout,
        )

    def rollback(self, version: int | None, progress: Progress | None = None, metadata: Mapping[str, Any] | None = None) -> PublishResult:
        """Republish version ``version``'s weights, bit for bit, as a new (higher) version.

        Versions only move forward, so workers apply the rollback like any
        other version. Its metadata is ``{"rollback_of": version}`` (plus
        ``metadata``). The old version is pulled and verified first; a corrupt
        one is refused. This never garbage-collects.

        Raises:
            VersionNotFoundError: no such version.
            CorruptBlobError: the old version's chunks do not verify.
            PublishError: the new version could not be committed.
        """
        manifest, buffer = self.pull(version, progress, what="reading")
        try:
            weights = TensorDict({}, batch_size=[])
            for entry in manifest.tensors:
                weights.set(entry.key, buffer.view(entry))
            meta = {"rollback_of": manifest.version, **dict(metadata or {})}
            with self._publisher(chunk_size=manifest.chunk_size) as publisher:
                new_version = publisher.publish(weights, metadata=meta)
        finally:
            buffer.release()
        return PublishResult(
            int(new_version), manifest.total_bytes, len(manifest.tensors), meta, self.head()[1], f"version {manifest.version}"
        )

    def import_file(
        self,
        path: str | os.PathLike[str],
        *,
        select: str | None = None,
        metadata: Mapping[str, Any] | Iterable[str] | None = None,
    ) -> PublishResult:
        """Publish the tensors of a ``.safetensors`` file or a PyTorch / TorchRL state dict as a new version.

        See :func:`~redisbus.weightfiles.read_weights_file` for what is read
        and how safely. Dotted names become nested keys (``0.weight`` ->
        ``("0", "weight")``), as for a state dict published by the trainer.
        Metadata is ``{"imported_from": <file name>}`` plus ``metadata``.

        Raises:
            FileFormatError: the file is unreadable or refused, or its tensors cannot be published.
        """
        tensors = read_weights_file(path, select)
        meta = {"imported_from": Path(path).name, **parse_metadata(metadata)}
        with self._publisher() as publisher:
            try:
                version = publisher.publish(tensors, metadata=meta)
            except (SchemaMismatchError, ManifestError) as exc:  # the file's tensors, not the bus, are at fault
                raise FileFormatError(f"cannot publish {Path(path).name}: {exc}") from exc
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return PublishResult(int(version), nbytes, len(tensors), meta, self.head()[1], str(path))

    def export(self, version: int | None, path: str | os.PathLike[str], progress: Progress | None = None) -> ExportResult:
        """Write a version's tensors to a ``.safetensors`` file (verified first; written atomically).

        Tensor names are the key parts joined with ``.``; the file's metadata
        carries ``redisbus.version``, ``redisbus.namespace`` and the version's
        user metadata as JSON (``redisbus.metadata``).

        Raises:
            FileFormatError: a dtype safetensors cannot store (complex128), or
                two keys that collide once joined; the file cannot be written.
        """
        progress = progress or NoProgress()
        manifest, buffer = self.pull(version, progress, what="reading")
        try:
            file_meta = {
                "format": "pt",
                "redisbus.version": str(manifest.version),
                "redisbus.namespace": self.namespace,
                "redisbus.created": f"{manifest.created:.3f}",
                "redisbus.metadata": json.dumps(json_ready(dict(manifest.metadata)), sort_keys=True),
            }
            target = write_safetensors(path, manifest, buffer.memoryview(), file_meta, progress)
        finally:
            buffer.release()
        return ExportResult(manifest.version, str(target), len(manifest.tensors), manifest.total_bytes, target.stat().st_size)

    def pin(self, version: int | None = None) -> PinResult:
        """Hold workers at ``version`` (default: ``latest``): none applies anything newer until :meth:`unpin`.

        Workers already past ``version`` stay where they are (listed in
        ``workers_ahead``); use :meth:`rollback` to move them back. The pinned
        version is never garbage-collected.

        Raises:
            VersionNotFoundError: ``version`` is not a committed version.
        """
        version = self.resolve_version(version)
        if version not in self.committed():
            self.manifest(version)  # raises with the list of versions when there is no such version
            raise VersionNotFoundError(f"version {version} is no longer in the version index of {self.where()}")
        latest, previous = self.head()
        with self._redis("setting the pin"):
            self.client.set(self.keys.pin, version)
        ahead = [w.worker_id for w in self.workers() if w.version is not None and w.version > version and not w.dead]
        return PinResult(version, previous, latest, ahead)

    def unpin(self) -> PinResult:
        """Remove the pin and re-announce ``latest`` so workers move on right away."""
        latest, previous = self.head()
        with self._redis("removing the pin"):
            self.client.delete(self.keys.pin)
        if previous is not None and latest is not None:
            self._announce(latest)
        return PinResult(None, previous, latest)

    def _announce(self, version: int) -> None:
        """Send ``version``'s notice again (by ``SPUBLISH`` on a Redis 7 cluster, where workers listen sharded)."""
        try:
            manifest, data = read_manifest(self.client, self.keys, version, self.config)
        except (ManifestError, VersionNotFoundError):
            return  # workers still poll latest; the notice is only a hint
        publish_notice(self.client, self.keys, encode_notice(Notice(version, manifest.total_bytes, manifest_digest(data))))

    def gc(
        self,
        keep: int | None = None,
        *,
        dry_run: bool = False,
        grace_seconds: float | None = None,
        pending_timeout: float | None = None,
    ) -> GcReport:
        """Evict all but the newest ``keep`` versions and fade orphan chunks of crashed publishers.

        ``latest`` and the pinned version are never evicted. Evicted keys get
        a grace expiry (default the settings' ``grace_seconds``) so a worker
        mid-pull can finish; ``grace_seconds=0`` deletes at once.

        Raises:
            ConfigError: ``keep`` below 1.
        """
        keep = self.config.keep_versions if keep is None else keep
        if keep < 1:
            raise ConfigError(f"--keep must be at least 1, got {keep}")
        return collect(
            self.client,
            self.keys,
            keep=keep,
            grace_seconds=self.config.grace_seconds if grace_seconds is None else grace_seconds,
            pending_timeout=self.config.pending_timeout_seconds if pending_timeout is None else pending_timeout,
            scan_orphans=True,
            dry_run=dry_run,
        )

    # -- following ------------------------------------------------------------------------

    def watch(
        self,
        *,
        poll_interval: float = 0.5,
        dead_after: float = defaults.DEAD_AFTER_SECONDS,
        timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Iterator[dict[str, Any]]:
        """Follow the namespace live; yield one event per change, until ``timeout`` (or forever).

        Events (dicts with ``event`` and ``time``):

        * ``version``: a version was committed (``version``, ``total_bytes``,
          ``tensors``, ``publisher``, ``metadata``);
        * ``applied``: a worker applied another version (``worker``,
          ``version``, ``previous``, ``lag``);
        * ``joined``: a worker reported for the first time, nothing applied yet;
        * ``dead`` / ``alive``: a worker's heartbeat went stale / came back;
        * ``pin``: the pin was set, changed or removed (``version``, ``previous``).

        The notify channel wakes it up; ``latest`` and the worker reports are
        also polled every ``poll_interval`` seconds, so a lost notice only
        delays an event. The starting point (latest, pin, worker reports) and
        the subscription are taken when ``watch`` is called, not at the first
        ``next()``, so nothing that happens in between is missed.
        """
        return follow(self, poll_interval=poll_interval, dead_after=dead_after, timeout=timeout, clock=clock)
