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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tensordict import TensorDict

from . import defaults
from .buffers import HostBuffer
from .errors import (
    ConfigError,
    CorruptBlobError,
    ManifestError,
    RedisBusError,
    SchemaMismatchError,
    SignatureError,
    VersionNotFoundError,
)
from .registry import WorkerReport, list_publishers, list_workers
from .retention import GcReport, collect
from .signing import verify_chunk_digests, verify_signature
from .transport import (
    RedisSource,
    read_head,
    read_manifest,
    read_values_into,
    resolve,
    translate_errors,
)
from .wire import (
    Manifest,
    Notice,
    TensorEntry,
    chunk_checksum,
    encode_notice,
    format_key,
    manifest_digest,
    verify_chunks,
)

__all__ = [
    "SAFETENSORS_DTYPES",
    "BusAdmin",
    "ChunkProblem",
    "DiffResult",
    "ExportResult",
    "FileFormatError",
    "Inspection",
    "PinResult",
    "Progress",
    "PublishResult",
    "PublisherStatus",
    "Status",
    "TensorDiff",
    "TensorStats",
    "VerifyResult",
    "VersionInfo",
    "WorkerStatus",
    "parse_metadata",
    "read_weights_file",
    "tensor_stats",
]

#: Bytes read per batch of chunks (bounds memory of ``verify`` and the progress granularity).
READ_BATCH_BYTES = 32 * 1024 * 1024
#: Elements per slice when computing statistics (bounds the float64 scratch memory).
STATS_SLICE = 1 << 22
#: The ops publisher never garbage-collects as a side effect of rollback/import; ``gc`` does that.
_NO_GC_KEEP = 1 << 31
#: File suffixes read with ``torch.load(weights_only=True)``.
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
#: torch dtype -> safetensors dtype name (complex128 has no safetensors spelling).
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _torch_name, _st_name in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
):
    if hasattr(torch, _torch_name):
        SAFETENSORS_DTYPES[getattr(torch, _torch_name)] = _st_name


class FileFormatError(RedisBusError, ValueError):
    """A file to import or export is unreadable, refused as unsafe, or cannot hold these tensors."""


class Progress(Protocol):
    """Receives progress of a long transfer (the CLI draws a bar from it)."""

    def start(self, description: str, total: int) -> None:
        """A transfer of ``total`` bytes begins."""

    def advance(self, amount: int) -> None:
        """``amount`` more bytes are done."""


class _NoProgress:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass


def _plain(value: Any) -> Any:
    """``value`` with bytes turned to hex and tuples to lists (JSON-ready)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of this record."""
        return _plain(asdict(self))  # type: ignore[call-overload]


# --------------------------------------------------------------------------- records


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
        return not self.problems

    @property
    def bad_chunks(self) -> list[int]:
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
    old: int
    new: int
    tensors: list[TensorDiff]

    def count(self, change: str) -> int:
        return sum(1 for t in self.tensors if t.change == change)

    @property
    def identical(self) -> bool:
        return all(t.change == "unchanged" for t in self.tensors)


@dataclass(frozen=True)
class WorkerStatus(_Record):
    """A worker's last report with its lag and liveness."""

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
    state: str  # "dead", "waiting" (nothing applied yet), "pinned", "lagging", "current"


@dataclass(frozen=True)
class PublisherStatus(_Record):
    publisher_id: str
    host: str
    pid: int
    version: int
    published_at: float
    age: float


@dataclass(frozen=True)
class Status(_Record):
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


@dataclass(frozen=True)
class PinResult(_Record):
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
    version: int
    path: str
    tensor_count: int
    total_bytes: int
    file_bytes: int


# --------------------------------------------------------------------------- statistics


def tensor_stats(tensor: torch.Tensor) -> TensorStats:
    """Min, max, mean and L2 norm over the finite elements, and NaN / Inf counts.

    Works on any allowed dtype (bool and integers as numbers, complex over
    magnitudes), slice by slice in float64, so memory stays bounded.

    >>> s = tensor_stats(torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
    >>> (s.min, s.max, s.mean, s.nan, s.inf)
    (1.0, 3.0, 2.0, 1, 1)
    """
    flat = tensor.reshape(-1)
    if flat.is_complex():
        flat = flat.abs()
    n = flat.numel()
    lo, hi, total, squares, finite, nans, infs = math.inf, -math.inf, 0.0, 0.0, 0, 0, 0
    for start in range(0, n, STATS_SLICE):
        x = flat[start : start + STATS_SLICE].to(torch.float64)
        ok = torch.isfinite(x)
        nan_count = int(torch.isnan(x).sum())
        good = x[ok]
        nans += nan_count
        infs += x.numel() - good.numel() - nan_count
        if good.numel():
            finite += good.numel()
            lo = min(lo, float(good.min()))
            hi = max(hi, float(good.max()))
            total += float(good.sum())
            squares += float((good * good).sum())
    return TensorStats(
        numel=n,
        finite=finite,
        nan=nans,
        inf=infs,
        min=lo if finite else None,
        max=hi if finite else None,
        mean=total / finite if finite else None,
        norm=math.sqrt(squares),
    )


def _tensor_diff(key: str, old: TensorEntry, new: TensorEntry, a: torch.Tensor, b: torch.Tensor) -> TensorDiff:
    base = {"key": key, "old_dtype": old.dtype, "new_dtype": new.dtype, "old_shape": list(old.shape), "new_shape": list(new.shape)}
    if old.dtype != new.dtype:
        return TensorDiff(change="dtype", **base)
    if old.shape != new.shape:
        return TensorDiff(change="shape", **base)
    if torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
        return TensorDiff(change="unchanged", elements_changed=0, max_abs=0.0, rel_l2=0.0, **base)
    fa, fb = a.reshape(-1), b.reshape(-1)
    changed, max_abs, diff_sq, base_sq = 0, 0.0, 0.0, 0.0
    for start in range(0, fa.numel(), STATS_SLICE):
        x, y = fa[start : start + STATS_SLICE], fb[start : start + STATS_SLICE]
        if x.is_complex():
            x, y = torch.view_as_real(x), torch.view_as_real(y)
        x, y = x.to(torch.float64), y.to(torch.float64)
        d = (x - y).abs()
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        if d.dim() > 1:  # complex: an element changed when either part did
            same = same.all(dim=-1)
        changed += int((~same).sum())
        d = torch.where(torch.isnan(x) & torch.isnan(y), torch.zeros_like(d), d)
        if d.numel():
            max_abs = max(max_abs, float(d.max()))
        diff_sq += float((d * d).sum())
        base_sq += float((x * x).sum())
    if base_sq > 0:
        rel = math.sqrt(diff_sq) / math.sqrt(base_sq)
    else:
        rel = 0.0 if diff_sq == 0 else math.inf
    return TensorDiff(change="changed", elements_changed=changed, max_abs=max_abs, rel_l2=rel, **base)


# --------------------------------------------------------------------------- files


def _flatten_tree(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if not isinstance(tree, Mapping):
        what = f"entry {prefix!r} is not a tensor" if prefix else "the file holds neither a tensor nor a mapping of tensors"
        raise FileFormatError(
            f"{what} ({type(tree).__name__}); use --select to pick the state dict inside a checkpoint"
        )
    out: dict[str, torch.Tensor] = {}
    for name, value in tree.items():
        if not isinstance(name, str):
            raise FileFormatError(f"key {name!r} under {prefix or 'the top level'} is not a string")
        out.update(_flatten_tree(value, f"{prefix}.{name}" if prefix else name))
    return out


def read_weights_file(path: str | os.PathLike[str], select: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a PyTorch / TorchRL checkpoint.

    ``.safetensors`` is the safe format: it holds only raw tensors. ``.pt``,
    ``.pth``, ``.ckpt`` and ``.bin`` are read with
    ``torch.load(weights_only=True)``, PyTorch's restricted unpickler that
    builds only tensors and plain containers and refuses every other Python
    object; files that need more are refused, never unpickled freely.

    Args:
        path: the file.
        select: dotted path of the state dict inside the file (``model``,
            ``state_dict``, ``policy.module``); default the whole file.

    Returns:
        Dotted tensor names -> CPU tensors.

    Raises:
        FileFormatError: unknown suffix, unreadable or refused file, a leaf
            that is not a tensor, or a ``select`` path that is not there.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as exc:  # pragma: no cover - declared in the safetensors extra
                raise FileFormatError("reading .safetensors needs the safetensors package: pip install 'redisbus[safetensors]'") from exc
            tree: Any = load_file(str(path), device="cpu")
        elif suffix in TORCH_SUFFIXES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pickle-protocol chatter; refusals still raise
                tree = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise FileFormatError(
                f"{path.name}: unknown file type {suffix or '(no suffix)'!r}; expected .safetensors "
                f"or a PyTorch state dict ({', '.join(TORCH_SUFFIXES)})"
            )
    except FileFormatError:
        raise
    except OSError as exc:
        raise FileFormatError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # safetensors' and torch's parse errors have no common base class
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            text = "it needs Python objects beyond torch.load(weights_only=True)'s allow-list; convert it to safetensors"
        raise FileFormatError(f"cannot load {path.name}: {text}") from exc
    if select:
        for part in select.split("."):
            if not isinstance(tree, Mapping) or part not in tree:
                have = sorted(str(k) for k in tree)[:10] if isinstance(tree, Mapping) else []
                raise FileFormatError(f"{path.name} has no entry {select!r} (top-level keys: {have})")
            tree = tree[part]
    flat = _flatten_tree(tree)
    if not flat:
        raise FileFormatError(f"{path.name} holds no tensors")
    return flat


def _safetensors_header(
    manifest: Manifest, metadata: Mapping[str, str]
) -> tuple[bytes, list[tuple[str, TensorEntry]]]:
    names: dict[str, TensorEntry] = {}
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for entry in manifest.tensors:
        name = format_key(entry.key)
        if name in names:
            raise FileFormatError(f"two tensors are both named {name!r} once their key parts are joined with '.'")
        st_dtype = SAFETENSORS_DTYPES.get(entry.torch_dtype)
        if st_dtype is None:
            raise FileFormatError(f"tensor {name!r} has dtype {entry.dtype}, which safetensors cannot store")
        names[name] = entry
        header[name] = {"dtype": st_dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, list(names.items())


# --------------------------------------------------------------------------- the admin


def parse_metadata(values: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
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

    def _read_chunks(self, version: int, indices: Sequence[int], views: Sequence[memoryview]) -> None:
        with self._redis(f"reading the chunks of version {version}"):
            read_values_into(self.client, [self.keys.chunk(version, i) for i in indices], views)

    def _batches(self, manifest: Manifest) -> list[list[int]]:
        per = max(1, READ_BATCH_BYTES // max(1, manifest.chunk_size))
        n = manifest.chunk_count
        return [list(range(i, min(i + per, n))) for i in range(0, n, per)]

    def pull(self, version: int | None = None, progress: Progress | None = None, what: str = "pulling") -> tuple[Manifest, HostBuffer]:
        """Fetch a version into a host buffer and verify every chunk (and the signature, with a key).

        Returns:
            The manifest and the buffer; ``buffer.view(entry)`` is a tensor.

        Raises:
            VersionNotFoundError: no such version.
            CorruptBlobError: a chunk is missing, has the wrong size or fails its checksum.
            SignatureError: a signing key is configured and the version does not verify.
        """
        progress = progress or _NoProgress()
        manifest = self.manifest(version)
        buffer = HostBuffer()
        buffer.reserve(manifest.total_bytes)
        blob = buffer.memoryview()
        spans = manifest.spans()
        progress.start(f"{what} v{manifest.version}", manifest.total_bytes)
        for batch in self._batches(manifest):
            try:
                self._read_chunks(manifest.version, batch, [blob[spans[i][0] : spans[i][1]] for i in batch])
            except VersionNotFoundError as exc:  # the manifest is there, a chunk is not: data loss, not a typo
                buffer.release()
                raise CorruptBlobError(f"version {manifest.version} is incomplete: {exc}") from exc
            except RedisBusError:
                buffer.release()
                raise
            verify_chunks(manifest, blob, batch)
            progress.advance(sum(spans[i][1] - spans[i][0] for i in batch))
        if self.config.signing_key:
            verify_signature(manifest, self.config.signing_key)
            verify_chunk_digests(manifest, blob)
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
        manifests: dict[int, Manifest | str] = {}
        for version in committed:
            try:
                manifests[version] = read_manifest(self.client, self.keys, version, self.config)[0]
            except (ManifestError, VersionNotFoundError) as exc:
                manifests[version] = str(exc)
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
        progress = progress or _NoProgress()
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
                    self._verify_one(manifest, result, scratch, progress)
        finally:
            scratch.release()
        return results

    def _verify_one(self, manifest: Manifest, result: VerifyResult, scratch: HostBuffer, progress: Progress) -> None:
        version = manifest.version
        spans = manifest.spans()
        result.total_bytes, result.chunk_count = manifest.total_bytes, manifest.chunk_count
        digests_wanted = False
        if manifest.signature is not None:
            if self.config.signing_key:
                try:
                    verify_signature(manifest, self.config.signing_key)
                    result.signature, digests_wanted = "ok", True
                except SignatureError as exc:
                    result.signature = "bad"
                    result.problems.append(ChunkProblem(None, self.keys.manifest(version), str(exc)))
            else:
                result.signature = "not checked"
        elif self.config.signing_key:
            result.signature = "bad"
            result.problems.append(ChunkProblem(None, self.keys.manifest(version), "version is unsigned"))
        with self._redis(f"checking the chunks of version {version}"):
            pipe = self.client.pipeline(transaction=False)
            for i in range(len(spans)):
                pipe.strlen(self.keys.chunk(version, i))
            sizes = pipe.execute()
        readable = []
        for i, ((a, b), size) in enumerate(zip(spans, sizes)):
            key = self.keys.chunk(version, i)
            if not size:
                result.problems.append(ChunkProblem(i, key, "missing"))
                progress.advance(b - a)
            elif size != b - a:
                result.problems.append(ChunkProblem(i, key, f"holds {size} bytes, the manifest says {b - a}"))
                progress.advance(b - a)
            else:
                readable.append(i)
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
                self._read_chunks(version, batch, views)
                got: list[tuple[int, memoryview | Exception]] = list(zip(batch, views))
            except (VersionNotFoundError, CorruptBlobError):  # changed since STRLEN: go one by one to name it
                got = []
                for i, view in zip(batch, views):
                    try:
                        self._read_chunks(version, [i], [view])
                        got.append((i, view))
                    except (VersionNotFoundError, CorruptBlobError) as exc:
                        got.append((i, exc))
            for i, view in got:
                key = self.keys.chunk(version, i)
                if isinstance(view, Exception):
                    result.problems.append(ChunkProblem(i, key, str(view)))
                    continue
                checksum = chunk_checksum(view)
                if checksum != manifest.chunk_checksums[i]:
                    result.problems.append(
                        ChunkProblem(i, key, f"checksum {checksum:016x} != {manifest.chunk_checksums[i]:016x}")
                    )
                elif digests_wanted and manifest.chunk_digests is not None and (
                    hashlib.blake2b(view, digest_size=32).digest() != manifest.chunk_digests[i]
                ):
                    result.problems.append(ChunkProblem(i, key, "differs from its signed digest"))
                else:
                    result.chunks_ok += 1
            progress.advance(sum(sizes))
        result.problems.sort(key=lambda p: -1 if p.chunk is None else p.chunk)

    # -- comparing ------------------------------------------------------------------------

    def diff(self, old: int | None, new: int | None, progress: Progress | None = None) -> DiffResult:
        """Compare two versions tensor by tensor (both pulled and verified first)."""
        old_m, old_buf = self.pull(old, progress, what="reading")
        new_m, new_buf = self.pull(new, progress, what="reading")
        try:
            before = {format_key(e.key): e for e in old_m.tensors}
            after = {format_key(e.key): e for e in new_m.tensors}
            rows = []
            for key in sorted(before.keys() | after.keys()):
                a, b = before.get(key), after.get(key)
                if a is None:
                    rows.append(TensorDiff(key, "added", None, b.dtype, None, list(b.shape)))  # type: ignore[union-attr]
                elif b is None:
                    rows.append(TensorDiff(key, "removed", a.dtype, None, list(a.shape), None))
                else:
                    rows.append(_tensor_diff(key, a, b, old_buf.view(a), new_buf.view(b)))
        finally:
            old_buf.release()
            new_buf.release()
        return DiffResult(old_m.version, new_m.version, rows)

    # -- who is on the bus ----------------------------------------------------------------

    def workers(self, dead_after: float = defaults.DEAD_AFTER_SECONDS, now: float | None = None) -> list[WorkerStatus]:
        """Every worker that reported: applied version, lag behind ``latest``, heartbeat age, dead or alive."""
        reports = list_workers(self.client, self.keys)
        latest, pin = self.head()
        return [self._worker_status(r, latest, pin, dead_after, now or time.time()) for r in reports]

    @staticmethod
    def _worker_status(r: WorkerReport, latest: int | None, pin: int | None, dead_after: float, now: float) -> WorkerStatus:
        lag = r.lag(latest)
        dead = r.is_dead(dead_after, now)
        if dead:
            state = "dead"
        elif r.version is None:
            state = "waiting"
        elif lag and pin is not None and r.version >= pin:
            state = "pinned"
        elif lag:
            state = "lagging"
        else:
            state = "current"
        return WorkerStatus(
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
        return [
            PublisherStatus(p.publisher_id, p.host, p.pid, p.version, p.published_at, max(0.0, now - p.published_at))
            for p in list_publishers(self.client, self.keys)
        ]

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
        stored = 0
        for version in committed:
            try:
                stored += read_manifest(self.client, self.keys, version, self.config)[0].total_bytes
            except (ManifestError, VersionNotFoundError):
                pass
        workers = self.workers(dead_after)
        return Status(
            namespace=self.namespace,
            url=self.config.redacted_url(),
            latest=latest,
            pin=pin,
            versions=committed,
            stored_bytes=stored,
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

        See :func:`read_weights_file` for what is read and how safely.
        Dotted names become nested keys (``0.weight`` -> ``("0", "weight")``),
        as for a state dict published by the trainer. Metadata is
        ``{"imported_from": <file name>}`` plus ``metadata``.
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
        progress = progress or _NoProgress()
        manifest, buffer = self.pull(version, progress, what="reading")
        try:
            file_meta = {
                "format": "pt",
                "redisbus.version": str(manifest.version),
                "redisbus.namespace": self.namespace,
                "redisbus.created": f"{manifest.created:.3f}",
                "redisbus.metadata": json.dumps(_plain(dict(manifest.metadata)), sort_keys=True),
            }
            header, entries = _safetensors_header(manifest, file_meta)
            target = Path(path)
            blob = buffer.memoryview()
            progress.start(f"writing {target.name}", manifest.total_bytes)
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=str(target.parent or "."))
            except OSError as exc:
                raise FileFormatError(f"cannot write {target}: {exc.strerror or exc}") from exc
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(len(header).to_bytes(8, "little"))
                    out.write(header)
                    for _, entry in entries:
                        out.write(blob[entry.offset : entry.offset + entry.nbytes])
                        progress.advance(entry.nbytes)
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)  # what open() would have made, not mkstemp's 0600
                os.replace(tmp, target)
            except OSError as exc:
                raise FileFormatError(f"cannot write {target}: {exc.strerror or exc}") from exc
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        finally:
            buffer.release()
        return ExportResult(manifest.version, str(target), len(entries), manifest.total_bytes, target.stat().st_size)

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
        try:
            manifest, data = read_manifest(self.client, self.keys, version, self.config)
        except (ManifestError, VersionNotFoundError):
            return  # workers still poll latest; the notice is only a hint
        notice = encode_notice(Notice(version, manifest.total_bytes, manifest_digest(data)))
        with self._redis("announcing the latest version"):
            self.client.publish(self.keys.notify, notice)

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
        latest, pin = self.head()
        known = {w.worker_id: w for w in self.workers(dead_after)}
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        with self._redis("subscribing to notices"):
            pubsub.subscribe(self.keys.notify)
        # everything above ran now; only the loop below waits for the caller's next()
        return self._follow(pubsub, latest or 0, pin, known, poll_interval, dead_after, timeout, clock)

    def _follow(
        self,
        pubsub: Any,
        seen_version: int,
        pin: int | None,
        known: dict[str, WorkerStatus],
        poll_interval: float,
        dead_after: float,
        timeout: float | None,
        clock: Callable[[], float],
    ) -> Iterator[dict[str, Any]]:
        deadline = None if timeout is None else clock() + timeout
        try:
            next_poll = 0.0
            while True:
                now = clock()
                if deadline is not None and now >= deadline:
                    return
                wait = poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - now))
                with self._redis("waiting for notices"):
                    message = pubsub.get_message(timeout=wait)
                if message is None and clock() < next_poll:
                    continue
                next_poll = clock() + poll_interval
                latest, new_pin = self.head()
                if latest is not None and latest > seen_version:
                    with self._redis("listing new versions"):
                        fresh = [int(v) for v in self.client.zrangebyscore(self.keys.versions, f"({seen_version}", "+inf")]
                    for version in fresh:
                        yield self._version_event(version)
                    seen_version = max([latest, *fresh])
                if new_pin != pin:
                    yield {"event": "pin", "time": time.time(), "version": new_pin, "previous": pin}
                    pin = new_pin
                for w in self.workers(dead_after):
                    before = known.get(w.worker_id)
                    known[w.worker_id] = w
                    base = {"time": time.time(), "worker": w.worker_id, "host": w.host, "pid": w.pid}
                    if before is None and w.version is None:
                        yield {"event": "joined", **base}
                    if w.version is not None and (before is None or before.version != w.version):
                        yield {"event": "applied", **base, "version": w.version, "previous": before.version if before else None, "lag": w.lag}
                    if before is not None and w.dead != before.dead:
                        yield {"event": "dead" if w.dead else "alive", **base, "heartbeat_age": round(w.heartbeat_age, 3)}
        finally:
            with contextlib.suppress(Exception):  # the connection may already be gone
                pubsub.close()

    def _version_event(self, version: int) -> dict[str, Any]:
        event: dict[str, Any] = {"event": "version", "time": time.time(), "version": version}
        try:
            m = read_manifest(self.client, self.keys, version, self.config)[0]
        except (ManifestError, VersionNotFoundError) as exc:
            event["error"] = str(exc)
            return event
        event.update(
            total_bytes=m.total_bytes,
            tensors=len(m.tensors),
            created=m.created,
            publisher=_plain(dict(m.publisher)),
            metadata=_plain(dict(m.metadata)),
        )
        return event
