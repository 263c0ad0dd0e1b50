"""Opt-in authentication of versions with a shared secret.

The publisher adds a BLAKE2b-256 digest of every chunk to the manifest and an
HMAC-SHA256 over the whole manifest. A worker holding the same secret refuses
versions that are unsigned or whose signature or chunk digests do not verify.
This protects against anyone who can write to Redis but lacks the secret;
the fast xxh3 checksums only protect against accidents.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace

import msgpack

from .errors import SignatureError
from .wire import Manifest

__all__ = ["chunk_digest", "sign_manifest", "verify_chunk_digests", "verify_signature"]


def chunk_digest(data: memoryview | bytes) -> bytes:
    """The signed digest of one chunk (BLAKE2b-256), as the manifest's ``chunk_digests`` carries it."""
    return hashlib.blake2b(data, digest_size=32).digest()


def _mac(manifest: Manifest, key: bytes) -> bytes:
    body = msgpack.packb(manifest.to_wire(with_signature=False), use_bin_type=True)
    return hmac.new(key, body, hashlib.sha256).digest()


def sign_manifest(manifest: Manifest, blob: memoryview, key: bytes) -> Manifest:
    """The manifest with chunk digests and its signature added."""
    digests = tuple(chunk_digest(blob[a:b]) for a, b in manifest.spans())
    unsigned = replace(manifest, chunk_digests=digests, signature=None)
    return replace(unsigned, signature=_mac(unsigned, key))


def verify_signature(manifest: Manifest, key: bytes) -> None:
    """Check the manifest's signature.

    Raises:
        SignatureError: unsigned, or signed with another key or then altered.
    """
    if manifest.signature is None or manifest.chunk_digests is None:
        raise SignatureError(f"version {manifest.version} is unsigned and signatures are required")
    if not hmac.compare_digest(manifest.signature, _mac(manifest, key)):
        raise SignatureError(f"version {manifest.version} has an invalid signature")


def verify_chunk_digests(manifest: Manifest, blob: memoryview) -> None:
    """Check every chunk against its signed digest.

    Raises:
        SignatureError: a chunk differs from what was signed, or the digests are missing.
    """
    spans = manifest.spans()
    if manifest.chunk_digests is None or len(manifest.chunk_digests) != len(spans):
        raise SignatureError(f"version {manifest.version} does not carry one signed digest per chunk")
    for i, ((a, b), want) in enumerate(zip(spans, manifest.chunk_digests)):
        if not hmac.compare_digest(chunk_digest(blob[a:b]), want):
            raise SignatureError(f"version {manifest.version}: chunk {i} differs from its signed digest")
