"""Reading stored versions back and checking them, for operators: whole, or naming every bad chunk.

:func:`pull_version` fetches a version into a host buffer and stops at the
first bad chunk, as a worker would. :func:`check_version` names them all:
it sizes every chunk with one pipeline of ``STRLEN``, then reads the
well-sized ones in batches of :data:`READ_BATCH_BYTES` into a scratch buffer
and checks each against its checksum and, when the signature verified, its
signed digest.

>>> buffer = pull_version(client, keys, manifest, signing_key=None, progress=NoProgress())  # doctest: +SKIP
>>> result = VerifyResult(7)  # doctest: +SKIP
>>> check_version(client, keys, manifest, result, signing_key=None, scratch=HostBuffer(), progress=NoProgress())  # doctest: +SKIP
>>> result.bad_chunks  # doctest: +SKIP
[3]
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

from .buffers import HostBuffer
from .errors import (
    CorruptBlobError,
    RedisBusError,
    SignatureError,
    VersionNotFoundError,
)
from .keys import KeySpace
from .progress import Progress
from .records import ChunkProblem, VerifyResult
from .signing import chunk_digest, verify_chunk_digests, verify_signature
from .transport import read_values_into, translate_errors
from .wire import Manifest, chunk_checksum, verify_chunks

__all__ = ["READ_BATCH_BYTES", "check_version", "pull_version"]

#: Bytes read per batch of chunks (bounds the memory of ``check_version`` and the progress granularity).
READ_BATCH_BYTES = 32 * 1024 * 1024


def _read_chunks(client: Any, keys: KeySpace, version: int, indices: Sequence[int], views: Sequence[memoryview]) -> None:
    with translate_errors(f"reading the chunks of version {version}", client):
        read_values_into(client, [keys.chunk(version, i) for i in indices], views)


def _batches(manifest: Manifest) -> list[list[int]]:
    per = max(1, READ_BATCH_BYTES // max(1, manifest.chunk_size))
    n = manifest.chunk_count
    return [list(range(i, min(i + per, n))) for i in range(0, n, per)]


def pull_version(
    client: Any, keys: KeySpace, manifest: Manifest, *, signing_key: bytes | None, progress: Progress, what: str
) -> HostBuffer:
    """Fetch ``manifest``'s version into a new host buffer, verifying every chunk (and the signature, with a key).

    Args:
        client: a redis-py client.
        keys: the namespace's key names.
        manifest: the version's validated manifest.
        signing_key: with a key, the signature and every chunk's signed digest are checked too.
        progress: receives the bytes read, as ``"<what> v<version>"``.
        what: the verb the progress shows (``pulling``, ``reading``).

    Returns:
        The buffer; ``buffer.view(entry)`` is a tensor. The caller releases it.

    Raises:
        CorruptBlobError: a chunk is missing, has the wrong size or fails its checksum.
        SignatureError: a signing key is given and the version does not verify.
    """
    buffer = HostBuffer()
    buffer.reserve(manifest.total_bytes)
    blob = buffer.memoryview()
    spans = manifest.spans()
    progress.start(f"{what} v{manifest.version}", manifest.total_bytes)
    for batch in _batches(manifest):
        try:
            _read_chunks(client, keys, manifest.version, batch, [blob[spans[i][0] : spans[i][1]] for i in batch])
        except VersionNotFoundError as exc:  # the manifest is there, a chunk is not: data loss, not a typo
            buffer.release()
            raise CorruptBlobError(f"version {manifest.version} is incomplete: {exc}") from exc
        except RedisBusError:
            buffer.release()
            raise
        verify_chunks(manifest, blob, batch)
        progress.advance(sum(spans[i][1] - spans[i][0] for i in batch))
    if signing_key:
        verify_signature(manifest, signing_key)
        verify_chunk_digests(manifest, blob)
    return buffer


def _check_signature(manifest: Manifest, keys: KeySpace, signing_key: bytes | None, result: VerifyResult) -> bool:
    """Record the signature's state in ``result``; True when the chunks' signed digests are to be checked."""
    if manifest.signature is not None:
        if not signing_key:
            result.signature = "not checked"
            return False
        try:
            verify_signature(manifest, signing_key)
        except SignatureError as exc:
            result.signature = "bad"
            result.problems.append(ChunkProblem(None, keys.manifest(manifest.version), str(exc)))
            return False
        result.signature = "ok"
        return True
    if signing_key:
        result.signature = "bad"
        result.problems.append(ChunkProblem(None, keys.manifest(manifest.version), "version is unsigned"))
    return False


def _well_sized_chunks(client: Any, keys: KeySpace, manifest: Manifest, result: VerifyResult, progress: Progress) -> list[int]:
    """The chunks whose stored size is what the manifest says; the others are recorded in ``result``."""
    version = manifest.version
    spans = manifest.spans()
    with translate_errors(f"checking the chunks of version {version}", client):
        pipe = client.pipeline(transaction=False)
        for i in range(len(spans)):
            pipe.strlen(keys.chunk(version, i))
        sizes = pipe.execute()
    readable = []
    for i, ((a, b), size) in enumerate(zip(spans, sizes)):
        key = keys.chunk(version, i)
        if not size:
            result.problems.append(ChunkProblem(i, key, "missing"))
            progress.advance(b - a)
        elif size != b - a:
            result.problems.append(ChunkProblem(i, key, f"holds {size} bytes, the manifest says {b - a}"))
            progress.advance(b - a)
        else:
            readable.append(i)
    return readable


def check_version(
    client: Any,
    keys: KeySpace,
    manifest: Manifest,
    result: VerifyResult,
    *,
    signing_key: bytes | None,
    scratch: HostBuffer,
    progress: Progress,
) -> None:
    """Check the signature and every chunk of ``manifest``'s version, recording each problem in ``result``.

    Args:
        client: a redis-py client.
        keys: the namespace's key names.
        manifest: the version's validated manifest.
        result: filled in: sizes, ``chunks_ok``, ``signature`` and one
            :class:`~redisbus.records.ChunkProblem` per bad chunk (missing,
            wrong size, checksum mismatch, signed digest mismatch), sorted.
        signing_key: with a key, the signature is checked and then every
            chunk against its signed digest; an unsigned version is a problem.
        scratch: reused between versions; holds one batch of chunks.
        progress: receives the bytes checked.

    Raises:
        BusConnectionError: Redis unreachable.
    """
    version = manifest.version
    spans = manifest.spans()
    result.total_bytes, result.chunk_count = manifest.total_bytes, manifest.chunk_count
    digests_wanted = _check_signature(manifest, keys, signing_key, result)
    readable = _well_sized_chunks(client, keys, manifest, result, progress)
    per = max(1, READ_BATCH_BYTES // max(1, manifest.chunk_size))
    for start in range(0, len(readable), per):
        batch = readable[start : start + per]
        sizes = [spans[i][1] - spans[i][0] for i in batch]
        scratch.reserve(sum(sizes))
        whole = scratch.memoryview()
        views, at = [], 0
        for n in sizes:
            views.append(whole[at : at + n])
            at += n
        try:
            _read_chunks(client, keys, version, batch, views)
            got: list[tuple[int, memoryview | Exception]] = list(zip(batch, views))
        except (VersionNotFoundError, CorruptBlobError):  # changed since STRLEN: go one by one to name it
            got = []
            for i, view in zip(batch, views):
                try:
                    _read_chunks(client, keys, version, [i], [view])
                    got.append((i, view))
                except (VersionNotFoundError, CorruptBlobError) as exc:
                    got.append((i, exc))
        for i, view in got:
            key = keys.chunk(version, i)
            if isinstance(view, Exception):
                result.problems.append(ChunkProblem(i, key, str(view)))
                continue
            checksum = chunk_checksum(view)
            if checksum != manifest.chunk_checksums[i]:
                result.problems.append(
                    ChunkProblem(i, key, f"checksum {checksum:016x} != {manifest.chunk_checksums[i]:016x}")
                )
            elif digests_wanted and manifest.chunk_digests is not None and (
                not hmac.compare_digest(chunk_digest(view), manifest.chunk_digests[i])
            ):
                result.problems.append(ChunkProblem(i, key, "differs from its signed digest"))
            else:
                result.chunks_ok += 1
        progress.advance(sum(sizes))
    result.problems.sort(key=lambda p: -1 if p.chunk is None else p.chunk)
