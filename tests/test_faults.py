"""Faults survived on real redis-server processes: killed connections, a restarted server, crashed publishers."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch
from tensordict import TensorDict

from helpers import bit_identical, make_policy, zeros_like_policy
from redisbus import PublishError, WeightPublisher, WeightSubscriber
from redisbus.keys import KeySpace
from redisbus.retention import collect

NS = "faults"


def test_worker_whose_pubsub_connection_is_killed_catches_up_without_restart(redis_server):
    target = zeros_like_policy()
    admin = redis_server.client()
    with WeightPublisher(redis_server.url, namespace=NS) as pub, WeightSubscriber(
        redis_server.url, namespace=NS, target=target, apply="immediate", poll_interval=3600
    ) as sub:
        sub.start()
        pub.publish(make_policy(1))
        assert sub.wait_for_version(1, timeout=10) == 1
        subscribes = sub.stats()["subscribes"]
        killed = admin.client_kill_filter(_type="pubsub")
        assert killed >= 1
        pub.publish(make_policy(2))  # published while the worker is disconnected: its notice is lost
        pub.publish(make_policy(3))
        # the poll timer is an hour: only the re-subscribe can bring the worker up to date
        assert sub.wait_for_version(3, timeout=15) == 3
        assert sub.stats()["subscribes"] > subscribes
        assert bit_identical(target, make_policy(3))


def test_redis_killed_and_restarted_everyone_recovers_with_backoff(redis_server):
    target = zeros_like_policy()
    with WeightPublisher(redis_server.url, namespace=NS, backoff_cap=0.5, socket_timeout=2) as pub, WeightSubscriber(
        redis_server.url, namespace=NS, target=target, apply="immediate", poll_interval=0.2, backoff_cap=0.5,
        socket_timeout=2,
    ) as sub:
        sub.start()
        pub.publish(make_policy(1))
        assert sub.wait_for_version(1, timeout=10) == 1
        redis_server.kill()
        with pytest.raises(PublishError):
            pub.publish(make_policy(2))
        time.sleep(2.0)
        reconnects = sub.stats()["reconnects"]
        # capped, jittered backoff: a few attempts a second at most, not a busy loop
        assert 1 <= reconnects <= 40
        redis_server.start()  # same port, empty data
        assert pub.publish(make_policy(3)) >= 2
        version = pub.latest_version()
        assert sub.wait_for_version(version, timeout=15) == version
        assert bit_identical(target, make_policy(3))


def _publish_then_die_before_commit(url: str) -> None:
    import redisbus.publisher as publisher_module

    def die(*args, **kwargs):
        os._exit(17)  # the process dies after sending its chunks, while it encodes the manifest to commit

    publisher_module.encode_manifest = die
    pub = WeightPublisher(url, namespace=NS)
    pub.publish(make_policy(9))


def test_publisher_dying_between_chunks_and_commit_leaves_latest_alone(redis_server):
    client = redis_server.client()
    keys = KeySpace(NS)
    with WeightPublisher(redis_server.url, namespace=NS) as pub:
        pub.publish(make_policy(1))
    proc = mp.get_context("spawn").Process(target=_publish_then_die_before_commit, args=(redis_server.url,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 17
    assert int(client.get(keys.latest)) == 1
    assert client.exists(keys.chunk(2, 0))  # the dead publisher's chunks are there, uncommitted
    target = zeros_like_policy()
    with WeightSubscriber(redis_server.url, namespace=NS, target=target) as sub:
        assert sub.sync() == 1
        assert bit_identical(target, make_policy(1))
    report = collect(client, keys, keep=3, grace_seconds=0, pending_timeout=0)
    assert report.orphan_versions == [2]
    assert not client.exists(keys.chunk(2, 0))
    assert int(client.get(keys.latest)) == 1


def test_model_over_the_server_value_limit_publishes_with_default_settings(redis_server_factory):
    # Scaled down: the server's value limit is lowered to 1 MB, the model is 6 MB; default settings.
    server = redis_server_factory(extra_args=["--proto-max-bulk-len", "1mb"])
    policy = {"w": torch.randn(1024, 1536), "b": torch.randn(1536)}
    target_td = TensorDict({k: torch.zeros_like(v) for k, v in policy.items()}, [])
    with WeightPublisher(server.url, namespace=NS) as pub, WeightSubscriber(server.url, namespace=NS, target=target_td) as sub:
        assert pub.publish(policy) == 1
        assert sub.sync() == 1
    for k, v in policy.items():
        assert torch.equal(target_td[k], v)
    client = server.client()
    chunks = client.keys(KeySpace(NS).chunk_pattern)
    assert len(chunks) >= 6
    assert max(client.strlen(k) for k in chunks) <= 1024 * 1024


def _worker_process(url: str, worker_id: str, last: int, results) -> None:
    target = zeros_like_policy()
    with WeightSubscriber(url, namespace=NS, target=target, worker_id=worker_id, poll_interval=0.2) as sub:
        sub.start()
        results.put(("ready", worker_id))
        sub.wait_for_version(last, timeout=60)
        raw = {str(k): v.reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in target.items(True, True)}
        results.put(("done", worker_id, sub.version, raw))


@pytest.mark.slow
def test_several_worker_processes_end_with_the_trainers_exact_weights(redis_server):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker_process, args=(redis_server.url, f"w{i}", 6, results)) for i in range(3)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            assert results.get(timeout=90)[0] == "ready"
        with WeightPublisher(redis_server.url, namespace=NS) as pub:
            for seed in range(6):
                pub.publish(make_policy(seed))
                time.sleep(0.05)
        expected = {str(k): v for k, v in make_policy(5).items(True, True)}
        for _ in procs:
            kind, worker_id, version, weights = results.get(timeout=90)
            assert (kind, version) == ("done", 6), worker_id
            assert weights.keys() == expected.keys()
            for k, v in expected.items():
                assert weights[k] == v.reshape(-1).view(torch.uint8).numpy().tobytes(), (worker_id, k)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
