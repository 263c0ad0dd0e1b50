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


# --------------------------------------------------------------------------- the lazy snapshot of a blocking publish


def _mixed(seed: int) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(40, 30, generator=g)
    return TensorDict(
        {
            "big": torch.randn(70_000, generator=g),  # spans several chunks
            "t": base.t(),  # not contiguous: copied whole
            "half": torch.randn(33, generator=g).to(torch.float16),
            "c": torch.randn(5, generator=g, dtype=torch.complex64).conj(),  # a conjugate view
            "empty": torch.zeros(0),
            "flags": torch.rand(13, generator=g) > 0.5,
            "scalar": torch.tensor(float(seed)),
            "last_empty": torch.zeros(0, 3),
        },
        batch_size=[],
    )


@pytest.mark.parametrize("ends", [[10**9], [1, 2, 3, 70_001 * 4, 10**9], list(range(0, 300_000, 997)) + [10**9]],
                         ids=["at-once", "ragged", "many"])  # fmt: skip
def test_lazy_fill_writes_what_a_full_snapshot_writes(ends):
    from redisbus.buffers import HostBuffer, LazyFill
    from redisbus.tensors import flatten_weights
    from redisbus.wire import plan_layout

    leaves = flatten_weights(_mixed(3))
    entries, total = plan_layout((k, t.dtype, t.shape) for k, t in leaves)
    full, lazy = HostBuffer(), HostBuffer()
    full.reserve(total)
    lazy.reserve(total)
    full.bytes().zero_()
    lazy.bytes().zero_()
    for entry, (_, t) in zip(entries, leaves):
        full.view(entry).copy_(t)
    fill = LazyFill(lazy, entries, [t for _, t in leaves])
    for end in ends:
        fill.fill_to(min(end, total))
        assert torch.equal(lazy.bytes()[: min(end, total)], full.bytes()[: min(end, total)]) or end > total
    assert fill.complete
    assert torch.equal(lazy.bytes(), full.bytes())


def test_blocking_publish_is_bit_exact_with_odd_tensors(client):
    target = _mixed(0).apply(lambda t: torch.zeros_like(t.resolve_conj()))
    with WeightPublisher(client, namespace=NS, chunk_size=CHUNK) as pub, WeightSubscriber(
        client, namespace=NS, target=target
    ) as sub:
        for seed in (1, 2):
            policy = _mixed(seed)
            assert pub.publish(policy) == seed
            assert sub.sync() == seed
            for key, value in policy.items(include_nested=True, leaves_only=True):
                assert torch.equal(target[key], value.resolve_conj()), key


def test_blocking_and_async_publishes_store_the_same_bytes(client):
    with WeightPublisher(client, namespace=NS, chunk_size=CHUNK) as pub:
        v1 = pub.publish(_mixed(5))
        v2 = pub.publish(_mixed(5), block=False).result()
    m1, m2 = _manifest(client, v1), _manifest(client, v2)
    for i in range(m1.chunk_count):
        a = client.get(KeySpace(NS).chunk(v1, i))
        b = client.get(KeySpace(NS).chunk(v2, i))
        # padding between tensors is not part of any tensor: compare tensor bytes only
        for entry in m1.tensors:
            lo, hi = max(entry.offset, i * CHUNK), min(entry.offset + entry.nbytes, (i + 1) * CHUNK)
            if lo < hi:
                assert a[lo - i * CHUNK : hi - i * CHUNK] == b[lo - i * CHUNK : hi - i * CHUNK]
    assert [t.key for t in m1.tensors] == [t.key for t in m2.tensors]


# --------------------------------------------------------------------------- host copies


@pytest.mark.parametrize("sizes", [[0], [1, 2, 3], [9 * 1024 * 1024 + 7], [3 * 1024 * 1024] * 5 + [17]],
                         ids=["empty", "tiny", "one-large", "several"])  # fmt: skip
def test_copy_bytes_copies_every_byte(sizes):
    from redisbus.buffers import copy_bytes

    rng = np.random.default_rng(len(sizes))
    srcs = [rng.integers(0, 256, size=n, dtype=np.uint8) for n in sizes]
    dsts = [np.zeros(n, dtype=np.uint8) for n in sizes]
    copy_bytes(list(zip(dsts, srcs)))
    for d, s in zip(dsts, srcs):
        assert np.array_equal(d, s)


def test_apply_bumps_autograd_versions_like_copy_does(client):
    model = torch.nn.Linear(8, 4)
    with WeightPublisher(client, namespace=NS) as pub, WeightSubscriber(client, namespace=NS, target=model) as sub:
        trained = torch.nn.Linear(8, 4)
        pub.publish(trained)
        loss = model(torch.randn(2, 8, requires_grad=True)).pow(2).sum()  # the graph saved the weight
        assert sub.sync() == 1
        assert torch.equal(model.weight, trained.weight) and model.weight.requires_grad
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_apply_into_strided_and_plain_targets(client):
    base = torch.zeros(6, 5)
    target = TensorDict({"t": base.t(), "plain": torch.zeros(7, dtype=torch.bfloat16)}, batch_size=[])  # 't': a view
    src = TensorDict({"t": torch.randn(5, 6), "plain": torch.randn(7).to(torch.bfloat16)}, batch_size=[])
    with WeightPublisher(client, namespace=NS) as pub, WeightSubscriber(client, namespace=NS, target=target) as sub:
        pub.publish(src)
        assert sub.sync() == 1
    assert torch.equal(target["t"], src["t"]) and torch.equal(base, src["t"].t())
    assert torch.equal(target["plain"], src["plain"])


def test_apply_follows_target_tensors_replaced_or_moved_between_versions(client):
    # the second apply of a layout reuses the first one's copy plan: only while the tensors are the same
    target = TensorDict({"a": torch.zeros(300), "b": torch.zeros(4, 5)}, batch_size=[])

    def weights(seed: int) -> TensorDict:
        g = torch.Generator().manual_seed(seed)
        return TensorDict({"a": torch.randn(300, generator=g), "b": torch.randn(4, 5, generator=g)}, batch_size=[])

    with WeightPublisher(client, namespace=NS) as pub, WeightSubscriber(client, namespace=NS, target=target) as sub:
        pub.publish(weights(1))
        assert sub.sync() == 1 and (target == weights(1)).all()
        old_a = target["a"]
        target["a"] = torch.zeros(300)  # replaced: a new tensor object
        target["b"].set_(torch.zeros(20).view(4, 5).untyped_storage(), 0, (4, 5), (5, 1))  # same object, new memory
        pub.publish(weights(2))
        assert sub.sync() == 2 and (target == weights(2)).all()
        assert torch.equal(old_a, weights(1)["a"])  # the tensor taken out of the target was left alone
        target["b"].set_(target["b"].untyped_storage(), 0, (4, 5), (1, 4))  # same memory, no longer contiguous
        pub.publish(weights(3))
        assert sub.sync() == 3 and (target == weights(3)).all()


def test_async_snapshot_is_taken_before_publish_returns(client):
    policy = _policy(5 * CHUNK + 3, 1)
    expected = policy.clone()
    with WeightPublisher(client, namespace=NS, chunk_size=CHUNK) as pub:
        future = pub.publish(policy, block=False)
        policy["blob"].zero_()  # the caller moves on at once
        version = future.result()
    target = _zeros(5 * CHUNK + 3)
    with WeightSubscriber(client, namespace=NS, target=target) as sub:
        assert sub.sync() == version
    assert (target == expected).all()


# --------------------------------------------------------------------------- blocking publish straight from the tensors


def _plain(seed: int) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "big": torch.randn(70_001, generator=g),  # spans chunks, odd length
            "half": torch.randn(33, generator=g).to(torch.bfloat16),
            "empty": torch.zeros(0),
            "flags": torch.rand(13, generator=g) > 0.5,
            "scalar": torch.tensor(float(seed)),
            "codes": torch.randint(0, 9, (5, 3), generator=g, dtype=torch.int64),
        },
        batch_size=[],
    )


def test_tensor_blob_views_are_the_blob_bytes():
    from redisbus.buffers import HostBuffer, TensorBlob
    from redisbus.tensors import flatten_weights
    from redisbus.wire import plan_layout

    leaves = flatten_weights(_plain(4))
    entries, total = plan_layout((k, t.dtype, t.shape) for k, t in leaves)
    full = HostBuffer()
    full.reserve(total)
    full.bytes().zero_()  # padding: zeros, as TensorBlob sends it
    for entry, (_, t) in zip(entries, leaves):
        full.view(entry).copy_(t)
    assert TensorBlob.supports([t for _, t in leaves])
    blob = TensorBlob(entries, [t for _, t in leaves])
    expected = bytes(full.memoryview())
    rng = np.random.default_rng(0)
    cuts = sorted({0, total, *(int(x) for x in rng.integers(0, total, 40))})
    for a, b in zip(cuts, cuts[1:]):
        assert b"".join(blob.views(a, b)) == expected[a:b], (a, b)
    assert b"".join(blob.views(0, total)) == expected


def test_tensor_blob_refuses_what_it_cannot_slice():
    from redisbus.buffers import TensorBlob

    assert not TensorBlob.supports([torch.zeros(3, 4).t()])
    assert not TensorBlob.supports([torch.randn(3, dtype=torch.complex64).conj()])
    assert TensorBlob.supports([torch.zeros(0), torch.zeros(2, 2)])


def test_blocking_publish_of_plain_tensors_takes_no_snapshot(client):
    target = _plain(0).apply(torch.zeros_like)
    with WeightPublisher(client, namespace=NS, chunk_size=CHUNK) as pub, WeightSubscriber(
        client, namespace=NS, target=target
    ) as sub:
        for seed in (1, 2):
            assert pub.publish(_plain(seed)) == seed
            assert pub._snapshot.capacity == 0  # sent from the tensors themselves
            assert sub.sync() == seed
            assert (target == _plain(seed)).all()
        version = pub.publish(_plain(3), block=False).result()  # async: a snapshot, as before
        assert pub._snapshot.capacity > 0
        assert sub.sync() == version and (target == _plain(3)).all()


def test_publish_follows_its_tensors_changed_replaced_or_moved_and_keeps_no_fresh_copy_alive(client):
    # a publish of the same tensors reuses the last one's layout and byte views: only while they are the same
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    weights = _plain(1)
    target = _plain(0).apply(torch.zeros_like)
    with WeightPublisher(client, namespace=NS, chunk_size=CHUNK) as pub, WeightSubscriber(
        client, namespace=NS, target=target
    ) as sub:

        def published() -> TensorDict:
            assert sub.sync() == pub.latest_version()
            return target.clone()

        for seed in (1, 2, 3):
            weights.update_(_plain(seed))  # a training step: values change in place
            pub.publish(weights)
            assert (published() == _plain(seed)).all()
        weights["big"] = torch.full((70_001,), 7.0)  # replaced by a new tensor
        pub.publish(weights)
        assert (published()["big"] == 7.0).all()
        weights["codes"].set_(torch.arange(15).view(5, 3).untyped_storage(), 0, (5, 3), (3, 1))  # new memory
        pub.publish(weights)
        assert torch.equal(published()["codes"], torch.arange(15).view(5, 3))
        weights["codes"].set_(weights["codes"].untyped_storage(), 0, (5, 3), (1, 5))  # same memory, restrided
        pub.publish(weights)
        assert torch.equal(published()["codes"], torch.arange(15).view(3, 5).T)
        assert pub._snapshot.capacity > 0  # a non-contiguous tensor goes through the snapshot
        weights["codes"] = torch.zeros(5, 3, dtype=torch.int64)
        pub.publish(weights)
        assert torch.equal(published()["codes"], torch.zeros(5, 3, dtype=torch.int64))

        # fresh copies each time: no copy's memory is kept alive once it was published
        memory = []
        for seed in (4, 5, 6):
            fresh = _plain(seed)
            memory.append(StorageWeakRef(fresh["big"].untyped_storage()))
            pub.publish(fresh)
            assert (published() == _plain(seed)).all()
            del fresh
        gc.collect()
        assert [ref.expired() for ref in memory] == [True, True, True]


def test_signed_blocking_publish_still_snapshots(client):
    key = b"k" * 32
    target = _plain(0).apply(torch.zeros_like)
    with WeightPublisher(client, namespace=NS, chunk_size=CHUNK, signing_key=key) as pub, WeightSubscriber(
        client, namespace=NS, target=target, signing_key=key
    ) as sub:
        assert pub.publish(_plain(1)) == 1
        assert pub._snapshot.capacity > 0
        assert sub.sync() == 1 and (target == _plain(1)).all()


def test_multi_part_values_on_both_paths(client, fake_redis):
    from redisbus.transport import _checksum

    parts = (memoryview(b"abc"), memoryview(bytes(70_000)), memoryview(b""), memoryview(b"xyz" * 30_000))
    joined = b"".join(parts)
    assert _checksum(parts) == chunk_checksum(joined)
    for c in (client, fake_redis):
        seen = []
        _resp.write_chunks(c, [("mp:1", parts), ("mp:2", memoryview(b"single"))], before_send=lambda k, v: seen.append(k))
        assert c.get("mp:1") == joined and c.get("mp:2") == b"single"
        assert seen == ["mp:1", "mp:2"]
