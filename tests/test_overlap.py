"""Checksums computed while chunks move: the publisher hashes each chunk just before it is sent,
the worker verifies each chunk as soon as it lands (``_resp`` hooks ``before_send`` / ``after_recv``).

Real redis-server processes come from the shared ``redis_server_factory`` fixture; fakeredis
covers the plain-pipeline fallback.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from redisbus import CorruptBlobError, WeightPublisher, WeightSubscriber, _resp
from redisbus.keys import KeySpace
from redisbus.wire import chunk_checksum, decode_manifest

NS = "overlap"
CHUNK = 64 * 1024  # small chunks: many of them in flight at once


@pytest.fixture
def client(redis_server_factory):
    return redis_server_factory().client(socket_timeout=10)


def _policy(nbytes: int, seed: int) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)
    return TensorDict({"blob": data, "odd": torch.randn(3, generator=g).to(torch.float16)}, batch_size=[])


def _zeros(nbytes: int) -> TensorDict:
    return _policy(nbytes, 0).apply(torch.zeros_like)


def _manifest(raw, version: int):
    return decode_manifest(raw.get(KeySpace(NS).manifest(version)))


@pytest.mark.parametrize("nbytes", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 3], ids=lambda n: f"{n}B")
def test_published_checksums_are_those_of_the_stored_chunks(client, nbytes):
    with WeightPublisher(client, namespace=NS, chunk_size=CHUNK) as pub:
        version = pub.publish(_policy(nbytes, 1))
    manifest = _manifest(client, version)
    assert len(manifest.chunk_checksums) == manifest.chunk_count
    for i, expected in enumerate(manifest.chunk_checksums):
        assert chunk_checksum(client.get(KeySpace(NS).chunk(version, i))) == expected


@pytest.mark.parametrize("bad_chunk", [0, 3, 6], ids=["first", "middle", "last"])
def test_corrupt_chunk_mid_stream_is_refused_and_the_connection_stays_in_sync(client, bad_chunk):
    nbytes = 7 * CHUNK - 5
    target = _zeros(nbytes)
    with WeightPublisher(client, namespace=NS, chunk_size=CHUNK) as pub, WeightSubscriber(
        client, namespace=NS, target=target
    ) as sub:
        pub.publish(_policy(nbytes, 1))
        assert sub.sync() == 1
        before = target.clone()
        bad = pub.publish(_policy(nbytes, 2))
        key = KeySpace(NS).chunk(bad, bad_chunk)
        data = bytearray(client.get(key))
        data[len(data) // 2] ^= 0x10
        client.set(key, bytes(data))
        connections = client.info("clients")["connected_clients"]
        assert sub.sync() is None
        assert (target == before).all()
        assert sub.stats()["errors_by_type"] == {"CorruptBlobError": 1}
        assert f"chunk {bad_chunk} " in sub.stats()["last_error"]
        assert client.info("clients")["connected_clients"] == connections  # drained, not dropped
        pub.publish(_policy(nbytes, 3))
        assert sub.sync() == 3
        assert (target == _policy(nbytes, 3)).all()


def test_after_recv_error_drains_the_pipeline(client):
    sizes = [CHUNK] * 8
    src = np.random.default_rng(0).integers(0, 256, size=sum(sizes), dtype=np.uint8)
    view = memoryview(src)
    items = [(f"t:{i}", view[i * CHUNK : (i + 1) * CHUNK]) for i in range(len(sizes))]
    _resp.write_chunks(client, items)
    before = client.client_id()
    seen = []

    def refuse_third(key, got):
        seen.append(key)
        if key == "t:2":
            raise CorruptBlobError("refused t:2")

    dst = np.zeros_like(src)
    out = memoryview(dst)
    with pytest.raises(CorruptBlobError, match="refused t:2"):
        _resp.read_chunks_into(client, [k for k, _ in items], [out[i * CHUNK : (i + 1) * CHUNK] for i in range(8)],
                               after_recv=refuse_third)  # fmt: skip
    assert seen[:3] == ["t:0", "t:1", "t:2"] and "t:7" not in seen
    assert client.client_id() == before  # the same connection, back in sync
    assert client.get("t:7") == bytes(items[7][1])


def test_hooks_see_every_chunk_once_on_both_paths(client, fake_redis):
    for c in (client, fake_redis):
        sent, landed = [], []
        src = bytes(range(256)) * 1000
        items = [(f"h:{i}", memoryview(src)[i * 50_000 : (i + 1) * 50_000]) for i in range(5)]
        _resp.write_chunks(c, items, before_send=lambda k, v: sent.append((k, bytes(v))))
        out = bytearray(250_000)
        views = [memoryview(out)[i * 50_000 : (i + 1) * 50_000] for i in range(5)]
        _resp.read_chunks_into(c, [k for k, _ in items], views, after_recv=lambda k, v: landed.append((k, bytes(v))))
        assert sent == [(k, bytes(v)) for k, v in items]
        assert landed == sent
        assert bytes(out) == src[:250_000]


def test_plain_path_verifies_too(fake_redis):
    nbytes = 3 * CHUNK + 1
    target = _zeros(nbytes)
    with WeightPublisher(fake_redis, namespace=NS, chunk_size=CHUNK) as pub, WeightSubscriber(
        fake_redis, namespace=NS, target=target
    ) as sub:
        bad = pub.publish(_policy(nbytes, 1))
        key = KeySpace(NS).chunk(bad, 1)
        data = bytearray(fake_redis.get(key))
        data[0] ^= 1
        fake_redis.set(key, bytes(data))
        assert sub.sync() is None
        assert (target == _zeros(nbytes)).all()
        assert "chunk 1 " in sub.stats()["last_error"]
    body = msgpack.unpackb(fake_redis.get(KeySpace(NS).manifest(bad)), raw=False)
    assert len(body["chunks"]) == 4
