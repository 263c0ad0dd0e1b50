"""redisbus.torchrl with real TorchRL collectors, real worker processes and a real redis-server.

The trainer's "update" in these tests is ``W = 0, b = 0.5`` on a
``Linear(7, 7)`` policy: after it, every action is exactly 0.5, before it the
actions vary with the observation. Bus version numbers are pushed past 3
first (``burn_versions``) so they can never be mistaken for a collector's own
+1 count. Helpers are module level: spawned worker processes unpickle them by
reference.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest
import torch
from helpers import wait_until
from tensordict import TensorDict
from torch import nn

from redisbus import BusConnectionError, SchemaMismatchError, WeightPublisher
from redisbus.torchrl import HAS_TORCHRL, RedisLocalWeightUpdater, RedisWeightUpdater

needs_torchrl = pytest.mark.skipif(not HAS_TORCHRL, reason="torchrl is not installed (pip install 'redisbus[torchrl]')")

ROOT = Path(__file__).resolve().parent.parent
BIAS = 0.5


# -------------------------------------------------------------------------- helpers


def make_policy(seed: int = 0):
    from tensordict.nn import TensorDictModule

    torch.manual_seed(seed)
    return TensorDictModule(nn.Linear(7, 7), in_keys=["observation"], out_keys=["action"])


def make_wide_policy(seed: int = 0):
    from tensordict.nn import TensorDictModule

    torch.manual_seed(seed)
    return TensorDictModule(nn.Sequential(nn.Linear(7, 4), nn.Linear(4, 7)), in_keys=["observation"], out_keys=["action"])


def make_env():
    from torchrl.testing.mocking_classes import ContinuousActionVecMockEnv

    return ContinuousActionVecMockEnv()


def zero_weight(policy, bias: float = BIAS) -> None:
    """The trainer's update: W = 0, b = bias, so every action equals ``bias``."""
    with torch.no_grad():
        policy.module.weight.zero_()
        policy.module.bias.fill_(bias)


def actions_are_bias(batch, bias: float = BIAS) -> bool:
    return bool(torch.allclose(batch["action"], torch.full_like(batch["action"], bias)))


def versions_in(batch) -> set[int]:
    return set(batch["next", "policy_version"].reshape(-1).tolist())


def weights_of(module) -> TensorDict:
    return TensorDict.from_module(module).clone()


def burn_versions(url: str, namespace: str, n: int = 3) -> int:
    """Publish ``n`` throw-away versions so bus versions start above any local +1 count."""
    with WeightPublisher(url, namespace=namespace) as pub:
        for _ in range(n):
            v = pub.publish(TensorDict.from_module(make_policy(99)))
    return v


def collector_kwargs(**kw):
    base = dict(frames_per_batch=8, total_frames=-1, auto_register_policy_transforms=False)
    base.update(kw)
    return base


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def namespace() -> str:
    return f"trl-{uuid.uuid4().hex[:8]}"


# -------------------------------------------------------------------------- legacy API, no torchrl needed


def test_legacy_updaters_round_trip_without_collector(redis_url, namespace):
    trainer, worker = nn.Linear(7, 7), nn.Linear(7, 7)
    up = RedisWeightUpdater(lambda: TensorDict.from_module(trainer), url=redis_url, namespace=namespace)
    local = RedisLocalWeightUpdater(worker, url=redis_url, namespace=namespace, worker_id="w0")
    try:
        assert local.version is None
        with torch.no_grad():
            trainer.weight.zero_()
        v1 = up()
        assert local() == v1 and local.version == v1
        assert torch.equal(worker.weight, trainer.weight)
        # the bus broadcasts: one version per call, however many workers are named
        assert up(worker_ids=["w0", "w1", "w2"]) == v1 + 1
        assert up.update_weights(TensorDict.from_module(trainer)) == v1 + 2
        assert up(worker_ids=3) == v1 + 3
        assert local() == v1 + 3
        assert local() is None  # nothing newer
        deadline = time.monotonic() + 5
        while "w0" not in up.all_worker_ids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "w0" in up.all_worker_ids()
    finally:
        up.close()
        local.close()


def test_legacy_updater_wait_for_workers(redis_url, namespace):
    trainer, worker = nn.Linear(3, 3), nn.Linear(3, 3)
    local = RedisLocalWeightUpdater(worker, url=redis_url, namespace=namespace, worker_id="w0", apply="immediate")
    up = RedisWeightUpdater(None, {torch.device("cpu"): trainer}, url=redis_url, namespace=namespace, wait_for_workers=5.0)
    try:
        assert wait_until(lambda: "w0" in up.all_worker_ids())  # "all workers" means those that reported
        v = up()  # returns once w0 reported v: its listener applied it immediately
        assert local.version == v and torch.equal(worker.weight, trainer.weight)
        up.wait_for_workers = 0.3
        with pytest.raises(TimeoutError, match="nobody"):
            up(worker_ids=["nobody"])
    finally:
        up.close()
        local.close()


def test_legacy_policy_weights_dict_copies_follow(redis_url, namespace):
    src, mirror = TensorDict.from_module(nn.Linear(3, 3)), TensorDict.from_module(nn.Linear(3, 3)).clone()
    with RedisWeightUpdater(None, {torch.device("cpu"): src, "cpu:1": mirror}, url=redis_url, namespace=namespace) as up:
        up()
    assert (mirror == src).all()  # TorchRL's per-device copies are updated in place


def test_maybe_map_weights_accepts_none(redis_url, namespace):
    with RedisWeightUpdater(None, None, url=redis_url, namespace=namespace) as up:
        assert up._maybe_map_weights(None) is None
        assert up._get_server_weights() is None
        with pytest.raises(ValueError, match="no weights"):
            up()


def test_register_collector_refuses_a_second(redis_url, namespace):
    class C:  # anything a weakref can point to
        pass

    a, b = C(), C()
    with RedisWeightUpdater(None, None, url=redis_url, namespace=namespace) as up:
        up.register_collector(a)
        with pytest.raises(RuntimeError, match="already registered"):
            up.register_collector(a)  # the same one again: refused too
        with pytest.raises(RuntimeError, match="already registered"):
            up.register_collector(b)
        assert up.collector is a and up.collectors == [a]


def test_works_without_torchrl(redis_url, namespace):
    code = f"""
import sys
sys.modules['torchrl'] = None  # every 'import torchrl...' now raises ImportError
import torch
from torch import nn
import redisbus.torchrl as rt
assert rt.HAS_TORCHRL is False
t, w = nn.Linear(3, 3), nn.Linear(3, 3)
up = rt.RedisWeightUpdater(None, {{torch.device('cpu'): t}}, url={redis_url!r}, namespace={namespace!r})
lo = rt.RedisLocalWeightUpdater(w, url={redis_url!r}, namespace={namespace!r})
v = up(); assert lo() == v and torch.equal(w.weight, t.weight)
try:
    rt.RedisWeightSyncScheme({redis_url!r})
except ImportError as e:
    assert 'torchrl' in str(e)
else:
    raise SystemExit('the scheme must raise ImportError without torchrl')
up.close(); lo.close()
print('OK')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


@needs_torchrl
def test_import_triggers_no_deprecation_warning():
    code = "import sys, redisbus; assert 'torchrl' not in sys.modules; import redisbus.torchrl; print('OK')"
    out = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr


# -------------------------------------------------------------------------- legacy API with a real Collector


@needs_torchrl
def test_legacy_collector_follows_trainer(redis_url, namespace):
    from torchrl.collectors import Collector, WeightUpdaterBase

    burn_versions(redis_url, namespace)
    trainer_policy = make_policy(0)
    up = RedisWeightUpdater(None, {torch.device("cpu"): TensorDict.from_module(trainer_policy)}, url=redis_url, namespace=namespace)
    local = RedisLocalWeightUpdater(url=redis_url, namespace=namespace, worker_id="collector-0")
    assert isinstance(up, WeightUpdaterBase) and isinstance(local, WeightUpdaterBase)
    with pytest.warns(DeprecationWarning, match="WeightUpdaterBase is deprecated"):  # TorchRL's own notice, not silenced
        collector = Collector(make_env(), make_policy(1), weight_updater=local, track_policy_version=True, **collector_kwargs())
    try:
        it = iter(collector)
        b0 = next(it)
        assert not actions_are_bias(b0)
        assert versions_in(b0) == {3}  # started from the newest published version
        zero_weight(trainer_policy)
        v = up()
        assert v == 4
        collector.update_policy_weights_()  # the worker's safe point: pulls and applies v
        b1 = next(it)
        assert actions_are_bias(b1)
        assert versions_in(b1) == {v}
        assert collector.policy_version == v
        with pytest.raises(RuntimeError, match="already registered"):
            local.register_collector(Collector(make_env(), make_policy(2), **collector_kwargs()))
    finally:
        collector.shutdown()
        up.close()
        local.close()


@needs_torchrl
def test_legacy_late_collector_starts_from_published_weights(redis_url, namespace):
    from torchrl.collectors import Collector

    trainer_policy = make_policy(0)
    zero_weight(trainer_policy)
    burn_versions(redis_url, namespace)
    with RedisWeightUpdater(None, trainer_policy, url=redis_url, namespace=namespace) as up:
        v = up()
    local = RedisLocalWeightUpdater(url=redis_url, namespace=namespace)
    with pytest.warns(DeprecationWarning):
        collector = Collector(make_env(), make_policy(1), weight_updater=local, track_policy_version=True, **collector_kwargs())
    try:
        b0 = next(iter(collector))
        assert actions_are_bias(b0)
        assert versions_in(b0) == {v}
    finally:
        collector.shutdown()
        local.close()


@needs_torchrl
def test_legacy_trainer_side_collector_publishes_its_policy(redis_url, namespace):
    """``Collector(weight_updater=RedisWeightUpdater(...))`` on the trainer: ``update_policy_weights_()`` publishes."""
    from torchrl.collectors import Collector

    burn_versions(redis_url, namespace)
    policy = make_policy(0)
    up = RedisWeightUpdater(url=redis_url, namespace=namespace)
    with pytest.warns(DeprecationWarning, match="WeightUpdaterBase is deprecated"):
        collector = Collector(make_env(), policy, weight_updater=up, track_policy_version=True, **collector_kwargs())
    follower = nn.Sequential()
    follower.module = nn.Linear(7, 7)  # same keys as the TensorDictModule: module.weight, module.bias
    local = RedisLocalWeightUpdater(follower, url=redis_url, namespace=namespace)
    try:
        it = iter(collector)
        next(it)
        zero_weight(policy)
        collector.update_policy_weights_()  # publishes the collector's policy (TorchRL then adds its +1)
        assert up.last_version == 4
        assert versions_in(next(it)) == {4}
        assert local() == 4 and torch.equal(follower.module.weight, policy.module.weight)
    finally:
        collector.shutdown()
        up.close()
        local.close()


@needs_torchrl
def test_legacy_schema_mismatch_at_start(redis_url, namespace):
    from torchrl.collectors import Collector

    with RedisWeightUpdater(None, make_policy(0), url=redis_url, namespace=namespace) as up:
        up()
    wide = make_wide_policy(2)
    before = weights_of(wide)
    local = RedisLocalWeightUpdater(url=redis_url, namespace=namespace)
    with pytest.raises(SchemaMismatchError, match="does not match the target"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchRL's legacy-path notice, asserted above
        Collector(make_env(), wide, weight_updater=local, **collector_kwargs())
    local.close()
    assert (TensorDict.from_module(wide) == before).all()


# -------------------------------------------------------------------------- WeightSyncScheme


@needs_torchrl
def test_scheme_trainer_without_collector_and_remote_collector(redis_url, namespace):
    from torchrl.collectors import Collector
    from torchrl.weight_update import WeightSyncScheme

    from redisbus.torchrl import RedisWeightSyncScheme

    burn_versions(redis_url, namespace)
    trainer_policy = make_policy(0)
    sender = RedisWeightSyncScheme(redis_url, namespace=namespace)
    assert isinstance(sender, WeightSyncScheme)
    sender.init_on_sender(model=trainer_policy)
    sender.connect()  # publishes the current weights
    v0 = sender.last_version
    assert v0 == 4
    worker_policy = make_policy(1)
    receiver = RedisWeightSyncScheme(redis_url, namespace=namespace)
    collector = Collector(make_env(), worker_policy, track_policy_version=True,
                          weight_recv_schemes={"policy": receiver}, **collector_kwargs())  # fmt: skip
    try:
        # connect() in the constructor applied v0: the worker holds the trainer's weights
        assert torch.equal(worker_policy.module.weight, trainer_policy.module.weight)
        it = iter(collector)
        b0 = next(it)
        assert versions_in(b0) == {v0}
        zero_weight(trainer_policy)
        v1 = sender.send()
        assert v1 == v0 + 1
        b1 = next(it)  # applied at the top of this rollout
        assert actions_are_bias(b1)
        assert versions_in(b1) == {v1}
        assert collector.policy_version == v1
        assert receiver.version == v1
        b2 = next(it)  # nothing new: same weights, same version
        assert actions_are_bias(b2) and versions_in(b2) == {v1}
    finally:
        collector.shutdown()
        receiver.shutdown()  # Collector.shutdown() does not shut receiver schemes down
        sender.shutdown()


@needs_torchrl
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scheme_remote_collector_on_cuda(redis_url, namespace):
    """A CPU trainer, a collector whose policy runs on the GPU: staged in pinned memory, applied on the device."""
    from torchrl.collectors import Collector

    from redisbus.torchrl import RedisWeightSyncScheme

    trainer_policy = make_policy(0)
    sender = RedisWeightSyncScheme(redis_url, namespace=namespace)
    sender.init_on_sender(model=trainer_policy)
    sender.connect()
    receiver = RedisWeightSyncScheme(redis_url, namespace=namespace)
    collector = Collector(make_env(), make_policy(1), policy_device="cuda", track_policy_version=True,
                          weight_recv_schemes={"policy": receiver}, **collector_kwargs())  # fmt: skip
    try:
        gpu_policy = collector.get_model("policy")
        assert gpu_policy.module.weight.is_cuda
        assert torch.equal(gpu_policy.module.weight.cpu(), trainer_policy.module.weight)
        it = iter(collector)
        next(it)
        zero_weight(trainer_policy)
        v = sender.send()
        b = next(it)
        assert actions_are_bias(b.cpu()) and versions_in(b) == {v}
    finally:
        collector.shutdown()
        receiver.shutdown()
        sender.shutdown()


class _PublishMidRollout(nn.Linear):
    """A Linear policy (the trainer's keys) whose step ``at_step`` makes the trainer publish."""

    def __init__(self, at_step, publish):
        super().__init__(7, 7)
        self.at_step, self.publish, self.calls = at_step, publish, 0

    def forward(self, obs):
        self.calls += 1
        if self.calls == self.at_step:
            self.publish()
            time.sleep(0.5)  # time for the listener to pull and stage it
        return super().forward(obs)


def _mid_rollout_setup(redis_url, namespace, **receiver_options):
    from tensordict.nn import TensorDictModule
    from torchrl.collectors import Collector

    from redisbus.torchrl import RedisWeightSyncScheme

    trainer_policy = make_policy(0)
    sender = RedisWeightSyncScheme(redis_url, namespace=namespace, publish_on_connect=False)
    sender.init_on_sender(model=trainer_policy)
    sender.connect()

    def publish():
        zero_weight(trainer_policy)
        sender.send()

    torch.manual_seed(1)
    policy = TensorDictModule(_PublishMidRollout(at_step=3, publish=publish), in_keys=["observation"], out_keys=["action"])
    receiver = RedisWeightSyncScheme(redis_url, namespace=namespace, **receiver_options)
    collector = Collector(make_env(), policy, track_policy_version=True,
                          weight_recv_schemes={"policy": receiver}, **collector_kwargs())  # fmt: skip
    return sender, receiver, collector


@needs_torchrl
def test_scheme_applies_between_batches_not_mid_rollout(redis_url, namespace):
    sender, receiver, collector = _mid_rollout_setup(redis_url, namespace)
    try:
        it = iter(collector)
        b0 = next(it)  # the trainer published during step 3 of this batch
        assert receiver._subscriber.staged_version == sender.last_version  # pulled and staged, not applied
        assert not actions_are_bias(b0[3:])  # nothing changed mid-rollout
        b1 = next(it)
        assert actions_are_bias(b1)
        assert versions_in(b1) == {sender.last_version}
    finally:
        collector.shutdown()
        receiver.shutdown()
        sender.shutdown()


@needs_torchrl
def test_scheme_immediate_mode_applies_mid_rollout(redis_url, namespace):
    sender, receiver, collector = _mid_rollout_setup(redis_url, namespace, apply="immediate")
    try:
        it = iter(collector)
        b0 = next(it)
        assert not actions_are_bias(b0[:2])
        assert actions_are_bias(b0[3:])  # asked for: applied mid-rollout
        b1 = next(it)  # the version tag follows at the next safe point
        assert versions_in(b1) == {sender.last_version}
    finally:
        collector.shutdown()
        receiver.shutdown()
        sender.shutdown()


@needs_torchrl
def test_scheme_late_collector_and_schema_mismatch(redis_url, namespace):
    from torchrl.collectors import Collector

    from redisbus.torchrl import RedisWeightSyncScheme

    trainer_policy = make_policy(0)
    zero_weight(trainer_policy)
    burn_versions(redis_url, namespace)
    with WeightPublisher(redis_url, namespace=namespace) as pub:
        v = pub.publish(trainer_policy)
    # a collector started after the last publish starts from those weights
    receiver = RedisWeightSyncScheme(redis_url, namespace=namespace)
    c = Collector(make_env(), make_policy(1), track_policy_version=True,
                  weight_recv_schemes={"policy": receiver}, **collector_kwargs())  # fmt: skip
    try:
        b0 = next(iter(c))
        assert actions_are_bias(b0) and versions_in(b0) == {v}
    finally:
        c.shutdown()
        receiver.shutdown()
    # a policy of another shape: a clear error from the constructor, weights untouched
    wide = make_wide_policy(2)
    before = weights_of(wide)
    receiver = RedisWeightSyncScheme(redis_url, namespace=namespace)
    with pytest.raises(SchemaMismatchError, match=f"version {v} does not match the target"):
        Collector(make_env(), wide, weight_recv_schemes={"policy": receiver}, **collector_kwargs())
    assert receiver._subscriber is None  # its listener was stopped
    receiver.shutdown()
    assert (TensorDict.from_module(wide) == before).all()


@needs_torchrl
def test_scheme_mid_run_schema_change_is_a_clear_error(redis_url, namespace):
    from torchrl.collectors import Collector

    from redisbus.torchrl import RedisWeightSyncScheme

    sender = RedisWeightSyncScheme(redis_url, namespace=namespace)
    sender.init_on_sender(model=make_policy(0))
    sender.connect()
    worker_policy = make_policy(1)
    receiver = RedisWeightSyncScheme(redis_url, namespace=namespace)
    collector = Collector(make_env(), worker_policy, weight_recv_schemes={"policy": receiver}, **collector_kwargs())
    try:
        it = iter(collector)
        next(it)
        before = weights_of(worker_policy)
        v = sender.send(TensorDict.from_module(make_wide_policy(3)))  # the trainer changed architecture
        with pytest.raises(SchemaMismatchError, match=f"version {v}"):
            next(it)
        assert (TensorDict.from_module(worker_policy) == before).all()
        assert receiver.stats()["failed_versions"] == [v]
    finally:
        collector.shutdown()
        receiver.shutdown()
        sender.shutdown()


@needs_torchrl
def test_scheme_pickles_without_connection(redis_url, namespace):
    from redisbus.torchrl import RedisWeightSyncScheme

    s = RedisWeightSyncScheme(redis_url, namespace=namespace, timeout=3.0)
    s.init_on_sender(model=make_policy(0))  # nobody else holds this policy: the scheme must
    s.connect()
    try:
        assert s.last_version == 1
        data = pickle.dumps(s)
        clone = pickle.loads(data)
        assert clone._publisher is None and clone._subscriber is None and clone._hook is None
        assert not clone.initialized_on_sender and not clone.synchronized_on_sender
        assert clone.bus_config == s.bus_config and clone.timeout == 3.0
        assert b"redis.client" not in data and b"Thread" not in data
    finally:
        s.shutdown()
    from redisbus import ConfigError

    with pytest.raises(ConfigError, match="cannot carry a live client"):
        RedisWeightSyncScheme(object())


@needs_torchrl
def test_scheme_receive_weights_applies_now(redis_url, namespace):
    """``collector.receive_weights()`` applies the newest version at once (TorchRL's explicit receive)."""
    from torchrl.collectors import Collector

    from redisbus.torchrl import RedisWeightSyncScheme

    trainer_policy = make_policy(0)
    sender = RedisWeightSyncScheme(redis_url, namespace=namespace)
    sender.init_on_sender(model=trainer_policy)
    sender.connect()
    worker_policy = make_policy(1)
    receiver = RedisWeightSyncScheme(redis_url, namespace=namespace)
    collector = Collector(make_env(), worker_policy, track_policy_version=True,
                          weight_recv_schemes={"policy": receiver}, **collector_kwargs())  # fmt: skip
    try:
        zero_weight(trainer_policy)
        v = sender.send()
        collector.receive_weights()
        assert torch.equal(worker_policy.module.weight, trainer_policy.module.weight)
        assert collector.policy_version == v
        assert receiver.receive() is None  # nothing newer
    finally:
        collector.shutdown()
        receiver.shutdown()
        sender.shutdown()


@needs_torchrl
def test_scheme_trainer_side_collector_carries_bus_versions(redis_url, namespace):
    """A trainer that collects too: ``Collector(weight_sync_schemes=...)`` publishes; its batches carry the bus version."""
    from torchrl.collectors import Collector

    from redisbus.torchrl import RedisWeightSyncScheme

    burn_versions(redis_url, namespace)
    policy = make_policy(0)
    sender = RedisWeightSyncScheme(redis_url, namespace=namespace)
    collector = Collector(make_env(), policy, track_policy_version=True,
                          weight_sync_schemes={"policy": sender}, **collector_kwargs())  # fmt: skip
    receiver_policy = make_policy(1)
    receiver = RedisWeightSyncScheme(redis_url, namespace=namespace)
    remote = Collector(make_env(), receiver_policy, track_policy_version=True,
                       weight_recv_schemes={"policy": receiver}, **collector_kwargs())  # fmt: skip
    try:
        assert sender.last_version == 4  # published at construction
        it, rit = iter(collector), iter(remote)
        zero_weight(policy)
        collector.update_policy_weights_()  # publishes v5 (TorchRL then adds its local +1)
        b = next(it)
        assert versions_in(b) == {5}
        rb = next(rit)
        assert actions_are_bias(rb) and versions_in(rb) == {5}
    finally:
        remote.shutdown()
        collector.shutdown()
        receiver.shutdown()
        sender.shutdown()


@needs_torchrl
def test_scheme_respects_the_operators_pin(redis_url, namespace):
    """With a pin below ``latest`` the safe point applies the pin, without waiting out its timeout."""
    from torchrl.collectors import Collector

    from redisbus.ops import BusAdmin
    from redisbus.torchrl import RedisWeightSyncScheme

    trainer_policy = make_policy(0)
    sender = RedisWeightSyncScheme(redis_url, namespace=namespace)
    sender.init_on_sender(model=trainer_policy)
    sender.connect()
    v1 = sender.last_version
    receiver = RedisWeightSyncScheme(redis_url, namespace=namespace, timeout=5.0)
    collector = Collector(make_env(), make_policy(1), track_policy_version=True,
                          weight_recv_schemes={"policy": receiver}, **collector_kwargs())  # fmt: skip
    admin = BusAdmin(redis_url, namespace=namespace)
    try:
        it = iter(collector)
        admin.pin(v1)
        zero_weight(trainer_policy)
        v2 = sender.send()
        start = time.monotonic()
        b = next(it)
        assert time.monotonic() - start < 2.0
        assert versions_in(b) == {v1} and not actions_are_bias(b)
        admin.unpin()
        b = next(it)
        assert versions_in(b) == {v2} and actions_are_bias(b)
    finally:
        admin.close()
        collector.shutdown()
        receiver.shutdown()
        sender.shutdown()


@needs_torchrl
def test_scheme_collector_keeps_collecting_without_redis(redis_server, namespace):
    """Redis going away is not the collector's problem: batches go on with the weights it has."""
    from torchrl.collectors import Collector

    from redisbus.torchrl import RedisWeightSyncScheme

    trainer_policy = make_policy(0)
    zero_weight(trainer_policy)
    with WeightPublisher(redis_server.url, namespace=namespace) as pub:
        v = pub.publish(trainer_policy)
    receiver = RedisWeightSyncScheme(redis_server.url, namespace=namespace, socket_timeout=0.5)
    collector = Collector(make_env(), make_policy(1), track_policy_version=True,
                          weight_recv_schemes={"policy": receiver}, **collector_kwargs())  # fmt: skip
    try:
        it = iter(collector)
        next(it)
        redis_server.kill()
        with pytest.raises(BusConnectionError):
            receiver._subscriber.wanted_version()
        b = next(it)
        assert actions_are_bias(b) and versions_in(b) == {v}
    finally:
        collector.shutdown()
        receiver.shutdown()


@needs_torchrl
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["policy", "policy_factory", "follower"])
def test_scheme_multisync_collector(redis_url, namespace, mode):
    """Local worker processes fed by the bus. ``follower``: a MultiSyncCollector on a host that follows
    a trainer elsewhere (``read_only=True``): its workers subscribe directly and it never publishes."""
    from torchrl.collectors import MultiSyncCollector

    from redisbus.torchrl import RedisWeightSyncScheme

    burn_versions(redis_url, namespace)
    trainer_policy = make_policy(0)
    trainer = None
    if mode == "follower":
        trainer = RedisWeightSyncScheme(redis_url, namespace=namespace)
        trainer.init_on_sender(model=trainer_policy)
        trainer.connect()  # v4
    kwargs = {
        "policy": dict(policy=trainer_policy),
        "policy_factory": dict(policy_factory=make_policy),
        "follower": dict(policy=make_policy(5)),
    }[mode]
    scheme = RedisWeightSyncScheme(redis_url, namespace=namespace, read_only=mode == "follower")
    collector = MultiSyncCollector(
        [make_env, make_env], frames_per_batch=16, total_frames=-1, track_policy_version=True,
        weight_sync_schemes={"policy": scheme}, auto_register_policy_transforms=False, **kwargs,
    )  # fmt: skip
    try:
        it = iter(collector)
        b0 = next(it)
        assert not actions_are_bias(b0)
        # policy: the parent published it at start-up (v4) and the workers, given meta copies, took it;
        # policy_factory: the workers took the newest version (v3); follower: the trainer's v4
        assert versions_in(b0) == ({3} if mode == "policy_factory" else {4})
        zero_weight(trainer_policy)
        if mode == "follower":
            v = trainer.send()
            with pytest.raises(RuntimeError, match="read_only"):
                collector.update_policy_weights_()
        elif mode == "policy_factory":
            collector.update_policy_weights_(trainer_policy)  # no policy in the parent: pass the weights
            v = scheme.last_version
        else:
            collector.update_policy_weights_()
            v = scheme.last_version
        assert v == (4 if mode == "policy_factory" else 5)
        b1 = next(it)
        assert actions_are_bias(b1)  # both worker processes
        assert versions_in(b1) == {v}
        if mode != "follower":
            assert collector.policy_version == v
        workers = {w.worker_id for w in _list_workers(redis_url, namespace)}
        assert len(workers) == 2 and all(w.endswith((":policy:0", ":policy:1")) for w in workers)
    finally:
        collector.shutdown()
        scheme.shutdown()
        if trainer is not None:
            trainer.shutdown()


def _list_workers(url, namespace):
    from redisbus.ops import BusAdmin

    with BusAdmin(url, namespace=namespace) as admin:
        return admin.workers()


# -------------------------------------------------------------------------- examples and docs

EXAMPLES = ROOT / "examples"


def _example_env(redis_url: str, namespace: str) -> dict[str, str]:
    env = dict(os.environ, REDISBUS_URL=redis_url, REDISBUS_NAMESPACE=namespace, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run_pair(trainer: str, collector: str, redis_url: str, namespace: str) -> tuple[str, list[int]]:
    """Start the collector script, then the trainer; stop the collector once it used the trainer's last version."""
    env = _example_env(redis_url, namespace)
    col = subprocess.Popen([sys.executable, str(EXAMPLES / collector)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    seen: list[int] = []
    try:
        assert col.stdout is not None
        for line in col.stdout:  # wait until it collects
            lines.append(line)
            if line.startswith("batch"):
                break
        else:
            pytest.fail("collector example exited early:\n" + "".join(lines))
        tr = subprocess.run([sys.executable, str(EXAMPLES / trainer)], env=env, capture_output=True, text=True, timeout=120)
        assert tr.returncode == 0, tr.stdout + tr.stderr
        last = int(re.findall(r"published version (\d+)", tr.stdout)[-1])
        deadline = time.monotonic() + 60
        for line in col.stdout:
            lines.append(line)
            m = re.match(r"batch \d+: policy version (\d+)", line)
            if m:
                seen.append(int(m.group(1)))
                if seen[-1] == last:
                    break
            assert time.monotonic() < deadline, "".join(lines)
        else:
            pytest.fail("collector example exited early:\n" + "".join(lines))
        col.send_signal(signal.SIGINT)  # how a user stops it: Ctrl-C
        rest, _ = col.communicate(timeout=60)
        lines.append(rest)
        assert col.returncode == 0, "".join(lines)
        return tr.stdout, seen
    finally:
        if col.poll() is None:
            col.kill()
            col.wait()


@needs_torchrl
@pytest.mark.slow
def test_example_scheme_trainer_and_remote_collector(redis_url, namespace):
    out, seen = _run_pair("torchrl_trainer.py", "torchrl_collector.py", redis_url, namespace)
    assert seen[-1] == 6 and len(set(seen)) >= 2, (out, seen)  # followed the trainer to its last version
    assert seen == sorted(seen)


@needs_torchrl
@pytest.mark.slow
def test_example_legacy_trainer_and_collector(redis_url, namespace):
    out, seen = _run_pair("torchrl_legacy_trainer.py", "torchrl_legacy_collector.py", redis_url, namespace)
    assert seen[-1] == 6 and len(set(seen)) >= 2, (out, seen)
    assert seen == sorted(seen)


@needs_torchrl
@pytest.mark.slow
@pytest.mark.parametrize("script", ["torchrl_multisync.py", "torchrl_multisync_factory.py"])
def test_example_multisync(redis_url, namespace, script):
    out = subprocess.run([sys.executable, str(EXAMPLES / script)], env=_example_env(redis_url, namespace),
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    last, checked = None, 0
    for kind, version in re.findall(r"(published|policy) version (\d+)", out.stdout):
        if kind == "published":
            last = int(version)
        elif last is not None:
            assert int(version) == last, out.stdout  # every batch ran on the version published just before it
            checked += 1
    assert checked >= 4, out.stdout


def test_docs_show_the_examples_verbatim():
    """The README's TorchRL section is copy-paste: every example script appears in it, whole."""
    doc = (ROOT / "README.md").read_text()
    scripts = sorted(EXAMPLES.glob("torchrl_*.py"))
    assert len(scripts) >= 6
    for script in scripts:
        assert script.read_text().strip() in doc, f"{script.name} is not in README.md as it is"
        assert script.name in doc


def _rendered_signature(cls) -> str:
    import inspect

    parts, star = [], False
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        elif p.default is p.empty:
            parts.append(p.name)
        else:
            default = f'"{p.default}"' if isinstance(p.default, str) else repr(p.default)
            parts.append(f"{p.name}={default}")
    return f"{cls.__name__}({', '.join(parts)})"


@needs_torchrl
def test_docs_reference_matches_the_signatures():
    from redisbus.torchrl import RedisWeightSyncScheme

    doc = " ".join((ROOT / "README.md").read_text().split())
    for cls in (RedisWeightSyncScheme, RedisWeightUpdater, RedisLocalWeightUpdater):
        assert _rendered_signature(cls) in doc.replace("( ", "("), _rendered_signature(cls)
