"""Trainer with local worker processes: `MultiSyncCollector` gets its weights over the bus.

The workers receive weightless (meta) copies of `policy` and take the
published weights. Other hosts can follow the same namespace with
`torchrl_collector.py`.

    REDISBUS_URL=redis://bus-host:6379/0 python torchrl_multisync.py
"""

import os

import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.collectors import MultiSyncCollector
from torchrl.testing.mocking_classes import ContinuousActionVecMockEnv

from redisbus.torchrl import RedisWeightSyncScheme


def make_env():
    return ContinuousActionVecMockEnv()  # your environment


def main():
    url = os.environ.get("REDISBUS_URL", "redis://127.0.0.1:6379/0")
    namespace = os.environ.get("REDISBUS_NAMESPACE", "ppo-run-7")
    policy = TensorDictModule(nn.Linear(7, 7), in_keys=["observation"], out_keys=["action"])
    optim = torch.optim.SGD(policy.parameters(), lr=0.1)
    collector = MultiSyncCollector(
        [make_env, make_env],
        policy,  # published at start-up; the workers start from it
        frames_per_batch=64,
        total_frames=64 * 5,
        track_policy_version=True,
        weight_sync_schemes={"policy": RedisWeightSyncScheme(url, namespace=namespace)},
    )
    try:
        for i, batch in enumerate(collector):
            print(f"batch {i}: policy version {int(batch['next', 'policy_version'].max())}", flush=True)
            loss = policy(batch.select("observation").clone())["action"].square().mean()  # stand-in for your loss
            optim.zero_grad()
            loss.backward()
            optim.step()
            collector.update_policy_weights_()  # one publish; every worker applies it before its next batch
            print(f"published version {collector.policy_version}", flush=True)
    finally:
        collector.shutdown()


if __name__ == "__main__":  # worker processes are spawned: keep the entry point guarded
    main()
