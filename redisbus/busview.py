"""Read-only operator access to a namespace: list, inspect, verify, compare versions; see workers; watch.

:class:`BusView` only reads (and subscribes to the notify channel, to
watch); :class:`redisbus.ops.BusAdmin` adds what changes the namespace.
Versions are pulled into a host buffer, checked chunk by chunk, and read as
typed views of that buffer; nothing is applied to a model.

>>> with BusView("redis://10.0.0.5:6379/0", namespace="ppo") as view:  # doctest: +SKIP
...     [w.worker_id for w in view.workers() if w.state == "lagging"]
['rollout-3']
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import defaults
from .buffers import HostBuffer
from .errors import ManifestError, VersionNotFoundError
from .progress import NoProgress, Progress
from .records import (
    ChunkProblem,
    DiffResult,
    Inspection,
    PublisherStatus,
    Status,
    TensorRow,
    VerifyResult,
    VersionInfo,
    WorkerStatus,
)
from .registry import list_publishers, list_workers
from .tensorstats import diff_versions, tensor_stats
from .transport import RedisSource, read_head, read_manifest, resolve, translate_errors
from .verification import check_version, pull_version
from .watching import follow
from .wire import Manifest, format_key

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["BusView"]


class BusView:
    """Read-only operator access to one namespace of the bus: list, inspect, verify, compare, watch.

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
        return f"{type(self).__name__}({self.config.redacted_url()!r}, namespace={self.namespace!r})"

    def __enter__(self) -> Self:
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
        scratch, signing_key = HostBuffer(), self.config.signing_key
        try:
            for result in results:
                manifest = manifests.get(result.version)
                if manifest is not None:
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
        """Every worker that reported: applied version, lag behind ``latest`` (negative: ahead of it), heartbeat age, dead or alive."""
        reports = list_workers(self.client, self.keys)
        latest, pin = self.head()
        return [WorkerStatus.from_report(r, latest, pin, dead_after, now or time.time()) for r in reports]

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
            workers_ahead=sum(w.state == "ahead" for w in workers),
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

        The notify channel wakes it up (subscribed with ``SSUBSCRIBE`` on a
        Redis 7 cluster, where notices travel by ``SPUBLISH``); ``latest`` and the worker reports are
        also polled every ``poll_interval`` seconds, so a lost notice only
        delays an event. The starting point (latest, pin, worker reports) and
        the subscription are taken when ``watch`` is called, not at the first
        ``next()``, so nothing that happens in between is missed.
        """
        return follow(self, poll_interval=poll_interval, dead_after=dead_after, timeout=timeout, clock=clock)
