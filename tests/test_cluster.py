"""The bus on a real local Redis Cluster: 3 masters + 3 replicas, sharded notices, chunks on every shard, failover."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import torch
from click.testing import CliRunner
from redis.cluster import RedisCluster
from tensordict import TensorDict

from helpers import bit_identical, make_policy, snapshot, wait_until, zeros_like_policy
from redisbus import BusConfig, BusConnectionError, ConfigError, WeightPublisher, WeightSubscriber
from redisbus.keys import KeySpace
from redisbus.retention import collect
from redisbus.transport import is_cluster, uses_sharded_pubsub

pytest_plugins = ["cluster_fixtures"]

NS = "cluster-ns"
KEYS = KeySpace(NS)
FAST = {"poll_interval": 0.2, "heartbeat_interval": 0.2}
SMALL_CHUNKS = {"chunk_size": 1024}


def big_policy(seed: int = 0) -> TensorDict:
    """About 48 KiB: 48 chunks of 1 KiB, enough to land on every master."""
    g = torch.Generator().manual_seed(seed)
    return TensorDict({"w": torch.randn(192, 64, generator=g), "b": torch.randn(64, generator=g).half(),
                       "steps": torch.randint(0, 1000, (5,), generator=g)}, batch_size=[])  # fmt: skip


def test_a_cluster_url_makes_a_cluster_client_and_notices_go_sharded(cluster):
    with WeightPublisher(cluster.url, namespace=NS) as pub:
        assert isinstance(pub._client, RedisCluster)
        assert uses_sharded_pubsub(pub._client)
        assert pub.config.cluster and pub.config.redacted_url().endswith("?cluster=true")
    cfg = BusConfig.from_url(cluster.url, namespace=NS)
    with cfg.client() as client:
        assert is_cluster(client)


def test_publish_notice_and_late_worker_catch_up(cluster):
    target = zeros_like_policy()
    with WeightPublisher(cluster.url, namespace=NS) as pub, WeightSubscriber(
        cluster.url, namespace=NS, target=target, apply="immediate", poll_interval=30
    ) as live:
        live.start()
        owner = cluster.node_holding(KEYS.notify)
        with owner.client() as c:  # the worker SSUBSCRIBEd on the shard of the namespace's slot
            assert wait_until(lambda: int(c.execute_command("PUBSUB", "SHARDNUMSUB", KEYS.notify)[1]) == 1)
        for seed in range(3):
            v = pub.publish(make_policy(seed))
        assert v == 3
        # the poll timer is 30 s: only the sharded notices can bring it there this fast
        assert wait_until(lambda: live.version == 3, timeout=10)
        assert live.stats()["notices"] >= 1
        assert bit_identical(target, make_policy(2))

    late_target = zeros_like_policy()
    with WeightSubscriber(cluster.url, namespace=NS, target=late_target, **FAST) as late:
        late.start()
        assert late.wait_for_version(3, timeout=10) == 3
        assert late.stats()["notices"] == 0
        assert bit_identical(late_target, make_policy(2))


def test_a_redis_cluster_client_instance_works_too(cluster):
    client = cluster.client()
    other = cluster.client()
    try:
        target = big_policy().apply(torch.zeros_like)
        with WeightPublisher(client, namespace=NS, **SMALL_CHUNKS) as pub, WeightSubscriber(
            other, namespace=NS, target=target
        ) as sub:
            pub.publish(big_policy(4))
            assert sub.sync() == 1
            assert bit_identical(target, big_policy(4))
    finally:
        client.close()
        other.close()


def test_a_versions_chunks_are_spread_over_every_master_and_control_keys_share_one_slot(cluster):
    with WeightPublisher(cluster.url, namespace=NS, **SMALL_CHUNKS) as pub:
        v = pub.publish(big_policy(1))
    client = cluster.client()
    try:
        chunk_keys = [k.decode() for k in client.scan_iter(match=KEYS.chunk_pattern, count=1000)]
        assert len(chunk_keys) >= 40
        holders = Counter(cluster.node_holding(k).port for k in chunk_keys)
        masters = {n.port for n in cluster.master_nodes()}
        assert set(holders) == masters, holders  # every master holds a share
        assert min(holders.values()) >= len(chunk_keys) // 6  # and no master only a token one
        for key in chunk_keys:  # each chunk really lives on the master its slot says
            with cluster.node_holding(key).client() as node:
                assert node.exists(key) == 1
        control = [KEYS.seq, KEYS.latest, KEYS.versions, KEYS.pending, KEYS.workers, KEYS.publishers, KEYS.pin,
                   KEYS.notify, KEYS.manifest(v)]  # fmt: skip
        assert len({client.keyslot(k) for k in control}) == 1
    finally:
        client.close()
    target = big_policy().apply(torch.zeros_like)
    with WeightSubscriber(cluster.url, namespace=NS, target=target) as sub:  # pulls from all shards at once
        assert sub.sync() == v
        assert bit_identical(target, big_policy(1))


def _flip_a_byte(client, key):
    data = bytearray(client.get(key))
    data[len(data) // 2] ^= 0x01
    client.set(key, bytes(data))


@pytest.mark.parametrize("damage", ["bit-flip", "missing-chunk"])
def test_a_damaged_chunk_on_any_shard_is_refused_and_the_next_version_applies(cluster, damage):
    client = cluster.client()
    target = big_policy().apply(torch.zeros_like)
    try:
        with WeightPublisher(cluster.url, namespace=NS, **SMALL_CHUNKS) as pub, WeightSubscriber(
            cluster.url, namespace=NS, target=target
        ) as sub:
            pub.publish(big_policy(1))
            assert sub.sync() == 1
            before = snapshot(target)
            bad = pub.publish(big_policy(2))
            # damage a chunk on a master other than the one holding the manifest
            control_port = cluster.node_holding(KEYS.manifest(bad)).port
            key = next(k for k in (KEYS.chunk(bad, i) for i in range(40)) if cluster.node_holding(k).port != control_port)
            if damage == "bit-flip":
                _flip_a_byte(client, key)
            else:
                client.delete(key)
            assert sub.sync() is None
            assert bit_identical(target, before)
            stats = sub.stats()
            assert stats["failed_versions"] == [bad]
            expected = "CorruptBlobError" if damage == "bit-flip" else "VersionNotFoundError"
            assert stats["errors_by_type"] == {expected: 1}
            assert pub.publish(big_policy(3)) == 3
            assert sub.sync() == 3
            assert bit_identical(target, big_policy(3))
    finally:
        client.close()


def test_gc_reaches_every_shard(cluster):
    client = cluster.client()
    try:
        with WeightPublisher(cluster.url, namespace=NS, keep_versions=2, grace_seconds=0, **SMALL_CHUNKS) as pub:
            for seed in range(4):
                pub.publish(big_policy(seed))
        assert [int(v) for v in client.zrange(KEYS.versions, 0, -1)] == [3, 4]
        left = {KEYS.parse_chunk(k)[0] for k in client.scan_iter(match=KEYS.chunk_pattern, count=1000)}
        assert left == {3, 4}
        # orphans of a crashed publisher (version 9, never committed, pending mark long expired) on every shard
        orphans = [KEYS.chunk(9, i) for i in range(30)]
        for key in orphans:
            client.set(key, b"x" * 16)
        assert len({cluster.node_holding(k).port for k in orphans}) == 3
        client.zadd(KEYS.pending, {"9": time.time() - 3600})
        report = collect(client, KEYS, keep=2, grace_seconds=0, pending_timeout=60)
        assert report.orphan_versions == [9] and report.orphan_chunks == 30
        assert sum(client.exists(k) for k in orphans) == 0
        assert client.zcard(KEYS.pending) == 0
    finally:
        client.close()


def test_the_cli_reads_a_cluster(cluster):
    with WeightPublisher(cluster.url, namespace=NS, **SMALL_CHUNKS) as pub, WeightSubscriber(
        cluster.url, namespace=NS, target=big_policy().apply(torch.zeros_like), worker_id="w-1", **FAST
    ) as sub:
        sub.start()
        pub.publish(big_policy(1))
        pub.publish(big_policy(2))
        assert sub.wait_for_version(2, timeout=10) == 2
        from redisbus.cli import cli

        def run(*args):
            result = CliRunner().invoke(cli, ["--url", cluster.url, "-n", NS, *args])
            assert result.exit_code == 0, result.output
            return json.loads(result.output)

        versions = run("versions", "--json")
        assert [v["version"] for v in versions] == [1, 2]
        assert wait_until(lambda: [w["version"] for w in run("workers", "--json")["workers"]] == [2])
        assert run("verify", "--all", "--json")
        result = CliRunner().invoke(cli, ["--url", cluster.url, "-n", NS, "gc", "--keep", "1", "--grace", "0"])
        assert result.exit_code == 0, result.output
    assert [v["version"] for v in run("versions", "--json")] == [2]


def test_cluster_settings_that_cannot_work_are_refused(cluster):
    with pytest.raises(ConfigError, match="database 0"):
        BusConfig.from_url(cluster.url.replace("/0?", "/2?"))
    with pytest.raises(ConfigError, match="not to a Redis Cluster"):
        BusConfig.from_url(cluster.url + "&replicas=127.0.0.1:1")
    with pytest.raises(ConfigError, match="not to a Redis Cluster"):
        WeightPublisher(cluster.url, namespace=NS, wait_replicas=1)


def test_an_unreachable_cluster_is_a_bus_connection_error_without_the_password(free_port):
    # a cluster client learns the slot map when it is made, so the constructor is where it fails
    with pytest.raises(BusConnectionError) as info:
        WeightSubscriber(f"redis://:hunter2@127.0.0.1:{free_port}/0?cluster=true", namespace=NS,
                         target=zeros_like_policy(), socket_timeout=1)  # fmt: skip
    assert "hunter2" not in str(info.value) and str(free_port) in str(info.value)


def test_a_master_failover_is_survived(cluster_factory):
    """Kill the master of the namespace's control slot: publisher and workers find the promoted replica."""
    own = cluster_factory(masters=3, replicas=1)
    fast = {"socket_timeout": 2, "backoff_cap": 0.5}
    targets = [big_policy().apply(torch.zeros_like) for _ in range(2)]
    with WeightPublisher(own.url, namespace=NS, **SMALL_CHUNKS, **fast) as pub:
        subs = [WeightSubscriber(own.url, namespace=NS, target=t, apply="immediate", poll_interval=0.3, **fast).start()
                for t in targets]  # fmt: skip
        try:
            v1 = pub.publish(big_policy(1))
            for sub in subs:
                assert sub.wait_for_version(v1, timeout=10) == v1
            dead = own.kill_master_with_replica(KEYS.latest)
            own.wait_failover(dead)
            late_target = big_policy().apply(torch.zeros_like)
            with WeightSubscriber(own.url, namespace=NS, target=late_target, **fast) as late:
                assert late.sync() == v1  # the promoted replica serves the dead master's share
                assert bit_identical(late_target, big_policy(1))
            v2 = None
            deadline = time.monotonic() + 15
            while v2 is None:  # a trainer retries a failed publish at its next step
                try:
                    v2 = pub.publish(big_policy(2))
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert v2 == v1 + 1  # the promoted replica had the counter
            for sub, target in zip(subs, targets):
                assert sub.wait_for_version(v2, timeout=20) == v2
                assert bit_identical(target, big_policy(2))
                assert sub.stats()["reconnects"] >= 1
        finally:
            for sub in subs:
                sub.close()


def _redis6_binary() -> str | None:
    """A Redis 6 ``redis-server`` with a ``redis-cli`` beside it (PATH or this virtualenv), else None."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    dirs = [str(Path(sys.executable).parent), *os.get_exec_path()]
    for directory in dirs:
        server = Path(directory) / "redis-server"
        if server.exists() and (Path(directory) / "redis-cli").exists():
            out = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=10).stdout
            match = re.search(r"v=(\d+)\.", out)
            if match and int(match.group(1)) == 6:
                return str(server)
    return None


def test_a_redis6_cluster_without_sharded_pubsub_uses_plain_notices():
    binary = _redis6_binary()
    if binary is None:
        pytest.skip("no Redis 6 redis-server with redis-cli found")
    from cluster_fixtures import LocalCluster

    old = LocalCluster(3, 0, binary=binary).start()
    try:
        target = zeros_like_policy()
        with WeightPublisher(old.url, namespace=NS) as pub, WeightSubscriber(
            old.url, namespace=NS, target=target, apply="immediate", poll_interval=30
        ) as sub:
            assert not uses_sharded_pubsub(pub._client)  # no SPUBLISH before Redis 7
            sub.start()
            assert wait_until(lambda: sub.stats()["subscribes"] == 1)
            pub.publish(make_policy(1))
            pub.publish(make_policy(2))
            assert wait_until(lambda: sub.version == 2, timeout=10)  # notices, not the 30 s poll
            assert sub.stats()["notices"] >= 1
            assert bit_identical(target, make_policy(2))
    finally:
        old.close()
