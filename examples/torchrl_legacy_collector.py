"""Collector on the legacy updater API: `update_policy_weights_()` applies the newest version.

    REDISBUS_URL=redis://bus-host:6379/0 python torchrl_legacy_collector.py    # Ctrl-C to stop
"""

import os
import socket
import time

from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.testing.mocking_classes import ContinuousActionVecMockEnv

from redisbus.torchrl import RedisLocalWeightUpdater

url = os.environ.get("REDISBUS_URL", "redis://127.0.0.1:6379/0")
namespace = os.environ.get("REDISBUS_NAMESPACE", "ppo-run-7")

env = ContinuousActionVecMockEnv()  # your environment
policy = TensorDictModule(nn.Linear(7, 7), in_keys=["observation"], out_keys=["action"])  # the trainer's architecture

updater = RedisLocalWeightUpdater(url=url, namespace=namespace, worker_id=f"{socket.gethostname()}-collector-0")
collector = Collector(  # TorchRL warns that weight_updater= is deprecated: it is
    env,
    policy,
    frames_per_batch=64,
    total_frames=-1,
    track_policy_version=True,
    weight_updater=updater,  # starts from the newest published weights
)
try:
    for i, batch in enumerate(collector):
        version = int(batch["next", "policy_version"].max())
        print(f"batch {i}: policy version {version}", flush=True)
        time.sleep(0.05)  # stand-in: ship the batch to the trainer or a replay buffer
        collector.update_policy_weights_()  # between two batches: pull and apply the newest version
except KeyboardInterrupt:
    pass
finally:
    collector.shutdown()
    updater.close()
