"""The wire format: layout, chunking, manifest and notice round trips, and every refusal.

Each refusal is a ``ManifestError`` whose message names the problem; nothing
else may escape the decoders.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
import torch

from redisbus import defaults
from redisbus.errors import CorruptBlobError, ManifestError
from redisbus.wire import (
    CHECKSUM,
    DTYPES,
    FORMAT_VERSION,
    Manifest,
    Notice,
    TensorEntry,
    chunk_checksum,
    chunk_spans,
    decode_manifest,
    decode_notice,
    encode_manifest,
    encode_notice,
    manifest_digest,
    plan_layout,
    verify_chunks,
)

# ---------------------------------------------------------------- helpers


def blob_of(total: int) -> bytes:
    return bytes((i * 31 + 7) % 251 for i in range(total))


def make_manifest(
    specs: list[tuple[tuple[str, ...], torch.dtype, tuple[int, ...]]] | None = None,
    *,
    chunk_size: int = 64,
    version: int = 7,
    **kwargs: Any,
) -> tuple[Manifest, bytes]:
    if specs is None:
        specs = [(("w",), torch.float32, (4, 3)), (("b",), torch.float32, (3,))]
    entries, total = plan_layout(specs)
    blob = blob_of(total)
    checksums = tuple(chunk_checksum(blob[a:b]) for a, b in chunk_spans(total, chunk_size))
    return Manifest(version, total, chunk_size, checksums, tuple(entries), created=1234.5, **kwargs), blob


def wire_body(**kwargs: Any) -> dict[str, Any]:
    manifest, _ = make_manifest(**kwargs)
    return manifest.to_wire()


def pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def refused(body_or_bytes: Any, match: str, **limits: int) -> ManifestError:
    data = body_or_bytes if isinstance(body_or_bytes, (bytes, bytearray, memoryview)) else pack(body_or_bytes)
    with pytest.raises(ManifestError, match=match) as info:
        decode_manifest(data, **limits)
    return info.value


def with_tensor(body: dict[str, Any], index: int = 0, **changes: Any) -> dict[str, Any]:
    tensors = [dict(t) for t in body["tensors"]]
    tensors[index].update(changes)
    return {**body, "tensors": tensors}


def manifest_with(tensors: list[dict[str, Any]], total: int, chunk_size: int = 64) -> dict[str, Any]:
    """A wire body with the given raw tensor entries and a consistent chunk list."""
    spans = chunk_spans(total, chunk_size)
    return {
        "format": FORMAT_VERSION,
        "version": 1,
        "created": 1.0,
        "publisher": {},
        "metadata": {},
        "total_bytes": total,
        "chunk_size": chunk_size,
        "checksum": CHECKSUM,
        "chunks": [[b - a, 0] for a, b in spans],
        "tensors": tensors,
    }


def entry(key: list[Any], dtype: str, shape: list[int], offset: int, nbytes: int) -> dict[str, Any]:
    return {"key": key, "dtype": dtype, "shape": shape, "offset": offset, "nbytes": nbytes}


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_allowed_dtype_round_trips(name: str) -> None:
    dtype = DTYPES[name]
    manifest, _ = make_manifest([(("t",), dtype, (3, 2)), (("s",), dtype, ()), (("e",), dtype, (0, 4))])
    decoded = decode_manifest(encode_manifest(manifest))
    assert decoded == manifest
    assert [t.torch_dtype for t in decoded.tensors] == [dtype] * 3
    assert decoded.tensors[0].nbytes == 6 * dtype.itemsize


def test_allow_list_has_the_interesting_dtypes() -> None:
    for name in ("bfloat16", "bool", "float16", "uint8", "int64", "complex64"):
        assert name in DTYPES
    for name in ("float8_e4m3fn", "float8_e5m2"):
        assert (name in DTYPES) == hasattr(torch, name)


def test_zero_d_zero_size_and_nested_keys_round_trip() -> None:
    specs = [
        (("policy", "encoder", "layer0", "weight"), torch.float32, (5, 3)),
        (("policy", "encoder", "layer0", "bias"), torch.float32, (5,)),
        (("scalar",), torch.float64, ()),
        (("empty",), torch.int8, (0,)),
        (("wide_empty",), torch.float32, (0, 100_000)),  # more elements per row than the blob has bytes
        (("flag",), torch.bool, ()),
        (("policy", "head"), torch.bfloat16, (2, 2)),
    ]
    manifest, _ = make_manifest(specs, chunk_size=16)
    decoded = decode_manifest(encode_manifest(manifest))
    assert decoded == manifest
    shapes = {t.key: t.shape for t in decoded.tensors}
    assert shapes[("scalar",)] == ()
    assert shapes[("wide_empty",)] == (0, 100_000)
    assert shapes[("policy", "encoder", "layer0", "weight")] == (5, 3)
    assert all(isinstance(t, TensorEntry) for t in decoded.tensors)


def test_only_zero_size_tensors_and_no_tensors_round_trip() -> None:
    for specs in ([(("e",), torch.float32, (0, 5))], []):
        manifest, _ = make_manifest(specs)
        assert manifest.total_bytes == 0 and manifest.chunk_count == 0
        assert decode_manifest(encode_manifest(manifest)) == manifest


def test_metadata_publisher_digests_and_signature_round_trip() -> None:
    metadata = {"step": 1000, "loss": 0.25, "tags": ["a", "b"], "blob": b"\x00\xff", "nested": {"x": [1, {"y": None}]}}
    manifest, _ = make_manifest(
        publisher={"id": "trainer-0", "host": "h", "pid": 1},
        metadata=metadata,
    )
    digests = tuple(bytes([i]) * 32 for i in range(manifest.chunk_count))
    from dataclasses import replace

    manifest = replace(manifest, chunk_digests=digests, signature=b"s" * 32)
    decoded = decode_manifest(encode_manifest(manifest))
    assert decoded == manifest
    assert decoded.metadata == metadata
    assert decoded.publisher["id"] == "trainer-0"
    assert decoded.chunk_digests == digests and decoded.signature == b"s" * 32


def test_manifest_decodes_from_memoryview_and_bytearray() -> None:
    manifest, _ = make_manifest()
    data = encode_manifest(manifest)
    assert decode_manifest(memoryview(data)) == manifest
    assert decode_manifest(bytearray(data)) == manifest


def test_notice_round_trip_and_size() -> None:
    manifest, _ = make_manifest()
    data = encode_manifest(manifest)
    notice = Notice(manifest.version, manifest.total_bytes, manifest_digest(data))
    encoded = encode_notice(notice)
    assert len(encoded) < 1024
    assert decode_notice(encoded) == notice
    big = Notice(2**63, 2**40, manifest_digest(b""))
    assert decode_notice(encode_notice(big)) == big


def test_manifest_digest_changes_with_content() -> None:
    a, _ = make_manifest(version=1)
    b, _ = make_manifest(version=2)
    assert manifest_digest(encode_manifest(a)) != manifest_digest(encode_manifest(b))
    assert manifest_digest(encode_manifest(a)) == manifest_digest(encode_manifest(a))


# ---------------------------------------------------------------- layout and chunks


def test_plan_layout_aligns_every_offset() -> None:
    specs = [
        (("a",), torch.uint8, (3,)),
        (("b",), torch.float64, (5,)),
        (("c",), torch.bool, ()),
        (("d",), torch.float32, (0,)),
        (("e",), torch.complex128, (2,)),
    ]
    entries, total = plan_layout(specs)
    assert [e.offset for e in entries] == [0, 64, 128, 192, 192]
    assert [e.nbytes for e in entries] == [3, 40, 1, 0, 32]
    assert total == 224
    for e, (_, dtype, shape) in zip(entries, specs):
        assert e.offset % defaults.ALIGNMENT == 0
        assert e.offset % dtype.itemsize == 0
        assert e.nbytes == math.prod(shape) * dtype.itemsize
    entries8, total8 = plan_layout(specs, alignment=8)
    # complex128 needs 16: an alignment below the itemsize never misaligns a tensor
    assert [e.offset for e in entries8] == [0, 8, 48, 56, 64] and total8 == 96
    for e, (_, dtype, _) in zip(entries8, specs):
        assert e.offset % dtype.itemsize == 0


def test_plan_layout_trailing_empty_tensor_and_empty_input() -> None:
    entries, total = plan_layout([(("a",), torch.uint8, (3,)), (("z",), torch.float32, (0,))])
    assert entries[1].offset == 64 and total == 64
    assert plan_layout([]) == ([], 0)


def test_plan_layout_refuses_unlisted_dtype_and_bad_alignment() -> None:
    with pytest.raises(ManifestError, match="allow-list"):
        plan_layout([(("q",), torch.quint8, (2,))])
    for alignment in (0, 3, 48, 8192, -64):
        with pytest.raises(ValueError, match="alignment"):
            plan_layout([], alignment=alignment)


def test_plan_layout_small_alignment_still_aligns_to_itemsize() -> None:
    entries, total = plan_layout(
        [(("a",), torch.uint8, (3,)), (("b",), torch.complex128, (0,)), (("c",), torch.float64, (1,))], alignment=1
    )
    assert [e.offset for e in entries] == [0, 16, 16] and total == 24


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunk_spans_at_edges(chunk: int) -> None:
    for total in {0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 2}:
        if total < 0:
            continue
        spans = chunk_spans(total, chunk)
        assert len(spans) == -(-total // chunk)
        assert sum(b - a for a, b in spans) == total
        assert all(0 < b - a <= chunk for a, b in spans)
        assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
        if spans:
            assert spans[0][0] == 0 and spans[-1][1] == total
    assert chunk_spans(0, chunk) == []
    assert chunk_spans(1, chunk) == [(0, 1)]
    assert chunk_spans(chunk, chunk) == [(0, chunk)]
    assert chunk_spans(chunk + 1, chunk) == [(0, chunk), (chunk, chunk + 1)]


def test_verify_chunks_accepts_the_right_blob() -> None:
    manifest, blob = make_manifest(chunk_size=16)
    verify_chunks(manifest, memoryview(blob))
    verify_chunks(manifest, memoryview(bytearray(blob)))
    verify_chunks(manifest, memoryview(blob), indices=[0, manifest.chunk_count - 1])


def test_verify_chunks_names_the_flipped_chunk() -> None:
    manifest, blob = make_manifest(chunk_size=16)
    assert manifest.chunk_count >= 3
    for index, (start, stop) in enumerate(manifest.spans()):
        for position in (start, (start + stop) // 2, stop - 1):
            bad = bytearray(blob)
            bad[position] ^= 0x10
            with pytest.raises(CorruptBlobError, match=rf"chunk {index} \(bytes {start}-{stop}\)"):
                verify_chunks(manifest, memoryview(bad))


def test_verify_chunks_refuses_a_short_blob() -> None:
    manifest, blob = make_manifest(chunk_size=16)
    with pytest.raises(CorruptBlobError, match="bytes"):
        verify_chunks(manifest, memoryview(blob[:-1]))


# ---------------------------------------------------------------- refusals: framing


def test_refuses_oversized_manifest_unread() -> None:
    data = encode_manifest(make_manifest()[0])
    refused(data, "over the limit", max_manifest_bytes=len(data) - 1)
    assert decode_manifest(data, max_manifest_bytes=len(data)).version == 7


def test_refuses_non_bytes() -> None:
    with pytest.raises(ManifestError, match="not bytes"):
        decode_manifest("not bytes")  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match="not bytes"):
        decode_notice(None)  # type: ignore[arg-type]


def test_refuses_every_truncation() -> None:
    data = encode_manifest(make_manifest()[0])
    for cut in range(len(data)):
        with pytest.raises(ManifestError):
            decode_manifest(data[:cut])
    refused(b"", "empty")
    refused(data[: len(data) // 2], "truncated")


def test_refuses_trailing_bytes() -> None:
    data = encode_manifest(make_manifest()[0])
    refused(data + b"\x00", "after its map")


@pytest.mark.parametrize("value", [[1, 2], "manifest", 5, None, 1.5, b"raw", True])
def test_refuses_not_a_map(value: Any) -> None:
    refused(value, "not a map")


def test_refuses_invalid_msgpack() -> None:
    refused(b"\xc1", "not valid msgpack")
    refused(b"\x81\xa6format\xc1", "not valid msgpack")


@pytest.mark.parametrize("fmt", [0, 2, -1, "1", True, 1.0, None, [1]])
def test_refuses_unknown_format_version(fmt: Any) -> None:
    refused({**wire_body(), "format": fmt}, "unsupported format")


def test_refuses_missing_format() -> None:
    body = wire_body()
    del body["format"]
    refused(body, "unsupported format")


@pytest.mark.parametrize("checksum", ["crc32", "", None, 64, b"xxh3_64"])
def test_refuses_unknown_checksum(checksum: Any) -> None:
    refused({**wire_body(), "checksum": checksum}, "unknown checksum")


def test_refuses_duplicate_and_non_string_field_names() -> None:
    body = wire_body()
    data = pack(body)
    # same map with one more "version" entry: bump the fixmap count and append a pair
    assert data[0] == 0x80 | len(body)
    refused(bytes([data[0] + 1]) + data[1:] + pack("version") + pack(8), "'version' twice")
    refused(bytes([data[0] + 1]) + data[1:] + pack(5) + pack(8), "int field name")


def test_unknown_fields_are_ignored() -> None:
    manifest, _ = make_manifest()
    assert decode_manifest(pack({**manifest.to_wire(), "future": [1, 2, {"x": 3}]})) == manifest


def test_refuses_too_many_fields() -> None:
    body = wire_body()
    body.update({f"extra{i}": i for i in range(64)})
    refused(body, "fields")


# ---------------------------------------------------------------- refusals: scalars


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("version", 0, "version = 0 is out of range"),
        ("version", -3, "version = -3 is out of range"),
        ("version", True, "version is a bool"),
        ("version", 1.0, "version is a float"),
        ("version", "7", "version is a str"),
        ("version", None, "version is a NoneType"),
        ("created", "yesterday", "'created' has type str"),
        ("created", True, "'created' has type bool"),
        ("created", float("nan"), "'created' is nan"),
        ("created", float("inf"), "'created' is inf"),
        ("publisher", [], "'publisher' has type list"),
        ("metadata", "x", "'metadata' has type str"),
        ("total_bytes", -1, "total_bytes = -1 is out of range"),
        ("total_bytes", False, "total_bytes is a bool"),
        ("total_bytes", 60.0, "total_bytes is a float"),
        ("chunk_size", 0, "chunk_size = 0 is out of range"),
        ("chunk_size", -64, "chunk_size = -64 is out of range"),
        ("chunk_size", True, "chunk_size is a bool"),
        ("chunks", {}, "'chunks' has type dict"),
        ("tensors", "w", "'tensors' has type str"),
        ("signature", b"short", "signature must be 32 bytes"),
        ("signature", "x" * 32, "signature must be 32 bytes"),
    ],
)
def test_refuses_bad_scalar_fields(field: str, value: Any, match: str) -> None:
    refused({**wire_body(), field: value}, match)


@pytest.mark.parametrize("field", ["created", "publisher", "metadata", "chunks", "tensors"])
def test_refuses_missing_required_field(field: str) -> None:
    body = wire_body()
    del body[field]
    refused(body, f"no '{field}' field")


@pytest.mark.parametrize("field", ["version", "total_bytes", "chunk_size"])
def test_refuses_missing_integer_field(field: str) -> None:
    body = wire_body()
    del body[field]
    refused(body, f"{field} is a NoneType")


def test_refuses_huge_declared_total_quickly() -> None:
    for total in (2**60, 2**64 - 1, defaults.MAX_BLOB_BYTES + 1):
        body = {**wire_body(), "total_bytes": total, "chunk_size": total, "chunks": [[total, 0]]}
        refused(body, "total_bytes = .* is out of range")
    body = {**wire_body(), "total_bytes": 1 << 20, "chunk_size": 1 << 20, "chunks": [[1 << 20, 0]]}
    refused(body, "out of range", max_blob_bytes=(1 << 20) - 1)


def test_refuses_total_larger_than_its_tensors() -> None:
    body = wire_body()
    total = body["total_bytes"] + 10**6
    body = {**body, "total_bytes": total, "chunk_size": total, "chunks": [[total, 0]]}
    refused(body, "tensors end at byte")


def test_refuses_oversized_metadata_and_deep_nesting() -> None:
    refused({**wire_body(), "metadata": {"x": "y" * defaults.MAX_METADATA_BYTES}}, "'metadata' is .* over its limit")
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    refused({**wire_body(), "metadata": {"x": deep}}, "metadata nests deeper")
    refused({**wire_body(), "publisher": {"x": deep}}, "publisher nests deeper")


def test_refuses_oversized_scalar_field() -> None:
    refused({**wire_body(), "checksum": "x" * 1000}, "'checksum' is .* over its limit")


# ---------------------------------------------------------------- refusals: chunks


def test_refuses_wrong_chunk_count() -> None:
    body = wire_body(chunk_size=16)
    refused({**body, "chunks": body["chunks"][:-1]}, r"lists \d+ chunks; .* need \d+")
    refused({**body, "chunks": body["chunks"] + [[1, 0]]}, r"lists \d+ chunks; .* need \d+")
    refused({**body, "chunks": []}, "lists 0 chunks")


def test_refuses_chunk_size_not_matching_layout() -> None:
    body = wire_body(chunk_size=16)
    chunks = [list(c) for c in body["chunks"]]
    chunks[1][0] = 15
    refused({**body, "chunks": chunks}, "chunk 1 claims 15 bytes; the layout says 16")
    chunks = [list(c) for c in body["chunks"]]
    chunks[-1][0] = 16  # the last chunk is short
    last = len(chunks) - 1
    refused({**body, "chunks": chunks}, f"chunk {last} claims 16 bytes")


@pytest.mark.parametrize(
    ("chunk", "match"),
    [
        ([16], r"not a \[size, checksum\] pair"),
        ([16, 0, 0], r"not a \[size, checksum\] pair"),
        ({"size": 16}, r"not a \[size, checksum\] pair"),
        (16, r"not a \[size, checksum\] pair"),
        ([16, -1], "checksum = -1 is out of range"),
        ([16, "abc"], "checksum is a str"),
        ([16, True], "checksum is a bool"),
        ([True, 0], "size is a bool"),
        ([-16, 0], "size = -16 is out of range"),
        ([16, [[[[]]]] * 10], "over its limit"),
    ],
)
def test_refuses_bad_chunk_entries(chunk: Any, match: str) -> None:
    body = wire_body(chunk_size=16)
    chunks = [list(c) for c in body["chunks"]]
    chunks[0] = chunk
    refused({**body, "chunks": chunks}, match)


def test_largest_checksum_is_accepted() -> None:
    body = wire_body(chunk_size=16)
    data = pack(body)
    # msgpack cannot carry 2**64 itself; the largest it carries is accepted
    chunks = [list(c) for c in body["chunks"]]
    chunks[0][1] = 2**64 - 1
    assert decode_manifest(pack({**body, "chunks": chunks})).chunk_checksums[0] == 2**64 - 1
    assert decode_manifest(data)


def test_refuses_bad_chunk_digests() -> None:
    body = wire_body(chunk_size=16)
    count = len(body["chunks"])
    refused({**body, "chunk_digests": [b"\x00" * 32] * (count - 1)}, "digests for")
    refused({**body, "chunk_digests": [b"\x00" * 31] * count}, "32-byte digests")
    refused({**body, "chunk_digests": ["x" * 32] * count}, "32-byte digests")
    refused({**body, "chunk_digests": b"\x00" * 32}, "'chunk_digests' has type bytes")
    assert decode_manifest(pack({**body, "chunk_digests": None})).chunk_digests is None


# ---------------------------------------------------------------- refusals: tensors


@pytest.mark.parametrize("dtype", ["complex32", "object", "float128", "qint8", "", "Float32", "torch.float32"])
def test_refuses_dtype_off_the_allow_list(dtype: str) -> None:
    refused(with_tensor(wire_body(), dtype=dtype), f"dtype {dtype!r}, not on the allow-list")


def test_refuses_non_string_dtype() -> None:
    refused(with_tensor(wire_body(), dtype=5), "'dtype' has type int")


def test_refuses_shape_times_dtype_not_nbytes() -> None:
    body = wire_body()
    refused(with_tensor(body, shape=[4, 2]), r"shape \[4, 2\] x float32 is not 48 bytes")
    refused(with_tensor(body, nbytes=47), r"shape \[4, 3\] x float32 is not 47 bytes")
    refused(with_tensor(body, dtype="float64"), r"shape \[4, 3\] x float64 is not 48 bytes")
    refused(with_tensor(body, shape=[]), r"shape \[\] x float32 is not 48 bytes")


def test_refuses_offset_not_aligned_to_itemsize() -> None:
    body = manifest_with([entry(["w"], "float32", [2], 2, 8)], 10)
    refused(body, "offset 2 is not aligned to its 4-byte dtype")
    body = manifest_with([entry(["w"], "complex128", [1], 8, 16)], 24)
    refused(body, "offset 8 is not aligned to its 16-byte dtype")


def test_refuses_tensor_past_the_blob() -> None:
    body = manifest_with([entry(["w"], "float32", [4], 8, 16)], 16)
    refused(body, "bytes 8-24 run past the blob's 16 bytes")
    body = manifest_with([entry(["w"], "float32", [4], 0, 16)], 8)
    refused(body, "nbytes = 16 is out of range")
    body = manifest_with([entry(["w"], "float32", [2], 24, 8)], 16)
    refused(body, "offset = 24 is out of range")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"offset": -4}, "offset = -4 is out of range"),
        ({"nbytes": -48}, "nbytes = -48 is out of range"),
        ({"shape": [-4, -3]}, "dimension = -4 is out of range"),
        ({"shape": [4, True]}, "dimension is a bool"),
        ({"shape": [4.0, 3]}, "dimension is a float"),
        ({"offset": True}, "offset is a bool"),
        ({"nbytes": 48.0}, "nbytes is a float"),
        ({"offset": None}, "offset is a NoneType"),
        ({"shape": [4, 3] + [1] * 63}, "dimensions"),
        ({"shape": "4x3"}, "'shape' has type str"),
        ({"shape": [2**64 - 1]}, "dimension = .* is out of range"),
    ],
)
def test_refuses_bad_tensor_numbers(changes: dict[str, Any], match: str) -> None:
    refused(with_tensor(wire_body(), **changes), match)


def test_refuses_huge_shape_quickly() -> None:
    body = manifest_with([entry(["w"], "float32", [2**31], 0, 2**33)], 64)
    refused(body, "out of range")
    body = manifest_with([entry(["w"], "float32", [2**31], 0, 16)], 64)
    refused(body, r"shape \[2147483648\] x float32 is not 16 bytes")
    body = manifest_with([entry(["w"], "float32", [0, 2**62, 2**62], 0, 0)], 0)
    refused(body, "too large for torch")


def test_refuses_overlapping_tensors() -> None:
    body = manifest_with([entry(["a"], "float32", [4], 0, 16), entry(["b"], "float32", [4], 12, 16)], 28)
    refused(body, "'b' at offset 12 overlaps")
    body = manifest_with([entry(["a"], "float32", [4], 0, 16), entry(["b"], "float32", [1], 0, 4)], 16)
    refused(body, "overlaps")
    inner = manifest_with([entry(["a"], "float32", [8], 0, 32), entry(["b"], "float32", [1], 8, 4)], 32)
    refused(inner, "'b' at offset 8 overlaps")


def test_adjacent_and_zero_size_tensors_do_not_overlap() -> None:
    body = manifest_with(
        [entry(["a"], "float32", [4], 0, 16), entry(["b"], "float32", [4], 16, 16), entry(["e"], "float32", [0], 8, 0)],
        32,
    )
    assert [t.key for t in decode_manifest(pack(body)).tensors] == [("a",), ("b",), ("e",)]


def test_refuses_gap_between_tensors() -> None:
    body = manifest_with([entry(["a"], "float32", [4], 0, 16), entry(["b"], "float32", [4], 16 + 8192, 16)], 8224)
    refused(body, "gap of 8192 bytes")


def test_refuses_duplicate_keys() -> None:
    body = manifest_with([entry(["a", "w"], "float32", [4], 0, 16), entry(["a", "w"], "float32", [4], 64, 16)], 80)
    refused(body, "'a.w' twice")


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ([], "key has 0 parts"),
        ([""], "key part '' is not a non-empty string"),
        (["a", ""], "key part '' is not a non-empty string"),
        (["a", 5], "key part 5 is not"),
        (["a", None], "key part None is not"),
        (["a", b"w"], "key part b'w' is not"),
        (["a", ["b"]], r"key part \['b'\] is not"),
        (["x"] * 65, "key has 65 parts"),
        (["x" * 1025], "is not a non-empty string"),
        ("a.w", "'key' has type str"),
        (None, "'key' has type NoneType"),
    ],
)
def test_refuses_bad_keys(key: Any, match: str) -> None:
    refused(with_tensor(wire_body(), key=key), match)


def test_refuses_tensor_entry_not_a_map() -> None:
    body = wire_body()
    refused({**body, "tensors": [["w", "float32", [4, 3], 0, 48]] + body["tensors"][1:]}, "tensor #0 is a list")


def test_refuses_invalid_utf8_key() -> None:
    body = wire_body()
    data = pack(body)
    needle = pack("w")  # fixstr key part of the first tensor
    assert data.count(needle) == 1
    refused(data.replace(needle, b"\xa1\xff"), "not valid msgpack")


def test_refuses_too_many_tensors_before_reading_them() -> None:
    body = wire_body()
    head = pack({k: v for k, v in body.items() if k != "tensors"})
    count = defaults.MAX_TENSORS + 1
    data = bytes([head[0] + 1]) + head[1:] + pack("tensors") + b"\xdd" + count.to_bytes(4, "big")
    refused(data + b"\x80" * count, f"lists {count} tensors")


def test_refuses_oversized_tensor_entry() -> None:
    refused(with_tensor(wire_body(), junk=[[]] * 300_000), "tensor.* over its limit")


# ---------------------------------------------------------------- notices


def test_refuses_notice_over_1_kib() -> None:
    body = {"format": FORMAT_VERSION, "v": 1, "n": 1, "d": "x" * 1100}
    with pytest.raises(ManifestError, match="over the limit of 1024"):
        decode_notice(pack(body))
    ok = {**body, "d": "x" * 900}
    assert decode_notice(pack(ok)).digest == "x" * 900


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format": 2}, "unsupported format"),
        ({"format": True}, "unsupported format"),
        ({"format": 1.0}, "unsupported format"),
        ({"format": None}, "unsupported format"),
        ({"v": 0}, "notice version = 0 is out of range"),
        ({"v": "1"}, "notice version is a str"),
        ({"v": True}, "notice version is a bool"),
        ({"v": None}, "notice version is a NoneType"),
        ({"n": -1}, "notice size = -1 is out of range"),
        ({"n": 1.5}, "notice size is a float"),
        ({"n": False}, "notice size is a bool"),
        ({"d": 5}, "field 'd' has type int"),
        ({"d": b"digest"}, "field 'd' has type bytes"),
        ({"d": None}, "field 'd' has type NoneType"),
    ],
)
def test_refuses_notice_with_wrong_types(changes: dict[str, Any], match: str) -> None:
    body = {"format": FORMAT_VERSION, "v": 3, "n": 100, "d": "abc", **changes}
    with pytest.raises(ManifestError, match=match):
        decode_notice(pack(body))


def test_refuses_notice_framing() -> None:
    for data, match in [
        (pack([1, 2, 3]), "not a map"),
        (b"", "not valid msgpack"),
        (encode_notice(Notice(1, 2, "d"))[:-1], "not valid msgpack"),
        (encode_notice(Notice(1, 2, "d")) + b"\x00", "not valid msgpack"),
        (pack({"format": 1, "v": 1, "n": 1}), "no 'd' field"),
    ]:
        with pytest.raises(ManifestError, match=match):
            decode_notice(data)


def test_manifest_is_not_a_notice_and_back() -> None:
    manifest_bytes = encode_manifest(make_manifest()[0])
    with pytest.raises(ManifestError):
        decode_notice(manifest_bytes)
    with pytest.raises(ManifestError):
        decode_manifest(encode_notice(Notice(1, 2, "d")))
