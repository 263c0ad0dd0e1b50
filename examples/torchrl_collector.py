"""Collector on another host: its policy follows the trainer, updated between two batches.

    REDISBUS_URL=redis://bus-host:6379/0 python torchrl_collector.py    # Ctrl-C to stop
"""

import os
import time

from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.testing.mocking_classes import ContinuousActionVecMockEnv

from redisbus.torchrl import RedisWeightSyncScheme

url = os.environ.get("REDISBUS_URL", "redis://127.0.0.1:6379/0")
namespace = os.environ.get("REDISBUS_NAMESPACE", "ppo-run-7")

env = ContinuousActionVecMockEnv()  # your environment
policy = TensorDictModule(nn.Linear(7, 7), in_keys=["observation"], out_keys=["action"])  # the trainer's architecture

scheme = RedisWeightSyncScheme(url, namespace=namespace)
collector = Collector(
    env,
    policy,
    frames_per_batch=64,
    total_frames=-1,
    track_policy_version=True,  # each step records the trainer's version number
    weight_recv_schemes={"policy": scheme},  # starts from the newest published weights
)
try:
    for i, batch in enumerate(collector):  # the newest version is applied at the top of each rollout
        version = int(batch["next", "policy_version"].max())
        print(f"batch {i}: policy version {version}", flush=True)
        time.sleep(0.05)  # stand-in: ship the batch to the trainer or a replay buffer
except KeyboardInterrupt:
    pass
finally:
    collector.shutdown()
    scheme.shutdown()  # Collector.shutdown() leaves receiver schemes running
