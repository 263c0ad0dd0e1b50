"""Faults survived on real redis-server processes (issue 6).

Each test checks the two promises that matter under failure: nothing is ever
half-applied (a target is bit-identical to one published version, never a
mix), and the bus recovers by itself (the next version reaches every worker).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest
import torch
from tensordict import TensorDict

import redisbus._resp as resp_module
import redisbus.publisher as publisher_module
import redisbus.subscriber as subscriber_module
from helpers import bit_identical, make_policy, wait_until, zeros_like_policy
from redisbus import BusConnectionError, PublishError, WeightPublisher, WeightSubscriber
from redisbus.keys import KeySpace
from redisbus.registry import list_publishers
from redisbus.retention import collect

NS = "rel"
#: Small timeouts so each fault is noticed in about a second.
FAST = {
    "poll_interval": 0.2,
    "heartbeat_interval": 0.5,
    "socket_timeout": 1.0,
    "health_check_interval": 0.5,
    "backoff_cap": 0.3,
}
BIG_FLOATS = 12 * 1024 * 1024  # 48 MB of float32: long enough to kill the server in the middle of a transfer


def big_policy(seed: int, floats: int = BIG_FLOATS) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict({"w": torch.randn(floats, generator=g), "b": torch.randn(8, generator=g)}, [])


def digest(td: TensorDict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(td.keys(True, True), key=str):
        h.update(td[key].reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Worker:
    """A subscriber that checks, at every apply, that its target is exactly one published version."""

    def __init__(self, url: str, expected: dict[int, str], like: TensorDict, worker_id: str, **settings) -> None:
        self.expected = expected
        self.target = like.apply(torch.zeros_like)
        self.seen: list[tuple[int, str]] = []
        self.sub = WeightSubscriber(url, namespace=NS, target=self.target, worker_id=worker_id, apply="immediate",
                                    on_apply=self._record, **{**FAST, **settings})

    def _record(self, version: int) -> None:
        self.seen.append((version, digest(self.target)))  # runs right after the apply, on the listener thread

    @property
    def applied(self) -> list[int]:
        return [v for v, _ in self.seen]

    @property
    def torn(self) -> list[int]:
        """Versions whose apply left the target different from what was published as that version."""
        return [v for v, d in self.seen if self.expected.get(v) != d]


# --------------------------------------------------------------------------- kill -9 and restart


@pytest.mark.parametrize("moment", ["idle", "publish", "pull"])
def test_redis_killed_and_restarted_no_torn_apply_and_the_next_version_reaches_everyone(redis_server, monkeypatch,
                                                                                         moment):
    expected: dict[int, str] = {}
    at_transfer = threading.Event()
    interrupted: list[BaseException] = []

    def watch(original):
        def wrapper(*args, **kwargs):
            at_transfer.set()
            try:
                return original(*args, **kwargs)
            except BaseException as exc:
                interrupted.append(exc)
                raise

        return wrapper

    with WeightPublisher(redis_server.url, namespace=NS, chunk_size=1 << 20, **FAST) as pub:
        workers = [Worker(redis_server.url, expected, big_policy(0), f"w{i}") for i in range(2)]
        try:
            for w in workers:
                w.sub.start()
            first = big_policy(1)
            expected[1] = digest(first)
            assert pub.publish(first) == 1
            del first
            for w in workers:
                assert w.sub.wait_for_version(1, timeout=20) == 1

            if moment == "idle":
                time.sleep(0.3)
                redis_server.kill()
            elif moment == "publish":
                monkeypatch.setattr(publisher_module, "upload_and_commit", watch(publisher_module.upload_and_commit))
                killer = threading.Thread(target=lambda: (at_transfer.wait(20), redis_server.kill()))
                killer.start()
                with pytest.raises(PublishError):
                    pub.publish(big_policy(2))
                killer.join()
                assert interrupted, "the server died before or after the chunk upload, not during it"
            else:
                monkeypatch.setattr(subscriber_module, "read_chunks_into", watch(subscriber_module.read_chunks_into))
                second = big_policy(2)
                expected[2] = digest(second)
                killer = threading.Thread(target=lambda: (at_transfer.wait(20), redis_server.kill()))
                killer.start()
                assert pub.publish(second) == 2
                del second
                killer.join()
                assert wait_until(lambda: interrupted, timeout=10), "no pull was cut by the kill"

            down_since = time.monotonic()
            reconnects = [w.sub.stats()["reconnects"] for w in workers]
            time.sleep(1.5)
            for w, before in zip(workers, reconnects):
                # capped, jittered backoff: a handful of attempts a second, not a busy loop
                assert 1 <= w.sub.stats()["reconnects"] - before <= 25
            for w in workers:  # each holds one whole version
                assert digest(w.target) in {expected[1], expected.get(2)}
            redis_server.start()  # same port, empty
            # never back to 1: the publisher's floor survives the empty restart
            version = 3 if moment == "pull" else 2
            third = big_policy(3)
            expected[version] = digest(third)
            assert pub.publish(third) == version
            for w in workers:
                assert w.sub.wait_for_version(version, timeout=20) == version
                assert digest(w.target) == expected[version]
                assert w.torn == []
            assert time.monotonic() - down_since < 30
        finally:
            for w in workers:
                w.sub.close()


def test_redis_killed_during_a_one_trip_pull_leaves_the_target_whole(redis_server, monkeypatch):
    """A small version's head, manifest and chunks come in one request: the server dies after the
    request went out and before the first reply is read. The target keeps version 1 bit for bit, and
    the worker takes the next version after an empty restart."""
    small = 512 * 1024  # 2 MiB of float32 in 1 MiB chunks: one trip
    expected: dict[int, str] = {}
    armed, published, killed = threading.Event(), threading.Event(), threading.Event()
    real_read_reply = resp_module.Wire.read_reply

    def kill_first(self, depth=0):
        worker_read = threading.current_thread().name.startswith("redisbus-listener")  # not the publisher's commit
        if armed.is_set() and depth == 0 and worker_read and not killed.is_set():
            # the notice goes out with the commit, before the publisher has read the commit's reply: let it
            published.wait(10)
            redis_server.kill()
            killed.set()
        return real_read_reply(self, depth)

    one_trips: list[int] = []
    real_one_trip = subscriber_module.read_head_manifest_and_chunks

    def counting(*args, **kwargs):
        one_trips.append(args[2])
        return real_one_trip(*args, **kwargs)

    monkeypatch.setattr(resp_module.Wire, "read_reply", kill_first)
    monkeypatch.setattr(subscriber_module, "read_head_manifest_and_chunks", counting)
    policies = {seed: big_policy(seed, small) for seed in (1, 2, 3)}
    with WeightPublisher(redis_server.url, namespace=NS, chunk_size=1 << 20, **FAST) as pub:
        worker = Worker(redis_server.url, expected, big_policy(0, small), "w0")
        try:
            worker.sub.start()
            expected[1] = digest(policies[1])
            assert pub.publish(policies[1]) == 1
            assert worker.sub.wait_for_version(1, timeout=20) == 1
            armed.set()
            expected[2] = digest(policies[2])
            assert pub.publish(policies[2]) == 2
            published.set()
            assert killed.wait(10), "the worker's one-trip read never started"
            time.sleep(0.5)
            assert worker.sub.version == 1 and digest(worker.target) == expected[1]
            assert worker.sub.stats()["reconnects"] >= 1
            redis_server.start()  # same port, empty
            expected[3] = digest(policies[3])
            assert pub.publish(policies[3]) == 3
            assert worker.sub.wait_for_version(3, timeout=20) == 3
            assert digest(worker.target) == expected[3] and worker.torn == []
            assert 2 in one_trips  # the read the kill cut was the one-trip read
        finally:
            worker.sub.close()


# --------------------------------------------------------------------------- half-open connection


@pytest.mark.parametrize("poll_interval", [0.2, 3600.0], ids=["polling", "notices-only"])
def test_half_open_connection_is_noticed_within_health_check_plus_socket_timeout(redis_server, poll_interval):
    health, timeout = 0.5, 0.5
    settings = {**FAST, "socket_timeout": timeout, "health_check_interval": health, "poll_interval": poll_interval,
                "heartbeat_interval": 3600.0}
    target = zeros_like_policy()
    with WeightPublisher(redis_server.url, namespace=NS, socket_timeout=timeout) as pub, WeightSubscriber(
        redis_server.url, namespace=NS, target=target, apply="immediate", **settings
    ) as sub:
        sub.start()
        pub.publish(make_policy(1))
        assert sub.wait_for_version(1, timeout=10) == 1
        time.sleep(0.3)  # idle: no pull or report in flight
        redis_server.pause()  # SIGSTOP: sockets stay open, nothing answers
        try:
            started = time.monotonic()
            assert wait_until(lambda: sub.stats()["reconnects"] >= 1, timeout=10), "the worker never noticed"
            noticed = time.monotonic() - started
            assert noticed <= health + timeout + 1.0, noticed  # + slack for a loaded 2-core machine
            assert isinstance(sub.stats()["last_error"], str)
            # a publisher facing the same silence fails after one socket timeout, it does not hang
            started = time.monotonic()
            with pytest.raises(PublishError, match="(?i)timeout"):
                pub.publish(make_policy(2))
            assert time.monotonic() - started < 3 * timeout + 1.0
            time.sleep(0.5)
        finally:
            redis_server.resume()
        subscribes = sub.stats()["subscribes"]
        assert wait_until(lambda: sub.stats()["subscribes"] > subscribes, timeout=10)  # reconnected
        version = pub.publish(make_policy(3))
        assert sub.wait_for_version(version, timeout=10) == version
        assert bit_identical(target, make_policy(3))


# --------------------------------------------------------------------------- restart with no data


def test_redis_restarting_empty_versions_keep_increasing_and_workers_never_go_back(redis_server):
    from click.testing import CliRunner

    from redisbus.cli import cli

    def workers_json() -> dict:
        result = CliRunner().invoke(cli, ["--url", redis_server.url, "-n", NS, "workers", "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    target = zeros_like_policy()
    with WeightPublisher(redis_server.url, namespace=NS, **FAST) as pub, WeightSubscriber(
        redis_server.url, namespace=NS, target=target, worker_id="w1", apply="immediate", **FAST
    ) as sub:
        sub.start()
        for seed in (1, 2, 3):
            pub.publish(make_policy(seed))
        assert sub.wait_for_version(3, timeout=10) == 3
        redis_server.restart()  # no persistence: seq, latest, versions and chunks are gone
        assert pub.publish(make_policy(4)) == 4  # the running publisher carries on above what it published
        assert sub.wait_for_version(4, timeout=10) == 4
        assert bit_identical(target, make_policy(4))

        redis_server.restart()
        with WeightPublisher(redis_server.url, namespace=NS) as newcomer:  # a trainer that lost its state too
            assert newcomer.publish(make_policy(5)) == 1
        time.sleep(1.0)  # several polls and a notice: version 1 is older than what the worker holds
        assert sub.version == 4
        assert bit_identical(target, make_policy(4))
        assert sub.stats()["errors"] == 0
        # what an operator sees: latest is 1, and the worker (re-reporting after the restart) holds version 4
        assert wait_until(lambda: any(w["worker_id"] == "w1" for w in workers_json()["workers"]), timeout=5)
        seen = workers_json()
        assert seen["latest"] == 1
        assert [w["version"] for w in seen["workers"] if w["worker_id"] == "w1"] == [4]


# --------------------------------------------------------------------------- slow worker


def test_slow_worker_ends_on_the_newest_version_never_on_a_mix(redis_server, monkeypatch):
    original = resp_module.read_chunks_into

    def slow_read(client, keys, views, first=(), **kwargs):  # every chunk arrives late: one pull outlasts many publishes
        replies = original(client, [], [], first=first, **kwargs)  # the small commands sent ahead, at once
        for key, view in zip(keys, views):
            time.sleep(0.04)
            original(client, [key], [view], **kwargs)
        return replies

    monkeypatch.setattr(resp_module, "read_chunks_into", slow_read)
    expected: dict[int, str] = {}
    like = make_policy(0)
    with WeightPublisher(redis_server.url, namespace=NS, chunk_size=1024, keep_versions=1, grace_seconds=0) as pub:
        worker = Worker(redis_server.url, expected, like, "slow")
        try:
            worker.sub.start()
            for seed in range(1, 16):
                policy = make_policy(seed)
                version = pub.publish(policy)
                expected[version] = digest(policy)
                time.sleep(0.03)  # a publish every ~30 ms; one pull takes 3 chunks x 40 ms
            assert worker.sub.wait_for_version(version, timeout=20) == version
            assert digest(worker.target) == expected[version]
            assert worker.torn == []
            assert len(worker.applied) < 15  # it skipped versions, as a slow worker should
        finally:
            worker.sub.close()


# --------------------------------------------------------------------------- two publishers


def test_two_publishers_on_one_namespace_get_unique_increasing_versions_and_are_visible(redis_server):
    from click.testing import CliRunner

    from redisbus.cli import cli

    results: dict[str, list[tuple[int, int]]] = {"trainer-a": [], "trainer-b": []}
    expected: dict[int, str] = {}

    def trainer(name: str, seeds: range) -> None:
        with WeightPublisher(redis_server.url, namespace=NS, publisher_id=name) as pub:
            for seed in seeds:
                policy = make_policy(seed)
                version = pub.publish(policy)
                expected[version] = digest(policy)
                results[name].append((version, seed))

    worker = Worker(redis_server.url, expected, make_policy(0), "w")
    try:
        worker.sub.start()
        threads = [threading.Thread(target=trainer, args=("trainer-a", range(1, 9))),
                   threading.Thread(target=trainer, args=("trainer-b", range(101, 109)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        versions = [v for pairs in results.values() for v, _ in pairs]
        assert sorted(versions) == list(range(1, 17))  # unique, no gaps
        for pairs in results.values():
            assert [v for v, _ in pairs] == sorted(v for v, _ in pairs)  # increasing per publisher
        assert worker.sub.wait_for_version(16, timeout=10) == 16
        assert digest(worker.target) == expected[16]
        assert worker.torn == []
    finally:
        worker.sub.close()
    client = redis_server.client()
    assert {p.publisher_id for p in list_publishers(client, KeySpace(NS))} == {"trainer-a", "trainer-b"}
    result = CliRunner().invoke(cli, ["--url", redis_server.url, "-n", NS, "status"])
    assert result.exit_code == 0
    assert "trainer-a" in result.output and "trainer-b" in result.output
    assert "2 publishers wrote to this namespace" in result.output


# --------------------------------------------------------------------------- out of memory


def test_maxmemory_reached_during_a_publish_leaves_latest_alone_and_no_orphans(redis_server):
    admin = redis_server.client()
    keys = KeySpace(NS)
    small = {"w": torch.randn(1024), "b": torch.randn(8)}
    target = TensorDict({k: torch.zeros_like(v) for k, v in small.items()}, [])
    with WeightPublisher(redis_server.url, namespace=NS, chunk_size=1 << 20) as pub, WeightSubscriber(
        redis_server.url, namespace=NS, target=target, apply="immediate", **FAST
    ) as sub:
        sub.start()
        assert pub.publish(small) == 1
        assert sub.wait_for_version(1, timeout=10) == 1
        redis_server.config_set("maxmemory-policy", "noeviction")
        redis_server.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + 4 * 1024 * 1024)
        huge = {"w": torch.randn(4 * 1024 * 1024), "b": torch.randn(8)}  # 16 MB: does not fit
        with pytest.raises(PublishError, match="OOM") as caught:
            pub.publish(huge)
        assert "maxmemory" in str(caught.value)
        assert int(admin.get(keys.latest)) == 1
        report = collect(admin, keys, keep=3, grace_seconds=0, pending_timeout=0)
        leftover = [keys.parse_chunk(k) for k in admin.scan_iter(match=keys.chunk_pattern)]
        assert {v for v, _ in leftover} == {1}, (report, leftover)
        assert admin.zcard(keys.pending) == 0
        time.sleep(0.5)  # the worker keeps going (its heartbeat may be refused meanwhile)
        assert sub.version == 1 and bit_identical(target, TensorDict(small, []))
        redis_server.config_set("maxmemory", 0)
        version = pub.publish({"w": small["w"] * 2, "b": small["b"]})
        assert version == 3  # version 2 was spent on the failed publish; numbers stay unique
        assert sub.wait_for_version(version, timeout=10) == version
        assert torch.equal(target["w"], small["w"] * 2)


def test_a_worker_whose_heartbeat_is_refused_still_follows_the_weights(redis_server):
    with WeightPublisher(redis_server.url, namespace=NS) as pub:
        pub.publish(make_policy(1))
    redis_server.config_set("maxmemory-policy", "noeviction")
    redis_server.config_set("maxmemory", 1)  # every write is refused (OOM); reads still work
    target = zeros_like_policy()
    with WeightSubscriber(redis_server.url, namespace=NS, target=target, apply="immediate", **FAST) as sub:
        sub.start()
        assert sub.wait_for_version(1, timeout=10) == 1
        assert wait_until(lambda: sub.stats()["errors_by_type"].get("RedisCommandError", 0) >= 2, timeout=5)
        assert "OOM" in sub.stats()["last_error"]
        assert sub.stats()["reconnects"] == 0 and sub.stats()["subscribes"] == 1  # the listener was never torn down
        assert bit_identical(target, make_policy(1))
    redis_server.config_set("maxmemory", 0)


def test_publisher_backoff_is_capped_and_the_error_is_a_connection_error(redis_server):
    with WeightPublisher(redis_server.url, namespace=NS, backoff_cap=0.2, socket_timeout=1.0) as pub:
        pub.publish(make_policy(1))
        redis_server.kill()
        started = time.monotonic()
        with pytest.raises(PublishError) as caught:
            pub.publish(make_policy(2))
        assert time.monotonic() - started < 3.0  # a few jittered retries, each under the cap
        assert isinstance(caught.value.__cause__, BusConnectionError)
        redis_server.start()
        assert pub.publish(make_policy(3)) >= 2


# --------------------------------------------------------------------------- the soak script, tiny


@pytest.mark.slow
def test_soak_script_smoke():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"
    args = ["--workers", "2", "--versions", "10", "--interval", "0.05", "--size-mb", "0.25", "--kill-min", "0.2",
            "--kill-max", "0.4", "--down-max", "0.2", "--poison-every", "4", "--json"]
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] and summary["problems"] == []
    assert summary["restarts"] >= 1
    # 2 of 10 steps poisoned; plus the last weights again if a kill took the last version with it
    assert summary["final_version"] >= 10
    assert summary["versions_committed"] == 8 + summary["republished_after_loss"]
    for worker in summary["workers"].values():
        assert worker["applies"] >= 1


def test_pulls_longer_than_the_socket_timeout_are_not_mistaken_for_a_dead_connection(redis_server, monkeypatch):
    original = resp_module.read_chunks_into

    def slow_read(*args, **kwargs):
        time.sleep(0.5)  # longer than socket_timeout: the notice connection's PONG waits meanwhile
        return original(*args, **kwargs)

    monkeypatch.setattr(resp_module, "read_chunks_into", slow_read)
    target = zeros_like_policy()
    settings = {**FAST, "socket_timeout": 0.3, "health_check_interval": 0.05}
    with WeightPublisher(redis_server.url, namespace=NS) as pub, WeightSubscriber(
        redis_server.url, namespace=NS, target=target, apply="immediate", **settings
    ) as sub:
        sub.start()
        for seed in range(1, 7):
            version = pub.publish(make_policy(seed))
            time.sleep(0.1)  # notices queue up behind the health check while the worker pulls
        assert sub.wait_for_version(version, timeout=20) == version
        assert sub.stats()["reconnects"] == 0, sub.stats()["last_error"]
        assert bit_identical(target, make_policy(6))
