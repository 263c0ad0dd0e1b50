"""Trainer on the legacy updater API: `RedisWeightUpdater` publishes one version per call.

    REDISBUS_URL=redis://bus-host:6379/0 python torchrl_legacy_trainer.py
"""

import os
import time

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn

from redisbus.torchrl import RedisWeightUpdater

url = os.environ.get("REDISBUS_URL", "redis://127.0.0.1:6379/0")
namespace = os.environ.get("REDISBUS_NAMESPACE", "ppo-run-7")

policy = TensorDictModule(nn.Linear(7, 7), in_keys=["observation"], out_keys=["action"])
optim = torch.optim.SGD(policy.parameters(), lr=0.1)

# TorchRL's constructor shape: (get_server_weights, policy_weights), plus where the bus is
updater = RedisWeightUpdater(lambda: TensorDict.from_module(policy), url=url, namespace=namespace)
print(f"published version {updater()}", flush=True)  # the initial weights
try:
    for step in range(5):
        loss = policy.module.weight.square().sum()  # stand-in for your loss on the collected data
        optim.zero_grad()
        loss.backward()
        optim.step()
        version = updater()  # one new version for every worker
        print(f"step {step}: published version {version}", flush=True)
        time.sleep(0.2)  # stand-in for the rest of a training step
    print("workers on the bus:", updater.all_worker_ids(), flush=True)
finally:
    updater.close()
