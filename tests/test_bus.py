"""The bus's properties (DESIGN.md), on fakeredis and on real redis-server processes."""

from __future__ import annotations

import time

import fakeredis
import msgpack
import pytest
import torch

from helpers import bit_identical, make_policy, snapshot, wait_until, zeros_like_policy
from redisbus import (
    BusConfig,
    BusConnectionError,
    ConfigError,
    CorruptBlobError,
    ManifestError,
    SchemaMismatchError,
    WeightPublisher,
    WeightSubscriber,
)
from redisbus.keys import KeySpace
from redisbus.registry import list_workers

NS = "test-ns"
FAST = {"poll_interval": 0.2, "heartbeat_interval": 0.2}


@pytest.fixture(params=["fakeredis", "redis-server"])
def bus(request, fake_redis_server):
    """A factory of bus sources (fresh clients of one fakeredis server, or a real server's URL) and a raw client."""
    if request.param == "fakeredis":
        clients = []

        def source():
            client = fakeredis.FakeRedis(server=fake_redis_server)
            clients.append(client)
            return client

        yield source, source()
        for c in clients:
            c.close()
    else:
        server = request.getfixturevalue("redis_server")
        yield (lambda: server.url), server.client()


def test_publish_then_late_worker_applies_latest_without_a_notice(bus):
    source, _ = bus
    with WeightPublisher(source(), namespace=NS) as pub:
        for seed in range(3):
            v = pub.publish(make_policy(seed))
        assert (v, pub.latest_version()) == (3, 3)
    target = zeros_like_policy()
    with WeightSubscriber(source(), namespace=NS, target=target, **FAST) as sub:
        assert sub.version is None
        sub.start()
        assert sub.wait_for_version(3, timeout=10) == 3
        assert sub.version == 3
        assert bit_identical(target, make_policy(2))
        assert sub.stats()["notices"] == 0


def test_sync_applies_only_at_the_safe_point(bus):
    source, _ = bus
    target = zeros_like_policy()
    with WeightPublisher(source(), namespace=NS) as pub, WeightSubscriber(
        source(), namespace=NS, target=target, **FAST
    ) as sub:
        sub.start()
        pub.publish(make_policy(1))
        assert wait_until(lambda: sub.staged_version == 1)
        assert bit_identical(target, zeros_like_policy())  # staged, not applied
        assert sub.sync() == 1
        assert bit_identical(target, make_policy(1))
        assert sub.sync() is None


def test_immediate_mode_applies_from_the_listener(bus):
    source, _ = bus
    target = zeros_like_policy()
    applied = []
    with WeightPublisher(source(), namespace=NS) as pub, WeightSubscriber(
        source(), namespace=NS, target=target, apply="immediate", on_apply=applied.append, **FAST
    ) as sub:
        sub.start()
        pub.publish(make_policy(4))
        assert wait_until(lambda: sub.version == 1)
        assert bit_identical(target, make_policy(4))
        assert applied == [1]


def test_module_targets_state_dicts_and_nested_keys_round_trip(bus):
    source, _ = bus
    trainer = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    trainer[1].running_mean.normal_()
    worker = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    with WeightPublisher(source(), namespace=NS) as pub, WeightSubscriber(source(), namespace=NS, target=worker) as sub:
        pub.publish(trainer.state_dict())
        assert sub.sync() == 1
        for name, value in trainer.state_dict().items():
            assert torch.equal(worker.state_dict()[name], value), name
        trainer[0].weight.data.mul_(3)
        pub.publish(trainer)
        assert sub.sync() == 2
        assert torch.equal(worker[0].weight, trainer[0].weight)


def test_wait_for_version_times_out_with_a_clear_message(bus):
    source, _ = bus
    with WeightSubscriber(source(), namespace="nothing-here", target=zeros_like_policy(), **FAST) as sub:
        sub.start()
        with pytest.raises(TimeoutError, match="did not reach version 1"):
            sub.wait_for_version(1, timeout=0.5)
        assert sub.version is None


def _corrupt_chunk(client, version):
    key = KeySpace(NS).chunk(version, 0)
    data = bytearray(client.get(key))
    data[len(data) // 2] ^= 0x01
    client.set(key, bytes(data))


def _truncate_chunk(client, version):
    key = KeySpace(NS).chunk(version, 0)
    client.set(key, client.get(key)[:-3])


def _edit_manifest(client, version, edit):
    key = KeySpace(NS).manifest(version)
    body = msgpack.unpackb(client.get(key), raw=False)
    edit(body)
    client.set(key, msgpack.packb(body, use_bin_type=True))


def _lying_offset(client, version):
    _edit_manifest(client, version, lambda b: b["tensors"][0].__setitem__("offset", b["total_bytes"] - 4))


def _overlapping(client, version):
    def edit(body):
        body["tensors"][1]["offset"] = body["tensors"][0]["offset"]
        body["tensors"][1]["nbytes"] = body["tensors"][0]["nbytes"]
        body["tensors"][1]["shape"] = body["tensors"][0]["shape"]
        body["tensors"][1]["dtype"] = body["tensors"][0]["dtype"]

    _edit_manifest(client, version, edit)


def _bad_dtype(client, version):
    _edit_manifest(client, version, lambda b: b["tensors"][0].__setitem__("dtype", "complex32"))


def _oversized_manifest(client, version):
    client.set(KeySpace(NS).manifest(version), b"\x00" * (256 * 1024))


@pytest.mark.parametrize(
    "damage, error",
    [
        (_corrupt_chunk, CorruptBlobError),
        (_truncate_chunk, CorruptBlobError),
        (_lying_offset, ManifestError),
        (_overlapping, ManifestError),
        (_bad_dtype, ManifestError),
        (_oversized_manifest, ManifestError),
    ],
    ids=["bit-flip", "truncated", "lying-offset", "overlap", "dtype", "oversized"],
)
def test_bad_versions_are_rejected_and_leave_the_target_bit_identical(bus, damage, error):
    source, raw = bus
    target = zeros_like_policy()
    with WeightPublisher(source(), namespace=NS) as pub, WeightSubscriber(
        source(), namespace=NS, target=target, max_manifest_bytes=128 * 1024
    ) as sub:
        pub.publish(make_policy(1))
        assert sub.sync() == 1
        before = snapshot(target)
        bad = pub.publish(make_policy(2))
        damage(raw, bad)
        assert sub.sync() is None
        assert bit_identical(target, before)
        stats = sub.stats()
        assert stats["errors_by_type"] == {error.__name__: 1}
        assert stats["failed_versions"] == [bad]
        assert sub.version == 1
        assert sub.sync() is None  # a condemned version is not retried
        assert sub.stats()["errors"] == 1
        pub.publish(make_policy(3))
        assert sub.sync() == 3
        assert bit_identical(target, make_policy(3))


@pytest.mark.parametrize(
    "change",
    [
        lambda td: td.set(("actor", "w"), torch.zeros(16, 9)),
        lambda td: td.set(("actor", "w"), torch.zeros(16, 8, dtype=torch.float64)),
        lambda td: td.set("extra", torch.zeros(2)),
        lambda td: td.exclude("mask"),
    ],
    ids=["shape", "dtype", "extra-key", "missing-key"],
)
def test_schema_mismatch_is_refused_and_named(bus, change):
    source, _ = bus
    target = zeros_like_policy()
    with WeightPublisher(source(), namespace=NS) as pub, WeightSubscriber(source(), namespace=NS, target=target) as sub:
        pub.publish(make_policy(1))
        sub.sync()
        before = snapshot(target)
        wrong = change(make_policy(2))
        pub.publish(wrong)
        assert sub.sync() is None
        assert bit_identical(target, before)
        stats = sub.stats()
        assert stats["errors_by_type"] == {"SchemaMismatchError": 1}
        assert "version 2" in stats["last_error"]


def test_duplicate_reordered_and_garbage_notices_change_nothing(bus):
    source, raw = bus
    target = zeros_like_policy()
    with WeightPublisher(source(), namespace=NS) as pub, WeightSubscriber(
        source(), namespace=NS, target=target, apply="immediate", poll_interval=30
    ) as sub:
        sub.start()
        assert wait_until(lambda: sub.stats()["subscribes"] >= 1)
        for seed in range(3):
            pub.publish(make_policy(seed))
        assert wait_until(lambda: sub.version == 3 and sub.stats()["notices"] >= 3)
        pulls, notices = sub.stats()["pulls"], sub.stats()["notices"]
        from redisbus.wire import Notice, encode_notice

        channel = KeySpace(NS).notify
        for v in (3, 1, 2, 3, 3):
            raw.publish(channel, encode_notice(Notice(v, 10, "x")))
        raw.publish(channel, b"\xc1 not msgpack")
        raw.publish(channel, msgpack.packb({"format": 1, "v": "three"}))
        assert wait_until(lambda: sub.stats()["notices"] >= notices + 7 and sub.stats()["errors"] >= 2)
        assert sub.version == 3
        assert sub.stats()["pulls"] == pulls
        assert bit_identical(target, make_policy(2))
        assert sub.stats()["errors_by_type"] == {"ManifestError": 2}


def test_gc_keeps_the_newest_k_and_fades_older_versions(bus):
    source, raw = bus
    keys = KeySpace(NS)
    with WeightPublisher(source(), namespace=NS, keep_versions=2, grace_seconds=30) as pub:
        for seed in range(5):
            pub.publish(make_policy(seed))
    assert [int(v) for v in raw.zrange(keys.versions, 0, -1)] == [4, 5]
    assert raw.pttl(keys.manifest(5)) == -1
    assert raw.pttl(keys.chunk(5, 0)) == -1
    for v in (1, 2, 3):
        assert 0 < raw.pttl(keys.manifest(v)) <= 30_000
        assert 0 < raw.pttl(keys.chunk(v, 0)) <= 30_000


def _chunk_keys(raw, keys: KeySpace, version: int) -> list:
    return sorted(raw.scan_iter(match=f"rb:chunk:{{{keys.namespace}:{version}:*"))


def _several_chunks(seed: int) -> dict[str, torch.Tensor]:
    """Weights of 4 chunks of 1024 bytes."""
    return {"w": torch.randn(1024, generator=torch.Generator().manual_seed(seed))}


def test_gc_of_a_publishers_own_versions_needs_no_manifest(bus):
    """A publisher knows how many chunks its versions have: GC deletes them even when the manifest is gone."""
    source, raw = bus
    keys = KeySpace(NS)
    with WeightPublisher(source(), namespace=NS, keep_versions=1, grace_seconds=0, chunk_size=1024) as pub:
        pub.publish(_several_chunks(1))
        assert len(_chunk_keys(raw, keys, 1)) == 4
        raw.delete(keys.manifest(1))  # GC can no longer learn version 1's chunk count from Redis
        pub.publish(_several_chunks(2))
    assert _chunk_keys(raw, keys, 1) == []
    assert [int(v) for v in raw.zrange(keys.versions, 0, -1)] == [2]
    assert len(_chunk_keys(raw, keys, 2)) == 4


def test_gc_reads_the_manifests_of_other_publishers_versions(bus):
    """Versions another publisher (or an earlier process) committed are collected by their manifest."""
    source, raw = bus
    keys = KeySpace(NS)
    with WeightPublisher(source(), namespace=NS, chunk_size=1024) as first:
        first.publish(_several_chunks(1))
    with WeightPublisher(source(), namespace=NS, keep_versions=1, grace_seconds=0, chunk_size=2048) as second:
        assert len(_chunk_keys(raw, keys, 1)) == 4
        second.publish(_several_chunks(2))
        assert _chunk_keys(raw, keys, 1) == []
        second.publish(_several_chunks(3))
        assert _chunk_keys(raw, keys, 2) == []
    assert [int(v) for v in raw.zrange(keys.versions, 0, -1)] == [3]
    assert raw.hlen(keys.publishers) == 2


def test_gc_runs_the_callers_commands_in_its_first_round_trip(bus):
    from redisbus.errors import RedisCommandError
    from redisbus.retention import collect

    source, raw = bus
    keys = KeySpace(NS)
    with WeightPublisher(source(), namespace=NS, keep_versions=5) as pub:
        for seed in range(3):
            pub.publish(make_policy(seed))
    first = raw.pipeline(transaction=False)
    first.set("caller-key", b"sent")
    report = collect(raw, keys, keep=1, grace_seconds=0, pending_timeout=600, first=first)
    assert (report.kept, report.evicted) == ([3], [1, 2])
    assert raw.get("caller-key") == b"sent"
    failing = raw.pipeline(transaction=False)
    failing.lpush(keys.latest, b"x")  # WRONGTYPE: latest is a string
    with pytest.raises(RedisCommandError, match="WRONGTYPE"):
        collect(raw, keys, keep=1, grace_seconds=0, pending_timeout=600, first=failing)
    assert [int(v) for v in raw.zrange(keys.versions, 0, -1)] == [3]


@pytest.mark.parametrize(
    "grace, applied_first",
    [(30, 1), (0, 2)],
    ids=["grace-keeps-the-blob", "lost-race-retries-latest"],
)
def test_gc_striking_mid_pull(bus, monkeypatch, grace, applied_first):
    """With a grace period the evicted blob stays readable; without one the reader retries with latest."""
    source, _ = bus
    import redisbus.subscriber as subscriber_module

    target = zeros_like_policy()
    real_read = subscriber_module.read_chunks_into
    with WeightPublisher(source(), namespace=NS, keep_versions=1, grace_seconds=grace) as pub, WeightSubscriber(
        source(), namespace=NS, target=target
    ) as sub:
        pub.publish(make_policy(1))

        def gc_strikes_mid_pull(client, keys, manifest, blob, *args, **kwargs):
            if manifest.version == 1:
                pub.publish(make_policy(2))  # keep_versions=1: version 1 is evicted right now
            return real_read(client, keys, manifest, blob, *args, **kwargs)

        monkeypatch.setattr(subscriber_module, "read_chunks_into", gc_strikes_mid_pull)
        assert sub.sync() == applied_first
        assert bit_identical(target, make_policy(applied_first))
        assert sub.stats()["errors"] == 0
        if applied_first == 1:
            assert sub.sync() == 2


def test_a_worker_closed_right_after_an_apply_has_reported_it(bus):
    """Reports of applied versions wait for a quiet listener; close() does not lose the last one."""
    source, raw = bus
    with WeightPublisher(source(), namespace=NS) as pub:
        sub = WeightSubscriber(source(), namespace=NS, target=zeros_like_policy(), worker_id="short-lived",
                               apply="immediate", heartbeat_interval=3600)  # fmt: skip
        sub.start()
        assert sub.wait_for_version(pub.publish(make_policy(1)), timeout=10) == 1
        assert sub.wait_for_version(pub.publish(make_policy(2)), timeout=10) == 2
        sub.close()
        assert [(w.worker_id, w.version) for w in list_workers(raw, KeySpace(NS))] == [("short-lived", 2)]


def test_workers_report_applied_version_and_heartbeat(bus):
    source, raw = bus
    with WeightPublisher(source(), namespace=NS) as pub, WeightSubscriber(
        source(), namespace=NS, target=zeros_like_policy(), worker_id="collector-3", **FAST
    ) as sub:
        sub.start()
        pub.publish(make_policy(1))
        sub.wait_for_version(1, timeout=10)
        assert wait_until(lambda: [(w.worker_id, w.version) for w in list_workers(raw, KeySpace(NS))] == [("collector-3", 1)])
        report = list_workers(raw, KeySpace(NS))[0]
        assert time.time() - report.heartbeat < 5
        assert report.lag(1) == 0 and not report.is_dead(30)


def test_versions_stay_forward_only_after_redis_loses_its_data(bus):
    source, raw = bus
    target = zeros_like_policy()
    with WeightPublisher(source(), namespace=NS) as pub, WeightSubscriber(source(), namespace=NS, target=target) as sub:
        for seed in range(3):
            pub.publish(make_policy(seed))
        assert sub.sync() == 3
        raw.flushall()
        assert pub.latest_version() is None
        assert pub.publish(make_policy(7)) == 4
        assert sub.sync() == 4
        assert bit_identical(target, make_policy(7))


def test_repr_and_errors_never_show_the_password(free_port):
    url = f"redis://admin:hunter2@127.0.0.1:{free_port}/0"
    pub = WeightPublisher(url, namespace=NS, backoff_cap=0.05)
    try:
        assert "hunter2" not in repr(pub) and "hunter2" not in repr(pub.config)
        with pytest.raises(BusConnectionError) as info:
            pub.latest_version()
        assert "hunter2" not in str(info.value)
        assert str(free_port) in str(info.value)
    finally:
        pub.close()


def test_bad_settings_are_refused_with_a_named_problem():
    with pytest.raises(ConfigError, match="scheme"):
        WeightPublisher("http://localhost:6379", namespace=NS)
    with pytest.raises(ConfigError, match="namespace"):
        WeightPublisher("redis://localhost:6379", namespace="bad namespace!")
    with pytest.raises(ConfigError, match="apply"):
        WeightSubscriber("redis://localhost:6379", namespace=NS, target=zeros_like_policy(), apply="later")
    with pytest.raises(TypeError, match="target"):
        WeightSubscriber("redis://localhost:6379", namespace=NS, target={"a": torch.zeros(1)})


def test_a_given_client_ignores_redisbus_url(fake_redis, redis_server, monkeypatch):
    """The client says where Redis is: a stale or malformed REDISBUS_URL must not break (or steer) anything."""
    monkeypatch.setenv("REDISBUS_URL", "not a url")
    for client in (fake_redis, redis_server.client()):
        target = zeros_like_policy()
        with WeightPublisher(client, namespace=NS) as pub, WeightSubscriber(client, namespace=NS, target=target) as sub:
            version = pub.publish(make_policy(7))
            assert sub.sync() == version and bit_identical(target, make_policy(7))
            assert "not a url" not in repr(pub) + repr(sub)


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("REDISBUS_URL", "rediss://bus.internal:6380/2")
    monkeypatch.setenv("REDISBUS_NAMESPACE", "ppo-run-7")
    cfg = BusConfig.from_env()
    assert (cfg.host, cfg.port, cfg.db, cfg.ssl, cfg.namespace) == ("bus.internal", 6380, 2, True, "ppo-run-7")
    assert cfg.ssl_check_hostname


def test_async_publish_snapshots_then_uploads(bus):
    source, _ = bus
    policy = make_policy(1)
    target = zeros_like_policy()
    with WeightPublisher(source(), namespace=NS) as pub, WeightSubscriber(source(), namespace=NS, target=target) as sub:
        future = pub.publish(policy, block=False)
        expected = snapshot(policy)
        policy.apply_(lambda t: t.zero_() if t.is_floating_point() else t)  # training goes on
        assert future.result(timeout=10) == 1
        assert sub.sync() == 1
        assert bit_identical(target, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_target_uses_pinned_staging(bus):
    source, _ = bus
    target = zeros_like_policy().to("cuda")
    with WeightPublisher(source(), namespace=NS) as pub, WeightSubscriber(source(), namespace=NS, target=target) as sub:
        pub.publish(make_policy(5))
        assert sub.sync() == 1
        assert sub._staging.pinned
        torch.cuda.synchronize()
        assert bit_identical(target.cpu(), make_policy(5))


def test_wait_for_version_raises_the_refusal_instead_of_timing_out(bus):
    source, _ = bus
    target = zeros_like_policy()
    with WeightPublisher(source(), namespace=NS) as pub, WeightSubscriber(
        source(), namespace=NS, target=target, **FAST
    ) as sub:
        sub.start()
        wrong = make_policy(1).set(("actor", "w"), torch.zeros(3, 3))
        v = pub.publish(wrong)
        started = time.monotonic()
        with pytest.raises(SchemaMismatchError, match=r"actor\.w"):
            sub.wait_for_version(v, timeout=30)
        assert time.monotonic() - started < 10
        assert bit_identical(target, zeros_like_policy())
        assert sub.latest_version() == v


def test_metadata_workers_would_refuse_is_refused_at_publish(fake_redis):
    with WeightPublisher(fake_redis, namespace=NS) as pub:
        with pytest.raises(ManifestError, match="metadata"):
            pub.publish(make_policy(1), metadata={1: "non-string key"})
        nested: dict = {}
        for _ in range(40):
            nested = {"n": nested}
        with pytest.raises(ManifestError, match="deeper"):
            pub.publish(make_policy(1), metadata=nested)
        assert pub.latest_version() is None
        assert pub.publish(make_policy(1), metadata={"step": 3, "tags": ["a"]}) == 1
