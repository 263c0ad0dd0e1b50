"""The listener's notice path: ``latest``, the announced version's manifest and (for a small version)
its chunks come in one round trip, and a catch-up left waiting behind a staged version runs again
once ``sync()`` applied it.

Real redis-server processes come from the shared ``redis_server_factory`` fixture.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import msgpack
import pytest
import torch
from tensordict import TensorDict

from redisbus import WeightPublisher, WeightSubscriber
from redisbus.wire import Notice

NS = "notice-path"
SLOW_POLL = {"poll_interval": 60.0, "heartbeat_interval": 60.0}  # only notices can explain a prompt pull


def _policy(seed: int) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict({"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}, batch_size=[])


def _zeros() -> TensorDict:
    return _policy(0).apply(torch.zeros_like)


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def server(redis_server_factory):
    return redis_server_factory()


def _count(monkeypatch, module, name: str, calls: dict[str, int]) -> None:
    real = getattr(module, name)
    calls[name] = 0

    def counting(*args, **kwargs):
        calls[name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)


@contextlib.contextmanager
def _listening(
    server, publisher: dict | None = None, **settings
) -> Iterator[tuple[WeightPublisher, WeightSubscriber, TensorDict]]:
    """A publisher and a started subscriber (``SLOW_POLL`` plus ``settings``) that has subscribed, and its target."""
    target = _zeros()
    with WeightPublisher(server.url, namespace=NS, **(publisher or {})) as pub, WeightSubscriber(
        server.url, namespace=NS, target=target, **{**SLOW_POLL, **settings}
    ) as sub:
        sub.start()
        assert _wait(lambda: sub.stats()["subscribes"] >= 1)
        yield pub, sub, target


def _follow(pub: WeightPublisher, sub: WeightSubscriber, target: TensorDict, seeds) -> None:
    """Publish each seed's policy and check the subscriber applied exactly it."""
    for seed in seeds:
        version = pub.publish(_policy(seed))
        assert sub.wait_for_version(version, timeout=10) == version
        assert (target == _policy(seed)).all()


def _forbid(monkeypatch, module, name: str) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError(f"the notice path called {name}: one more round trip")

    monkeypatch.setattr(module, name, forbidden)


def test_notice_pull_of_a_small_version_is_one_round_trip(server, monkeypatch):
    """latest, the pin, the manifest and every chunk of the announced version: one request."""
    import redisbus.subscriber as subscriber_module

    calls: dict[str, int] = {}
    with _listening(server, {"chunk_size": 1024}, apply="immediate") as (pub, sub, target):
        _count(monkeypatch, subscriber_module, "read_head_manifest_and_chunks", calls)
        for name in ("read_head_and_manifest", "read_manifest", "read_chunks_into", "read_head"):
            _forbid(monkeypatch, subscriber_module, name)
        _follow(pub, sub, target, (1, 2, 3))  # 8.3 KB in 1 KiB chunks: nine chunks, each verified
        assert calls["read_head_manifest_and_chunks"] == 3
        assert sub.stats()["errors"] == 0


def test_notice_pull_of_a_large_version_reads_head_and_manifest_together(server, monkeypatch):
    import redisbus.defaults as defaults
    import redisbus.subscriber as subscriber_module

    monkeypatch.setattr(defaults, "ONE_TRIP_PULL_BYTES", 1024)  # the policy is larger: two round trips
    calls: dict[str, int] = {}
    with _listening(server, apply="immediate") as (pub, sub, target):
        _count(monkeypatch, subscriber_module, "read_head_and_manifest", calls)
        _forbid(monkeypatch, subscriber_module, "read_head_manifest_and_chunks")
        _forbid(monkeypatch, subscriber_module, "read_manifest")
        _follow(pub, sub, target, (1, 2, 3))
        assert calls["read_head_and_manifest"] == 3
        assert sub.stats()["errors"] == 0


@pytest.mark.parametrize("claimed", [1, 512, 4096, 10**9])  # 1: 8,000+ chunks, too many to ask for blind
def test_notice_with_a_wrong_chunk_size_costs_a_round_trip_not_the_version(server, monkeypatch, claimed):
    """A notice whose layout is not its version's (forged, or from a buggy publisher): the one-trip read
    finds missing or mis-sized chunks, and the worker reads the version the usual way, applies it and
    counts no error."""
    import redisbus.publisher as publisher_module
    import redisbus.subscriber as subscriber_module

    real_encode = publisher_module.encode_notice
    monkeypatch.setattr(
        publisher_module,
        "encode_notice",
        lambda notice: real_encode(Notice(notice.version, notice.total_bytes, notice.digest, claimed)),
    )
    calls: dict[str, int] = {}
    _count(monkeypatch, subscriber_module, "read_head_and_manifest", calls)
    with _listening(server, {"chunk_size": 1024}, apply="immediate") as (pub, sub, target):
        _follow(pub, sub, target, (1, 2))
        assert calls["read_head_and_manifest"] == 2  # the usual way, after each failed one-trip read
        assert sub.stats()["errors"] == 0 and sub.stats()["failed_versions"] == []


def test_bad_manifest_announced_by_a_notice_is_refused(server, monkeypatch):
    import redisbus.publisher as publisher_module

    real_encode = publisher_module.encode_manifest

    def damaged_for_version_2(manifest):
        data = real_encode(manifest)
        if manifest.version != 2:
            return data
        body = msgpack.unpackb(data, raw=False)
        body["tensors"][0]["dtype"] = "complex32"  # off the allow-list
        return msgpack.packb(body, use_bin_type=True)

    target = _zeros()
    with WeightPublisher(server.url, namespace=NS) as pub, WeightSubscriber(
        server.url, namespace=NS, target=target, apply="immediate", **SLOW_POLL
    ) as sub:
        sub.start()
        assert sub.wait_for_version(pub.publish(_policy(1)), timeout=10) == 1
        before = target.clone()
        monkeypatch.setattr(publisher_module, "encode_manifest", damaged_for_version_2)
        assert pub.publish(_policy(2)) == 2
        assert _wait(lambda: sub.stats()["failed_versions"] == [2])
        assert (target == before).all()
        assert sub.stats()["errors_by_type"] == {"ManifestError": 1}
        assert sub.wait_for_version(pub.publish(_policy(3)), timeout=10) == 3
        assert (target == _policy(3)).all()


def test_catch_up_deferred_by_a_staged_version_runs_after_sync(server):
    with _listening(server) as (pub, sub, target):
        pub.publish(_policy(1))
        assert _wait(lambda: sub.staged_version == 1)
        pub.publish(_policy(2))  # notice arrives while 1 waits for sync(): the catch-up must wait too
        assert _wait(lambda: sub.stats()["notices"] >= 2)
        assert sub.staged_version == 1
        assert sub.sync() == 1
        assert _wait(lambda: sub.staged_version == 2, timeout=5)  # not the 60 s poll: the deferred catch-up
        assert sub.sync() == 2
        assert (target == _policy(2)).all()


def test_no_spare_catch_up_after_an_immediate_apply(server, monkeypatch):
    import redisbus.subscriber as subscriber_module

    calls: dict[str, int] = {}
    with _listening(server, apply="immediate") as (pub, sub, target):
        time.sleep(0.2)  # the subscribe-time catch-up is done
        _count(monkeypatch, subscriber_module, "read_head", calls)
        for seed in (1, 2, 3, 4):
            assert sub.wait_for_version(pub.publish(_policy(seed)), timeout=10) == seed
        time.sleep(0.3)
        assert calls["read_head"] == 0  # each notice read latest with its manifest; nothing read it again


def test_a_notice_during_sync_never_overwrites_the_version_being_applied(server, monkeypatch):
    """sync() copies version 1 out of staging while version 2's notice arrives: the one-trip read of
    version 2 waits for the copy, so the target holds version 1 exactly, then version 2 exactly."""
    import redisbus.buffers as buffers

    real_copy_out = buffers.HostBuffer.copy_out
    copying = threading.Event()

    def slow_copy_out(self, pairs):
        copying.set()
        time.sleep(0.5)  # version 2 is published, announced and read meanwhile
        return real_copy_out(self, pairs)

    with _listening(server) as (pub, sub, target):
        pub.publish(_policy(1))
        assert _wait(lambda: sub.staged_version == 1)
        monkeypatch.setattr(buffers.HostBuffer, "copy_out", slow_copy_out)
        applying = threading.Thread(target=sub.sync)
        applying.start()
        assert copying.wait(5)
        pub.publish(_policy(2))
        applying.join(10)
        assert sub.version == 1
        assert (target == _policy(1)).all()
        monkeypatch.setattr(buffers.HostBuffer, "copy_out", real_copy_out)
        assert _wait(lambda: sub.staged_version == 2, timeout=5)
        assert sub.sync() == 2
        assert (target == _policy(2)).all()
