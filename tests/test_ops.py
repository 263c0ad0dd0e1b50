"""The operator API (redisbus.ops and the modules behind it) against real redis-server processes, real publishers and real workers."""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from helpers import bit_identical, wait_until
from helpers import make_policy as _small_policy
from tensordict import TensorDict

from redisbus import (
    CorruptBlobError,
    VersionNotFoundError,
    WeightPublisher,
    WeightSubscriber,
)
from redisbus.errors import ConfigError
from redisbus.keys import KeySpace
from redisbus.ops import BusAdmin
from redisbus.registry import WorkerReport, report_worker
from redisbus.tensorstats import tensor_stats
from redisbus.transport import uses_sharded_pubsub
from redisbus.weightfiles import FileFormatError, read_weights_file

pytest_plugins = ["cluster_fixtures"]

NS = "ops"
CHUNK = 1024  # the smallest chunk size: every version spans several chunks


def make_policy(seed: int) -> TensorDict:
    """The shared test policy (every dtype) plus a 5 KiB matrix, so a version spans several 1 KiB chunks."""
    policy = _small_policy(seed)
    policy["big"] = torch.randn(40, 32, generator=torch.Generator().manual_seed(seed))
    return policy


def zeros_like_policy() -> TensorDict:
    return make_policy(0).apply(torch.zeros_like)


def publish_versions(url: str, count: int, namespace: str = NS, start_seed: int = 1) -> dict[int, TensorDict]:
    """Publish ``count`` versions (seeds start_seed...) with metadata {"step": seed}; return version -> weights."""
    out = {}
    with WeightPublisher(url, namespace=namespace, chunk_size=CHUNK, keep_versions=100, publisher_id="trainer-0") as pub:
        for seed in range(start_seed, start_seed + count):
            policy = make_policy(seed)
            out[pub.publish(policy, metadata={"step": seed})] = policy
    return out


@pytest.fixture
def url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def admin(url) -> Iterator[BusAdmin]:
    with BusAdmin(url, namespace=NS) as a:
        yield a


@pytest.fixture
def worker(url) -> Iterator[tuple[WeightSubscriber, TensorDict]]:
    target = zeros_like_policy()
    sub = WeightSubscriber(url, namespace=NS, target=target, worker_id="worker-a", apply="immediate",
                           poll_interval=0.2, heartbeat_interval=0.2)
    yield sub, target
    sub.close()


def pulled(admin: BusAdmin, version: int) -> dict[str, torch.Tensor]:
    manifest, buffer = admin.pull(version)
    return {".".join(e.key): buffer.view(e).clone() for e in manifest.tensors}


def flat(td: TensorDict) -> dict[str, torch.Tensor]:
    return {".".join((k,) if isinstance(k, str) else k): v for k, v in td.items(include_nested=True, leaves_only=True)}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_list_versions_reports_latest_pin_publisher_sizes_and_missing_chunks(url, admin, redis_server):
    published = publish_versions(url, 3)
    admin.pin(1)
    redis_server.client().delete(KeySpace(NS).chunk(2, 1))
    infos = admin.list_versions()
    assert [v.version for v in infos] == [1, 2, 3]
    by = {v.version: v for v in infos}
    assert by[3].latest and not by[2].latest and by[1].pinned and not by[3].pinned
    assert by[1].metadata == {"step": 1} and by[1].publisher["id"] == "trainer-0"
    nbytes = sum(t.numel() * t.element_size() for t in published[1].values(include_nested=True, leaves_only=True))
    assert by[1].total_bytes >= nbytes and by[1].tensor_count == 9
    assert by[1].chunk_count == -(-by[1].total_bytes // CHUNK) > 1
    assert by[1].complete and by[3].complete
    assert not by[2].complete and by[2].chunks_present == by[2].chunk_count - 1
    assert abs(by[3].created - time.time()) < 60
    assert by[2].to_dict()["complete"] is False


def test_empty_or_unknown_namespace_and_unknown_version_are_not_found(url, admin):
    with pytest.raises(VersionNotFoundError, match="no versions in namespace 'ops'"):
        admin.list_versions()
    with pytest.raises(VersionNotFoundError):
        admin.inspect()
    publish_versions(url, 2)
    with pytest.raises(VersionNotFoundError, match=r"version 7 not found .*versions there: 1, 2"):
        admin.inspect(7)
    with pytest.raises(VersionNotFoundError):
        admin.verify([7])
    with pytest.raises(VersionNotFoundError):
        admin.pin(7)


def test_inspect_lists_tensors_and_computes_stats_from_the_pulled_blob(url, admin):
    weights = {
        "layer.w": torch.tensor([[1.0, -2.0], [float("nan"), float("inf")]]),
        "layer.b": torch.tensor([3.0, 5.0], dtype=torch.float16),
        "count": torch.tensor([1, 2, 3, 6]),
        "flag": torch.tensor([True, False, True, True]),
        "z": torch.tensor([3 + 4j], dtype=torch.complex64),
        "none": torch.zeros(0, 3),
    }
    with WeightPublisher(url, namespace=NS, chunk_size=CHUNK) as pub:
        version = pub.publish(weights, metadata={"step": 7, "tag": "x"})
    info = admin.inspect(version, stats=True)
    assert info.version == version == info.latest and info.metadata == {"step": 7, "tag": "x"}
    rows = {t.key: t for t in info.tensors}
    assert set(rows) == {"layer.w", "layer.b", "count", "flag", "z", "none"}
    assert rows["layer.w"].dtype == "float32" and rows["layer.w"].shape == [2, 2] and rows["layer.w"].nbytes == 16
    w = rows["layer.w"].stats
    assert (w.min, w.max, w.mean, w.nan, w.inf, w.finite) == (-2.0, 1.0, -0.5, 1, 1, 2)
    assert w.norm == pytest.approx(5 ** 0.5)
    assert (rows["count"].stats.mean, rows["count"].stats.max) == (3.0, 6.0)
    assert rows["flag"].stats.mean == 0.75
    assert rows["z"].stats.max == 5.0  # complex: magnitudes
    assert rows["none"].stats.numel == 0 and rows["none"].stats.min is None
    plain = admin.inspect(version)
    assert plain.tensors[0].stats is None
    assert info.to_dict()["tensors"][0]["stats"]["nan"] in (0, 1)


def test_tensor_stats_slices_large_tensors(monkeypatch):
    from redisbus import tensorstats

    monkeypatch.setattr(tensorstats, "STATS_SLICE", 7)
    t = torch.arange(100, dtype=torch.float32)
    s = tensor_stats(t)
    assert (s.min, s.max, s.mean, s.numel) == (0.0, 99.0, 49.5, 100)
    assert s.norm == pytest.approx(float(t.double().norm()))


def test_verify_names_corrupt_missing_and_resized_chunks(url, admin, redis_server):
    publish_versions(url, 3)
    client, keys = redis_server.client(), KeySpace(NS)
    assert all(r.ok for r in admin.verify())
    client.setrange(keys.chunk(2, 0), 0, b"X")
    client.delete(keys.chunk(2, 2))
    client.append(keys.chunk(3, 1), b"extra")
    results = {r.version: r for r in admin.verify()}
    assert results[1].ok and results[1].chunks_ok == results[1].chunk_count
    assert not results[2].ok and results[2].bad_chunks == [0, 2]
    problems = {p.chunk: p.problem for p in results[2].problems}
    assert "checksum" in problems[0] and problems[2] == "missing"
    assert results[2].problems[0].key == keys.chunk(2, 0)
    assert results[3].bad_chunks == [1] and "bytes" in results[3].problems[0].problem
    assert admin.verify([1])[0].ok
    with pytest.raises(CorruptBlobError, match="incomplete"):
        admin.pull(2)
    with pytest.raises(CorruptBlobError, match=r"\{ops:3:1\}"):
        admin.pull(3)


def test_verify_reports_a_broken_manifest_and_a_dangling_latest(url, admin, redis_server):
    publish_versions(url, 2)
    client, keys = redis_server.client(), KeySpace(NS)
    client.set(keys.manifest(1), b"\x81\xa3not")
    client.set(keys.latest, 9)
    results = {r.version: r for r in admin.verify()}
    assert not results[1].ok and "manifest" in results[1].problems[0].problem
    assert results[2].ok
    assert not results[9].ok and "latest names version 9" in results[9].problems[0].problem


def test_verify_checks_signatures_with_the_key(url, redis_server):
    with WeightPublisher(url, namespace=NS, chunk_size=CHUNK, signing_key=b"k" * 32) as pub:
        pub.publish(make_policy(1))
    with BusAdmin(url, namespace=NS) as unkeyed:
        assert unkeyed.verify()[0].signature == "not checked"
    with BusAdmin(url, namespace=NS, signing_key=b"k" * 32) as keyed:
        assert keyed.verify()[0].ok and keyed.verify()[0].signature == "ok"
    with BusAdmin(url, namespace=NS, signing_key=b"other") as wrong:
        result = wrong.verify()[0]
        assert not result.ok and result.signature == "bad"


def test_diff_reports_changes_additions_removals_and_shape_changes(url, admin):
    old = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.ones(3), "gone": torch.zeros(2), "s": torch.zeros(2, 2)}
    new = {"a": torch.tensor([1.0, 2.0, 3.0, 7.0]), "b": torch.ones(3), "added": torch.zeros(1), "s": torch.zeros(4)}
    with WeightPublisher(url, namespace=NS) as pub:
        v1, v2 = pub.publish(old), pub.publish(new)
    result = admin.diff(v1, v2)
    rows = {t.key: t for t in result.tensors}
    assert rows["a"].change == "changed" and rows["a"].elements_changed == 1 and rows["a"].max_abs == 3.0
    assert rows["a"].rel_l2 == pytest.approx(3.0 / float(old["a"].norm()))
    assert rows["b"].change == "unchanged" and rows["b"].max_abs == 0.0
    assert rows["gone"].change == "removed" and rows["added"].change == "added"
    assert rows["s"].change == "shape" and rows["s"].old_shape == [2, 2] and rows["s"].new_shape == [4]
    assert not result.identical and admin.diff(v2, v2).identical
    assert result.to_dict()["tensors"][0]["key"] == "a"


def test_rollback_makes_a_running_worker_apply_the_old_weights_under_a_new_version(url, admin, worker):
    published = publish_versions(url, 3)
    sub, target = worker
    sub.start()
    assert sub.wait_for_version(3, timeout=10) == 3
    result = admin.rollback(1)
    assert result.version == 4 and result.metadata == {"rollback_of": 1}
    assert sub.wait_for_version(4, timeout=10) == 4
    assert bit_identical(target, published[1])
    assert admin.inspect(4).metadata == {"rollback_of": 1}
    before, after = pulled(admin, 1), pulled(admin, 4)
    assert before.keys() == after.keys() and all(same_bytes(before[k], after[k]) for k in before)
    assert [v.version for v in admin.list_versions()] == [1, 2, 3, 4]  # rollback never garbage-collects


def wait_calls(redis_server) -> int:
    """How many WAIT commands the server has run."""
    return int(redis_server.client().info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


def test_rollback_and_import_publish_with_the_admins_settings_not_the_environments(url, redis_server, free_port, monkeypatch, tmp_path):
    # REDISBUS_URL names another server, namespace and settings: none of it may reach the publisher
    monkeypatch.setenv("REDISBUS_URL", f"redis://127.0.0.1:{free_port}/3?namespace=elsewhere&wait_timeout=9&chunk_size=4096")
    publish_versions(url, 2)
    path = tmp_path / "w.safetensors"
    given_url = BusAdmin(f"{url}?wait_replicas=1&wait_timeout=0.2", namespace=NS)
    given_client = BusAdmin(redis_server.client(), namespace=NS, wait_replicas=1, wait_timeout=0.2, grace_seconds=7)
    for admin in (given_url, given_client):
        with admin, admin._publisher(chunk_size=2048) as publisher:
            assert publisher.config == admin.config.with_options(chunk_size=2048, keep_versions=publisher.config.keep_versions)
            assert publisher._client is admin.client and publisher.config.wait_replicas == 1
            before = wait_calls(redis_server)
            rolled = admin.rollback(1)  # no replica acknowledges: the WAIT times out and the commit goes on
            assert wait_calls(redis_server) == before + 1
            admin.export(rolled.version, path)
            assert admin.import_file(path).version == rolled.version + 1
            assert wait_calls(redis_server) == before + 2
    with BusAdmin(url, namespace=NS) as admin:
        assert admin.head() == (6, None)


def test_rollback_refuses_a_corrupt_version(url, admin, redis_server):
    publish_versions(url, 2)
    redis_server.client().setrange(KeySpace(NS).chunk(1, 0), 0, b"X")
    with pytest.raises(CorruptBlobError):
        admin.rollback(1)
    assert admin.head()[0] == 2


def test_pin_holds_workers_back_and_unpin_releases_them_at_once(url, admin, redis_server):
    publish_versions(url, 2)
    target = zeros_like_policy()
    # an hour-long poll timer: only notices move this worker
    with WeightSubscriber(url, namespace=NS, target=target, worker_id="w", apply="immediate", poll_interval=3600) as sub:
        sub.start()
        assert sub.wait_for_version(2, timeout=10) == 2
        result = admin.pin()
        assert result.pin == 2 and result.previous is None
        published = publish_versions(url, 1, start_seed=50)
        time.sleep(0.5)
        assert sub.version == 2
        assert admin.gc(keep=1, grace_seconds=0).kept == [2, 3]
        assert wait_until(lambda: any(w.state == "pinned" for w in admin.workers()), timeout=5)
        released = admin.unpin()
        assert released.previous == 2 and released.pin is None
        assert sub.wait_for_version(3, timeout=10) == 3  # the unpin re-announced latest
        assert bit_identical(target, published[3])
        assert admin.unpin().previous is None


def test_unpin_on_a_redis7_cluster_reannounces_to_sharded_subscribers(cluster):
    with WeightPublisher(cluster.url, namespace=NS, chunk_size=CHUNK) as pub, BusAdmin(cluster.url, namespace=NS) as admin:
        if not uses_sharded_pubsub(admin.client):
            pytest.skip("the cluster's servers are older than Redis 7: no sharded pub/sub")
        pub.publish(make_policy(1))
        target = zeros_like_policy()
        # an hour-long poll timer: only notices, which travel by SPUBLISH on this cluster, move this worker
        with WeightSubscriber(cluster.url, namespace=NS, target=target, apply="immediate", poll_interval=3600) as sub:
            sub.start()
            assert sub.wait_for_version(1, timeout=10) == 1
            admin.pin(1)
            pub.publish(make_policy(2))
            time.sleep(0.5)
            assert sub.version == 1
            assert admin.unpin().previous == 1
            assert sub.wait_for_version(2, timeout=10) == 2  # heard the unpin's re-announcement
            assert bit_identical(target, make_policy(2))


def test_pin_below_a_worker_lists_it_as_ahead(url, admin, worker):
    publish_versions(url, 3)
    sub, _ = worker
    sub.start()
    sub.wait_for_version(3, timeout=10)
    assert wait_until(lambda: any(w.version == 3 for w in admin.workers()), timeout=5)
    result = admin.pin(1)
    assert result.workers_ahead == ["worker-a"] and admin.head() == (3, 1)
    time.sleep(0.3)
    assert sub.version == 3  # never backwards


def test_gc_keeps_latest_and_pin_fades_the_rest_and_removes_orphans(url, admin, redis_server):
    publish_versions(url, 5)
    admin.pin(2)
    client, keys = redis_server.client(), KeySpace(NS)
    dry = admin.gc(keep=1, dry_run=True)
    assert dry.kept == [2, 5] and dry.evicted == [1, 3, 4] and dry.dry_run
    assert [v.version for v in admin.list_versions()] == [1, 2, 3, 4, 5]
    report = admin.gc(keep=1, grace_seconds=60)
    assert report.evicted == [1, 3, 4]
    assert [v.version for v in admin.list_versions()] == [2, 5]
    # evicted versions fade instead of vanishing: a worker mid-pull can finish
    assert client.exists(keys.chunk(3, 0)) and 0 < client.pttl(keys.chunk(3, 0)) <= 60_000
    client.set(keys.chunk(77, 0), b"orphan from a crashed publisher")
    orphans = admin.gc(keep=1, grace_seconds=0, pending_timeout=0)
    assert orphans.orphan_versions == [77] and orphans.orphan_chunks == 1
    assert not client.exists(keys.chunk(77, 0))
    admin.unpin()
    assert admin.gc(keep=1, grace_seconds=0).kept == [5]
    assert all(r.ok for r in admin.verify())
    with pytest.raises(ConfigError):
        admin.gc(keep=0)


def test_workers_show_lag_and_dead_workers_and_prune_them(url, admin, worker, redis_server):
    publish_versions(url, 3)
    sub, _ = worker
    sub.start()
    sub.wait_for_version(3, timeout=10)
    keys = KeySpace(NS)
    report_worker(redis_server.client(), keys, WorkerReport("old-1", 1, time.time() - 120, time.time() - 100, "hostx", 4242))
    report_worker(redis_server.client(), keys, WorkerReport("slow-2", 2, time.time(), time.time(), "hosty", 7))
    assert wait_until(lambda: any(w.worker_id == "worker-a" and w.version == 3 for w in admin.workers()), timeout=5)
    rows = {w.worker_id: w for w in admin.workers(dead_after=30)}
    assert rows["worker-a"].state == "current" and rows["worker-a"].lag == 0 and not rows["worker-a"].dead
    assert rows["old-1"].dead and rows["old-1"].state == "dead" and rows["old-1"].lag == 2
    assert rows["old-1"].heartbeat_age > 90 and rows["old-1"].host == "hostx" and rows["old-1"].pid == 4242
    assert rows["slow-2"].state == "lagging" and rows["slow-2"].lag == 1
    assert admin.prune_workers(dead_after=30) == ["old-1"]
    assert "old-1" not in {w.worker_id for w in admin.workers()}


def test_a_worker_ahead_of_latest_after_redis_restarted_empty_is_shown_ahead_not_current(url, admin, worker, redis_server):
    publish_versions(url, 3)
    sub, _ = worker
    sub.start()
    assert sub.wait_for_version(3, timeout=10) == 3
    redis_server.restart()  # persistence off: versions, latest and the worker reports are gone
    assert wait_until(lambda: [w.version for w in admin.workers()] == [3], timeout=10)  # the worker re-reported
    [w] = admin.workers()
    assert (w.lag, w.state) == (None, "ahead")  # it holds a version the namespace does not have
    publish_versions(url, 1, start_seed=20)  # a restarted trainer numbers from 1 again
    [w] = admin.workers()
    assert (w.version, w.lag, w.state) == (3, -2, "ahead") and w.to_dict()["lag"] == -2
    st = admin.status()
    assert (st.latest, st.workers, st.workers_current, st.workers_lagging, st.workers_ahead, st.workers_dead) == (1, 1, 0, 0, 1, 0)
    assert st.to_dict()["workers_ahead"] == 1
    assert sub.version == 3  # a worker never goes backwards


def test_status_summarises_the_namespace(url, admin, worker):
    with pytest.raises(VersionNotFoundError):
        admin.status()
    publish_versions(url, 2)
    sub, _ = worker
    sub.start()
    sub.wait_for_version(2, timeout=10)
    assert wait_until(lambda: admin.status().workers_current == 1, timeout=5)
    st = admin.status()
    assert st.workers_ahead == 0 and st.workers_lagging == 0
    assert st.latest == 2 and st.pin is None and st.versions == [1, 2] and st.stored_bytes > 0
    assert [p.publisher_id for p in st.publishers] == ["trainer-0"] and st.publishers[0].version == 2


def test_export_writes_a_safetensors_file_that_imports_back_bit_identical(url, admin, tmp_path):
    published = publish_versions(url, 2)
    path = tmp_path / "policy.safetensors"
    result = admin.export(2, path)
    assert result.version == 2 and result.tensor_count == 9 and path.stat().st_size == result.file_bytes
    from safetensors import safe_open
    from safetensors.torch import load_file

    loaded = load_file(str(path))
    expected = flat(published[2])
    assert loaded.keys() == expected.keys() and all(same_bytes(loaded[k], expected[k]) for k in expected)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["redisbus.version"] == "2" and meta["redisbus.namespace"] == NS and '"step": 2' in meta["redisbus.metadata"]
    imported = admin.import_file(path, metadata=["note=from-file", "epoch=3"])
    assert imported.version == 3 and imported.metadata == {"imported_from": "policy.safetensors", "note": "from-file", "epoch": 3}
    again = pulled(admin, 3)
    assert again.keys() == expected.keys() and all(same_bytes(again[k], expected[k]) for k in expected)
    assert not list(tmp_path.glob(".policy*"))  # no temp file left behind


def test_export_refuses_a_dtype_safetensors_cannot_store(url, admin, tmp_path):
    with WeightPublisher(url, namespace=NS) as pub:
        pub.publish({"z": torch.zeros(2, dtype=torch.complex128)})
    with pytest.raises(FileFormatError, match="complex128"):
        admin.export(None, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_import_reads_a_torch_state_dict_with_weights_only(url, admin, tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": module.state_dict(), "epoch": 12}, path)
    with pytest.raises(FileFormatError, match="--select"):
        admin.import_file(path)
    result = admin.import_file(path, select="model")
    target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with WeightSubscriber(url, namespace=NS, target=target) as sub:
        assert sub.wait_for_version(result.version, timeout=10) == result.version
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), target.state_dict().values()))


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["RB_PWNED"],))


def test_import_refuses_pickled_code_and_unknown_files(url, admin, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("RB_PWNED", str(marker))
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"w": _Boom()}, f)
    torch.save({"w": _Boom()}, tmp_path / "evil2.pth")
    for path in (evil, tmp_path / "evil2.pth"):
        with pytest.raises(FileFormatError, match="cannot load"):
            admin.import_file(path)
    assert not marker.exists()
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileFormatError, match="unknown file type"):
        admin.import_file(tmp_path / "notes.txt")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(FileFormatError):
        admin.import_file(tmp_path / "bad.safetensors")
    assert admin.head() == (None, None)


def test_read_weights_file_flattens_nested_state_dicts(tmp_path):
    path = tmp_path / "nested.pth"
    torch.save({"policy": {"actor": {"w": torch.ones(2)}, "critic.b": torch.zeros(1)}}, path)
    assert set(read_weights_file(path)) == {"policy.actor.w", "policy.critic.b"}
    assert set(read_weights_file(path, select="policy.actor")) == {"w"}
    with pytest.raises(FileFormatError, match="no entry"):
        read_weights_file(path, select="policy.nope")


def test_watch_yields_committed_versions_and_worker_applies(url, admin, worker):
    publish_versions(url, 1)
    sub, _ = worker
    sub.start()
    sub.wait_for_version(1, timeout=10)
    assert wait_until(lambda: admin.workers() and admin.workers()[0].version == 1, timeout=5)
    events = admin.watch(poll_interval=0.1, timeout=10)
    threading.Timer(0.3, lambda: publish_versions(url, 1, start_seed=9)).start()
    seen = []
    for event in events:
        seen.append(event)
        if event["event"] == "applied":
            break
    events.close()
    kinds = [e["event"] for e in seen]
    assert kinds == ["version", "applied"]
    assert seen[0]["version"] == 2 and seen[0]["metadata"] == {"step": 9} and seen[0]["tensors"] == 9
    assert seen[1] == {**seen[1], "worker": "worker-a", "version": 2, "previous": 1, "lag": 0}


def test_watch_reports_pin_changes_and_ends_at_its_timeout(url, admin):
    publish_versions(url, 2)

    def pin_one() -> None:
        with BusAdmin(url, namespace=NS) as other:
            other.pin(1)

    threading.Timer(0.2, pin_one).start()
    started = time.monotonic()
    events = list(admin.watch(poll_interval=0.05, timeout=1.0))
    assert 0.9 < time.monotonic() - started < 3
    assert [(e["event"], e["version"], e["previous"]) for e in events] == [("pin", 1, None)]


def test_watch_on_a_redis7_cluster_hears_the_sharded_notice_of_a_commit(cluster):
    with BusAdmin(cluster.url, namespace=NS) as admin, WeightPublisher(cluster.url, namespace=NS, chunk_size=CHUNK) as pub:
        if not uses_sharded_pubsub(admin.client):
            pytest.skip("the cluster's servers are older than Redis 7: no sharded pub/sub")
        pub.publish(make_policy(1))
        # an hour between polls: only the commit's notice, sent by SPUBLISH on this cluster, can wake the watch in time
        events = admin.watch(poll_interval=3600, timeout=20)
        publishing = threading.Timer(0.3, lambda: pub.publish(make_policy(2), metadata={"step": 2}))
        publishing.start()
        started = time.monotonic()
        event = next(events, None)
        elapsed = time.monotonic() - started
        events.close()
        publishing.join(30)  # its garbage collection may still run: finish before the publisher closes
        assert event is not None and (event["event"], event["version"], event["metadata"]) == ("version", 2, {"step": 2})
        assert elapsed < 10


def test_admin_works_on_fakeredis(fake_redis):
    with WeightPublisher(fake_redis, namespace=NS, chunk_size=CHUNK) as pub:
        v1 = pub.publish(make_policy(1))
        pub.publish(make_policy(2))
    admin = BusAdmin(fake_redis, namespace=NS)
    assert [v.version for v in admin.list_versions()] == [1, 2]
    assert all(r.ok for r in admin.verify())
    rolled = admin.rollback(v1)
    assert rolled.version == 3 and admin.diff(1, 3).identical
