"""The commit rides behind the chunks: one round trip stores, commits and announces a version.

On a plain client the commit script goes out on the chunks' own connection right
behind them, so it must check that every chunk is stored whole (a ``SET``
refused just before it would otherwise leave a committed version with a hole).
Real redis-server processes and fakeredis (the plain-pipeline path) each.
"""

from __future__ import annotations

import threading

import fakeredis
import pytest
import torch
from tensordict import TensorDict

import redisbus._resp as resp_module
import redisbus.transport as transport_module
from helpers import bit_identical, make_policy, zeros_like_policy
from redisbus import PublishError, WeightPublisher, WeightSubscriber
from redisbus.keys import KeySpace
from redisbus.transport import Committed, commit_version
from redisbus.wire import chunk_spans

NS = "commit"


@pytest.fixture(params=["fakeredis", "redis-server"])
def client(request, fake_redis_server):
    if request.param == "fakeredis":
        c = fakeredis.FakeRedis(server=fake_redis_server)
        yield c
        c.close()
    else:
        yield request.getfixturevalue("redis_server").client(socket_timeout=10)


def _blob_policy(nbytes: int, seed: int) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict({"blob": torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)}, batch_size=[])


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5], ids=lambda n: f"{n}B")
def test_a_version_is_stored_and_committed_in_one_round_trip(client, monkeypatch, nbytes):
    def second_trip(*args, **kwargs):
        raise AssertionError("the commit went out in a round trip of its own")

    target = _blob_policy(nbytes, 0).apply(torch.zeros_like)
    with WeightPublisher(client, namespace=NS, chunk_size=4096) as pub, WeightSubscriber(
        client, namespace=NS, target=target
    ) as sub:
        assert pub.publish(_blob_policy(nbytes, 1)) == 1  # the server learns the commit script (NOSCRIPT first)
        monkeypatch.setattr(transport_module, "commit_version", second_trip)
        for seed in (2, 3):
            assert pub.publish(_blob_policy(nbytes, seed)) == seed
            assert sub.sync() == seed
            assert bit_identical(target, _blob_policy(nbytes, seed))


def test_the_commit_refuses_a_version_with_a_missing_or_short_chunk(client):
    keys = KeySpace(NS)
    with WeightPublisher(client, namespace=NS) as pub:
        pub.publish(make_policy(1))
    spans = chunk_spans(10, 4)  # three chunks: 4, 4 and 2 bytes
    client.set(keys.chunk(2, 0), b"aaaa")
    client.set(keys.chunk(2, 2), b"cc")
    with pytest.raises(PublishError, match="NOCHUNK chunk 1 of version 2 is missing"):
        commit_version(client, keys, 2, b"manifest", b"notice", spans)
    client.set(keys.chunk(2, 1), b"bbb")  # one byte short
    with pytest.raises(PublishError, match="NOCHUNK chunk 1 of version 2 is missing or not 4 bytes"):
        commit_version(client, keys, 2, b"manifest", b"notice", spans)
    assert int(client.get(keys.latest)) == 1
    assert not client.exists(keys.manifest(2))
    assert [int(v) for v in client.zrange(keys.versions, 0, -1)] == [1]
    client.set(keys.chunk(2, 1), b"bbbb")
    assert commit_version(client, keys, 2, b"manifest", b"notice", spans) == Committed(2, [1, 2], None)


def test_a_server_that_forgot_the_commit_script_still_commits(redis_server):
    target = zeros_like_policy()
    with WeightPublisher(redis_server.url, namespace=NS) as pub, WeightSubscriber(
        redis_server.url, namespace=NS, target=target
    ) as sub:
        pub.publish(make_policy(1))
        redis_server.client().script_flush()  # as after a restart: the raw EVALSHA meets NOSCRIPT
        assert pub.publish(make_policy(2)) == 2
        assert sub.sync() == 2 and bit_identical(target, make_policy(2))


def test_a_connection_lost_once_the_commit_went_out_keeps_the_version_whole(redis_server, monkeypatch):
    keys = KeySpace(NS)
    real_read_reply = resp_module.Wire.read_reply
    replies = [0]  # the publisher's: its version number's, then its commit's

    def lost_before_the_reply(self, depth=0):
        if threading.current_thread() is threading.main_thread() and depth == 0:
            replies[0] += 1
            if replies[0] == 2:  # the commit's reply: Redis ran the commit, the answer never came
                raise ConnectionResetError("connection reset by peer")
        return real_read_reply(self, depth)

    target = zeros_like_policy()
    with WeightPublisher(redis_server.url, namespace=NS) as pub, WeightSubscriber(
        redis_server.url, namespace=NS, target=target
    ) as sub:
        pub.publish(make_policy(1))
        monkeypatch.setattr(resp_module.Wire, "read_reply", lost_before_the_reply)
        with pytest.raises(PublishError, match="connection"):
            pub.publish(make_policy(2))
        monkeypatch.setattr(resp_module.Wire, "read_reply", real_read_reply)
        assert int(redis_server.client().get(keys.latest)) == 2  # committed: its chunks must still be there
        assert sub.sync() == 2 and bit_identical(target, make_policy(2))
        assert pub.publish(make_policy(3)) == 3
        assert sub.sync() == 3 and bit_identical(target, make_policy(3))
