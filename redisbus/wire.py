"""The wire format: blob layout, manifest and notice encoding, and their validation.

A version is one blob (every tensor laid end to end, each at an aligned
offset) cut into fixed-size chunks, plus a msgpack manifest describing it.
Decoding validates everything safetensors would and more before anything
is allocated: size caps, types, the dtype allow-list, shapes against byte
counts, offsets in bounds and non-overlapping, the total equal to where the
tensors end (padding gaps only), chunk sizes against the total. The msgpack
is walked by byte spans first and each part decoded only once its encoded
size is within its cap, so hostile bytes cannot make the decoder build
gigabytes of Python objects. Nothing here touches Redis.

>>> entries, total = plan_layout([(("w",), torch.float32, (2, 3))])
>>> entries[0].offset, entries[0].nbytes, total
(0, 24, 24)
"""

from __future__ import annotations

import functools
import math
import reprlib
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
    "notice_for",
    "encode_notice",
    "decode_notice",
    "verify_chunks",
    "format_key",
    "check_metadata",
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
#: Largest tensor alignment; also the largest gap allowed between two tensors of a blob.
_MAX_ALIGNMENT = 4096
#: Largest dimension (and product of the non-zero dimensions) torch can index: strides are int64.
_MAX_DIM = 2**63 - 1
#: Most top-level fields a manifest map may have (this format writes 12).
_MAX_FIELDS = 64
#: Encoded size caps, checked on the raw bytes before anything is decoded, so a hostile
#: manifest cannot make the decoder build millions of tiny objects (msgpack's 1-byte empty
#: list becomes a 56-byte Python list: 64 MiB of them would be gigabytes).
_MAX_SCALAR_BYTES = 64
_MAX_CHUNK_ENTRY_BYTES = 32
_MAX_DIGEST_ENTRY_BYTES = 40
_MAX_TENSOR_ENTRY_BYTES = 128 + _MAX_KEY_DEPTH * (5 + 4 * _MAX_KEY_PART_BYTES) + _MAX_NDIM * 9

_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80
_SHORT_REPR.maxlevel = 3


def _short(value: Any) -> str:
    """A bounded repr of untrusted data for error messages (never deep, never huge)."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[:40])
    try:
        return _SHORT_REPR.repr(value)
    except Exception:  # a repr can fail on anything; the message must not
        return f"<{type(value).__name__}>"


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
    #: The version's chunk size, so a worker can ask for the chunks together with the manifest (None: not sent).
    chunk_size: int | None = None


def plan_layout(
    specs: Iterable[tuple[TensorKey, torch.dtype, Sequence[int]]], alignment: int = defaults.ALIGNMENT
) -> tuple[list[TensorEntry], int]:
    """Place tensors end to end at aligned offsets.

    Args:
        specs: ``(key, dtype, shape)`` per tensor, in blob order.
        alignment: byte alignment of every offset (at least each dtype's itemsize).

    Returns:
        The entries and the blob's total size in bytes.

    Raises:
        ManifestError: a dtype off the allow-list.
        ValueError: an alignment that is not a power of two in 1..4096.
    """
    if not 1 <= alignment <= _MAX_ALIGNMENT or alignment & (alignment - 1):
        raise ValueError(f"alignment {alignment} is not a power of two in 1..{_MAX_ALIGNMENT}")
    entries: list[TensorEntry] = []
    offset = 0
    for key, dtype, shape in specs:
        name = dtype_name(dtype)
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        step = max(alignment, dtype.itemsize)  # never below the dtype's own alignment
        offset = -(-offset // step) * step
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
    size = blob.nbytes if isinstance(blob, memoryview) else len(blob)
    if size < manifest.total_bytes:
        raise CorruptBlobError(f"version {manifest.version}: blob is {size} bytes, the manifest says {manifest.total_bytes}")
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


def notice_for(manifest: Manifest, data: bytes) -> Notice:
    """The notice announcing ``manifest``, whose encoded bytes are ``data``."""
    return Notice(manifest.version, manifest.total_bytes, manifest_digest(data), manifest.chunk_size)


def encode_notice(notice: Notice) -> bytes:
    """msgpack bytes of a notice (well under 1 KiB)."""
    body = {"format": FORMAT_VERSION, "v": notice.version, "n": notice.total_bytes, "d": notice.digest}
    if notice.chunk_size is not None:
        body["c"] = notice.chunk_size
    return msgpack.packb(body)


_MSGPACK_ERRORS = (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException)


def _as_bytes(data: Any, limit: int, what: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ManifestError(f"{what} is a {type(data).__name__}, not bytes")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > limit:
        raise ManifestError(f"{what} is {size} bytes, over the limit of {limit}")
    return bytes(data)


def _loads(data: bytes | memoryview, limit: int, what: str) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=0,
        )
    except _MSGPACK_ERRORS as exc:
        raise ManifestError(f"{what} is not valid msgpack ({type(exc).__name__}: {_short(str(exc))})") from exc


def _unpack(data: bytes, limit: int, what: str) -> Any:
    return _loads(_as_bytes(data, limit, what), limit, what)


def _wire_type(first: int) -> str:
    """Python type name of the msgpack value whose first byte is ``first`` (read without decoding it)."""
    if first <= 0x7F or first >= 0xE0 or 0xCC <= first <= 0xD3:
        return "int"
    if first <= 0x8F or first in (0xDE, 0xDF):
        return "dict"
    if first <= 0x9F or first in (0xDC, 0xDD):
        return "list"
    if first <= 0xBF or 0xD9 <= first <= 0xDB:
        return "str"
    return {0xC0: "NoneType", 0xC2: "bool", 0xC3: "bool", 0xC4: "bytes", 0xC5: "bytes", 0xC6: "bytes",
            0xCA: "float", 0xCB: "float"}.get(first, "ExtType" if first != 0xC1 else "invalid byte")


#: What :meth:`_Reader.map_items` gives for a value it did not decode.
_SKIPPED: Any = object()
#: By first byte: whether the msgpack value is a nil, bool, number or string of at most 31 bytes (so at most 33
#: bytes long, under every cap: decoding it at once costs nothing a cap would prevent).
_SCALAR_FIRST_BYTE = tuple(
    b <= 0x7F or b >= 0xE0 or 0xA0 <= b <= 0xBF or b in (0xC0, 0xC2, 0xC3, 0xCA, 0xCB) or 0xCC <= b <= 0xD3
    for b in range(256)
)


class _Reader:
    """Walks msgpack bytes by spans, decoding a value only once its encoded size is known to be small."""

    def __init__(self, data: bytes | memoryview, what: str) -> None:
        self.data = data
        self.view = memoryview(data)
        self.what = what
        self._up = msgpack.Unpacker(None, max_buffer_size=max(len(data), 1), max_ext_len=0)
        self._up.feed(data)

    def _call(self, op: Any) -> Any:
        try:
            return op()
        except msgpack.OutOfData as exc:
            raise ManifestError(f"{self.what} is truncated at byte {len(self.data)}") from exc
        except _MSGPACK_ERRORS as exc:
            raise ManifestError(f"{self.what} is not valid msgpack ({type(exc).__name__}: {_short(str(exc))})") from exc

    def tell(self) -> int:
        return int(self._up.tell())

    def span(self) -> tuple[int, int]:
        """Skip the next value (allocating nothing) and return its byte range."""
        start = self.tell()
        self._call(self._up.skip)
        return start, self.tell()

    def map_items(self, count: int) -> list[tuple[tuple[tuple[int, int], Any], tuple[tuple[int, int], Any]]]:
        """The next ``count`` key/value pairs of a map whose header was read, each part as ``(byte span, value)``.

        The value is decoded if it is a scalar or a short string (see
        ``_SCALAR_FIRST_BYTE``), else it is skipped unread (``_SKIPPED``), for
        :meth:`load` to decode once its size is checked. One loop over C calls:
        this walk runs for every version a worker pulls.
        """
        up, data, end, scalar = self._up, self.data, len(self.data), _SCALAR_FIRST_BYTE
        parts: list[tuple[tuple[int, int], Any]] = []
        try:
            for _ in range(2 * count):
                start = up.tell()
                if start < end and scalar[data[start]]:
                    value = up.unpack()
                else:
                    value = _SKIPPED
                    up.skip()
                parts.append(((start, up.tell()), value))
        except msgpack.OutOfData as exc:
            raise ManifestError(f"{self.what} is truncated at byte {len(self.data)}") from exc
        except _MSGPACK_ERRORS as exc:
            raise ManifestError(f"{self.what} is not valid msgpack ({type(exc).__name__}: {_short(str(exc))})") from exc
        return list(zip(parts[::2], parts[1::2]))

    def header(self, kind: str) -> int:
        return int(self._call(self._up.read_map_header if kind == "dict" else self._up.read_array_header))

    def load(self, span: tuple[int, int], cap: int, what: str) -> Any:
        start, stop = span
        if stop - start > cap:
            raise ManifestError(
                f"{what} is {stop - start} bytes of msgpack ({_wire_type(self.data[start])}), over its limit of {cap}"
            )
        return _loads(self.view[start:stop], cap, what)

    def items(self, span: tuple[int, int], cap: int, what: str) -> tuple[int, Any]:
        """Length of the array at ``span`` and an iterator decoding its elements one at a time."""
        start, stop = span
        return _array_items(self.view[start:stop], cap, what)


def _array_items(data: bytes | memoryview, cap: int, what: str) -> tuple[int, Any]:
    """Length of the msgpack array ``data`` and an iterator decoding its elements one at a time (each <= ``cap``)."""
    kind = _wire_type(data[0])
    if kind != "list":
        raise ManifestError(f"{what} has type {kind}")
    sub = _Reader(data, what)
    count = sub.header("list")

    def elements() -> Any:
        for i in range(count):
            yield sub.load(sub.span(), cap, f"{what} #{i}")

    return count, elements()


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    if name not in body:
        raise ManifestError(f"{what} has no {name!r} field")
    value = body[name]
    if not isinstance(value, kind) or (
        isinstance(value, bool) and (kind is int or (isinstance(kind, tuple) and int in kind))
    ):
        raise ManifestError(f"{what} field {name!r} has type {type(value).__name__}")
    return value


def _int(value: Any, what: str, low: int = 0, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ManifestError(f"{what} is a {type(value).__name__}, not an integer")
    if value < low or (high is not None and value > high):
        raise ManifestError(f"{what} = {value} is out of range [{low}, {high if high is not None else 'inf'}]")
    return value


def _is_format(value: Any) -> bool:
    return type(value) is int and value == FORMAT_VERSION  # not True, not 1.0


def decode_notice(data: bytes) -> Notice:
    """Decode and validate a notice.

    Raises:
        ManifestError: oversized, not msgpack, missing or mistyped fields.
    """
    body = _unpack(data, defaults.MAX_NOTICE_BYTES, "notice")
    if not isinstance(body, dict):
        raise ManifestError(f"notice is a {type(body).__name__}, not a map")
    if not _is_format(body.get("format")):
        raise ManifestError(f"notice has unsupported format {_short(body.get('format'))}")
    return Notice(
        version=_int(body.get("v"), "notice version", 1),
        total_bytes=_int(body.get("n"), "notice size"),
        digest=_field(body, "d", str, "notice"),
        chunk_size=None if body.get("c") is None else _int(body["c"], "notice chunk size", 1),
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
            raise ManifestError(f"{what} key part {_short(part)} is not a non-empty string")
    what = f"manifest tensor {format_key(tuple(key))!r}"
    dtype = _field(raw, "dtype", str, what)
    if dtype not in DTYPES:
        raise ManifestError(f"{what} has dtype {_short(dtype)}, not on the allow-list {sorted(DTYPES)}")
    shape = _field(raw, "shape", list, what)
    if len(shape) > _MAX_NDIM:
        raise ManifestError(f"{what} has {len(shape)} dimensions (at most {_MAX_NDIM})")
    # A dimension may exceed the blob when another one is 0 (a (0, 5) tensor takes no bytes), so
    # dimensions are bounded by what torch can stride over; nbytes below ties them to the blob.
    shape = tuple(_int(s, f"{what} dimension", 0, _MAX_DIM) for s in shape)
    if math.prod(max(s, 1) for s in shape) > _MAX_DIM:
        raise ManifestError(f"{what}: shape {list(shape)} is too large for torch to index")
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


_KNOWN_FIELDS = frozenset(
    ("format", "version", "created", "publisher", "metadata", "total_bytes", "chunk_size", "checksum", "chunks",
     "tensors", "chunk_digests", "signature")
)


def _manifest_fields(reader: _Reader) -> dict[str, tuple[tuple[int, int], Any]]:
    """Byte span of each known top-level field, and its value where it is a scalar (else ``_SKIPPED``)."""
    data = reader.data
    if not data:
        raise ManifestError("manifest is empty")
    kind = _wire_type(data[0])
    if kind != "dict":
        reader.span()  # say "truncated" or "not msgpack" rather than "not a map" where that is the problem
        raise ManifestError(f"manifest is a {kind}, not a map")
    count = reader.header("dict")
    if count > _MAX_FIELDS:
        raise ManifestError(f"manifest map has {count} fields (at most {_MAX_FIELDS})")
    fields: dict[str, tuple[tuple[int, int], Any]] = {}
    for (span, name), value in reader.map_items(count):
        if name is _SKIPPED:
            name = reader.load(span, _MAX_SCALAR_BYTES, "manifest field name")
        if not isinstance(name, (str, bytes)):
            raise ManifestError(f"manifest has a {type(name).__name__} field name")
        if name in _KNOWN_FIELDS:
            if name in fields:
                raise ManifestError(f"manifest has field {name!r} twice")
            fields[name] = value  # type: ignore[index]
    if reader.tell() != len(data):
        raise ManifestError(f"manifest has {len(data) - reader.tell()} bytes after its map")
    return fields


_MAX_USER_DEPTH = 32


def _check_user_map(value: dict[Any, Any], what: str) -> None:
    """Publisher and metadata maps: nested at most 32 deep (deeper breaks repr, == and re-encoding)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_USER_DEPTH:
            raise ManifestError(f"{what} nests deeper than {_MAX_USER_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    try:  # what decodes must encode again: signing and re-publishing re-encode it
        msgpack.packb(value, use_bin_type=True)
    except _MSGPACK_ERRORS as exc:
        raise ManifestError(f"{what} cannot be re-encoded ({type(exc).__name__}: {_short(str(exc))})") from exc


def check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """User metadata as workers will decode it, or the reason they would refuse it.

    Raises:
        ManifestError: not msgpack-able, non-string keys, too large, or nested too deep.
    """
    if not metadata:
        return {}  # what most publishes carry, checked for free
    try:
        packed = msgpack.packb(dict(metadata), use_bin_type=True)
    except _MSGPACK_ERRORS as exc:
        raise ManifestError(f"metadata cannot be encoded ({type(exc).__name__}: {_short(str(exc))})") from exc
    body = _unpack(packed, defaults.MAX_METADATA_BYTES, "metadata")
    _check_user_map(body, "metadata")
    return body


#: Tensor tables up to this size are decoded once and remembered: every version of a policy repeats its table.
_CACHED_TABLE_BYTES = 64 * 1024


def _decode_tensor_table(table: bytes | memoryview, total: int) -> tuple[TensorEntry, ...]:
    """Decode and check the ``tensors`` field: entries, unique keys, in bounds, no overlaps, no large gaps."""
    tensor_count, raw_tensors = _array_items(table, _MAX_TENSOR_ENTRY_BYTES, "manifest field 'tensors'")
    if tensor_count > defaults.MAX_TENSORS:
        raise ManifestError(f"manifest lists {tensor_count} tensors (at most {defaults.MAX_TENSORS})")
    tensors = [_decode_tensor(raw, i, total) for i, raw in enumerate(raw_tensors)]
    seen: set[TensorKey] = set()
    for t in tensors:
        if t.key in seen:
            raise ManifestError(f"manifest lists tensor {format_key(t.key)!r} twice")
        seen.add(t.key)
    end = 0
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.nbytes and t.offset < end:
            raise ManifestError(f"manifest tensor {format_key(t.key)!r} at offset {t.offset} overlaps the previous one")
        if t.offset - end >= _MAX_ALIGNMENT:
            raise ManifestError(
                f"manifest tensor {format_key(t.key)!r} at offset {t.offset} leaves a gap of {t.offset - end} bytes "
                f"(padding is under {_MAX_ALIGNMENT})"
            )
        end = max(end, t.offset + t.nbytes)
    if total != end:
        raise ManifestError(f"manifest total_bytes is {total}, but its tensors end at byte {end}")
    return tuple(tensors)


@functools.lru_cache(maxsize=16)
def _cached_tensor_table(table: bytes, total: int) -> tuple[TensorEntry, ...]:
    # Safe to share: the result depends only on the arguments, and entries are frozen.
    return _decode_tensor_table(table, total)


def decode_manifest(
    data: bytes,
    *,
    max_manifest_bytes: int = defaults.MAX_MANIFEST_BYTES,
    max_blob_bytes: int = defaults.MAX_BLOB_BYTES,
) -> Manifest:
    """Decode and fully validate a manifest.

    The bytes are walked without decoding first; each field, chunk and tensor
    entry is decoded only once its encoded size is known to be within its cap,
    so memory stays proportional to what a valid manifest of that size needs.

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
    reader = _Reader(_as_bytes(data, max_manifest_bytes, "manifest"), "manifest")
    fields = _manifest_fields(reader)
    spans_of = {name: span for name, (span, _) in fields.items()}
    _missing = object()

    def get(name: str, cap: int = _MAX_SCALAR_BYTES, default: Any = None) -> Any:
        if name not in fields:
            return default
        span, value = fields[name]
        return reader.load(span, cap, f"manifest field {name!r}") if value is _SKIPPED else value

    def need(name: str, kind: type | tuple[type, ...], cap: int = _MAX_SCALAR_BYTES) -> Any:
        value = get(name, cap, _missing)
        return _field({} if value is _missing else {name: value}, name, kind, "manifest")

    fmt = get("format")
    if not _is_format(fmt):
        raise ManifestError(f"manifest has unsupported format {_short(fmt)} (this release reads {FORMAT_VERSION})")
    checksum = get("checksum")
    if checksum != CHECKSUM:
        raise ManifestError(f"manifest uses unknown checksum {_short(checksum)}")
    version = _int(get("version"), "manifest version", 1)
    created = need("created", (int, float))
    if not math.isfinite(created):
        raise ManifestError(f"manifest field 'created' is {created}")
    publisher = need("publisher", dict, defaults.MAX_METADATA_BYTES)
    _check_user_map(publisher, "manifest publisher")
    metadata = need("metadata", dict, defaults.MAX_METADATA_BYTES)
    _check_user_map(metadata, "manifest metadata")
    total = _int(get("total_bytes"), "manifest total_bytes", 0, max_blob_bytes)
    chunk_size = _int(get("chunk_size"), "manifest chunk_size", 1)
    if "chunks" not in spans_of:
        raise ManifestError("manifest has no 'chunks' field")
    chunk_count, raw_chunks = reader.items(spans_of["chunks"], _MAX_CHUNK_ENTRY_BYTES, "manifest field 'chunks'")
    needed = -(-total // chunk_size)
    if chunk_count != needed:
        raise ManifestError(
            f"manifest lists {chunk_count} chunks; {total} bytes in {chunk_size}-byte chunks need {needed}"
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
    if "tensors" not in spans_of:
        raise ManifestError("manifest has no 'tensors' field")
    start, stop = spans_of["tensors"]
    table = reader.view[start:stop]
    if stop - start <= _CACHED_TABLE_BYTES:
        tensors = _cached_tensor_table(bytes(table), total)
    else:
        tensors = _decode_tensor_table(table, total)
    digests = None
    digest_span = spans_of.get("chunk_digests")
    if digest_span is not None and reader.data[digest_span[0]] != 0xC0:  # nil reads as absent
        digest_count, raw_digests = reader.items(digest_span, _MAX_DIGEST_ENTRY_BYTES, "manifest field 'chunk_digests'")
        if digest_count != len(spans):
            raise ManifestError(f"manifest chunk_digests list {digest_count} digests for {len(spans)} chunks")
        checked = []
        for d in raw_digests:
            if not (isinstance(d, bytes) and len(d) == 32):
                raise ManifestError("manifest chunk_digests must be 32-byte digests")
            checked.append(d)
        digests = tuple(checked)
    signature = get("signature")
    if signature is not None and not (isinstance(signature, bytes) and len(signature) == 32):
        raise ManifestError("manifest signature must be 32 bytes")
    return Manifest(
        version=version,
        total_bytes=total,
        chunk_size=chunk_size,
        chunk_checksums=tuple(checksums),
        tensors=tensors,
        created=float(created),
        publisher=publisher,
        metadata=metadata,
        chunk_digests=digests,
        signature=signature,
    )
