"""The wire format: blob layout, manifest and notice encoding, and their validation.

A version is one blob (every tensor laid end to end, each at an aligned
offset) cut into fixed-size chunks, plus a msgpack manifest describing it.
Decoding validates everything safetensors would and more before anything
is allocated: size caps, types, the dtype allow-list, shapes against byte
counts, offsets in bounds and non-overlapping, chunk sizes against the
total. Nothing here touches Redis.

>>> entries, total = plan_layout([(("w",), torch.float32, (2, 3))])
>>> entries[0].offset, entries[0].nbytes, total
(0, 24, 24)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import xxhash

from . import defaults
from .errors import CorruptBlobError, ManifestError

__all__ = [
    "FORMAT_VERSION",
    "DTYPES",
    "TensorEntry",
    "Manifest",
    "Notice",
    "TensorKey",
    "plan_layout",
    "chunk_spans",
    "chunk_checksum",
    "encode_manifest",
    "decode_manifest",
    "manifest_digest",
    "encode_notice",
    "decode_notice",
    "verify_chunks",
    "format_key",
]

#: Version of the manifest format written by this release; decoders accept only this one.
FORMAT_VERSION = 1
#: Checksum algorithm of chunk integrity (fast, non-cryptographic; signing is separate).
CHECKSUM = "xxh3_64"

TensorKey = tuple[str, ...]

#: The dtype allow-list: wire name -> torch dtype. Anything else is refused.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
for _name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        DTYPES[_name] = getattr(torch, _name)
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

_MAX_NDIM = 64
_MAX_KEY_DEPTH = 64
_MAX_KEY_PART_BYTES = 1024


def format_key(key: TensorKey) -> str:
    """Human spelling of a tensor key: nested parts joined by dots."""
    return ".".join(key)


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of an allowed dtype.

    Raises:
        ManifestError: the dtype is not on the allow-list.
    """
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ManifestError(f"dtype {dtype} is not on the allow-list {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in the blob."""

    key: TensorKey
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Manifest:
    """Everything a worker needs to fetch, verify and place one version."""

    version: int
    total_bytes: int
    chunk_size: int
    chunk_checksums: tuple[int, ...]
    tensors: tuple[TensorEntry, ...]
    created: float = field(default_factory=time.time)
    publisher: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    chunk_digests: tuple[bytes, ...] | None = None
    signature: bytes | None = None

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_checksums)

    def spans(self) -> list[tuple[int, int]]:
        """``(start, stop)`` byte range of each chunk."""
        return chunk_spans(self.total_bytes, self.chunk_size)

    def to_wire(self, *, with_signature: bool = True) -> dict[str, Any]:
        """The msgpack-ready map (the signature is left out for signing itself)."""
        body: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "version": self.version,
            "created": float(self.created),
            "publisher": dict(self.publisher),
            "metadata": dict(self.metadata),
            "total_bytes": self.total_bytes,
            "chunk_size": self.chunk_size,
            "checksum": CHECKSUM,
            "chunks": [[stop - start, c] for (start, stop), c in zip(self.spans(), self.chunk_checksums)],
            "tensors": [
                {"key": list(t.key), "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset, "nbytes": t.nbytes}
                for t in self.tensors
            ],
        }
        if self.chunk_digests is not None:
            body["chunk_digests"] = list(self.chunk_digests)
        if with_signature and self.signature is not None:
            body["signature"] = self.signature
        return body


@dataclass(frozen=True)
class Notice:
    """The small hint published per committed version. Never the data."""

    version: int
    total_bytes: int
    digest: str


def plan_layout(
    specs: Iterable[tuple[TensorKey, torch.dtype, Sequence[int]]], alignment: int = defaults.ALIGNMENT
) -> tuple[list[TensorEntry], int]:
    """Place tensors end to end at aligned offsets.

    Args:
        specs: ``(key, dtype, shape)`` per tensor, in blob order.
        alignment: byte alignment of every offset.

    Returns:
        The entries and the blob's total size in bytes.

    Raises:
        ManifestError: a dtype off the allow-list.
    """
    entries: list[TensorEntry] = []
    offset = 0
    for key, dtype, shape in specs:
        name = dtype_name(dtype)
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        offset = -(-offset // alignment) * alignment
        entries.append(TensorEntry(tuple(key), name, shape, offset, nbytes))
        offset += nbytes
    return entries, offset


def chunk_spans(total_bytes: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each chunk of a blob; an empty blob has no chunks."""
    return [(start, min(start + chunk_size, total_bytes)) for start in range(0, total_bytes, chunk_size)]


def chunk_checksum(data: memoryview | bytes) -> int:
    """Integrity checksum of one chunk (xxh3-64)."""
    return xxhash.xxh3_64_intdigest(data)


def verify_chunks(manifest: Manifest, blob: memoryview, indices: Iterable[int] | None = None) -> None:
    """Check chunk checksums of ``blob`` (the whole blob's bytes) against the manifest.

    Raises:
        CorruptBlobError: naming the first chunk whose checksum differs.
    """
    spans = manifest.spans()
    for i in range(len(spans)) if indices is None else indices:
        start, stop = spans[i]
        got = chunk_checksum(blob[start:stop])
        if got != manifest.chunk_checksums[i]:
            raise CorruptBlobError(
                f"version {manifest.version}: chunk {i} (bytes {start}-{stop}) fails its checksum "
                f"({got:016x} != {manifest.chunk_checksums[i]:016x})"
            )


def encode_manifest(manifest: Manifest) -> bytes:
    """msgpack bytes of a manifest."""
    return msgpack.packb(manifest.to_wire(), use_bin_type=True)


def manifest_digest(data: bytes) -> str:
    """Short digest of encoded manifest bytes, carried by the notice."""
    return xxhash.xxh3_128_hexdigest(data)


def encode_notice(notice: Notice) -> bytes:
    """msgpack bytes of a notice (well under 1 KiB)."""
    return msgpack.packb({"format": FORMAT_VERSION, "v": notice.version, "n": notice.total_bytes, "d": notice.digest})


def _unpack(data: bytes, limit: int, what: str) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ManifestError(f"{what} is a {type(data).__name__}, not bytes")
    if len(data) > limit:
        raise ManifestError(f"{what} is {len(data)} bytes, over the limit of {limit}")
    try:
        return msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=0,
        )
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise ManifestError(f"{what} is not valid msgpack ({type(exc).__name__}: {exc})") from exc


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    if name not in body:
        raise ManifestError(f"{what} has no {name!r} field")
    value = body[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ManifestError(f"{what} field {name!r} has type {type(value).__name__}")
    return value


def _int(value: Any, what: str, low: int = 0, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ManifestError(f"{what} is a {type(value).__name__}, not an integer")
    if value < low or (high is not None and value > high):
        raise ManifestError(f"{what} = {value} is out of range [{low}, {high if high is not None else 'inf'}]")
    return value


def decode_notice(data: bytes) -> Notice:
    """Decode and validate a notice.

    Raises:
        ManifestError: oversized, not msgpack, missing or mistyped fields.
    """
    body = _unpack(data, defaults.MAX_NOTICE_BYTES, "notice")
    if not isinstance(body, dict):
        raise ManifestError(f"notice is a {type(body).__name__}, not a map")
    if body.get("format") != FORMAT_VERSION:
        raise ManifestError(f"notice has unsupported format {body.get('format')!r}")
    return Notice(
        version=_int(body.get("v"), "notice version", 1),
        total_bytes=_int(body.get("n"), "notice size"),
        digest=_field(body, "d", str, "notice"),
    )


def _decode_tensor(raw: Any, index: int, total_bytes: int) -> TensorEntry:
    what = f"manifest tensor #{index}"
    if not isinstance(raw, dict):
        raise ManifestError(f"{what} is a {type(raw).__name__}, not a map")
    key = _field(raw, "key", list, what)
    if not key or len(key) > _MAX_KEY_DEPTH:
        raise ManifestError(f"{what} key has {len(key)} parts (1-{_MAX_KEY_DEPTH} allowed)")
    for part in key:
        if not isinstance(part, str) or not part or len(part) > _MAX_KEY_PART_BYTES:
            raise ManifestError(f"{what} key part {part!r} is not a non-empty string")
    what = f"manifest tensor {format_key(tuple(key))!r}"
    dtype = _field(raw, "dtype", str, what)
    if dtype not in DTYPES:
        raise ManifestError(f"{what} has dtype {dtype!r}, not on the allow-list {sorted(DTYPES)}")
    shape = _field(raw, "shape", list, what)
    if len(shape) > _MAX_NDIM:
        raise ManifestError(f"{what} has {len(shape)} dimensions (at most {_MAX_NDIM})")
    shape = tuple(_int(s, f"{what} dimension", 0, total_bytes) for s in shape)
    offset = _int(raw.get("offset"), f"{what} offset", 0, total_bytes)
    nbytes = _int(raw.get("nbytes"), f"{what} nbytes", 0, total_bytes)
    itemsize = DTYPES[dtype].itemsize
    if math.prod(shape) * itemsize != nbytes:
        raise ManifestError(f"{what}: shape {list(shape)} x {dtype} is not {nbytes} bytes")
    if offset % itemsize:
        raise ManifestError(f"{what}: offset {offset} is not aligned to its {itemsize}-byte dtype")
    if offset + nbytes > total_bytes:
        raise ManifestError(f"{what}: bytes {offset}-{offset + nbytes} run past the blob's {total_bytes} bytes")
    return TensorEntry(tuple(key), dtype, shape, offset, nbytes)


def decode_manifest(
    data: bytes,
    *,
    max_manifest_bytes: int = defaults.MAX_MANIFEST_BYTES,
    max_blob_bytes: int = defaults.MAX_BLOB_BYTES,
) -> Manifest:
    """Decode and fully validate a manifest.

    Args:
        data: the manifest's msgpack bytes as read from Redis.
        max_manifest_bytes: larger manifests are refused unread.
        max_blob_bytes: larger declared blobs are refused before any allocation.

    Raises:
        ManifestError: any violation, named.

    Example:
        >>> entries, total = plan_layout([(("w",), torch.float32, (4,))])
        >>> m = Manifest(1, total, 1024, (chunk_checksum(bytes(total)),), tuple(entries))
        >>> decode_manifest(encode_manifest(m)).tensors[0].shape
        (4,)
    """
    body = _unpack(data, max_manifest_bytes, "manifest")
    if not isinstance(body, dict):
        raise ManifestError(f"manifest is a {type(body).__name__}, not a map")
    fmt = body.get("format")
    if fmt != FORMAT_VERSION:
        raise ManifestError(f"manifest has unsupported format {fmt!r} (this release reads {FORMAT_VERSION})")
    if body.get("checksum") != CHECKSUM:
        raise ManifestError(f"manifest uses unknown checksum {body.get('checksum')!r}")
    version = _int(body.get("version"), "manifest version", 1)
    created = _field(body, "created", (int, float), "manifest")
    publisher = _field(body, "publisher", dict, "manifest")
    metadata = _field(body, "metadata", dict, "manifest")
    total = _int(body.get("total_bytes"), "manifest total_bytes", 0, max_blob_bytes)
    chunk_size = _int(body.get("chunk_size"), "manifest chunk_size", 1)
    raw_chunks = _field(body, "chunks", list, "manifest")
    needed = -(-total // chunk_size)
    if len(raw_chunks) != needed:
        raise ManifestError(
            f"manifest lists {len(raw_chunks)} chunks; {total} bytes in {chunk_size}-byte chunks need {needed}"
        )
    spans = chunk_spans(total, chunk_size)
    checksums = []
    for i, ((start, stop), raw) in enumerate(zip(spans, raw_chunks)):
        if not isinstance(raw, list) or len(raw) != 2:
            raise ManifestError(f"manifest chunk {i} is not a [size, checksum] pair")
        size = _int(raw[0], f"manifest chunk {i} size", 0)
        if size != stop - start:
            raise ManifestError(f"manifest chunk {i} claims {size} bytes; the layout says {stop - start}")
        checksums.append(_int(raw[1], f"manifest chunk {i} checksum", 0, 2**64 - 1))
    raw_tensors = _field(body, "tensors", list, "manifest")
    if len(raw_tensors) > defaults.MAX_TENSORS:
        raise ManifestError(f"manifest lists {len(raw_tensors)} tensors (at most {defaults.MAX_TENSORS})")
    tensors = [_decode_tensor(raw, i, total) for i, raw in enumerate(raw_tensors)]
    seen: set[TensorKey] = set()
    for t in tensors:
        if t.key in seen:
            raise ManifestError(f"manifest lists tensor {format_key(t.key)!r} twice")
        seen.add(t.key)
    end = 0
    for t in sorted((t for t in tensors if t.nbytes), key=lambda t: t.offset):
        if t.offset < end:
            raise ManifestError(f"manifest tensor {format_key(t.key)!r} at offset {t.offset} overlaps the previous one")
        end = t.offset + t.nbytes
    digests = body.get("chunk_digests")
    if digests is not None:
        if not isinstance(digests, list) or len(digests) != len(spans):
            raise ManifestError("manifest chunk_digests do not match its chunks")
        if not all(isinstance(d, bytes) and len(d) == 32 for d in digests):
            raise ManifestError("manifest chunk_digests must be 32-byte digests")
        digests = tuple(digests)
    signature = body.get("signature")
    if signature is not None and not (isinstance(signature, bytes) and len(signature) == 32):
        raise ManifestError("manifest signature must be 32 bytes")
    return Manifest(
        version=version,
        total_bytes=total,
        chunk_size=chunk_size,
        chunk_checksums=tuple(checksums),
        tensors=tuple(tensors),
        created=float(created),
        publisher=publisher,
        metadata=metadata,
        chunk_digests=digests,
        signature=signature,
    )
