"""Opt-in signing: HMAC over the manifest, BLAKE2b digest per chunk."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack
import pytest
import torch

from redisbus.errors import SignatureError
from redisbus.signing import sign_manifest, verify_chunk_digests, verify_signature
from redisbus.wire import (
    Manifest,
    TensorEntry,
    chunk_checksum,
    chunk_spans,
    decode_manifest,
    encode_manifest,
    plan_layout,
)

KEY = b"k" * 32


def published(chunk_size: int = 32) -> tuple[Manifest, bytes]:
    entries, total = plan_layout(
        [(("enc", "w"), torch.float32, (5, 3)), (("enc", "b"), torch.float32, (5,)), (("head",), torch.bfloat16, (7,))]
    )
    blob = bytes((i * 131 + 17) % 256 for i in range(total))
    checksums = tuple(chunk_checksum(blob[a:b]) for a, b in chunk_spans(total, chunk_size))
    manifest = Manifest(12, total, chunk_size, checksums, tuple(entries), created=100.0,
                        publisher={"id": "trainer"}, metadata={"step": 5})
    return sign_manifest(manifest, memoryview(blob), KEY), blob


def over_the_wire(manifest: Manifest) -> Manifest:
    return decode_manifest(encode_manifest(manifest))


def test_sign_verify_round_trip_through_the_wire() -> None:
    signed, blob = published()
    assert signed.signature is not None and len(signed.signature) == 32
    assert signed.chunk_digests is not None and len(signed.chunk_digests) == signed.chunk_count
    received = over_the_wire(signed)
    assert received == signed
    verify_signature(received, KEY)
    verify_chunk_digests(received, memoryview(blob))


def test_signing_is_deterministic_and_key_dependent() -> None:
    a, _ = published()
    b, _ = published()
    assert a.signature == b.signature
    unsigned = replace(a, signature=None, chunk_digests=None)
    blob = published()[1]
    assert sign_manifest(unsigned, memoryview(blob), b"other").signature != a.signature


def altered(manifest: Manifest, **changes: Any) -> Manifest:
    return replace(manifest, **changes)


def test_altered_manifest_fields_fail() -> None:
    signed, _ = published()
    entry = signed.tensors[0]
    swapped = (signed.tensors[1], signed.tensors[0], *signed.tensors[2:])
    variants = [
        altered(signed, version=13),
        altered(signed, created=101.0),
        altered(signed, metadata={"step": 6}),
        altered(signed, publisher={"id": "mallory"}),
        altered(signed, chunk_checksums=(signed.chunk_checksums[0] ^ 1, *signed.chunk_checksums[1:])),
        altered(signed, chunk_digests=(bytes(32), *signed.chunk_digests[1:])),  # type: ignore[index]
        altered(signed, tensors=(TensorEntry(("enc", "x"), entry.dtype, entry.shape, entry.offset, entry.nbytes),
                                 *signed.tensors[1:])),
        altered(signed, tensors=(TensorEntry(entry.key, entry.dtype, (3, 5), entry.offset, entry.nbytes),
                                 *signed.tensors[1:])),
        altered(signed, tensors=swapped),
    ]
    for variant in variants:
        with pytest.raises(SignatureError, match="invalid signature"):
            verify_signature(over_the_wire(variant), KEY)


def test_altered_manifest_bytes_fail() -> None:
    """An attacker rewriting the stored msgpack (not the dataclass) is caught too."""
    signed, _ = published()
    body = msgpack.unpackb(encode_manifest(signed), raw=False)
    body["metadata"] = {"step": 999}
    with pytest.raises(SignatureError):
        verify_signature(decode_manifest(msgpack.packb(body, use_bin_type=True)), KEY)
    body = msgpack.unpackb(encode_manifest(signed), raw=False)
    body["signature"] = bytes(32)
    with pytest.raises(SignatureError):
        verify_signature(decode_manifest(msgpack.packb(body, use_bin_type=True)), KEY)


def test_altered_chunk_fails_naming_it() -> None:
    signed, blob = published(chunk_size=32)
    assert signed.chunk_count >= 3
    for index, (start, stop) in enumerate(chunk_spans(signed.total_bytes, signed.chunk_size)):
        bad = bytearray(blob)
        bad[(start + stop) // 2] ^= 0x01
        with pytest.raises(SignatureError, match=f"chunk {index} differs"):
            verify_chunk_digests(signed, memoryview(bad))


def test_chunk_with_matching_xxh3_but_different_bytes_is_still_caught() -> None:
    """The signed digests do not trust the checksums: forge the checksum, the digest still fails."""
    signed, blob = published()
    bad = bytearray(blob)
    bad[0] ^= 0xFF
    forged = altered(signed, chunk_checksums=(chunk_checksum(bad[: signed.chunk_size]), *signed.chunk_checksums[1:]))
    with pytest.raises(SignatureError):
        verify_signature(forged, KEY)
    with pytest.raises(SignatureError):
        verify_chunk_digests(signed, memoryview(bad))


def test_wrong_key_fails() -> None:
    signed, _ = published()
    # (KEY + b"\x00" would verify: HMAC zero-pads keys, a property of HMAC, not a weakness)
    for key in (b"K" * 32, b"", KEY[:-1], b"\x00" + KEY, b"k" * 31 + b"j"):
        with pytest.raises(SignatureError, match="invalid signature"):
            verify_signature(over_the_wire(signed), key)


def test_unsigned_fails() -> None:
    signed, blob = published()
    for unsigned in (
        altered(signed, signature=None, chunk_digests=None),
        altered(signed, signature=None),
        altered(signed, chunk_digests=None),
    ):
        with pytest.raises(SignatureError, match="unsigned"):
            verify_signature(over_the_wire(unsigned), KEY)
    with pytest.raises(SignatureError, match="digest"):
        verify_chunk_digests(altered(signed, chunk_digests=None), memoryview(blob))
    with pytest.raises(SignatureError, match="digest"):
        verify_chunk_digests(altered(signed, chunk_digests=signed.chunk_digests[:-1]), memoryview(blob))  # type: ignore[index]


def test_empty_blob_signs_and_verifies() -> None:
    entries, total = plan_layout([(("e",), torch.float32, (0,))])
    signed = sign_manifest(Manifest(1, total, 16, (), tuple(entries)), memoryview(b""), KEY)
    received = over_the_wire(signed)
    verify_signature(received, KEY)
    verify_chunk_digests(received, memoryview(b""))
    assert received.chunk_digests == ()
