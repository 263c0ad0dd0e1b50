"""Read replicas: workers pull from a replica, the publisher WAITs for it, a lagging replica falls back to the primary."""

from __future__ import annotations

import logging
import time

import pytest

from helpers import bit_identical, make_policy, wait_until, zeros_like_policy
from redisbus import BusConfig, ConfigError, WeightPublisher, WeightSubscriber
from redisbus.keys import KeySpace

pytest_plugins = ["cluster_fixtures"]

NS = "replica-ns"
KEYS = KeySpace(NS)


def _stats(node):
    """Calls per command on ``node`` since the last reset (``INFO commandstats``)."""
    with node.client() as c:
        return {k.removeprefix("cmdstat_"): v["calls"] for k, v in c.info("commandstats").items()}


def _reset_stats(*nodes):
    for node in nodes:
        with node.client() as c:
            c.config_resetstat()


def test_settings_parse_from_the_url_and_refuse_nonsense():
    cfg = BusConfig.from_url("redis://:pw@10.0.0.5:6379/2?replicas=10.0.0.6:6379,10.0.0.7:6380&wait_timeout=0.5")
    assert cfg.replicas == ("10.0.0.6:6379", "10.0.0.7:6380")
    assert cfg.replicas_to_wait == 2  # by default the publisher waits for every listed replica
    first, second = cfg.replica_configs()
    assert (first.host, first.port, first.db, first.password) == ("10.0.0.6", 6379, 2, "pw")
    assert (second.host, second.port) == ("10.0.0.7", 6380)
    assert BusConfig.from_url("redis://h:1/0?replicas=r:2&wait_replicas=0").replicas_to_wait == 0
    own = BusConfig(replicas=["redis://:other@r:7000/0"]).replica_configs()[0]
    assert (own.host, own.port, own.password) == ("r", 7000, "other")
    assert BusConfig().replicas_to_wait == 0
    with pytest.raises(ConfigError, match="replica address"):
        BusConfig(replicas="no-port")
    with pytest.raises(ConfigError, match="whole number"):
        BusConfig.from_url("redis://h:1/0?wait_replicas=all")
    with pytest.raises(ConfigError, match="wait_timeout must be positive"):
        BusConfig(wait_timeout=0)
    with pytest.raises(ConfigError, match="below socket_timeout"):  # only the publisher WAITs
        WeightPublisher("redis://127.0.0.1:1/0?replicas=r:1&wait_timeout=3&socket_timeout=1")
    worker = WeightSubscriber("redis://127.0.0.1:1/0?replicas=r:1&socket_timeout=1", target=zeros_like_policy())
    worker.close()
    with pytest.raises(ConfigError, match="not to a Redis Cluster"):
        BusConfig(cluster=True, replicas=("r:1",))


def test_workers_pull_from_the_replica_and_the_publisher_waits_for_it(replica_set):
    primary, replica = replica_set.primary, replica_set.replicas[0]
    url = f"{replica_set.url}?replicas={replica.address}"
    target = zeros_like_policy()
    with WeightPublisher(url, namespace=NS) as pub, WeightSubscriber(
        url, namespace=NS, target=target, apply="immediate", poll_interval=30
    ) as sub:
        assert pub.config.replicas_to_wait == 1
        sub.start()
        assert wait_until(lambda: sub.stats()["subscribes"] == 1)
        _reset_stats(primary, replica)
        for seed in range(5):
            v = pub.publish(make_policy(seed))
            with replica.client() as r:  # WAIT before the commit: the replica already holds the whole version
                assert r.exists(KEYS.manifest(v), KEYS.chunk(v, 0)) == 2
            assert sub.wait_for_version(v, timeout=10) == v
        assert bit_identical(target, make_policy(4))
        on_primary, on_replica = _stats(primary), _stats(replica)
        assert on_primary.get("wait") == 5
        assert on_replica.get("get", 0) >= 5 and on_replica.get("getrange", 0) >= 5  # chunks and manifests
        assert "getrange" not in on_primary  # no manifest read went to the primary
        assert sub.stats()["replica_fallbacks"] == 0  # a worker never heard of a version its replica lacked
        assert sub.stats()["errors"] == 0


def _replicated(replica, version: int) -> int:
    """Wait until ``replica`` holds ``version``'s manifest: the publisher's WAIT gives up after
    ``wait_timeout`` (0.2-0.3 s here), and a loaded machine can take longer to copy."""
    with replica.client() as r:
        assert wait_until(lambda: r.exists(KEYS.manifest(version)) == 1)
    return version


def test_a_replica_that_lags_makes_the_worker_fall_back_to_the_primary(replica_set):
    primary, replica = replica_set.primary, replica_set.replicas[0]
    url = f"{replica_set.url}?replicas={replica.address}&wait_timeout=0.2"
    target = zeros_like_policy()
    with WeightPublisher(url, namespace=NS) as pub, WeightSubscriber(url, namespace=NS, target=target) as sub:
        _replicated(replica, pub.publish(make_policy(1)))
        assert sub.sync() == 1
        with replica.client() as r:
            r.replicaof("no", "one")  # detached: it keeps version 1 and misses everything after
        v2 = pub.publish(make_policy(2))  # WAIT counts 0 replicas now; the publisher commits anyway
        assert sub.sync() == v2
        assert bit_identical(target, make_policy(2))
        assert sub.stats()["replica_fallbacks"] == 1
        assert sub.stats()["errors"] == 0
        # a replica that merely lagged is asked again next time
        with replica.client() as r:
            r.replicaof(primary.host, primary.port)
        replica_set.wait_linked()
        with replica.client() as r:
            assert wait_until(lambda: r.exists(KEYS.manifest(v2)) == 1)
        _reset_stats(primary)
        v3 = _replicated(replica, pub.publish(make_policy(3)))
        assert sub.sync() == v3
        assert sub.stats()["replica_fallbacks"] == 1
        assert "getrange" not in _stats(primary)


def test_a_hung_replica_costs_one_timeout_then_the_primary_serves(replica_set, caplog):
    replica = replica_set.replicas[0]
    url = f"{replica_set.url}?replicas={replica.address}&wait_timeout=0.3&socket_timeout=1"
    target = zeros_like_policy()
    with WeightPublisher(url, namespace=NS) as pub, WeightSubscriber(url, namespace=NS, target=target) as sub:
        _replicated(replica, pub.publish(make_policy(1)))
        assert sub.sync() == 1
        replica.pause()
        try:
            caplog.set_level(logging.WARNING, logger="redisbus.publisher")
            t0 = time.monotonic()
            v2 = pub.publish(make_policy(2))
            assert 0.25 <= time.monotonic() - t0 < 3  # waited wait_timeout for the replica, not forever
            assert "reached 0 of 1 replicas" in caplog.text
            t0 = time.monotonic()
            assert sub.sync() == v2  # the replica times out once, the primary serves
            assert time.monotonic() - t0 < 3
            assert bit_identical(target, make_policy(2))
            assert sub.stats()["replica_fallbacks"] == 1
            t0 = time.monotonic()
            v3 = pub.publish(make_policy(3))
            assert sub.sync() == v3  # the hung replica is left alone for a while: no second timeout
            assert time.monotonic() - t0 < 1.5
            assert sub.stats()["replica_fallbacks"] == 1
        finally:
            replica.resume()


def test_a_replica_refusing_stale_reads_falls_back_too(replica_set, free_port):
    replica = replica_set.replicas[0]
    url = f"{replica_set.url}?replicas={replica.address}&wait_replicas=0"
    target = zeros_like_policy()
    with replica.client() as r:
        r.config_set("replica-serve-stale-data", "no")
        r.replicaof("127.0.0.1", free_port)  # its primary is gone: it answers MASTERDOWN
    with WeightPublisher(url, namespace=NS) as pub, WeightSubscriber(url, namespace=NS, target=target) as sub:
        pub.publish(make_policy(1))
        assert sub.sync() == 1
        assert bit_identical(target, make_policy(1))
        assert sub.stats()["replica_fallbacks"] == 1


def test_workers_spread_over_a_list_of_replicas():
    from cluster_fixtures import local_replica_set

    with local_replica_set(replicas=2) as rs:
        url = f"{rs.url}?replicas={','.join(rs.replica_addresses)}"
        with WeightPublisher(url, namespace=NS) as pub:
            pub.publish(make_policy(1))
        _reset_stats(*rs.replicas)
        targets = [zeros_like_policy() for _ in range(6)]
        for i, target in enumerate(targets):
            with WeightSubscriber(url, namespace=NS, target=target, worker_id=f"worker-{i}") as sub:
                assert sub.sync() == 1
                assert sub.stats()["replica_fallbacks"] == 0
            assert bit_identical(target, make_policy(1))
        served = [_stats(r).get("getrange", 0) for r in rs.replicas]
        assert sum(served) == 6 and all(served), served  # each replica served some workers
