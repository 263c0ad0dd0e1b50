"""Operator API: inspect, verify, diff, roll back, pin, garbage-collect, export and import versions.

This is the library behind the ``redisbus`` command line; everything the CLI
shows comes from here, so scripts can do the same without parsing text.

>>> with BusAdmin("redis://10.0.0.5:6379/0", namespace="ppo") as admin:  # doctest: +SKIP
...     [v.version for v in admin.list_versions()]
[5, 6, 7]
>>> admin.verify([7])[0].ok  # doctest: +SKIP
True

:class:`BusAdmin` reads like :class:`~redisbus.busview.BusView` (listing,
inspecting, verifying, diffing, workers, watching) and adds what changes the
namespace. Nothing here applies weights to a model.

Pinning: :meth:`BusAdmin.pin` stores a version ``V`` under the namespace's
pin key. Workers never apply a version newer than ``V`` while the pin is set
(they apply ``min(latest, V)``); workers already past ``V`` stay where they
are, since a worker never moves backwards. To send workers back to old
weights, :meth:`BusAdmin.rollback` republishes them as a new version. A
pinned version is never garbage-collected. :meth:`BusAdmin.unpin` removes the
pin and re-announces ``latest`` so workers move on at once.

What the methods return is in :mod:`redisbus.records`; file reading and
writing in :mod:`redisbus.weightfiles`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tensordict import TensorDict

from . import defaults
from .busview import BusView
from .errors import (
    ConfigError,
    ManifestError,
    SchemaMismatchError,
    VersionNotFoundError,
)
from .progress import NoProgress, Progress
from .records import ExportResult, PinResult, PublishResult, json_ready
from .retention import GcReport, collect
from .transport import publish_notice, read_manifest
from .weightfiles import FileFormatError, read_weights_file, write_safetensors
from .wire import encode_notice, notice_for

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


class BusAdmin(BusView):
    """Operator access to one namespace of the bus: everything :class:`~redisbus.busview.BusView` reads, and changes.

    Takes the same arguments as :class:`~redisbus.busview.BusView` (a URL, a
    :class:`~redisbus.BusConfig` or a client; ``namespace``; settings) and
    raises the same errors; the pin, rollback, import, export and garbage
    collection are documented on each method.

    >>> with BusAdmin("redis://10.0.0.5:6379/0", namespace="ppo", socket_timeout=5) as admin:  # doctest: +SKIP
    ...     admin.pin(7).workers_ahead
    ['rollout-3']
    """

    def prune_workers(self, dead_after: float = defaults.DEAD_AFTER_SECONDS) -> list[str]:
        """Forget the reports of dead workers; returns their ids (a live worker re-reports on its next heartbeat)."""
        dead = [w.worker_id for w in self.workers(dead_after) if w.dead]
        if dead:
            with self._redis("pruning dead workers"):
                self.client.hdel(self.keys.workers, *dead)
        return dead

    def _publisher(self, chunk_size: int | None = None) -> Any:
        """A publisher on this admin's connection and with this admin's settings, that never garbage-collects.

        Every setting (``wait_replicas``, ``wait_timeout``, ``replicas``,
        ``signing_key``, ...) is this admin's, whatever ``REDISBUS_URL`` says:
        the publisher is handed the admin's client, and for a client it would
        otherwise take its settings from the environment. Only the chunk size
        (the rolled-back version's) and ``keep_versions`` (``gc`` collects,
        not ``rollback`` / ``import``) differ.
        """
        from .publisher import WeightPublisher

        settings = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config) if f.init}
        settings.update(chunk_size=max(1024, chunk_size or self.config.chunk_size), keep_versions=_NO_GC_KEEP)
        publisher = WeightPublisher(
            self.client,
            publisher_id=f"redisbus-cli@{socket.gethostname()}",  # one report per host, not per run
            **settings,
        )
        expected = self.config.with_options(chunk_size=settings["chunk_size"], keep_versions=_NO_GC_KEEP)
        if publisher.config != expected:  # every field was given, so nothing can come from the environment
            publisher.close()
            raise ConfigError("the publisher of rollback / import did not take the admin's settings")  # pragma: no cover
        return publisher

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
        publish_notice(self.client, self.keys, encode_notice(notice_for(manifest, data)))

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
