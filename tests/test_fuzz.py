"""Property tests of the decoders: whatever bytes arrive, only ``ManifestError`` comes out.

A decode that succeeds must return a fully consistent manifest (every
invariant is checked again here, independently of the decoder), and hostile
input must be refused quickly without allocating what it declares.
"""

from __future__ import annotations

import math
import os
import pickle
import time
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from redisbus import defaults
from redisbus.errors import ManifestError
from redisbus.wire import (
    DTYPES,
    FORMAT_VERSION,
    Manifest,
    Notice,
    chunk_checksum,
    chunk_spans,
    decode_manifest,
    decode_notice,
    encode_manifest,
    encode_notice,
    manifest_digest,
    plan_layout,
)

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
#: Cheap cases (random bytes): many of them.
MANY = settings(deadline=None, max_examples=1500, suppress_health_check=_HEALTH)
#: Cases built from a generated valid manifest (each costs ~5 ms to generate): fewer.
FUZZ = settings(deadline=None, max_examples=600, suppress_health_check=_HEALTH)
FEW = settings(deadline=None, max_examples=200, suppress_health_check=_HEALTH)
#: A single decode of fuzz input (at most a few KiB) must finish well inside this.
SLOW_SECONDS = 2.0

# ---------------------------------------------------------------- invariants


def check_manifest(m: Manifest, max_blob_bytes: int = defaults.MAX_BLOB_BYTES) -> None:
    """Everything a worker relies on, rechecked from scratch."""
    assert isinstance(m.version, int) and not isinstance(m.version, bool) and m.version >= 1
    assert isinstance(m.total_bytes, int) and 0 <= m.total_bytes <= max_blob_bytes
    assert isinstance(m.chunk_size, int) and m.chunk_size >= 1
    assert isinstance(m.created, float) and math.isfinite(m.created)
    assert isinstance(m.publisher, dict) and isinstance(m.metadata, dict)
    spans = chunk_spans(m.total_bytes, m.chunk_size)
    assert len(m.chunk_checksums) == len(spans) == -(-m.total_bytes // m.chunk_size)
    assert all(isinstance(c, int) and 0 <= c < 2**64 for c in m.chunk_checksums)
    if m.chunk_digests is not None:
        assert len(m.chunk_digests) == len(spans)
        assert all(isinstance(d, bytes) and len(d) == 32 for d in m.chunk_digests)
    assert m.signature is None or (isinstance(m.signature, bytes) and len(m.signature) == 32)
    keys = set()
    end = 0
    for t in sorted(m.tensors, key=lambda t: t.offset):
        assert isinstance(t.key, tuple) and t.key and all(isinstance(p, str) and p for p in t.key)
        assert t.key not in keys
        keys.add(t.key)
        assert t.dtype in DTYPES
        itemsize = DTYPES[t.dtype].itemsize
        assert all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in t.shape)
        assert math.prod(t.shape) * itemsize == t.nbytes
        assert t.offset % itemsize == 0
        assert 0 <= t.offset and t.offset + t.nbytes <= m.total_bytes
        if t.nbytes:
            assert t.offset >= end, "overlap"
        end = max(end, t.offset + t.nbytes)
    assert end == m.total_bytes
    # what decodes, encodes again to the same thing
    again = encode_manifest(m)
    assert encode_manifest(decode_manifest(again, max_blob_bytes=max_blob_bytes)) == again


def try_manifest(data: bytes, **limits: int) -> Manifest | None:
    start = time.perf_counter()
    try:
        m = decode_manifest(data, **limits)
    except ManifestError as exc:
        assert str(exc)
        assert len(str(exc)) < 4096, "error messages stay short"
        m = None
    assert time.perf_counter() - start < SLOW_SECONDS
    if m is not None:
        check_manifest(m, limits.get("max_blob_bytes", defaults.MAX_BLOB_BYTES))
    return m


def try_notice(data: bytes) -> Notice | None:
    try:
        n = decode_notice(data)
    except ManifestError as exc:
        assert len(str(exc)) < 4096
        return None
    assert isinstance(n.version, int) and not isinstance(n.version, bool) and n.version >= 1
    assert isinstance(n.total_bytes, int) and not isinstance(n.total_bytes, bool) and n.total_bytes >= 0
    assert isinstance(n.digest, str)
    assert len(data) <= defaults.MAX_NOTICE_BYTES
    return n


# ---------------------------------------------------------------- strategies

DTYPE_NAMES = sorted(DTYPES)
key_parts = st.text(st.characters(codec="utf-8", exclude_characters="."), min_size=1, max_size=8)
keys = st.lists(key_parts, min_size=1, max_size=4).map(tuple)
shapes = st.lists(st.integers(0, 6), max_size=4).map(tuple)
specs_strategy = st.lists(
    st.tuples(keys, st.sampled_from(DTYPE_NAMES).map(DTYPES.__getitem__), shapes),
    max_size=8,
    unique_by=lambda s: s[0],
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=16)
    | st.binary(max_size=16)
)
metadata_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def valid_manifests(draw: st.DrawFn) -> Manifest:
    specs = draw(specs_strategy)
    alignment = draw(st.sampled_from([1, 8, 16, 64]))
    entries, total = plan_layout(specs, alignment=alignment)
    chunk_size = draw(st.integers(1, 512))
    count = len(chunk_spans(total, chunk_size))
    seed = draw(st.integers(0, 2**64 - 1))
    checksums = tuple((seed * (i + 1)) % 2**64 for i in range(count))
    signed = draw(st.booleans())
    return Manifest(
        version=draw(st.integers(1, 2**63)),
        total_bytes=total,
        chunk_size=chunk_size,
        chunk_checksums=checksums,
        tensors=tuple(entries),
        created=draw(st.floats(0, 2e9)),
        publisher={"id": draw(st.text(max_size=8)), "pid": draw(st.integers(0, 2**31))},
        metadata=draw(st.dictionaries(st.text(max_size=8), metadata_values, max_size=4)),
        chunk_digests=tuple(bytes([i % 256]) * 32 for i in range(count)) if signed else None,
        signature=draw(st.binary(min_size=32, max_size=32)) if signed else None,
    )


def deep_list(depth: int) -> bytes:
    """msgpack of ``[[[...None...]]]`` nested ``depth`` deep, built by hand (no recursion anywhere)."""
    return b"\x91" * depth + b"\xc0"


#: Values that break naive decoders: wrong types, extremes, deep nesting, big containers.
nasty = (
    scalars
    | st.integers(2**31 - 1, 2**64 - 1)
    | st.integers(-(2**63), -1)
    | st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 2**60, 2**63, 2**64 - 1, -(2**63)])
    | st.lists(st.integers(0, 2**40), max_size=70)
    | st.dictionaries(st.text(max_size=6), scalars, max_size=4)
    | st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=20)
    | st.sampled_from(["complex32", "object", "float128", "", "xxh3_64", "float32", "bool"])
)

TOP_FIELDS = ["format", "version", "created", "publisher", "metadata", "total_bytes", "chunk_size", "checksum",
              "chunks", "tensors", "chunk_digests", "signature"]
TENSOR_FIELDS = ["key", "dtype", "shape", "offset", "nbytes"]
#: Fields to mutate, the ones deepest in the validation first (hypothesis favours early choices).
MUTATED_FIELDS = ["tensors", "chunks", "chunk_digests", "signature", "chunk_size", "total_bytes", "metadata",
                  "publisher", "created", "version", "checksum", "format"]
DEEP = object()  # placeholder replaced by a hand-built deep list after packing
DEEP_MARK = "\u0000DEEP\u0000"


def pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def base_body(manifest: Manifest) -> dict[str, Any]:
    return manifest.to_wire()


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    body = base_body(draw(valid_manifests()))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["tensor", "key", "chunk", "top", "extra", "delete"]))
        value = draw(nasty | st.just(DEEP))
        value = DEEP_MARK if value is DEEP else value
        if where == "top":
            body[draw(st.sampled_from(MUTATED_FIELDS))] = value
        elif where == "delete":
            body.pop(draw(st.sampled_from(MUTATED_FIELDS)), None)
        elif where == "extra":
            body[draw(st.text(max_size=10))] = value
        elif where == "tensor" and isinstance(body.get("tensors"), list) and body["tensors"]:
            i = draw(st.integers(0, len(body["tensors"]) - 1))
            if isinstance(body["tensors"][i], dict):
                body["tensors"][i] = {**body["tensors"][i], draw(st.sampled_from(TENSOR_FIELDS)): value}
        elif where == "key" and isinstance(body.get("tensors"), list) and body["tensors"]:
            i = draw(st.integers(0, len(body["tensors"]) - 1))
            if isinstance(body["tensors"][i], dict) and isinstance(body["tensors"][i].get("key"), list):
                key = list(body["tensors"][i]["key"])
                key[draw(st.integers(0, len(key) - 1))] = value
                body["tensors"][i] = {**body["tensors"][i], "key": key}
        elif where == "chunk" and isinstance(body.get("chunks"), list) and body["chunks"]:
            i = draw(st.integers(0, len(body["chunks"]) - 1))
            chunk = list(body["chunks"][i]) if isinstance(body["chunks"][i], list) else []
            chunk += [0] * (2 - len(chunk))  # an earlier mutation may have left a shorter list here
            chunk[draw(st.integers(0, 1))] = value
            body["chunks"][i] = chunk
    data = pack(body)
    mark = pack(DEEP_MARK)
    if mark in data:
        data = data.replace(mark, deep_list(draw(st.sampled_from([10, 40, 600, 1000, 1023, 1500, 5000]))))
    return data


# ---------------------------------------------------------------- valid input


@FEW
@given(valid_manifests())
def test_valid_manifests_round_trip(manifest: Manifest) -> None:
    data = encode_manifest(manifest)
    decoded = decode_manifest(data)
    assert decoded == manifest
    check_manifest(decoded)


@FEW
@given(specs_strategy, st.integers(1, 64))
def test_real_blob_checksums_verify(specs: list[Any], chunk_size: int) -> None:
    entries, total = plan_layout(specs)
    blob = os.urandom(total)
    checksums = tuple(chunk_checksum(blob[a:b]) for a, b in chunk_spans(total, chunk_size))
    decoded = decode_manifest(encode_manifest(Manifest(1, total, chunk_size, checksums, tuple(entries))))
    from redisbus.wire import verify_chunks

    verify_chunks(decoded, memoryview(blob))


# ---------------------------------------------------------------- hostile input


@MANY
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    try_manifest(data)
    try_notice(data)


@MANY
@given(st.binary(min_size=1, max_size=200).map(lambda b: bytes([0x80 | (b[0] % 16)]) + b[1:]))
def test_random_bytes_that_start_like_a_map(data: bytes) -> None:
    try_manifest(data)
    try_notice(data)


@FEW
@given(valid_manifests(), st.data())
def test_truncations_of_valid_manifests(manifest: Manifest, data: st.DataObject) -> None:
    encoded = encode_manifest(manifest)
    cuts = data.draw(st.lists(st.integers(0, len(encoded) - 1), min_size=1, max_size=20))
    for cut in cuts:
        with pytest.raises(ManifestError):
            decode_manifest(encoded[:cut])


def test_every_truncation_of_one_rich_manifest() -> None:
    entries, total = plan_layout([(("a", "w"), torch.float32, (3, 5)), (("b",), torch.bool, ()), (("c",), torch.int64, (0,))])
    m = Manifest(9, total, 16, tuple(range(len(chunk_spans(total, 16)))), tuple(entries), metadata={"k": [1, "x", b"y"]},
                 chunk_digests=tuple(b"d" * 32 for _ in chunk_spans(total, 16)), signature=b"s" * 32)
    encoded = encode_manifest(m)
    for cut in range(len(encoded)):
        with pytest.raises(ManifestError):
            decode_manifest(encoded[:cut])
    notice = encode_notice(Notice(9, total, manifest_digest(encoded)))
    for cut in range(len(notice)):
        with pytest.raises(ManifestError):
            decode_notice(notice[:cut])


@FUZZ
@given(mutated_bodies())
def test_valid_manifests_with_mutated_fields(data: bytes) -> None:
    try_manifest(data)
    try_manifest(data, max_blob_bytes=1024)


@FUZZ
@given(valid_manifests(), st.data())
def test_valid_manifests_with_mutated_bytes(manifest: Manifest, data: st.DataObject) -> None:
    encoded = bytearray(encode_manifest(manifest))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = data.draw(st.integers(0, len(encoded) - 1))
        if op == "flip":
            encoded[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            encoded[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            encoded[i:i] = data.draw(st.binary(min_size=1, max_size=9))
        elif len(encoded) > 1:
            del encoded[i]
    try_manifest(bytes(encoded))


@FUZZ
@given(valid_manifests(), st.binary(min_size=1, max_size=12), st.sampled_from(["key", "field", "metadata", "dtype"]))
def test_invalid_utf8_strings(manifest: Manifest, raw: bytes, where: str) -> None:
    """msgpack raw str headers around bytes that are not UTF-8, anywhere a string goes."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        raw = b"\xff" + raw[:-1] if len(raw) > 1 else b"\xff"
    body = base_body(manifest)
    placeholder = "\u0007" * len(raw)
    if where == "key" and body["tensors"]:
        body["tensors"][0] = {**body["tensors"][0], "key": [*body["tensors"][0]["key"][:-1], placeholder]}
    elif where == "dtype" and body["tensors"]:
        body["tensors"][0] = {**body["tensors"][0], "dtype": placeholder}
    elif where == "metadata":
        body["metadata"] = {**body["metadata"], placeholder: 1}
    else:
        body[placeholder] = 1
    data = pack(body)
    needle = pack(placeholder)
    assume(data.count(needle) == 1)
    hostile = data.replace(needle, needle[: len(needle) - len(raw)] + raw)
    with pytest.raises(ManifestError):
        decode_manifest(hostile)


@MANY
@given(
    st.dictionaries(
        st.sampled_from(["format", "v", "n", "d", "x"]) | st.text(max_size=4),
        nasty,
        max_size=6,
    )
)
def test_mutated_notices(body: dict[str, Any]) -> None:
    try:
        data = pack(body)
    except (ValueError, OverflowError):
        return
    notice = try_notice(data)
    if notice is not None:
        assert body["format"] == FORMAT_VERSION and type(body["format"]) is int
        assert (notice.version, notice.total_bytes, notice.digest) == (body["v"], body["n"], body["d"])


@FEW
@given(st.integers(1, 2**63), st.integers(0, 2**63), st.text(max_size=200), st.binary(min_size=1, max_size=30))
def test_notice_fields_and_invalid_utf8(version: int, size: int, digest: str, raw: bytes) -> None:
    data = encode_notice(Notice(version, size, digest))
    if len(data) <= defaults.MAX_NOTICE_BYTES:
        assert decode_notice(data) == Notice(version, size, digest)
    else:
        with pytest.raises(ManifestError, match="over the limit"):
            decode_notice(data)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        placeholder = "\u0007" * len(raw)
        needle = pack(placeholder)
        good = pack({"format": FORMAT_VERSION, "v": 1, "n": 1, "d": placeholder})
        hostile = good.replace(needle, needle[: len(needle) - len(raw)] + raw)
        with pytest.raises(ManifestError, match="not valid msgpack"):
            decode_notice(hostile)


# ---------------------------------------------------------------- declared sizes are never allocated


#: Fixed cost of a decode whatever the input: msgpack unpackers carry a 1024-level parse stack each.
BASE_BUDGET = 1 << 20


def bounded(data: bytes, per_byte: int = 0, *, accept: bool = False, **limits: int) -> ManifestError | None:
    """Decode under tracemalloc: refused (or, with ``accept``, maybe accepted), quickly, with a small peak.

    The peak allowed is ``BASE_BUDGET + per_byte * len(data)``: a decoder that allocated what the
    input declares (gigabytes) or built a Python object per input byte (~64x) would blow it.
    """
    error = None
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = time.perf_counter()
        try:
            decode_manifest(data, **limits)
        except ManifestError as exc:
            error = exc
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert accept or error is not None, "hostile manifest accepted"
    budget = BASE_BUDGET + per_byte * len(data)
    assert peak < budget, f"peak allocation {peak} bytes for {len(data)} bytes of input"
    assert elapsed < SLOW_SECONDS
    return error


def small_body(**changes: Any) -> dict[str, Any]:
    entries, total = plan_layout([(("w",), torch.float32, (4,))])
    body = Manifest(1, total, 1024, (chunk_checksum(bytes(total)),), tuple(entries), created=1.0).to_wire()
    body.update(changes)
    return body


@pytest.mark.parametrize("total", [2**31, 2**40, 2**60, 2**64 - 1])
def test_huge_declared_total_is_refused_without_allocating(total: int) -> None:
    body = small_body(total_bytes=total, chunk_size=total, chunks=[[total, 0]])
    bounded(pack(body))
    body = small_body(total_bytes=total, chunk_size=1, chunks=[[1, 0]])  # 2**60 one-byte chunks declared
    bounded(pack(body), max_blob_bytes=2**64)


@pytest.mark.parametrize("shape", [[2**31], [2**31, 2**31], [2**62, 2**62, 2**62], [0, 2**63 - 1], [2**16] * 64])
def test_huge_declared_shape_is_refused_without_allocating(shape: list[int]) -> None:
    numel = math.prod(shape)
    tensor = {"key": ["w"], "dtype": "float32", "shape": shape, "offset": 0, "nbytes": min(numel * 4, 2**64 - 1)}
    bounded(pack(small_body(tensors=[tensor])))
    bounded(pack(small_body(tensors=[{**tensor, "nbytes": 16}])))


@pytest.mark.parametrize(
    "field",
    ["tensors", "chunks", "metadata", "publisher", "chunk_digests", "unknown", "top"],
)
@pytest.mark.parametrize("filler", [b"\x90", b"\x80", b"\xa2ab", b"\xcd\x01\x00"])
def test_tiny_objects_do_not_amplify(field: str, filler: bytes) -> None:
    """1 MiB of one-byte empty lists would be ~64 MiB of Python objects if decoded blindly."""
    count = (1 << 20) // len(filler)
    array = b"\xdd" + count.to_bytes(4, "big") + filler * count
    if field == "top":
        data = array
    else:
        body = small_body()
        body.pop(field, None)
        head = pack(body)
        value = (b"\x81\xa1x" + array) if field in ("metadata", "publisher") else array
        data = bytes([head[0] + 1]) + head[1:] + pack(field) + value
    bounded(data, 3, accept=field == "unknown")


def test_deep_nesting_is_refused_anywhere() -> None:
    for depth in (100, 1000, 1023, 1024, 1025, 100_000):
        deep = deep_list(depth)
        assert isinstance(bounded(deep), ManifestError)
        for field in TOP_FIELDS + ["unknown"]:
            body = small_body()
            body[field] = DEEP_MARK
            bounded(pack(body).replace(pack(DEEP_MARK), deep), 3, accept=field == "unknown")
        body = small_body()
        body["tensors"] = [{**body["tensors"][0], "key": ["w", DEEP_MARK]}]
        bounded(pack(body).replace(pack(DEEP_MARK), deep), 3)
        with pytest.raises(ManifestError):
            decode_notice(deep[: defaults.MAX_NOTICE_BYTES])


def test_huge_container_headers_are_refused_quickly() -> None:
    """Headers that declare 2**32-1 elements with nothing behind them."""
    for header in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"):
        bounded(header)
        for field in ("tensors", "chunks", "metadata", "unknown"):
            body = small_body()
            body[field] = DEEP_MARK
            bounded(pack(body).replace(pack(DEEP_MARK), header))
        with pytest.raises(ManifestError):
            decode_notice(header)


def test_valid_large_manifest_decodes_in_proportion() -> None:
    specs = [((f"layer{i}", "weight"), torch.float32, (4, 4)) for i in range(10_000)]
    entries, total = plan_layout(specs)
    m = Manifest(1, total, 4096, tuple(range(len(chunk_spans(total, 4096)))), tuple(entries))
    data = encode_manifest(m)
    tracemalloc.start()
    try:
        assert decode_manifest(data) == m
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * len(data)


# ---------------------------------------------------------------- no pickle, ever


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_payloads_are_refused_and_never_run(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker), protocol=protocol)
    pickle.loads(payload)  # the payload works: loading it with pickle would create the marker
    assert marker.exists()
    marker.unlink()

    plants = [
        payload,
        payload[: defaults.MAX_NOTICE_BYTES],
        pack(payload),  # a bin holding the pickle
        pack({"format": 1, "pickle": payload}),
        pack(small_body(metadata={"state": payload}, tensors=payload)),
        pack(small_body(tensors=[payload])),
        pack({"format": 1, "v": 1, "n": 1, "d": payload}),
        msgpack.packb(msgpack.ExtType(1, payload)),
        pack(small_body(metadata={"ext": DEEP_MARK})).replace(pack(DEEP_MARK), msgpack.packb(msgpack.ExtType(42, payload))),
    ]
    for data in plants:
        with pytest.raises(ManifestError):
            decode_manifest(data)
        with pytest.raises(ManifestError):
            decode_notice(data)
    # bytes in metadata stay inert bytes: accepted as data, never unpickled
    inert = decode_manifest(pack(small_body(metadata={"state": payload})))
    assert inert.metadata["state"] == payload
    assert not marker.exists()

